"""Plan configuration: SparVAR's knobs, their defaults, and validation.

Defaults (documented in the README), for a schedule of ``n`` scales and a model of ``depth`` layers:

* ``decision_scale`` = ``n - 3`` (the third scale from the last; 10 for Infinity at 1024^2, where SparVAR uses
  S = 10). SparVAR notes that S < 8 gives visible artefacts at 1024^2.
* ``bound_layer`` = ``round(11 * depth / 40)`` (11 for Infinity-8B's 40 layers, as published).
* ``sink_scales`` = ``min(5, n - 5)`` leading scales, always fully kept (scales 0-4 = 121 tokens at 1024^2),
  at least 1.
* ``windows`` (per key scale) = ``-1`` for every scale but the last five, which get ``1, 1, 3, 5, 7``
  (``[-1 x8, 1, 1, 3, 5, 7]`` at 1024^2); ``-1`` drops a key scale unless it is a sink.
* ``skip_last`` = 0: scale skipping (the last N scales' transformer passes are replaced by upsampling).
* ``cs4a`` = ``"token"``: layers below the bound layer use CS4A at the scales after the decision scale; ``"block"``
  uses the block variant D-CSLA; ``"off"`` keeps those layers dense. The fully static plan (CSLA from the
  decision scale on, in every layer) is ``bound_layer: 0``.
* CS4A budgets: groups of ``group_size`` = 192 queries keep the top ``topk_fraction`` = 0.2 of the decision scale's
  keys, rounded to ``key_tile`` = 112 keys (this reproduces the published 784 of 4121), plus a local band of
  ``band_windows`` = 7, 9, 11, ... (one per scale after the decision scale).
* ``token_exact`` = False: active blocks are computed whole, as SparVAR does; True masks every partial block
  to the exact CSLA token mask.
* ``residual`` = True: CS4A keeps the decision scale's ``O_dense - O_sparse`` per layer and adds its bilinear
  upsampling to the later scales' CS4A outputs, as SparVAR does.
* ``decision_band`` = False: the decision scale's sparse pattern, which the residual is taken against, is each
  group's own top-k only. True adds the local band of the first later scale (``band_windows[0]``) around each
  group, as every later CS4A scale has, so the residual carries only what neither the top-k nor a band holds
  (token CS4A only; D-CSLA's decision blocks already hold their +-1 diagonal). The fidelity report and
  ``calibrate`` model it; the runtime does not yet (:func:`check_runtime_support` refuses it for a module).
  Written by :meth:`PlanConfig.to_dict` only when true, so plans and modules of the default read as before.
* D-CSLA (``cs4a: block``): ``dcsla_block`` = 64 (query and key block side), ``dcsla_coverage`` = 0.9 of each
  row's decision-scale mass, at least ``dcsla_min_blocks`` = 16 blocks and at most half the row.

Every option is type-checked (``true`` is not an integer) and bounded where it is read, by a file or by
``PlanConfig(...)`` itself, against :mod:`sparvar_compiler.limits`: ``group_size`` 16..``MAX_GROUP_SIZE`` in
steps of 16, ``key_tile`` up to ``MAX_KEY_TILE``, ``dcsla_block`` up to ``MAX_DCSLA_BLOCK``, window lists of at
most ``MAX_WINDOW_COUNT`` entries of at most ``MAX_WINDOW``, scale and layer numbers up to ``MAX_SCALES`` and
``MAX_DEPTH``; fractions in (0, 1].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .. import limits
from ..errors import PlanConfigError
from ..limits import shown
from ..yamlfile import load_yaml_file

CS4A_MODES = ("token", "block", "off")
GROUP_QUANTUM = 16  # a CS4A query group is a whole number of the kernels' smallest query tile
KEY_MAPPINGS = ("identity", "flat", "dap")


@dataclass(frozen=True)
class PlanConfig:
    """SparVAR plan options. ``None`` means "the default for this model and schedule" (see module docstring).

    After :func:`resolve_config` every field is concrete; a :class:`~sparvar_compiler.planner.plan.Plan` always
    carries the resolved config.
    """

    decision_scale: int | None = None
    bound_layer: int | None = None
    sink_scales: int | None = None
    windows: tuple[int, ...] | None = None
    skip_last: int = 0
    cs4a: str = "token"
    key_mapping: str = "identity"
    group_size: int = 192
    topk_fraction: float = 0.2
    key_tile: int = 112
    band_windows: tuple[int, ...] | None = None
    token_exact: bool = False
    residual: bool = True
    dcsla_block: int = 64
    dcsla_coverage: float = 0.9
    dcsla_min_blocks: int = 16
    decision_band: bool = False

    def __post_init__(self) -> None:
        _validate(self, "plan config")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("windows", "band_windows"):
            if d[k] is not None:
                d[k] = list(d[k])
        if not d["decision_band"]:
            del d["decision_band"]  # off: the dict (plan files, module manifests) reads as before the option
        return d

    def replace(self, **changes: Any) -> "PlanConfig":
        """A copy with the given fields changed; ``None`` values are ignored (CLI flags not given)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return config_from_mapping({**self.to_dict(), **changes}, "plan config")


