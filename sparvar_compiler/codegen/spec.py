"""What identifies a kernel: its workload (``KernelSpec``) and its tuning knobs (``KernelConfig``), plus the
input checks every kernel entry point runs before launching."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import LayoutError, SparvarError
from ..planner.layout import BlockLayout

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BACKENDS = ("triton", "tvm")
KINDS = ("block", "gather")


class KernelInputError(SparvarError):
    """Tensors that do not match a kernel: wrong rank, shape, dtype, device or strides."""


class KernelConfigError(SparvarError):
    """A config the kernel or the GPU cannot run (divisibility, shared memory, registers)."""


def dtype_name(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    raise KernelInputError(f"unsupported dtype {dtype}; supported: {', '.join(DTYPES)}")


@dataclass(frozen=True)
class KernelSpec:
    """Everything about the problem that decides the generated kernel (not the tuning knobs).

    ``batch`` is the batch the kernel is tuned (and timed) at; the compiled kernel runs any batch, which is a
    launch size (its grid, or a persistent kernel's work-item count), not a compile-time constant.

    ``scale_kind`` is ``"default"`` (1/sqrt(head_dim)) or ``"explicit"`` (a runtime argument, e.g. Infinity's
    1.0 on L2-normalised q/k); the kernel always takes the scale as an argument, the kind only keys tuning.

    ``dynamic`` kernels (CS4A) read per-(batch, head) tables filled on the GPU at run time instead of a static
    layout: ``block_m`` is then the table's query rows (a CS4A query group, or the D-CSLA block), ``capacity`` the
    table width (keys for the gather kind, key blocks for the block kind) and ``layout_hash`` identifies the
    static part of the tables. Each is left out of :meth:`to_dict` while at its default, so the keys of static
    kernels stay what they were.
    """

    backend: str
    kind: str
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str
    block_m: int
    block_n: int
    layout_hash: str
    token_exact: bool = False
    return_lse: bool = False
    scale_kind: str = "default"
    dynamic: bool = False
    capacity: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name, default in (("dynamic", False), ("capacity", 0)):
            if d[name] == default:
                del d[name]
        return d

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class KernelConfig:
    """Tuning knobs of one kernel (``num_warps``, ``num_stages`` and backend-specific extras)."""

    num_warps: int = 4
    num_stages: int = 2
    extra: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def get(self, name: str, default: Any = None) -> Any:
        return dict(self.extra).get(name, default)

    def to_dict(self) -> dict[str, Any]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, **dict(self.extra)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KernelConfig":
        """The config of ``to_dict()``'s form, checked: ``num_warps``/``num_stages`` are ints (not bools, floats
        or strings: nothing is converted), every other knob a non-empty string name with a finite JSON scalar
        value. Which knobs a backend knows, and their types, are its own check (:func:`check_config_types`).

        Raises
        ------
        KernelConfigError
            Naming the field and what is wrong with it.
        """
        if not isinstance(d, Mapping):
            raise KernelConfigError(f"a kernel config must be a mapping, got {type(d).__name__}")
        d = dict(d)
        for name, value in d.items():
            if not isinstance(name, str) or not name:
                raise KernelConfigError(f"config field names must be non-empty strings, got {name!r}")
            if isinstance(value, bool) or isinstance(value, str):
                continue
            if isinstance(value, float) and not math.isfinite(value) or not isinstance(value, (int, float)):
                raise KernelConfigError(f"config field {name!r} must be a finite JSON scalar, got {value!r}")
        nw, ns = d.pop("num_warps", 4), d.pop("num_stages", 2)
        for name, value in (("num_warps", nw), ("num_stages", ns)):
            if not is_int(value):
                raise KernelConfigError(f"config field {name!r} must be an integer, got {value!r}")
        return cls(nw, ns, tuple(sorted(d.items())))


def is_int(value: Any) -> bool:
    """An int that is an int: not a bool (``True`` is an ``int`` to Python), a float or a string."""
    return isinstance(value, int) and not isinstance(value, bool)


#: What a config knob may hold: ``int``, ``bool``, or a tuple of the allowed strings.
KnobType = type | tuple[str, ...]


def check_config_types(config: KernelConfig, knobs: Mapping[str, KnobType], what: str) -> None:
    """Raise :class:`KernelConfigError` unless every knob of ``config`` is one of ``knobs`` (besides
    ``num_warps``/``num_stages``, ints) and holds its type exactly: ``64.9``, ``True`` and ``"64"`` are not
    integers, ``1`` is not a bool, and an enum value is one of its strings.

    ``what`` names the kernel family in the message (``"Triton"``).
    """
    values = config.to_dict()
    unknown = sorted(set(values) - set(knobs) - {"num_warps", "num_stages"})
    if unknown:
        raise KernelConfigError(f"unknown {what} config keys {unknown}; known: num_warps, num_stages, "
                                f"{', '.join(knobs)}")
    for name, value in values.items():
        kind = knobs.get(name, int)
        if isinstance(kind, tuple):
            if not isinstance(value, str) or value not in kind:
                raise KernelConfigError(f"{name} must be one of {kind}, got {value!r}")
        elif kind is bool:
            if not isinstance(value, bool):
                raise KernelConfigError(f"{name} must be a bool, got {value!r}")
        elif kind is int:
            if not is_int(value):
                raise KernelConfigError(f"{name} must be an integer, got {value!r}")
        else:  # pragma: no cover - a knob table names only int, bool or enums
            raise TypeError(f"knob {name}: unsupported type {kind!r}")


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                           out: torch.Tensor | None = None, device_type: str | None = None) -> None:
    """Raise :class:`KernelInputError` / :class:`LayoutError` unless q ``[B, H, Nq, D]`` and k, v
    ``[B, H, Nkv, D]`` are same-dtype, same-device, contiguous tensors that match ``layout``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise KernelInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise KernelInputError(f"{name} must have rank 4 [batch, heads, tokens, head_dim], got shape "
                                   f"{tuple(t.shape)}")
        dtype_name(t.dtype)
        if not t.is_contiguous():
            raise KernelInputError(f"{name} must be contiguous, got strides {t.stride()}")
        if device_type is not None and t.device.type != device_type:
            raise KernelInputError(f"{name} is on {t.device}, this kernel runs on {device_type}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise KernelInputError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise KernelInputError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, Nq, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise KernelInputError(f"k and v must be [B={B}, H={H}, Nkv, D={D}], got {tuple(k.shape)} and "
                               f"{tuple(v.shape)}")
    if k.shape[2] == 0:
        raise KernelInputError("k and v have no keys")
    if D not in (64, 128):
        raise KernelInputError(f"head_dim must be 64 or 128, got {D}")
    if Nq != layout.q_len or k.shape[2] != layout.kv_len:
        raise LayoutError(f"layout is {layout.q_len}x{layout.kv_len} tokens but q has {Nq} and k has "
                          f"{k.shape[2]}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or not out.is_contiguous()):
        raise KernelInputError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)} on "
                               f"{q.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")


