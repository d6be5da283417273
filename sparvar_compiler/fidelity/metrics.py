"""Fidelity metrics of a sparse attention pattern against dense attention, all in float64.

For queries ``q [B, H, R, D]`` over a cache ``k, v [B, H, N, D]`` with softmax scale ``s`` and a boolean mask ``M``
(``[R, N]`` or ``[B, H, R, N]``):

* captured mass of a query row: ``sum_j P[j] * M[j]`` with ``P = softmax(s * q k^T)`` (dense): the share of the
  dense attention the pattern keeps;
* sparse output: ``softmax over the kept keys of s * q k^T``, times ``v`` (a row with no kept key gives 0, the
  kernels' convention);
* relative L2 error per head: ``||O_sparse - O_dense|| / ||O_dense||`` over the head's (batch, row, dim) values;
* cosine similarity per head: the mean over (batch, row) of the rows' cosine between sparse and dense output.
"""

from __future__ import annotations

import numpy as np
import torch


def as_mask(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A boolean torch mask (numpy arrays are wrapped without a copy)."""
    m = torch.from_numpy(mask) if isinstance(mask, np.ndarray) else mask
    if m.dtype != torch.bool:
        raise TypeError(f"a mask must be boolean, got {m.dtype}")
    return m


def logits64(q: torch.Tensor, k: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """float64 ``s * q k^T``: ``[B, H, R, N]``."""
    return torch.matmul(q.double(), k.double().transpose(-1, -2)) * softmax_scale


def softmax64(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.double(), dim=-1)


def captured_mass(probs: torch.Tensor, mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """float64 ``[B, H, R]``: dense softmax mass inside the mask, per query row."""
    return (probs * as_mask(mask)).sum(dim=-1)


def masked_output(logits: torch.Tensor, v: torch.Tensor, mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """float64 ``[B, H, R, D]``: attention restricted to the mask (empty rows give zeros)."""
    m = as_mask(mask)
    p = torch.softmax(logits.masked_fill(~m, float("-inf")), dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # all keys masked: softmax of all -inf is NaN; the kernels write 0
    return torch.matmul(p, v.double())


def sparse_attention(probs: torch.Tensor, logits: torch.Tensor, v: torch.Tensor, mask: np.ndarray | torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(captured mass [B, H, R], sparse output [B, H, R, D])`` in float64, from the dense probabilities.

    The softmax restricted to the mask is the dense probabilities renormalised inside it, which saves an
    exponential per mode. Rows whose kept probabilities all underflow to 0 (but keep a key) are recomputed
    from the logits with :func:`masked_output`, so the result equals it on every row.
    """
    m = as_mask(mask)
    kept = probs * m
    mass = kept.sum(dim=-1)
    out = torch.matmul(kept, v.double()) / torch.where(mass > 0, mass, torch.ones_like(mass))[..., None]
    redo = (mass <= 0) & m.expand_as(kept).any(dim=-1)
    if bool(redo.any()):
        full = masked_output(logits, v, m.expand_as(kept))
        out = torch.where(redo[..., None], full, out)
    return mass, out


def relative_l2(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """float64 ``[H]``: ``||x - ref|| / ||ref||`` per head over (batch, rows, dim)."""
    x, ref = x.double(), ref.double()
    num = (x - ref).pow(2).sum(dim=(0, 2, 3)).sqrt()
    den = ref.pow(2).sum(dim=(0, 2, 3)).sqrt().clamp_min(1e-300)
    return num / den


def cosine_similarity(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """float64 ``[H]``: mean over (batch, rows) of the row cosine between ``x`` and ``ref``."""
    x, ref = x.double(), ref.double()
    dot = (x * ref).sum(-1)
    norm = x.norm(dim=-1) * ref.norm(dim=-1)
    cos = torch.where(norm > 0, dot / norm.clamp_min(1e-300), torch.zeros_like(dot))
    return cos.mean(dim=(0, 2))