_FIELDS = {f.name: f for f in dataclasses.fields(PlanConfig)}

# Integer options: (smallest, largest, name of the largest in sparvar_compiler.limits). Ranges that depend on the
# model and schedule (decision_scale < scales, bound_layer <= depth, ...) are checked by resolve_config.
_INT_RANGES = {
    "decision_scale": (0, limits.MAX_SCALES, "MAX_SCALES"),
    "bound_layer": (0, limits.MAX_DEPTH, "MAX_DEPTH"),
    "sink_scales": (0, limits.MAX_SCALES, "MAX_SCALES"),
    "skip_last": (0, limits.MAX_SCALES, "MAX_SCALES"),
    "group_size": (1, limits.MAX_GROUP_SIZE, "MAX_GROUP_SIZE"),
    "key_tile": (1, limits.MAX_KEY_TILE, "MAX_KEY_TILE"),
    "dcsla_block": (1, limits.MAX_DCSLA_BLOCK, "MAX_DCSLA_BLOCK"),
    "dcsla_min_blocks": (1, limits.MAX_KV_LEN, "MAX_KV_LEN"),
}


def _int(value: Any, name: str, where: str, minimum: int | None = None, maximum: tuple[int, str] | None = None
         ) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanConfigError(f"{where}: '{name}' must be an integer, got {shown(value)}")
    if minimum is not None and value < minimum:
        raise PlanConfigError(f"{where}: '{name}' must be >= {minimum}, got {shown(value)}")
    if maximum is not None:
        limits.check_limit(value, maximum[0], maximum[1], f"{where}: '{name}'", PlanConfigError)
    return value


