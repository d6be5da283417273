"""Tune a whole plan, and name workloads after the plans they come from.

* :func:`tune_plan` tunes every kernel workload of a plan (what ``sparvar-compile tune`` and ``compile --tune``
  run), each in its readably named study (:class:`~.search.StudyContext` of the plan and scale).
* :func:`workload_contexts` finds, for stored workloads, the registered model, image and scale whose default plan
  yields them (how the shipped studies get their names), and :func:`record_studies` gives every (workload,
  target) of a database its study from the records.
"""

from __future__ import annotations

import itertools
import sys
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..codegen.spec import KernelSpec
from ..planner.gpus import GpuSpec
from .search import StudyContext, TuneResult, Tuner, open_study

DEFAULT_BATCH = 2  # the emitter's CFG batch: one image is a batch of 2


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def worker_start(worker: str | None, slot: tuple[int, int] | None, n: int) -> int:
    """Index of the workload this worker tunes first.

    Workers sharing a database start on different workloads (worker I of K at I*n/K, a named worker without a
    slot at a hash of its name), so that each mostly tunes workloads of its own and the others' trials are
    reused, instead of all of them measuring one workload's default config and last trials side by side; they
    meet, and share trials, only where their walks overlap.
    """
    if n == 0 or (worker is None and slot is None):
        return 0
    if slot is not None:
        return slot[0] * n // slot[1]
    return zlib.crc32(worker.encode()) % n


def tune_plan(plan, gpu: GpuSpec, db, backends: tuple[str, ...], block_sizes: tuple[int, ...], trials: int,
              budget_s: float | None, worker: str | None = None, runner=None, mode: str = "tpe",
              only_missing: bool = False, slot: tuple[int, int] | None = None, batch: int = DEFAULT_BATCH,
              progress: Callable[[str], None] | None = None) -> list[tuple[int, TuneResult]]:
    """Tune every kernel workload of ``plan`` on ``gpu``; returns ``(scale, result)`` in the plan's order.

    Parameters
    ----------
    db:
        A :class:`~sparvar_compiler.db.TuningDatabase`, or a :class:`~sparvar_compiler.db.LayeredDatabase`
        (records go to its writable layer; ``only_missing`` looks through all of its layers).
    backends, block_sizes, batch:
        Which workloads (:func:`sparvar_compiler.emit.emitter.plan_workloads`).
    trials, budget_s, mode:
        Per workload (:meth:`~.search.Tuner.tune`); the replay runner tunes ``"exhaustive"``.
    worker, slot:
        This worker's name and ``(I, K)`` slot: it walks the workloads from :func:`worker_start`, wrapping
        around.
    runner:
        Where configs are measured; default :class:`~.runners.LocalRunner` (this GPU).
    only_missing:
        Leave out the workloads the database already has a usable winner for, so that compiling on a GPU host
        with the shipped winners does no GPU work.
    progress:
        Called with one line per workload and trial; default: stderr.
    """
    from ..db import SoftMismatchWarning, TuningDatabaseError, collect_environment
    from ..emit.emitter import plan_workloads
    from .runners import LocalRunner
    from .validate import usable_winner

    progress = progress or _stderr
    local = runner is None
    environment = collect_environment(probe_gpu=local)
    tuner = Tuner(db if not hasattr(db, "user") else db.user, gpu, runner or LocalRunner(),
                  environment=environment, worker=worker, progress=progress)
    results = []
    workloads = list(plan_workloads(plan, backends, block_sizes, batch))
    start = worker_start(worker, slot, len(workloads))
    for i in itertools.chain(range(start, len(workloads)), range(start)):
        scale, spec, layout = workloads[i]
        if only_missing:
            try:
                with warnings.catch_warnings():  # usable is all this asks; compile notes soft mismatches once
                    warnings.simplefilter("ignore", SoftMismatchWarning)
                    have = usable_winner(db, spec, gpu, environment,
                                         layout=None if spec.dynamic else layout)
            except TuningDatabaseError:  # a record from another compiler or card: not usable here, so tune
                have = None
            if have is not None:
                continue
        progress(f"tuning scale {scale} {spec.backend} {spec.block_m}x{spec.block_n} ({spec.q_len} x {spec.kv_len})")
        results.append((i, scale, tuner.tune(spec, layout, trials=trials, budget_s=budget_s, mode=mode,
                                             context=StudyContext.of_plan(plan, scale))))
    return [(scale, r) for _, scale, r in sorted(results, key=lambda x: x[0])]


