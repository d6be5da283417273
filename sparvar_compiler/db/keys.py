"""Deterministic keys of tuning records: resolve the defaults, check the types, hash sorted-key JSON.

A key is the hex sha256 of the canonical JSON (sorted keys, no spaces, no NaN) of the *resolved* value, so a
spec written with or without its default fields, in any key order, has one key, and changing any field changes
it. Changing how keys are computed orphans every stored record, so a test pins a known key.

The workload fields mirror :class:`sparvar_compiler.codegen.spec.KernelSpec` (a test checks names, types and
defaults against it); they are listed here so that the database works without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from .schema import TuningDatabaseError

_REQUIRED = object()

#: name -> (type, default); ``_REQUIRED`` marks fields without a default. Positive ints are sizes.
WORKLOAD_FIELDS: dict[str, tuple[type, Any]] = {
    "backend": (str, _REQUIRED),
    "kind": (str, _REQUIRED),
    "batch": (int, _REQUIRED),
    "heads": (int, _REQUIRED),
    "q_len": (int, _REQUIRED),
    "kv_len": (int, _REQUIRED),
    "head_dim": (int, _REQUIRED),
    "dtype": (str, _REQUIRED),
    "block_m": (int, _REQUIRED),
    "block_n": (int, _REQUIRED),
    "layout_hash": (str, _REQUIRED),
    "token_exact": (bool, False),
    "return_lse": (bool, False),
    "scale_kind": (str, "default"),
    "dynamic": (bool, False),
    "capacity": (int, 0),
}

#: Fields added after records existed: left out of a resolved workload while they hold their default, so the
#: keys of every earlier (static) workload stay what they were.
OMITTED_AT_DEFAULT = ("dynamic", "capacity")

#: What identifies a target card. Other fields of ``GpuSpec.to_dict()`` (shared memory, L2) follow from these
#: and are ignored.
TARGET_FIELDS: dict[str, type] = {"name": str, "arch": str, "sm_count": int}

#: Config fields every backend has, with ``KernelConfig``'s defaults.
CONFIG_DEFAULTS: dict[str, int] = {"num_warps": 4, "num_stages": 2}


def canonical_json(value: Any) -> str:
    """Sorted-key compact JSON; NaN and infinities are refused."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _sha256(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def _check_type(what: str, name: str, value: Any, kind: type) -> None:
    # bool is an int subclass: a True batch or a 1 for a flag is a bug in the caller, not a value.
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise TuningDatabaseError(f"{what} field {name!r} must be {kind.__name__}, got {value!r}")
    if kind is int and value <= 0:
        raise TuningDatabaseError(f"{what} field {name!r} must be positive, got {value}")
    if kind is str and not value:
        raise TuningDatabaseError(f"{what} field {name!r} must not be empty")


def _mapping(what: str, value: Any) -> Mapping:
    if not isinstance(value, Mapping):
        raise TuningDatabaseError(f"{what} must be a mapping, got {type(value).__name__}")
    return value


def resolve_workload(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check a ``KernelSpec.to_dict()`` and fill its defaults.

    Raises
    ------
    TuningDatabaseError
        An unknown or missing field, or a value of the wrong type.
    """
    spec = _mapping("workload", spec)
    unknown = sorted(set(spec) - set(WORKLOAD_FIELDS))
    if unknown:
        raise TuningDatabaseError(f"workload has unknown fields {unknown}; known: {sorted(WORKLOAD_FIELDS)}")
    out: dict[str, Any] = {}
    for name, (kind, default) in WORKLOAD_FIELDS.items():
        if name in spec:
            value = spec[name]
        elif default is _REQUIRED:
            raise TuningDatabaseError(f"workload is missing field {name!r}")
        else:
            value = default
        if name in OMITTED_AT_DEFAULT and value == default and type(value) is type(default):
            continue
        _check_type("workload", name, value, kind)
        out[name] = value
    return dict(sorted(out.items()))


def resolve_target(gpu: Mapping[str, Any]) -> dict[str, Any]:
    """The identifying fields (name, arch, SM count) of a ``GpuSpec.to_dict()``, checked."""
    gpu = _mapping("target", gpu)
    out: dict[str, Any] = {}
    for name, kind in TARGET_FIELDS.items():
        if name not in gpu:
            raise TuningDatabaseError(f"target is missing field {name!r}")
        _check_type("target", name, gpu[name], kind)
        out[name] = gpu[name]
    return out


def resolve_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A ``KernelConfig.to_dict()`` with ``num_warps``/``num_stages`` defaults filled and JSON scalars only."""
    config = _mapping("config", config)
    out: dict[str, Any] = {**CONFIG_DEFAULTS, **config}
    for name, value in out.items():
        if not isinstance(name, str) or not name:
            raise TuningDatabaseError(f"config field names must be non-empty strings, got {name!r}")
        if name in CONFIG_DEFAULTS:
            _check_type("config", name, value, int)
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            raise TuningDatabaseError(f"config field {name!r} must be a JSON scalar, got {type(value).__name__}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise TuningDatabaseError(f"config field {name!r} must be finite, got {value}")
    return dict(sorted(out.items()))


def workload_key(spec: Mapping[str, Any]) -> str:
    """sha256 of the resolved workload (every ``KernelSpec`` field)."""
    return _sha256(resolve_workload(spec))


def target_key(gpu: Mapping[str, Any]) -> str:
    """sha256 of the target's name, arch and SM count."""
    return _sha256(resolve_target(gpu))


def config_key(config: Mapping[str, Any]) -> str:
    """sha256 of the resolved config."""
    return _sha256(resolve_config(config))
