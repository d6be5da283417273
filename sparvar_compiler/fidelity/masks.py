"""What each plan mode attends to, as boolean token masks ``[q_len, kv_len]``, and what it costs.

Modes (one query scale of one layer):

* ``csla_block``: the CSLA layout with every active block whole (SparVAR's kernel).
* ``csla_exact``: the same blocks, partial ones masked to the exact CSLA token mask (``token_exact``).
* ``csla_gather``: the key-gather kernel: every query of a block attends to the union of the keys its block
  keeps (:func:`sparvar_compiler.codegen.triton_backend.kernel_mask`); fewer keys than whole blocks.
* ``random``: as many kv blocks per query block as ``csla_block``: the sink blocks (every kv block holding a
  key of the sink scales, which CSLA always keeps) kept, the rest at random positions; drawn anew per (layer,
  head) and several times (:func:`random_block_draw`), so the report gives its mean and spread: the baseline a
  structured layout must beat at equal density.
* ``cs4a_token[_flat|_dap]`` / ``cs4a_block``: dynamic CS4A from the decision scale (token top-k with a key
  mapping; D-CSLA blocks), from :mod:`sparvar_compiler.cs4a.select`.
* ``random_cs4a``: per query as many keys as ``cs4a_token`` keeps, uniformly at random (no key kept for sure:
  token CS4A keeps no fixed sinks either), drawn per (layer, head, query) and several times.

The decision scale's own CS4A pattern (what the residual is taken against) is each group's top-k, plus, with
the plan option ``decision_band``, the local band of the first later scale (:func:`decision_band_mask`).

Cost is the (query, key) pairs a kernel computes: whole active blocks for the block kinds (also ``csla_exact``,
which masks inside the blocks it computes), the kept pairs for gather and token kinds.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..codegen.spec import KernelSpec
from ..codegen.triton_backend import kernel_mask
from ..cs4a.select import block_mass, group_mass_reference
from ..planner.csla import csla_layout
from ..planner.layout import BlockLayout
from ..planner.plan import Mode, Plan, plan_schedule
from ..planner.schedules import Schedule


@dataclass(frozen=True)
class ModeMask:
    """A mode's token mask of one query scale and the pairs its kernel computes.

    ``mask`` is ``[q_len, kv_len]`` (the same for every batch element and head) or ``[B, H, q_len, kv_len]``
    (dynamic modes); ``computed`` counts pairs per (batch, head) on average.
    """

    mask: np.ndarray | torch.Tensor
    computed: float

    def density(self, q_len: int, kv_len: int) -> float:
        return self.computed / (q_len * kv_len)


def _gather_spec(layout: BlockLayout) -> KernelSpec:
    # kernel_mask reads only kind/token_exact; the rest names a real workload for clarity.
    return KernelSpec("triton", "gather", 1, 1, layout.q_len, layout.kv_len, 128, "bf16", layout.block_m,
                      layout.block_n, layout.content_hash())


def csla_masks(plan: Plan, scale: int, block: int) -> dict[str, ModeMask]:
    """``csla_block``, ``csla_exact`` and ``csla_gather`` masks of one query scale (``block`` x ``block``)."""
    layout = csla_layout(plan, scale, block, block, token_masks=True)
    computed = float(layout.computed_pairs())
    gather = kernel_mask(_gather_spec(layout), layout)
    return {
        "csla_block": ModeMask(layout.to_token_mask(exact=False), computed),
        "csla_exact": ModeMask(layout.to_token_mask(exact=True), computed),
        "csla_gather": ModeMask(gather, float(gather.sum())),
    }


def sink_blocks(layout: BlockLayout, sink_keys: int) -> int:
    """kv blocks holding at least one of the first ``sink_keys`` keys (the sink scales' keys)."""
    return min(-(-sink_keys // layout.block_n), layout.active().shape[1])


def random_block_mask(layout: BlockLayout, seed: int, sink_keys: int = 0) -> ModeMask:
    """Per query block, as many kv blocks as ``layout`` keeps there: the first ``sink_keys`` keys' blocks kept,
    the others chosen uniformly at random (seeded); one draw, shared by every head."""
    active = layout.active()
    blocks = _random_blocks(active, np.random.default_rng(seed), 1, sink_blocks(layout, sink_keys))[0]
    rand = BlockLayout.from_block_mask(blocks, layout.q_len, layout.kv_len, layout.block_m, layout.block_n)
    return ModeMask(rand.to_token_mask(exact=False), float(rand.computed_pairs()))


def _random_blocks(active: np.ndarray, rng: np.random.Generator, heads: int, sinks: int) -> np.ndarray:
    """bool ``[heads, q_blocks, kv_blocks]``: per (head, query block) the ``sinks`` leading kv blocks and
    ``active[row].sum() - sinks`` others, uniformly without replacement."""
    qb, kb = active.shape
    need = active.sum(axis=1).astype(np.int64) - sinks
    if (need < 0).any():
        raise ValueError("the layout drops a sink block; a random layout of equal density cannot keep them all")
    # The k smallest of uniform scores are a uniform k-subset; argsort twice gives each block its rank.
    rank = np.argsort(np.argsort(rng.random((heads, qb, kb - sinks)), axis=-1), axis=-1)
    out = np.zeros((heads, qb, kb), dtype=bool)
    out[:, :, :sinks] = True
    out[:, :, sinks:] = rank < need[None, :, None]
    return out


def random_block_draw(layout: BlockLayout, rows: np.ndarray, heads: int, seed: tuple[int, ...],
                      sink_keys: int) -> torch.Tensor:
    """bool ``[heads, len(rows), kv_len]``: one draw of :func:`random_block_mask` per head (``seed`` names the
    draw, e.g. ``(seed, scale, layer, draw)``), restricted to the query ``rows``: the whole blocks each row's
    query block keeps."""
    blocks = _random_blocks(layout.active(), np.random.default_rng(list(seed)), heads,
                            sink_blocks(layout, sink_keys))
    per_row = torch.from_numpy(np.ascontiguousarray(blocks[:, np.asarray(rows) // layout.block_m]))
    return per_row[..., torch.arange(layout.kv_len) // layout.block_n]


def random_token_mask(counts: torch.Tensor, kv_len: int, seed: int | tuple[int, ...]) -> ModeMask:
    """``[B, H, q_len, kv_len]``: per query ``counts[b, h, q]`` keys chosen uniformly at random (seeded by an
    integer or a tuple such as ``(seed, scale, layer, draw)``)."""
    if not isinstance(seed, int):
        seed = int(np.random.SeedSequence(list(seed)).generate_state(1, dtype=np.uint64)[0] >> 1)
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(*counts.shape, kv_len, generator=g, dtype=torch.float64)
    # Keep the keys whose random score is among the row's ``count`` smallest (scores are distinct a.s.).
    ordered = scores.sort(dim=-1).values
    c = counts.long().clamp(0, kv_len)
    thresh = ordered.gather(-1, (c - 1).clamp_min(0)[..., None])
    mask = (scores <= thresh) & (c[..., None] > 0)
    return ModeMask(mask, float(c.double().sum(dim=-1).mean()))


@dataclass(frozen=True)
class _ModelShape:
    """The model fields :func:`plan_schedule` reads, taken from a plan (so user models work too)."""

    name: str
    family: str
    depth: int
    heads: int
    head_dim: int


def model_shape(plan: Plan) -> _ModelShape:
    """What :func:`~sparvar_compiler.planner.plan.plan_schedule` needs of a model, from one of its plans."""
    return _ModelShape(plan.model, plan.family, plan.depth, plan.heads, plan.head_dim)


@lru_cache(maxsize=16)
def _cs4a_plan_cached(plan_json: str, mode: str, mapping: str) -> Plan:
    plan = Plan.from_dict(json.loads(plan_json))
    cfg = dataclasses.replace(plan.config, bound_layer=plan.depth, cs4a=mode, key_mapping=mapping)
    return plan_schedule(model_shape(plan), Schedule(plan.resolution, plan.aspect, plan.grids),  # type: ignore
                         cfg)


def cs4a_plan(plan: Plan, mode: str, mapping: str) -> Plan:
    """The plan with CS4A (``mode``, ``mapping``) in every layer: the masks of a layer do not depend on whether
    the plan's bound puts that layer below it, so fidelity is measured for every layer alike."""
    return _cs4a_plan_cached(plan.to_json(), mode, mapping)


def cs4a_layer_masks(plan: Plan, q_dec: torch.Tensor, k_dec: torch.Tensor, softmax_scale: float, mode: str,
                     mapping: str, with_decision: bool = True
                     ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """CS4A masks of one layer from :mod:`sparvar_compiler.cs4a.select`: ``({scale: [B, H, tokens, kv_len]},
    decision mask [B, H, tokens_S, kv_len_S] or None)``.

    ``plan`` is a :func:`cs4a_plan`; ``q_dec``/``k_dec`` are the decision scale's q and whole cache k. The
    decision mask (for the residual) is computed only ``with_decision``; with the plan's ``decision_band`` it
    holds the band of :func:`decision_band_mask` too.
    """
    from ..cs4a.select import cs4a_masks, decision_mask

    masks = cs4a_masks(plan, q_dec, k_dec, softmax_scale, mapping=mapping, mode=mode)
    dec = decision_mask(plan, q_dec, k_dec, softmax_scale, mapping=mapping, mode=mode) if with_decision else None
    if dec is not None:
        dec = with_decision_band(plan, mode, dec)
    return masks, dec


@lru_cache(maxsize=16)
def decision_band_mask(plan: Plan) -> torch.Tensor:
    """bool ``[tokens_S, kv_len_S]``: per query group of the decision scale, the keys of that scale within the
    band of the first later scale (``band_windows[0]``-square windows around the group's queries,
    :func:`~sparvar_compiler.planner.cs4a.band_keys`): the band every later CS4A scale keeps of its own scale."""
    from ..planner.cs4a import band_keys

    cfg = plan.config
    dec = plan.scales[cfg.decision_scale]
    window = cfg.band_windows[0] if cfg.band_windows else 1
    out = torch.zeros(dec.tokens, dec.kv_len, dtype=torch.bool)
    for g, keys in enumerate(band_keys(dec.h, dec.w, dec.kv_offset, cfg.group_size, window)):
        out[g * cfg.group_size:(g + 1) * cfg.group_size, torch.from_numpy(keys)] = True
    return out


def with_decision_band(plan: Plan, mode: str, decision: torch.Tensor) -> torch.Tensor:
    """The decision-scale pattern ``[B, H, tokens_S, kv_len_S]`` with the plan's ``decision_band`` applied (token
    CS4A only: D-CSLA's decision rows already keep their diagonal blocks)."""
    if not plan.config.decision_band or mode != "token":
        return decision
    return decision | decision_band_mask(plan)


@lru_cache(maxsize=256)
def _token_tables(plan: Plan, scale: int, mapping: str):
    from ..cs4a.select import token_tables

    return token_tables(plan, scale, mapping)


@lru_cache(maxsize=256)
def _block_tables(plan: Plan, scale: int):
    from ..cs4a.select import block_tables

    return block_tables(plan, scale)


@dataclass(frozen=True)
class RowPattern:
    """What chosen query rows attend to, as table entries: ``entries [B, H, R, C]`` are keys (``unit`` 1) or
    key blocks of ``unit`` keys; only entries where ``valid`` count (they are distinct within a row)."""

    entries: torch.Tensor
    valid: torch.Tensor
    unit: int
    kv_len: int
    keys_per_query: float  # mean over the whole scale, not only the chosen rows

    def mask(self) -> torch.Tensor:
        """bool ``[B, H, R, kv_len]`` (``tables_mask`` of :mod:`sparvar_compiler.cs4a.select` on these rows)."""
        n = -(-self.kv_len // self.unit)
        out = torch.zeros(*self.entries.shape[:3], n + 1, dtype=torch.bool)
        out.scatter_(-1, torch.where(self.valid, self.entries, n), True)
        out = out[..., :n]
        return out if self.unit == 1 else out.repeat_interleave(self.unit, dim=-1)[..., :self.kv_len]

    def mass(self, unit_sums: torch.Tensor) -> torch.Tensor:
        """``[B, H, R]``: the sum of ``unit_sums [B, H, R, kv_len / unit]`` (probabilities summed per unit) over
        the pattern: the captured mass, without building the token mask."""
        picked = unit_sums.gather(-1, torch.where(self.valid, self.entries, 0))
        return (picked * self.valid).sum(-1)


def unit_sums(probs: torch.Tensor, unit: int) -> torch.Tensor:
    """``probs [..., N]`` summed over consecutive runs of ``unit`` keys (the last run may be short)."""
    return probs if unit == 1 else block_mass(probs, unit)


def _row_pattern(num: torch.Tensor, idx: torch.Tensor, row_of: torch.Tensor, kv_len: int, unit: int,
                 keys_per_query: float) -> RowPattern:
    n, ix = num.index_select(2, row_of), idx.index_select(2, row_of).long()
    valid = torch.arange(ix.shape[-1]) < n[..., None].long()
    return RowPattern(ix, valid, unit, kv_len, keys_per_query)


class CS4ASelector:
    """CS4A masks of one layer restricted to chosen query rows, built from the public pieces of
    :mod:`sparvar_compiler.cs4a.select` (the same statistics, selection and tables as ``cs4a_masks``, which a
    test checks). The decision scale's float64 group statistics are computed once and reused for every top-k
    budget and key mapping, which is what makes a calibration search affordable.
    """

    def __init__(self, q_dec: torch.Tensor, k_dec: torch.Tensor, softmax_scale: float) -> None:
        self.q, self.k, self.scale = q_dec, k_dec, softmax_scale
        self._stats: dict[tuple[str, int], torch.Tensor] = {}

    def _statistics(self, plan: Plan, mode: str) -> torch.Tensor:
        from ..cs4a.select import block_mass

        cfg = plan.config
        size = cfg.group_size if mode == "token" else cfg.dcsla_block
        key = (mode, size)
        if key not in self._stats:
            mass = group_mass_reference(self.q, self.k, self.scale, size)
            self._stats[key] = mass if mode == "token" else block_mass(mass, size)
        return self._stats[key]

    def _selection(self, plan: Plan, mode: str):
        from ..cs4a.select import dcsla_select, topk_keys

        cfg = plan.config
        stats = self._statistics(plan, mode)
        if mode == "token":
            return topk_keys(stats, _token_tables(plan, cfg.decision_scale, cfg.key_mapping).topk)
        cap = _block_tables(plan, cfg.decision_scale).select_capacity
        return dcsla_select(stats, cfg.dcsla_coverage, cfg.dcsla_min_blocks, cap)

    @staticmethod
    def _tables(plan: Plan, s: int, mode: str, mapping: str, sel):
        """``(num, idx, queries per table row, key block or None)`` of scale ``s``."""
        if mode == "token":
            t = _token_tables(plan, s, mapping)
            num, idx = t.fill(sel)
            return num, idx, t.group_size, None
        b = _block_tables(plan, s)
        num, idx = b.fill(*sel)
        return num, idx, b.block, b.block

    def decision_mask(self, plan: Plan, mode: str) -> torch.Tensor:
        """bool ``[B, H, tokens_S, kv_len_S]``: the pattern at the decision scale (for the residual), with the
        plan's ``decision_band``."""
        S = plan.config.decision_scale
        num, idx, size, block_n = self._tables(plan, S, mode, "identity", self._selection(plan, mode))
        rows = torch.from_numpy(np.arange(plan.scales[S].tokens) // size)
        return with_decision_band(plan, mode, _row_pattern(num, idx, rows, plan.scales[S].kv_len, block_n or 1,
                                                           0.0).mask())

    def patterns(self, plan: Plan, mode: str, mapping: str, rows: dict[int, np.ndarray]) -> dict[int, RowPattern]:
        """Per CS4A scale in ``rows``: the :class:`RowPattern` of those query rows.

        ``plan`` is a :func:`cs4a_plan` of ``mode`` and ``mapping``.
        """
        cfg = plan.config
        sel = self._selection(plan, mode)
        out = {}
        for s, r in rows.items():
            sp = plan.scales[s]
            if s <= cfg.decision_scale or Mode.CS4A not in sp.modes:
                continue
            num, idx, size, block_n = self._tables(plan, s, mode, mapping, sel)
            # Kept keys per query over the whole scale (every query of a table row keeps the same keys).
            sizes = torch.from_numpy(np.minimum(size, sp.tokens - np.arange(num.shape[2]) * size)).double()
            if block_n is None:
                per_row = num.double()
            else:  # key blocks: count the keys each holds (the last one is short)
                valid = torch.arange(idx.shape[-1]) < num[..., None].long()
                width = (sp.kv_len - idx.long() * block_n).clamp(max=block_n)
                per_row = (width * valid).sum(-1).double()
            keys = float((per_row * sizes).sum(-1).mean()) / sp.tokens
            out[s] = _row_pattern(num, idx, torch.from_numpy(np.asarray(r) // size), sp.kv_len, block_n or 1, keys)
        return out

    def masks(self, plan: Plan, mode: str, mapping: str, rows: dict[int, np.ndarray]
              ) -> dict[int, tuple[torch.Tensor, float]]:
        """Per CS4A scale in ``rows``: ``(mask [B, H, len(rows), kv_len], mean kept keys per query)``."""
        return {s: (p.mask(), p.keys_per_query) for s, p in self.patterns(plan, mode, mapping, rows).items()}