def plan_tasks(plan, backends: tuple[str, ...], block_sizes: tuple[int, ...], batch: int = DEFAULT_BATCH):
    """``(spec, layout, context)`` of every kernel workload of ``plan``: what
    :func:`~.bundle.build_bundle` takes."""
    from ..emit.emitter import plan_workloads

    return [(spec, layout, StudyContext.of_plan(plan, scale))
            for scale, spec, layout in plan_workloads(plan, backends, block_sizes, batch)]


# ---------------------------------------------------------------------------------------------------- naming

def _schedule_order(model) -> list:
    # The default image first: a workload that several schedules yield is named after the usual one.
    return sorted(model.schedules, key=lambda s: (s.resolution != model.default_resolution, s.aspect != "1:1",
                                                  -s.resolution, s.aspect))


def workload_contexts(specs: Mapping[str, Mapping[str, Any]],
                      models: Iterable[str] | None = None) -> dict[str, StudyContext]:
    """Which plan yields each workload: ``{workload key: StudyContext}`` for the ``{workload key: spec}`` that
    the default plan (:class:`~sparvar_compiler.planner.PlanConfig` defaults, ``token_exact`` as in the spec)
    of a registered model (or of ``models``) at one of its images yields, at the spec's backend, block size and
    batch. Workloads no such plan yields are left out.

    Only images whose scale lengths hold the spec's ``(q_len, kv_len)`` and models with its heads and head dim
    are planned, so this stays cheap however many images a model has.
    """
    from ..db import workload_key
    from ..emit.emitter import plan_workloads
    from ..planner import PlanConfig, get_model, list_models, make_plan

    wanted = {k: dict(v) for k, v in specs.items()}
    found: dict[str, StudyContext] = {}
    for name in models or list_models():
        model = get_model(name)
        for sched in _schedule_order(model):
            lengths = set(zip(sched.tokens, itertools.accumulate(sched.tokens)))
            # One plan per (token_exact, batch), asked for just the backends and block sizes the specs have.
            groups: dict[tuple[bool, int], dict[str, Any]] = {}
            for key, spec in wanted.items():
                if key in found or (spec["heads"], spec["head_dim"]) != (model.heads, model.head_dim):
                    continue
                if (spec["q_len"], spec["kv_len"]) not in lengths:
                    continue
                group = groups.setdefault((bool(spec.get("token_exact", False)), spec["batch"]),
                                          {"backends": set(), "blocks": set(), "cs4a": False})
                group["backends"].add(spec["backend"])
                if spec.get("dynamic"):
                    group["cs4a"] = True
                else:
                    group["blocks"].add(spec["block_m"])
            for (exact, batch), group in groups.items():
                try:
                    plan = make_plan(model, sched.resolution, sched.aspect, PlanConfig(token_exact=exact))
                    workloads = list(plan_workloads(plan, tuple(sorted(group["backends"])),
                                                    tuple(sorted(group["blocks"])), batch, cs4a=group["cs4a"]))
                except Exception:  # noqa: BLE001 - a schedule the default plan cannot serve names nothing
                    continue
                for scale, spec, _ in workloads:
                    key = workload_key(spec.to_dict())
                    if key in wanted and key not in found:
                        found[key] = StudyContext.of_plan(plan, scale)
    return found


def _target_gpu(target: Mapping[str, Any]) -> tuple[GpuSpec, bool]:
    """The registered GPU of a stored target (True), else a bare spec with its identity only (False)."""
    from ..planner.gpus import GPUS

    g = GPUS.get(target["name"])
    if g is not None and (g.arch, g.sm_count) == (target["arch"], target["sm_count"]):
        return g, True
    return GpuSpec(target["name"], target["arch"], target["sm_count"], 0, 0, 0, ()), False


def record_studies(db, storage: str | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, int]:
    """Give every (workload, target) with trials in ``db`` its Optuna study (:func:`~.search.open_study`),
    named after the plan that yields the workload (:func:`workload_contexts`; the hash name and ``"unknown"``
    attributes where none does). A study that exists already is left as it is.

    Returns
    -------
    dict
        ``{study name: trials in it}``.
    """
    workloads = db.workloads()
    targets = db.targets()
    pairs = sorted({(t.workload_key, t.target_key) for t in db.trials()})
    contexts = workload_contexts({wk: workloads[wk] for wk, _ in pairs})
    out = {}
    for wk, tk in pairs:
        spec = KernelSpec(**workloads[wk])
        gpu, registered = _target_gpu(targets[tk])
        study = open_study(db, spec, gpu, contexts.get(wk), storage, space=None if registered else [])
        out[study.name] = len(study.study.get_trials(deepcopy=False))
        if progress:
            progress(f"study {study.name}: {out[study.name]} trials" + ("" if study.created else " (existing)"))
    return out
