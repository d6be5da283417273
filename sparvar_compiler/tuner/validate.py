"""One validation path for every kernel config: what the tuner measures, what ``db import`` accepts and what the
emitter compiles all pass :func:`validate_record`.

A tuning record is a config and a time for a workload on a target. It is usable only if the compiler can build
and launch that config there, and if the time is one a GPU could have measured:

1. **The backend's own check** (``validate_config`` of ``codegen/triton_backend.py`` or ``codegen/tvm_backend.py``,
   without importing TVM; the CS4A statistics and top-k kernels' own rules): known knobs only, each of its exact
   type (``block_m: 64.9``, ``True`` and ``"64"`` are not integers), known enum values (``order``, ``mma``), tile
   divisibility, the estimated shared memory and registers on the target.
2. **Launch limits** (:mod:`sparvar_compiler.limits`): the grid of the backend's ``grid()`` at the spec's batch
   within CUDA's ``MAX_KERNEL_GRID``, ``num_warps * 32 <= MAX_THREADS_PER_BLOCK``, and a persistent launch's
   ``programs`` at most ``MAX_PROGRAMS_PER_SM`` per SM of the target.
3. **A plausibility floor for the time** (:func:`roofline`): no kernel is faster than its compulsory work at
   ``PEAK_MARGIN`` (2x) times the target's datasheet peaks (:class:`~sparvar_compiler.planner.gpus.GpuSpec`), nor
   than ``MIN_KERNEL_MS``. The floor is a bound that a real measurement cannot break, so it refuses records that
   are wrong (a timing of 1e-300 ms), never ones that are merely fast.

Who calls it: :class:`~.search.Tuner` (its candidates, and every valid measurement before it is recorded),
:func:`sparvar_compiler.db.import_document` (every valid trial, before anything is written) and the emitter's
kernel choice, through :func:`usable_winner` or by walking ``db.winners(...)`` itself: a record that fails is
skipped with a :class:`SkippedRecordWarning` and the next one is used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import limits
from ..codegen.spec import KernelConfig, KernelConfigError, KernelSpec, check_config_types
from ..db.schema import SkippedRecordWarning
from ..errors import LayoutError
from ..planner.gpus import GPUS, GpuSpec
from ..planner.layout import FULL, BlockLayout

_ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_AXES = "xyz"
#: Knobs of the CS4A statistics kernel (codegen/cs4a_stats.py); the top-k kernel has none.
STATS_CONFIG_TYPES = {"block_m": int, "block_n": int, "key_split": int}


# ---------------------------------------------------------------------------------------------------- records

def validate_record(spec: Any, config: KernelConfig | Mapping[str, Any], gpu: GpuSpec,
                    median_ms: float | None = None, *, layout: BlockLayout | None = None) -> KernelConfig:
    """Check that ``config`` can be compiled and launched for ``spec`` on ``gpu`` and (``median_ms``) that the
    time is one a GPU could have measured; return the config as a :class:`KernelConfig`.

    Parameters
    ----------
    spec:
        A :class:`~sparvar_compiler.codegen.spec.KernelSpec` (Triton or TVM, static or dynamic CS4A), or the CS4A
        statistics / top-k kernels' ``StatsSpec`` / ``TopkSpec``.
    config:
        A ``KernelConfig`` or its ``to_dict()`` form (a stored record's config), checked strictly
        (:meth:`KernelConfig.from_dict`).
    gpu:
        The target.
    median_ms:
        The record's time at ``spec.batch``; None checks the config only.
    layout:
        The static layout of ``spec`` (optional): it adds the FLOPs and K/V bytes the layout keeps to the floor.
        Without it the floor counts what every layout costs (reading q, writing out and lse).

    Raises
    ------
    KernelConfigError
        Naming the field and the problem, e.g. ``programs 1099511627776 is over 64 per SM of h100 (8448)``.
    LayoutError
        ``layout`` is not the layout of ``spec``.
    """
    cfg = config if isinstance(config, KernelConfig) else KernelConfig.from_dict(config)
    launch_grid = _backend_check(spec, cfg, gpu)
    threads = cfg.num_warps * 32
    if threads > limits.MAX_THREADS_PER_BLOCK:
        raise KernelConfigError(f"num_warps {cfg.num_warps} is {threads} threads per block, over CUDA's "
                                f"{limits.MAX_THREADS_PER_BLOCK}")
    for axis, (n, most) in enumerate(zip(launch_grid, limits.MAX_KERNEL_GRID)):
        if not 1 <= n <= most:
            raise KernelConfigError(f"launch grid {_AXES[axis]} = {n} at batch {getattr(spec, 'batch', 1)} is "
                                    f"outside CUDA's 1..{most} (grid {tuple(launch_grid)})")
    if median_ms is not None:
        if isinstance(median_ms, bool) or not isinstance(median_ms, (int, float)) or not math.isfinite(median_ms) \
                or median_ms <= 0:
            raise KernelConfigError(f"median_ms must be a finite positive number of milliseconds, got {median_ms!r}")
        bound = roofline(spec, gpu, layout)
        if median_ms < bound.floor_ms:
            raise KernelConfigError(f"median_ms {median_ms:.4g} is below the fastest this workload can run on "
                                    f"{gpu.name} ({bound.floor_ms:.4g} ms: {bound.describe()}); the timing is not "
                                    f"a real measurement")
    return cfg


def _backend_check(spec: Any, cfg: KernelConfig, gpu: GpuSpec) -> tuple[int, int, int]:
    """The backend's own validation of ``cfg``; returns the launch grid at the spec's batch."""
    if isinstance(spec, KernelSpec):
        if spec.backend == "triton":
            from ..codegen import triton_backend as tb

            tb.validate_config(spec, cfg, gpu)
            programs = cfg.get("programs", 0)
            most = limits.MAX_PROGRAMS_PER_SM * gpu.sm_count
            if programs > most:
                raise KernelConfigError(f"programs {programs} is over {limits.MAX_PROGRAMS_PER_SM} per SM of "
                                        f"{gpu.name} ({most})")
            return tb.grid(spec, cfg)
        if spec.backend == "tvm":
            from ..codegen import tvm_backend as tvm  # the code generator only: TVM itself is not imported

            tvm._check_spec(spec, "cuda")
            tvm.validate_config(spec, cfg, gpu)
            return tvm.grid(spec, cfg)
        raise KernelConfigError(f"unknown backend {spec.backend!r}; known: triton, tvm")
    kind = getattr(spec, "kind", None)
    if kind == "cs4a_stats":
        from ..codegen import cs4a_stats

        check_config_types(cfg, STATS_CONFIG_TYPES, "CS4A statistics")
        cs4a_stats.validate_config(spec, cfg)
        return cs4a_stats.grid(spec, cfg)
    if kind == "cs4a_topk":
        from ..codegen import triton_backend as tb

        check_config_types(cfg, {}, "CS4A top-k")
        if cfg.num_warps not in tb.WARPS:
            raise KernelConfigError(f"num_warps must be one of {tb.WARPS}, got {cfg.num_warps}")
        if not 0 < spec.k <= spec.row_len:
            raise KernelConfigError(f"k must be in [1, {spec.row_len}], got {spec.k}")
        return (spec.rows, 1, 1)
    raise KernelConfigError(f"not a kernel spec: {type(spec).__name__}")


# ---------------------------------------------------------------------------------------------------- roofline

@dataclass(frozen=True)
class Roofline:
    """The least work a kernel must do, and the least time that takes on a GPU.

    ``flops`` and ``dram_bytes`` are lower bounds of the kernel's work; ``compute_ms`` and ``memory_ms`` are
    them at ``PEAK_MARGIN`` times the GPU's peaks (bytes that fit in its L2 count as free, as a timing loop may
    find them there); ``floor_ms`` the largest of those and ``MIN_KERNEL_MS``.
    """

    flops: float
    dram_bytes: float
    compute_ms: float
    memory_ms: float
    floor_ms: float

    def describe(self) -> str:
        return (f"{self.flops:.3g} FLOP and {self.dram_bytes:.3g} bytes at {limits.PEAK_MARGIN:g}x the datasheet "
                f"peaks")


def roofline(spec: Any, gpu: GpuSpec, layout: BlockLayout | None = None) -> Roofline:
    """The roofline bound of ``spec`` (at its batch) on ``gpu``; see :class:`Roofline`.

    What is counted, per kind (everything else a kernel does only adds to its time):

    * attention (``KernelSpec``): q read and out (and lse) written; with ``layout`` also the FLOPs of the blocks
      the kernel computes (``4 * head_dim`` per (query, key) pair: Q K^T and P V) and the K/V columns they read
      (token-exact and gather kernels: full blocks only, as they may skip parts of partial ones). A dynamic
      (CS4A) kernel's tables are filled at run time: its ``capacity`` bounds the work from above, not below, so
      only the q/out traffic counts.
    * CS4A statistics: the counted queries' Q K^T (``2 * head_dim`` per pair), q, k and lse read, the mass written.
    * CS4A top-k: the mass rows read and the indices written.
    """
    flops, dram = _work(spec, layout)
    margin = limits.PEAK_MARGIN
    compute_ms = flops / (margin * gpu.peak_bf16_flops) * 1e3 if gpu.peak_bf16_flops > 0 else 0.0
    beyond_l2 = max(0.0, dram - gpu.l2_bytes)
    memory_ms = beyond_l2 / (margin * gpu.peak_dram_bytes_per_s) * 1e3 if gpu.peak_dram_bytes_per_s > 0 else 0.0
    return Roofline(flops, dram, compute_ms, memory_ms, max(limits.MIN_KERNEL_MS, compute_ms, memory_ms))


def _work(spec: Any, layout: BlockLayout | None) -> tuple[float, float]:
    kind = getattr(spec, "kind", None)
    if isinstance(spec, KernelSpec):
        e = _ELEMENT_BYTES.get(spec.dtype, 2)
        rows = spec.batch * spec.heads
        dram = 2.0 * rows * spec.q_len * spec.head_dim * e + (4.0 * rows * spec.q_len if spec.return_lse else 0.0)
        if layout is None or spec.dynamic:
            return 0.0, dram
        _check_layout(spec, layout)
        row_sizes = np.minimum(layout.block_m, layout.q_len - np.arange(layout.q_blocks) * layout.block_m)
        col_sizes = np.minimum(layout.block_n, layout.kv_len - np.arange(layout.kv_blocks) * layout.block_n)
        # A block kernel computes its active blocks whole; a token-exact one might skip the empty sub-tiles of
        # a partial block and a gather one keeps an unknown part of them, so for those only full blocks count.
        whole = spec.kind == "block" and not spec.token_exact
        kept = layout.active() if whole else layout.kinds() == FULL
        pairs = float((kept * (row_sizes[:, None] * col_sizes[None, :])).sum())
        keys = float(col_sizes[kept.any(axis=0)].sum())
        return 4.0 * spec.head_dim * rows * pairs, dram + 2.0 * rows * keys * spec.head_dim * e
    if kind == "cs4a_stats":
        e = _ELEMENT_BYTES.get(spec.dtype, 2)
        rows = spec.batch * spec.heads
        counted = spec.q_len // max(1, spec.stride)
        dram = rows * (counted * spec.head_dim * e + spec.kv_len * spec.head_dim * e + 4.0 * counted
                       + 4.0 * spec.groups * spec.kv_len)
        return 2.0 * spec.head_dim * rows * counted * spec.kv_len, float(dram)
    if kind == "cs4a_topk":
        return 0.0, 4.0 * spec.rows * (spec.row_len + spec.k)
    raise KernelConfigError(f"not a kernel spec: {type(spec).__name__}")


def _check_layout(spec: KernelSpec, layout: BlockLayout) -> None:
    got = (layout.q_len, layout.kv_len, layout.block_m, layout.block_n)
    want = (spec.q_len, spec.kv_len, spec.block_m, spec.block_n)
    if got != want:
        raise LayoutError(f"layout (q_len, kv_len, block_m, block_n) = {got} does not match the spec's {want}")
    if spec.layout_hash and layout.content_hash() != spec.layout_hash:
        raise LayoutError(f"layout hash {layout.content_hash()[:16]} does not match the spec's "
                          f"{spec.layout_hash[:16]}")


# ---------------------------------------------------------------------------------------------------- lookups

def registered_gpu(target: Mapping[str, Any]) -> GpuSpec:
    """The registry's GPU of a stored target ``{"name", "arch", "sm_count"}``.

    Raises
    ------
    KernelConfigError
        No registered GPU has that name, arch and SM count: the compiler cannot target it, so nothing recorded
        for it can be checked or used.
    """
    g = GPUS.get(target.get("name")) if isinstance(target.get("name"), str) else None
    if g is None or (g.arch, g.sm_count) != (target.get("arch"), target.get("sm_count")):
        raise KernelConfigError(f"target {target.get('name')!r} ({target.get('arch')}, {target.get('sm_count')} "
                                f"SMs) is not a GPU this sparvar-compiler knows; known: {', '.join(GPUS)}")
    return g


def usable_winner(db: Any, spec: KernelSpec, gpu: GpuSpec, environment: Mapping[str, Any] | None = None, *,
                  layout: BlockLayout | None = None) -> tuple[Any, KernelConfig] | None:
    """The best record of ``spec`` on ``gpu`` in ``db`` that passes :func:`validate_record`, with its config.

    ``db`` is a :class:`~sparvar_compiler.db.TuningDatabase` or :class:`~sparvar_compiler.db.LayeredDatabase`;
    its ``winners(...)`` are tried best first (hard environment mismatches are skipped there), and each record
    that fails validation is skipped with a :class:`SkippedRecordWarning` naming it and why. None: no usable
    record (use the default config).

    Raises
    ------
    EnvironmentMismatchError
        Every record was measured where it cannot be reused (as ``winner()``).
    """
    for record in db.winners(spec.to_dict(), gpu.to_dict(), environment):
        try:
            config = validate_record(spec, record.config, gpu, record.median_ms, layout=layout)
        except KernelConfigError as e:
            warnings.warn(SkippedRecordWarning(
                f"tuning record {record.id} ({spec.backend}/{spec.kind} {spec.q_len}x{spec.kv_len} "
                f"{spec.block_m}x{spec.block_n} on {gpu.name}) is not used: {e}"), stacklevel=2)
            continue
        return record, config
    return None
