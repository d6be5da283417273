"""Fidelity of every plan mode on the synthetic presets, a cross-scale-similarity sweep, and a timed calibration.

Cases are data (below). Every figure is from a SYNTHETIC regime built from explicit knobs (see
sparvar_compiler/fidelity/synthetic.py): it shows how each plan mode treats that regime, never image quality.
Shapes: Infinity-2B at 1024^2 1:1 (13 scales, queries up to 4096 x 10521 keys), 2 heads per layer, batch 1,
the default plan (decision scale 10, bound layer 9); query rows subsampled to 256 per scale (seeded), layers as
listed per case.

Writes bench/results/fidelity-<preset>.json (report + the knobs of every evaluated head),
fidelity-sweep.json and fidelity-calibrate.json. Run: .venv/bin/python bench/fidelity_presets.py [--quick]
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

from sparvar_compiler.fidelity.calibrate import Floor, calibrate
from sparvar_compiler.fidelity.cli import default_synthetic_layers
from sparvar_compiler.fidelity.evaluate import ALL_MODES, EvalOptions, evaluate
from sparvar_compiler.fidelity.report import report_dict, summarise
from sparvar_compiler.fidelity.synthetic import (CONTENT, LOCAL, Preset, SyntheticSource,
                                                 write_synthetic_captures)
from sparvar_compiler.planner import make_plan

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
                                     for k in ("density", "mass", "rel_l2", "cosine") if k in rows[0]}
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


def run_calibration(quick: bool) -> None:
    """Calibrate on an Infinity-2B-sized synthetic capture set (32 layers, 2 heads) read from files."""
    plan = make_plan(MODEL)
    tmp = Path(tempfile.mkdtemp(prefix="sparvar-caps-"))
    try:
        src = SyntheticSource(MODEL, "mixed", heads=HEADS, seed=0)
        t0 = time.perf_counter()
        write_synthetic_captures(src, tmp / "caps", layers=src.layers[:4] if quick else None)
        write_s = time.perf_counter() - t0
        from sparvar_compiler.fidelity.captures import CaptureSet

        caps = CaptureSet.open(tmp / "caps", MODEL)
        floor = Floor(min_mass=0.9)
        t0 = time.perf_counter()
        res = calibrate(caps, plan, floor, progress=lambda m: print(m, flush=True) if not m.startswith("  ") else None)
        wall = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in (tmp / "caps").iterdir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"kind": "sparvar-calibration-bench", "note": "calibration on SYNTHETIC captures (preset mixed, read "
           "from .npz files): the recommendation fits that regime, not a real model", "model": MODEL,
           "capture_set": {"layers": len(caps.layers), "heads": HEADS, "batch": 1, "scales": 13,
                           "bytes": size, "write_s": round(write_s, 1)},
           "calibrate_wall_s": round(wall, 1), "environment": _environment(), "result": res.to_dict(),
           "yaml": res.yaml_text()}
    (RESULTS / "fidelity-calibrate.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"\ncalibration: {wall:.1f} s for {len(caps.layers)} layers x {HEADS} heads ({size / 1e9:.2f} GB of "
          f"captures); recommended S={res.config.decision_scale} bound={res.config.bound_layer} "
          f"block={res.block} topk={res.config.topk_fraction} windows={list(res.config.windows)}: "
          f"cost {100 * res.cost:.1f}% of dense, mass {res.mass:.4f} (floor {floor.describe()})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer layers and sweep points (smoke run)")
    ap.add_argument("--only", choices=("presets", "sweep", "calibrate"))
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    if args.only in (None, "presets"):
        run_presets(args.quick)
    if args.only in (None, "sweep"):
        run_sweep(args.quick)
    if args.only in (None, "calibrate"):
        run_calibration(args.quick)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
