"""Runtime-module benchmark on a GPU host: emit, load (cold, in a fresh process), check every kernel against
dense attention with the same layout, and time one image's self-attention (all scales x all layers, CFG batch 2,
captured in one CUDA graph) for the module against cuDNN and FlashAttention-2 dense in the same run.

    PYTHONPATH=. python bench/module_e2e.py [--model infinity-8b] [--db tuning.sqlite] [--out e2e.json]

Plans measured: ``sparvar`` (the default plan: CSLA at and above the bound layer from the decision scale on;
layers below the bound run CS4A: dense plus statistics at the decision scale, dynamic kernels after it) and ``static``
(``bound_layer: 0``: CSLA in every layer from the decision scale on).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import cold_start  # noqa: E402
from sparvar_compiler.codegen.reference import relative_error  # noqa: E402
from sparvar_compiler.db import TuningDatabase  # noqa: E402
from sparvar_compiler.emit.emitter import emit_module  # noqa: E402
from sparvar_compiler.planner import PlanConfig, make_plan  # noqa: E402
from sparvar_compiler.planner.gpus import gpu_from_device_name  # noqa: E402
from sparvar_compiler.tuner.measure import golden, same_dtype_reference  # noqa: E402

def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # cuDNN's SDPA refuses a key length of 1 (scale 0): a cuDNN user falls back to FlashAttention there.
    order = {"cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION],
             "flash": [SDPBackend.FLASH_ATTENTION]}[backend]

    def run(q, k, v, scale):
        with sdpa_kernel(order, set_priority=True):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

    return run


def image_inputs(plan, batch, dtype):
    """One (q, k, v) per scale: q/k L2-normalised, q times a per-head scale as in Infinity."""
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    out = {}
    for s in plan.scales:
        q = torch.randn(batch, plan.heads, s.tokens, plan.head_dim, device="cuda", generator=gen)
        k = torch.randn(batch, plan.heads, s.kv_len, plan.head_dim, device="cuda", generator=gen)
        v = torch.randn(batch, plan.heads, s.kv_len, plan.head_dim, device="cuda", generator=gen)
        q = torch.nn.functional.normalize(q, dim=-1) * 12.0
        k = torch.nn.functional.normalize(k, dim=-1)
        out[s.index] = tuple(t.to(dtype).contiguous() for t in (q, k, v))
    return out


def graph_time(fn, reps=10) -> float:
    """Median ms of replaying one CUDA graph of ``fn`` (one whole image of attention calls)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def per_scale_times(plan, call, inputs, scale_value, reps=20):
    """Median ms of one layer's call per scale, per mode present (graph of that scale's layers)."""
    out = {}
    for s in plan.scales:
        q, k, v = inputs[s.index]
        outs = torch.empty_like(q)

        def fn(s=s, q=q, k=k, v=v, outs=outs):
            for layer in range(plan.depth):
                call(q, k, v, s.index, layer, scale_value, outs)

        out[s.index] = graph_time(fn, reps=5) / plan.depth
    return out


def main() -> None:
    if os.environ.get("HANG_DUMP_S"):
        faulthandler.dump_traceback_later(int(os.environ["HANG_DUMP_S"]), exit=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="infinity-8b")
    ap.add_argument("--db", help="tuning database with this GPU's winners (default: untuned configs)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    gpu = gpu_from_device_name(props.name, props.multi_processor_count)
    card = gpu.name if gpu else props.name.replace(" ", "_")
    print(f"device: {props.name} ({props.multi_processor_count} SMs) -> target {card}", flush=True)
    db = TuningDatabase.open(args.db) if args.db else None
    result = {"card": props.name, "target": card, "model": args.model, "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "plans": {}}
    dense = {"cudnn": sdpa("cudnn"), "flash": sdpa("flash")}
    for plan_name, cfg in (("sparvar", PlanConfig()), ("static", PlanConfig(bound_layer=0))):
        plan = make_plan(args.model, config=cfg)
        mod_dir = Path(tempfile.mkdtemp()) / f"{args.model}-{plan_name}-{card}"
        t0 = time.perf_counter()
        manifest = emit_module(plan, gpu, mod_dir, db=db, progress=lambda s: print("  " + s, flush=True))
        emit_s = time.perf_counter() - t0
        cold = cold_start(mod_dir)
        print(f"[{plan_name}] emitted in {emit_s:.1f} s; cold load + first call {cold['load_plus_first_call_s']:.3f} s",
              flush=True)
        import sparvar_compiler.runtime as rt

        m = rt.load(mod_dir)
        inputs = image_inputs(plan, m.batch, m.dtype)
        checks = []
        for name, kinfo in manifest["kernels"].items():
            s = kinfo["scale"]
            layer = next(r["layer"] for r in manifest["dispatch"] if r["kernel"] == name)
            q, k, v = inputs[s]
            o = torch.full_like(q, float("nan"))
            m.attention(q, k, v, s, layer, out=o)
            mask = m._masks.get(name)
            if mask is None:
                from sparvar_compiler.planner.layout import BlockLayout

                mask = torch.from_numpy(BlockLayout.from_npz(mod_dir / kinfo["layout_file"]).to_token_mask())
            gold = golden(q, k, v, mask.cuda(), m.default_scale)
            ref = same_dtype_reference(q, k, v, mask.cuda(), m.default_scale)
            err, rerr = relative_error(o, gold), relative_error(ref, gold)
            checks.append({"kernel": name, "rel_err": err, "ref_err": rerr, "ok": err <= 3 * rerr})
            print(f"  check {name}: rel err {err:.2e} (bf16 SDPA-with-mask reference {rerr:.2e})", flush=True)

        def image(call):
            outs = {i: torch.empty_like(inputs[i][0]) for i in inputs}

            def fn():
                for s in plan.scales:
                    q, k, v = inputs[s.index]
                    for layer in range(plan.depth):
                        call(q, k, v, s.index, layer, m.default_scale, outs[s.index])
            return fn

        # No out= on either side: every call allocates its output from the graph's pool, as a model would.
        ours = lambda q, k, v, s, l, sc, o: m.attention(q, k, v, s, l)  # noqa: E731
        row = {"emit_s": emit_s, "cold": cold, "checks": checks, "tuned": manifest["tuned"],
               "kernels": {n: {"config": k["config"], "tuned": k["tuned"], "sparsity": k["sparsity"]}
                           for n, k in manifest["kernels"].items()}}
        row["attention_ms_per_image"] = {"module": graph_time(image(ours))}
        for dn, fn in dense.items():
            row["attention_ms_per_image"][dn] = graph_time(image(lambda q, k, v, s, l, sc, o, fn=fn: fn(q, k, v, sc)))
        row["per_scale_ms_per_layer"] = {
            "module": per_scale_times(plan, ours, inputs, m.default_scale),
            "cudnn": per_scale_times(plan, lambda q, k, v, s, l, sc, o: dense["cudnn"](q, k, v, sc), inputs,
                                     m.default_scale)}
        a = row["attention_ms_per_image"]
        row["speedup_vs_cudnn"] = a["cudnn"] / a["module"]
        row["speedup_vs_flash"] = a["flash"] / a["module"]
        print(f"[{plan_name}] per-image self-attention: module {a['module']:.2f} ms, cuDNN {a['cudnn']:.2f} ms "
              f"({row['speedup_vs_cudnn']:.2f}x), FA2 {a['flash']:.2f} ms ({row['speedup_vs_flash']:.2f}x)",
              flush=True)
        result["plans"][plan_name] = row
        del m
    out = args.out or ROOT / "bench" / "results" / f"module-e2e-{card}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
