"""Part of .ci/wheel_smoke.sh: load an emitted module from the installed wheel and run one attention call.

    python wheel_smoke.py MODULE_DIR CHECKOUT_DIR

Checks that sparvar_compiler is imported from the venv (not from the checkout), loads the module (CPU fallback
without a GPU), and runs the last scale's attention in the last layer (a CSLA kernel in the default plan) on random
bf16 q/k/v of the manifest's shapes: the output must have q's shape and be finite.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(module_dir: str, checkout: str) -> int:
    import torch

    import sparvar_compiler
    import sparvar_compiler.runtime as rt

    where = Path(sparvar_compiler.__file__).resolve()
    if Path(checkout).resolve() in where.parents:
        raise SystemExit(f"sparvar_compiler was imported from the checkout ({where}), not from the wheel")
    print(f"sparvar_compiler {sparvar_compiler.__version__} from {where.parent}")

    t0 = time.perf_counter()
    m = rt.load(module_dir)
    man = m.manifest
    print(f"loaded {module_dir} in {time.perf_counter() - t0:.2f} s on {m.device} (fallback: {m.fallback})")

    batch, heads, head_dim = man["batch"], man["model"]["heads"], man["model"]["head_dim"]
    last = max(man["plan"]["scales"], key=lambda s: s["index"])
    layer = man["model"]["depth"] - 1
    op, name = m.op(last["index"], layer)
    if op != "kernel":
        raise SystemExit(f"scale {last['index']} layer {layer} runs {op!r}; the default plan puts a CSLA kernel there")
    torch.manual_seed(0)
    q = torch.randn(batch, heads, last["tokens"], head_dim, dtype=torch.bfloat16)
    k = torch.randn(batch, heads, last["kv_len"], head_dim, dtype=torch.bfloat16)
    v = torch.randn(batch, heads, last["kv_len"], head_dim, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    out = m.attention(q, k, v, last["index"], layer)
    took = time.perf_counter() - t0
    if out.shape != q.shape or out.dtype != q.dtype:
        raise SystemExit(f"output {tuple(out.shape)} {out.dtype}, expected {tuple(q.shape)} {q.dtype}")
    if not bool(torch.isfinite(out).all()):
        raise SystemExit("output has non-finite values")
    print(f"attention at scale {last['index']} ({last['tokens']} x {last['kv_len']}), layer {layer}: {name}, "
          f"q {list(q.shape)} bf16 -> finite output of q's shape in {took:.1f} s")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