def check_lse(lse: torch.Tensor, q: torch.Tensor) -> None:
    """lse must be a contiguous float32 ``[B, H, Nq]`` tensor beside q."""
    want = tuple(q.shape[:3])
    if (not isinstance(lse, torch.Tensor) or tuple(lse.shape) != want or lse.dtype != torch.float32
            or lse.device != q.device or not lse.is_contiguous()):
        got = f"{lse.dtype} {tuple(lse.shape)} on {lse.device}" if isinstance(lse, torch.Tensor) else type(lse)
        raise KernelInputError(f"lse must be a contiguous float32 tensor of shape {want} on {q.device}, got {got}")


@dataclass(frozen=True)
class TokenShape:
    """The (q_len, kv_len) a dynamic kernel's tensors must have (what a layout says for a static one)."""

    q_len: int
    kv_len: int


def check_kernel_call(spec: KernelSpec, layout: BlockLayout | None, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                      device_type: str | None = None) -> None:
    """Everything a generated kernel's entry point checks before launch: the tensors against the layout
    (:func:`check_attention_inputs`; the spec's lengths for a dynamic kernel), then against the kernel's fixed
    spec (dtype, shape, lse)."""
    shape = layout if layout is not None else TokenShape(spec.q_len, spec.kv_len)
    check_attention_inputs(q, k, v, shape, out, device_type=device_type)  # type: ignore[arg-type]
    if dtype_name(q.dtype) != spec.dtype:
        raise KernelInputError(f"this kernel takes {spec.dtype} tensors, got {q.dtype}")
    # The batch is a launch size, not part of the kernel: any batch >= 1 runs (spec.batch is what it was tuned at).
    want = (spec.heads, spec.q_len, spec.head_dim)
    if q.shape[0] < 1 or tuple(q.shape[1:]) != want:
        raise KernelInputError(f"q must have shape [batch, {want[0]}, {want[1]}, {want[2]}] (any batch >= 1) for "
                               f"this kernel, got {tuple(q.shape)}")
    if lse is not None:
        if not spec.return_lse:
            raise KernelInputError("lse was given but this kernel's spec has return_lse=False")
        check_lse(lse, q)
