"""Search: which config of a kernel is fastest on a GPU, found once and kept with its evidence.

Optuna drives the search (TPE with a fixed seed, a budget in trials and seconds); ``mode="exhaustive"`` walks
the (valid) space in order instead. Several workers on several GPUs or hosts can tune one workload together
through one database URL: the tuning database records each measured config exactly once, and a config already
measured on this target (by any worker, any earlier run) is never run again.

Every run, in either mode and with any runner, keeps the workload's Optuna study on that target in the same
database (:mod:`sparvar_compiler.db.studies`): one trial per recorded config, COMPLETE with the median ms or FAIL
with the reason, and user attributes naming the model, scale, kernel and GPU, so ``optuna-dashboard URL`` shows
every tuning run. TPE draws its proposals from a private in-memory study that mirrors the records (everyone's),
so the shared study holds measurements only, never a pruned or repeated proposal.

Every candidate is checked against the float64 reference before its time counts (the runner does it); invalid
candidates are recorded with their reason and never win.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..codegen.spec import KernelConfig, KernelConfigError, KernelSpec
from ..db import SkippedRecordWarning, TuningDatabase, config_key, workload_key
from ..db.keys import target_key
from ..db.studies import RecordStudy, config_domains, open_record_study, study_owner
from ..planner.gpus import GpuSpec
from ..planner.layout import BlockLayout
from .measure import STORED_REASONS, Measurement
from .runners import Runner, backend_module
from .validate import usable_winner, validate_record

_log = logging.getLogger(__name__)


@dataclass
class TuneResult:
    """What one workload's tuning found."""

    spec: KernelSpec
    best_config: KernelConfig | None
    best_ms: float
    default_config: KernelConfig
    default_ms: float
    measured: int = 0
    reused: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    study: str | None = None

    @property
    def gain(self) -> float:
        """Default time over best time (>= 1 when the tuned winner is at least as fast)."""
        return self.default_ms / self.best_ms if math.isfinite(self.best_ms) and self.best_ms > 0 else float("nan")


def candidates(spec: KernelSpec, gpu: GpuSpec | None) -> list[KernelConfig]:
    """The backend's valid search space, with its default config first; with ``gpu``, only configs that pass
    :func:`~.validate.validate_record` there (the launch limits besides the backend's own check; if the default
    config does not launch, the first that does leads instead).

    Raises
    ------
    KernelConfigError
        No config launches on ``gpu`` (the default's reason, e.g. a batch whose grid exceeds CUDA's limits).
    """
    mod = backend_module(spec.backend)
    space = list(mod.search_space(spec, gpu))
    default = mod.default_config(spec, gpu)
    out = [default] + [c for c in space if c != default]
    if gpu is None:
        return out
    launchable = [c for c in out if _launchable(spec, c, gpu)]
    if not launchable:
        validate_record(spec, default, gpu)  # raises with the reason
    return launchable


def _launchable(spec: KernelSpec, config: KernelConfig, gpu: GpuSpec) -> bool:
    try:
        validate_record(spec, config, gpu)
    except KernelConfigError:
        return False
    return True


def _domains(configs: Sequence[KernelConfig]) -> dict[str, list]:
    """Per knob, the values the space uses; None where some configs leave the knob out (its default)."""
    return config_domains(c.to_dict() for c in configs)


def _config(params: dict) -> KernelConfig:
    return KernelConfig.from_dict({k: v for k, v in params.items() if v is not None})


# ---------------------------------------------------------------------------------------------------- studies

@dataclass(frozen=True)
class StudyContext:
    """Where a workload comes from, for its study's name and attributes: the model, the image (``resolution``
    in pixels, ``aspect`` as ``"h:w"``) and the query scale of the plan that yields it."""

    model: str
    resolution: int | str
    aspect: str
    scale: int | str

    @classmethod
    def of_plan(cls, plan, scale: int) -> "StudyContext":
        return cls(plan.model, plan.resolution, plan.aspect, scale)


#: The attributes of a study whose workload no known plan yields.
UNKNOWN = StudyContext("unknown", "unknown", "unknown", "unknown")

#: What every plan workload has (the emitter's CFG batch and dtype); a study name mentions other values.
_USUAL_BATCH, _USUAL_DTYPE = 2, "bf16"
_NAME_LENGTH = 128  # the tuning records' study column


def _hash_name(spec: KernelSpec, gpu: GpuSpec) -> str:
    return f"sparvar-{workload_key(spec.to_dict())[:16]}-{target_key(gpu.to_dict())[:8]}"


