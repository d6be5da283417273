"""TVM backend: block-sparse attention forward written in TVM's TIRx dialect (apache-tvm 0.27).

Three templates compute the same thing, ``out = softmax(scale * q k^T restricted to the layout) v``:

* ``"cuda"``: tensor cores through ``T.ptx``, in one of two templates chosen by the config's ``mma``:
  ``"mma_sync"`` (``block_sparse_attention_cuda.py.jinja``; sm_80 and newer): mma.sync m16n8k16 (bf16/fp16 in,
  fp32 accumulate), ldmatrix, cp.async multi-stage prefetch, in the FlashAttention-2 structure; ``"wgmma"``
  (``block_sparse_attention_wgmma.py.jinja``; sm_90a only): Hopper warpgroup MMA with Q and K read from shared
  memory through 128-byte-swizzle descriptors, P from registers and V through an MN-major descriptor.
  :func:`compile_for_target` lowers either with ``tvm.compile(..., tir_pipeline="tirx")``, compiles the CUDA
  source TVM emits to a cubin with ``nvcc`` for the named GPU (no GPU needed) and returns a
  :class:`CompiledKernel` that ``sparvar_compiler.runtime.cubin`` runs through the driver API alone (the GPU
  host needs no TVM). ``python -m sparvar_compiler.codegen.tvm_backend bundle --out DIR`` compiles the
  benchmark's shapes into such a directory; ``... verify DIR`` checks and times it on a GPU.
* ``"llvm"`` (``templates/tvm/block_sparse_attention_llvm.py.jinja``): the same layout walk and log2-domain
  online softmax in scalar loops, run in-process by :func:`build` through TVM's CPU runtime. It tests the
  templates and the rendering machinery on machines without a GPU.

Semantics (shared with the Triton backend): q ``[B, H, Nq, D]``, k and v ``[B, H, Nkv, D]``, contiguous, D 64 or
128; out ``[B, H, Nq, D]`` in the inputs' dtype; optional lse ``[B, H, Nq]`` float32, the natural log of the
softmax denominator including the row maximum (``-inf`` for a query block with no kv block, whose output is 0).
``scale`` is a runtime float (default ``1/sqrt(D)``) and must be positive. One layout serves every batch element
and head; every active block is computed whole (``token_exact=False``, SparVAR's default; token-exact and
key-gather kernels exist only in the Triton backend). Dtypes: bf16 and fp16 on CUDA; fp32, bf16 and fp16 on llvm.

Kernel parameters, by name (the contract with the cubin launcher, which binds them by name)::

    q, k, v, out   pointers to the tensors above
    lse            pointer, only when ``spec.return_lse``
    kv_num         int32 [q_blocks]: active kv blocks per query block (``BlockLayout.tables("active")``)
    kv_idx         int32 [q_blocks, kv_blocks]: their indices, padded to the spec's full width
    scale          float32

A cubin takes them in the order of the signature TVM generates, which is alphabetical by buffer name with the
scalar last (``k, kv_idx, kv_num, lse, out, q, v, scale``); :func:`compile_for_target` reads that order from the
generated source into ``CompiledKernel.params`` rather than assuming it. The grid is ``(query tiles, B*H, 1)``
(query tiles vary fastest, so neighbouring CTAs share one head's K/V in L2); a CTA has ``32 * num_warps``
threads and ``shared_bytes`` of dynamic shared memory.

Tuning knobs (``KernelConfig``, CUDA only; the llvm kernel ignores them): ``num_warps``, ``num_stages`` (cp.async
pipeline depth; 1 = no prefetch) and extras ``block_m`` / ``block_n``: the kernel tile, each dividing the
layout's block so a layout block can be walked in sub-tiles; ``q_in_regs`` (default True): keep the Q fragments
in registers for the whole kv loop, or re-read them from shared memory per kv tile (fewer registers, which lets
a warp own 32 rows and so halves shared-memory traffic per FLOP). A warp owns ``block_m / num_warps`` query
rows, 16 or 32; ``mma``: ``"mma_sync"`` (default) or ``"wgmma"`` (Hopper; ``num_warps = block_m / 16``, one
warpgroup per 64 rows); ``overlap`` (wgmma only, default False): issue each tile's P V after the next tile's
Q K^T so it runs during that tile's softmax (FlashAttention-3's intra-warpgroup pipelining; prefetch distance
drops to ``num_stages - 2``, so use 3 stages).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LayoutError
from ..planner.gpus import GpuSpec
from ..planner.layout import BlockLayout
from .artifact import CompiledKernel, KernelParam
from .render import render
from .spec import (KernelConfig, KernelConfigError, KernelInputError, KernelSpec, check_attention_inputs,
                   check_config_types, check_kernel_call, check_lse, default_scale)

TARGETS = ("llvm", "cuda")
TARGET_DTYPES = {"cuda": ("bf16", "fp16"), "llvm": ("fp32", "bf16", "fp16")}
TILE_SIZES = (16, 32, 64, 128)
WARPS = (1, 2, 4, 8)
STAGES = (1, 2, 3, 4)
CONFIG_EXTRAS = ("block_m", "block_n", "q_in_regs", "mma", "overlap")
MMAS = ("mma_sync", "wgmma")
#: The type of every knob besides num_warps/num_stages (ints): what :func:`validate_config` holds a config to.
CONFIG_TYPES = {"block_m": int, "block_n": int, "q_in_regs": bool, "mma": MMAS, "overlap": bool}
MAX_M_TILES = 2  # m16 tiles per warp; more cannot hold their accumulators in 255 registers
_TEMPLATES = {"cuda": "tvm/block_sparse_attention_cuda.py.jinja", "llvm": "tvm/block_sparse_attention_llvm.py.jinja",
              "wgmma": "tvm/block_sparse_attention_wgmma.py.jinja"}
_TVM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_PTX_DTYPES = {"bf16": "bf16", "fp16": "f16"}
_ELEMENT_BYTES = 2  # the CUDA kernel is bf16/fp16 only
# Registers the CUDA kernel needs besides its fragment arrays (addresses, softmax state, loop state); measured
# with ptxas 13.0 on the default 64x64 tile, D=128 (170 registers for 128 array registers).
_REGISTER_OVERHEAD = 42


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------- spec and config
def _check_spec(spec: KernelSpec, target: str, layout: BlockLayout | None = None) -> None:
    if target not in TARGETS:
        raise KernelConfigError(f"target must be one of {TARGETS}, got {target!r}")
    if spec.backend != "tvm":
        raise KernelConfigError(f"spec is for backend {spec.backend!r}, not tvm")
    if spec.kind != "block":
        raise KernelConfigError(f"the TVM backend builds block kernels only, not {spec.kind!r} (see triton_backend)")
    if spec.token_exact:
        raise KernelConfigError("the TVM backend computes active blocks whole; token_exact=True kernels are built "
                                "by the Triton backend")
    if spec.dtype not in TARGET_DTYPES[target]:
        raise KernelConfigError(f"dtype {spec.dtype!r} is not supported on {target}; supported: "
                                f"{', '.join(TARGET_DTYPES[target])}")
    if spec.head_dim not in (64, 128):
        raise KernelConfigError(f"head_dim must be 64 or 128, got {spec.head_dim}")
    if min(spec.batch, spec.heads, spec.q_len, spec.kv_len) <= 0:
        raise KernelConfigError("batch, heads, q_len and kv_len must be positive")
    if layout is not None:
        if (layout.q_len, layout.kv_len, layout.block_m, layout.block_n) != (
                spec.q_len, spec.kv_len, spec.block_m, spec.block_n):
            raise LayoutError(f"layout is {layout.q_len}x{layout.kv_len} in {layout.block_m}x{layout.block_n} "
                              f"blocks, the spec wants {spec.q_len}x{spec.kv_len} in "
                              f"{spec.block_m}x{spec.block_n} blocks")
        if spec.layout_hash and layout.content_hash() != spec.layout_hash:
            raise LayoutError(f"layout hash {layout.content_hash()[:12]} does not match the spec's "
                              f"{spec.layout_hash[:12]}")


def tiles(spec: KernelSpec, config: KernelConfig) -> tuple[int, int]:
    """The kernel tile ``(block_m, block_n)`` of ``config`` (defaults: the layout block, at most 64)."""
    return (int(config.get("block_m", min(spec.block_m, 64))), int(config.get("block_n", min(spec.block_n, 64))))


def grid(spec: KernelSpec, config: KernelConfig) -> tuple[int, int, int]:
    """Launch grid of the CUDA kernel: ``(query tiles, B*H, 1)``."""
    tile_m, _ = tiles(spec, config)
    return (_ceil_div(spec.q_len, spec.block_m) * (spec.block_m // tile_m), spec.batch * spec.heads, 1)


def shared_bytes(spec: KernelSpec, config: KernelConfig) -> int:
    """Dynamic shared memory of the CUDA kernel: the Q tile plus ``num_stages`` K and V tiles."""
    tile_m, tile_n = tiles(spec, config)
    return (tile_m + 2 * config.num_stages * tile_n) * spec.head_dim * _ELEMENT_BYTES


def mma_kind(config: KernelConfig) -> str:
    """``"mma_sync"`` (default; sm_80 and newer) or ``"wgmma"`` (Hopper warpgroup MMA, sm_90a)."""
    return str(config.get("mma", "mma_sync"))


def overlap(config: KernelConfig) -> bool:
    """Whether a wgmma kernel overlaps one tile's P V with the next tile's Q K^T and softmax."""
    return bool(config.get("overlap", False))


def q_in_regs(config: KernelConfig) -> bool:
    """Whether the CUDA kernel keeps all Q fragments in registers (default) or re-reads them per kv tile."""
    return bool(config.get("q_in_regs", True))


def estimated_registers(spec: KernelSpec, config: KernelConfig) -> int:
    """Registers per thread the CUDA kernel is expected to need (ptxas has the last word)."""
    tile_m, tile_n = tiles(spec, config)
    if mma_kind(config) == "wgmma":  # no operand fragments: Q, K and V are read from shared memory
        return tile_n // 2 + spec.head_dim // 2 + 6 + _REGISTER_OVERHEAD
    m_tiles = max(1, tile_m // (16 * config.num_warps))
    q_frags = spec.head_dim // 16 * 4 if q_in_regs(config) else 4
    arrays = m_tiles * (spec.head_dim // 8 * 4 + tile_n // 8 * 4 + q_frags + 4)
    return arrays + _REGISTER_OVERHEAD


def validate_config(spec: KernelSpec, config: KernelConfig, gpu: GpuSpec | None = None) -> None:
    """Raise :class:`KernelConfigError` for a config the CUDA kernel cannot run, before compiling.

    Knob names and exact types (:data:`CONFIG_TYPES`) and structure (tile divisibility, rows per warp, copy
    split) are always checked; with ``gpu`` also dynamic shared memory against ``gpu.smem_per_block`` and the
    estimated registers against ``gpu.max_regs_per_thread``.
    """
    check_config_types(config, CONFIG_TYPES, "TVM")
    tile_m, tile_n = tiles(spec, config)
    w, st = config.num_warps, config.num_stages
    if w not in WARPS:
        raise KernelConfigError(f"num_warps must be one of {WARPS}, got {w}")
    if st not in STAGES:
        raise KernelConfigError(f"num_stages must be one of {STAGES}, got {st}")
    if not isinstance(config.get("q_in_regs", True), bool):
        raise KernelConfigError(f"q_in_regs must be a bool, got {config.get('q_in_regs')!r}")
    if mma_kind(config) not in MMAS:
        raise KernelConfigError(f"mma must be one of {MMAS}, got {mma_kind(config)!r}")
    if mma_kind(config) == "wgmma":
        if tile_m != 16 * w or w % 4:
            raise KernelConfigError(f"wgmma kernels give each warpgroup 64 rows: block_m must be 16 * num_warps "
                                    f"with num_warps a multiple of 4, got block_m={tile_m}, num_warps={w}")
        if not q_in_regs(config):
            raise KernelConfigError("q_in_regs=False applies to mma_sync kernels only (wgmma reads Q from shared)")
        if gpu is not None and gpu.capability != (9, 0):
            raise KernelConfigError(f"wgmma needs an sm_90 GPU, {gpu.name} is {gpu.arch}")
    if not isinstance(config.get("overlap", False), bool):
        raise KernelConfigError(f"overlap must be a bool, got {config.get('overlap')!r}")
    if overlap(config) and (mma_kind(config) != "wgmma" or st < 2):
        raise KernelConfigError("overlap applies to wgmma kernels with num_stages >= 2 (the previous tile's V "
                                "stays resident while the next tile computes)")
    for name, tile, block in (("block_m", tile_m, spec.block_m), ("block_n", tile_n, spec.block_n)):
        if tile not in TILE_SIZES or block % tile:
            raise KernelConfigError(f"{name}={tile} must be one of {TILE_SIZES} and divide the layout's "
                                    f"{name}={block}")
    if tile_m % (16 * w) or tile_m // (16 * w) > MAX_M_TILES:
        raise KernelConfigError(f"block_m={tile_m} over {w} warps must give each warp 16 to {16 * MAX_M_TILES} "
                                f"rows in steps of 16")
    chunks = spec.head_dim // 8
    for name, rows in (("block_m", tile_m), ("block_n", tile_n)):
        if rows * chunks % (32 * w):
            raise KernelConfigError(f"a {rows}x{spec.head_dim} tile ({rows * chunks} 16-byte copies) does not "
                                    f"split over {32 * w} threads; use fewer warps or a larger {name}")
    if gpu is not None:
        smem = shared_bytes(spec, config)
        if smem > gpu.smem_per_block:
            raise KernelConfigError(f"shared memory: {smem} bytes exceed the {gpu.smem_per_block} bytes a block "
                                    f"may use on {gpu.name}")
        regs = estimated_registers(spec, config)
        if regs > gpu.max_regs_per_thread:
            raise KernelConfigError(f"registers: about {regs} per thread needed, {gpu.name} allows "
                                    f"{gpu.max_regs_per_thread}")


def _config(tile_m: int, tile_n: int, warps: int, stages: int, q_regs: bool = True,
            mma: str = "mma_sync", overlapped: bool = False) -> KernelConfig:
    extra: tuple = (("block_m", tile_m), ("block_n", tile_n))
    extra += () if q_regs else (("q_in_regs", False),)
    extra += () if mma == "mma_sync" else (("mma", mma),)
    extra += (("overlap", True),) if overlapped else ()
    return KernelConfig(warps, stages, extra)


def default_config(spec: KernelSpec, gpu: GpuSpec | None = None) -> KernelConfig:
    """64x64 tiles (or the layout block if smaller), one warp per 16 query rows, 2-stage prefetch."""
    tile_m, tile_n = min(spec.block_m, 64), min(spec.block_n, 64)
    return _config(tile_m, tile_n, tile_m // 16, 2)


def search_space(spec: KernelSpec, gpu: GpuSpec | None = None) -> list[KernelConfig]:
    """Valid CUDA configs for ``spec`` (checked with :func:`validate_config` against ``gpu`` when given)."""
    out = []
    for tile_m in TILE_SIZES:
        for tile_n in TILE_SIZES:
            if tile_m < 32 and spec.block_m > 16 or tile_n < 32 and spec.block_n > 16:
                continue  # tiny tiles only where the layout's blocks are tiny
            for warps in WARPS:
                for stages in (2, 3):
                    for q_regs in (True, False):
                        cfg = _config(tile_m, tile_n, warps, stages, q_regs)
                        if not q_regs and tile_m == 16 * warps:
                            continue  # one m tile per warp: Q fits in registers, re-reading it only costs
                        try:
                            validate_config(spec, cfg, gpu)
                        except KernelConfigError:
                            continue
                        out.append(cfg)
                    for overlapped in (False, True):
                        wgmma = _config(tile_m, tile_n, warps, stages, mma="wgmma", overlapped=overlapped)
                        try:
                            validate_config(spec, wgmma, gpu)
                        except KernelConfigError:
                            continue
                        out.append(wgmma)
    return out


# ---------------------------------------------------------------------------------------------- rendering
def kernel_name(spec: KernelSpec, config: KernelConfig, target: str) -> str:
    """The prim_func's global symbol (CUDA appends ``_kernel`` to it for the device function)."""
    if target == "llvm":
        return f"sparvar_tvm_attention_d{spec.head_dim}_{spec.dtype}"
    tile_m, tile_n = tiles(spec, config)
    suffix = ("_wgmma" if mma_kind(config) == "wgmma" else "") + ("" if q_in_regs(config) else "_qs") + (
        "_ov" if overlap(config) else "")
    return (f"sparvar_tvm_attention_d{spec.head_dim}_{spec.dtype}_t{tile_m}x{tile_n}_w{config.num_warps}"
            f"_s{config.num_stages}{suffix}")


