"""Build here, measure there: tuning for GPU hosts that have no compilers.

1. ``build_bundle`` (any host with Triton/TVM, no GPU needed) compiles every candidate config of the plan's
   workloads for the target GPU into a directory: ``bundle.json`` (target, workloads, candidates), one
   ``CompiledKernel`` JSON per candidate, and per workload an npz with its launch tables and the boolean mask of
   what its kernels compute (the reference). Candidates that fail to compile are listed with their reason.
2. ``measure_bundle`` (the GPU host: torch + the CUDA driver only) loads each cubin through the driver API,
   checks it against the float64 reference and times it; it writes a results file in the replay format.
3. Ingest: the results file drives :class:`~.runners.ReplayRunner` through the normal tuner
   (``sparvar-compile tune --runner replay --replay RESULTS``), which records every trial in the database.

Given the database the results will be ingested into (``db``), ``build_bundle`` also creates the Optuna study of
every bundled workload there, named and described after the plan (:func:`~.search.open_study`), so that
``optuna-dashboard`` lists the studies while the GPU host measures and the replay then fills them.

    python -m sparvar_compiler.tuner.bundle measure BUNDLE_DIR --out results.json     # on the GPU host
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..codegen.artifact import CompiledKernel
from ..codegen.spec import KernelConfig, KernelConfigError, KernelSpec
from ..planner.gpus import GpuSpec
from .measure import Measurement

FORMAT = "sparvar-bundle"


def build_bundle(tasks: list[tuple], gpu: GpuSpec, out: str | Path, max_candidates: int | None = None,
                 progress: Callable[[str], None] = print, db=None, storage: str | None = None) -> Path:
    """Compile the candidates of every task for ``gpu`` into ``out``; returns the bundle.json path.

    Parameters
    ----------
    tasks:
        ``(spec, layout)`` or ``(spec, layout, context)`` with a :class:`~.search.StudyContext`
        (:func:`~.plan.plan_tasks` gives them for a plan).
    max_candidates:
        The first candidates of each workload's space (default config first); all of them by default.
    db, storage:
        The database (a :class:`~sparvar_compiler.db.TuningDatabase`, URL or path) the results will be ingested
        into, and the Optuna storage URL of its studies (default: the database's URL): each bundled workload's
        study is created there. None: no studies (the replay creates them).
    """
    # Build-side imports; the measure side (a GPU host) needs neither the database nor a compiler.
    from ..db import TuningDatabase
    from ..db.keys import config_key, workload_key
    from ..emit.emitter import host_tables
    from .runners import backend_module
    from .search import candidates, open_study

    out = Path(out)
    (out / "kernels").mkdir(parents=True, exist_ok=True)
    (out / "workloads").mkdir(exist_ok=True)
    doc = {"format": FORMAT, "format_version": 1, "target": gpu.to_dict(), "workloads": []}
    opened = TuningDatabase.open(db) if db is not None and not isinstance(db, TuningDatabase) else db
    try:
        for task in tasks:
            spec, layout = task[0], task[1]
            context = task[2] if len(task) > 2 else None
            if spec.dynamic:
                # Dynamic CS4A tables are filled on the measuring host; the bundle carries static tables only.
                progress(f"skipping the dynamic CS4A kernel of {spec.q_len}x{spec.kv_len}: tune it with the local "
                         "runner")
                continue
            mod = backend_module(spec.backend)
            wkey = workload_key(spec.to_dict())
            mask = mod.kernel_mask(spec, layout) if hasattr(mod, "kernel_mask") else layout.to_token_mask(
                exact=spec.token_exact)
            arrays = {f"table_{k}": v for k, v in host_tables(spec, layout).items()}
            np.savez_compressed(out / "workloads" / f"{wkey[:16]}.npz", mask=np.packbits(mask, axis=1),
                                mask_shape=np.array(mask.shape), **arrays)
            entry = {"spec": spec.to_dict(), "data": f"workloads/{wkey[:16]}.npz", "candidates": []}
            space = candidates(spec, gpu)
            if opened is not None:
                opened.add_workload(spec.to_dict())
                opened.add_target(gpu.to_dict())
                entry["study"] = open_study(opened, spec, gpu, context, storage, space).name
            configs = space[: max_candidates or None]
            for i, config in enumerate(configs, start=1):
                ckey = config_key(config.to_dict())
                t0 = time.perf_counter()
                try:
                    compiled = mod.compile_for_target(spec, config, layout, gpu)
                except KernelConfigError as e:
                    entry["candidates"].append({"config": config.to_dict(), "reason": "out_of_resources",
                                                "detail": str(e)[:300]})
                    continue
                except Exception as e:  # noqa: BLE001 - a compile failure is recorded, the bundle goes on
                    entry["candidates"].append({"config": config.to_dict(), "reason": "compile_error",
                                                "detail": f"{type(e).__name__}: {e}"[:300]})
                    continue
                name = f"kernels/{wkey[:16]}_{ckey[:16]}.json"
                (out / name).write_text(json.dumps(compiled.to_json_dict()))
                entry["candidates"].append({"config": config.to_dict(), "kernel": name})
                progress(f"  [{spec.backend}/{spec.kind} {spec.q_len}x{spec.kv_len} {spec.block_m}x"
                         f"{spec.block_n}] candidate {i}/{len(configs)} compiled in {time.perf_counter() - t0:.1f} s")
            doc["workloads"].append(entry)
    finally:
        if opened is not None and opened is not db:
            opened.close()
    path = out / "bundle.json"
    path.write_text(json.dumps(doc, indent=1, sort_keys=True))
    return path


def measure_bundle(bundle: str | Path, out: str | Path, progress: Callable[[str], None] = print) -> dict:
    """Check and time every compiled candidate of a bundle on the local GPU; write replay records to ``out``."""
    import torch

    from ..runtime.cubin import LoadedKernel
    from .measure import check_and_time, prepare

    from ..db.bounded_json import read_json

    root = Path(bundle)
    doc = read_json(root / "bundle.json", what="a bundle")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{root}: not a sparvar bundle")
    records = []
    for w in doc["workloads"]:
        spec = KernelSpec(**w["spec"])
        with np.load(root / w["data"], allow_pickle=False) as z:
            shape = tuple(int(x) for x in z["mask_shape"])
            mask = np.unpackbits(z["mask"], axis=1)[:, : shape[1]].astype(bool)
            tables = {f[len("table_"):]: torch.from_numpy(z[f].copy()).cuda() for f in z.files
                      if f.startswith("table_")}
        prepared = prepare(spec, None, mask=torch.from_numpy(mask).cuda())
        for c in w["candidates"]:
            config = KernelConfig.from_dict(c["config"])
            if "kernel" not in c:
                m = Measurement(False, reason=c["reason"], detail=c.get("detail", ""))
            else:
                try:
                    compiled = CompiledKernel.from_json_dict(json.loads((root / c["kernel"]).read_text()))
                    loaded = LoadedKernel.load(compiled)

                    def kernel(q, k, v, scale, out, loaded=loaded):
                        loaded.launch({"q": q, "k": k, "v": v, "out": out, "scale": scale, **tables})

                    m = check_and_time(spec, None, kernel, prepared=prepared)
                except KernelConfigError as e:
                    m = Measurement(False, reason="out_of_resources", detail=str(e)[:300])
                except Exception as e:  # noqa: BLE001 - a load failure is a recorded outcome
                    m = Measurement(False, reason="launch_error", detail=f"{type(e).__name__}: {e}"[:300])
            records.append({"spec": spec.to_dict(), "config": config.to_dict(), "measurement": m.to_dict()})
            what = f"{m.median_ms:.4f} ms" if m.valid else f"invalid ({m.reason})"
            progress(f"  {spec.kind} {spec.q_len}x{spec.kv_len} {spec.block_m}x{spec.block_n} {config.to_dict()}: {what}")
    result = {"format": "sparvar-replay", "target": doc["target"], "records": records}
    Path(out).write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparvar_compiler.tuner.bundle")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="check and time a bundle's kernels on this GPU")
    m.add_argument("bundle", type=Path)
    m.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    measure_bundle(args.bundle, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
