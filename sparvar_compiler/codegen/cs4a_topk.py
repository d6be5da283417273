"""The CS4A token top-k selection kernel (Triton): per row of decision-scale mass, the ``k`` largest keys,
ascending by index, in one program per row without a sort (see the template's docstring for the method).

``torch.topk`` followed by a sort of the indices costs as much as 40% of the decision scale's dense attention
on an H100 (k = 784 of 4121, bench/NOTES.md); this kernel replaces both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..planner.gpus import GpuSpec
from .artifact import CompiledKernel
from .render import render
from .spec import KernelConfig, KernelConfigError, KernelInputError
from . import triton_backend as tb

TEMPLATE = "triton/cs4a_topk.py.jinja"


@dataclass(frozen=True)
class TopkSpec:
    """``rows`` rows of ``row_len`` float32 masses, keep ``k`` per row."""

    rows: int
    row_len: int
    k: int
    kind: str = "cs4a_topk"
    backend: str = "triton"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kernel_name(spec: TopkSpec) -> str:
    return "sparvar_cs4a_topk"


def _padded(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_config(spec: TopkSpec) -> KernelConfig:
    """Enough warps that each thread holds at most 32 values of the padded row."""
    warps = min(16, max(1, _padded(spec.row_len) // (32 * 32)))
    return KernelConfig(warps, 1)


def render_source(spec: TopkSpec, config: KernelConfig) -> str:
    if not 0 < spec.k <= spec.row_len:
        raise KernelConfigError(f"k must be in [1, {spec.row_len}], got {spec.k}")
    if config.num_warps not in tb.WARPS or config.extra:
        raise KernelConfigError(f"the top-k kernel takes num_warps in {tb.WARPS} and no other knob, got "
                                f"{config.to_dict()}")
    return render(TEMPLATE, kernel_name=kernel_name(spec), rows=spec.rows, row_len=spec.row_len, k=spec.k,
                  padded=_padded(spec.row_len))


class TopkKernel:
    """The top-k kernel for this process (compiled on a GPU, Triton's interpreter on the CPU)."""

    def __init__(self, spec: TopkSpec, config: KernelConfig, interpret: bool):
        self.spec, self.config, self.interpret = spec, config, interpret
        self.path = tb._write_source(render_source(spec, config))
        self._fn = getattr(tb._load_module(self.path, interpret), kernel_name(spec))

    def __call__(self, mass: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """int32 ``[..., k]`` indices of each row's ``k`` largest entries of ``mass`` ``[..., row_len]``."""
        s = self.spec
        # Any number of rows (the rows scale with the batch, a launch size); each program owns one row.
        if (mass.dtype != torch.float32 or not mass.is_contiguous() or mass.dim() < 1
                or mass.shape[-1] != s.row_len or mass.numel() == 0):
            raise KernelInputError(f"mass must be a non-empty contiguous float32 tensor of rows of {s.row_len}, "
                                   f"got {mass.dtype} {tuple(mass.shape)}")
        if out is None:
            out = torch.empty(*mass.shape[:-1], s.k, dtype=torch.int32, device=mass.device)
        tb.launch_jit(self._fn, (mass.numel() // s.row_len, 1, 1), (mass, out), self.interpret, mass.device,
                      {"num_warps": self.config.num_warps, "num_stages": 1})
        return out


def build(spec: TopkSpec, config: KernelConfig | None = None, interpret: bool | None = None) -> TopkKernel:
    config = config or default_config(spec)
    if interpret is None:
        interpret = not torch.cuda.is_available()
    return TopkKernel(spec, config, bool(interpret))


def compile_for_target(spec: TopkSpec, config: KernelConfig, gpu: GpuSpec, batch: int = 1) -> CompiledKernel:
    """A cubin of the top-k kernel for ``gpu`` without needing it. ``spec.rows`` are the rows of ``batch``
    batch elements; a launch at another batch scales them."""
    if spec.rows % batch:
        raise ValueError(f"top-k rows {spec.rows} are not a multiple of batch {batch}")
    return tb.compile_source(render_source(spec, config), kernel_name(spec), {"mass": "*fp32", "out": "*i32"},
                             config, (spec.rows, 1, 1), spec.to_dict(), gpu, batch=batch,
                             batch_grid=(0, spec.rows // batch))
