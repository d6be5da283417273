"""Evaluate every plan mode on q/k/v (captures or synthetic): captured mass and output error per head.

For each layer and each evaluated query scale the dense float64 attention of a sample of query rows is the
reference; every mode's mask (:mod:`.masks`) is applied to the same rows. CS4A modes select from the decision
scale of the same layer (all of its rows) and, when the plan's ``residual`` option is on, add the decision
scale's upsampled residual ``O_dense - O_sparse`` as SparVAR does. Skipped scales (``skip_last``) have no
attention to measure: they are reported as skipped, with ``skip_upsample``: the error of replacing the scale's
dense attention output by the upsampled output of the last computed scale (a proxy, not the model's output).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch

from ..errors import SparvarError
from ..planner.csla import csla_layout
from ..planner.plan import Mode, Plan
from ..planner.schedules import Schedule
from .masks import (ModeMask, cs4a_layer_masks, cs4a_plan, csla_masks, random_block_mask,
                    random_token_mask)
from .modes import ALL_MODES, CS4A_VARIANTS, DEFAULT_MODES  # noqa: F401 - re-exported
from .metrics import captured_mass, cosine_similarity, logits64, masked_output, relative_l2, softmax64, sparse_attention



class AttentionSource(Protocol):
    """What the evaluation reads: a capture directory or a synthetic generator."""

    schedule: Schedule
    softmax_scale: float
    layers: tuple[int, ...]

    def qkv(self, scale: int, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
    def shape(self) -> tuple[int, int, int]: ...
    def regime(self, layer: int) -> str: ...
    def release(self, layer: int | None = None) -> None: ...
    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate.

    ``query_sample``: at most this many query rows per scale (seeded, the same rows for every layer and mode;
    0 = all rows). ``scales``: query scales (default: the decision scale to the last). ``layers``: default all
    the source has. ``block``: layout block side for the CSLA and random modes. ``errors``: also compute the
    outputs' errors (False: captured mass only, cheaper).
    """

    block: int = 128
    query_sample: int = 512
    modes: tuple[str, ...] = DEFAULT_MODES
    scales: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None
    seed: int = 0
    errors: bool = True

    def __post_init__(self) -> None:
        # A negative sample once meant "all rows" by accident; the block must be a layout block side.
        sample = self.query_sample
        if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or sample < 0:
            raise SparvarError(f"query_sample must be an integer >= 0 (0 = all rows), got {self.query_sample!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, (int, np.integer)) or self.block < 1:
            raise SparvarError(f"block must be a positive integer, got {self.block!r}")


@dataclass
class Record:
    """One (scale, layer, head, mode) figure. Masses are means (and the minimum) over the sampled rows."""

    scale: int
    layer: int
    head: int
    mode: str
    regime: str
    status: str = "ok"  # "ok", "skipped" (scale skipped by the plan)
    mass: float | None = None
    mass_min: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None
    density: float | None = None
    rel_l2_no_residual: float | None = None
    plan_mode: str | None = None  # for "sparvar": the plan's mode of this (scale, layer)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def sample_rows(tokens: int, limit: int, seed: int, scale: int) -> np.ndarray:
    """Sorted query rows to evaluate: all if ``limit`` is 0 or not smaller, else a seeded random subset."""
    if limit <= 0 or tokens <= limit:
        return np.arange(tokens)
    return np.sort(np.random.default_rng([seed, scale]).choice(tokens, size=limit, replace=False))


def default_scales(plan: Plan) -> tuple[int, ...]:
    S = plan.config.decision_scale
    assert S is not None
    return tuple(range(S, plan.num_scales))


def _check_modes(modes: tuple[str, ...]) -> None:
    for m in modes:
        if m not in ALL_MODES:
            raise SparvarError(f"unknown mode {m!r}; known: {', '.join(ALL_MODES)}")


@dataclass
class _Dense:
    logits: torch.Tensor
    probs: torch.Tensor
    out: torch.Tensor
    v: torch.Tensor


def _dense(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, outputs: bool = True) -> _Dense:
    L = logits64(torch.from_numpy(np.asarray(q)), torch.from_numpy(np.asarray(k)), scale)
    P = softmax64(L)
    if not outputs:
        return _Dense(L, P, None, None)  # type: ignore[arg-type]
    V = torch.from_numpy(np.asarray(v)).double()
    return _Dense(L, P, torch.matmul(P, V), V)


@dataclass
class Evaluation:
    """The records of one evaluation and what produced them."""

    plan: Plan
    options: EvalOptions
    source: dict[str, Any]
    records: list[Record] = field(default_factory=list)
    rows: dict[int, int] = field(default_factory=dict)  # scale -> rows evaluated
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def evaluate(source: AttentionSource, plan: Plan, options: EvalOptions = EvalOptions(),
             progress: Callable[[str], None] | None = print) -> Evaluation:
    """Evaluate ``options.modes`` on every (scale, layer) asked for; see the module docstring."""
    _check_modes(options.modes)
    t0 = time.perf_counter()
    cfg = plan.config
    S = cfg.decision_scale
    assert S is not None
    scales = options.scales or default_scales(plan)
    layers = options.layers or source.layers
    missing = [layer for layer in layers if layer not in source.layers]
    if missing:
        raise SparvarError(f"layer {missing[0]} is not in the data (layers {list(source.layers)})")
    if hasattr(source, "require"):
        source.require(sorted(set(scales) | {S}), layers)  # type: ignore[attr-defined]
    ev = Evaluation(plan, options, source.describe())
    modes = list(options.modes)
    static: dict[int, dict[str, ModeMask]] = {}
    row_sel = {s: sample_rows(plan.scales[s].tokens, options.query_sample, options.seed, s) for s in scales}
    ev.rows = {s: int(len(r)) for s, r in row_sel.items()}
    skipped = [s for s in scales if plan.scales[s].modes[0] == Mode.SKIPPED]
    last_computed = min(skipped) - 1 if skipped else None
    for li, layer in enumerate(layers):
        tl = time.perf_counter()
        regime = source.regime(layer)
        cs4a_state = _LayerCS4A(source, plan, layer, options.errors)
        prev_out = None
        if skipped and options.errors:
            q, k, v = source.qkv(last_computed, layer)
            prev_out = _dense(q, k, v, source.softmax_scale).out
        for s in scales:
            rows = row_sel[s]
            q, k, v = source.qkv(s, layer)
            dense = _dense(np.asarray(q)[:, :, rows], k, v, source.softmax_scale, options.errors)
            if s in skipped:
                _skip_records(ev, plan, s, layer, regime, rows, dense, prev_out, last_computed)
                continue
            if s not in static:
                static[s] = _static_masks(plan, s, options, modes)
            for mode in modes:
                _mode_records(ev, plan, s, layer, regime, mode, rows, dense, static[s], cs4a_state, options)
            del dense
        source.release(layer)
        if progress:
            progress(f"  layer {layer:3d} ({regime}): {len(scales)} scales in {time.perf_counter() - tl:.1f} s "
                     f"[{li + 1}/{len(layers)}]")
    ev.seconds = time.perf_counter() - t0
    return ev


def _plan_cs4a_mode(plan: Plan) -> str:
    for name, (mode, mapping) in CS4A_VARIANTS.items():
        if mode == plan.config.cs4a and mapping == plan.config.key_mapping:
            return name
    raise SparvarError(f"no CS4A variant for cs4a={plan.config.cs4a} key_mapping={plan.config.key_mapping}")


def _static_masks(plan: Plan, s: int, options: EvalOptions, modes: list[str]) -> dict[str, ModeMask]:
    out = dict(csla_masks(plan, s, options.block))
    if "random" in modes:
        out["random"] = random_block_mask(csla_layout(plan, s, options.block, options.block), options.seed + s)
    return out


class _LayerCS4A(dict):
    """Per CS4A variant of one layer, computed on first use: ``(plan, masks by scale, decision residual)``."""

    def __init__(self, source: AttentionSource, plan: Plan, layer: int, errors: bool = True) -> None:
        super().__init__()
        self.source, self.plan, self.layer, self.errors = source, plan, layer, errors
        self._dec: tuple[torch.Tensor, torch.Tensor, _Dense] | None = None

    def __missing__(self, name: str):
        if self._dec is None:
            q, k, v = self.source.qkv(self.plan.config.decision_scale, self.layer)
            self._dec = (torch.from_numpy(np.asarray(q)), torch.from_numpy(np.asarray(k)),
                         _dense(q, k, v, self.source.softmax_scale) if self.errors else None)
        qt, kt, dense = self._dec
        mode, mapping = CS4A_VARIANTS[name]
        cplan = cs4a_plan(self.plan, mode, mapping)
        masks, dec = cs4a_layer_masks(cplan, qt, kt, self.source.softmax_scale, mode, mapping, self.errors)
        residual = dense.out - masked_output(dense.logits, dense.v, dec) if dec is not None else None
        self[name] = (cplan, masks, residual)
        return self[name]


def _add(ev: Evaluation, s: int, layer: int, regime: str, mode: str, mass, out, dense: _Dense, density: float,
         no_residual=None, plan_mode: str | None = None) -> None:
    heads = mass.shape[1]
    rel = relative_l2(out, dense.out) if out is not None else None
    cos = cosine_similarity(out, dense.out) if out is not None else None
    rel0 = relative_l2(no_residual, dense.out) if no_residual is not None and out is not None else None
    for h in range(heads):
        ev.records.append(Record(
            s, layer, h, mode, regime, mass=float(mass[:, h].mean()), mass_min=float(mass[:, h].min()),
            rel_l2=None if rel is None else float(rel[h]), cosine=None if cos is None else float(cos[h]),
            density=density, rel_l2_no_residual=None if rel0 is None else float(rel0[h]), plan_mode=plan_mode))


def _mode_records(ev: Evaluation, plan: Plan, s: int, layer: int, regime: str, mode: str, rows: np.ndarray,
                  dense: _Dense, static: dict[str, ModeMask], cs4a_state: dict[str, Any],
                  options: EvalOptions) -> None:
    sp = plan.scales[s]
    full = sp.tokens * sp.kv_len
    plan_mode = None
    if mode == "sparvar":
        pm = sp.modes[layer]
        plan_mode = pm.value
        if pm in (Mode.DENSE, Mode.DECISION):
            mode_eff = "dense"
        elif pm == Mode.CSLA:
            mode_eff = "csla_exact" if plan.config.token_exact else "csla_block"
        else:
            mode_eff = _plan_cs4a_mode(plan)
    else:
        mode_eff = mode
    if mode_eff == "dense":
        ones = torch.ones(dense.probs.shape[:3], dtype=torch.float64)
        _add(ev, s, layer, regime, mode, ones, dense.out, dense, 1.0, plan_mode=plan_mode)
        return
    if mode_eff in static:
        mm = static[mode_eff]
        mask = torch.from_numpy(np.ascontiguousarray(np.asarray(mm.mask)[rows]))
        mass, out = _sparse(dense, mask)
        _add(ev, s, layer, regime, mode, mass, out, dense, mm.density(sp.tokens, sp.kv_len), plan_mode=plan_mode)
        return
    if mode_eff in CS4A_VARIANTS or mode_eff == "random_cs4a":
        if s <= plan.config.decision_scale:
            return  # CS4A applies after the decision scale only
        name = "cs4a_token" if mode_eff == "random_cs4a" else mode_eff
        cplan, masks, residual = cs4a_state[name]
        full_mask = masks[s]
        idx = torch.from_numpy(rows)
        mask = full_mask.index_select(2, idx)
        if mode_eff == "random_cs4a":
            rnd = random_token_mask(mask.sum(-1, dtype=torch.int64), sp.kv_len, options.seed + 1000 * s + layer)
            mass, out = _sparse(dense, rnd.mask)
            _add(ev, s, layer, regime, mode, mass, out, dense,
                 float(full_mask.count_nonzero()) / (full_mask.shape[0] * full_mask.shape[1] * full), plan_mode=plan_mode)
            return
        from ..cs4a.select import upsample_residual

        mass, out0 = _sparse(dense, mask)
        out = out0
        if plan.config.residual and out0 is not None:
            out = out0 + upsample_residual(residual, cplan, s).index_select(2, idx)
        density = float(full_mask.count_nonzero()) / (full_mask.shape[0] * full_mask.shape[1] * full)
        _add(ev, s, layer, regime, mode, mass, out, dense, density,
             no_residual=out0 if plan.config.residual else None, plan_mode=plan_mode)


def _sparse(dense: _Dense, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(captured mass, sparse output)``; the output is None when the evaluation skips errors."""
    if dense.v is None:
        return captured_mass(dense.probs, mask), None
    return sparse_attention(dense.probs, dense.logits, dense.v, mask)


def _skip_records(ev: Evaluation, plan: Plan, s: int, layer: int, regime: str, rows: np.ndarray, dense: _Dense,
                  prev_out: torch.Tensor | None, prev_scale: int | None) -> None:
    from ..cs4a.select import upsample_grid

    ev.records.append(Record(s, layer, -1, "sparvar", regime, status="skipped", plan_mode="skipped"))
    if prev_out is None or prev_scale is None or dense.out is None:
        return
    src, dst = plan.scales[prev_scale], plan.scales[s]
    up = upsample_grid(prev_out, (src.h, src.w), (dst.h, dst.w)).index_select(2, torch.from_numpy(rows))
    rel, cos = relative_l2(up, dense.out), cosine_similarity(up, dense.out)
    for h in range(rel.shape[0]):
        ev.records.append(Record(s, layer, h, "skip_upsample", regime, rel_l2=float(rel[h]), cosine=float(cos[h]),
                                 density=0.0))