def _int_list(value: Any, name: str, where: str) -> tuple[int, ...]:
    """A window list: a list of integers or ``"1,2,3"``; its length is checked before anything is converted."""
    if isinstance(value, str):
        limits.check_limit(value.count(",") + 1, limits.MAX_WINDOW_COUNT, "MAX_WINDOW_COUNT",
                           f"{where}: '{name}' entry count", PlanConfigError)
        try:
            value = [int(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            raise PlanConfigError(f"{where}: '{name}' must be a list of integers, got {shown(value)}") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise PlanConfigError(f"{where}: '{name}' must be a non-empty list of integers, got {shown(value)}")
    limits.check_limit(len(value), limits.MAX_WINDOW_COUNT, "MAX_WINDOW_COUNT", f"{where}: '{name}' entry count",
                       PlanConfigError)
    out = tuple(_int(v, f"{name}[{i}]", where) for i, v in enumerate(value))
    for i, r in enumerate(out):
        if name == "windows" and (r == 0 or r < -1):
            raise PlanConfigError(f"{where}: windows[{i}] = {r}: a window is -1 (drop) or a positive size")
        if name == "band_windows" and r < 1:
            raise PlanConfigError(f"{where}: band_windows[{i}] = {r} must be positive")
        limits.check_limit(r, limits.MAX_WINDOW, "MAX_WINDOW", f"{where}: {name}[{i}]", PlanConfigError)
    return out


def _fraction(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise PlanConfigError(f"{where}: '{name}' must be a number in (0, 1], got {shown(value)}")
    return float(value)


def _check_option(name: str, value: Any, where: str) -> Any:
    """One plan option, type-checked and bounded (see the module docstring and :mod:`sparvar_compiler.limits`)."""
    if name in _INT_RANGES:
        lo, hi, hi_name = _INT_RANGES[name]
        value = _int(value, name, where, minimum=lo, maximum=(hi, hi_name))
        if name == "group_size" and value % GROUP_QUANTUM:
            raise PlanConfigError(f"{where}: 'group_size' must be a multiple of {GROUP_QUANTUM} (the gather and "
                                  f"statistics kernels cut a group into 16-, 32- or 64-row tiles), got {value}")
        return value
    if name in ("windows", "band_windows"):
        return _int_list(value, name, where)
    if name == "cs4a":
        if not isinstance(value, str) or value not in CS4A_MODES:
            raise PlanConfigError(f"{where}: 'cs4a' must be one of {', '.join(CS4A_MODES)}, got {shown(value)}")
        return value
    if name == "key_mapping":
        if not isinstance(value, str) or value not in KEY_MAPPINGS:
            raise PlanConfigError(
                f"{where}: 'key_mapping' must be one of {', '.join(KEY_MAPPINGS)}, got {shown(value)}")
        return value
    if name in ("topk_fraction", "dcsla_coverage"):
        return _fraction(value, name, where)
    if name in ("token_exact", "residual", "decision_band"):
        if not isinstance(value, bool):
            raise PlanConfigError(f"{where}: '{name}' must be true or false, got {shown(value)}")
        return value
    raise PlanConfigError(f"{where}: unknown option {shown(name)} (known: {', '.join(_FIELDS)})")


def _validate(config: PlanConfig, where: str) -> None:
    """Check every field of a config built directly (``PlanConfig(group_size=...)``), as a file's are checked."""
    for name in _FIELDS:
        value = getattr(config, name)
        if value is None and _FIELDS[name].default is None:
            continue
        checked = _check_option(name, value, where)
        if name in ("windows", "band_windows"):
            object.__setattr__(config, name, checked)  # a list or "1,2,3" is stored as the tuple


def config_from_mapping(data: Any, where: str) -> PlanConfig:
    """Parse a plan config (from YAML or JSON); unknown or malformed fields raise, naming the field.

    Every numeric option is type-checked (``true`` is not an integer) and bounded by
    :mod:`sparvar_compiler.limits` here, before anything sized by it exists.
    """
    if data is None:
        return PlanConfig()
    if not isinstance(data, Mapping):
        raise PlanConfigError(f"{where}: expected a mapping of plan options, got {type(data).__name__}")
    unknown = sorted((k for k in data if k not in _FIELDS), key=str)
    if unknown:
        raise PlanConfigError(f"{where}: unknown option {shown(unknown[0])} (known: {', '.join(_FIELDS)})")
    kw = {name: _check_option(name, value, where) for name, value in data.items() if value is not None}
    return PlanConfig(**kw)


#: Options the runtime (``sparvar_compiler.runtime``, ``emit``) cannot honour yet: name -> (value it cannot run,
#: why). The fidelity report and ``calibrate`` model them; a module must not be emitted with them.
RUNTIME_UNSUPPORTED = {
    "decision_band": (True, "the emitted decision-scale CS4A tables hold each group's top-k only, without a band"),
}


def check_runtime_support(config: PlanConfig, where: str = "plan config") -> None:
    """Refuse a config the runtime cannot run (:data:`RUNTIME_UNSUPPORTED`): call before emitting or tuning a
    module, so that a module never silently runs another plan than the one its manifest names.

    Raises
    ------
    PlanConfigError
        ``<where>: 'decision_band: true' is not supported by the runtime yet (...)``.
    """
    for name, (value, why) in RUNTIME_UNSUPPORTED.items():
        if getattr(config, name) == value:
            shown_value = str(value).lower() if isinstance(value, bool) else value
            raise PlanConfigError(f"{where}: '{name}: {shown_value}' is not supported by the runtime yet ({why}); "
                                  f"it is a fidelity-study option: drop it to compile a module")


def load_config_file(path: str | Path) -> PlanConfig:
    """A plan config YAML file (at most :data:`~sparvar_compiler.limits.MAX_YAML_BYTES`, UTF-8, no alias
    bombs: :func:`sparvar_compiler.yamlfile.load_yaml_file`)."""
    p = Path(path)
    return config_from_mapping(load_yaml_file(p, PlanConfigError, "plan config"), str(p))


def default_windows(num_scales: int) -> tuple[int, ...]:
    tail = (1, 1, 3, 5, 7)[-num_scales:]
    return (-1,) * (num_scales - len(tail)) + tail


def resolve_config(config: PlanConfig, num_scales: int, depth: int) -> PlanConfig:
    """Fill defaults for a schedule of ``num_scales`` scales and a model of ``depth`` layers, then validate."""
    n = num_scales
    decision = max(n - 3, 1) if config.decision_scale is None else config.decision_scale
    bound = round(11 * depth / 40) if config.bound_layer is None else config.bound_layer
    sinks = max(1, min(5, n - 5)) if config.sink_scales is None else config.sink_scales
    windows = default_windows(n) if config.windows is None else config.windows
    extra = n - 1 - decision
    bands = tuple(7 + 2 * i for i in range(max(extra, 0))) if config.band_windows is None else config.band_windows

    where = "plan config"
    if not 1 <= decision <= n - 1:
        raise PlanConfigError(
            f"{where}: decision_scale {decision} is out of range: this schedule has scales 0..{n - 1}, "
            f"and the decision scale must be between 1 and {n - 1}")
    if bound > depth:
        raise PlanConfigError(f"{where}: bound_layer {bound} is out of range: the model has {depth} layers "
                              f"(0..{depth - 1}; {depth} means no CSLA layer)")
    if sinks > decision:
        raise PlanConfigError(f"{where}: sink_scales {sinks} must not exceed the decision scale {decision}")
    if len(windows) != n:
        raise PlanConfigError(
            f"{where}: windows has {len(windows)} entries but the schedule has {n} scales "
            "(one window per key scale; -1 drops a scale)")
    for i, r in enumerate(windows):
        if r == 0 or r < -1:
            raise PlanConfigError(f"{where}: windows[{i}] = {r}: a window is -1 (drop) or a positive size")
    if config.skip_last >= n - decision:
        raise PlanConfigError(
            f"{where}: skip_last {config.skip_last} would skip the decision scale {decision} "
            f"(at most {n - decision - 1} of the {n} scales can be skipped)")
    if len(bands) < max(extra, 0):
        raise PlanConfigError(
            f"{where}: band_windows has {len(bands)} entries; it needs one per scale after the decision scale "
            f"({extra})")
    for i, r in enumerate(bands):
        if r < 1:
            raise PlanConfigError(f"{where}: band_windows[{i}] = {r} must be positive")
    return dataclasses.replace(config, decision_scale=decision, bound_layer=bound, sink_scales=sinks,
                               windows=tuple(windows), band_windows=tuple(bands[: max(extra, 0)]))
