"""CS4A on the GPU, one run on one card: check every piece against float64, then time the decision-scale
overhead (statistics + selection + residual) against that scale's dense attention, and the later CS4A scales
against cuDNN / FlashAttention-2 dense and against our CSLA kernel of the same scale.

    PYTHONPATH=. python bench/cs4a.py [--model infinity-8b] [--db tuning_db/sparvar.sqlite] [--out cs4a.json]

Inputs are Infinity-like (L2-normalised q times 12, normalised k, softmax scale 1.0), B=2 (CFG), bf16. Checks
use the first ``--check-heads`` heads of batch 0 (float64 over 4096 x 10521 scores per head). Every time is a
median with the L2 cleared before each run (``bench.kernels.bench_ms``). Writes ``bench/results/cs4a-<card>.json``.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.kernels import bench_ms, environment  # noqa: E402
from sparvar_compiler.codegen import cs4a_stats, cs4a_topk  # noqa: E402
from sparvar_compiler.codegen import triton_backend as tb  # noqa: E402
from sparvar_compiler.codegen.reference import reference_attention, relative_error  # noqa: E402
from sparvar_compiler.codegen.spec import KernelConfig, KernelConfigError  # noqa: E402
from sparvar_compiler.cs4a.select import (block_mass, block_tables, dcsla_select, fill_tables,  # noqa: E402
                                          group_mass_reference, kernel_tables_mask, token_tables, topk_keys,
                                          upsample_add)
from sparvar_compiler.emit.cs4a import dynamic_spec  # noqa: E402
from sparvar_compiler.emit.emitter import DTYPE, choose_kernels  # noqa: E402
from sparvar_compiler.planner import make_plan  # noqa: E402
from sparvar_compiler.planner.gpus import gpu_from_device_name  # noqa: E402
from sparvar_compiler.runtime.cs4a import dense_with_lse  # noqa: E402


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def infinity_inputs(batch, heads, q_len, kv_len, dim, gen):
    q = torch.nn.functional.normalize(torch.randn(batch, heads, q_len, dim, device="cuda", generator=gen), dim=-1) * 12
    k = torch.nn.functional.normalize(torch.randn(batch, heads, kv_len, dim, device="cuda", generator=gen), dim=-1)
    v = torch.randn(batch, heads, kv_len, dim, device="cuda", generator=gen)
    return tuple(t.to(torch.bfloat16).contiguous() for t in (q, k, v))


def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def run(q, k, v):
        with sdpa_kernel(which):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)

    return run


def check_heads(out, q, k, v, mask, heads):
    """Relative error of ``out`` vs float64 masked attention on batch 0, the first ``heads`` heads."""
    sl = (slice(0, 1), slice(0, heads))
    m = mask[sl] if mask.dim() == 4 else mask
    gold = reference_attention(q[sl], k[sl], v[sl], m, scale=1.0, dtype=torch.float64)
    same = reference_attention(q[sl], k[sl], v[sl], m, scale=1.0)
    return relative_error(out[sl], gold), relative_error(same, gold)


def sweep(spec, make_call, configs, rep_ms):
    """Time every config that builds; returns sorted [(ms, config dict)] and failures."""
    rows, failed = [], []
    for cfg in configs:
        try:
            kern = tb.build(spec, cfg)
            call = make_call(kern)
            call()
            torch.cuda.synchronize()
            rows.append((bench_ms(call, rep_ms), cfg.to_dict()))
        except (KernelConfigError, RuntimeError) as e:
            failed.append({"config": cfg.to_dict(), "error": str(e)[:200]})
    return sorted(rows, key=lambda r: r[0]), failed


def gather_configs(spec):
    return [KernelConfig(w, st, (("block_m", 64), ("block_n", bn), ("order", "q_major")))
            for bn in (64, 128) for w in (4, 8) for st in (2, 3, 4)]


def main() -> None:
    if os.environ.get("HANG_DUMP_S"):
        faulthandler.dump_traceback_later(int(os.environ["HANG_DUMP_S"]), exit=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="infinity-8b")
    ap.add_argument("--db", help="tuning database for the CSLA kernels' winners")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--check-heads", type=int, default=2)
    ap.add_argument("--rep-ms", type=int, default=60)
    ap.add_argument("--quick", action="store_true", help="fewer configs")
    args = ap.parse_args()
    env = environment(torch.device("cuda", 0))
    props = torch.cuda.get_device_properties(0)
    gpu = gpu_from_device_name(props.name, props.multi_processor_count)
    say(f"{env['card']} {env['versions']}")
    plan = make_plan(args.model)
    cfg = plan.config
    S, B, H, D = cfg.decision_scale, 2, plan.heads, plan.head_dim
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    inputs = {s.index: infinity_inputs(B, H, s.tokens, s.kv_len, D, gen) for s in plan.scales[S:]}
    res: dict = {"benchmark": "cs4a", **env, "model": args.model, "batch": B, "heads": H, "head_dim": D,
                 "dtype": "bf16", "decision_scale": S, "plan_config": cfg.to_dict(), "checks": {}, "decision": {},
                 "later": {}}
    q, k, v = inputs[S]
    dec = plan.scales[S]

    # ---------------------------------------------------------------- checks at the decision scale
    out, lse = dense_with_lse(q, k, v, 1.0)
    sl = (slice(0, 1), slice(0, args.check_heads))
    s64 = q[sl].double() @ k[sl].double().transpose(-1, -2)
    lse64 = torch.logsumexp(s64, dim=-1)
    res["checks"]["dense_lse_max_abs_err"] = float((lse[sl].double() - lse64).abs().max())
    res["checks"]["dense_rel_err"] = check_heads(out, q, k, v, torch.ones(1, dtype=torch.bool, device="cuda")
                                                 .expand(dec.tokens, dec.kv_len), args.check_heads)
    say(f"dense+lse checks {res['checks']}")
    stats = {}
    for mode, group in (("token", cfg.group_size), ("block", cfg.dcsla_block)):
        sspec = cs4a_stats.StatsSpec(B, H, dec.tokens, dec.kv_len, D, "bf16", group)
        kern = cs4a_stats.build(sspec)
        mass = kern(q, k, lse, 1.0)
        want = group_mass_reference(q[sl], k[sl], 1.0, group)
        err = float((mass[sl].double() - want).abs().max() / want.abs().max())
        if mode == "token":
            got_top = topk_keys(mass[sl], token_tables(plan, S).topk)
            want_top = topk_keys(want, token_tables(plan, S).topk)
            overlap = float(torch.isin(got_top, want_top).float().mean())  # rows match up to ties
        else:
            overlap = None
        res["checks"][f"stats_{mode}"] = {"max_rel_err": err, "topk_overlap_vs_float64": overlap}
        stats[mode] = (sspec, kern, mass)
        say(f"stats {mode}: {res['checks'][f'stats_{mode}']}")

    # Selections from the GPU statistics, as the runtime makes them.
    t_top = token_tables(plan, S).topk
    sel_token = topk_keys(stats["token"][2], t_top)
    bt_s = block_tables(plan, S)
    sel_block = dcsla_select(block_mass(stats["block"][2], cfg.dcsla_block), cfg.dcsla_coverage,
                             cfg.dcsla_min_blocks, bt_s.select_capacity)

    # ---------------------------------------------------------------- decision-scale timings
    dense_ms = {b: bench_ms(lambda b=b: sdpa(b)(q, k, v), args.rep_ms) for b in ("cudnn", "flash")}
    dense_lse_ms = bench_ms(lambda: dense_with_lse(q, k, v, 1.0), args.rep_ms)
    say(f"decision dense ms {dense_ms}, with lse {dense_lse_ms:.4f}")
    stat_rows = {}
    for mode in ("token", "block"):
        sspec = stats[mode][0]
        rows = []
        for stride in (1, 2, 4):
            sp = cs4a_stats.StatsSpec(B, H, dec.tokens, dec.kv_len, D, "bf16", sspec.group, stride)
            grid_ = [(bm, bn, ks, w) for bm in (32, 16) for bn in (128, 64) for ks in (4, 8, 16) for w in (4, 8)]
            if stride > 1:
                grid_ = [g for g in grid_ if g[1] == 128 and g[3] == 4]
            for bm, bn, ks, warps in grid_:
                c = KernelConfig(warps, 2, (("block_m", bm), ("block_n", bn), ("key_split", ks)))
                try:
                    kern = cs4a_stats.build(sp, c)
                    kern(q, k, lse, 1.0)
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001 - a config that cannot run (divisibility, resources) is skipped
                    continue
                rows.append({"stride": stride, "config": c.to_dict(),
                             "ms": bench_ms(lambda kern=kern: kern(q, k, lse, 1.0), args.rep_ms)})
        best = {st: min((r for r in rows if r["stride"] == st), key=lambda r: r["ms"], default=None)
                for st in (1, 2, 4)}
        stat_rows[mode] = {"best_by_stride": best, "all": rows}
        say(f"stats {mode} best: " + ", ".join(f"stride {st}: {b['ms']:.4f} ms {b['config']}"
                                              for st, b in best.items() if b))
    mass_t, mass_b = stats["token"][2], stats["block"][2]
    topk_kern = cs4a_topk.build(cs4a_topk.TopkSpec(mass_t.numel() // mass_t.shape[-1], mass_t.shape[-1], t_top))
    res["checks"]["topk_kernel_equals_torch_topk"] = bool(torch.equal(topk_kern(mass_t).long(), topk_keys(mass_t, t_top)))
    select_ms = {"token_torch_topk_sort": bench_ms(lambda: topk_keys(mass_t, t_top), args.rep_ms),
                 "token": bench_ms(lambda: topk_kern(mass_t), args.rep_ms),
                 "block": bench_ms(lambda: dcsla_select(block_mass(mass_b, cfg.dcsla_block), cfg.dcsla_coverage,
                                                        cfg.dcsla_min_blocks, bt_s.select_capacity), args.rep_ms)}
    say(f"selection ms {select_ms}")

    # ---------------------------------------------------------------- dynamic kernels (S for the residual, 11, 12)
    db = None
    if args.db:
        from sparvar_compiler.db import TuningDatabase
        db = TuningDatabase.open(args.db)
    csla = {c.scale: c for c in choose_kernels(plan, gpu, db)}
    scale_kind = "explicit"
    for sp_ in plan.scales[S:]:
        sc = sp_.index
        qs, ks, vs = inputs[sc]
        row = {"tokens": sp_.tokens, "kv_len": sp_.kv_len}
        if sc > S:
            row["cudnn_ms"] = bench_ms(lambda: sdpa("cudnn")(qs, ks, vs), args.rep_ms)
            row["flash_ms"] = bench_ms(lambda: sdpa("flash")(qs, ks, vs), args.rep_ms)
        if sc in csla:
            c = csla[sc]
            kern = tb.build(c.spec, c.config, c.layout)
            o = torch.empty_like(qs)
            row["csla"] = {"config": c.config.to_dict(), "tuned": c.tuned, "block": c.spec.block_m,
                           "ms": bench_ms(lambda: kern(qs, ks, vs, 1.0, out=o), args.rep_ms)}
        for mode, sel in (("token", sel_token), ("block", sel_block)):
            tables = token_tables(plan, sc) if mode == "token" else block_tables(plan, sc)
            spec = dynamic_spec(plan, tables, B, DTYPE, scale_kind)
            filled = fill_tables(tables, sel)
            mask = kernel_tables_mask(tables, {n: t[:1, : args.check_heads] for n, t in filled.items()})
            kept = float(mask.float().mean())
            fill_ms = bench_ms((lambda: tables.fill(sel, reuse=True)) if mode == "token"
                               else (lambda: fill_tables(tables, sel)), args.rep_ms)
            configs = gather_configs(spec) if mode == "token" else [
                KernelConfig(w, st, (("block_m", 64), ("block_n", 64), ("order", o)))
                for w in (4, 8) for st in (3, 5) for o in ("q_major", "head_major")]
            if args.quick:
                configs = configs[::3]
            outs = torch.empty_like(qs)
            rows, failed = sweep(spec, lambda kern: (lambda: kern(qs, ks, vs, 1.0, out=outs, tables=filled)),
                                 configs, args.rep_ms)
            entry = {"capacity": spec.capacity, "keys_kept_fraction": kept, "fill_ms": fill_ms,
                     "failed_configs": len(failed), "sweep": [{"ms": m, "config": c} for m, c in rows[:8]]}
            if rows:
                best_cfg = KernelConfig.from_dict(rows[0][1])
                kern = tb.build(spec, best_cfg)
                poisoned = torch.full_like(qs, float("nan"))
                kern(qs, ks, vs, 1.0, out=poisoned, tables=filled)
                err, ref = check_heads(poisoned, qs, ks, vs, mask, args.check_heads)
                entry.update(ms=rows[0][0], config=rows[0][1], rel_err=err, same_dtype_rel_err=ref,
                             correct=bool(err <= 3 * ref + 1e-6))
            if sc > S:
                res_s = torch.randn(B, H, dec.tokens, D, device="cuda", dtype=torch.bfloat16)
                grids = ((dec.h, dec.w), (sp_.h, sp_.w))
                entry["residual_add_ms"] = bench_ms(lambda: upsample_add(outs, res_s, *grids), args.rep_ms)
            row[mode] = entry
            say(f"scale {sc} {mode}: " + json.dumps({k_: v_ for k_, v_ in entry.items() if k_ != 'sweep'}))
        res["later" if sc > S else "decision"][str(sc)] = row

    # ---------------------------------------------------------------- summary
    base = dense_ms["cudnn"]
    summary = {}
    for mode in ("token", "block"):
        st1 = stat_rows[mode]["best_by_stride"][1]["ms"]
        resid = res["decision"][str(S)][mode].get("ms", 0) + res["decision"][str(S)][mode]["fill_ms"]
        extra_lse = max(0.0, dense_lse_ms - base)
        summary[mode] = {
            "decision_dense_cudnn_ms": base, "dense_with_lse_ms": dense_lse_ms, "stats_ms": st1,
            "select_ms": select_ms[mode], "residual_sparse_ms": resid,
            "overhead_no_residual": (extra_lse + st1 + select_ms[mode]) / base,
            "overhead_with_residual": (extra_lse + st1 + select_ms[mode] + resid) / base,
            **{f"overhead_stride{st}_no_residual": (extra_lse + stat_rows[mode]["best_by_stride"][st]["ms"]
                                                    + select_ms[mode]) / base
               for st in (2, 4) if stat_rows[mode]["best_by_stride"][st]},
        }
        for sc, row in res["later"].items():
            e = row[mode]
            if "ms" not in e:
                continue
            total = e["ms"] + e["fill_ms"] + (e["residual_add_ms"] if cfg.residual else 0)
            summary[mode][f"scale{sc}"] = {
                "kernel_ms": e["ms"], "with_fill_and_residual_ms": total, "x_cudnn": row["cudnn_ms"] / total,
                "x_flash": row["flash_ms"] / total, "x_csla": (row["csla"]["ms"] / total) if "csla" in row else None}
    res["decision"]["stats_sweeps"] = stat_rows
    res["decision"]["dense_ms"] = dense_ms
    res["decision"]["dense_with_lse_ms"] = dense_lse_ms
    res["decision"]["select_ms"] = select_ms
    res["summary"] = summary
    say("summary " + json.dumps(summary, indent=1))
    out = args.out or ROOT / "bench" / "results" / f"cs4a-{env['card_slug']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    say(f"wrote {out}")


if __name__ == "__main__":
    main()
