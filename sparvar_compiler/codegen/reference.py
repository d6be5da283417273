"""Independent references for kernel checks.

``reference_attention`` expands a layout to a dense boolean token mask and runs plain masked attention, so
every kernel is checked against something that shares no indexing code with it. Errors are judged as PyTorch's
flex-attention tests do: the kernel's error against a float64 golden must be within a small factor of a
same-dtype reference's error against that golden.
"""

from __future__ import annotations

import math

import torch

from ..planner.layout import BlockLayout


def layout_mask(layout: BlockLayout, exact: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``[q_len, kv_len]`` token mask of what a kernel over ``layout`` attends to."""
    return torch.from_numpy(layout.to_token_mask(exact=exact)).to(device)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        scale: float | None = None, dtype: torch.dtype | None = None,
                        return_lse: bool = False):
    """Masked attention computed in ``dtype`` (default: the inputs' dtype), q/k/v ``[B, H, N, D]``.

    Rows whose mask is empty give zeros and a log-sum-exp of ``-inf`` (the kernels' convention).
    Returns ``out`` or ``(out, lse)`` with ``lse`` ``[B, H, Nq]`` in float32 (natural log).
    """
    dtype = dtype or q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    s = torch.matmul(qd, kd.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask.to(s.device), float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, vd) / torch.where(l > 0, l, torch.ones_like(l))
    out = out.to(dtype)
    if not return_lse:
        return out
    lse = (m + torch.log(l)).squeeze(-1).float()
    return out, lse


def relative_error(x: torch.Tensor, golden: torch.Tensor) -> float:
    """``||x - golden|| / ||golden||`` in float64 (NaN anywhere gives inf)."""
    x64, g64 = x.double(), golden.double()
    if not torch.isfinite(x64).all():
        return float("inf")
    return float((x64 - g64).norm() / g64.norm().clamp_min(1e-30))


def check_close(out: torch.Tensor, golden: torch.Tensor, same_dtype_ref: torch.Tensor, factor: float = 3.0,
                floor: float = 1e-6) -> tuple[bool, float, float]:
    """Kernel error vs golden must be <= ``factor`` x the same-dtype reference's error (or under ``floor``)."""
    err = relative_error(out, golden)
    ref = relative_error(same_dtype_ref, golden)
    return err <= max(factor * ref, floor), err, ref
