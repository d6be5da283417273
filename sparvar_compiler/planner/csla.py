"""CSLA: SparVAR's static cross-scale local sparse attention, as token masks and block layouts.

For a query at ``(y, x)`` on an ``Hq x Wq`` grid and a key scale with grid ``Hh x Wh``, the window centre is
``(round(y * Hh / Hq), round(x * Wh / Wq))`` (each axis by its own ratio, so rectangular grids work; ``round``
is round-half-to-even, which reproduces the published block sparsities exactly), and key ``(u, v)`` is kept if
``|u - cy| <= r // 2`` and ``|v - cx| <= r // 2`` with ``r`` the window of that key scale. Sink scales are kept
whole; a window of -1 drops the key scale. The mask is separable per key scale, so it is built as a Kronecker
product of two 1-D window masks.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from ..errors import LayoutError
from .layout import BlockLayout, check_block_size
from .plan import Plan
from .schedules import Grid


def round_half_even_div(num: np.ndarray, den: int) -> np.ndarray:
    """``round(num / den)`` with ties to even, in exact integer arithmetic."""
    q, r = np.divmod(num, den)
    up = (2 * r > den) | ((2 * r == den) & (q % 2 == 1))
    return q + up


def axis_window(n_query: int, n_key: int, window: int) -> np.ndarray:
    """``[n_query, n_key]`` boolean: key position ``u`` is within ``window // 2`` of query ``y``'s centre."""
    centre = round_half_even_div(np.arange(n_query) * n_key, n_query)
    return np.abs(np.arange(n_key)[None, :] - centre[:, None]) <= window // 2


def csla_token_mask(grids: Sequence[Grid], query_scale: int, windows: Sequence[int],
                    sink_scales: int) -> np.ndarray:
    """Boolean ``[tokens(query_scale), kv_len(query_scale)]`` CSLA mask of one query scale."""
    if not 0 <= query_scale < len(grids):
        raise LayoutError(f"query scale {query_scale} is out of range 0..{len(grids) - 1}")
    if len(windows) != len(grids):
        raise LayoutError(f"{len(windows)} windows for {len(grids)} scales")
    hq, wq = grids[query_scale]
    blocks = []
    for k in range(query_scale + 1):
        hk, wk = grids[k]
        if k < sink_scales:
            blocks.append(np.ones((hq * wq, hk * wk), dtype=bool))
        elif windows[k] < 0:
            blocks.append(np.zeros((hq * wq, hk * wk), dtype=bool))
        else:
            rows = axis_window(hq, hk, windows[k])
            cols = axis_window(wq, wk, windows[k])
            # kron(A, B)[y * wq + x, u * wk + v] = A[y, u] * B[x, v]: row-major tokens on both sides.
            blocks.append(np.kron(rows, cols).astype(bool))
    return np.concatenate(blocks, axis=1)


@lru_cache(maxsize=256)
def _cached_layout(grids: tuple[Grid, ...], query_scale: int, windows: tuple[int, ...], sink_scales: int,
                   block_m: int, block_n: int, token_masks: bool) -> BlockLayout:
    mask = csla_token_mask(grids, query_scale, windows, sink_scales)
    return BlockLayout.from_token_mask(mask, block_m, block_n, token_masks=token_masks)


def plan_token_mask(plan: Plan, query_scale: int) -> np.ndarray:
    """The CSLA token mask of one scale of a plan."""
    cfg = plan.config
    assert cfg.windows is not None and cfg.sink_scales is not None
    return csla_token_mask(plan.grids, query_scale, cfg.windows, cfg.sink_scales)


def csla_layout(plan: Plan, query_scale: int, block_m: int = 128, block_n: int = 128,
                token_masks: bool | None = None) -> BlockLayout:
    """The CSLA block layout of one scale of a plan (cached).

    ``token_masks`` defaults to the plan's ``token_exact`` option: keep the exact token mask of partial blocks.
    """
    cfg = plan.config
    assert cfg.windows is not None and cfg.sink_scales is not None
    check_block_size(block_m, "block_m")
    check_block_size(block_n, "block_n")
    plan.scale(query_scale)
    exact = cfg.token_exact if token_masks is None else token_masks
    return _cached_layout(plan.grids, query_scale, tuple(cfg.windows), cfg.sink_scales, block_m, block_n,
                          bool(exact))


def gather_density(mask: np.ndarray, block_m: int) -> float:
    """Fraction of keys a key-gather kernel reads: per query block, the union of keys any of its queries keeps."""
    q_len, kv_len = mask.shape
    qb = -(-q_len // block_m)
    padded = np.zeros((qb * block_m, kv_len), dtype=bool)
    padded[:q_len] = mask
    return float(padded.reshape(qb, block_m, kv_len).any(axis=1).sum() / (qb * kv_len))


def key_scale_spans(plan: Plan, query_scale: int) -> list[tuple[int, int, int]]:
    """``(key scale, first token, tokens)`` of every key scale the queries of ``query_scale`` attend to, in KV
    cache order: scale 0 starts at token 0 and the tokens sum to the scale's ``kv_len``. For pictures of a
    layout (:meth:`BlockLayout.plot`'s ``key_scales``) and anything else that needs the scale of a key column."""
    if not 0 <= query_scale < len(plan.grids):
        raise LayoutError(f"query scale {query_scale} is out of range 0..{len(plan.grids) - 1}")
    spans, first = [], 0
    for k, (h, w) in enumerate(plan.grids[: query_scale + 1]):
        spans.append((k, first, h * w))
        first += h * w
    return spans
