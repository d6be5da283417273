"""The static part of CS4A (cross-scale self-similar sparse attention).

Everything about CS4A except *which* keys the decision scale selects is fixed by (model, schedule, config):
query groups and their mapping to decision groups, the top-k capacity, the local bands, the sinks kept by
decompose-align-project, every budget, and the table that maps a decision-scale key to a later scale's key.
The runtime fills fixed-shape index tensors from these (CUDA-graph friendly).

Conventions
-----------
* Queries of a scale are cut into groups of ``group_size`` consecutive tokens (the last may be short):
  ``G = ceil(tokens / group_size)`` (9, 12, 22 for scales 10, 11, 12 at 1024^2).
* Group ``g`` of ``G_k`` at scale ``k`` reads decision group ``clamp(round((g + 0.5) * G_S / G_k - 0.5))``.
* Top-k capacity: ``topk_fraction * kv_len(S)`` rounded to a multiple of ``key_tile`` (784 of 4121).
* Band of scale ``k``: per group, the union of ``band_windows[k - S - 1]``-square windows around each query of
  the group in its own scale, as key indices; capacity = the largest band rounded up to ``key_tile``
  (560 at scale 11, 784 at scale 12). A scale also reuses the bands of the CS4A scales before it, through the
  same group mapping (scale 12 reuses scale 11's: 784 + 560 + 784 = 2128 keys).
* Key mappings (decision key index ``i`` in ``[0, kv_len(S))`` -> key index at scale ``k``):
  ``identity``: ``i`` (the KV cache is a prefix); ``flat``: ``floor(kv_len(k) / kv_len(S) * i)``;
  ``dap`` (decompose-align-project): ``i`` is token ``(u, v)`` of scale ``j``; it moves to scale
  ``j' = j + (k - S)`` at ``(floor((u + 0.5) * H_j' / H_j), floor((v + 0.5) * W_j' / W_j))``, and the first
  ``k - S`` scales, which no decision key maps to, are kept whole as sinks.
* D-CSLA (block variant): per query block keep the kv blocks covering 0.9 of the row's mass, at least 16 blocks
  and at most half of them, plus the +-1 diagonal blocks and the sink blocks; its capacity is that maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import limits
from ..errors import PlanConfigError
from .config import KEY_MAPPINGS
from .plan import Mode, Plan


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_to_tile(x: float, tile: int) -> int:
    """Nearest positive multiple of ``tile`` (half to even, like Python's round)."""
    return max(tile, tile * round(x / tile))


def group_mapping(groups_here: int, groups_decision: int) -> np.ndarray:
    """Decision group of each of ``groups_here`` query groups."""
    g = np.arange(groups_here)
    d = np.floor((g + 0.5) * groups_decision / groups_here - 0.5 + 0.5).astype(np.int64)
    return np.clip(d, 0, groups_decision - 1).astype(np.int32)


def band_keys(h: int, w: int, kv_offset: int, group_size: int, window: int) -> list[np.ndarray]:
    """Per query group of an ``h x w`` scale: sorted key indices within ``window // 2`` of any of its queries."""
    r = window // 2
    tokens = h * w
    out = []
    for start in range(0, tokens, group_size):
        q = np.arange(start, min(start + group_size, tokens))
        ys, xs = np.divmod(q, w)
        keep = np.zeros((h, w), dtype=bool)
        for y in np.unique(ys):
            xr = xs[ys == y]
            keep[max(0, y - r): y + r + 1, max(0, xr.min() - r): xr.max() + r + 1] = True
        out.append(kv_offset + np.flatnonzero(keep).astype(np.int64))
    return out


def key_mapping(plan: Plan, target_scale: int, mapping: str) -> np.ndarray:
    """int32 ``[kv_len(S)]``: where each decision-scale key lands in the cache of ``target_scale``."""
    S = plan.config.decision_scale
    assert S is not None
    if mapping not in KEY_MAPPINGS:
        raise ValueError(f"mapping must be one of {KEY_MAPPINGS}, got {mapping!r}")
    n_s = plan.scales[S].kv_len
    n_k = plan.scales[target_scale].kv_len
    i = np.arange(n_s, dtype=np.int64)
    if mapping == "identity":
        return i.astype(np.int32)
    if mapping == "flat":
        return ((n_k * i) // n_s).astype(np.int32)
    shift = target_scale - S
    out = np.empty(n_s, dtype=np.int64)
    for j in range(S + 1):
        sj = plan.scales[j]
        dst = plan.scales[j + shift]
        u, v = np.divmod(np.arange(sj.tokens), sj.w)
        uu = np.floor((u + 0.5) * dst.h / sj.h).astype(np.int64)
        vv = np.floor((v + 0.5) * dst.w / sj.w).astype(np.int64)
        out[sj.kv_offset: sj.kv_offset + sj.tokens] = dst.kv_offset + uu * dst.w + vv
    return out.astype(np.int32)


@dataclass(frozen=True)
class CS4AScale:
    """Static CS4A tables of one scale after the decision scale.

    ``decision_group[g]`` maps query group ``g``; ``band[g, :band_len[g]]`` are its own-scale band keys
    (padded with the last key); ``reused_bands`` lists the earlier scales whose bands it reuses; ``key_map``
    maps decision keys here; ``sink_keys`` counts the leading keys kept whole (decompose-align-project).
    """

    scale: int
    groups: int
    decision_group: np.ndarray
    band: np.ndarray
    band_len: np.ndarray
    band_capacity: int
    reused_bands: tuple[int, ...]
    key_map: np.ndarray
    sink_keys: int
    topk: int
    budget: int
    kv_len: int


@dataclass(frozen=True)
class CS4ATables:
    """Static CS4A tables of a plan: decision scale, its groups and top-k, and one :class:`CS4AScale` per
    later CS4A scale, plus the D-CSLA capacity (max kv blocks per query block) for a block size."""

    decision_scale: int
    decision_groups: int
    group_size: int
    topk: int
    key_tile: int
    mapping: str
    scales: tuple[CS4AScale, ...]

    def scale(self, index: int) -> CS4AScale:
        for s in self.scales:
            if s.scale == index:
                return s
        raise KeyError(f"scale {index} has no CS4A tables")

    def summary(self) -> dict:
        return {
            "decision_scale": self.decision_scale, "decision_groups": self.decision_groups,
            "group_size": self.group_size, "topk": self.topk, "key_tile": self.key_tile, "mapping": self.mapping,
            "scales": [{"scale": s.scale, "groups": s.groups, "band_capacity": s.band_capacity,
                        "reused_bands": list(s.reused_bands), "sink_keys": s.sink_keys, "budget": s.budget,
                        "kv_len": s.kv_len} for s in self.scales],
        }


def check_table_sizes(plan: Plan, mode: str | None = None) -> None:
    """Refuse a plan whose CS4A tables would be too large, before any is built.

    Per head, every table is at most (query groups) x (keys): the decision scale's group statistics are
    ``groups(S) x kv_len(S)``, a later scale's key table ``groups(k) x capacity(k)`` with a capacity below
    ``2 kv_len(k) + 128``, and its band lists and row bitmaps ``groups(k) x kv_len(k)``; D-CSLA's are the same in
    blocks. Each product must stay within :data:`~sparvar_compiler.limits.MAX_TABLE_ELEMENTS` (a 1 px group
    over a 64k-token cache would be 17 billion entries).

    Raises
    ------
    PlanConfigError
        Naming the scale, the option that sets the group (``group_size`` or ``dcsla_block``) and the product.
    """
    cfg = plan.config
    S = cfg.decision_scale
    mode = mode or cfg.cs4a
    if S is None or mode == "off":
        return
    field, unit = ("group_size", cfg.group_size) if mode == "token" else ("dcsla_block", cfg.dcsla_block)
    for sp in plan.scales[S:]:
        groups = _ceil_div(sp.tokens, unit)
        keys = sp.kv_len if mode == "token" else _ceil_div(sp.kv_len, unit)
        limits.check_limit(groups * 2 * keys, limits.MAX_TABLE_ELEMENTS, "MAX_TABLE_ELEMENTS",
                           f"plan config: '{field}' {unit} makes {groups} query groups of scale {sp.index} over "
                           f"{keys} {'keys' if mode == 'token' else 'key blocks'}: table entries",
                           PlanConfigError)


def dcsla_capacity(kv_blocks: int, min_blocks: int = 16, max_fraction: float = 0.5) -> int:
    """Most kv blocks a D-CSLA row can keep (the larger of the floor and half the row, within the row)."""
    return min(kv_blocks, max(min_blocks, int(np.floor(max_fraction * kv_blocks))))


def cs4a_tables(plan: Plan, mapping: str | None = None) -> CS4ATables | None:
    """The static CS4A tables of a plan, or None if no (scale, layer) uses CS4A."""
    cfg = plan.config
    S = cfg.decision_scale
    assert S is not None and cfg.band_windows is not None
    cs4a_scales = [s.index for s in plan.scales if Mode.CS4A in s.modes]
    if not cs4a_scales:
        return None
    check_table_sizes(plan, "token")
    mapping = mapping or cfg.key_mapping
    gs, tile = cfg.group_size, cfg.key_tile
    dec = plan.scales[S]
    g_s = _ceil_div(dec.tokens, gs)
    topk = min(round_to_tile(cfg.topk_fraction * dec.kv_len, tile), dec.kv_len)
    bands: dict[int, tuple[list[np.ndarray], int]] = {}
    out = []
    for k in range(S + 1, plan.num_scales):
        sp = plan.scales[k]
        window = cfg.band_windows[k - S - 1]
        keys = band_keys(sp.h, sp.w, sp.kv_offset, gs, window)
        cap = _ceil_div(max(len(b) for b in keys), tile) * tile
        bands[k] = (keys, cap)
        if k not in cs4a_scales:
            continue
        g_k = len(keys)
        band = np.zeros((g_k, cap), dtype=np.int32)
        band_len = np.array([len(b) for b in keys], dtype=np.int32)
        for g, b in enumerate(keys):
            band[g, : len(b)] = b
            band[g, len(b):] = b[-1]
        reused = tuple(range(S + 1, k))
        sink_keys = plan.scales[k - S].kv_offset if mapping == "dap" else 0
        budget = topk + cap + sum(bands[j][1] for j in reused) + sink_keys
        out.append(CS4AScale(k, g_k, group_mapping(g_k, g_s), band, band_len, cap, reused,
                             key_mapping(plan, k, mapping), sink_keys, topk, budget, sp.kv_len))
    return CS4ATables(S, g_s, gs, topk, tile, mapping, tuple(out))
