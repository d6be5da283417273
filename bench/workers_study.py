"""Tuning wall time with one worker vs K workers sharing one database (issue 4's fleet study), on one host.

    PYTHONPATH=. python3 bench/workers_study.py [--model infinity-8b] [--trials 8] [--workers 2] [--db-url URL]

Runs ``sparvar-compile tune`` from an empty database once with one worker (GPU 0) and once with ``--workers K``
(worker i on GPU i), both with the same budget, then compares wall times and the winners' measured times per
workload. ``--db-url`` (a PostgreSQL URL) replaces the default: fresh SQLite files beside the output. Writes
``bench/results/tune-workers-<card>x<K>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(cmd: list[str], env: dict) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, proc.returncode, proc.stdout[-4000:] + proc.stderr[-2000:]


def winners(url: str, gpu: dict) -> dict[str, float]:
    from sparvar_compiler.db import TuningDatabase

    db = TuningDatabase.open(url)
    out = {}
    for wkey, tkey in db.winner_keys():
        w = db.winner(wkey, tkey)
        out[wkey] = float(w.median_ms)
    db.close()
    return out


def main() -> None:
    import torch

    from sparvar_compiler.planner.gpus import gpu_from_device_name

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="infinity-8b")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    gpu = gpu_from_device_name(props.name, props.multi_processor_count)
    gpus = torch.cuda.device_count()
    out = args.out or ROOT / "bench" / "results" / f"tune-workers-{gpu.name}x{gpus}.json"
    tmp = out.parent / f".workers-study-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    base = [sys.executable, "-m", "sparvar_compiler", "tune", "--model", args.model, "--gpu", gpu.name,
            "--trials", str(args.trials)]
    one_url, many_url = str(tmp / "one.sqlite"), str(tmp / "many.sqlite")
    # Each run compiles from a fresh Triton cache: otherwise the second run reuses the first one's kernels.
    t_one, rc1, log1 = run(base + ["--db", one_url], dict(env, CUDA_VISIBLE_DEVICES="0",
                                                         TRITON_CACHE_DIR=str(tmp / "triton-one")))
    print(f"1 worker: {t_one:.1f} s (exit {rc1})\n{log1[-1500:]}", flush=True)
    t_many, rc2, log2 = run(base + ["--db", many_url, "--workers", str(args.workers)],
                            dict(env, TRITON_CACHE_DIR=str(tmp / "triton-many")))
    print(f"{args.workers} workers: {t_many:.1f} s (exit {rc2})\n{log2[-1500:]}", flush=True)
    w1, w2 = winners(one_url, gpu.to_dict()), winners(many_url, gpu.to_dict())
    ratios = {k: w2[k] / w1[k] for k in w1 if k in w2}
    res = {"benchmark": "tune-workers", "card": props.name, "gpus": gpus, "model": args.model,
           "trials_per_workload": args.trials, "workers": args.workers, "database": "SQLite (WAL), one host",
           "triton_cache": "fresh per run", "one_worker_s": t_one, "many_workers_s": t_many, "wall_ratio": t_many / t_one,
           "winner_ms_ratio_many_over_one": ratios, "exit_codes": [rc1, rc2]}
    print(json.dumps({k: v for k, v in res.items() if k != "winner_ms_ratio_many_over_one"}, indent=1))
    print("winner ms ratio (K workers / 1 worker) per workload:", {k[:8]: round(v, 3) for k, v in ratios.items()})
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
