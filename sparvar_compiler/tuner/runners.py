"""Runners: where a candidate config is measured.

* :class:`LocalRunner` builds the kernel in this process and checks and times it on the local GPU.
* :class:`ReplayRunner` serves recorded measurements (from a JSON file of earlier runs), so the whole tuner,
  database and emitter run in CPU CI; a candidate it has no record of is invalid (``not_recorded``).
* Build here / measure there lives in :mod:`sparvar_compiler.tuner.bundle`.

Every runner answers ``measure(spec, config, layout) -> Measurement``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from ..codegen.spec import KernelConfig, KernelConfigError, KernelSpec
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
        from .measure import check_and_time, prepare

        mod = backend_module(spec.backend)
        key = spec.key()
        if spec.dynamic:
            return self._measure_dynamic(spec, config, layout)
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = None  # free the previous workload's tensors first
            mask = None
            if spec.kind == "gather":
                import torch

                mask = torch.from_numpy(mod.kernel_mask(spec, layout)).cuda()
            self._prepared = (key, prepare(spec, layout, seed=self.seed, mask=mask))
        try:
            kernel = mod.build(spec, config, layout)
        except KernelConfigError as e:
            return Measurement(False, reason="out_of_resources", detail=str(e)[:500])
        except Exception as e:  # noqa: BLE001 - a compile failure is a recorded outcome, not a crash
            return Measurement(False, reason="compile_error", detail=f"{type(e).__name__}: {e}"[:500])
        return check_and_time(spec, layout, kernel, prepared=self._prepared[1], reps=self.reps, warmup=self.warmup)


    def _measure_dynamic(self, spec: KernelSpec, config: KernelConfig, tables) -> Measurement:
        """A dynamic CS4A kernel: tables filled from a random selection (real shapes and capacities), checked
        against float64 attention restricted to what those tables select, per (batch, head)."""
        import torch

        from ..cs4a.select import example_selection, fill_tables, kernel_tables_mask
        from .measure import check_and_time, prepare

        key = spec.key()
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = None
            gen = torch.Generator(device="cuda")
            gen.manual_seed(self.seed)
            filled = fill_tables(tables, example_selection(tables, spec.batch, spec.heads, "cuda", gen))
            mask = kernel_tables_mask(tables, filled)
            self._prepared = (key, (prepare(spec, None, seed=self.seed, mask=mask), filled))
        prepared, filled = self._prepared[1]
        try:
            kernel = backend_module(spec.backend).build(spec, config)
        except KernelConfigError as e:
            return Measurement(False, reason="out_of_resources", detail=str(e)[:500])
        except Exception as e:  # noqa: BLE001 - a compile failure is a recorded outcome, not a crash
            return Measurement(False, reason="compile_error", detail=f"{type(e).__name__}: {e}"[:500])

        def run(q, k, v, scale, out):
            return kernel(q, k, v, scale, out=out, tables=filled)

        return check_and_time(spec, None, run, prepared=prepared, reps=self.reps, warmup=self.warmup)


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
        data = json.loads(Path(path).read_text())
        return cls.from_records(data["records"])

    @classmethod
    def from_records(cls, records: list[dict]) -> "ReplayRunner":
        out = {}
        for r in records:
            spec = KernelSpec(**r["spec"])
            config = KernelConfig.from_dict(r["config"])
            out[replay_key(spec, config)] = Measurement.from_dict(r["measurement"])
        return cls(out)

    def measure(self, spec: KernelSpec, config: KernelConfig, layout: BlockLayout) -> Measurement:
        self.served += 1
        m = self.records.get(replay_key(spec, config))
        if m is None:
            return Measurement(False, reason="not_recorded", detail="no recorded measurement for this config")
        return Measurement.from_dict(m.to_dict())