def render_source(spec: KernelSpec, config: KernelConfig, target: str) -> str:
    """The TVMScript module of ``spec``/``config`` for ``target`` (``"cuda"`` or ``"llvm"``), rendered strictly."""
    _check_spec(spec, target)
    validate_config(spec, config)
    tile_m, tile_n = tiles(spec, config)
    params = dict(
        entry=kernel_name(spec, config, target), spec_json=json.dumps(spec.to_dict(), sort_keys=True),
        batch=spec.batch, heads=spec.heads, q_len=spec.q_len, kv_len=spec.kv_len, head_dim=spec.head_dim,
        block_m=spec.block_m, block_n=spec.block_n, q_blocks=_ceil_div(spec.q_len, spec.block_m),
        lut_width=_ceil_div(spec.kv_len, spec.block_n), tvm_dtype=_TVM_DTYPES[spec.dtype],
        return_lse=spec.return_lse, even_n=spec.kv_len % spec.block_n == 0)
    if target == "llvm":
        params.update(even_m=spec.q_len % spec.block_m == 0)
    else:
        params.update(config_json=json.dumps(config.to_dict(), sort_keys=True), tile_m=tile_m, tile_n=tile_n,
                      num_warps=config.num_warps, stages=config.num_stages, ptx_dtype=_PTX_DTYPES[spec.dtype],
                      q_in_regs=q_in_regs(config), warpgroups=config.num_warps // 4, overlap=overlap(config),
                      even_m=spec.q_len % tile_m == 0)
        if mma_kind(config) == "wgmma":
            return render(_TEMPLATES["wgmma"], **params)
    return render(_TEMPLATES[target], **params)


