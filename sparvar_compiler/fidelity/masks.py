"""What each plan mode attends to, as boolean token masks ``[q_len, kv_len]``, and what it costs.

Modes (one query scale of one layer):

* ``csla_block``: the CSLA layout with every active block whole (SparVAR's kernel).
* ``csla_exact``: the same blocks, partial ones masked to the exact CSLA token mask (``token_exact``).
* ``csla_gather``: the key-gather kernel: every query of a block attends to the union of the keys its block
  keeps (:func:`sparvar_compiler.codegen.triton_backend.kernel_mask`); fewer keys than whole blocks.
* ``random``: as many kv blocks per query block as ``csla_block``, at random positions (seeded): the baseline a
  structured layout must beat at equal density.
* ``cs4a_token[_flat|_dap]`` / ``cs4a_block``: dynamic CS4A from the decision scale (token top-k with a key
  mapping; D-CSLA blocks), from :mod:`sparvar_compiler.cs4a.select`.
* ``random_cs4a``: per query as many keys as ``cs4a_token`` keeps, uniformly at random.

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
from ..planner.csla import csla_layout
from ..planner.layout import BlockLayout
from ..planner.plan import Plan, plan_schedule
from ..planner.schedules import Schedule
from .modes import CS4A_VARIANTS, CSLA_MODES  # noqa: F401 - re-exported

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


def random_block_mask(layout: BlockLayout, seed: int) -> ModeMask:
    """Per query block, as many kv blocks as ``layout`` keeps there, chosen uniformly at random (seeded)."""
    rng = np.random.default_rng(seed)
    active = layout.active()
    out = np.zeros_like(active)
    for i, n in enumerate(active.sum(axis=1)):
        out[i, rng.choice(active.shape[1], size=int(n), replace=False)] = True
    rand = BlockLayout.from_block_mask(out, layout.q_len, layout.kv_len, layout.block_m, layout.block_n)
    return ModeMask(rand.to_token_mask(exact=False), float(rand.computed_pairs()))


def random_token_mask(counts: torch.Tensor, kv_len: int, seed: int) -> ModeMask:
    """``[B, H, q_len, kv_len]``: per query ``counts[b, h, q]`` keys chosen uniformly at random (seeded)."""
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


@lru_cache(maxsize=16)
def _cs4a_plan_cached(plan_json: str, mode: str, mapping: str) -> Plan:
    plan = Plan.from_dict(json.loads(plan_json))
    cfg = dataclasses.replace(plan.config, bound_layer=plan.depth, cs4a=mode, key_mapping=mapping)
    shape = _ModelShape(plan.model, plan.family, plan.depth, plan.heads, plan.head_dim)
    return plan_schedule(shape, Schedule(plan.resolution, plan.aspect, plan.grids), cfg)  # type: ignore[arg-type]


def cs4a_plan(plan: Plan, mode: str, mapping: str) -> Plan:
    """The plan with CS4A (``mode``, ``mapping``) in every layer: the masks of a layer do not depend on whether
    the plan's bound puts that layer below it, so fidelity is measured for every layer alike."""
    return _cs4a_plan_cached(plan.to_json(), mode, mapping)


@lru_cache(maxsize=1)
def cs4a_available() -> bool:
    """True if :mod:`sparvar_compiler.cs4a.select` (the dynamic CS4A selection) can be imported."""
    try:
        from ..cs4a import select  # noqa: F401
    except ImportError:
        return False
    return True


def cs4a_layer_masks(plan: Plan, q_dec: torch.Tensor, k_dec: torch.Tensor, softmax_scale: float, mode: str,
                     mapping: str) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """CS4A masks of one layer: ``({scale: [B, H, tokens, kv_len]}, decision mask [B, H, tokens_S, kv_len_S])``.

    ``plan`` is a :func:`cs4a_plan`; ``q_dec``/``k_dec`` are the decision scale's q and whole cache k.
    """
    from ..cs4a.select import cs4a_masks, decision_mask

    masks = cs4a_masks(plan, q_dec, k_dec, softmax_scale, mapping=mapping, mode=mode)
    dec = decision_mask(plan, q_dec, k_dec, softmax_scale, mapping=mapping, mode=mode)
    return masks, dec
