"""The plan: for every scale of one image, its grid and key/value length, and the attention mode of every layer.

A plan is plain data. The planner builds it from (model, resolution, aspect, config); every later stage (layouts,
kernels, tuning, emission, the runtime) reads it and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .config import PlanConfig, config_from_mapping, resolve_config
from .models import ModelSpec, get_model
from .schedules import Grid, Schedule


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
        scales = tuple(
            ScalePlan(s["index"], s["h"], s["w"], s["tokens"], s["kv_offset"], s["kv_len"],
                      tuple(Mode(m) for m in s["modes"]))
            for s in d["scales"]
        )
        return cls(d["model"], d["family"], d["depth"], d["heads"], d["head_dim"], d["resolution"], d["aspect"],
                   tuple(tuple(g) for g in d["grids"]), config_from_mapping(d["config"], "plan.config"), scales)

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
    """Plan one schedule of a model."""
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
