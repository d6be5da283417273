"""Emit the CS4A part of a runtime module: the statistics kernel of the decision scale, one dynamic kernel per
CS4A scale (the decision scale too when the residual is on: its sparse output is what the residual is taken
against), and the static half of their index tables.

Everything here is fixed ahead of time - shapes, capacities, group mappings, bands, sinks, the kernels - so the
runtime only fills the selected indices (:mod:`sparvar_compiler.runtime.cs4a`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..codegen import cs4a_stats, cs4a_topk
from ..codegen import triton_backend as tb
from ..codegen.spec import KernelConfig, KernelSpec
from ..cs4a.select import BlockTables, TokenTables, block_tables, tables_to_data, token_tables
from ..errors import PlanConfigError
from ..planner.gpus import GpuSpec
from ..planner.plan import Mode, Plan
from ..tuner.validate import usable_winner


@dataclass(frozen=True)
class CS4AKernelChoice:
    """One dynamic CS4A kernel: its scale, spec, config, static tables and the evidence behind the config."""

    scale: int
    spec: KernelSpec
    config: KernelConfig
    tables: TokenTables | BlockTables
    tuned: bool
    expected_ms: float | None
    source: str


def tables_hash(tables: TokenTables | BlockTables) -> str:
    """sha256 of the static tables (scalars and arrays): the dynamic kernel's stand-in for a layout hash."""
    scalars, arrays = tables_to_data(tables)
    h = hashlib.sha256(json.dumps(scalars, sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def cs4a_scales(plan: Plan) -> list[int]:
    """The scales whose dynamic kernel a module needs: every CS4A scale, and the decision scale when the
    residual is on."""
    cfg = plan.config
    later = [s.index for s in plan.scales if Mode.CS4A in s.modes]
    if not later:
        return []
    return ([cfg.decision_scale] if cfg.residual else []) + later


def dynamic_spec(plan: Plan, tables: TokenTables | BlockTables, batch: int, dtype: str, scale_kind: str
                 ) -> KernelSpec:
    """The dynamic kernel spec reading ``tables``: the gather kind for token top-k, the block kind for D-CSLA."""
    if isinstance(tables, TokenTables):
        kind, bm, bn = "gather", tables.group_size, 64
    else:
        kind, bm, bn = "block", tables.block, tables.block
    return KernelSpec("triton", kind, batch, plan.heads, tables.q_len, tables.kv_len, plan.head_dim, dtype, bm, bn,
                      tables_hash(tables), scale_kind=scale_kind, dynamic=True, capacity=tables.capacity)


def stats_spec(plan: Plan, batch: int, dtype: str) -> cs4a_stats.StatsSpec:
    """The decision scale's statistics workload: token groups, or one D-CSLA query block per group."""
    cfg = plan.config
    dec = plan.scales[cfg.decision_scale]
    group = cfg.group_size if cfg.cs4a == "token" else cfg.dcsla_block
    return cs4a_stats.StatsSpec(batch, plan.heads, dec.tokens, dec.kv_len, plan.head_dim, dtype, group)


def cs4a_workloads(plan: Plan, batch: int, dtype: str, scale_kind: str):
    """``(scale, spec, tables)`` of every dynamic CS4A kernel the plan needs (:func:`cs4a_scales`): what the
    tuner measures and the emitter compiles."""
    scales = cs4a_scales(plan)
    if scales and plan.config.cs4a == "block" and plan.config.key_mapping != "identity":
        raise PlanConfigError("D-CSLA (cs4a: block) supports the identity key mapping only: a mapped token does "
                              "not keep its block")
    for scale in scales:
        tables = token_tables(plan, scale) if plan.config.cs4a == "token" else block_tables(plan, scale)
        yield scale, dynamic_spec(plan, tables, batch, dtype, scale_kind), tables


def choose_cs4a_kernels(plan: Plan, gpu: GpuSpec, db: Any | None, batch: int, dtype: str, scale_kind: str,
                        environment: dict | None = None) -> list[CS4AKernelChoice]:
    """Per scale of :func:`cs4a_scales`, the best valid database record of its dynamic kernel, else the default
    config; a record that fails validation is skipped with a warning and the next one used
    (:func:`~sparvar_compiler.tuner.validate.usable_winner`)."""
    out = []
    for scale, spec, tables in cs4a_workloads(plan, batch, dtype, scale_kind):
        found = None if db is None else usable_winner(db, spec, gpu, environment)
        if found is not None:
            win, config = found
            out.append(CS4AKernelChoice(scale, spec, config, tables, True, float(win.median_ms),
                                        f"database trial {win.id}"))
        else:
            out.append(CS4AKernelChoice(scale, spec, tb.default_config(spec, gpu), tables, False, None,
                                        "default config (untuned)"))
    return out


def emit_cs4a(plan: Plan, gpu: GpuSpec, tmp: Path, choices: list[CS4AKernelChoice],
              progress: Callable[[str], None]) -> dict[str, Any] | None:
    """Compile and write the CS4A kernels and tables into the module directory ``tmp``; returns the manifest's
    ``cs4a`` section (None if the plan has no CS4A)."""
    if not choices:
        return None
    cfg = plan.config
    spec0 = choices[0].spec
    sspec = stats_spec(plan, spec0.batch, spec0.dtype)
    sconfig = cs4a_stats.default_config(sspec)
    name = f"cs4a_stats_scale{cfg.decision_scale}"
    progress(f"[cs4a] compiling {name} for {gpu.name} ({gpu.arch}) config {sconfig.to_dict()}")
    compiled = cs4a_stats.compile_for_target(sspec, sconfig, gpu)
    (tmp / f"kernels/{name}.cubin").write_bytes(compiled.binary)
    section: dict[str, Any] = {
        "mode": cfg.cs4a, "mapping": cfg.key_mapping, "residual": cfg.residual,
        "decision_scale": cfg.decision_scale, "bound_layer": cfg.bound_layer, "coverage": cfg.dcsla_coverage,
        "min_blocks": cfg.dcsla_min_blocks, "group": sspec.group,
        "stats": {"name": name, "binary": f"kernels/{name}.cubin", "meta": compiled.meta(),
                  "spec": sspec.to_dict(), "config": sconfig.to_dict(), "tuned": False},
        "scales": {},
    }
    if cfg.cs4a == "token":
        # Top-k without a sort, one program per (batch, head, group) row of the statistics.
        tspec = cs4a_topk.TopkSpec(spec0.batch * spec0.heads * sspec.groups, sspec.kv_len, choices[0].tables.topk)
        tconfig = cs4a_topk.default_config(tspec)
        tname = f"cs4a_topk_scale{cfg.decision_scale}"
        progress(f"[cs4a] compiling {tname} for {gpu.name} ({gpu.arch})")
        compiled = cs4a_topk.compile_for_target(tspec, tconfig, gpu, batch=spec0.batch)
        (tmp / f"kernels/{tname}.cubin").write_bytes(compiled.binary)
        section["topk"] = {"name": tname, "binary": f"kernels/{tname}.cubin", "meta": compiled.meta(),
                           "spec": tspec.to_dict(), "config": tconfig.to_dict(), "tuned": False}
    for c in choices:
        kname = f"cs4a_scale{c.scale}_{c.spec.kind}"
        progress(f"[cs4a] compiling {kname} (capacity {c.spec.capacity}) for {gpu.name} "
                 f"{'tuned' if c.tuned else 'untuned'} config {c.config.to_dict()}")
        compiled = tb.compile_for_target(c.spec, c.config, None, gpu)
        binary = f"kernels/{kname}.cubin"
        (tmp / binary).write_bytes(compiled.binary)
        scalars, arrays = tables_to_data(c.tables)
        tables_file = f"layouts/{kname}.tables.npz"
        np.savez_compressed(tmp / tables_file, **arrays)
        section["scales"][str(c.scale)] = {
            "name": kname, "binary": binary, "tables_file": tables_file, "tables": scalars,
            "meta": compiled.meta(), "spec": c.spec.to_dict(), "config": c.config.to_dict(), "tuned": c.tuned,
            "source": c.source, "expected_ms": c.expected_ms,
        }
    return section
