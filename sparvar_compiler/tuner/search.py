"""Search: which config of a kernel is fastest on a GPU, found once and kept with its evidence.

Optuna drives the search (TPE with a fixed seed, a budget in trials and seconds); the study lives in the same
database URL as the tuning records, so several workers on several GPUs or hosts can tune one workload
together: Optuna hands out trials, and the tuning database records each measured config exactly once. A config
already measured on this target (by any worker, any earlier run) is never run again: its recorded result is
told to the study instead. ``mode="exhaustive"`` walks the whole (valid) space in order instead.

Every candidate is checked against the float64 reference before its time counts (the runner does it); invalid
candidates are recorded with their reason and never win.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..codegen.spec import KernelConfig, KernelSpec
from ..db import TuningDatabase, config_key, workload_key
from ..db.keys import target_key
from ..planner.gpus import GpuSpec
from ..planner.layout import BlockLayout
from .measure import STORED_REASONS, Measurement
from .runners import Runner, backend_module


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

    @property
    def gain(self) -> float:
        """Default time over best time (>= 1 when the tuned winner is at least as fast)."""
        return self.default_ms / self.best_ms if math.isfinite(self.best_ms) and self.best_ms > 0 else float("nan")


def candidates(spec: KernelSpec, gpu: GpuSpec | None) -> list[KernelConfig]:
    """The backend's valid search space, with its default config first."""
    mod = backend_module(spec.backend)
    space = list(mod.search_space(spec, gpu))
    default = mod.default_config(spec, gpu)
    return [default] + [c for c in space if c != default]


def _domains(configs: Sequence[KernelConfig]) -> dict[str, list]:
    """Per knob, the values the space uses; None where some configs leave the knob out (its default)."""
    dicts = [c.to_dict() for c in configs]
    doms: dict[str, set] = {}
    for d in dicts:
        for k, v in d.items():
            doms.setdefault(k, set()).add(v)
    for k, vals in doms.items():
        if any(k not in d for d in dicts):
            vals.add(None)
    return {k: sorted(v, key=lambda x: (str(type(x)), str(x))) for k, v in sorted(doms.items())}


def _config(params: dict) -> KernelConfig:
    return KernelConfig.from_dict({k: v for k, v in params.items() if v is not None})


def study_name(spec: KernelSpec, gpu: GpuSpec) -> str:
    return f"sparvar-{workload_key(spec.to_dict())[:16]}-{target_key(gpu.to_dict())[:8]}"


def _open_study(optuna, name: str, url: str, seed: int):
    """Create or load the shared study; workers starting together may race to create Optuna's tables."""
    for attempt in range(8):
        try:
            return optuna.create_study(study_name=name, storage=url, direction="minimize", load_if_exists=True,
                                       sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=6))
        except Exception:  # noqa: BLE001 - table/study creation races surface as assorted SQLAlchemy errors
            if attempt == 7:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _tell(study, trial, value=None, state=None) -> None:
    """Tell the study a result; a trial another worker's storage call already finished is left as it is (the
    tuning database, not the study, is the record of what was measured)."""
    import optuna

    try:
        study.tell(trial, value, state=state, skip_if_finished=True)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as e:
        logging.getLogger(__name__).warning("optuna refused a result for trial %s: %s", trial.number, e)


