"""Fidelity of every plan mode on the synthetic presets, a cross-scale-similarity sweep, and a timed calibration.

Cases are data (below). Every figure is from a SYNTHETIC regime built from explicit knobs (see
sparvar_compiler/fidelity/synthetic.py): it shows how each plan mode treats that regime, never image quality.
Shapes: Infinity-2B at 1024^2 1:1 (13 scales, queries up to 4096 x 10521 keys), 2 heads per layer, batch 1,
the default plan (decision scale 10, bound layer 9); query rows subsampled to 256 per scale (seeded), layers as
listed per case; random baselines over 8 draws per (layer, head); softmax scale 1.0 (Infinity's family default).

Writes bench/results/fidelity-<preset>.json (report + the knobs of every evaluated head), fidelity-sweep.json,
fidelity-residual.json (the CS4A residual and decision-band study: error with and without the residual, and with
the decision-scale pattern given the later scales' local band) and fidelity-calibrate.json (calibration with the
default floor and error cap on every preset and on files of the mixed preset, and the cap's evidence).
Run: .venv/bin/python bench/fidelity_presets.py [--quick] [--only presets|sweep|residual|calibrate]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sparvar_compiler.fidelity.calibrate import Floor, calibrate, verified_figures
from sparvar_compiler.fidelity.cli import default_synthetic_layers
from sparvar_compiler.fidelity.evaluate import ALL_MODES, EvalOptions, evaluate, sample_rows
from sparvar_compiler.fidelity.report import report_dict, summarise
from sparvar_compiler.fidelity.synthetic import (CONTENT, LOCAL, Preset, SyntheticSource,
                                                 write_synthetic_captures)
from sparvar_compiler.planner import PlanConfig, make_plan

MODEL = "infinity-2b"
HEADS = 2
ROWS = 256
RESULTS = Path(__file__).parent / "results"
# preset -> layers evaluated (mixed: evenly spaced plus the two layers around the bound, where regimes change)
CASES = {"local": (12, 20, 31), "content": (0, 4, 8), "content-fresh": (0, 4), "mixed": None}
KEY_MODES = ("csla_block", "csla_gather", "random", "cs4a_token", "cs4a_token_dap", "cs4a_block", "random_cs4a",
             "sparvar")
SWEEP = [("rho", r, dataclasses.replace(CONTENT, cross_scale_similarity=r)) for r in (0.0, 0.5, 0.8, 0.95)] + \
        [("new_key_content", c, dataclasses.replace(CONTENT, new_key_content=c)) for c in (0.0, 1.0)] + \
        [("locality_width", w, dataclasses.replace(LOCAL, locality_width=w)) for w in (0.5, 2.0, 4.0)]


def _environment() -> dict:
    import torch

    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "threads": torch.get_num_threads()}


def _key_table(summary: list[dict], decision_scale: int) -> dict[str, dict[str, dict]]:
    """regime -> mode -> mean over the scales after the decision scale (and at the decision scale for CSLA)."""
    out: dict[str, dict[str, dict]] = {}
    for regime in sorted({r["regime"] for r in summary}):
        out[regime] = {}
        for mode in KEY_MODES:
            rows = [r for r in summary if r["regime"] == regime and r["mode"] == mode and r["scale"] > decision_scale
                    and r.get("status") != "skipped"]
            if rows:
                out[regime][mode] = {k: round(float(np.mean([r[k] for r in rows])), 4)
                                     for k in ("density", "mass", "rel_l2", "cosine", "mass_sd", "rel_l2_sd")
                                     if k in rows[0]}
    return out


def _print_key(name: str, key: dict) -> None:
    print(f"\n{name} (synthetic regime; scales after the decision scale, mean over layers/heads)")
    print(f"  {'regime':<14} {'mode':<15} {'density':>7} {'mass':>6} {'rel L2':>7} {'cosine':>7}")
    for regime, modes in key.items():
        for mode, v in modes.items():
            print(f"  {regime:<14} {mode:<15} {v.get('density', float('nan')):7.3f} {v['mass']:6.3f} "
                  f"{v.get('rel_l2', float('nan')):7.3f} {v.get('cosine', float('nan')):7.3f}")


def run_presets(quick: bool) -> None:
    plan = make_plan(MODEL)
    S = plan.config.decision_scale
    for preset, layers in CASES.items():
        layers = layers or default_synthetic_layers(plan.depth, plan.config.bound_layer)
        if quick:
            layers = layers[:2]
        src = SyntheticSource(MODEL, preset, heads=HEADS, seed=0)
        t0 = time.perf_counter()
        ev = evaluate(src, plan, EvalOptions(block=128, query_sample=ROWS, modes=ALL_MODES, layers=tuple(layers)),
                      progress=lambda m: print(m, flush=True))
        knobs = {str(l): [src.head_knobs(l, h).to_dict() for h in range(HEADS)] for l in layers}
        key = _key_table(summarise(ev), S)
        extra = {"bench": {"heads": HEADS, "rows_per_scale_max": ROWS, "layers": list(layers),
                           "environment": _environment(), "wall_s": round(time.perf_counter() - t0, 1)},
                 "head_knobs": knobs, "key_table": key}
        path = RESULTS / f"fidelity-{preset}.json"
        path.write_text(json.dumps(report_dict(ev, extra), indent=1) + "\n")
        _print_key(f"preset {preset} -> {path.name} ({time.perf_counter() - t0:.0f} s)", key)


def run_sweep(quick: bool) -> None:
    """One knob at a time, from the content (or local) regime, on one layer."""
    plan = make_plan(MODEL)
    S = plan.config.decision_scale
    rows = []
    t0 = time.perf_counter()
    for knob, value, knobs in SWEEP[: 3 if quick else None]:
        regime = "content" if knob != "locality_width" else "local"
        preset = Preset(f"{regime}-{knob}={value}", f"{regime} with {knob} = {value}", (regime, knobs),
                        (regime, knobs), "all-low")
        src = SyntheticSource(MODEL, preset, heads=HEADS, seed=1)
        ev = evaluate(src, plan, EvalOptions(block=128, query_sample=ROWS, layers=(0,),
                                             modes=("csla_block", "random", "cs4a_token", "cs4a_token_dap",
                                                    "random_cs4a")), progress=None)
        key = _key_table(summarise(ev), S)[regime]
        rows.append({"knob": knob, "value": value, "regime": regime, "knobs": knobs.to_dict(), "figures": key})
        print(f"  sweep {regime:7} {knob}={value:<5}: " + "  ".join(f"{m} {v['mass']:.3f}" for m, v in key.items()),
              flush=True)
    out = {"kind": "sparvar-fidelity-sweep", "note": "SYNTHETIC regime sweep: one knob at a time; captured mass "
           "after the decision scale, not image quality", "model": MODEL, "heads": HEADS, "rows_per_scale_max": ROWS,
           "environment": _environment(), "wall_s": round(time.perf_counter() - t0, 1), "rows": rows}
    (RESULTS / "fidelity-sweep.json").write_text(json.dumps(out, indent=1) + "\n")


def _residual_layer(src: SyntheticSource, layer: int, plans: dict[bool, object], rows: dict[int, np.ndarray]
                    ) -> list[dict]:
    """Token CS4A (identity mapping) of one layer at every scale after the decision scale: per head the relative
    L2 error without the residual, with it (decision pattern = top-k, and = top-k + band), and the cosine between
    the upsampled residual and the true error of the sparse output (what the residual should cancel)."""
    import torch

    from sparvar_compiler.cs4a.select import upsample_residual
    from sparvar_compiler.fidelity.masks import cs4a_layer_masks, cs4a_plan
    from sparvar_compiler.fidelity.metrics import logits64, masked_output, relative_l2, softmax64, sparse_attention

    sc = src.softmax_scale
    plan0 = plans[False]
    S = plan0.config.decision_scale
    q, k, v = (torch.from_numpy(np.ascontiguousarray(a)) for a in src.qkv(S, layer))
    L = logits64(q, k, sc)
    dense_S = softmax64(L) @ v.double()
    per_band = {}
    for band, plan in plans.items():
        cplan = cs4a_plan(plan, "token", "identity")
        masks, dec = cs4a_layer_masks(cplan, q, k, sc, "token", "identity")
        per_band[band] = (cplan, masks, dense_S - masked_output(L, v, dec))
    out = []
    for s in range(S + 1, plan0.num_scales):
        qs, ks, vs = src.qkv(s, layer)
        idx = torch.from_numpy(rows[s])
        qr = torch.from_numpy(np.ascontiguousarray(np.asarray(qs)[:, :, rows[s]]))
        Ls = logits64(qr, torch.from_numpy(np.asarray(ks)), sc)
        P = softmax64(Ls)
        V = torch.from_numpy(np.asarray(vs)).double()
        dense = P @ V
        cplan, masks, _ = per_band[False]
        mass, sparse = sparse_attention(P, Ls, V, masks[s].index_select(2, idx))
        err = dense - sparse
        row = {"scale": s, "layer": layer, "regime": src.regime(layer),
               "mass": mass.mean(dim=(0, 2)).tolist(), "rel_l2_no_residual": relative_l2(sparse, dense).tolist()}
        for band, (cplan_b, _, residual) in per_band.items():
            up = upsample_residual(residual, cplan_b, s).index_select(2, idx)
            tag = "band" if band else "topk"
            row[f"rel_l2_residual_{tag}"] = relative_l2(sparse + up, dense).tolist()
            norms = (up.pow(2).sum(dim=(0, 2, 3)) * err.pow(2).sum(dim=(0, 2, 3))).sqrt()
            row[f"cos_residual_vs_error_{tag}"] = ((up * err).sum(dim=(0, 2, 3)) / norms).tolist()
        out.append(row)
    src.release(layer)
    return out


RESIDUAL_KEYS = ("rel_l2_no_residual", "rel_l2_residual_topk", "rel_l2_residual_band", "cos_residual_vs_error_topk",
                 "cos_residual_vs_error_band", "mass")


# (name, plan options): the default plan, a smaller top-k (the decision pattern misses more of a local head's
# neighbourhood) and an earlier decision scale with it (a coarser grid: the upsampled residual spreads further).
RESIDUAL_SETTINGS = [("default (S=10, top-k 0.2)", {}), ("top-k 0.1", {"topk_fraction": 0.1}),
                     ("S=8, top-k 0.1", {"decision_scale": 8, "topk_fraction": 0.1})]


def run_residual_study(quick: bool) -> dict:
    """Token CS4A with the residual off, on (as SparVAR: decision pattern = top-k) and on with the decision band,
    on every preset's layers (the plan's CS4A mode applied in every layer, as the report does), Infinity-2B, for
    each of :data:`RESIDUAL_SETTINGS`."""
    t0 = time.perf_counter()
    cells, table, settings = [], {}, {}
    for setting, options in RESIDUAL_SETTINGS[: 1 if quick else None]:
        plans = {band: make_plan(MODEL, config=PlanConfig(decision_band=band, **options)) for band in (False, True)}
        plan0 = plans[False]
        S = plan0.config.decision_scale
        settings[setting] = {"decision_scale": S, "topk_fraction": plan0.config.topk_fraction,
                             "group_size": plan0.config.group_size, "band_windows": list(plan0.config.band_windows),
                             "decision_band_window": plan0.config.band_windows[0]}
        rows = {s: sample_rows(plan0.scales[s].tokens, ROWS, 0, s) for s in range(S + 1, plan0.num_scales)}
        mine_all = []
        for preset, layers in CASES.items():
            layers = layers or default_synthetic_layers(plan0.depth, make_plan(MODEL).config.bound_layer)
            if quick:
                layers = layers[:2]
            src = SyntheticSource(MODEL, preset, heads=HEADS, seed=0, decision_scale=S)
            for layer in layers:
                mine_all += [{"setting": setting, "preset": preset, **c}
                             for c in _residual_layer(src, layer, plans, rows)]
            for regime in sorted({c["regime"] for c in mine_all if c["preset"] == preset}):
                for s in sorted(rows):
                    mine = [c for c in mine_all if c["preset"] == preset and c["regime"] == regime and c["scale"] == s]
                    entry = {k: round(float(np.mean([np.mean(c[k]) for c in mine])), 4) for k in RESIDUAL_KEYS}
                    entry["layers"] = sorted({c["layer"] for c in mine})
                    table.setdefault(setting, {}).setdefault(preset, {}).setdefault(regime, {})[str(s)] = entry
        cells += mine_all
    print("\nresidual study (token CS4A, identity mapping; mean over layers and heads; rel L2 vs dense)")
    print(f"  {'setting':<26} {'preset':<14} {'regime':<14} {'scale':>5} {'mass':>6} {'no res':>7} {'res':>7} "
          f"{'res+band':>8} {'cos res/err':>11} {'cos band':>8}")
    for setting, presets in table.items():
        for preset, regimes in presets.items():
            for regime, scales in regimes.items():
                for s, v in scales.items():
                    print(f"  {setting:<26} {preset:<14} {regime:<14} {s:>5} {v['mass']:6.3f} "
                          f"{v['rel_l2_no_residual']:7.3f} {v['rel_l2_residual_topk']:7.3f} "
                          f"{v['rel_l2_residual_band']:8.3f} {v['cos_residual_vs_error_topk']:11.3f} "
                          f"{v['cos_residual_vs_error_band']:8.3f}")
    out = {"kind": "sparvar-fidelity-residual-study",
           "note": "SYNTHETIC regimes: the CS4A residual (decision scale's dense minus sparse output, upsampled) "
                   "judged by the later scales' measured error; not image quality",
           "model": MODEL, "heads": HEADS, "rows_per_scale_max": ROWS, "settings": settings,
           "columns": {"rel_l2_no_residual": "residual off",
                       "rel_l2_residual_topk": "residual on, decision pattern = each group's top-k (SparVAR, default)",
                       "rel_l2_residual_band": "residual on, decision pattern = top-k + the first later scale's band "
                                               "(decision_band: true)",
                       "cos_residual_vs_error_*": "cosine between the upsampled residual and the sparse output's "
                                                  "true error (dense - sparse), per head over (rows, dims): > 0 "
                                                  "means the residual points the right way"},
           "environment": _environment(), "wall_s": round(time.perf_counter() - t0, 1), "table": table,
           "cells": cells}
    (RESULTS / "fidelity-residual.json").write_text(json.dumps(out, indent=1) + "\n")
    return table


CAL_TRIALS = 40


def _brief(res) -> dict:
    """The recommendation of one calibration and its verified figures."""
    cfg = res.config
    mass_ok = [c for c in res.candidates if c.stage == "search" and c.mass >= (res.floor.min_mass or 0)]
    errors = sorted(c.rel_error for c in mass_ok if c.rel_error is not None)
    cheapest = min(mass_ok, key=lambda c: c.cost) if mass_ok else None
    return {"fallback": res.fallback, "cost": round(res.cost, 4), "mass": round(res.mass, 4),
            "rel_error": None if res.rel_error is None else round(res.rel_error, 4),
            "cosine": None if res.cosine is None else round(res.cosine, 4),
            "config": {"decision_scale": cfg.decision_scale, "bound_layer": cfg.bound_layer, "block": res.block,
                       "topk_fraction": cfg.topk_fraction, "residual": cfg.residual, "windows": list(cfg.windows)},
            "seconds": round(res.seconds, 1), "notes": res.notes, "per_scale": res.per_scale,
            "residual_groups": res.residual_groups,
            "search_candidates_meeting_the_mass_floor": {
                "n": len(mass_ok), "rel_error_min": errors[0] if errors else None,
                "rel_error_median": float(np.median(errors)) if errors else None,
                "rel_error_max": errors[-1] if errors else None,
                "cheapest": None if cheapest is None else {"cost": round(cheapest.cost, 4),
                                                           "mass": round(cheapest.mass, 4),
                                                           "rel_error": cheapest.rel_error,
                                                           "params": cheapest.params}}}


def run_cap_evidence(quick: bool) -> dict:
    """Per preset: the default plan's verified figures, and calibration with the mass floor only (what the
    cheapest mass-passing plans' errors are) and with the default floor and error cap."""
    plan = make_plan(MODEL)
    S, n = plan.config.decision_scale, plan.num_scales
    out = {}
    for preset, layers in CASES.items():
        layers = tuple(layers or default_synthetic_layers(plan.depth, plan.config.bound_layer))
        if quick:
            layers = layers[:2]
        src = SyntheticSource(MODEL, preset, heads=HEADS, seed=0)
        t0 = time.perf_counter()
        ev = evaluate(src, plan, EvalOptions(block=128, query_sample=128, modes=("sparvar",), layers=layers,
                                             scales=tuple(range(S, n))), progress=None)
        default = verified_figures(ev, Floor(min_mass=0.9, max_rel_error=None))
        kw = dict(trials=8 if quick else CAL_TRIALS, query_sample=128, layers=layers, progress=None)
        mass_only = calibrate(src, plan, Floor(min_mass=0.9, max_rel_error=None), **kw)
        capped = calibrate(src, plan, Floor(), **kw)
        out[preset] = {"layers": list(layers), "wall_s": round(time.perf_counter() - t0, 1),
                       "default_plan": {"mass": round(default["mass"], 4), "rel_error": round(default["rel_error"], 4),
                                        "cosine": round(default["cosine"], 4), "per_scale": default["per_scale"]},
                       "mass_floor_only": _brief(mass_only), "default_floor": _brief(capped)}
        d, m, c = out[preset]["default_plan"], out[preset]["mass_floor_only"], out[preset]["default_floor"]

        def pick(r: dict) -> str:
            where = "dense" if r["fallback"] else f"cost {100 * r['cost']:.1f}%"
            return f"{where} mass {r['mass']:.3f} err {r['rel_error']:.3f}"

        print(f"  {preset:<14} default plan: mass {d['mass']:.3f} err {d['rel_error']:.3f} | mass floor only: "
              f"{pick(m)} | default floor: {pick(c)} ({out[preset]['wall_s']:.0f} s)", flush=True)
    return out


