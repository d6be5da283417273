"""Evaluate every plan mode on q/k/v (captures or synthetic): captured mass and output error per head.

For each layer and each evaluated query scale the dense float64 attention of a sample of query rows is the
reference; every mode's mask (:mod:`.masks`) is applied to the same rows. CS4A modes select from the decision
scale of the same layer (all of its rows) and, when the plan's ``residual`` option is on, add the decision
scale's upsampled residual ``O_dense - O_sparse`` as SparVAR does; the error of the other choice is recorded
beside it (``rel_l2_no_residual`` or ``rel_l2_with_residual``), so that the residual can be judged by measured
error. The random baselines are drawn ``random_draws`` times per (layer, head) and reported as mean and
standard deviation over the draws (:mod:`.masks` says what each keeps). Skipped scales (``skip_last``) have no
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
from ..planner.layout import BlockLayout
from ..planner.plan import Mode, Plan
from ..planner.schedules import Schedule
from .masks import CS4ASelector, ModeMask, cs4a_plan, csla_masks, random_block_draw, random_token_mask
from .modes import ALL_MODES, CS4A_VARIANTS, DEFAULT_MODES  # noqa: F401 - re-exported
from .metrics import captured_mass, cosine_similarity, logits64, relative_l2, softmax64, sparse_attention



class AttentionSource(Protocol):
    """What the evaluation reads: a capture directory or a synthetic generator. ``softmax_scale_source`` (optional)
    says where ``softmax_scale`` came from; every report prints both."""

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
    outputs' errors (False: captured mass only, cheaper). ``random_draws``: draws of each random baseline per
    (layer, head), reported as mean and standard deviation.
    """

    block: int = 128
    query_sample: int = 512
    modes: tuple[str, ...] = DEFAULT_MODES
    scales: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None
    seed: int = 0
    errors: bool = True
    random_draws: int = 8

    def __post_init__(self) -> None:
        # A negative sample once meant "all rows" by accident; the block must be a layout block side.
        sample = self.query_sample
        if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or sample < 0:
            raise SparvarError(f"query_sample must be an integer >= 0 (0 = all rows), got {self.query_sample!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, (int, np.integer)) or self.block < 1:
            raise SparvarError(f"block must be a positive integer, got {self.block!r}")
        draws = self.random_draws
        if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or not 1 <= draws <= 1000:
            raise SparvarError(f"random_draws must be an integer in 1..1000, got {draws!r}")


@dataclass
class Record:
    """One (scale, layer, head, mode) figure. Masses are means (and the minimum) over the sampled rows. For the
    random modes every figure is the mean over ``draws`` draws and ``*_sd`` its standard deviation (ddof 1);
    ``mass_min`` is then the worst row of any draw. For CS4A, ``rel_l2`` is with the residual if the plan adds
    it, and ``rel_l2_no_residual`` / ``rel_l2_with_residual`` is the other choice."""

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
    rel_l2_with_residual: float | None = None
    plan_mode: str | None = None  # for "sparvar": the plan's mode of this (scale, layer)
    mass_sd: float | None = None
    rel_l2_sd: float | None = None
    cosine_sd: float | None = None
    draws: int | None = None

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
    softmax_scale: float | None = None
    softmax_scale_source: str | None = None


def softmax_scale_of(source: AttentionSource) -> tuple[float, str]:
    """``(scale, where it came from)`` of a source (a source that does not say is reported as such)."""
    where = getattr(source, "softmax_scale_source", None)
    return float(source.softmax_scale), str(where) if where else "not stated by the source"


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
    ev.softmax_scale, ev.softmax_scale_source = softmax_scale_of(source)
    modes = list(options.modes)
    static: dict[int, tuple[dict[str, ModeMask], BlockLayout]] = {}
    row_sel = {s: sample_rows(plan.scales[s].tokens, options.query_sample, options.seed, s) for s in scales}
    ev.rows = {s: int(len(r)) for s, r in row_sel.items()}
    skipped = [s for s in scales if plan.scales[s].modes[0] == Mode.SKIPPED]
    last_computed = min(skipped) - 1 if skipped else None
    for li, layer in enumerate(layers):
        tl = time.perf_counter()
        regime = source.regime(layer)
        cs4a_state = _LayerCS4A(source, plan, layer, row_sel, options.errors)
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


def _static_masks(plan: Plan, s: int, options: EvalOptions, modes: list[str]
                  ) -> tuple[dict[str, ModeMask], BlockLayout]:
    """The CSLA masks of scale ``s`` and the block layout the random baseline draws its equal density from."""
    return dict(csla_masks(plan, s, options.block)), csla_layout(plan, s, options.block, options.block)


class _LayerCS4A(dict):
    """Per CS4A variant of one layer, computed on first use: ``(plan, {scale: (mask of the evaluated rows
    [B, H, R, kv_len], mean kept keys per query over the whole scale)}, decision residual or None)``.

    The patterns come from one :class:`~.masks.CS4ASelector` per layer (the decision scale's statistics computed
    once for every variant), restricted to the evaluated rows; a test checks them against
    :func:`sparvar_compiler.cs4a.select.cs4a_masks`."""

    def __init__(self, source: AttentionSource, plan: Plan, layer: int, rows: dict[int, np.ndarray],
                 errors: bool = True) -> None:
        super().__init__()
        self.source, self.plan, self.layer, self.rows, self.errors = source, plan, layer, rows, errors
        self._dec: tuple[CS4ASelector, _Dense | None] | None = None

    def __missing__(self, name: str):
        if self._dec is None:
            q, k, v = self.source.qkv(self.plan.config.decision_scale, self.layer)
            selector = CS4ASelector(torch.from_numpy(np.asarray(q)), torch.from_numpy(np.asarray(k)),
                                    self.source.softmax_scale)
            self._dec = (selector, _dense(q, k, v, self.source.softmax_scale) if self.errors else None)
        selector, dense = self._dec
        mode, mapping = CS4A_VARIANTS[name]
        cplan = cs4a_plan(self.plan, mode, mapping)
        S = cplan.config.decision_scale
        masks = selector.masks(cplan, mode, mapping, {s: r for s, r in self.rows.items() if s > S})
        residual = None
        if dense is not None:
            # Kept whether or not the plan adds it: the record carries the error of both choices.
            dec = selector.decision_mask(cplan, mode)
            residual = dense.out - sparse_attention(dense.probs, dense.logits, dense.v, dec)[1]
        self[name] = (cplan, masks, residual)
        return self[name]


def _add(ev: Evaluation, s: int, layer: int, regime: str, mode: str, mass, out, dense: _Dense, density: float,
         other=None, plan_residual: bool = True, plan_mode: str | None = None) -> None:
    """Records of one (scale, layer, mode), one per head; ``other`` is the CS4A output with the residual choice
    the plan did not make."""
    heads = mass.shape[1]
    rel = relative_l2(out, dense.out) if out is not None else None
    cos = cosine_similarity(out, dense.out) if out is not None else None
    rel_other = relative_l2(other, dense.out) if other is not None and out is not None else None
    for h in range(heads):
        alt = None if rel_other is None else float(rel_other[h])
        ev.records.append(Record(
            s, layer, h, mode, regime, mass=float(mass[:, h].mean()), mass_min=float(mass[:, h].min()),
            rel_l2=None if rel is None else float(rel[h]), cosine=None if cos is None else float(cos[h]),
            density=density, rel_l2_no_residual=alt if plan_residual else None,
            rel_l2_with_residual=None if plan_residual else alt, plan_mode=plan_mode))


def _add_draws(ev: Evaluation, s: int, layer: int, regime: str, mode: str, dense: _Dense, density: float,
               draw, draws: int, plan_mode: str | None = None) -> None:
    """Records of a random baseline: ``draw(d)`` gives draw ``d``'s mask (broadcastable to ``[B, H, R, N]``);
    per head the mean and standard deviation over the draws."""
    heads = dense.probs.shape[1]
    mass, mins, rel, cos = (np.zeros((draws, heads)) for _ in range(4))
    for d in range(draws):
        m, out = _sparse(dense, draw(d))
        mass[d] = m.mean(dim=(0, 2)).numpy()
        mins[d] = m.amin(dim=(0, 2)).numpy()
        if out is not None:
            rel[d] = relative_l2(out, dense.out).numpy()
            cos[d] = cosine_similarity(out, dense.out).numpy()
    ddof = 1 if draws > 1 else 0
    errors = dense.v is not None
    for h in range(heads):
        ev.records.append(Record(
            s, layer, h, mode, regime, mass=float(mass[:, h].mean()), mass_min=float(mins[:, h].min()),
            rel_l2=float(rel[:, h].mean()) if errors else None, cosine=float(cos[:, h].mean()) if errors else None,
            density=density, plan_mode=plan_mode, mass_sd=float(mass[:, h].std(ddof=ddof)),
            rel_l2_sd=float(rel[:, h].std(ddof=ddof)) if errors else None,
            cosine_sd=float(cos[:, h].std(ddof=ddof)) if errors else None, draws=draws))


def _mode_records(ev: Evaluation, plan: Plan, s: int, layer: int, regime: str, mode: str, rows: np.ndarray,
                  dense: _Dense, static: tuple[dict[str, ModeMask], BlockLayout], cs4a_state: dict[str, Any],
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
    masks, layout = static
    if mode_eff in masks:
        mm = masks[mode_eff]
        mask = torch.from_numpy(np.ascontiguousarray(np.asarray(mm.mask)[rows]))
        mass, out = _sparse(dense, mask)
        _add(ev, s, layer, regime, mode, mass, out, dense, mm.density(sp.tokens, sp.kv_len), plan_mode=plan_mode)
        return
    if mode_eff == "random":
        sink_keys = plan.scales[plan.config.sink_scales].kv_offset if plan.config.sink_scales else 0
        heads = dense.probs.shape[1]
        _add_draws(ev, s, layer, regime, mode, dense, layout.computed_pairs() / full,
                   lambda d: random_block_draw(layout, rows, heads, (options.seed, s, layer, d), sink_keys)[None],
                   options.random_draws)
        return
    if mode_eff in CS4A_VARIANTS or mode_eff == "random_cs4a":
        if s <= plan.config.decision_scale:
            return  # CS4A applies after the decision scale only
        name = "cs4a_token" if mode_eff == "random_cs4a" else mode_eff
        cplan, masks, residual = cs4a_state[name]
        mask, keys_per_query = masks[s]
        idx = torch.from_numpy(rows)
        density = keys_per_query / sp.kv_len
        if mode_eff == "random_cs4a":
            counts = mask.sum(-1, dtype=torch.int64)
            _add_draws(ev, s, layer, regime, mode, dense, density,
                       lambda d: random_token_mask(counts, sp.kv_len, (options.seed, s, layer, d)).mask,
                       options.random_draws, plan_mode=plan_mode)
            return
        from ..cs4a.select import upsample_residual

        mass, out0 = _sparse(dense, mask)
        out, other = out0, None
        if out0 is not None and residual is not None:
            with_res = out0 + upsample_residual(residual, cplan, s).index_select(2, idx)
            out, other = (with_res, out0) if plan.config.residual else (out0, with_res)
        _add(ev, s, layer, regime, mode, mass, out, dense, density, other=other,
             plan_residual=plan.config.residual, plan_mode=plan_mode)


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
