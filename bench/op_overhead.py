"""Per-call overhead of the ``torch.ops.sparvar.attention`` operator against the module's direct call.

    PYTHONPATH=. python3 bench/op_overhead.py --module DIR [--out bench/results/op-overhead-<card>.json]

For a few (scale, layer) calls of a module (a small dense scale, where launch cost dominates, and the CSLA
kernels of the large scales), it times, on the same inputs in one run:

* ``direct``: ``module.attention(q, k, v, s, l, out=out)`` (Python, ctypes launch);
* ``op.out``: ``torch.ops.sparvar.attention.out(..., out=out)`` (one dispatcher hop more);
* ``op``: ``torch.ops.sparvar.attention(...)`` (allocates its output);

eagerly (host-bound: N calls back to back, wall time / N after a synchronise) and inside a CUDA graph of N calls
(device time per call from CUDA events over graph replays). The difference eager - graph is the host's share.
Every output is checked equal to the direct call's first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparvar_compiler.runtime as rt  # noqa: E402


def _inputs(m, s: int, batch: int):
    tokens, kv = m.scale_lengths()[s]
    q = torch.nn.functional.normalize(torch.randn(batch, m.heads, tokens, m.head_dim, device="cuda"), dim=-1) * 12
    k = torch.nn.functional.normalize(torch.randn(batch, m.heads, kv, m.head_dim, device="cuda"), dim=-1)
    v = torch.randn(batch, m.heads, kv, m.head_dim, device="cuda")
    return tuple(t.to(m.dtype).contiguous() for t in (q, k, v))


def _eager_us(fn, n: int, reps: int) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(times)


def _graph_us(fn, n: int, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n * 1e3)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--module", required=True, help="an emitted module (or a module set: its first member)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--calls", type=int, default=200, help="calls per timed run (and per graph)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    loaded = rt.load(args.module)
    m = loaded if isinstance(loaded, rt.SparvarModule) else next(iter(loaded))
    depth = m.manifest["model"]["depth"]
    cases = [(3, depth - 1)]  # a small dense scale: launch cost dominates
    cases += [(k["scale"], next(r["layer"] for r in m.manifest["dispatch"] if r["kernel"] == name))
              for name, k in sorted(m.manifest["kernels"].items(), key=lambda kv: kv[1]["scale"])]
    rows = []
    for s, layer in cases:
        q, k, v = _inputs(m, s, args.batch)
        out = torch.empty_like(q)
        want = m.attention(q, k, v, s, layer)
        variants = {
            "direct": lambda: m.attention(q, k, v, s, layer, out=out),
            "op.out": lambda: torch.ops.sparvar.attention.out(q, k, v, m.op_key, s, layer, m.default_scale, out=out),
            "op": lambda: torch.ops.sparvar.attention(q, k, v, m.op_key, s, layer, m.default_scale),
        }
        for name, fn in variants.items():
            got = fn()
            got = out if got is None else got
            if not torch.equal(got, want):
                raise SystemExit(f"{name} at scale {s} layer {layer} differs from the direct call")
        row = {"scale": s, "layer": layer, "op": m.op(s, layer)[0], "q": q.shape[2], "kv": k.shape[2]}
        for name, fn in variants.items():
            row[f"{name}_eager_us"] = round(_eager_us(fn, args.calls, args.reps), 2)
            row[f"{name}_graph_us"] = round(_graph_us(fn, args.calls, args.reps), 2)
        rows.append(row)
        print(f"scale {s:2} layer {layer:2} {row['op']:6}  eager us: direct {row['direct_eager_us']:8.1f} "
              f"op.out {row['op.out_eager_us']:8.1f} op {row['op_eager_us']:8.1f} | graph us: direct "
              f"{row['direct_graph_us']:8.1f} op.out {row['op.out_graph_us']:8.1f} op {row['op_graph_us']:8.1f}",
              flush=True)
    result = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "module": m.manifest["model"]["name"], "plan": {k: m.manifest["plan"][k] for k in ("resolution", "aspect")},
              "batch": args.batch, "calls_per_run": args.calls, "reps": args.reps, "rows": rows,
              "method": "eager: wall time of N back-to-back calls / N after synchronize (median of reps); graph: "
                        "CUDA events around a replay of a graph of N calls / N (median of reps)"}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
