"""Recommend a plan config: the least attention cost whose fidelity on the given q/k/v meets a floor.

Search (Optuna TPE, seeded) over the SparVAR knobs: ``decision_scale``, ``bound_layer``, the CSLA ``windows``
(every kept window grown by ``2 * window_growth``; ``window_extra_scales`` more key scales before the first kept
one get a window of 1), the kernel block size (64 or 128) and CS4A's ``topk_fraction``. Other options come from
the base config unchanged.

* **Cost**: (query, key) pairs the plan's kernels compute over one image's self-attention (every scale and
  layer), as a fraction of dense: whole active blocks for CSLA, the measured mean keys per query for CS4A,
  0 for skipped scales, everything for dense ones. FLOPs are proportional (4 * head_dim per pair).
* **Fidelity** of a (scale, layer): the head mean of the captured softmax mass (and, if the floor asks for it,
  of the relative L2 error of the output vs dense, CS4A with its residual) of the plan's mode there, over the
  sampled query rows; dense (scale, layer)s count as mass 1, error 0. The floor applies to the minimum over
  the evaluated (scale, layer)s (``aggregate="min"``, default) or their mean.
* Trials that miss the floor are infeasible (Optuna's constraint, so TPE learns the boundary). The search runs
  on a subset of layers (``search_layers``) with cached dense probabilities; the best feasible candidates are
  then **verified** with :func:`~sparvar_compiler.fidelity.evaluate.evaluate` on every layer of the data, and
  the first that meets the floor is returned. If none does, the dense plan (``bound_layer = depth``,
  ``cs4a: off``: mass 1, error 0) is returned and the result says so. The guarantee is on the data given
  (the sampled rows of the captured layers and heads), nothing more.
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
from .evaluate import AttentionSource, EvalOptions, evaluate, sample_rows
from .masks import CS4ASelector, cs4a_plan, model_shape, unit_sums
from .modes import CS4A_VARIANTS
from .metrics import logits64, masked_output, relative_l2, softmax64

AGGREGATES = ("min", "mean")


@dataclass(frozen=True)
class Floor:
    """The fidelity a recommended plan must keep (``None`` disables a bound)."""

    min_mass: float | None = 0.9
    max_rel_error: float | None = None
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
        how = "minimum over" if self.aggregate == "min" else "mean over"
        return f"{' and '.join(parts)} ({how} the evaluated (scale, layer)s of the head mean)"


@dataclass(frozen=True)
class SearchSpace:
    """The values each knob may take."""

    decision_scales: tuple[int, ...]
    window_growth: tuple[int, ...] = (0, 1, 2, 3)
    window_extra_scales: tuple[int, ...] = (0, 1, 2)
    blocks: tuple[int, ...] = (64, 128)
    topk_fractions: tuple[float, ...] = (0.1, 0.15, 0.2, 0.3, 0.4)

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

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "block": self.block, "cost": self.cost, "mass": self.mass,
                "rel_error": self.rel_error, "feasible": self.feasible, "stage": self.stage}


@dataclass
class CalibrationResult:
    """The recommendation and how it was reached."""

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

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "sparvar-calibration", "model": self.model, "config": self.config.to_dict(),
                "block": self.block, "cost": self.cost, "mass": self.mass, "rel_error": self.rel_error,
                "floor": dataclasses.asdict(self.floor), "floor_text": self.floor.describe(),
                "fallback": self.fallback, "search_layers": list(self.search_layers),
                "verify_layers": list(self.verify_layers), "query_sample": self.query_sample,
                "source": self.source, "seconds": round(self.seconds, 2), "notes": self.notes,
                "candidates": [c.to_dict() for c in self.candidates]}

    def yaml_text(self) -> str:
        """The plan-config YAML (readable by :func:`sparvar_compiler.planner.config.load_config_file`)."""
        synthetic = self.source.get("kind") == "synthetic"
        data = "synthetic " + self.source["preset"]["name"] + " (a regime, not image quality)" if synthetic \
            else f"captures {self.source.get('directory')}"
        err = f", relative L2 error {self.rel_error:.4f}" if self.rel_error is not None else ""
        head = [
            f"# SparVAR plan config recommended by `sparvar-compile calibrate` for {self.model}",
            f"# data: {data}; layers {_ranges(self.verify_layers)}, up to {self.query_sample or 'all'} query rows "
            "per scale",
            f"# floor: {self.floor.describe()}",
            f"# achieved on that data: captured mass {self.mass:.4f}{err}",
            f"# attention cost: {100 * self.cost:.1f}% of dense (query, key) pairs over every scale and layer",
            f"# kernel block size: {self.block} (not a plan option: pass --block-sizes {self.block} to compile)",
        ]
        if self.fallback:
            head.append("# NOTE: no sparse candidate met the floor; this is the dense plan")
        body = yaml.safe_dump(self.config.to_dict(), sort_keys=False, default_flow_style=None)
        return "\n".join(head) + "\n" + body

    def write_yaml(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.yaml_text())
        return p


class _SearchData:
    """Dense float64 probabilities of the sampled rows of every (scale, layer) the search reads, and the
    decision scales' q/k/v, computed once (memory: layers x heads x rows x sum of kv lengths x 8 bytes)."""

    def __init__(self, source: AttentionSource, plan: Plan, layers: tuple[int, ...], scales: tuple[int, ...],
                 decision_scales: tuple[int, ...], query_sample: int, seed: int, need_error: bool,
                 progress: Callable[[str], None] | None) -> None:
        self.source, self.plan, self.layers, self.scales = source, plan, layers, scales
        self.need_error = need_error
        self.rows = {s: sample_rows(plan.scales[s].tokens, query_sample, seed, s) for s in scales}
        self.probs: dict[tuple[int, int], torch.Tensor] = {}
        self.dense_out: dict[tuple[int, int], torch.Tensor] = {}
        self.values: dict[tuple[int, int], torch.Tensor] = {}
        self.decision: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        scale = source.softmax_scale
        for i, layer in enumerate(layers):
            t0 = time.perf_counter()
            for s in scales:
                q, k, v = source.qkv(s, layer)
                qr = torch.from_numpy(np.ascontiguousarray(np.asarray(q)[:, :, self.rows[s]]))
                P = softmax64(logits64(qr, torch.from_numpy(np.asarray(k)), scale))
                self.probs[(s, layer)] = P
                if need_error:
                    V = torch.from_numpy(np.asarray(v)).double()
                    self.values[(s, layer)] = V
                    self.dense_out[(s, layer)] = P @ V
            for S in decision_scales:
                q, k, v = source.qkv(S, layer)
                # Copies: a view would keep the whole layer's arrays alive.
                self.decision[(S, layer)] = tuple(  # type: ignore[assignment]
                    torch.from_numpy(np.array(a, copy=True)) for a in (q, k, v))
            source.release(layer)
            if progress:
                progress(f"  search data: layer {layer} ({i + 1}/{len(layers)}) in {time.perf_counter() - t0:.1f} s")
        self._csla: dict[tuple, tuple[float, float | None]] = {}
        self._cs4a: dict[tuple, dict[int, tuple[float, float, float | None]]] = {}
        self._selectors: dict[tuple[int, int], CS4ASelector] = {}
        self._csla_masks: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._sums: dict[tuple[int, int, int], torch.Tensor] = {}

    # ------------------------------------------------------------------ fidelity of one (scale, layer)
    def _unit_sums(self, s: int, layer: int, unit: int) -> torch.Tensor:
        """Dense probabilities of the sampled rows summed per ``unit`` keys (cached): a block pattern's captured
        mass is then a sum over its blocks instead of a pass over every key."""
        key = (s, layer, unit)
        if key not in self._sums:
            self._sums[key] = unit_sums(self.probs[(s, layer)], unit)
        return self._sums[key]

    def _error(self, s: int, layer: int, mask: torch.Tensor, residual: torch.Tensor | None = None) -> float:
        P = self.probs[(s, layer)]
        kept = P * mask
        mass = kept.sum(-1)
        # Restricting the softmax to the mask is renormalising the dense probabilities inside it.
        out = (kept @ self.values[(s, layer)]) / mass.clamp_min(1e-300)[..., None]
        out = torch.where(mass[..., None] > 0, out, torch.zeros_like(out))
        if residual is not None:
            out = out + residual
        return float(relative_l2(out, self.dense_out[(s, layer)]).mean())

    def csla(self, plan: Plan, s: int, layer: int, block: int) -> tuple[float, float | None]:
        cfg = plan.config
        key = (s, layer, cfg.windows, cfg.sink_scales, block, cfg.token_exact)
        if key not in self._csla:
            mkey = key[:1] + key[2:]  # the layout is the same in every layer
            if mkey not in self._csla_masks:
                layout = csla_layout(plan, s, block, block, token_masks=cfg.token_exact)
                rows = self.rows[s]
                active = torch.from_numpy(np.ascontiguousarray(layout.active()[rows // block]))
                token = torch.from_numpy(np.ascontiguousarray(layout.to_token_mask(exact=cfg.token_exact)[rows])) \
                    if cfg.token_exact or self.need_error else None
                self._csla_masks[mkey] = (active, token)
            active, token = self._csla_masks[mkey]
            if cfg.token_exact:
                mass = (self.probs[(s, layer)] * token).sum(-1)
            else:
                mass = (self._unit_sums(s, layer, block) * active).sum(-1)
            err = self._error(s, layer, token) if self.need_error else None
            self._csla[key] = (float(mass.mean(dim=(0, 2)).mean()), err)
        return self._csla[key]

    def cs4a(self, plan: Plan, layer: int) -> dict[int, tuple[float, float, float | None]]:
        """Per later scale: (head-mean mass, mean keys per query over the whole scale, error or None)."""
        from ..cs4a.select import upsample_residual

        cfg = plan.config
        name = next(n for n, mm in CS4A_VARIANTS.items() if mm == (cfg.cs4a, cfg.key_mapping))
        S = cfg.decision_scale
        key = (S, cfg.topk_fraction, name, layer)
        if key in self._cs4a:
            return self._cs4a[key]
        mode, mapping = CS4A_VARIANTS[name]
        cplan = cs4a_plan(plan, mode, mapping)
        q, k, v = self.decision[(S, layer)]
        if (S, layer) not in self._selectors:
            self._selectors[(S, layer)] = CS4ASelector(q, k, self.source.softmax_scale)
        selector = self._selectors[(S, layer)]
        residual = None
        if self.need_error and cfg.residual:
            L = logits64(q, k, self.source.softmax_scale)
            residual = torch.matmul(softmax64(L), v.double()) - masked_output(L, v, selector.decision_mask(cplan, mode))
        out = {}
        rows = {s: self.rows[s] for s in self.scales if s > S}
        for s, pat in selector.patterns(cplan, mode, mapping, rows).items():
            mass = float(pat.mass(self._unit_sums(s, layer, pat.unit)).mean(dim=(0, 2)).mean())
            err = None
            if self.need_error:
                idx = torch.from_numpy(self.rows[s])
                res = upsample_residual(residual, cplan, s).index_select(2, idx) if residual is not None else None
                err = self._error(s, layer, pat.mask(), res)
            out[s] = (mass, pat.keys_per_query, err)
        self._cs4a[key] = out
        return out


def plan_cost(plan: Plan, block: int, cs4a_keys: dict[int, float]) -> float:
    """Computed (query, key) pairs of one image's self-attention over dense (see the module docstring)."""
    total = dense = 0.0
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
            "topk_fraction": CategoricalDistribution(list(space.topk_fractions))}


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
    """Search for the cheapest plan config meeting ``floor`` on ``source`` (see the module docstring).

    ``base_plan`` gives the model, schedule and every option not searched. ``search_layers`` caps the layers the
    search reads (evenly spaced; 0 = all); verification reads all of them.

    ``storage`` (an Optuna/SQLAlchemy URL such as a tuning database's, or a SQLite file path) keeps the search's
    Optuna study there under ``study_name`` (default :func:`default_study_name`), with the model, image, floor
    and data as user attributes and each trial's mass (and error) as trial attributes, so ``optuna-dashboard``
    shows it. Running again with the same name continues the study: the earlier trials guide the sampler (they
    count only if they were made on the same data), and the verified candidates are this run's.
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
        source.require(sorted(set(eval_scales) | set(space.decision_scales)), all_layers)  # type: ignore
    need_error = floor.max_rel_error is not None
    if progress:
        progress(f"calibrate: {len(layers)} of {len(all_layers)} layers for the search, scales "
                 f"{eval_scales[0]}..{eval_scales[-1]}, up to {query_sample or 'all'} query rows per scale")
    data = _SearchData(source, base_plan, layers, eval_scales, space.decision_scales, query_sample, seed,
                       need_error, progress)

    def build(params: dict[str, Any]) -> tuple[PlanConfig, int]:
        S = params["decision_scale"]
        windows = grown_windows(tuple(base.windows), base.sink_scales, params["window_growth"],
                                params["window_extra_scales"])
        cfg = dataclasses.replace(base, decision_scale=S, bound_layer=params["bound_layer"], windows=windows,
                                  topk_fraction=float(params["topk_fraction"]),
                                  band_windows=base.band_windows if S == base.decision_scale else None)
        return plan_schedule(shape, schedule, cfg).config, int(params["block"])  # type: ignore[arg-type]

    def measure(cfg: PlanConfig, block: int) -> tuple[float, float, float | None]:
        plan = plan_schedule(shape, schedule, cfg)  # type: ignore[arg-type]
        S = cfg.decision_scale
        masses, errors = [], []
        uses_cs4a = any(Mode.CS4A in sp.modes for sp in plan.scales)
        cs4a_keys: dict[int, list[float]] = {}
        for layer in layers:
            cs4a_here = None
            for s in range(S, n):
                if s in skipped:
                    continue
                mode = plan.scales[s].modes[layer]
                if mode in (Mode.DENSE, Mode.DECISION):
                    m, e = 1.0, 0.0
                elif mode == Mode.CSLA:
                    m, e = data.csla(plan, s, layer, block)
                else:
                    cs4a_here = cs4a_here or data.cs4a(plan, layer)
                    m, _, e = cs4a_here[s]
                masses.append(m)
                errors.append(e if e is not None else 0.0)
            if cs4a_here:
                for s, (_, keys, _) in cs4a_here.items():
                    cs4a_keys.setdefault(s, []).append(keys)
        if uses_cs4a and not cs4a_keys:  # no search layer is below the bound: measure keys on the first one
            for s, (_, keys, _) in data.cs4a(plan, layers[0]).items():
                cs4a_keys[s] = [keys]
        cost = plan_cost(plan, block, {s: float(np.mean(v)) for s, v in cs4a_keys.items()})
        return cost, floor.aggregate_values(masses), (_error_aggregate(errors, floor) if need_error else None)

    candidates: list[Candidate] = []

    def objective(trial: "optuna.Trial") -> float:
        params = {
            "decision_scale": trial.suggest_categorical("decision_scale", list(space.decision_scales)),
            "bound_layer": trial.suggest_int("bound_layer", 0, depth),
            "window_growth": trial.suggest_categorical("window_growth", list(space.window_growth)),
            "window_extra_scales": trial.suggest_categorical("window_extra_scales", list(space.window_extra_scales)),
            "block": trial.suggest_categorical("block", list(space.blocks)),
            "topk_fraction": trial.suggest_categorical("topk_fraction", list(space.topk_fractions)),
        }
        cfg, block = build(params)
        cost, mass, err = measure(cfg, block)
        viol = floor.violation(mass, err)
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
        "data": json.loads(json.dumps(source.describe(), default=str)),
        "objective": "attention cost (fraction of dense (query, key) pairs)"})
    S0 = base.decision_scale if base.decision_scale in space.decision_scales else space.decision_scales[-1]
    mid = {"window_growth": space.window_growth[0], "window_extra_scales": space.window_extra_scales[0],
           "block": space.blocks[-1], "topk_fraction": min(space.topk_fractions, key=lambda x: abs(x - 0.2))}
    # Seed the search with SparVAR's published shape and the two ends (all CSLA, all CS4A); a continued study
    # has them already.
    for bound in (base.bound_layer, 0, depth):
        study.enqueue_trial({"decision_scale": S0, "bound_layer": bound, **mid}, skip_if_exists=True)
    study.optimize(objective, n_trials=trials)

    # Verify the cheapest feasible candidates on every layer of the data.
    verify_opts = dict(query_sample=query_sample, seed=seed, modes=("sparvar",), layers=all_layers)
    seen: set[str] = set()
    ranked = sorted((c for c in candidates if c.feasible), key=lambda c: c.cost)
    notes = []
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
        ev = evaluate(source, plan, EvalOptions(block=cand.block, scales=scales, errors=need_error, **verify_opts),
                      progress=None)
        mass, err = _verified_figures(ev, floor)
        ok = floor.violation(mass, err if need_error else None) <= 0
        candidates.append(Candidate(cand.params, cand.config, cand.block, cand.cost, mass, err, ok, "verify"))
        if ok:
            return CalibrationResult(base_plan.model, cand.config, cand.block, cand.cost, mass, err, floor, False,
                                     candidates, layers, all_layers, query_sample, source.describe(),
                                     time.perf_counter() - t0, notes)
        notes.append(f"candidate {cand.params} met the floor in the search but not in verification "
                     f"(mass {mass:.4f}" + (f", error {err:.4f})" if err is not None else ")"))
    dense_cfg = plan_schedule(shape, schedule,  # type: ignore[arg-type]
                              dataclasses.replace(base, bound_layer=depth, cs4a="off")).config
    notes.append("no sparse candidate met the floor on the data: recommending the dense plan")
    cost = plan_cost(plan_schedule(shape, schedule, dense_cfg), space.blocks[-1], {})  # type: ignore[arg-type]
    candidates.append(Candidate({"dense": True}, dense_cfg, space.blocks[-1], cost, 1.0, 0.0, True, "fallback"))
    return CalibrationResult(base_plan.model, dense_cfg, space.blocks[-1], cost, 1.0, 0.0, floor, True, candidates,
                             layers, all_layers, query_sample, source.describe(), time.perf_counter() - t0, notes)


def _verified_figures(ev, floor: Floor) -> tuple[float, float | None]:
    """Aggregate evaluate()'s "sparvar" records like the search: head mean per (scale, layer), then the floor's
    aggregate (the error's worst case is its maximum)."""
    by: dict[tuple[int, int], list] = {}
    for r in ev.records:
        if r.mode == "sparvar" and r.status == "ok":
            by.setdefault((r.scale, r.layer), []).append(r)
    masses = [float(np.mean([r.mass for r in rs])) for rs in by.values()]
    errors = [float(np.mean([r.rel_l2 for r in rs])) for rs in by.values() if rs[0].rel_l2 is not None]
    return floor.aggregate_values(masses), (_error_aggregate(errors, floor) if errors else None)


def _error_aggregate(errors: list[float], floor: Floor) -> float:
    """The error counterpart of the mass aggregate: the worst (largest) error, or the mean."""
    return float(max(errors) if floor.aggregate == "min" else np.mean(errors))


def _ranges(values) -> str:
    from .captures import _ranges as ranges

    return ranges(values)
