"""The CS4A decision-scale statistics kernel (Triton): per (batch, head, query group) the softmax column mass
``mass[b, h, g, key] = sum_{q in g} exp(q.k * scale - lse_q)``.

It runs right after the decision scale's dense attention and reads that pass's log-sum-exp, so it needs no
second attention: one ``Q K^T`` and one ``exp`` per score, no ``P V``, one write of ``[G, Nkv]`` per head.
Token top-k takes groups of ``group_size`` (192) queries; D-CSLA takes groups of one query block and sums the
keys per key block afterwards (:func:`sparvar_compiler.cs4a.block_mass`).

Knobs (``KernelConfig``): ``num_warps``, ``num_stages``, ``block_m`` (query sub-tile; it must divide the group),
``block_n`` (key tile). ``StatsSpec.stride`` > 1 counts every stride-th query of a group (an estimate, scaled
by the stride); 1, the default, is exact.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..planner.gpus import GpuSpec
from .artifact import CompiledKernel
from .render import render
from .spec import DTYPES, KernelConfig, KernelConfigError, KernelInputError, dtype_name
from . import triton_backend as tb

TEMPLATE = "triton/cs4a_stats.py.jinja"


@dataclass(frozen=True)
class StatsSpec:
    """The statistics workload: q ``[batch, heads, q_len, head_dim]``, k ``[batch, heads, kv_len, head_dim]``,
    groups of ``group`` consecutive queries (every ``stride``-th counted)."""

    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str
    group: int
    stride: int = 1
    kind: str = "cs4a_stats"
    backend: str = "triton"

    @property
    def groups(self) -> int:
        return -(-self.q_len // self.group)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kernel_name(spec: StatsSpec) -> str:
    return f"sparvar_cs4a_stats_d{spec.head_dim}"


def _tiles(spec: StatsSpec, config: KernelConfig) -> tuple[int, int]:
    return int(config.get("block_m", 64)), int(config.get("block_n", 64))


def key_chunk(spec: StatsSpec, config: KernelConfig) -> int:
    """Keys per program: the key tiles shared out over ``key_split`` programs."""
    bn = _tiles(spec, config)[1]
    tiles = -(-spec.kv_len // bn)
    return -(-tiles // int(config.get("key_split", 1))) * bn


def grid(spec: StatsSpec, config: KernelConfig, batch: int | None = None) -> tuple[int, int, int]:
    """``(groups, B*H, key programs)`` for ``batch`` (default: the spec's): splitting the keys gives the GPU
    enough programs (a decision scale has only 9 groups of 192 queries per head) without any reduction, since
    each program owns whole columns."""
    b = spec.batch if batch is None else batch
    return (spec.groups, b * spec.heads, -(-spec.kv_len // key_chunk(spec, config)))


def validate_config(spec: StatsSpec, config: KernelConfig) -> None:
    """Raise :class:`KernelConfigError` unless ``config`` can run ``spec``."""
    if spec.dtype not in DTYPES:
        raise KernelConfigError(f"dtype must be one of {tuple(DTYPES)}, got {spec.dtype!r}")
    if spec.head_dim not in (64, 128):
        raise KernelConfigError(f"head_dim must be 64 or 128, got {spec.head_dim}")
    unknown = sorted(set(dict(config.extra)) - {"block_m", "block_n", "key_split"})
    if unknown:
        raise KernelConfigError(f"unknown statistics config keys {unknown}; known: block_m, block_n, key_split")
    if not isinstance(config.get("key_split", 1), int) or config.get("key_split", 1) < 1:
        raise KernelConfigError(f"key_split must be a positive integer, got {config.get('key_split')!r}")
    bm, bn = _tiles(spec, config)
    if bm not in tb.TILE_SIZES or bn not in tb.TILE_SIZES:
        raise KernelConfigError(f"block_m and block_n must be one of {tb.TILE_SIZES}, got {bm}, {bn}")
    if spec.stride < 1 or spec.group % (bm * spec.stride):
        raise KernelConfigError(f"the query group ({spec.group}) must be a multiple of block_m x stride "
                                f"({bm} x {spec.stride})")
    if config.num_warps not in tb.WARPS or not 1 <= config.num_stages <= 6:
        raise KernelConfigError(f"num_warps must be one of {tb.WARPS} and num_stages in 1..6, got "
                                f"{config.num_warps}, {config.num_stages}")


def default_config(spec: StatsSpec) -> KernelConfig:
    """The H100 sweep's best (bench/cs4a.py): 32-row sub-tiles (16 if the group needs them), 128-key tiles, the
    keys split over 4 programs, 4 warps, 2 stages."""
    bm = next((t for t in (32, 64, 16) if spec.group % (t * spec.stride) == 0), 16)
    return KernelConfig(4, 2, (("block_m", bm), ("block_n", 128), ("key_split", 4)))


def render_source(spec: StatsSpec, config: KernelConfig) -> str:
    validate_config(spec, config)
    bm, bn = _tiles(spec, config)
    return render(TEMPLATE, kernel_name=kernel_name(spec), dtype=spec.dtype, batch=spec.batch, heads=spec.heads,
                  q_len=spec.q_len, kv_len=spec.kv_len, head_dim=spec.head_dim, group=spec.group,
                  groups=spec.groups, stride=spec.stride, block_m=bm, block_n=bn, split=spec.group // (bm * spec.stride),
                  key_split=grid(spec, config)[2], key_chunk=key_chunk(spec, config),
                  num_warps=config.num_warps, num_stages=config.num_stages,
                  stride_note=f", every {spec.stride}-th counted and scaled by {spec.stride}" if spec.stride > 1 else "",
                  dot_precision="ieee" if spec.dtype == "fp32" else "tf32")


def _signature(spec: StatsSpec) -> dict[str, str]:
    t = "*" + spec.dtype
    return {"q": t, "k": t, "lse": "*fp32", "mass": "*fp32", "scale": "fp32"}


def check_call(spec: StatsSpec, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, mass: torch.Tensor | None
               ) -> None:
    """Raise :class:`KernelInputError` unless the tensors fit ``spec`` (at q's batch: the batch is a launch
    size)."""
    b = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[0] >= 1 else spec.batch
    want = {"q": (b, spec.heads, spec.q_len, spec.head_dim),
            "k": (b, spec.heads, spec.kv_len, spec.head_dim),
            "lse": (b, spec.heads, spec.q_len),
            "mass": (b, spec.heads, spec.groups, spec.kv_len)}
    for name, t in (("q", q), ("k", k), ("lse", lse), ("mass", mass)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want[name] or not t.is_contiguous():
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise KernelInputError(f"{name} must be a contiguous tensor of shape {want[name]}, got {got}")
        if t.device != q.device:
            raise KernelInputError(f"{name} is on {t.device}, q on {q.device}")
    if dtype_name(q.dtype) != spec.dtype or k.dtype != q.dtype:
        raise KernelInputError(f"q and k must be {spec.dtype}, got {q.dtype}, {k.dtype}")
    for name, t in (("lse", lse), ("mass", mass)):
        if t is not None and t.dtype != torch.float32:
            raise KernelInputError(f"{name} must be float32, got {t.dtype}")


class StatsKernel:
    """The statistics kernel for this process (compiled on a GPU, or Triton's interpreter on the CPU)."""

    def __init__(self, spec: StatsSpec, config: KernelConfig, interpret: bool):
        self.spec, self.config, self.interpret = spec, config, interpret
        self.source = render_source(spec, config)
        self.path = tb._write_source(self.source)
        self._fn = getattr(tb._load_module(self.path, interpret), kernel_name(spec))
        self.grid = grid(spec, config)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float | None = None,
                 mass: torch.Tensor | None = None) -> torch.Tensor:
        """float32 ``[B, H, groups, kv_len]`` column mass (written into ``mass`` if given)."""
        check_call(self.spec, q, k, lse, mass)
        scale = 1.0 / math.sqrt(self.spec.head_dim) if scale is None else float(scale)
        if not 0 < scale < math.inf:
            raise KernelInputError(f"scale must be a positive finite number, got {scale!r}")
        if mass is None:
            mass = torch.empty(q.shape[0], self.spec.heads, self.spec.groups, self.spec.kv_len,
                               dtype=torch.float32, device=q.device)
        tb.launch_jit(self._fn, grid(self.spec, self.config, q.shape[0]), (q, k, lse, mass, scale),
                      self.interpret, q.device,
                      {"num_warps": self.config.num_warps, "num_stages": self.config.num_stages})
        return mass


def build(spec: StatsSpec, config: KernelConfig | None = None, interpret: bool | None = None) -> StatsKernel:
    """The statistics kernel of ``spec`` for this process (``interpret=None``: the interpreter without CUDA)."""
    config = config or default_config(spec)
    if interpret is None:
        interpret = not torch.cuda.is_available()
    return StatsKernel(spec, config, bool(interpret))


def compile_for_target(spec: StatsSpec, config: KernelConfig, gpu: GpuSpec) -> CompiledKernel:
    """A cubin of the statistics kernel for ``gpu``, without needing that GPU (see
    :func:`sparvar_compiler.codegen.triton_backend.compile_for_target`)."""
    launch_grid = grid(spec, config)
    return tb.compile_source(render_source(spec, config), kernel_name(spec), _signature(spec), config,
                             launch_grid, spec.to_dict(), gpu, batch=spec.batch,
                             batch_grid=(1, launch_grid[1] // spec.batch))