def study_name(spec: KernelSpec, gpu: GpuSpec, context: StudyContext | None = None) -> str:
    """The name of the study of ``spec`` on ``gpu``: ``<model>/<resolution>px-<aspect>/scale<i>/<kernel>/<gpu>``,
    e.g. ``infinity-8b/1024px-1:1/scale12/triton-block-64x64/h100``, or ``triton-cs4a-gather-192x64`` as the
    kernel part of a dynamic CS4A kernel. A batch other than 2, a dtype other than bf16, ``token_exact`` and
    ``return_lse`` add ``-b4``, ``-fp16``, ``-exact``, ``-lse`` to the kernel part.

    Without a context (or with :data:`UNKNOWN`) it is the hash name ``sparvar-<workload key[:16]>-<target
    key[:8]>`` that databases written before readable names hold. A readable name that another workload's study
    holds already gets a suffix in :func:`open_study`.
    """
    if context is None or context == UNKNOWN:
        return _hash_name(spec, gpu)
    kernel = f"{spec.backend}-{'cs4a-' if spec.dynamic else ''}{spec.kind}-{spec.block_m}x{spec.block_n}"
    kernel += "".join(part for part, on in ((f"-b{spec.batch}", spec.batch != _USUAL_BATCH),
                                            (f"-{spec.dtype}", spec.dtype != _USUAL_DTYPE),
                                            ("-exact", spec.token_exact), ("-lse", spec.return_lse)) if on)
    name = "/".join((str(context.model), f"{context.resolution}px-{context.aspect}", f"scale{context.scale}",
                     kernel, gpu.name))
    # Leave room for the 9-character suffix open_study may add.
    return name if len(name) <= _NAME_LENGTH - 9 else _hash_name(spec, gpu)


def study_user_attrs(spec: KernelSpec, gpu: GpuSpec, context: StudyContext | None = None) -> dict:
    """User attributes of a workload's study: the context (``"unknown"`` fields without one), every spec field,
    the GPU, and the workload and target keys of its tuning records."""
    ctx = context or UNKNOWN
    return {"model": ctx.model, "resolution": ctx.resolution, "aspect": ctx.aspect, "scale": ctx.scale,
            **spec.to_dict(), "dynamic": spec.dynamic, "gpu": gpu.name, "gpu_arch": gpu.arch,
            "gpu_sm_count": gpu.sm_count, "workload_key": workload_key(spec.to_dict()),
            "target_key": target_key(gpu.to_dict()), "objective": "median ms"}


def open_study(db: TuningDatabase, spec: KernelSpec, gpu: GpuSpec, context: StudyContext | None = None,
               storage: str | None = None, space: Sequence[KernelConfig] | None = None) -> RecordStudy:
    """Create or load the study of ``spec`` on ``gpu`` in ``storage`` (default: the database's own URL).

    Its name is :func:`study_name`; if a study of that name belongs to another workload or target (the same
    model and scale under a plan with other windows, say), ``/<workload key[:8]>`` is appended, and the hash name
    is used if that is taken too. A new study gets :func:`study_user_attrs` and the configs recorded before
    under other study names (:func:`~sparvar_compiler.db.studies.open_record_study`); its knob domains are those
    of the search space (``space``, default :func:`candidates`) and of the recorded configs.
    """
    url = storage or db.storage_url
    wkey, tkey = workload_key(spec.to_dict()), target_key(gpu.to_dict())
    ours = {"workload_key": wkey, "target_key": tkey}
    base = study_name(spec, gpu, context)
    name = _hash_name(spec, gpu)
    for candidate in dict.fromkeys((base, f"{base}/{wkey[:8]}", name)):
        owner = study_owner(url, candidate)
        if owner is None or all(owner.get(k, v) == v for k, v in ours.items()):
            name = candidate
            break
    configs = [c.to_dict() for c in (candidates(spec, gpu) if space is None else space)]
    domains = config_domains(configs + [t.config for t in db.trials(wkey, tkey)])
    return open_record_study(url, name, study_user_attrs(spec, gpu, context), domains,
                             earlier=lambda: [t for t in db.trials(wkey, tkey) if t.study != name])


def _tell(study, trial, value=None, state=None) -> None:
    """Tell the (in-memory) sampling study a result; a refusal only costs the sampler one observation."""
    import optuna

    try:
        study.tell(trial, value, state=state, skip_if_finished=True)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as e:
        _log.warning("optuna refused a result for trial %s: %s", trial.number, e)


# ---------------------------------------------------------------------------------------------------- tuner

