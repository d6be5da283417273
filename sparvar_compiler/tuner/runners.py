"""Runners: where a candidate config is measured.

* :class:`LocalRunner` builds the kernel in this process and checks and times it on the local GPU.
* :class:`ReplayRunner` serves recorded measurements (from a JSON file of earlier runs), so the whole tuner,
  database and emitter run in CPU CI; a candidate it has no record of is invalid (``not_recorded``, never
  stored). The tuner records what it serves, and keeps the workload's Optuna study, as for any runner.
* Build here / measure there lives in :mod:`sparvar_compiler.tuner.bundle`.

Every runner answers ``measure(spec, config, layout) -> Measurement``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from ..codegen.spec import KernelConfig, KernelConfigError, KernelSpec
from ..errors import SparvarError
from ..planner.layout import BlockLayout
from .measure import Measurement


class Runner(Protocol):
    name: str

    def measure(self, spec: KernelSpec, config: KernelConfig, layout: BlockLayout) -> Measurement: ...


def backend_module(name: str):
    """The codegen module of a backend (imported lazily: TVM is heavy and absent on GPU hosts)."""
    if name == "triton":
        from ..codegen import triton_backend as mod
    elif name == "tvm":
        from .._optional import require

        require("tvm", "tvm", "the TVM backend (--backend tvm)")  # else every candidate fails to compile
        from ..codegen import tvm_backend as mod
    else:
        raise ValueError(f"unknown backend {name!r}")
    return mod


class LocalRunner:
    """Build in-process, check against float64 and time on the local CUDA GPU."""

    name = "local"

    def __init__(self, reps: int = 50, warmup: int = 5, seed: int = 0):
        self.reps, self.warmup, self.seed = reps, warmup, seed
        self._prepared: tuple[str, object] | None = None  # (workload, inputs + golden): one workload at a time

    def measure(self, spec: KernelSpec, config: KernelConfig, layout: BlockLayout) -> Measurement:
        """Measure one config; for a dynamic (CS4A) spec ``layout`` is its static tables object."""
        from .measure import check_and_time

        key = spec.key()
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = None  # free the previous workload's tensors first
            self._prepared = (key, self._prepare(spec, layout))
        prepared, tables = self._prepared[1]
        mod = backend_module(spec.backend)
        try:
            kernel = mod.build(spec, config) if spec.dynamic else mod.build(spec, config, layout)
        except KernelConfigError as e:
            return Measurement(False, reason="out_of_resources", detail=str(e)[:500])
        except Exception as e:  # noqa: BLE001 - a compile failure is a recorded outcome, not a crash
            return Measurement(False, reason="compile_error", detail=f"{type(e).__name__}: {e}"[:500])
        if tables is not None:  # a dynamic kernel takes its tables with every call
            built = kernel

            def kernel(q, k, v, scale, out):
                return built(q, k, v, scale, out=out, tables=tables)

        return check_and_time(spec, None if spec.dynamic else layout, kernel, prepared=prepared, reps=self.reps,
                              warmup=self.warmup)

    def _prepare(self, spec: KernelSpec, layout):
        """Inputs, golden and (dynamic kernels) tables of one workload, shared by all its configs. A dynamic
        kernel's tables are filled from a random selection (real shapes and capacities) and its golden is
        float64 attention restricted to what they select, per (batch, head)."""
        import torch

        from .measure import prepare

        if spec.dynamic:
            from ..cs4a.select import example_selection, fill_tables, kernel_tables_mask

            gen = torch.Generator(device="cuda")
            gen.manual_seed(self.seed)
            filled = fill_tables(layout, example_selection(layout, spec.batch, spec.heads, "cuda", gen))
            return prepare(spec, None, seed=self.seed, mask=kernel_tables_mask(layout, filled)), filled
        mask = None
        if spec.kind == "gather":
            mask = torch.from_numpy(backend_module(spec.backend).kernel_mask(spec, layout)).cuda()
        return prepare(spec, layout, seed=self.seed, mask=mask), None


class ReplayFileError(SparvarError):
    """A replay file that cannot be read or holds a malformed record."""


def replay_key(spec: KernelSpec, config: KernelConfig) -> str:
    return json.dumps({"spec": spec.to_dict(), "config": config.to_dict()}, sort_keys=True)


class ReplayRunner:
    """Serve measurements recorded earlier (``{"records": [{"spec", "config", "measurement"}, ...]}``)."""

    name = "replay"

    def __init__(self, records: dict[str, Measurement]):
        self.records = records
        self.served = 0

    @classmethod
    def from_file(cls, path: str | Path) -> "ReplayRunner":
        """Read a replay file (``measure_bundle``'s output), bounded like every JSON input
        (:mod:`sparvar_compiler.db.bounded_json`).

        Raises
        ------
        ReplayFileError
            One line naming the file and what is wrong with it (unreadable, too large or deep, not JSON, a
            malformed record).
        """
        from ..db.bounded_json import JsonInputError, read_json

        try:
            data = read_json(path, what="a replay file")
        except JsonInputError as e:
            raise ReplayFileError(f"replay file {e}") from None
        except OSError as e:
            raise ReplayFileError(f"replay file {path}: {e.strerror or e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise ReplayFileError(f"replay file {path}: not a replay file (no \"records\" list)")
        try:
            return cls.from_records(data["records"])
        except ReplayFileError as e:
            raise ReplayFileError(f"replay file {path}: {e}") from None

    @classmethod
    def from_records(cls, records: list[dict]) -> "ReplayRunner":
        out = {}
        for i, r in enumerate(records):
            try:
                spec = KernelSpec(**r["spec"])
                config = KernelConfig.from_dict(r["config"])
                out[replay_key(spec, config)] = Measurement.from_dict(r["measurement"])
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                what = f"missing field {e}" if isinstance(e, KeyError) else str(e).splitlines()[0] if str(e) else \
                    type(e).__name__
                raise ReplayFileError(f"records[{i}]: {what}") from None
        return cls(out)

    def measure(self, spec: KernelSpec, config: KernelConfig, layout: BlockLayout) -> Measurement:
        self.served += 1
        m = self.records.get(replay_key(spec, config))
        if m is None:
            return Measurement(False, reason="not_recorded", detail="no recorded measurement for this config")
        return Measurement.from_dict(m.to_dict())
