"""Model registry: the architectures SparVAR targets, and user models described in YAML.

A user model file looks like::

    name: my-var            # required: letters, digits, '.', '_', '-' (it names output directories)
    family: var             # "infinity", "var" or "custom" (default)
    depth: 16               # transformer layers
    width: 1024             # model width (informational)
    heads: 16
    head_dim: 64
    mlp_ratio: 4            # optional, default 4
    schedules:              # one or more
      - resolution: 256
        aspect: "1:1"       # height:width, optional, default "1:1"
        scales: "1,2,3,4,5,6,8,10,13,16"   # or a list: [1, 2, "3x2", [4, 3]]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import ModelError, ScheduleError
from ..limits import (MAX_DEPTH, MAX_HEAD_DIM, MAX_HEADS, MAX_NAME_LENGTH, MAX_SCHEDULES, MAX_WIDTH,
                      NAME_PATTERN)
from ..yamlfile import load_yaml_file
from .schedules import Schedule, infinity_schedules, parse_aspect, parse_resolution, parse_schedule, var_schedules


@dataclass(frozen=True)
class ModelSpec:
    """One model architecture and its scale schedules.

    Attributes
    ----------
    name, family:
        Registry name (``"infinity-8b"``) and family (``"infinity"``, ``"var"`` or ``"custom"``).
    depth, width, heads, head_dim, mlp_ratio:
        Transformer shape. Self-attention runs ``heads`` heads of ``head_dim`` in every one of ``depth`` layers.
    schedules:
        Every (resolution, aspect) schedule the model supports.
    default_resolution:
        Resolution used when none is asked for.
    notes:
        Free text shown by ``sparvar-compile models``.
    """

    name: str
    family: str
    depth: int
    width: int
    heads: int
    head_dim: int
    schedules: tuple[Schedule, ...] = field(repr=False)
    default_resolution: int
    mlp_ratio: float = 4.0
    notes: str = ""

    @property
    def resolutions(self) -> tuple[int, ...]:
        return tuple(sorted({s.resolution for s in self.schedules}))

    def aspects(self, resolution: int) -> tuple[str, ...]:
        return tuple(s.aspect for s in self.schedules if s.resolution == resolution)

    def schedule(self, resolution: int | str | None = None, aspect: str | float | None = None) -> Schedule:
        """The schedule of a resolution (pixels or an Infinity name like ``"1M"``) and aspect (``"h:w"``)."""
        res = self.default_resolution if resolution is None else parse_resolution(resolution, self.resolutions)
        aspects = self.aspects(res)
        name = "1:1" if aspect is None else parse_aspect(aspect, aspects)
        for s in self.schedules:
            if s.resolution == res and s.aspect == name:
                return s
        raise ScheduleError(f"model {self.name} has no {res} px schedule for aspect {name}")


def _infinity(name: str, depth: int, width: int, heads: int, notes: str) -> ModelSpec:
    return ModelSpec(name, "infinity", depth, width, heads, 128, infinity_schedules(), 1024, notes=notes)


def _var(depth: int, resolutions: tuple[int, ...], default: int, width: int | None = None, heads: int | None = None):
    return ModelSpec(
        f"var-d{depth}", "var", depth, width or 64 * depth, heads or depth, 64,
        var_schedules(resolutions), default,
        notes="class-conditional; the 1024 px schedule is config only" if 1024 in resolutions else "class-conditional",
    )


_TEXT = "text via Flan-T5-XL (2048 ch, <=512 tokens), separate cross-attention"

REGISTRY: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        _infinity("infinity-2b", 32, 2048, 16, _TEXT),
        _infinity("infinity-8b", 40, 3584, 28, _TEXT + "; transformer grid 64x64 at 1024^2"),
        _infinity("infinity-20b", 58, 4608, 36, "config only"),
        _var(16, (256,), 256),
        _var(20, (256,), 256),
        _var(24, (256,), 256),
        _var(30, (256,), 256),
        _var(36, (512, 1024), 512, width=2304, heads=36),
    )
}


def list_models() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get_model(name_or_path: str | Path) -> ModelSpec:
    """A registered model by name, or a user model from a ``.yaml``/``.yml`` file."""
    text = str(name_or_path)
    if text in REGISTRY:
        return REGISTRY[text]
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return load_model_file(Path(text))
    raise ModelError(f"unknown model {text!r}; known models: {', '.join(REGISTRY)} (or a path to a .yaml file)")


def _require_int(d: Mapping[str, Any], key: str, where: str, default: int | None = None,
                 limit: int | None = None) -> int:
    if key not in d:
        if default is not None:
            return default
        raise ModelError(f"{where}: missing field '{key}'")
    v = d[key]
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ModelError(f"{where}: field '{key}' must be a positive integer, got {_short(v)}")
    if limit is not None and v > limit:
        raise ModelError(f"{where}: field '{key}' is {v}, over the limit of {limit} (sparvar_compiler.limits)")
    return v


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about values from a file."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_model_name(name: Any, where: str) -> str:
    """``name`` if it is a valid model name, else :class:`ModelError` naming ``where``'s field ``name``.

    A model name becomes part of file names (the default output ``out/<model>-...``, tuning studies), so it is
    restricted to :data:`~sparvar_compiler.limits.NAME_PATTERN` (letters, digits, ``.``, ``_``, ``-``), at most
    :data:`~sparvar_compiler.limits.MAX_NAME_LENGTH` characters, and not ``.`` or ``..``: it can never walk out of
    a directory or hide in one."""
    if not isinstance(name, str) or not name:
        raise ModelError(f"{where}: field 'name' must be a non-empty string, got {_short(name)}")
    if len(name) > MAX_NAME_LENGTH:
        raise ModelError(f"{where}: field 'name' is {len(name)} characters long, over the limit of "
                         f"{MAX_NAME_LENGTH} (sparvar_compiler.limits.MAX_NAME_LENGTH)")
    if not re.fullmatch(NAME_PATTERN, name) or name in (".", ".."):
        raise ModelError(f"{where}: field 'name' {_short(name)} may hold only letters, digits, '.', '_' and '-' "
                         "(and is not '.' or '..'): it names output directories")
    return name


def model_from_mapping(data: Any, where: str) -> ModelSpec:
    """Build a :class:`ModelSpec` from parsed YAML/JSON, naming the bad field on error."""
    if not isinstance(data, Mapping):
        raise ModelError(f"{where}: expected a mapping with name, depth, heads, head_dim, schedules")
    known = {"name", "family", "depth", "width", "heads", "head_dim", "mlp_ratio", "schedules", "notes",
             "default_resolution"}
    unknown = sorted(map(str, set(data) - known))
    if unknown:
        raise ModelError(f"{where}: unknown field {_short(unknown[0])} (known: {', '.join(sorted(known))})")
    name = data.get("name")
    name = check_model_name(name.strip() if isinstance(name, str) else name, where)
    family = data.get("family", "custom")
    if family not in ("infinity", "var", "custom"):
        raise ModelError(f"{where}: field 'family' must be infinity, var or custom, got {_short(family)}")
    depth = _require_int(data, "depth", where, limit=MAX_DEPTH)
    heads = _require_int(data, "heads", where, limit=MAX_HEADS)
    head_dim = _require_int(data, "head_dim", where, limit=MAX_HEAD_DIM)
    width = _require_int(data, "width", where, default=heads * head_dim, limit=MAX_WIDTH)
    mlp_ratio = data.get("mlp_ratio", 4.0)
    if (not isinstance(mlp_ratio, (int, float)) or isinstance(mlp_ratio, bool) or not mlp_ratio > 0
            or not math.isfinite(mlp_ratio)):
        raise ModelError(f"{where}: field 'mlp_ratio' must be a positive number, got {_short(mlp_ratio)}")
    notes = data.get("notes", "")
    if not isinstance(notes, str):
        raise ModelError(f"{where}: field 'notes' must be a string, got {_short(notes)}")
    raw = data.get("schedules")
    if not isinstance(raw, list) or not raw:
        raise ModelError(f"{where}: field 'schedules' must be a non-empty list")
    if len(raw) > MAX_SCHEDULES:
        raise ModelError(f"{where}: field 'schedules' has {len(raw)} entries, over the limit of {MAX_SCHEDULES} "
                         "(sparvar_compiler.limits.MAX_SCHEDULES)")
    schedules = []
    for i, s in enumerate(raw):
        sw = f"{where}: schedules[{i}]"
        if not isinstance(s, Mapping):
            raise ModelError(f"{sw} must be a mapping with resolution and scales")
        bad = sorted(map(str, set(s) - {"resolution", "aspect", "scales", "config_only"}))
        if bad:
            raise ModelError(f"{sw}: unknown field {_short(bad[0])}")
        res = _require_int(s, "resolution", sw)
        aspect = s.get("aspect", "1:1")
        if not isinstance(aspect, str) or len(aspect) > 16 or aspect.count(":") != 1 or not all(
            p.isascii() and p.isdigit() and int(p) > 0 for p in aspect.split(":")
        ):
            raise ModelError(f"{sw}: field 'aspect' must look like '1:1' or '4:3', got {_short(aspect)}")
        if "scales" not in s:
            raise ModelError(f"{sw}: missing field 'scales'")
        try:
            grids = parse_schedule(s["scales"], f"{sw}.scales")
        except ScheduleError as e:
            raise ModelError(str(e)) from None
        if any((x.resolution, x.aspect) == (res, aspect) for x in schedules):
            raise ModelError(f"{sw}: duplicate schedule for resolution {res} aspect {aspect}")
        config_only = s.get("config_only", False)
        if not isinstance(config_only, bool):
            raise ModelError(f"{sw}: field 'config_only' must be true or false, got {_short(config_only)}")
        schedules.append(Schedule(res, aspect, grids, config_only))
    default_res = data.get("default_resolution", max(s.resolution for s in schedules))
    if (not isinstance(default_res, int) or isinstance(default_res, bool)
            or default_res not in {s.resolution for s in schedules}):
        raise ModelError(f"{where}: field 'default_resolution' {_short(default_res)} has no schedule")
    return ModelSpec(name, family, depth, width, heads, head_dim, tuple(schedules), default_res,
                     float(mlp_ratio), notes)


def load_model_file(path: Path) -> ModelSpec:
    """The model described by the YAML file ``path`` (size, encoding and nesting bounded before parsing:
    :func:`~sparvar_compiler.yamlfile.load_yaml_file`)."""
    return model_from_mapping(load_yaml_file(path, ModelError, "model file"), str(path))