class Tuner:
    """Tune workloads on one target with a runner, recording into a database.

    Parameters
    ----------
    db:
        Where trials and winners go, and the workloads' Optuna studies (same URL).
    gpu:
        The target (its name, arch and SM count key the records).
    runner:
        Where candidates are measured (:mod:`.runners`).
    environment:
        Recorded with every trial (:func:`sparvar_compiler.db.collect_environment`).
    worker:
        A name for this worker in the records.
    progress:
        Called with one line of text per event; defaults to stderr.
    """

    def __init__(self, db: TuningDatabase, gpu: GpuSpec, runner: Runner, environment: dict | None = None,
                 worker: str | None = None, progress: Callable[[str], None] | None = None):
        self.db, self.gpu, self.runner = db, gpu, runner
        self.environment = dict(environment or {})
        self.worker = worker
        self.progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))

    # -------------------------------------------------------------------------------------------- records
    def _recorded(self, wkey: str, tkey: str) -> dict[str, Measurement]:
        out = {}
        for t in self.db.trials(wkey, tkey):
            out[t.config_key] = Measurement(t.valid, list(t.timings_ms), t.reason, t.detail or "")
        return out

    def _measure(self, spec: KernelSpec, config: KernelConfig, layout: BlockLayout, wkey: str, tkey: str,
                 seen: dict[str, Measurement], result: TuneResult, study: RecordStudy | None,
                 name: str) -> Measurement:
        ckey = config_key(config.to_dict())
        if ckey in seen:
            result.reused += 1
            return seen[ckey]
        m = self.runner.measure(spec, config, layout)
        if m.valid:
            try:  # a time no GPU can reach means the kernel did not do its work
                validate_record(spec, config, self.gpu, m.median_ms, layout=None if spec.dynamic else layout)
            except KernelConfigError as e:
                m = Measurement(False, reason="wrong_result", detail=str(e)[:500])
        if m.valid or m.reason in STORED_REASONS:
            reason = None if m.valid else m.reason
            with self.db.batch() as w:
                trial_id, inserted = w.record(wkey, tkey, config.to_dict(), m.times_ms if m.valid else (),
                                              valid=m.valid, reason=reason, detail=m.detail or None,
                                              environment=self.environment, study=name, worker=self.worker)
            # Only the worker whose record went in adds the trial, so the study holds each config once.
            if inserted and study is not None:
                study.add(config.to_dict(), valid=m.valid, timings_ms=m.times_ms if m.valid else (), reason=reason,
                          detail=m.detail or None, worker=self.worker, record_id=trial_id)
        result.measured += 1
        if not m.valid:
            result.invalid[m.reason or "unknown"] = result.invalid.get(m.reason or "unknown", 0) + 1
        seen[ckey] = m
        return m

    def _open_study(self, spec: KernelSpec, context: StudyContext | None, storage: str | None,
                    space: list[KernelConfig], mode: str) -> tuple[RecordStudy | None, str]:
        try:
            study = open_study(self.db, spec, self.gpu, context, storage, space)
        except ImportError:
            if mode == "tpe":
                raise
            # Exhaustive tuning needs no sampler; without Optuna its records simply have no study view.
            self.progress("  note: optuna is not installed; this run's trials are recorded without a study")
            return None, study_name(spec, self.gpu, context)
        return study, study.name

    # -------------------------------------------------------------------------------------------- search
    def tune(self, spec: KernelSpec, layout: BlockLayout, trials: int = 24, budget_s: float | None = None,
             mode: str = "tpe", seed: int = 0, storage: str | None = None,
             context: StudyContext | None = None) -> TuneResult:
        """Tune one workload; returns the winner (from the database, so other workers' trials count).

        Parameters
        ----------
        spec, layout:
            The workload (``layout``: its static tables for a dynamic CS4A kernel).
        trials, budget_s:
            Budget: distinct configs recorded for this workload on this target (by any worker, any run), and
            wall seconds.
        mode:
            ``"tpe"`` (Optuna's TPE sampler, ``seed``) or ``"exhaustive"`` (the space in order).
        storage:
            The Optuna storage URL of the study; default: the database's own URL.
        context:
            The plan this workload comes from: names the study readably (:func:`study_name`) and sets its
            attributes. Without it the study keeps the hash name of earlier databases.
        """
        if mode not in ("tpe", "exhaustive"):
            raise ValueError(f"mode must be tpe or exhaustive, got {mode!r}")
        t0 = time.perf_counter()
        wkey = self.db.add_workload(spec.to_dict())
        tkey = self.db.add_target(self.gpu.to_dict())
        space = candidates(spec, self.gpu)
        default = space[0]
        study, name = self._open_study(spec, context, storage, space, mode)
        seen = self._recorded(wkey, tkey)
        result = TuneResult(spec, None, math.inf, default, math.inf, study=name)
        deadline = None if budget_s is None else t0 + budget_s

        def out_of_time() -> bool:
            return deadline is not None and time.perf_counter() > deadline

        # The default config is always measured: it is the baseline the tuned winner must match or beat.
        dm = self._measure(spec, default, layout, wkey, tkey, seen, result, study, name)
        result.default_ms = dm.median_ms
        goal = min(trials, len(space))
        first, later = space[1:goal], space[goal:]  # exhaustive: the budget goes to the space's first configs
        if self.worker and first:
            # Workers sharing a database must not walk those configs in the same order, nor (TPE) draw the
            # same proposals from the same seed. Each walks its own permutation: rotations of one order would
            # let a worker catch up with another and then measure in lockstep behind it.
            offset = zlib.crc32(self.worker.encode())
            seed = seed + offset % 100_003
            first = list(first)
            random.Random(offset).shuffle(first)
        rest = first + later
        if mode == "exhaustive":
            for config in rest:
                seen.update(self._recorded(wkey, tkey))  # other workers' records count too
                if len(seen) >= goal or out_of_time():
                    break
                if config_key(config.to_dict()) in seen:
                    continue
                m = self._measure(spec, config, layout, wkey, tkey, seen, result, study, name)
                self._report(spec, len(seen), goal, m, wkey, tkey, t0)
        else:
            self._tpe(spec, layout, space, trials, seed, study, name, wkey, tkey, seen, result, t0, out_of_time)
        # The best record the compiler can use (an imported one that fails validation is passed over).
        found = usable_winner(self.db, spec, self.gpu, layout=None if spec.dynamic else layout)
        if found is not None:
            result.best_config, result.best_ms = found[1], float(found[0].median_ms)
        result.seconds = time.perf_counter() - t0
        return result

    def _tpe(self, spec, layout, space, trials, seed, study, name, wkey, tkey, seen, result, t0, out_of_time):
        import optuna
        from optuna.distributions import CategoricalDistribution

        optuna.logging.set_verbosity(logging.WARNING)
        valid = {config_key(c.to_dict()): c for c in space}
        domains = _domains(space)
        distributions = {k: CategoricalDistribution(v) for k, v in domains.items()}
        sampler = optuna.create_study(direction="minimize",
                                      sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=6))
        known: set[str] = set()  # configs the sampler has an observation of
        goal = min(trials, len(space))
        stale = 0
        # The budget counts distinct configs recorded for this workload on this target, by any worker in any
        # run: a warm database does no new work, and workers sharing a database share the budget. Every record
        # (this worker's, the others', earlier runs') is shown to the sampler once. Invalid knob combinations
        # are pruned without running. When TPE keeps proposing pruned or already measured configs, the next
        # unmeasured config is enqueued, so the search always progresses and ends.
        while True:
            seen.update(self._recorded(wkey, tkey))
            for ckey, m in seen.items():
                if ckey not in known and ckey in valid:
                    known.add(ckey)
                    sampler.add_trial(optuna.trial.create_trial(
                        params={k: valid[ckey].to_dict().get(k) for k in domains}, distributions=distributions,
                        value=m.median_ms if m.valid else None,
                        state=optuna.trial.TrialState.COMPLETE if m.valid else optuna.trial.TrialState.FAIL))
            if len(seen) >= goal or out_of_time():
                break
            if stale >= 5:
                nxt = next(c for k, c in valid.items() if k not in seen)
                sampler.enqueue_trial({k: nxt.to_dict().get(k) for k in domains}, skip_if_exists=True)
                stale = 0
            trial = sampler.ask()
            params = {k: trial.suggest_categorical(k, v) for k, v in domains.items()}
            ckey = config_key(_config(params).to_dict())
            if ckey not in valid:
                _tell(sampler, trial, state=optuna.trial.TrialState.PRUNED)
                stale += 1
                continue
            if ckey in seen:  # proposed again: the sampler already holds its observation
                m = seen[ckey]
                _tell(sampler, trial, m.median_ms if m.valid else None,
                      state=None if m.valid else optuna.trial.TrialState.FAIL)
                result.reused += 1
                stale += 1
                continue
            stale = 0
            m = self._measure(spec, valid[ckey], layout, wkey, tkey, seen, result, study, name)
            known.add(ckey)
            _tell(sampler, trial, m.median_ms if m.valid else None,
                  state=None if m.valid else optuna.trial.TrialState.FAIL)
            self._report(spec, len(seen), goal, m, wkey, tkey, t0)

    def _report(self, spec, i, n, m, wkey, tkey, t0):
        with warnings.catch_warnings():  # tune() names a skipped record once, at the end
            warnings.simplefilter("ignore", SkippedRecordWarning)
            win = usable_winner(self.db, spec, self.gpu)
        best = f"{win[0].median_ms:.4f} ms" if win is not None else "-"
        elapsed = time.perf_counter() - t0
        eta = elapsed / max(i, 1) * max(n - i, 0)
        what = f"{m.median_ms:.4f} ms" if m.valid else f"invalid ({m.reason})"
        self.progress(f"  [{spec.backend}/{spec.kind} {spec.q_len}x{spec.kv_len} {spec.block_m}x{spec.block_n}] "
                      f"trial {i}/{n}: {what}; best {best}; eta {eta:.0f}s")
