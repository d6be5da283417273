"""Recommend a plan config: the least attention cost whose fidelity on the given q/k/v keeps a floor on captured
mass and a cap on output error.

Search (Optuna TPE, seeded) over the SparVAR knobs: ``decision_scale``, ``bound_layer``, the CSLA ``windows``
(every kept window grown by ``2 * window_growth``; ``window_extra_scales`` more key scales before the first kept
one get a window of 1), the kernel block size (64 or 128), CS4A's ``topk_fraction`` and whether CS4A adds the
decision scale's ``residual`` (on and off are both searched and judged by measured error), and, when asked,
``decision_band`` (the decision-scale pattern with the later scales' local band; the runtime does not run it yet,
so it is not searched by default). Other options come from the base config unchanged.

* **Cost**: (query, key) pairs the plan's kernels compute over one image's self-attention (every scale and
  layer), as a fraction of dense: whole active blocks for CSLA, the measured mean keys per query for CS4A (and,
  with the residual on, the decision scale's sparse pass it is taken against, in every CS4A layer), 0 for
  skipped scales, everything for dense ones. FLOPs are proportional (4 * head_dim per pair). So the residual
  is a trade: it costs pairs and is kept only where the measured error pays for them.
* **Fidelity** of a (scale, layer): the head means of the captured softmax mass and of the relative L2 error of
  the output vs dense (CS4A with its residual when the candidate adds it) of the plan's mode there, over the
  sampled query rows; dense (scale, layer)s count as mass 1, error 0. The floor applies to the worst evaluated
  (scale, layer) (``aggregate="min"``, default: the least mass and, separately, the largest error) or to the
  means.
* **The error cap is on by default** (:data:`~.modes.DEFAULT_MAX_ERROR` = 0.45, relative L2 of the worst
  (scale, layer)): a mass floor alone passes plans whose output is far off (a searched CS4A setting kept 0.896
  of the mass at relative L2 0.50). The value comes from the synthetic presets at Infinity-2B
  (``bench/fidelity_presets.py``, ``cap_evidence`` in ``bench/results/fidelity-calibrate.json``): the search
  candidates meeting the 0.9 mass floor reach worst errors of 0.12-0.40 on ``local`` (the cheapest 0.39),
  0.11-0.35 on ``mixed`` (0.35) and 0.04-0.09 on ``content`` (none meets it on ``content-fresh``), while the
  default plan's worst is 0.44 on ``local`` and ``mixed`` (its scale-10 CSLA layout in local layers, at mass
  0.87). So 0.45 refuses no plan that is as faithful as the mass floor implies on these regimes, and refuses
  one that keeps the mass but loses more of the output than SparVAR's own setting does on local heads. Synthetic
  values are white noise, so a given mass costs more relative L2 there than with a real model's correlated
  values: on real captures this cap is loose; read your own report and tighten it (``--max-error``), or turn
  it off (``off``).
* Trials that miss the floor are infeasible (Optuna's constraint, so TPE learns the boundary); a trial's error
  is measured only when its mass meets the floor (the others miss it already). The search runs on a subset of
  layers (``search_layers``) with cached dense probabilities; the best feasible candidates are
  then **verified** with :func:`~sparvar_compiler.fidelity.evaluate.evaluate` on every layer of the data, and
  the first that meets the floor is returned with its mass, error and cosine per scale and aggregated, and,
  per group of CS4A layers, the error with and without the residual. If none does, the dense plan
  (``bound_layer = depth``, ``cs4a: off``: mass 1, error 0) is returned and the result says why: a plan above
  the floor or the cap is never returned. The guarantee is on the data given (the sampled rows of the captured
  layers and heads), nothing more.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from ..cli_args import mask_url
from ..errors import SparvarError
from ..planner.config import PlanConfig
from ..planner.csla import csla_layout
from ..planner.plan import Mode, Plan, plan_schedule
from ..planner.schedules import Schedule
from .evaluate import AttentionSource, EvalOptions, evaluate, sample_rows, softmax_scale_of
from .masks import CS4ASelector, cs4a_plan, model_shape, unit_sums
from .modes import CS4A_VARIANTS, DEFAULT_MAX_ERROR
from .metrics import logits64, relative_l2, softmax64, sparse_attention

AGGREGATES = ("min", "mean")
#: CS4A layers are split into at most this many consecutive groups when the residual's effect is reported.
RESIDUAL_GROUPS = 4


@dataclass(frozen=True)
class Floor:
    """The fidelity a recommended plan must keep (``None`` disables a bound; the error cap is on by default,
    :data:`DEFAULT_MAX_ERROR`)."""

    min_mass: float | None = 0.9
    max_rel_error: float | None = DEFAULT_MAX_ERROR
    aggregate: str = "min"

    def __post_init__(self) -> None:
        if self.min_mass is None and self.max_rel_error is None:
            raise SparvarError("a fidelity floor needs --min-mass and/or --max-error")
        if self.min_mass is not None and not 0 < self.min_mass <= 1:
            raise SparvarError(f"min_mass must be in (0, 1], got {self.min_mass}")
        if self.max_rel_error is not None and not self.max_rel_error > 0:
            raise SparvarError(f"max_rel_error must be positive, got {self.max_rel_error}")
        if self.aggregate not in AGGREGATES:
            raise SparvarError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}")

    def violation(self, mass: float, rel_error: float | None) -> float:
        """How far the figures miss the floor (<= 0: met)."""
        v = -math.inf
        if self.min_mass is not None:
            v = max(v, self.min_mass - mass)
        if self.max_rel_error is not None:
            v = max(v, (math.inf if rel_error is None else rel_error) - self.max_rel_error)
        return v

    def aggregate_values(self, values: list[float]) -> float:
        return float(min(values) if self.aggregate == "min" else np.mean(values))

    def describe(self) -> str:
        parts = []
        if self.min_mass is not None:
            parts.append(f"captured mass >= {self.min_mass}")
        if self.max_rel_error is not None:
            parts.append(f"relative L2 error <= {self.max_rel_error}")
        how = ("on the worst evaluated (scale, layer)" if self.aggregate == "min"
               else "on the mean over the evaluated (scale, layer)s")
        return f"{' and '.join(parts)} ({how}, of the head mean)"


@dataclass(frozen=True)
class SearchSpace:
    """The values each knob may take."""

    decision_scales: tuple[int, ...]
    window_growth: tuple[int, ...] = (0, 1, 2, 3)
    window_extra_scales: tuple[int, ...] = (0, 1, 2)
    blocks: tuple[int, ...] = (64, 128)
    topk_fractions: tuple[float, ...] = (0.1, 0.15, 0.2, 0.3, 0.4)
    residuals: tuple[bool, ...] = (True, False)
    decision_bands: tuple[bool, ...] = (False,)  # True: not run by the runtime yet (PlanConfig.decision_band)

    def __post_init__(self) -> None:
        for name in ("residuals", "decision_bands"):
            values = getattr(self, name)
            if not values or not all(isinstance(v, bool) for v in values):
                raise SparvarError(f"SearchSpace.{name} must be a non-empty tuple of booleans, got {values!r}")

    @classmethod
    def default(cls, plan: Plan) -> "SearchSpace":
        """Decision scales from the fifth-last to the second-last (S < n - 5 gives artefacts per SparVAR), never
        below the sink scales."""
        n, sinks = plan.num_scales, plan.config.sink_scales or 1
        lo = max(sinks, n - 5, 1)
        hi = n - 2 - plan.config.skip_last
        return cls(tuple(range(lo, max(lo, hi) + 1)))


def grown_windows(base: tuple[int, ...], sink_scales: int, growth: int, extra: int) -> tuple[int, ...]:
    """``base`` with every kept window grown by ``2 * growth`` and ``extra`` more non-sink key scales (before
    the first kept one) given a window of ``1 + 2 * growth``."""
    w = [r + 2 * growth if r > 0 else r for r in base]
    kept = [i for i, r in enumerate(base) if r > 0 and i >= sink_scales]
    first = kept[0] if kept else len(base)
    for i in range(first - 1, max(sink_scales, first - extra) - 1, -1):
        w[i] = 1 + 2 * growth
    return tuple(w)


@dataclass
class Candidate:
    """One evaluated config: its cost, fidelity and whether it meets the floor."""

    params: dict[str, Any]
    config: PlanConfig
    block: int
    cost: float
    mass: float
    rel_error: float | None
    feasible: bool
    stage: str = "search"  # "search", "verify" or "fallback"
    cosine: float | None = None  # verified candidates only

    def to_dict(self) -> dict[str, Any]:
        d = {"params": self.params, "block": self.block, "cost": self.cost, "mass": self.mass,
             "rel_error": self.rel_error, "feasible": self.feasible, "stage": self.stage}
        if self.cosine is not None:
            d["cosine"] = self.cosine
        return d


def pareto_front(points: list[tuple[float, float, float]]) -> list[int]:
    """Indices of the ``(cost, mass, error)`` points no other point dominates (no more cost, no less mass, no
    more error, and better in one), in order of cost."""
    front = []
    for i, (c, m, e) in enumerate(points):
        dominated = any(c2 <= c and m2 >= m and e2 <= e and (c2 < c or m2 > m or e2 < e)
                        for j, (c2, m2, e2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


@dataclass
class CalibrationResult:
    """The recommendation and how it was reached.

    ``mass``, ``rel_error`` and ``cosine`` are the pick's verified figures on every layer, aggregated as the
    floor says (worst or mean over (scale, layer)s of the head mean); ``per_scale`` has them per query scale
    (mean and worst over layers); ``residual_groups`` compares, per group of CS4A layers, the measured error with
    and without the CS4A residual (empty when the pick has no CS4A layer).
    """

    model: str
    config: PlanConfig
    block: int
    cost: float
    mass: float
    rel_error: float | None
    floor: Floor
    fallback: bool
    candidates: list[Candidate]
    search_layers: tuple[int, ...]
    verify_layers: tuple[int, ...]
    query_sample: int
    source: dict[str, Any]
    seconds: float
    notes: list[str] = field(default_factory=list)
    cosine: float | None = None
    per_scale: list[dict[str, Any]] = field(default_factory=list)
    residual_groups: list[dict[str, Any]] = field(default_factory=list)
    softmax_scale: float | None = None
    softmax_scale_source: str | None = None
    searched: dict[str, list] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "sparvar-calibration", "model": self.model, "config": self.config.to_dict(),
                "block": self.block, "cost": self.cost, "mass": self.mass, "rel_error": self.rel_error,
                "cosine": self.cosine, "per_scale": self.per_scale, "residual_groups": self.residual_groups,
                "floor": dataclasses.asdict(self.floor), "floor_text": self.floor.describe(),
                "fallback": self.fallback, "softmax_scale": {"value": self.softmax_scale,
                                                             "source": self.softmax_scale_source},
                "searched": self.searched, "search_layers": list(self.search_layers),
                "verify_layers": list(self.verify_layers), "query_sample": self.query_sample,
                "source": self.source, "seconds": round(self.seconds, 2), "notes": self.notes,
                "pareto": self.pareto(), "candidates": [c.to_dict() for c in self.candidates]}

    def pareto(self) -> list[int]:
        """Indices into ``candidates`` of the search's Pareto front over (cost, mass, error), among the
        candidates whose error was measured (those meeting the mass floor)."""
        idx = [i for i, c in enumerate(self.candidates) if c.stage == "search" and c.rel_error is not None]
        front = pareto_front([(self.candidates[i].cost, self.candidates[i].mass, self.candidates[i].rel_error)
                              for i in idx])  # type: ignore[misc]
        return [idx[i] for i in front]

    def yaml_text(self) -> str:
        """The plan-config YAML (readable by :func:`sparvar_compiler.planner.config.load_config_file`), its
        figures in comments."""
        synthetic = self.source.get("kind") == "synthetic"
        data = "synthetic " + self.source["preset"]["name"] + " (a regime, not image quality)" if synthetic \
            else f"captures {self.source.get('directory')}"
        how = "worst" if self.floor.aggregate == "min" else "mean"
        err = f", relative L2 error {self.rel_error:.4f}" if self.rel_error is not None else ""
        cos = f", cosine {self.cosine:.4f}" if self.cosine is not None else ""
        head = [
            f"# SparVAR plan config recommended by `sparvar-compile calibrate` for {self.model}",
            f"# data: {data}; layers {_ranges(self.verify_layers)}, up to {self.query_sample or 'all'} query rows "
            "per scale",
            f"# softmax scale: {_scale_text(self.softmax_scale)} ({self.softmax_scale_source})",
            f"# floor: {self.floor.describe()}",
            f"# verified on every layer ({how} (scale, layer)): captured mass {self.mass:.4f}{err}{cos}",
        ]
        for r in self.per_scale:
            head.append(f"#   scale {r['scale']:>2}: mass {r['mass_mean']:.4f} mean / {r['mass_min']:.4f} worst, "
                        f"rel L2 {r['rel_l2_mean']:.4f} / {r['rel_l2_max']:.4f}, cosine {r['cosine_mean']:.4f} / "
                        f"{r['cosine_min']:.4f} over layers {_ranges(r['layers'])}")
        if self.residual_groups:
            searched = "searched on and off" if len(self.searched.get("residual", [])) > 1 else "not searched"
            head.append(f"# CS4A residual {'on' if self.config.residual else 'off'} ({searched}); measured rel L2 "
                        "with / without it, mean over the group's CS4A (scale, layer)s:")
            for g in self.residual_groups:
                head.append(f"#   layers {g['layers_text']}: {g['rel_l2_with']:.4f} / {g['rel_l2_without']:.4f} "
                            f"(worst {g['rel_l2_with_max']:.4f} / {g['rel_l2_without_max']:.4f}): "
                            + (g["better"] if g["better"].startswith("no ") else f"{g['better']} is better"))
        head += [
            f"# attention cost: {100 * self.cost:.1f}% of dense (query, key) pairs over every scale and layer",
            f"# kernel block size: {self.block} (not a plan option: pass --block-sizes {self.block} to compile)",
        ]
        if self.config.decision_band:
            head.append("# NOTE: decision_band is not supported by the runtime yet: this config is for fidelity "
                        "studies; compile refuses it")
        if self.fallback:
            head.append("# NOTE: no sparse candidate met the floor on every layer; this is the dense plan")
            head += [f"#   {n}" for n in self.notes]
        body = yaml.safe_dump(self.config.to_dict(), sort_keys=False, default_flow_style=None)
        return "\n".join(head) + "\n" + body

    def write_yaml(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.yaml_text())
        return p

    def write_pareto(self, path: str | Path) -> Path | str:
        """The cost vs mass vs error chart (PNG, :func:`~sparvar_compiler.fidelity.report.write_pareto`); a
        message instead of a path if matplotlib is missing."""
        from .report import write_pareto

        return write_pareto(self, path)


def pareto_path(yaml_path: str | Path) -> Path:
    """Where the Pareto chart of a calibration goes: beside its YAML, ``<name>.pareto.png``."""
    p = Path(yaml_path)
    return p.with_name(p.stem + ".pareto.png")


def _scale_text(scale: float | None) -> str:
    if scale is None:
        return "unknown"
    root = 1.0 / scale ** 2
    return f"{scale:g}" + (f" (1/sqrt({round(root)}))" if abs(root - round(root)) < 1e-6 and round(root) > 1 else "")


class _SearchData:
    """Dense float64 probabilities of the sampled rows of every (scale, layer) the search reads, the dense outputs
    and each layer's values (the last scale's cache: every earlier one is a prefix of it), and the decision
    scales' q/k/v, computed once (memory: layers x heads x rows x sum of kv lengths x 8 bytes, plus the values)."""

    def __init__(self, source: AttentionSource, plan: Plan, layers: tuple[int, ...], scales: tuple[int, ...],
                 decision_scales: tuple[int, ...], query_sample: int, seed: int, need_error: bool,
                 progress: Callable[[str], None] | None) -> None:
        self.source, self.plan, self.layers, self.scales = source, plan, layers, scales
        self.need_error = need_error
        self.rows = {s: sample_rows(plan.scales[s].tokens, query_sample, seed, s) for s in scales}
        self.probs: dict[tuple[int, int], torch.Tensor] = {}
        self.dense_out: dict[tuple[int, int], torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.decision: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        scale = source.softmax_scale
        last = max(scales)
        for i, layer in enumerate(layers):
            t0 = time.perf_counter()
            if need_error:
                self.values[layer] = torch.from_numpy(np.asarray(source.qkv(last, layer)[2])).double()
            for s in scales:
                q, k, _ = source.qkv(s, layer)
                qr = torch.from_numpy(np.ascontiguousarray(np.asarray(q)[:, :, self.rows[s]]))
                P = softmax64(logits64(qr, torch.from_numpy(np.asarray(k)), scale))
                self.probs[(s, layer)] = P
                if need_error:
                    self.dense_out[(s, layer)] = P @ self._values(s, layer)
            for S in decision_scales:
                q, k, v = source.qkv(S, layer)
                # Copies: a view would keep the whole layer's arrays alive.
                self.decision[(S, layer)] = tuple(  # type: ignore[assignment]
                    torch.from_numpy(np.array(a, copy=True)) for a in (q, k, v))
            source.release(layer)
            if progress:
                progress(f"  search data: layer {layer} ({i + 1}/{len(layers)}) in {time.perf_counter() - t0:.1f} s")
        self._csla: dict[tuple, float] = {}
        self._csla_err: dict[tuple, float] = {}
        self._cs4a: dict[tuple, dict[int, tuple[float, float]]] = {}
        self._cs4a_pats: dict[tuple, tuple] = {}
        self._cs4a_err: dict[tuple, dict[int, tuple[float, float]]] = {}
        self.decision_keys: dict[tuple, float] = {}  # the cs4a() key -> keys per query of the decision pattern
        self._selectors: dict[tuple[int, int], CS4ASelector] = {}
        self._csla_masks: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._sums: dict[tuple[int, int, int], torch.Tensor] = {}

    def _values(self, s: int, layer: int) -> torch.Tensor:
        return self.values[layer][:, :, : self.plan.scales[s].kv_len]

    # ------------------------------------------------------------------ fidelity of one (scale, layer)
    def _unit_sums(self, s: int, layer: int, unit: int) -> torch.Tensor:
        """Dense probabilities of the sampled rows summed per ``unit`` keys (cached): a block pattern's captured
        mass is then a sum over its blocks instead of a pass over every key."""
        key = (s, layer, unit)
        if key not in self._sums:
            self._sums[key] = unit_sums(self.probs[(s, layer)], unit)
        return self._sums[key]

    def _sparse_out(self, s: int, layer: int, mask: torch.Tensor) -> torch.Tensor:
        P = self.probs[(s, layer)]
        kept = P * mask
        mass = kept.sum(-1)
        # Restricting the softmax to the mask is renormalising the dense probabilities inside it.
        out = (kept @ self._values(s, layer)) / mass.clamp_min(1e-300)[..., None]
        return torch.where(mass[..., None] > 0, out, torch.zeros_like(out))

    def _error(self, s: int, layer: int, out: torch.Tensor) -> float:
        return float(relative_l2(out, self.dense_out[(s, layer)]).mean())

    def csla(self, plan: Plan, s: int, layer: int, block: int, error: bool = False) -> tuple[float, float | None]:
        """``(head-mean mass, error or None)`` of the plan's CSLA layout at ``(s, layer)``; the error is measured
        only when asked (and cached)."""
        cfg = plan.config
        key = (s, layer, cfg.windows, cfg.sink_scales, block, cfg.token_exact)
        mkey = key[:1] + key[2:]  # the layout is the same in every layer
        if mkey not in self._csla_masks:
            layout = csla_layout(plan, s, block, block, token_masks=cfg.token_exact)
            rows = self.rows[s]
            active = torch.from_numpy(np.ascontiguousarray(layout.active()[rows // block]))
            token = torch.from_numpy(np.ascontiguousarray(layout.to_token_mask(exact=cfg.token_exact)[rows])) \
                if cfg.token_exact or self.need_error else None
            self._csla_masks[mkey] = (active, token)
        active, token = self._csla_masks[mkey]
        if key not in self._csla:
            if cfg.token_exact:
                mass = (self.probs[(s, layer)] * token).sum(-1)
            else:
                mass = (self._unit_sums(s, layer, block) * active).sum(-1)
            self._csla[key] = float(mass.mean(dim=(0, 2)).mean())
        if error and self.need_error and key not in self._csla_err:
            self._csla_err[key] = self._error(s, layer, self._sparse_out(s, layer, token))
        return self._csla[key], self._csla_err.get(key) if error else None

    @staticmethod
    def cs4a_key(plan: Plan, layer: int) -> tuple:
        cfg = plan.config
        name = next(n for n, mm in CS4A_VARIANTS.items() if mm == (cfg.cs4a, cfg.key_mapping))
        return (cfg.decision_scale, cfg.topk_fraction, name, cfg.decision_band and cfg.cs4a == "token", layer)

    def cs4a(self, plan: Plan, layer: int, errors: bool = False
             ) -> dict[int, tuple[float, float, float | None, float | None]]:
        """Per later scale: (head-mean mass, mean keys per query over the whole scale, error with the residual,
        error without it). Errors are measured only when asked (None otherwise) and cached. :attr:`decision_keys`
        gets the decision pattern's keys per query."""
        cfg = plan.config
        S = cfg.decision_scale
        key = self.cs4a_key(plan, layer)
        if key not in self._cs4a:
            mode, mapping = CS4A_VARIANTS[key[2]]
            cplan = cs4a_plan(plan, mode, mapping)
            if (S, layer) not in self._selectors:
                q, k, _ = self.decision[(S, layer)]
                self._selectors[(S, layer)] = CS4ASelector(q, k, self.source.softmax_scale)
            selector = self._selectors[(S, layer)]
            dec_mask = selector.decision_mask(cplan, mode)
            self.decision_keys[key] = float(dec_mask.sum(-1, dtype=torch.float64).mean())
            rows = {s: self.rows[s] for s in self.scales if s > S}
            pats = selector.patterns(cplan, mode, mapping, rows)
            self._cs4a[key] = {s: (float(pat.mass(self._unit_sums(s, layer, pat.unit)).mean(dim=(0, 2)).mean()),
                                   pat.keys_per_query) for s, pat in pats.items()}
            self._cs4a_pats[key] = (cplan, dec_mask, pats)
        if errors and self.need_error and key not in self._cs4a_err:
            self._cs4a_err[key] = self._cs4a_errors(key, layer)
        errs = self._cs4a_err.get(key, {}) if errors else {}
        return {s: (m, kq, *errs.get(s, (None, None))) for s, (m, kq) in self._cs4a[key].items()}

    def _cs4a_errors(self, key: tuple, layer: int) -> dict[int, tuple[float, float]]:
        """Per later scale: the error with and without the decision scale's residual."""
        from ..cs4a.select import upsample_residual

        cplan, dec_mask, pats = self._cs4a_pats[key]
        q, k, v = self.decision[(key[0], layer)]
        L = logits64(q, k, self.source.softmax_scale)
        P = softmax64(L)
        # The sparse output from the dense probabilities (renormalised inside the mask): no second softmax.
        residual = torch.matmul(P, v.double()) - sparse_attention(P, L, v, dec_mask)[1]
        del L, P
        out = {}
        for s, pat in pats.items():
            sparse = self._sparse_out(s, layer, pat.mask())
            idx = torch.from_numpy(self.rows[s])
            out[s] = (self._error(s, layer, sparse + upsample_residual(residual, cplan, s).index_select(2, idx)),
                      self._error(s, layer, sparse))
        return out


def plan_cost(plan: Plan, block: int, cs4a_keys: dict[int, float], decision_keys: float | None = None) -> float:
    """Computed (query, key) pairs of one image's self-attention over dense (see the module docstring).

    ``cs4a_keys``: mean keys per query of each CS4A scale. With the ``residual`` on, every CS4A layer also runs
    the sparse pass of the decision scale (what the residual is taken against): ``decision_keys`` keys per
    query (default: the token top-k, plus the band with ``decision_band``)."""
    total = dense = 0.0
    cfg = plan.config
    S = cfg.decision_scale
    if cfg.residual and S is not None and any(Mode.CS4A in sp.modes for sp in plan.scales):
        layers = sum(1 for m in plan.scales[S].modes if m == Mode.DECISION)
        keys = decision_keys if decision_keys is not None else _token_decision_keys(plan)
        total += layers * keys * plan.scales[S].tokens
    for sp in plan.scales:
        full = float(sp.tokens * sp.kv_len)
        dense += full * plan.depth
        per_mode = {}
        for m in set(sp.modes):
            if m in (Mode.DENSE, Mode.DECISION):
                per_mode[m] = full
            elif m == Mode.SKIPPED:
                per_mode[m] = 0.0
            elif m == Mode.CSLA:
                per_mode[m] = float(csla_layout(plan, sp.index, block, block).computed_pairs())
            else:
                per_mode[m] = cs4a_keys[sp.index] * sp.tokens
        total += sum(per_mode[m] for m in sp.modes)
    return total / dense


def _token_decision_keys(plan: Plan) -> float:
    """Keys per query of the token CS4A decision-scale pattern: the top-k, plus the mean band with
    ``decision_band``."""
    from ..planner.cs4a import band_keys, round_to_tile

    cfg = plan.config
    dec = plan.scales[cfg.decision_scale]
    keys = float(min(round_to_tile(cfg.topk_fraction * dec.kv_len, cfg.key_tile), dec.kv_len))
    if cfg.decision_band:
        bands = band_keys(dec.h, dec.w, dec.kv_offset, cfg.group_size, cfg.band_windows[0])
        keys += float(np.mean([len(b) for b in bands]))  # at most: top-k and band may overlap
    return keys


def _even_subset(layers: tuple[int, ...], n: int) -> tuple[int, ...]:
    if n <= 0 or len(layers) <= n:
        return layers
    idx = np.unique(np.round(np.linspace(0, len(layers) - 1, n)).astype(int))
    return tuple(layers[i] for i in idx)


def default_study_name(plan: Plan) -> str:
    """``calibrate/<model>/<resolution>px-<aspect>``: the study :func:`calibrate` keeps in a storage by default."""
    return f"calibrate/{plan.model}/{plan.resolution}px-{plan.aspect}"


def _storage_url(storage: str) -> str:
    """A SQLAlchemy URL as it is; a file path as the SQLite URL of that file."""
    return storage if "://" in storage else f"sqlite:///{Path(storage).expanduser().resolve()}"


def _search_distributions(space: SearchSpace, depth: int) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    return {"decision_scale": CategoricalDistribution(list(space.decision_scales)),
            "bound_layer": IntDistribution(0, depth),
            "window_growth": CategoricalDistribution(list(space.window_growth)),
            "window_extra_scales": CategoricalDistribution(list(space.window_extra_scales)),
            "block": CategoricalDistribution(list(space.blocks)),
            "topk_fraction": CategoricalDistribution(list(space.topk_fractions)),
            "residual": CategoricalDistribution(list(space.residuals)),
            "decision_band": CategoricalDistribution(list(space.decision_bands))}


def _open_calibration_study(storage: str | None, name: str | None, sampler, base_plan: Plan, space: SearchSpace,
                            attrs: dict[str, Any]):
    """An in-memory study, or (``storage``) the study ``name`` there, created or continued: its earlier trials
    inform the sampler. A kept study searched over another space is refused (Optuna cannot mix them)."""
    import optuna

    if storage is None:
        return optuna.create_study(direction="minimize", sampler=sampler, study_name=name)
    url = _storage_url(storage)
    study = optuna.create_study(storage=url, study_name=name, direction="minimize", sampler=sampler,
                                load_if_exists=True)
    ours = _search_distributions(space, base_plan.depth)
    for t in study.get_trials(deepcopy=False):
        differ = sorted(k for k, d in t.distributions.items() if k in ours and d != ours[k])
        if differ:
            raise SparvarError(f"the Optuna study {name!r} in {mask_url(storage)} was searched over other values "
                               f"of {', '.join(differ)}; give this search another study name")
    for k, v in attrs.items():
        if study.user_attrs.get(k) != v:
            study.set_user_attr(k, v)
    return study


def calibrate(source: AttentionSource, base_plan: Plan, floor: Floor = Floor(), trials: int = 40,
              search_layers: int = 0, query_sample: int = 128, space: SearchSpace | None = None, seed: int = 0,
              max_verify: int = 3, layers: tuple[int, ...] | None = None,
              progress: Callable[[str], None] | None = print, storage: str | None = None,
              study_name: str | None = None) -> CalibrationResult:
    """Search for the cheapest plan config meeting ``floor`` (mass floor and error cap) on ``source`` (see the
    module docstring).

    ``base_plan`` gives the model, schedule and every option not searched. ``search_layers`` caps the layers the
    search reads (evenly spaced; 0 = all); verification reads all of them.

    ``storage`` (an Optuna/SQLAlchemy URL such as a tuning database's, or a SQLite file path) keeps the search's
    Optuna study there under ``study_name`` (default :func:`default_study_name`), with the model, image, floor
    and data as user attributes and each trial's mass and error as trial attributes, so ``optuna-dashboard``
    shows it. Running again with the same name resumes the study: the earlier trials guide the sampler (they
    count only if they were made on the same data and floor), and the verified candidates are this run's.

    Raises
    ------
    SparvarError
        Bad arguments; data that lacks a (scale, layer) the search needs (the message names the decision scales
        the data allows, for ``--decision-scales``); a kept study searched over other values.
    """
    import optuna

    for name, value, low in (("trials", trials, 1), ("max_verify", max_verify, 1), ("query_sample", query_sample, 0),
                             ("search_layers", search_layers, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            # trials 0 would report that no candidate met the floor when none was tried
            raise SparvarError(f"calibrate: {name} must be an integer >= {low}, got {value!r}")
    t0 = time.perf_counter()
    space = space or SearchSpace.default(base_plan)
    base = base_plan.config
    n, depth = base_plan.num_scales, base_plan.depth
    shape = model_shape(base_plan)
    schedule = Schedule(base_plan.resolution, base_plan.aspect, base_plan.grids)
    skipped = set(range(n - base.skip_last, n))
    for S in space.decision_scales:
        if not 1 <= S < n - 1 - base.skip_last:
            raise SparvarError(f"decision scale {S} leaves no computed scale after it (scales 0..{n - 1}, "
                               f"skip_last {base.skip_last})")
    eval_scales = tuple(s for s in range(min(space.decision_scales), n) if s not in skipped)
    all_layers = tuple(source.layers) if layers is None else tuple(layers)
    missing = [layer for layer in all_layers if layer not in source.layers]
    if missing:
        raise SparvarError(f"layer {missing[0]} is not in the data (layers {list(source.layers)})")
    layers = _even_subset(all_layers, search_layers)
    if hasattr(source, "require"):
        _require_scales(source, sorted(set(eval_scales) | set(space.decision_scales)), all_layers, space, n,
                        skipped)
    need_error = True  # errors of the candidates meeting the mass floor: the Pareto chart and the result report them
    scale_value, scale_source = softmax_scale_of(source)
    if progress:
        progress(f"calibrate: {len(layers)} of {len(all_layers)} layers for the search, scales "
                 f"{eval_scales[0]}..{eval_scales[-1]}, up to {query_sample or 'all'} query rows per scale; "
                 f"softmax scale {_scale_text(scale_value)} ({scale_source}); floor: {floor.describe()}")
    data = _SearchData(source, base_plan, layers, eval_scales, space.decision_scales, query_sample, seed,
                       need_error, progress)

    def build(params: dict[str, Any]) -> tuple[PlanConfig, int]:
        S = params["decision_scale"]
        windows = grown_windows(tuple(base.windows), base.sink_scales, params["window_growth"],
                                params["window_extra_scales"])
        cfg = dataclasses.replace(base, decision_scale=S, bound_layer=params["bound_layer"], windows=windows,
                                  topk_fraction=float(params["topk_fraction"]), residual=bool(params["residual"]),
                                  decision_band=bool(params["decision_band"]),
                                  band_windows=base.band_windows if S == base.decision_scale else None)
        return plan_schedule(shape, schedule, cfg).config, int(params["block"])  # type: ignore[arg-type]

    def measure(cfg: PlanConfig, block: int) -> tuple[float, float, float | None]:
        """``(cost, mass, error)`` on the search layers; the error is measured only when the mass meets the
        floor (otherwise the candidate misses it already): None then."""
        plan = plan_schedule(shape, schedule, cfg)  # type: ignore[arg-type]
        S = cfg.decision_scale
        uses_cs4a = any(Mode.CS4A in sp.modes for sp in plan.scales)
        cells = [(s, layer, plan.scales[s].modes[layer]) for layer in layers for s in range(S, n) if s not in skipped]

        def figures(errors: bool) -> list[tuple[float, float | None]]:
            out = []
            for s, layer, mode in cells:
                if mode in (Mode.DENSE, Mode.DECISION):
                    out.append((1.0, 0.0))
                elif mode == Mode.CSLA:
                    out.append(data.csla(plan, s, layer, block, errors))
                else:
                    m, _, with_res, without = data.cs4a(plan, layer, errors)[s]
                    out.append((m, with_res if cfg.residual else without))
            return out

        masses = [m for m, _ in figures(False)]
        mass = floor.aggregate_values(masses)
        err = None
        if floor.min_mass is None or mass >= floor.min_mass:
            err = _error_aggregate([e for _, e in figures(True)], floor)  # type: ignore[misc]
        cs4a_keys: dict[int, list[float]] = {}
        decision_keys: list[float] = []
        cs4a_layers = [layer for layer in layers if any(m == Mode.CS4A for s, lr, m in cells if lr == layer)]
        for layer in cs4a_layers or (layers[:1] if uses_cs4a else []):  # none below the bound: the first one
            for s, (_, keys, _, _) in data.cs4a(plan, layer).items():
                cs4a_keys.setdefault(s, []).append(keys)
            decision_keys.append(data.decision_keys[data.cs4a_key(plan, layer)])
        cost = plan_cost(plan, block, {s: float(np.mean(v)) for s, v in cs4a_keys.items()},
                         float(np.mean(decision_keys)) if decision_keys else None)
        return cost, mass, err

    candidates: list[Candidate] = []

    def objective(trial: "optuna.Trial") -> float:
        params = {
            "decision_scale": trial.suggest_categorical("decision_scale", list(space.decision_scales)),
            "bound_layer": trial.suggest_int("bound_layer", 0, depth),
            "window_growth": trial.suggest_categorical("window_growth", list(space.window_growth)),
            "window_extra_scales": trial.suggest_categorical("window_extra_scales", list(space.window_extra_scales)),
            "block": trial.suggest_categorical("block", list(space.blocks)),
            "topk_fraction": trial.suggest_categorical("topk_fraction", list(space.topk_fractions)),
            "residual": trial.suggest_categorical("residual", list(space.residuals)),
            "decision_band": trial.suggest_categorical("decision_band", list(space.decision_bands)),
        }
        cfg, block = build(params)
        cost, mass, err = measure(cfg, block)
        # Without an error figure the mass already misses the floor, by this much.
        viol = floor.violation(mass, err) if err is not None else floor.min_mass - mass  # type: ignore[operator]
        if new_constraints:
            trial.set_constraint("fidelity_floor", viol)  # <= 0: feasible
        else:
            trial.set_user_attr("constraint", (viol,))
        trial.set_user_attr("mass", mass)
        if err is not None:
            trial.set_user_attr("rel_error", err)
        trial.set_user_attr("feasible", bool(viol <= 0))
        candidates.append(Candidate(params, cfg, block, cost, mass, err, viol <= 0))
        if progress:
            progress(f"  trial {trial.number:3d}: cost {100 * cost:5.1f}%  mass {mass:.4f}"
                     + (f"  err {err:.4f}" if err is not None else "") + ("  ok" if viol <= 0 else "  below floor")
                     + f"  {params}")
        return cost

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Optuna 5 reads constraints set on the trial; 4.x takes a constraints_func (deprecated in 5).
    new_constraints = hasattr(optuna.trial.Trial, "set_constraint")
    extra = {} if new_constraints else {"constraints_func": lambda t: t.user_attrs["constraint"]}
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(1, trials // 3)), **extra)
    name = study_name or (default_study_name(base_plan) if storage is not None else None)
    study = _open_calibration_study(storage, name, sampler, base_plan, space, {
        "model": base_plan.model, "resolution": base_plan.resolution, "aspect": base_plan.aspect,
        "floor": floor.describe(), "min_mass": floor.min_mass, "max_rel_error": floor.max_rel_error,
        "aggregate": floor.aggregate, "query_sample": query_sample, "search_layers": list(layers),
        "softmax_scale": scale_value, "softmax_scale_source": scale_source,
        "data": json.loads(json.dumps(source.describe(), default=str)),
        "objective": "attention cost (fraction of dense (query, key) pairs)"})
    S0 = base.decision_scale if base.decision_scale in space.decision_scales else space.decision_scales[-1]
    mid = {"window_growth": space.window_growth[0], "window_extra_scales": space.window_extra_scales[0],
           "block": space.blocks[-1], "topk_fraction": min(space.topk_fractions, key=lambda x: abs(x - 0.2)),
           "residual": base.residual if base.residual in space.residuals else space.residuals[0],
           "decision_band": base.decision_band if base.decision_band in space.decision_bands
           else space.decision_bands[0]}
    # Seed the search with SparVAR's published shape and the two ends (all CSLA, all CS4A); a resumed study
    # has them already.
    for bound in (base.bound_layer, 0, depth):
        study.enqueue_trial({"decision_scale": S0, "bound_layer": bound, **mid}, skip_if_exists=True)
    study.optimize(objective, n_trials=trials)

    # Verify the cheapest feasible candidates on every layer of the data.
    verify_opts = dict(query_sample=query_sample, seed=seed, modes=("sparvar",), layers=all_layers)
    seen: set[str] = set()
    # The cheapest first; at equal cost the smaller error, then the larger mass.
    ranked = sorted((c for c in candidates if c.feasible),
                    key=lambda c: (c.cost, c.rel_error if c.rel_error is not None else 0.0, -c.mass))
    notes = []
    searched = {"residual": list(space.residuals), "decision_band": list(space.decision_bands),
                "decision_scale": list(space.decision_scales), "block": list(space.blocks),
                "topk_fraction": list(space.topk_fractions)}
    common = dict(search_layers=layers, verify_layers=all_layers, query_sample=query_sample,
                  source=source.describe(), softmax_scale=scale_value, softmax_scale_source=scale_source,
                  searched=searched)
    for cand in ranked:
        key = f"{cand.config.to_dict()}-{cand.block}"
        if key in seen:
            continue
        seen.add(key)
        if len([c for c in candidates if c.stage == "verify"]) >= max_verify:
            break
        if progress:
            progress(f"verify: cost {100 * cand.cost:.1f}% on all {len(all_layers)} layers: {cand.params}")
        plan = plan_schedule(shape, schedule, cand.config)  # type: ignore[arg-type]
        scales = tuple(s for s in range(cand.config.decision_scale, n) if s not in skipped)
        ev = evaluate(source, plan, EvalOptions(block=cand.block, scales=scales, errors=True, **verify_opts),
                      progress=None)
        fig = verified_figures(ev, floor)
        ok = floor.violation(fig["mass"], fig["rel_error"]) <= 0
        candidates.append(Candidate(cand.params, cand.config, cand.block, cand.cost, fig["mass"], fig["rel_error"],
                                    ok, "verify", fig["cosine"]))
        if ok:
            return CalibrationResult(base_plan.model, cand.config, cand.block, cand.cost, fig["mass"],
                                     fig["rel_error"], floor, False, candidates, seconds=time.perf_counter() - t0,
                                     notes=notes, cosine=fig["cosine"], per_scale=fig["per_scale"],
                                     residual_groups=residual_groups(ev), **common)  # type: ignore[arg-type]
        notes.append(f"candidate {cand.params} met the floor in the search but not on every layer "
                     f"(mass {fig['mass']:.4f}, error {fig['rel_error']:.4f})")
    notes.extend(_fallback_notes(candidates, floor))
    dense_cfg = plan_schedule(shape, schedule,  # type: ignore[arg-type]
                              dataclasses.replace(base, bound_layer=depth, cs4a="off")).config
    cost = plan_cost(plan_schedule(shape, schedule, dense_cfg), space.blocks[-1], {})  # type: ignore[arg-type]
    candidates.append(Candidate({"dense": True}, dense_cfg, space.blocks[-1], cost, 1.0, 0.0, True, "fallback", 1.0))
    return CalibrationResult(base_plan.model, dense_cfg, space.blocks[-1], cost, 1.0, 0.0, floor, True, candidates,
                             seconds=time.perf_counter() - t0, notes=notes, cosine=1.0,
                             **common)  # type: ignore[arg-type]


def _fallback_notes(candidates: list[Candidate], floor: Floor) -> list[str]:
    """Why no sparse plan is recommended: which bound the candidates missed."""
    search = [c for c in candidates if c.stage == "search"]
    notes = [f"no sparse candidate met the floor ({floor.describe()}) on the data: recommending the dense plan"]
    if floor.max_rel_error is not None:
        mass_ok = [c for c in search if floor.min_mass is None or c.mass >= floor.min_mass]
        over = [c for c in mass_ok if c.rel_error is not None and c.rel_error > floor.max_rel_error]
        if over:
            best = min(over, key=lambda c: c.cost)
            notes.append(f"{len(over)} of {len(search)} search candidates kept enough mass but exceeded the error "
                         f"cap {floor.max_rel_error:g} (the cheapest: cost {100 * best.cost:.1f}%, mass "
                         f"{best.mass:.4f}, error {best.rel_error:.4f})")
    return notes


def _require_scales(source, scales: list[int], layers: tuple[int, ...], space: SearchSpace, n: int,
                    skipped: set[int]) -> None:
    """``source.require`` with a pointer at ``--decision-scales`` when a scale is missing: the search reads
    every scale from its smallest decision scale on."""
    try:
        source.require(scales, layers)
    except SparvarError as e:
        usable = []
        have = getattr(source, "scales", None)
        if callable(have):
            held = [set(have(layer)) for layer in layers]
            for S in range(1, n - 1):
                need = {s for s in range(S, n) if s not in skipped}
                if S not in skipped and any(s > S for s in need) and all(need <= h for h in held):
                    usable.append(S)
        hint = (f"; calibrate reads every scale from its smallest decision scale on (decision scales searched: "
                f"{_ranges(space.decision_scales)}): pass --decision-scales (SearchSpace.decision_scales) with "
                "decision scales whose later scales the data holds")
        hint += (f", e.g. --decision-scales {','.join(map(str, usable))}" if usable
                 else " (none does: capture the later scales of every layer)")
        raise type(e)(f"{e}{hint}") from None


def verified_figures(ev, floor: Floor) -> dict[str, Any]:
    """An evaluation's "sparvar" records aggregated like the search: head mean per (scale, layer), then the
    floor's aggregate (the worst mass, error and cosine, or their means), and per scale the mean and worst over
    layers."""
    by: dict[tuple[int, int], list] = {}
    for r in ev.records:
        if r.mode == "sparvar" and r.status == "ok":
            by.setdefault((r.scale, r.layer), []).append(r)
    head = {k: (float(np.mean([r.mass for r in rs])),
                float(np.mean([r.rel_l2 for r in rs])) if rs[0].rel_l2 is not None else None,
                float(np.mean([r.cosine for r in rs])) if rs[0].cosine is not None else None)
            for k, rs in by.items()}
    masses = [m for m, _, _ in head.values()]
    errors = [e for _, e, _ in head.values() if e is not None]
    cosines = [c for _, _, c in head.values() if c is not None]
    per_scale = []
    for s in sorted({s for s, _ in head}):
        vals = [(layer, *head[(s2, layer)]) for (s2, layer) in sorted(head) if s2 == s]
        row: dict[str, Any] = {"scale": s, "layers": [v[0] for v in vals],
                               "mass_mean": float(np.mean([v[1] for v in vals])),
                               "mass_min": float(np.min([v[1] for v in vals]))}
        if vals[0][2] is not None:
            row.update(rel_l2_mean=float(np.mean([v[2] for v in vals])), rel_l2_max=float(np.max([v[2] for v in vals])),
                       cosine_mean=float(np.mean([v[3] for v in vals])), cosine_min=float(np.min([v[3] for v in vals])))
        per_scale.append(row)
    cos = (float(min(cosines)) if floor.aggregate == "min" else float(np.mean(cosines))) if cosines else None
    return {"mass": floor.aggregate_values(masses), "rel_error": _error_aggregate(errors, floor) if errors else None,
            "cosine": cos, "per_scale": per_scale}


def residual_groups(ev, groups: int = RESIDUAL_GROUPS) -> list[dict[str, Any]]:
    """Per group of consecutive CS4A layers (at most ``groups``): the measured relative L2 error with and without
    the CS4A residual, mean and worst over the group's CS4A (scale, layer)s of the head mean. Empty if the plan
    has no CS4A layer."""
    by: dict[tuple[int, int], list] = {}
    for r in ev.records:
        if r.mode == "sparvar" and r.status == "ok" and r.plan_mode == "cs4a" and r.rel_l2 is not None:
            by.setdefault((r.scale, r.layer), []).append(r)
    if not by:
        return []
    residual = ev.plan.config.residual

    def pair(r) -> tuple[float, float]:  # (with, without)
        other = r.rel_l2_no_residual if residual else r.rel_l2_with_residual
        if other is None:
            other = r.rel_l2
        return (r.rel_l2, other) if residual else (other, r.rel_l2)

    layers = sorted({layer for _, layer in by})
    chunks = [list(c) for c in np.array_split(np.array(layers), min(groups, len(layers))) if len(c)]
    out = []
    for chunk in chunks:
        cells = [(np.mean([pair(r)[0] for r in rs]), np.mean([pair(r)[1] for r in rs]))
                 for (s, layer), rs in by.items() if layer in chunk]
        w, wo = np.array([c[0] for c in cells]), np.array([c[1] for c in cells])
        out.append({"layers": [int(x) for x in chunk], "layers_text": _ranges([int(x) for x in chunk]),
                    "rel_l2_with": float(w.mean()), "rel_l2_without": float(wo.mean()),
                    "rel_l2_with_max": float(w.max()), "rel_l2_without_max": float(wo.max()),
                    "better": _better(float(w.mean()), float(wo.mean()))})
    return out


def _better(with_residual: float, without: float, tolerance: float = 0.01) -> str:
    """Which residual choice measured the smaller error; within ``tolerance`` (relative) neither."""
    if abs(with_residual - without) <= tolerance * max(with_residual, without):
        return "no difference (within 1%)"
    return "with the residual" if with_residual < without else "without the residual"


def _error_aggregate(errors: list[float], floor: Floor) -> float:
    """The error counterpart of the mass aggregate: the worst (largest) error, or the mean."""
    return float(max(errors) if floor.aggregate == "min" else np.mean(errors))


def _ranges(values) -> str:
    from .captures import _ranges as ranges

    return ranges(values)
