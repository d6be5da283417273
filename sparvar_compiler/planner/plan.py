"""The plan: for every scale of one image, its grid and key/value length, and the attention mode of every layer.

A plan is plain data. The planner builds it from (model, resolution, aspect, config); every later stage (layouts,
kernels, tuning, emission, the runtime) reads it and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .. import limits
from ..errors import ModelError, PlanConfigError, SparvarError
from ..limits import shown
from .config import PlanConfig, config_from_mapping, resolve_config
from .models import ModelSpec, get_model
from .schedules import Grid, Schedule, check_grids

# The model's shape, bounded before a plan allocates per layer (modes) or per head (kernels, tables).
_MODEL_LIMITS = (("depth", limits.MAX_DEPTH, "MAX_DEPTH"), ("heads", limits.MAX_HEADS, "MAX_HEADS"),
                 ("head_dim", limits.MAX_HEAD_DIM, "MAX_HEAD_DIM"), ("width", limits.MAX_WIDTH, "MAX_WIDTH"))


def check_model_shape(model: ModelSpec | dict[str, Any], where: str) -> None:
    """Depth, heads, head dim and width of a model (a spec, or a plan's dict) are positive integers within
    :mod:`sparvar_compiler.limits`; raises :class:`~sparvar_compiler.errors.ModelError` naming the field."""
    for name, limit, limit_name in _MODEL_LIMITS:
        value = model.get(name) if isinstance(model, dict) else getattr(model, name, None)
        if value is None and name == "width":
            continue  # a plan (and the model shape fidelity rebuilds from one) does not record the width
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelError(f"{where}: '{name}' must be a positive integer, got {shown(value)}")
        limits.check_limit(value, limit, limit_name, f"{where}: '{name}'", ModelError)


class Mode(str, Enum):
    """Attention mode of one (scale, layer)."""

    DENSE = "dense"        # full attention over the key/value cache
    DECISION = "decision"  # dense, and the attention pattern is measured for CS4A
    CS4A = "cs4a"          # dynamic cross-scale sparsity (token top-k or block D-CSLA, per the config)
    CSLA = "csla"          # static cross-scale local windows + sinks
    SKIPPED = "skipped"    # the scale's transformer pass is skipped (upsampled instead)


@dataclass(frozen=True)
class ScalePlan:
    """One scale of the plan.

    Attributes
    ----------
    index, h, w:
        Scale number (0 = coarsest) and token grid.
    tokens:
        Queries of this scale (``h * w``).
    kv_offset, kv_len:
        First token of this scale in the key/value cache, and the cache length its queries attend to.
    modes:
        Attention mode per layer.
    """

    index: int
    h: int
    w: int
    tokens: int
    kv_offset: int
    kv_len: int
    modes: tuple[Mode, ...]

    @property
    def has_csla(self) -> bool:
        return Mode.CSLA in self.modes

    def mode_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.modes:
            out[m.value] = out.get(m.value, 0) + 1
        return out

    def modes_text(self) -> str:
        """Modes as layer ranges, e.g. ``"decision 0-10, csla 11-39"``."""
        parts, start = [], 0
        for i in range(1, len(self.modes) + 1):
            if i == len(self.modes) or self.modes[i] != self.modes[start]:
                rng = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
                parts.append(f"{self.modes[start].value} {rng}")
                start = i
        return ", ".join(parts)


@dataclass(frozen=True)
class Plan:
    """A SparVAR plan for one model, resolution and aspect ratio.

    ``config`` is fully resolved (no ``None`` fields). ``grids`` is the whole schedule, skipped scales included.
    """

    model: str
    family: str
    depth: int
    heads: int
    head_dim: int
    resolution: int
    aspect: str
    grids: tuple[Grid, ...]
    config: PlanConfig
    scales: tuple[ScalePlan, ...]

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    def scale(self, index: int) -> ScalePlan:
        if not 0 <= index < len(self.scales):
            raise IndexError(f"scale {index} is out of range 0..{len(self.scales) - 1}")
        return self.scales[index]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "family": self.family, "depth": self.depth, "heads": self.heads,
            "head_dim": self.head_dim, "resolution": self.resolution, "aspect": self.aspect,
            "grids": [list(g) for g in self.grids], "config": self.config.to_dict(),
            "scales": [
                {"index": s.index, "h": s.h, "w": s.w, "tokens": s.tokens, "kv_offset": s.kv_offset,
                 "kv_len": s.kv_len, "modes": [m.value for m in s.modes]}
                for s in self.scales
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        """Inverse of :meth:`to_dict`. The dict may come from a file: the model shape and grids are bounded
        before anything is built, and the scales must be the ones :func:`plan_schedule` makes of them.

        Raises
        ------
        SparvarError
            (:class:`~sparvar_compiler.errors.PlanConfigError`, ``ModelError`` or ``ScheduleError``) naming the
            malformed field.
        """
        if not isinstance(d, dict):
            raise PlanConfigError(f"plan: expected a mapping, got {type(d).__name__}")
        try:
            check_model_shape(d, "plan")
            grids = d["grids"]
            check_grids(grids, "plan.grids")
            config = config_from_mapping(d["config"], "plan.config")
            scales_in = d["scales"]
            if not isinstance(scales_in, list) or len(scales_in) != len(grids):
                raise PlanConfigError(f"plan.scales must be a list of {len(grids)} scales (one per grid)")
            spec = ModelSpec(str(d["model"]), str(d["family"]), d["depth"], d["heads"] * d["head_dim"], d["heads"],
                             d["head_dim"], (), 0)
            schedule = Schedule(d["resolution"], str(d["aspect"]), tuple(tuple(g) for g in grids))
            plan = plan_schedule(spec, schedule, config)
            scales = tuple(
                ScalePlan(s["index"], s["h"], s["w"], s["tokens"], s["kv_offset"], s["kv_len"],
                          tuple(Mode(m) for m in s["modes"]))
                for s in scales_in
            )
        except SparvarError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise PlanConfigError(f"plan: malformed ({type(e).__name__}: {shown(str(e))})") from None
        if scales != plan.scales:
            raise PlanConfigError("plan.scales do not follow from its grids, depth and config")
        return dataclasses.replace(plan, model=d["model"], family=d["family"], resolution=d["resolution"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _modes(scale: int, n: int, depth: int, cfg: PlanConfig) -> tuple[Mode, ...]:
    assert cfg.decision_scale is not None and cfg.bound_layer is not None
    if scale >= n - cfg.skip_last:
        return (Mode.SKIPPED,) * depth
    if scale < cfg.decision_scale:
        return (Mode.DENSE,) * depth
    if cfg.cs4a == "off":
        low = Mode.DENSE
    else:
        low = Mode.DECISION if scale == cfg.decision_scale else Mode.CS4A
    return tuple(low if layer < cfg.bound_layer else Mode.CSLA for layer in range(depth))


def plan_schedule(model: ModelSpec, schedule: Schedule, config: PlanConfig | None = None) -> Plan:
    """Plan one schedule of a model.

    Raises
    ------
    ModelError
        If the model's depth, heads, head dim or width is over :mod:`sparvar_compiler.limits`.
    PlanConfigError
        If the config does not fit the model and schedule.
    """
    check_model_shape(model, f"model {getattr(model, 'name', '?')}")
    cfg = resolve_config(config or PlanConfig(), schedule.num_scales, model.depth)
    n = schedule.num_scales
    scales = tuple(
        ScalePlan(i, h, w, h * w, off, kv, _modes(i, n, model.depth, cfg))
        for i, ((h, w), off, kv) in enumerate(zip(schedule.grids, schedule.kv_offsets, schedule.kv_lens))
    )
    return Plan(model.name, model.family, model.depth, model.heads, model.head_dim, schedule.resolution,
                schedule.aspect, schedule.grids, cfg, scales)


def make_plan(model: ModelSpec | str, resolution: int | str | None = None, aspect: str | float | None = None,
              config: PlanConfig | None = None) -> Plan:
    """Plan a model (a :class:`ModelSpec`, a registry name or a YAML path) at a resolution and aspect ratio.

    Raises
    ------
    SparvarError
        For an unknown model, resolution or aspect, or an invalid config; the message names the problem.
    """
    spec = get_model(model) if isinstance(model, str) else model
    return plan_schedule(spec, spec.schedule(resolution, aspect), config)
