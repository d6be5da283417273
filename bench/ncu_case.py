"""Launch one benchmark case's Triton kernel a few times, for a profiler to look at (Nsight Compute).

    ncu --section SpeedOfLight --section MemoryWorkloadAnalysis -k regex:sparvar -c 1 \
        python3 bench/ncu_case.py infinity-8b/s10/64x64 gather '{"num_warps": 4, "num_stages": 5, ...}'

The case tag and kind are those of ``bench/kernels.py``; the config is a ``KernelConfig`` dict. The output is
checked against the float64 golden first, so a profile is never of a wrong kernel. L2 is flushed before the
profiled launch, as in the benchmark.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.cases import CASES  # noqa: E402
from bench.kernels import Checker, semantic_mask, triton_spec  # noqa: E402
from sparvar_compiler.codegen import triton_backend as tb  # noqa: E402
from sparvar_compiler.codegen.spec import DTYPES, KernelConfig, default_scale  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__)
        return 2
    tag, kind, cfg = argv[0], argv[1], KernelConfig.from_dict(json.loads(argv[2]))
    case = next((c for c in CASES if c.tag == tag), None)
    if case is None:
        raise SystemExit(f"unknown case {tag!r}; known: {', '.join(c.tag for c in CASES)}")
    layout = case.layout()
    spec = triton_spec(case, layout, kind)
    kernel = tb.build(spec, cfg, layout)
    dtype = DTYPES[case.dtype]
    q = torch.randn(case.batch, case.heads, layout.q_len, case.head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(case.batch, case.heads, layout.kv_len, case.head_dim, device="cuda", dtype=dtype)
            for _ in range(2))
    scale = default_scale(case.head_dim)
    out = torch.full_like(q, float("nan"))
    kernel(q, k, v, scale=scale, out=out)
    semantics = "block" if kind == "block" else "union"
    ok, err, ref = Checker(q, k, v, scale, layout).check(out, semantics)
    assert semantic_mask(layout, semantics).any()
    print(f"{tag} {kind}: error {err:.2e} (bf16 reference {ref:.2e}) -> {'ok' if ok else 'WRONG'}", flush=True)
    if not ok:
        return 1
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    for _ in range(3):
        flush.zero_()
        kernel(q, k, v, scale=scale, out=out)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