def cache_dir() -> Path:
    """Where rendered modules and cubins live: ``$SPARVAR_CACHE_DIR/tvm`` (default ``~/.cache/sparvar``)."""
    root = os.environ.get("SPARVAR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sparvar")
    path = Path(root) / "tvm"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


_module_lock = threading.Lock()


def _prim_func(source: str, entry: str):
    """Import the rendered module from a file (TVMScript parses a function from its source file)."""
    sha = hashlib.sha256(source.encode()).hexdigest()[:24]
    path = cache_dir() / f"{sha}.py"
    with _module_lock:
        if not path.exists() or path.read_text() != source:
            _atomic_write(path, source.encode())
        name = f"sparvar_tvm_{sha}"
        module = sys.modules.get(name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
            sys.modules[name] = module
    return getattr(module, entry)


# ---------------------------------------------------------------------------------------------- layout tables
def layout_tables(layout: BlockLayout) -> dict[str, np.ndarray]:
    """``kv_num`` [q_blocks] and ``kv_idx`` [q_blocks, kv_blocks] int32 (padding repeats a row's last index)."""
    num, idx = layout.tables("active")
    full = np.empty((layout.q_blocks, layout.kv_blocks), dtype=np.int32)
    full[:, : idx.shape[1]] = idx
    full[:, idx.shape[1]:] = idx[:, -1:]
    return {"kv_num": num.astype(np.int32), "kv_idx": full}


_table_cache: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
_table_lock = threading.Lock()


def _device_tables(layout: BlockLayout, device: torch.device | str) -> dict[str, torch.Tensor]:
    key = (layout.content_hash(), str(torch.device(device)))
    with _table_lock:
        if key not in _table_cache:
            if len(_table_cache) > 64:
                _table_cache.clear()
            _table_cache[key] = {n: torch.from_numpy(a).to(device) for n, a in layout_tables(layout).items()}
        return _table_cache[key]


def _check_scale(scale: float | None, head_dim: int) -> float:
    scale = default_scale(head_dim) if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise KernelInputError(f"scale must be a positive finite number, got {scale!r}")
    return float(scale)


def launch_args(layout: BlockLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor | None, scale: float | None,
                device: torch.device | str | None = None) -> dict[str, object]:
    """``{parameter name: tensor or scalar}`` binding every parameter of a compiled TVM kernel over ``layout``.

    Tables are uploaded to ``device`` (default: q's) once per layout and cached. ``lse`` is included when given
    (pass it exactly when the kernel was compiled with ``return_lse``). Inputs are checked as by the in-process
    kernel; ``scale`` None means ``1/sqrt(D)``. Needs no TVM.
    """
    check_attention_inputs(q, k, v, layout, out)
    if out is None:
        raise KernelInputError("out must be given: the launcher writes into it")
    if lse is not None:
        check_lse(lse, q)
    args: dict[str, object] = {"q": q, "k": k, "v": v, "out": out,
                               "scale": _check_scale(scale, q.shape[-1])}
    if lse is not None:
        args["lse"] = lse
    args.update(_device_tables(layout, q.device if device is None else device))
    return args


# ---------------------------------------------------------------------------------------------- in-process (llvm)
class TvmKernel:
    """A kernel for one spec and layout, run in this process through TVM's CPU runtime.

    Attributes
    ----------
    spec, config, layout, target:
        What it computes, for which target (``"llvm"``).
    source:
        The rendered TVMScript module.
    """

    def __init__(self, spec: KernelSpec, config: KernelConfig, layout: BlockLayout, target: str, func: Any,
                 source: str):
        self.spec, self.config, self.layout, self.target = spec, config, layout, target
        self.source = source
        self._func = func
        tables = layout_tables(layout)
        self._kv_num = torch.from_numpy(tables["kv_num"])
        self._kv_idx = torch.from_numpy(tables["kv_idx"])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                 out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
        """Attention over the kernel's layout.

        Parameters
        ----------
        q, k, v:
            ``[B, H, Nq, D]`` and ``[B, H, Nkv, D]`` contiguous CPU tensors of the spec's dtype and shape.
        scale:
            Softmax scale, positive (default ``1/sqrt(D)``).
        out, lse:
            Optional outputs to write into (``lse`` only if the spec has ``return_lse``).

        Returns
        -------
        out, or ``(out, lse)`` when the spec has ``return_lse``.
        """
        spec = self.spec
        check_kernel_call(spec, self.layout, q, k, v, out, lse, device_type="cpu")
        if q.shape[0] != spec.batch:  # the CPU (llvm) build fixes the batch in its buffer shapes; cubins do not
            raise KernelInputError(f"q must have shape {(spec.batch, *q.shape[1:])}: this in-process TVM kernel "
                                   f"was built for batch {spec.batch} (its cubin runs any batch), got batch "
                                   f"{q.shape[0]}")
        scale = _check_scale(scale, spec.head_dim)
        out = torch.empty_like(q) if out is None else out
        args = [q, k, v, out]
        if spec.return_lse:
            lse = torch.empty(tuple(q.shape[:3]), dtype=torch.float32) if lse is None else lse
            args.append(lse)
        self._func(*args, self._kv_num, self._kv_idx, scale)
        return (out, lse) if spec.return_lse else out


_build_cache: dict[tuple[str, str, str], Any] = {}


def build(spec: KernelSpec, config: KernelConfig, layout: BlockLayout, target: str = "llvm") -> TvmKernel:
    """Render, lower and wrap the kernel of ``spec`` over ``layout`` for in-process use.

    Only ``target="llvm"`` runs in-process (CUDA kernels are built by :func:`compile_for_target` and launched
    through ``sparvar_compiler.runtime.cubin``, since GPU hosts need not have TVM). Compiled functions are cached
    per (spec, config, target) for the life of the process. Raises :class:`KernelConfigError` for an unsupported
    spec or config and :class:`LayoutError` for a layout that does not match the spec.
    """
    if target != "llvm":
        raise KernelConfigError(f"build() runs kernels in-process on llvm only, got target {target!r}; use "
                                f"compile_for_target() for CUDA")
    _check_spec(spec, target, layout)
    validate_config(spec, config)
    source = render_source(spec, config, target)
    entry = kernel_name(spec, config, target)
    key = (spec.key(), json.dumps(config.to_dict(), sort_keys=True), target)
    if key not in _build_cache:
        import tvm

        func = _prim_func(source, entry)
        _build_cache[key] = tvm.compile(tvm.IRModule({entry: func}), target="llvm")[entry]
    return TvmKernel(spec, config, layout, target, _build_cache[key], source)


# ---------------------------------------------------------------------------------------------- CUDA cubins
_SIGNATURE = re.compile(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (\w+)\(([^)]*)\)\s*[;{]')
_C_KINDS = {"float": "f32", "int": "i32", "int32_t": "i32", "long long": "i64", "int64_t": "i64"}


def cuda_source(spec: KernelSpec, config: KernelConfig, layout: BlockLayout | None = None,
                arch: str | None = None) -> str:
    """The CUDA C that TVM generates for ``spec``/``config`` (for inspection; ``layout`` is only checked).

    ``arch`` defaults to ``sm_90a`` for wgmma configs and ``sm_90`` otherwise.
    """
    _check_spec(spec, "cuda", layout)
    validate_config(spec, config)
    import tvm

    arch = arch or ("sm_90a" if mma_kind(config) == "wgmma" else "sm_90")

    entry = kernel_name(spec, config, "cuda")
    func = _prim_func(render_source(spec, config, "cuda"), entry)
    ex = tvm.compile(tvm.IRModule({entry: func}), target={"kind": "cuda", "arch": arch}, tir_pipeline="tirx")
    for mod in ex.mod.imports:
        if mod.kind == "cuda":
            return mod.inspect_source()
    raise RuntimeError("TVM produced no CUDA module")  # pragma: no cover - TVM contract


def kernel_signature(source: str) -> tuple[str, int, list[KernelParam]]:
    """``(entry, threads, params)`` of the ``__global__`` function in TVM's CUDA source, in signature order.

    TVM names a buffer parameter ``<buffer>_ptr``; the suffix is dropped so params carry the buffer names.
    """
    m = _SIGNATURE.search(source)
    if m is None:
        raise RuntimeError("no __global__ kernel signature found in the generated CUDA source")
    params = []
    for decl in m.group(3).split(","):
        decl = decl.strip()
        name = decl.split()[-1].lstrip("*")
        if "*" in decl:
            params.append(KernelParam(name.removesuffix("_ptr"), "ptr"))
            continue
        ctype = " ".join(decl.split()[:-1])
        if ctype not in _C_KINDS:
            raise RuntimeError(f"kernel parameter {decl!r} has a type the launcher cannot bind")
        params.append(KernelParam(name, _C_KINDS[ctype]))
    return m.group(2), int(m.group(1)), params


def parse_ptxas_report(text: str, entry: str) -> dict[str, int]:
    """Registers, spills, stack and static shared memory of ``entry`` from ``nvcc -Xptxas -v`` output."""
    section = text
    marker = f"Compiling entry function '{entry}'"
    if marker in text:
        section = text[text.index(marker):]
    def grab(pattern: str) -> int:
        found = re.search(pattern, section)
        return int(found.group(1)) if found else 0
    regs = re.search(r"Used (\d+) registers", section)
    if regs is None:
        raise RuntimeError(f"no register count for {entry} in the ptxas report:\n{text}")
    return {"registers": int(regs.group(1)), "spill_bytes": grab(r"(\d+) bytes spill stores"),
            "spill_load_bytes": grab(r"(\d+) bytes spill loads"), "local_bytes": grab(r"(\d+) bytes stack frame"),
            "static_shared_bytes": grab(r"(\d+) bytes smem")}


def check_resources(resources: dict[str, int], shared: int, threads: int, gpu: GpuSpec) -> None:
    """Raise :class:`KernelConfigError` naming the resource when a compiled kernel does not fit ``gpu``.

    A kernel that spills registers is rejected too: ptxas caps a thread at 255 registers and spills the rest,
    so a spill means the config needs more registers than the GPU has.
    """
    if resources["registers"] > gpu.max_regs_per_thread or resources["spill_bytes"] > 0:
        raise KernelConfigError(f"registers: {resources['registers']} per thread with {resources['spill_bytes']} "
                                f"bytes spilled; {gpu.name} allows {gpu.max_regs_per_thread} without spilling")
    if resources["registers"] * threads > gpu.regs_per_sm:
        raise KernelConfigError(f"registers: {resources['registers']} x {threads} threads exceed the "
                                f"{gpu.regs_per_sm} of one multiprocessor of {gpu.name}")
    total = shared + resources["static_shared_bytes"]
    if total > gpu.smem_per_block:
        raise KernelConfigError(f"shared memory: {total} bytes exceed the {gpu.smem_per_block} bytes a block may "
                                f"use on {gpu.name}")


def _nvcc() -> str:
    path = shutil.which("nvcc")
    if path is None:
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        candidate = Path(home, "bin", "nvcc") if home else None
        if candidate is None or not candidate.exists():
            raise RuntimeError("nvcc not found on PATH or under $CUDA_HOME/bin: compiling TVM kernels to cubins "
                               "needs the CUDA toolkit (no GPU)")
        path = str(candidate)
    return path


def _arch_flags(arch: str) -> list[str]:
    digits = arch.removeprefix("sm_")
    return ["-gencode", f"arch=compute_{digits},code=sm_{digits}"]


def _nvcc_compile(source: str, arch: str, entry: str) -> tuple[bytes, dict[str, int]]:
    """Compile to a cubin (cached on disk by source, arch and nvcc version) and return it with its report."""
    nvcc = _nvcc()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    flags = ["-cubin", "-O3", "-std=c++17", "-w", "-Xptxas", "-v", *_arch_flags(arch)]
    key = hashlib.sha256(json.dumps([source, arch, version, flags]).encode()).hexdigest()[:32]
    cubin_path, report_path = cache_dir() / f"{key}.cubin", cache_dir() / f"{key}.json"
    if cubin_path.exists() and report_path.exists():
        return cubin_path.read_bytes(), json.loads(report_path.read_text())
    with tempfile.TemporaryDirectory(prefix="sparvar-tvm-") as tmp:
        src, out = Path(tmp, "kernel.cu"), Path(tmp, "kernel.cubin")
        src.write_text(source)
        proc = subprocess.run([nvcc, *flags, "-o", str(out), str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed for {entry} ({arch}):\n{proc.stderr[-4000:]}")
        binary = out.read_bytes()
    report = parse_ptxas_report(proc.stdout + proc.stderr, entry)
    _atomic_write(cubin_path, binary)
    _atomic_write(report_path, json.dumps(report).encode())
    return binary, report


def compile_for_target(spec: KernelSpec, config: KernelConfig, layout: BlockLayout | None,
                       gpu: GpuSpec) -> CompiledKernel:
    """Lower the CUDA template with TVM and compile it with nvcc into a cubin for ``gpu`` (no GPU needed).

    Raises :class:`KernelConfigError` for a config the GPU cannot run: before compiling from the shared memory
    and register estimates, after compiling from ptxas's report (registers, spills, shared memory).
    """
    _check_spec(spec, "cuda", layout)
    validate_config(spec, config, gpu)
    # wgmma exists only in the arch-specific sm_90a instruction set
    arch = "sm_90a" if mma_kind(config) == "wgmma" else gpu.arch
    source = cuda_source(spec, config, layout, arch)
    entry, threads, params = kernel_signature(source)
    want = {"q", "k", "v", "out", "kv_num", "kv_idx", "scale"} | ({"lse"} if spec.return_lse else set())
    if {p.name for p in params} != want:
        raise RuntimeError(f"generated kernel parameters {[p.name for p in params]} are not {sorted(want)}")
    if threads != 32 * config.num_warps:
        raise RuntimeError(f"generated kernel has {threads} threads, the config asks for {32 * config.num_warps}")
    binary, resources = _nvcc_compile(source, arch, entry)
    shared = shared_bytes(spec, config)
    check_resources(resources, shared, threads, gpu)
    launch_grid = grid(spec, config)
    # The batch enters only through the grid's batch*heads axis (a buffer's leading extent is not a stride), so
    # one cubin serves every batch.
    return CompiledKernel("tvm", arch, entry, binary, "cubin", tuple(params), launch_grid,
                          (threads, 1, 1), shared, resources, spec.to_dict(), config.to_dict(), batch=spec.batch,
                          batch_grid=(1, launch_grid[1] // spec.batch))


# ---------------------------------------------------------------------------------------------- bundles
def shortlist(spec: KernelSpec, gpu: GpuSpec) -> list[KernelConfig]:
    """A few configs worth timing first: the default, deeper pipelines, other kv tiles, 32-row warps, and on
    sm_90 the wgmma kernel."""
    tile_m = min(spec.block_m, 128)
    picks = [default_config(spec, gpu)]

    def add(cfg: KernelConfig) -> None:
        try:
            validate_config(spec, cfg, gpu)
        except KernelConfigError:
            return
        if cfg not in picks:
            picks.append(cfg)

    for tm, tn, warps, stages, q_regs in ((tile_m, 64, tile_m // 16, 3, True), (tile_m, 32, tile_m // 16, 2, True),
                                          (tile_m, 64, tile_m // 16, 2, True), (tile_m, 128, tile_m // 16, 2, True),
                                          (tile_m, 32, tile_m // 32, 2, False), (tile_m, 32, tile_m // 32, 3, False),
                                          (64, 64, 4, 2, True), (64, 64, 4, 3, True)):
        add(_config(min(tm, spec.block_m), min(tn, spec.block_n), max(1, warps), stages, q_regs))
    for tm, tn, stages, overlapped in ((tile_m, 64, 2, False), (tile_m, 64, 3, False), (tile_m, 128, 2, False),
                                       (64, 64, 2, False), (tile_m, 64, 3, True), (tile_m, 128, 3, True),
                                       (64, 64, 3, True)):
        add(_config(min(tm, spec.block_m), min(tn, spec.block_n), min(tm, spec.block_m) // 16, stages,
                    mma="wgmma", overlapped=overlapped))
    return picks


def _compile_job(job: tuple[dict, dict, str]) -> dict[str, Any]:
    spec_d, cfg_d, gpu_name = job
    from ..planner.gpus import get_gpu

    spec, cfg = KernelSpec(**spec_d), KernelConfig.from_dict(cfg_d)
    try:
        return {"ok": True, "kernel": compile_for_target(spec, cfg, None, get_gpu(gpu_name)).to_json_dict()}
    except (KernelConfigError, RuntimeError) as e:
        return {"ok": False, "spec": spec_d, "config": cfg_d, "reason": f"{type(e).__name__}: {e}"}


def write_bundle(out_dir: str | Path, specs: list[KernelSpec], gpu: GpuSpec, configs: str = "shortlist",
                 jobs: int = 1, log=print, cases: list[dict] | None = None) -> Path:
    """Compile CUDA kernels for ``specs`` on this machine (no GPU) into a directory a GPU host can run without TVM.

    Writes one ``<entry>__<hash>.json`` per kernel (``CompiledKernel.to_json_dict()``) and ``manifest.json``
    listing them with their spec, config and resources, plus the configs that were rejected and why. A kernel
    depends only on its spec's shapes, not on the layout's contents: launch it over any layout of those shapes
    with :func:`launch_args`. ``configs`` is ``"default"``, ``"shortlist"`` or ``"all"`` (the search space).
    ``cases`` (one dict per spec, e.g. ``{"model": ..., "query_scale": ...}``) is copied into the manifest.
    """
    pick = {"default": lambda s: [default_config(s, gpu)], "shortlist": lambda s: shortlist(s, gpu),
            "all": lambda s: search_space(s, gpu)}[configs]
    work = [(s.to_dict(), c.to_dict(), gpu.name) for s in specs for c in pick(s)]
    case_of = {json.dumps(s.to_dict(), sort_keys=True): c for s, c in zip(specs, cases or [{}] * len(specs))}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_compile_job, work))
    else:
        results = [_compile_job(j) for j in work]
    manifest: dict[str, Any] = {"gpu": gpu.to_dict(), "kernels": [], "rejected": [],
                                "launch": "sparvar_compiler.codegen.tvm_backend.launch_args names every parameter"}
    for res in results:
        if not res["ok"]:
            manifest["rejected"].append({k: res[k] for k in ("spec", "config", "reason")})
            log(f"rejected {res['config']}: {res['reason']}")
            continue
        k = res["kernel"]
        name = f"{k['entry']}__{k['sha256'][:12]}.json"
        (out / name).write_text(json.dumps(k))
        manifest["kernels"].append({"file": name, "case": case_of[json.dumps(k["spec"], sort_keys=True)],
                                    **{f: k[f] for f in ("entry", "spec", "config", "resources", "grid", "block",
                                                         "shared_bytes")}})
        log(f"{name}: {k['resources']['registers']} registers, {k['shared_bytes']} bytes shared")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def verify_bundle(bundle: str | Path, reps: int = 20, log=print) -> list[dict[str, Any]]:
    """On a CUDA GPU (no TVM needed): run every kernel of a bundle, check it, time it.

    Each kernel runs twice over fresh random bf16/fp16 inputs with NaN-poisoned outputs: on a random layout of its
    shapes (one empty and one dense query block) and, when the manifest names a model and query scale, on that
    scale's CSLA layout, which is also the one timed (mean of ``reps`` back-to-back launches between CUDA events).
    Errors are judged against a float64 reference of the dense-expanded layout, within 3x a same-dtype
    reference's error; lse, when compiled in, within 1e-3 with ``-inf`` exactly where the reference has it.
    """
    from ..planner import csla_layout, make_plan
    from ..runtime.cubin import LoadedKernel
    from .reference import check_close, reference_attention

    bundle = Path(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    rows = []
    for entry in manifest["kernels"]:
        ck = CompiledKernel.from_json_dict(json.loads((bundle / entry["file"]).read_text()))
        spec, loaded = KernelSpec(**ck.spec), LoadedKernel.load(ck)
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[spec.dtype]
        rng = np.random.default_rng()
        qb, kb = _ceil_div(spec.q_len, spec.block_m), _ceil_div(spec.kv_len, spec.block_n)
        active = rng.random((qb, kb)) < 0.15
        active[0], active[-1] = False, True
        layouts = {"random": BlockLayout.from_block_mask(active, spec.q_len, spec.kv_len, spec.block_m,
                                                         spec.block_n)}
        case = entry.get("case") or {}
        if "model" in case:
            layouts["csla"] = csla_layout(make_plan(case["model"]), case["query_scale"], spec.block_m, spec.block_n,
                                          token_masks=False)
        row: dict[str, Any] = {"file": entry["file"], "case": case, "config": ck.config,
                               "registers": ck.resources["registers"]}
        for name, layout in layouts.items():
            q = torch.randn(spec.batch, spec.heads, spec.q_len, spec.head_dim, device="cuda", dtype=dt)
            k = torch.randn(spec.batch, spec.heads, spec.kv_len, spec.head_dim, device="cuda", dtype=dt)
            v = torch.randn_like(k)
            out = torch.full_like(q, float("nan"))
            lse = torch.full(q.shape[:3], float("nan"), device="cuda") if spec.return_lse else None
            scale = default_scale(spec.head_dim)
            args = launch_args(layout, q, k, v, out, lse, scale)
            loaded.launch(args)
            torch.cuda.synchronize()
            mask = torch.from_numpy(layout.to_token_mask(exact=False)).cuda()
            worst, lse_err = 0.0, 0.0
            for b in range(spec.batch):
                for h in range(0, spec.heads, 4):  # float64 scores of a few heads at a time fit in memory
                    sl = (slice(b, b + 1), slice(h, h + 4))
                    gold, gold_lse = reference_attention(q[sl], k[sl], v[sl], mask, scale, dtype=torch.float64,
                                                         return_lse=True)
                    same = reference_attention(q[sl], k[sl], v[sl], mask, scale)
                    ok, err, ref = check_close(out[sl], gold, same)
                    if lse is not None:
                        finite = torch.isfinite(gold_lse)
                        ok = ok and torch.equal(finite, torch.isfinite(lse[sl]))
                        if finite.any():
                            lse_err = max(lse_err, float((lse[sl][finite] - gold_lse[finite]).abs().max()))
                        ok = ok and lse_err < 1e-3
                    worst = max(worst, err / max(ref, 1e-30))
                    row["ok"] = row.get("ok", True) and bool(ok)
            row[f"{name}_err_ratio"] = round(worst, 3)
            if lse is not None:
                row[f"{name}_lse_err"] = lse_err
            if name == "csla" or len(layouts) == 1:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                for _ in range(3):
                    loaded.launch(args)
                start.record()
                for _ in range(reps):  # back to back, so launch overhead hides behind the previous kernel
                    loaded.launch(args)
                stop.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(stop) / reps
                pairs = layout.computed_pairs()
                row.update(ms=round(ms, 4), layout=name,
                           tflops=round(4 * pairs * spec.head_dim * spec.batch * spec.heads / ms / 1e9, 1))
        rows.append(row)
        log(json.dumps(row))
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m sparvar_compiler.codegen.tvm_backend bundle --out DIR`` compiles the benchmark's shapes into a
    bundle (needs TVM and nvcc, no GPU); ``... verify DIR`` checks and times a bundle on a GPU (no TVM)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle")
    b.add_argument("--out", required=True)
    b.add_argument("--models", default="infinity-8b,infinity-2b")
    b.add_argument("--scales", default="10,11,12")
    b.add_argument("--blocks", default="64,128")
    b.add_argument("--gpu", default="h100")
    b.add_argument("--batch", type=int, default=2)
    b.add_argument("--dtype", default="bf16", choices=TARGET_DTYPES["cuda"])
    b.add_argument("--configs", default="shortlist", choices=("default", "shortlist", "all"))
    b.add_argument("--lse", action="store_true", help="compile kernels that also write lse")
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    v = sub.add_parser("verify")
    v.add_argument("bundle")
    v.add_argument("--reps", type=int, default=20)
    v.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.command == "verify":
        rows = verify_bundle(args.bundle, args.reps)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
        return 0 if all(r.get("ok") for r in rows) else 1
    from ..planner import csla_layout, get_model, make_plan
    from ..planner.gpus import get_gpu

    specs, cases = [], []
    for model in args.models.split(","):
        plan, m = make_plan(model), get_model(model)
        for scale in map(int, args.scales.split(",")):
            for block in map(int, args.blocks.split(",")):
                # keyed by the layout without token masks, which bench/kernels.py also accepts for its cases
                layout = csla_layout(plan, scale, block, block, token_masks=False)
                specs.append(KernelSpec("tvm", "block", args.batch, m.heads, layout.q_len, layout.kv_len,
                                        m.head_dim, args.dtype, block, block, layout.content_hash(),
                                        return_lse=args.lse))
                cases.append({"model": model, "query_scale": scale})
    write_bundle(args.out, specs, get_gpu(args.gpu), args.configs, args.jobs, cases=cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
