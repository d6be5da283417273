"""Triton backend: block-sparse (``"block"``) and key-gather (``"gather"``) attention forward kernels.

Both kinds take q ``[B, H, Nq, D]`` and k, v ``[B, H, Nkv, D]`` (contiguous, bf16/fp16/fp32, D = 64 or 128) and
write out ``[B, H, Nq, D]`` in the inputs' dtype and, when the spec asks for it, lse ``[B, H, Nq]`` float32 (the
natural log of the softmax denominator including the row maximum; ``-inf`` for a row with nothing kept, whose
output is 0). The softmax scale is a runtime argument (default ``1/sqrt(D)``, Infinity uses 1.0); the online
softmax runs in float32 with ``log2(e)`` folded into the scale.

* ``"block"``: one program per (query tile, batch*head); it walks its query block's kv blocks from the layout
  tables. ``token_exact=False`` (SparVAR's default) computes every active block whole; ``token_exact=True``
  computes full blocks unmasked and applies each partial block's token bitmask.
* ``"gather"``: per query block, the *union* of the keys its queries keep (from the layout's exact token masks)
  is gathered into full tiles of ``block_n`` keys. Every query of the block attends to every key of that union
  (block-union semantics, not per-token exact: ``M[q, k] = k in union(block(q))``, see :func:`kernel_mask`); it
  computes fewer wasted pairs than whole blocks when the kept keys are scattered over many blocks.

Kernel parameters, in order (the names are the contract with ``sparvar_compiler.runtime``'s cubin launcher,
which binds them by name from :func:`launch_args`)::

    block, token_exact=False: q, k, v, out, [lse], kv_num, kv_idx, scale
    block, token_exact=True:  q, k, v, out, [lse], full_num, full_idx, partial_num, partial_idx,
                              partial_offsets, partial_masks, scale
    gather:                   q, k, v, out, [lse], key_num, key_idx, scale

``lse`` is present only when ``spec.return_lse``. ``scale`` is float32; every other parameter is a pointer to a
16-byte aligned buffer: ``*_num`` int32 ``[q_blocks]`` and ``*_idx`` int32 ``[q_blocks, kv_blocks]`` are
``BlockLayout.tables()`` padded to the spec's full width (so tables depend only on the spec's shape);
``partial_offsets`` int32 ``[q_blocks + 1]``; ``partial_masks`` uint32 (as int32) ``[n_partial, block_m, words]``;
``key_num``/``key_idx`` are :func:`gather_table`. A compiled cubin adds Triton's scratch pointers after these
(``CompiledKernel`` params of kind ``scratch``). A block has ``num_warps * 32`` threads.

Program order: the grid is ``(query tiles, B*H, 1)`` (``q_major``, the default) or ``(B*H, query tiles, 1)``
(``head_major``). CTAs are dispatched with the x index fastest, so in ``q_major`` the CTAs resident at one time
(132 SMs x 1-3) are the query tiles of a few heads: every K/V tile a head's queries need is fetched from HBM
about once and then served from L2 (one head's K and V at the largest scale are 5.4 MB; the H100's L2 is
50 MB). ``head_major`` spreads the resident CTAs over all heads at one query tile, so each head's K/V is read
again, query tile after query tile, long after it left L2. It is kept as a knob for shapes with few query tiles.

Tuning knobs (``KernelConfig``): ``num_warps``, ``num_stages`` and extras ``block_m`` / ``block_n`` (the kernel
tile; each divides the layout's block, so a layout block can be walked in sub-tiles; a gather kernel's key tile
is free), ``order`` (``q_major`` or ``head_major``), for the block kind on sm_90+, ``tma`` (K/V through
device-side TMA descriptors; the cubin then needs a global scratch buffer of 256 bytes per program), and
``programs`` (a persistent launch: that many programs stride over the (query tile, batch*head) items in the
program order, the item loop and the key-tile loop flattened into one pipelined loop; static tables only, not
token-exact; 0, the default, is one program per item).

Triton picks compiled or interpreted mode once per process, when ``triton.language`` is first imported. Call
:func:`use_interpreter` before anything imports Triton to run kernels on the CPU; :func:`compile_for_target` then
compiles in a child process, since Triton's compiler cannot run in an interpreter-mode process.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import json
import math
import numbers
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LayoutError
from ..planner.gpus import GpuSpec, get_gpu, gpu_from_device_name
from ..planner.layout import BlockLayout
from .artifact import CompiledKernel, KernelParam
from .render import render
from .spec import (DTYPES, KINDS, KernelConfig, KernelConfigError, KernelInputError, KernelSpec,
                   check_config_types, check_kernel_call, default_scale)

ORDERS = ("q_major", "head_major")
TILE_SIZES = (16, 32, 64, 128)
WARPS = (1, 2, 4, 8, 16)
CONFIG_EXTRAS = ("block_m", "block_n", "order", "tma", "programs")
#: The type of every knob besides num_warps/num_stages (ints): what :func:`validate_config` holds a config to.
CONFIG_TYPES = {"block_m": int, "block_n": int, "order": ORDERS, "tma": bool, "programs": int}
_TEMPLATES = {"block": "triton/block_sparse_attention.py.jinja", "gather": "triton/gather_attention.py.jinja"}
_TRITON_TYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
_ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


class InterpreterModeError(RuntimeError):
    """Triton was already imported in the other mode (compiled vs interpreted) than the one requested."""


class TritonCompileError(RuntimeError):
    """Triton (or ptxas) failed to compile a kernel (a config it cannot build, or a bug; not a resource limit,
    which raises :class:`KernelConfigError`)."""


# ---------------------------------------------------------------------------------------------- spec helpers
def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def kernel_name(spec: KernelSpec) -> str:
    variant = "gather" if spec.kind == "gather" else ("block_exact" if spec.token_exact else "block")
    return f"sparvar_{variant}_attention_d{spec.head_dim}"


def kernel_params(spec: KernelSpec, config: KernelConfig | None = None) -> tuple[str, ...]:
    """Names of the kernel's runtime parameters, in order (see the module docstring); a persistent config
    (``programs``) adds ``items``, its work-item count (query tiles x batch x heads)."""
    lse = ("lse",) if spec.return_lse else ()
    items = ("items",) if config is not None and _programs(config) else ()
    if spec.kind == "gather":
        tables: tuple[str, ...] = ("key_num", "key_idx")
    elif spec.token_exact:
        tables = ("full_num", "full_idx", "partial_num", "partial_idx", "partial_offsets", "partial_masks")
    else:
        tables = ("kv_num", "kv_idx")
    return ("q", "k", "v", "out", *lse, *tables, "scale", *items)


def _signature(spec: KernelSpec, config: KernelConfig | None = None) -> dict[str, str]:
    pointer = {"q": "*" + _TRITON_TYPES[spec.dtype], "lse": "*fp32"}
    out = {}
    for name in kernel_params(spec, config):
        if name == "scale":
            out[name] = "fp32"
        elif name == "items":
            out[name] = "i32"
        else:
            out[name] = pointer.get(name, pointer["q"] if name in ("k", "v", "out") else "*i32")
    return out


def _tiles(spec: KernelSpec, config: KernelConfig) -> tuple[int, int, str]:
    bm = int(config.get("block_m", spec.block_m))
    bn = int(config.get("block_n", min(spec.block_n, 64)))
    return bm, bn, str(config.get("order", "q_major"))


def _uses_tma(config: KernelConfig) -> bool:
    return bool(config.get("tma", False))


def _programs(config: KernelConfig) -> int:
    """Programs of a persistent launch, or 0 for one program per work item."""
    return int(config.get("programs", 0))


def grid(spec: KernelSpec, config: KernelConfig, batch: int | None = None) -> tuple[int, int, int]:
    """Launch grid of the kernel for ``batch`` (default: the spec's): ``(query tiles, B*H, 1)``, or swapped for
    ``head_major``; ``(programs, 1, 1)`` for a persistent config (which takes :func:`work_items` instead)."""
    if _programs(config):
        return (_programs(config), 1, 1)
    bm, _, order = _tiles(spec, config)
    tiles, bh = _ceil_div(spec.q_len, bm), (spec.batch if batch is None else batch) * spec.heads
    return (tiles, bh, 1) if order == "q_major" else (bh, tiles, 1)


def batch_axis(spec: KernelSpec, config: KernelConfig) -> int | None:
    """The grid axis that is ``batch * heads`` (scaled by the launch's batch), or None for a persistent config,
    whose grid is fixed and whose ``items`` argument scales instead (:func:`work_items`)."""
    if _programs(config):
        return None
    return 1 if _tiles(spec, config)[2] == "q_major" else 0


def work_items(spec: KernelSpec, config: KernelConfig, batch: int) -> int:
    """A persistent launch's ``items``: query tiles x batch x heads."""
    return _ceil_div(spec.q_len, _tiles(spec, config)[0]) * batch * spec.heads


def _check_spec(spec: KernelSpec, layout: BlockLayout | None = None) -> None:
    if spec.backend != "triton":
        raise KernelConfigError(f"spec is for backend {spec.backend!r}, not triton")
    if spec.kind not in KINDS:
        raise KernelConfigError(f"kind must be one of {KINDS}, got {spec.kind!r}")
    if spec.dtype not in DTYPES:
        raise KernelConfigError(f"dtype must be one of {tuple(DTYPES)}, got {spec.dtype!r}")
    if spec.head_dim not in (64, 128):
        raise KernelConfigError(f"head_dim must be 64 or 128, got {spec.head_dim}")
    if spec.kind == "gather" and spec.token_exact:
        raise KernelConfigError("the gather kind has block-union semantics; token_exact must be False")
    if spec.dynamic:
        if spec.token_exact or spec.capacity < 1:
            raise KernelConfigError("a dynamic kernel needs capacity >= 1 and token_exact False")
        if spec.kind == "gather" and spec.capacity % TILE_SIZES[-1]:
            raise KernelConfigError(f"a dynamic gather table's capacity must be a multiple of {TILE_SIZES[-1]} "
                                    f"(a whole number of key tiles), got {spec.capacity}")
        if layout is not None:
            raise LayoutError("a dynamic kernel takes its tables at call time, not a static layout")
        return
    if layout is None:
        return
    got = (layout.q_len, layout.kv_len, layout.block_m, layout.block_n)
    want = (spec.q_len, spec.kv_len, spec.block_m, spec.block_n)
    if got != want:
        raise LayoutError(f"layout (q_len, kv_len, block_m, block_n) = {got} does not match the spec's {want}")
    if layout.content_hash() != spec.layout_hash:
        raise LayoutError(f"layout hash {layout.content_hash()[:16]} does not match the spec's "
                          f"{spec.layout_hash[:16]}")
    needs_masks = spec.kind == "gather" or (spec.token_exact and layout.partial_indices.size > 0)
    if needs_masks and not layout.has_token_masks:
        raise LayoutError(f"a {spec.kind} kernel{' (token_exact)' if spec.token_exact else ''} needs the layout's "
                          "token masks; build the layout with token_masks=True")


# ---------------------------------------------------------------------------------------------- layout tables
def _padded(table: tuple[np.ndarray, np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    num, idx = table
    out = np.empty((idx.shape[0], width), dtype=np.int32)
    out[:, : idx.shape[1]] = idx
    out[:, idx.shape[1]:] = idx[:, -1:]  # repeat the row's last entry, as tables() pads
    return num.astype(np.int32), out


def key_capacity(kv_len: int, block_n: int) -> int:
    """Row width of a gather table: ``kv_len`` rounded up to a multiple of every kernel key tile."""
    step = max(TILE_SIZES[-1], block_n)
    return _ceil_div(kv_len, step) * step


def gather_table(layout: BlockLayout) -> tuple[np.ndarray, np.ndarray]:
    """Keys each query block of a key-gather kernel attends to.

    Returns
    -------
    counts : numpy.ndarray
        int32 ``[q_blocks]``: how many distinct keys the queries of the block keep (union over its rows).
    key_idx : numpy.ndarray
        int32 ``[q_blocks, key_capacity(kv_len, block_n)]``: the sorted key indices of each union, padded by
        repeating the last one (0 for an empty row) so that a kernel loads only real keys and masks the tail
        by count. The width (``kv_len`` rounded up to a multiple of ``max(128, block_n)``, so of any kernel
        tile) is the most keys a block can need: the table's shape depends only on the layout's shape.

    Raises
    ------
    LayoutError
        If the layout carries no token masks (the union must be exact, not whole blocks).
    """
    if not layout.has_token_masks:
        raise LayoutError("gather_table needs the layout's token masks; build it with token_masks=True")
    mask = layout.to_token_mask(exact=True)
    bm, qb = layout.block_m, layout.q_blocks
    padded = np.zeros((qb * bm, layout.kv_len), dtype=bool)
    padded[: layout.q_len] = mask
    union = padded.reshape(qb, bm, layout.kv_len).any(axis=1)
    counts = union.sum(axis=1).astype(np.int32)
    key_idx = np.zeros((qb, key_capacity(layout.kv_len, layout.block_n)), dtype=np.int32)
    for i in range(qb):
        keys = np.flatnonzero(union[i])
        if keys.size:
            key_idx[i, : keys.size] = keys
            key_idx[i, keys.size:] = keys[-1]
    return counts, key_idx


def kernel_mask(spec: KernelSpec, layout: BlockLayout) -> np.ndarray:
    """Boolean ``[q_len, kv_len]``: the (query, key) pairs the kernel of ``spec`` attends to over ``layout``."""
    if spec.kind == "gather":
        counts, key_idx = gather_table(layout)
        union = np.zeros((layout.q_blocks, layout.kv_len), dtype=bool)
        for i, n in enumerate(counts):
            union[i, key_idx[i, :n]] = True
        return np.repeat(union, layout.block_m, axis=0)[: layout.q_len]
    return layout.to_token_mask(exact=spec.token_exact)


def _host_tables(spec: KernelSpec, layout: BlockLayout) -> dict[str, np.ndarray]:
    if spec.kind == "gather":
        counts, key_idx = gather_table(layout)
        return {"key_num": counts, "key_idx": key_idx}
    width = layout.kv_blocks
    if not spec.token_exact:
        num, idx = _padded(layout.tables("active"), width)
        return {"kv_num": num, "kv_idx": idx}
    out = {}
    for which in ("full", "partial"):
        out[f"{which}_num"], out[f"{which}_idx"] = _padded(layout.tables(which), width)
    out["partial_offsets"] = layout.partial_offsets.astype(np.int32)
    masks = layout.partial_masks
    if masks is None or masks.size == 0:
        masks = np.zeros((1,), dtype=np.uint32)  # never read; a pointer must still point somewhere
    out["partial_masks"] = np.ascontiguousarray(masks).view(np.int32)
    return out


# ---------------------------------------------------------------------------------------------- rendering
def template_name(spec: KernelSpec) -> str:
    return _TEMPLATES[spec.kind]


def template_params(spec: KernelSpec, config: KernelConfig, layout: BlockLayout | None = None) -> dict[str, Any]:
    """Every variable the kind's template uses (the renderer is strict: a missing one fails the render)."""
    validate_config(spec, config, gpu=None, check_resources=False)
    bm, bn, order = _tiles(spec, config)
    params: dict[str, Any] = dict(
        kernel_name=kernel_name(spec), dtype=spec.dtype, batch=spec.batch, heads=spec.heads, q_len=spec.q_len,
        kv_len=spec.kv_len, head_dim=spec.head_dim, layout_block_m=spec.block_m, block_m=bm, block_n=bn,
        q_blocks=_ceil_div(spec.q_len, spec.block_m), num_warps=config.num_warps,
        num_stages=config.num_stages, order=order, return_lse=spec.return_lse,
        dot_precision="ieee" if spec.dtype == "fp32" else "tf32",  # fp32 must not silently become TF32
        programs=_programs(config),
    )
    params["dynamic_tables"] = spec.dynamic
    if spec.kind == "gather":
        params["key_cap"] = spec.capacity if spec.dynamic else key_capacity(spec.kv_len, spec.block_n)
        return params
    kv_blocks = _ceil_div(spec.kv_len, spec.block_n)
    tail = spec.kv_len - (kv_blocks - 1) * spec.block_n
    params.update(layout_block_n=spec.block_n, kv_blocks=kv_blocks,
                  table_width=spec.capacity if spec.dynamic else kv_blocks, use_tma=_uses_tma(config),
                  tail_tiles=_ceil_div(tail, bn), mask_words=_ceil_div(spec.block_n, 32),
                  token_exact=spec.token_exact,
                  has_partial_blocks=not spec.dynamic and (layout is None or layout.partial_indices.size > 0),
                  table_params=kernel_params(spec)[4 + spec.return_lse:-1])  # without q..out/lse, scale
    return params


def render_source(spec: KernelSpec, config: KernelConfig, layout: BlockLayout | None = None) -> str:
    """Python source of the kernel: a strict render of the kind's template.

    The layout only specialises ``HAS_PARTIAL_BLOCKS`` of a token-exact kernel; without it the kernel keeps
    the partial-block loop, which is correct for any layout of the spec. Raises :class:`KernelConfigError` for
    an invalid config and ``TemplateError`` if the template does not render.
    """
    return render(template_name(spec), **template_params(spec, config, layout))


# ---------------------------------------------------------------------------------------------- configs
def _local_gpu() -> GpuSpec:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        found = gpu_from_device_name(props.name, props.multi_processor_count)
        if found is not None:
            return found
    return get_gpu("h100")


def estimated_shared_bytes(spec: KernelSpec, config: KernelConfig) -> int:
    """Shared memory the kernel is expected to need: the Q tile plus ``num_stages`` K and V tiles.

    A planning estimate used to drop configs before compiling; :func:`compile_for_target` checks the
    compiler's own figure.
    """
    bm, bn, _ = _tiles(spec, config)
    # Buffered K and V tiles, measured with Triton 3.6 and 3.9 for sm_90 (cp.async and TMA alike): the loop's
    # table lookup takes a pipeline stage, so num_stages 2-4 double-buffer and 5 triple-buffers.
    buffers = 1 if config.num_stages == 1 else max(2, config.num_stages - 2)
    total = _ELEMENT_BYTES[spec.dtype] * spec.head_dim * (bm + 2 * bn * buffers)
    if spec.token_exact:
        total += 4 * bm * bn  # the partial block's mask words
    if spec.kind == "gather":
        total += 4 * bn * buffers  # the gathered key indices
    return total


def validate_config(spec: KernelSpec, config: KernelConfig, gpu: GpuSpec | None = None,
                    check_resources: bool = True) -> None:
    """Raise :class:`KernelConfigError` unless ``config`` can run ``spec`` (before anything is compiled).

    Checks the knobs' names and exact types (:data:`CONFIG_TYPES`: ``block_m: 64.9`` is refused, not truncated),
    their values, that the kernel tiles divide the layout's blocks, and (``check_resources``) the estimated
    shared memory against ``gpu`` (default: the local GPU, else the H100). Launch limits (grid, programs per SM)
    are checked with the rest by :func:`sparvar_compiler.tuner.validate.validate_record`.
    """
    _check_spec(spec)
    check_config_types(config, CONFIG_TYPES, "Triton")
    if config.num_warps not in WARPS:
        raise KernelConfigError(f"num_warps must be one of {WARPS}, got {config.num_warps}")
    if not 1 <= config.num_stages <= 6:
        raise KernelConfigError(f"num_stages must be between 1 and 6, got {config.num_stages}")
    bm, bn, _ = _tiles(spec, config)
    # A gather kernel's key tiles are independent of the layout's columns; every other tile side walks the
    # layout's blocks in sub-tiles, so it must divide them.
    sides = (("block_m", bm, spec.block_m),) + ((("block_n", bn, spec.block_n),) if spec.kind == "block" else ())
    for name, tile, side in sides:
        if tile not in TILE_SIZES or side % tile:
            raise KernelConfigError(f"{name} must be one of {TILE_SIZES} and divide the layout's {name} {side}, "
                                    f"got {tile}")
    if bn not in TILE_SIZES:
        raise KernelConfigError(f"block_n must be one of {TILE_SIZES}, got {bn}")
    if _uses_tma(config) and spec.kind != "block":
        raise KernelConfigError("tma applies to the block kind only (a gather of rows is not a TMA box)")
    programs = config.get("programs", 0)
    if programs < 0:
        raise KernelConfigError(f"programs must be a non-negative integer (0: not persistent), got {programs!r}")
    if programs and (spec.dynamic or spec.token_exact):
        raise KernelConfigError("a persistent launch (programs > 0) takes static tables and block-level or "
                                "union semantics; not for dynamic or token-exact kernels")
    if not check_resources:
        return
    gpu = gpu or _local_gpu()
    if _uses_tma(config) and gpu.capability < (9, 0):
        raise KernelConfigError(f"tma needs sm_90 or newer, {gpu.name} is {gpu.arch}")
    smem = estimated_shared_bytes(spec, config)
    if smem > gpu.smem_per_block:
        raise KernelConfigError(f"shared memory: config needs about {smem} bytes, {gpu.name} allows "
                                f"{gpu.smem_per_block} per block")


def default_config(spec: KernelSpec, gpu: GpuSpec | None = None) -> KernelConfig:
    """A reasonable untuned config: the layout's query block as the query tile, 64-key tiles (32 in fp32),
    4 warps per 64 query rows, and the most stages (up to 3) whose estimated shared memory fits ``gpu``."""
    _check_spec(spec)
    gpu = gpu or _local_gpu()
    bm = max(t for t in TILE_SIZES if spec.block_m % t == 0 and t <= 128)  # 64 for a CS4A group of 192
    bn = 64 if spec.kind == "gather" else min(spec.block_n, 64)
    bn = min(bn, 32) if spec.dtype == "fp32" else bn
    warps = 8 if bm >= 128 else 4
    for stages in (3, 2, 1):
        cfg = KernelConfig(warps, stages, (("block_m", bm), ("block_n", bn), ("order", "q_major")))
        if estimated_shared_bytes(spec, cfg) <= gpu.smem_per_block:
            return cfg
    raise KernelConfigError(f"no default config fits {gpu.name}'s shared memory")  # pragma: no cover


def search_space(spec: KernelSpec, gpu: GpuSpec | None = None) -> list[KernelConfig]:
    """Every valid config worth timing on ``gpu``.

    Query tiles that divide the layout's block and are at least 64 rows (a Hopper warpgroup MMA is 64 rows
    tall) unless the block is smaller; key tiles of 32-128 that divide the layout's block (any of them for the
    gather kind); 4 or 8 warps with at least 16 query rows per warp; 2-5 stages; both program orders; TMA or
    not (block kind, sm_90+). Configs whose estimated shared memory exceeds the GPU's are left out (and so is
    the persistent launch: see :func:`persistent_variants`).
    """
    _check_spec(spec)
    gpu = gpu or _local_gpu()
    out = []
    ms = [t for t in TILE_SIZES if spec.block_m % t == 0 and t >= min(spec.block_m, 64)]
    ns = [t for t in TILE_SIZES if t >= min(spec.block_n, 32) and (spec.kind == "gather" or spec.block_n % t == 0)]
    tmas = (False, True) if spec.kind == "block" and gpu.capability >= (9, 0) else (False,)
    for bm, bn, warps, stages, order, tma in itertools.product(ms, ns, (4, 8), (2, 3, 4, 5), ORDERS, tmas):
        if warps > 4 and bm < 16 * warps:
            continue
        extra = (("block_m", bm), ("block_n", bn), ("order", order)) + ((("tma", True),) if tma else ())
        cfg = KernelConfig(warps, stages, tuple(sorted(extra)))
        try:
            validate_config(spec, cfg, gpu)
        except KernelConfigError:
            continue
        out.append(cfg)
    return out


def persistent_variants(spec: KernelSpec, config: KernelConfig, gpu: GpuSpec | None = None) -> list[KernelConfig]:
    """``config`` as a persistent launch of one and two programs per SM (those whose programs fit on an SM).

    Not part of :func:`search_space`: measured on the H100 (bench/NOTES.md), the flattened persistent loop was
    never clearly faster than one program per item for these layouts (equal at best, up to 1.6x slower with
    one program per SM), so the tuner does not spend trials on it; the benchmark compares it explicitly.
    """
    gpu = gpu or _local_gpu()
    if spec.dynamic or spec.token_exact:
        return []
    base = tuple((k, v) for k, v in config.extra if k != "programs")
    resident = gpu.smem_per_sm // (estimated_shared_bytes(spec, config) + 1024)
    return [KernelConfig(config.num_warps, config.num_stages, tuple(sorted(base + (("programs", n * gpu.sm_count),))))
            for n in range(1, min(2, resident) + 1)]


# ---------------------------------------------------------------------------------------------- Triton modes
def _triton_mode() -> str | None:
    """``"interpreter"`` or ``"compiled"``: how this process imported triton.language; None if not yet."""
    std = sys.modules.get("triton.language.standard")
    if std is None:
        return None
    from triton.runtime.interpreter import InterpretedFunction
    return "interpreter" if isinstance(std.cdiv, InterpretedFunction) else "compiled"


@contextlib.contextmanager
def _interpret_env(on: bool):
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _import_triton(interpret: bool) -> None:
    mode = _triton_mode()
    if mode is None:
        with _interpret_env(interpret):
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        mode = _triton_mode()
    want = "interpreter" if interpret else "compiled"
    if mode != want:
        raise InterpreterModeError(
            f"Triton is already imported in {mode} mode, {want} was requested: the mode is fixed when "
            "triton.language is first imported (call sparvar_compiler.codegen.triton_backend.use_interpreter() "
            "before anything imports triton to run kernels on the CPU)")


@contextlib.contextmanager
def _scratch_allocator(device: torch.device, needed: bool):
    """Let Triton allocate its per-launch global scratch (TMA descriptors) from torch's caching allocator,
    for this launch only (a ContextVar in Triton 3.6 and 3.9; a process-wide setting elsewhere)."""
    if not needed:
        yield
        return
    import triton
    from triton.runtime import _allocation

    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    var = getattr(_allocation, "_allocator", None)
    if var is None or not hasattr(var, "reset"):
        triton.set_allocator(alloc)
        yield
        return
    token = var.set(alloc)
    try:
        yield
    finally:
        var.reset(token)


def use_interpreter() -> bool:
    """Import Triton in interpreter mode unless it is imported already; returns whether kernels will be
    interpreted. Kernels then run on CPU tensors; :func:`compile_for_target` moves to a child process."""
    if _triton_mode() is None:
        _import_triton(interpret=True)
    return _triton_mode() == "interpreter"


def cache_dir() -> Path:
    """Where rendered kernel sources live: ``$SPARVAR_CACHE_DIR/triton`` (default ``~/.cache/sparvar``)."""
    root = os.environ.get("SPARVAR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sparvar")
    return Path(root) / "triton"


_MODULE_LOCK = threading.Lock()


def _write_source(source: str) -> Path:
    sha = hashlib.sha256(source.encode()).hexdigest()
    path = cache_dir() / f"{sha}.py"
    if not (path.exists() and path.read_text() == source):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return path


def _load_module(path: Path, interpret: bool):
    """Import a rendered kernel file; Triton needs it on disk (it reads the kernel's source by file)."""
    name = f"sparvar_triton_{path.stem[:24]}_{'interp' if interpret else 'jit'}"
    with _MODULE_LOCK:
        mod = sys.modules.get(name)
        if mod is None:
            _import_triton(interpret)
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            with _interpret_env(interpret):
                spec.loader.exec_module(mod)
            sys.modules[name] = mod
    return mod


# ---------------------------------------------------------------------------------------------- in-process kernel
class TritonKernel:
    """A kernel for one spec, config and layout, callable in this process (on the GPU, or interpreted on CPU).

    Attributes
    ----------
    spec, config, layout:
        What it computes and how.
    source, path:
        The rendered Triton source and the cache file it was imported from.
    interpret:
        Whether it runs in Triton's interpreter (CPU tensors) instead of on a CUDA device.
    grid, param_names:
        Launch grid and the kernel's parameter names in order (see the module docstring).
    warmup_error:
        Why compiling at build time was skipped (an older Triton API), else None.
    """

    def __init__(self, spec: KernelSpec, config: KernelConfig, layout: BlockLayout | None, interpret: bool):
        self.spec, self.config, self.layout, self.interpret = spec, config, layout, interpret
        self.source = render_source(spec, config, layout)
        self.path = _write_source(self.source)
        self._fn = getattr(_load_module(self.path, interpret), kernel_name(spec))
        self._host_tables = {} if spec.dynamic else _host_tables(spec, layout)
        self._device_tables: dict[str, dict[str, torch.Tensor]] = {}
        self.grid = grid(spec, config)
        self.param_names = kernel_params(spec, config)
        self.warmup_error: str | None = None
        if not interpret:
            self._warmup()

    def _launch_options(self) -> dict[str, Any]:
        return {"num_warps": self.config.num_warps, "num_stages": self.config.num_stages, "enable_fp_fusion": True}

    def _warmup(self) -> None:
        """Compile and load now, so that a build failure or a resource limit surfaces at build time and the first
        call does not pay the compile."""
        from triton.runtime.errors import OutOfResources

        types = {"q": DTYPES[self.spec.dtype], "lse": torch.float32, "scale": 1.0,
                 "items": work_items(self.spec, self.config, self.spec.batch)}
        args = [types.get(n, types["q"] if n in ("k", "v", "out") else torch.int32) for n in self.param_names]
        try:
            # torch dtypes stand in for tensors (Triton's MockTensor): same specialisation as aligned tensors.
            compiled = self._fn.warmup(*args, grid=self.grid, **self._launch_options())
            init = getattr(compiled, "_init_handles", None)  # loads the cubin: Triton's shared-memory check
            if init is not None:
                init()
        except OutOfResources as e:
            raise KernelConfigError(str(e)) from None
        except (TypeError, AttributeError) as e:  # a Triton without this warmup API: compile on first call
            self.warmup_error = f"{type(e).__name__}: {e}"

    def tables(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The layout tables on ``device``, uploaded once and cached."""
        key = str(torch.device(device))
        if key not in self._device_tables:
            self._device_tables[key] = {n: torch.from_numpy(a.copy()).to(device)
                                        for n, a in self._host_tables.items()}
        return self._device_tables[key]

    def _check(self, q, k, v, scale, out, lse) -> float:
        spec = self.spec
        check_kernel_call(spec, self.layout, q, k, v, out, lse, device_type="cpu" if self.interpret else "cuda")
        scale = default_scale(spec.head_dim) if scale is None else scale
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (0 < scale < math.inf):
            raise KernelInputError(f"scale must be a positive finite number, got {scale!r}")
        return float(scale)

    def launch_args(self, q, k, v, out, lse, scale: float, tables: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, object]:
        """``{parameter name: tensor or scalar}`` for one launch (tables on the inputs' device)."""
        args: dict[str, object] = {"q": q, "k": k, "v": v, "out": out, "scale": float(scale)}
        if self.spec.return_lse:
            args["lse"] = lse
        if "items" in self.param_names:
            args["items"] = work_items(self.spec, self.config, q.shape[0])
        args.update(tables if self.spec.dynamic else self.tables(q.device))
        return args

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                 out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                 tables: dict[str, torch.Tensor] | None = None):
        """Attention over the kernel's layout.

        Parameters
        ----------
        q, k, v:
            ``[B, H, Nq, D]`` and ``[B, H, Nkv, D]`` contiguous tensors of the spec's dtype and shape.
        scale:
            Softmax scale (default ``1/sqrt(D)``).
        out, lse:
            Optional outputs to write into (``lse`` only if the spec has ``return_lse``).
        tables:
            A dynamic kernel's tables (``key_num``/``key_idx`` or ``kv_num``/``kv_idx``, see
            :func:`check_dynamic_tables`); not allowed for a static one.

        Returns
        -------
        out, or ``(out, lse)`` when the spec has ``return_lse``.
        """
        scale = self._check(q, k, v, scale, out, lse)
        if self.spec.dynamic:
            check_dynamic_tables(self.spec, tables, q.device, check_values=self.interpret, batch=q.shape[0])
        elif tables is not None:
            raise KernelInputError("tables are given at call time to dynamic (CS4A) kernels only")
        out = torch.empty_like(q) if out is None else out
        if self.spec.return_lse and lse is None:
            lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        args = self.launch_args(q, k, v, out, lse, scale, tables)
        ordered = [args[n] for n in self.param_names]
        with _scratch_allocator(q.device, not self.interpret and _uses_tma(self.config)):
            launch_jit(self._fn, grid(self.spec, self.config, q.shape[0]), ordered, self.interpret, q.device,
                       self._launch_options())
        return (out, lse) if self.spec.return_lse else out


def launch_jit(fn, launch_grid, args, interpret: bool, device: torch.device, options: dict[str, Any]) -> None:
    """Launch a Triton JIT function of this process: in the interpreter (CPU tensors, no launch options), or
    compiled on ``device`` with ``options`` (``num_warps``, ``num_stages``, ...). Every Triton kernel kind's
    ``__call__`` goes through here."""
    launch = fn[launch_grid]
    if interpret:
        with _interpret_env(True):
            launch(*args)
    else:
        with torch.cuda.device(device):
            launch(*args, **options)


def dynamic_table_shapes(spec: KernelSpec, batch: int | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of a dynamic kernel's int32 tables at ``batch`` (default: the spec's): ``[B, H, rows]`` counts
    and ``[B, H, rows, capacity]`` indices, rows = query groups (gather kind) or query blocks (block kind) of
    ``spec.block_m`` queries."""
    rows = _ceil_div(spec.q_len, spec.block_m)
    b = spec.batch if batch is None else batch
    num, idx = ("key_num", "key_idx") if spec.kind == "gather" else ("kv_num", "kv_idx")
    return {num: (b, spec.heads, rows), idx: (b, spec.heads, rows, spec.capacity)}


def check_dynamic_tables(spec: KernelSpec, tables: dict[str, torch.Tensor] | None, device: torch.device,
                         check_values: bool = False, batch: int | None = None) -> None:
    """Raise :class:`KernelInputError` unless ``tables`` fit ``spec`` at ``batch``: int32, contiguous, on
    ``device``, with :func:`dynamic_table_shapes`. ``check_values`` also checks every count and index range (a
    host sync: for tests and the interpreter, not the GPU hot path, where the CS4A builders guarantee them)."""
    want = dynamic_table_shapes(spec, batch)
    if not isinstance(tables, dict) or set(tables) != set(want):
        got = sorted(tables) if isinstance(tables, dict) else type(tables).__name__
        raise KernelInputError(f"this dynamic kernel takes tables {sorted(want)}, got {got}")
    for name, shape in want.items():
        t = tables[name]
        if (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != torch.int32
                or t.device != device or not t.is_contiguous()):
            got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise KernelInputError(f"table {name} must be a contiguous int32 tensor of shape {shape} on {device}, "
                                   f"got {got}")
    if check_values:
        num_name, idx_name = sorted(want, key=lambda n: len(want[n]))
        num, idx = tables[num_name], tables[idx_name]
        limit = spec.kv_len if spec.kind == "gather" else _ceil_div(spec.kv_len, spec.block_n)
        if int(num.min()) < 0 or int(num.max()) > spec.capacity:
            raise KernelInputError(f"{num_name} must lie in [0, {spec.capacity}]")
        if int(idx.min()) < 0 or int(idx.max()) >= limit:
            raise KernelInputError(f"{idx_name} must lie in [0, {limit})")


def build(spec: KernelSpec, config: KernelConfig, layout: BlockLayout | None = None,
          interpret: bool | None = None) -> TritonKernel:
    """Render, import and wrap the kernel of ``spec``/``config`` over ``layout``; on a GPU also compile it.

    ``interpret=None`` uses Triton's interpreter (CPU tensors) when no CUDA device is available. Raises
    :class:`KernelConfigError` for a config that cannot run (before compiling, or Triton's out-of-resources
    report), :class:`LayoutError` for a layout that does not match the spec, :class:`InterpreterModeError` if
    Triton was imported in the other mode.
    """
    _check_spec(spec, layout)
    if interpret is None:
        interpret = not torch.cuda.is_available()
    validate_config(spec, config, gpu=None, check_resources=not interpret)
    return TritonKernel(spec, config, layout, bool(interpret))


def launch_args(layout: BlockLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor | None, scale: float | None, device: torch.device | str,
                spec: KernelSpec | None = None) -> dict[str, object]:
    """``{parameter name: tensor or scalar}`` for launching a compiled kernel over ``layout``.

    With ``spec``, exactly that kernel's parameters; without, every table any kind could need (the gather
    table only when the layout has token masks), so one dict serves whichever kernel is launched. Tables are
    uploaded to ``device``; ``scale`` None means ``1/sqrt(D)``.
    """
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    args: dict[str, object] = {"q": q, "k": k, "v": v, "out": out, "scale": scale}
    if lse is not None:
        args["lse"] = lse
    if spec is not None:
        _check_spec(spec, layout)
        specs = [spec]
    else:
        kinds = [("block", False), ("block", True)] if layout.has_token_masks or not layout.partial_indices.size \
            else [("block", False)]
        if layout.has_token_masks:
            kinds.append(("gather", False))
        specs = [KernelSpec("triton", kind, 1, 1, layout.q_len, layout.kv_len, 64, "fp32", layout.block_m,
                            layout.block_n, "", exact) for kind, exact in kinds]
    for s in specs:
        args.update({n: torch.from_numpy(a.copy()).to(device) for n, a in _host_tables(s, layout).items()})
    return args


# ---------------------------------------------------------------------------------------------- cubins
def _compile_in_process(path: str, name: str, signature: dict[str, str], arch: int, num_warps: int,
                        num_stages: int) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(_load_module(Path(path), interpret=False), name)
    attrs = {(i,): [["tt.divisibility", 16]] for i, ty in enumerate(signature.values()) if ty.startswith("*")}
    compiled = triton.compile(ASTSource(fn, signature, {}, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True})
    md = compiled.metadata
    return {"cubin": bytes(compiled.asm["cubin"]), "ptx": compiled.asm["ptx"], "name": md.name,
            "shared": int(md.shared or 0), "num_warps": int(md.num_warps),
            "global_scratch_size": int(getattr(md, "global_scratch_size", 0) or 0),
            "profile_scratch_size": int(getattr(md, "profile_scratch_size", 0) or 0),
            "triton_version": triton.__version__}


def _compile_worker() -> None:
    """Child-process entry of :func:`compile_for_target`: JSON job on stdin, results into the job's out_dir."""
    job = json.loads(sys.stdin.read())
    res = _compile_in_process(job["path"], job["name"], job["signature"], job["arch"], job["num_warps"],
                              job["num_stages"])
    out = Path(job["out_dir"])
    (out / "kernel.cubin").write_bytes(res.pop("cubin"))
    (out / "kernel.ptx").write_text(res.pop("ptx"))
    (out / "meta.json").write_text(json.dumps(res))


# The compile child's first lines, before it imports anything heavy: on Linux it asks the kernel to SIGKILL it
# when its parent dies (prctl PR_SET_PDEATHSIG = 1), then checks that the parent did not die before that took
# effect. Done in the child rather than in a preexec_fn, which is unsafe when the parent has threads.
_CHILD_PROLOGUE = """\
import os, signal, sys
if sys.platform.startswith("linux"):
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(3)
"""
_COMPILE_ENTRY = "from sparvar_compiler.codegen.triton_backend import _compile_worker\n_compile_worker()\n"
_COMPILE_DIR_PREFIX = "sparvar-triton-"
_COMPILE_DIR = re.compile(re.escape(_COMPILE_DIR_PREFIX) + r"(\d+)-")
_LOCK_NAME = ".owner.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _stale_compile_dir(path: Path, pid: int) -> bool:
    """A compile directory whose owner is gone: its lock (held by the owner for the directory's life) can be
    taken, or, before the owner created it, the PID in its name is not running."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return not _pid_alive(pid)
    try:
        fd = os.open(path / _LOCK_NAME, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return not _pid_alive(pid)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def clean_stale_compile_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the ``sparvar-triton-<pid>-*`` directories under ``root`` (default: the temp directory) that a
    SIGKILLed compile left behind: this user's, whose owning process is gone. Returns what was removed."""
    removed = []
    root = Path(root if root is not None else tempfile.gettempdir())
    try:
        entries = list(root.glob(_COMPILE_DIR_PREFIX + "*"))
    except OSError:
        return removed
    for path in entries:
        m = _COMPILE_DIR.match(path.name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            st = path.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        if _stale_compile_dir(path, int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _child_argv(code: str) -> list[str]:
    """The command that runs ``code`` in a Python child that dies with this process."""
    return [sys.executable, "-c", _CHILD_PROLOGUE + code, str(os.getpid())]


@contextlib.contextmanager
def _compile_dir():
    """A private temp directory ``sparvar-triton-<pid>-*`` holding a lock for as long as this process owns it
    (a SIGKILL releases the lock, so the next compile's :func:`clean_stale_compile_dirs` removes it)."""
    clean_stale_compile_dirs()
    tmp = tempfile.mkdtemp(prefix=f"{_COMPILE_DIR_PREFIX}{os.getpid()}-")
    fd = os.open(os.path.join(tmp, _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (ImportError, OSError):  # pragma: no cover - not POSIX: the PID in the name still serves
            pass
        yield tmp
    finally:
        os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


def _compile_in_child(job: dict[str, Any]) -> dict[str, Any]:
    """Compile in a fresh process (see the module docstring). The child dies with this process (Linux), and the
    temp directory it writes into is removed here, or by the next compile if this process is killed."""
    with _compile_dir() as tmp:
        env = dict(os.environ, TRITON_INTERPRET="0")
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        proc = subprocess.run(_child_argv(_COMPILE_ENTRY), input=json.dumps({**job, "out_dir": tmp}),
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise TritonCompileError(f"Triton failed to compile {job['name']} for sm_{job['arch']}:\n"
                                     f"{proc.stderr[-4000:]}")
        res = json.loads((Path(tmp) / "meta.json").read_text())
        res["cubin"] = (Path(tmp) / "kernel.cubin").read_bytes()
        res["ptx"] = (Path(tmp) / "kernel.ptx").read_text()
    return res


def _cuobjdump() -> str | None:
    try:
        from triton import knobs
        path = knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - older Triton or no knob: fall back to the bundled / PATH binary
        pass
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    return shutil.which("cuobjdump")


def resource_usage(cubin: bytes, entry: str) -> dict[str, int]:
    """Registers, stack/spill, local and static shared bytes of ``entry`` in ``cubin`` (``cuobjdump -res-usage``)."""
    tool = _cuobjdump()
    if tool is None:
        raise TritonCompileError("cuobjdump not found (neither bundled with Triton nor on PATH)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    block = text.split(f"Function {entry}:", 1)
    if len(block) != 2:
        raise TritonCompileError(f"cuobjdump reported no function {entry}:\n{text[-2000:]}")
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", block[1].split("Function ", 1)[0]))
    stack, local = int(fields.get("STACK", 0)), int(fields.get("LOCAL", 0))
    return {"registers": int(fields.get("REG", 0)), "spill_bytes": max(stack, local),
            "static_shared_bytes": int(fields.get("SHARED", 0)), "local_bytes": local}


def _ptx_params(ptx: str, entry: str) -> list[str]:
    m = re.search(r"\.entry\s+" + re.escape(entry) + r"\s*\(([^)]*)\)", ptx)
    if m is None:
        raise TritonCompileError(f"entry {entry} not found in the PTX")
    return re.findall(r"\.param\s+\.(\w+)", m.group(1))


def check_resources(kernel: CompiledKernel, gpu: GpuSpec) -> None:
    """Raise :class:`KernelConfigError` naming the resource if ``kernel`` cannot launch on ``gpu``."""
    threads = kernel.block[0] * kernel.block[1] * kernel.block[2]
    smem = kernel.shared_bytes
    if threads > 1024:
        raise KernelConfigError(f"threads: {threads} per block exceeds 1024")
    if smem > gpu.smem_per_block:
        raise KernelConfigError(f"shared memory: kernel needs {smem} bytes, {gpu.name} allows "
                                f"{gpu.smem_per_block} per block")
    regs = kernel.resources.get("registers", 0)
    if regs > gpu.max_regs_per_thread or regs * threads > gpu.regs_per_sm:
        raise KernelConfigError(f"registers: {regs} per thread x {threads} threads exceeds {gpu.name}'s "
                                f"{gpu.regs_per_sm} per multiprocessor")


def compile_for_target(spec: KernelSpec, config: KernelConfig, layout: BlockLayout | None,
                       gpu: GpuSpec) -> CompiledKernel:
    """Compile the kernel to a cubin for ``gpu`` without needing that GPU (or any GPU) present.

    Runs ``triton.compile`` in this process when Triton is imported here in compiled mode (or a CUDA device
    exists), else in a child process. Raises :class:`KernelConfigError` (naming the resource) if the config is
    invalid or the compiled kernel exceeds ``gpu``'s limits, :class:`TritonCompileError` if compilation fails.
    The 1 KB that cuobjdump reports as static shared memory on sm_90 is the driver's reserved area; like
    Triton's launcher, the limit check counts the dynamic shared memory.
    """
    _check_spec(spec, layout)
    validate_config(spec, config, gpu)
    axis = batch_axis(spec, config)
    launch_grid = grid(spec, config)
    scalars = {} if axis is not None else {"items": work_items(spec, config, 1)}
    return compile_source(render_source(spec, config, layout), kernel_name(spec), _signature(spec, config), config,
                          launch_grid, spec.to_dict(), gpu, batch=spec.batch,
                          batch_grid=None if axis is None else (axis, launch_grid[axis] // spec.batch),
                          batch_scalars=scalars)


def _compile_key(source: str, job: dict[str, Any]) -> str | None:
    """Key of a compile result: everything that decides the cubin (None where Triton's version is unknown)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        triton_version = version("triton")
    except PackageNotFoundError:
        return None
    what = {"format": 1, "triton": triton_version, "source": hashlib.sha256(source.encode()).hexdigest(),
            **{k: job[k] for k in ("name", "signature", "arch", "num_warps", "num_stages")}}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _compile_cache() -> Path:
    return cache_dir() / "cubins"


def _cached_compile(source: str, job: dict[str, Any]) -> dict[str, Any] | None:
    """A cubin compiled earlier from the same source, signature, arch, options and Triton version (the second
    emit of a module, or a module set's members sharing a kernel, compiles nothing). ``SPARVAR_COMPILE_CACHE=0``
    turns the cache off."""
    key = _compile_key(source, job)
    if key is None or os.environ.get("SPARVAR_COMPILE_CACHE", "1") == "0":
        return None
    d = _compile_cache()
    try:
        meta = json.loads((d / f"{key}.json").read_text())
        cubin = (d / f"{key}.cubin").read_bytes()
        ptx = (d / f"{key}.ptx").read_text()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("cubin_sha256") != hashlib.sha256(cubin).hexdigest():
        return None  # a damaged entry: compile again (and overwrite it)
    return {**{k: v for k, v in meta.items() if k != "cubin_sha256"}, "cubin": cubin, "ptx": ptx}


def _store_compile(source: str, job: dict[str, Any], res: dict[str, Any]) -> None:
    key = _compile_key(source, job)
    if key is None or os.environ.get("SPARVAR_COMPILE_CACHE", "1") == "0":
        return
    d = _compile_cache()
    try:
        d.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in res.items() if k not in ("cubin", "ptx")}
        meta["cubin_sha256"] = hashlib.sha256(res["cubin"]).hexdigest()
        for suffix, data in (("cubin", res["cubin"]), ("ptx", res["ptx"].encode()),
                             ("json", json.dumps(meta).encode())):  # the json last: it marks a whole entry
            fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, d / f"{key}.{suffix}")
    except OSError:
        pass  # a read-only cache directory only costs compile time


def compile_source(source: str, name: str, signature: dict[str, str], config: KernelConfig,
                   launch_grid: tuple[int, int, int], spec: dict[str, Any], gpu: GpuSpec, batch: int = 1,
                   batch_grid: tuple[int, int] | None = None,
                   batch_scalars: dict[str, int] | None = None) -> CompiledKernel:
    """Compile a rendered Triton kernel ``name`` to a :class:`CompiledKernel` for ``gpu`` (shared by every
    Triton kernel kind): parameters in ``signature`` order plus the scratch buffers the compiler added, the
    compiler's resource report, and the launch limits checked against ``gpu``. ``launch_grid`` is for
    ``batch``; ``batch_grid`` and ``batch_scalars`` say how a launch scales with another batch
    (:class:`~sparvar_compiler.codegen.artifact.CompiledKernel`)."""
    path = _write_source(source)
    major, minor = gpu.capability
    job = {"path": str(path), "name": name, "signature": signature, "arch": major * 10 + minor,
           "num_warps": config.num_warps, "num_stages": config.num_stages}
    res = _cached_compile(source, job)
    if res is None:
        mode = _triton_mode()
        if mode == "compiled" or (mode is None and torch.cuda.is_available()):
            try:
                res = _compile_in_process(**job)
            except Exception as e:  # noqa: BLE001 - surface any compiler failure as one error type
                raise TritonCompileError(f"Triton failed to compile {job['name']} for {gpu.arch}: "
                                         f"{type(e).__name__}: {e}") from e
        else:
            res = _compile_in_child(job)
        _store_compile(source, job, res)
    names = list(signature)
    ptx_types = _ptx_params(res["ptx"], res["name"])
    if len(ptx_types) < len(names):
        raise TritonCompileError(f"{res['name']} has {len(ptx_types)} PTX parameters, expected at least "
                                 f"{len(names)} ({names})")
    programs = launch_grid[0] * launch_grid[1] * launch_grid[2]
    kinds = {"fp32": "f32", "i32": "i32", "i64": "i64"}
    params = [KernelParam(n, "ptr" if signature[n].startswith("*") else kinds[signature[n]]) for n in names]
    scratch = [("global_scratch", res["global_scratch_size"]), ("profile_scratch", res["profile_scratch_size"])]
    for i in range(len(ptx_types) - len(names)):
        sname, size = scratch[i] if i < len(scratch) else (f"scratch{i}", 0)
        params.append(KernelParam(sname, "scratch", size * programs))
    arch = f"sm_{major}{minor}{'a' if major >= 9 else ''}"
    kernel = CompiledKernel(
        backend="triton", arch=arch, entry=res["name"], binary=res["cubin"], binary_format="cubin",
        params=tuple(params), grid=launch_grid, block=(res["num_warps"] * 32, 1, 1), shared_bytes=res["shared"],
        resources=resource_usage(res["cubin"], res["name"]),
        spec=spec, config=config.to_dict(), batch=batch, batch_grid=batch_grid,
        batch_scalars=tuple(sorted((batch_scalars or {}).items())))
    check_resources(kernel, gpu)
    return kernel