def run_calibration(quick: bool) -> None:
    """The cap's evidence on every preset, then a timed calibration with the default floor on an
    Infinity-2B-sized synthetic capture set (32 layers, 2 heads) read from files, its Pareto chart beside the
    JSON."""
    from sparvar_compiler.fidelity.modes import DEFAULT_MAX_ERROR

    print(f"\nerror cap evidence (default floor: mass >= 0.9, rel L2 <= {DEFAULT_MAX_ERROR:g}, worst (scale, layer))")
    evidence = run_cap_evidence(quick)
    plan = make_plan(MODEL)
    tmp = Path(tempfile.mkdtemp(prefix="sparvar-caps-"))
    try:
        src = SyntheticSource(MODEL, "mixed", heads=HEADS, seed=0)
        t0 = time.perf_counter()
        write_synthetic_captures(src, tmp / "caps", layers=src.layers[:4] if quick else None)
        write_s = time.perf_counter() - t0
        from sparvar_compiler.fidelity.captures import CaptureSet

        caps = CaptureSet.open(tmp / "caps", MODEL)
        floor = Floor()
        t0 = time.perf_counter()
        res = calibrate(caps, plan, floor, progress=lambda m: print(m, flush=True) if not m.startswith("  ") else None)
        wall = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in (tmp / "caps").iterdir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    png = res.write_pareto(RESULTS / "fidelity-calibrate-pareto.png")
    out = {"kind": "sparvar-calibration-bench", "note": "calibration on SYNTHETIC data (presets; the last run reads "
           "the mixed preset from .npz files): the recommendations fit those regimes, not a real model",
           "model": MODEL, "default_max_error": DEFAULT_MAX_ERROR, "cap_evidence": evidence,
           "capture_set": {"layers": len(caps.layers), "heads": HEADS, "batch": 1, "scales": 13,
                           "bytes": size, "write_s": round(write_s, 1)},
           "calibrate_wall_s": round(wall, 1), "pareto_png": png.name if isinstance(png, Path) else png,
           "environment": _environment(), "result": res.to_dict(), "yaml": res.yaml_text()}
    (RESULTS / "fidelity-calibrate.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"\ncalibration: {wall:.1f} s for {len(caps.layers)} layers x {HEADS} heads ({size / 1e9:.2f} GB of "
          f"captures); recommended S={res.config.decision_scale} bound={res.config.bound_layer} "
          f"block={res.block} topk={res.config.topk_fraction} residual={res.config.residual} "
          f"windows={list(res.config.windows)}: cost {100 * res.cost:.1f}% of dense, mass {res.mass:.4f}, "
          f"error {res.rel_error:.4f}, cosine {res.cosine:.4f} (floor {floor.describe()})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer layers and sweep points (smoke run)")
    ap.add_argument("--only", choices=("presets", "sweep", "residual", "calibrate"))
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    if args.only in (None, "presets"):
        run_presets(args.quick)
    if args.only in (None, "sweep"):
        run_sweep(args.quick)
    if args.only in (None, "residual"):
        run_residual_study(args.quick)
    if args.only in (None, "calibrate"):
        run_calibration(args.quick)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