class Tuner:
    """Tune workloads on one target with a runner, recording into a database.

    Parameters
    ----------
    db:
        Where trials and winners go (and, for TPE, the Optuna study: same URL).
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
                 seen: dict[str, Measurement], result: TuneResult, study: str) -> Measurement:
        ckey = config_key(config.to_dict())
        if ckey in seen:
            result.reused += 1
            return seen[ckey]
        m = self.runner.measure(spec, config, layout)
        if m.valid or m.reason in STORED_REASONS:
            self.db.record_trial(wkey, tkey, config.to_dict(), m.times_ms if m.valid else (), valid=m.valid,
                                 reason=None if m.valid else m.reason, detail=m.detail or None,
                                 environment=self.environment, study=study, worker=self.worker)
        result.measured += 1
        if not m.valid:
            result.invalid[m.reason or "unknown"] = result.invalid.get(m.reason or "unknown", 0) + 1
        seen[ckey] = m
        return m

    # -------------------------------------------------------------------------------------------- search
    def tune(self, spec: KernelSpec, layout: BlockLayout, trials: int = 24, budget_s: float | None = None,
             mode: str = "tpe", seed: int = 0, storage: str | None = None) -> TuneResult:
        """Tune one workload; returns the winner (from the database, so other workers' trials count)."""
        if mode not in ("tpe", "exhaustive"):
            raise ValueError(f"mode must be tpe or exhaustive, got {mode!r}")
        t0 = time.perf_counter()
        wkey = self.db.add_workload(spec.to_dict())
        tkey = self.db.add_target(self.gpu.to_dict())
        space = candidates(spec, self.gpu)
        default = space[0]
        seen = self._recorded(wkey, tkey)
        result = TuneResult(spec, None, math.inf, default, math.inf)
        name = study_name(spec, self.gpu)
        deadline = None if budget_s is None else t0 + budget_s

        def out_of_time() -> bool:
            return deadline is not None and time.perf_counter() > deadline

        # The default config is always measured: it is the baseline the tuned winner must match or beat.
        dm = self._measure(spec, default, layout, wkey, tkey, seen, result, name)
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
                m = self._measure(spec, config, layout, wkey, tkey, seen, result, name)
                self._report(spec, len(seen), goal, m, wkey, tkey, t0)
        else:
            self._tpe(spec, layout, space, trials, seed, storage, name, wkey, tkey, seen, result, t0,
                      out_of_time)
        win = self.db.winner(wkey, tkey)
        if win is not None:
            result.best_config = KernelConfig.from_dict(win.config)
            result.best_ms = float(win.median_ms)
        result.seconds = time.perf_counter() - t0
        return result

    def _tpe(self, spec, layout, space, trials, seed, storage, name, wkey, tkey, seen, result, t0, out_of_time):
        import optuna

        optuna.logging.set_verbosity(logging.WARNING)
        valid = {config_key(c.to_dict()): c for c in space}
        domains = _domains(space)
        url = storage or self.db.storage_url
        study = _open_study(optuna, name, url, seed)
        goal = min(trials, len(space))
        stale = 0
        # The budget counts distinct configs recorded for this workload on this target, by any worker in any
        # run: a warm database does no new work, and workers sharing a study share the budget. Invalid knob
        # combinations are pruned without running. When TPE keeps proposing pruned or already measured configs,
        # the next unmeasured config is enqueued, so the search always progresses and ends.
        while True:
            seen.update(self._recorded(wkey, tkey))
            if len(seen) >= goal or out_of_time():
                break
            if stale >= 5:
                nxt = next(c for k, c in valid.items() if k not in seen)
                study.enqueue_trial({k: nxt.to_dict().get(k) for k in domains}, skip_if_exists=True)
                stale = 0
            trial = study.ask()
            try:
                params = {k: trial.suggest_categorical(k, v) for k, v in domains.items()}
            except optuna.exceptions.UpdateFinishedTrialError:
                # On SQLite two workers can pop the same enqueued trial; the other one owns it now.
                stale += 1
                continue
            ckey = config_key(_config(params).to_dict())
            if ckey not in valid:
                _tell(study, trial, state=optuna.trial.TrialState.PRUNED)
                stale += 1
                continue
            stale = stale + 1 if ckey in seen else 0
            m = self._measure(spec, valid[ckey], layout, wkey, tkey, seen, result, name)
            if m.valid:
                _tell(study, trial, m.median_ms)
            else:
                _tell(study, trial, state=optuna.trial.TrialState.FAIL)
            self._report(spec, len(seen), goal, m, wkey, tkey, t0)

    def _report(self, spec, i, n, m, wkey, tkey, t0):
        win = self.db.winner(wkey, tkey)
        best = f"{win.median_ms:.4f} ms" if win is not None else "-"
        elapsed = time.perf_counter() - t0
        eta = elapsed / max(i, 1) * max(n - i, 0)
        what = f"{m.median_ms:.4f} ms" if m.valid else f"invalid ({m.reason})"
        self.progress(f"  [{spec.backend}/{spec.kind} {spec.q_len}x{spec.kv_len} {spec.block_m}x{spec.block_n}] "
                      f"trial {i}/{n}: {what}; best {best}; eta {eta:.0f}s")
