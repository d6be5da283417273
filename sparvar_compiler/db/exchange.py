"""Move tuning records between databases as JSON: export winners with their evidence, import with checks.

Document (``format_version`` 1)::

    {"format": "sparvar-tuning-db", "format_version": 1, "sparvar_version": "...", "exported_at": "<ISO 8601>",
     "targets":   [{"key", "name", "arch", "sm_count"}],
     "workloads": [{"key", "spec": {KernelSpec fields}}],
     "trials":    [{"workload_key", "target_key", "config", "config_key", "timings_ms", "median_ms", "valid",
                    "reason", "detail", "environment", "study", "worker", "created_at"}],
     "winners":   [{"workload_key", "target_key", "config_key", "study"}]}

Trials are listed in recording order. An import checks everything before it writes anything: exact field sets
and types, every key recomputed from its content, every reference resolved, medians recomputed, and each
claimed winner the best valid trial of its pair (ties to the earlier). Then every valid trial - a record that
can win - must be one the compiler can use (:func:`sparvar_compiler.tuner.validate.validate_record`): a target
in the GPU registry, a config the backend accepts (known knobs of exact types, known enum values) within the
launch limits, and a median no faster than the roofline bound of its workload on its target. Invalid trials
are evidence, not candidates, and keep the configs they failed with.

A document that fails any check is refused whole with :class:`~.schema.ExchangeFormatError`, whose one-line
message names the first bad record (``import refused: trials[3] (triton/block 4096x10521 64x64 on h100):
block_m must be an integer, got 64.9``): an export is one consistent set of measurements, and a partly
imported one would leave winners that its author never saw. Accepted records go through the normal write path
in one transaction, so importing twice adds nothing and the importing database decides its own winners.

:func:`import_json` bounds what it reads before parsing (:mod:`.bounded_json`): at most
``limits.MAX_JSON_BYTES``, strict UTF-8, nesting up to ``MAX_JSON_DEPTH``, number literals up to
``MAX_JSON_NUMBER_DIGITS`` characters.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from .bounded_json import JsonInputError, read_json
from .keys import config_key, resolve_config, target_key, workload_key
from .schema import INVALID_REASONS, ExchangeFormatError, TuningDatabaseError
from .store import TrialRecord, TuningDatabase, freeze_sqlite

FORMAT = "sparvar-tuning-db"
FORMAT_VERSION = 1

_DOC_FIELDS = {"format", "format_version", "sparvar_version", "exported_at", "targets", "workloads", "trials",
               "winners"}
_TARGET_FIELDS = {"key", "name", "arch", "sm_count"}
_WORKLOAD_FIELDS = {"key", "spec"}
_TRIAL_FIELDS = {"workload_key", "target_key", "config", "config_key", "timings_ms", "median_ms", "valid",
                 "reason", "detail", "environment", "study", "worker", "created_at"}
_WINNER_FIELDS = {"workload_key", "target_key", "config_key", "study"}


def _trial_json(t: TrialRecord) -> dict[str, Any]:
    return {"workload_key": t.workload_key, "target_key": t.target_key, "config": t.config,
            "config_key": t.config_key, "timings_ms": list(t.timings_ms), "median_ms": t.median_ms,
            "valid": t.valid, "reason": t.reason, "detail": t.detail, "environment": t.environment,
            "study": t.study, "worker": t.worker, "created_at": t.created_at.isoformat()}


def export_document(db: TuningDatabase, *, all_trials: bool = False) -> dict[str, Any]:
    """Every winner of ``db`` with its target, workload and winning trial (``all_trials``: every trial in the
    database, winners marked), as a JSON-ready document. Rows are checked as they are read."""
    pairs = db.winner_keys()
    winners = [db.winner(wk, tk) for wk, tk in pairs]
    trials = db.trials() if all_trials else sorted(winners, key=lambda t: t.id)
    used_w = {t.workload_key for t in trials}
    used_t = {t.target_key for t in trials}
    targets = [{"key": k, **v} for k, v in db.targets().items() if k in used_t]
    workloads = [{"key": k, "spec": v} for k, v in db.workloads().items() if k in used_w]
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "sparvar_version": __version__,
        "exported_at": datetime.now(timezone.utc).isoformat(),
        "targets": targets, "workloads": workloads, "trials": [_trial_json(t) for t in trials],
        "winners": [{"workload_key": w.workload_key, "target_key": w.target_key, "config_key": w.config_key,
                     "study": w.study} for w in winners],
    }


def export_json(db: TuningDatabase, path: str | os.PathLike, *, all_trials: bool = False) -> dict[str, Any]:
    """Write :func:`export_document` to ``path`` (atomically) and return it."""
    doc = export_document(db, all_trials=all_trials)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return doc


# ---------------------------------------------------------------------------------------------------- import

def _fail(where: str, msg: str) -> ExchangeFormatError:
    return ExchangeFormatError(f"import refused: {where}: {msg}")


def _fields(where: str, value: Any, expected: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(where, f"must be an object, got {type(value).__name__}")
    if set(value) != expected:
        missing, extra = sorted(expected - set(value)), sorted(set(value) - expected)
        raise _fail(where, f"fields differ from the format (missing {missing}, unknown {extra})")
    return value


def _list(doc: Mapping[str, Any], name: str) -> list:
    if not isinstance(doc[name], list):
        raise _fail(name, f"must be a list, got {type(doc[name]).__name__}")
    return doc[name]


def _typed(where: str, value: Any, kinds: tuple[type, ...], optional: bool = False) -> Any:
    if value is None and optional:
        return value
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
        raise _fail(where, f"must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def _keyed(where: str, stated: Any, compute, content: Any) -> str:
    try:
        actual = compute(content)
    except TuningDatabaseError as e:
        raise _fail(where, str(e)) from None
    if stated != actual:
        raise _fail(where, f"key {stated!r} does not match its content (recomputed {actual})")
    return actual


def _check_trial(i: int, t: Mapping[str, Any], workloads: set[str], targets: set[str]) -> None:
    where = f"trials[{i}]"
    _fields(where, t, _TRIAL_FIELDS)
    if t["workload_key"] not in workloads:
        raise _fail(where, f"workload {t['workload_key']!r} is not in the document")
    if t["target_key"] not in targets:
        raise _fail(where, f"target {t['target_key']!r} is not in the document")
    if not isinstance(t["config"], Mapping):
        raise _fail(where, f"config must be an object, got {type(t['config']).__name__}")
    _keyed(where, t["config_key"], config_key, t["config"])
    if dict(t["config"]) != resolve_config(t["config"]):
        raise _fail(where, "config is not in resolved form")
    valid = _typed(f"{where}.valid", t["valid"], (bool,))
    timings = _typed(f"{where}.timings_ms", t["timings_ms"], (list,))
    for x in timings:
        if _typed(f"{where}.timings_ms", x, (int, float)) <= 0 or not math.isfinite(x):
            raise _fail(where, f"timing {x!r} is not a finite positive number")
    if valid:
        median = _typed(f"{where}.median_ms", t["median_ms"], (int, float))
        if not timings or t["reason"] is not None:
            raise _fail(where, "a valid trial needs timings and no invalid reason")
        if not math.isclose(median, statistics.median(timings), rel_tol=1e-12):
            raise _fail(where, f"median_ms {median} is not the median of its timings")
    else:
        if t["median_ms"] is not None:
            raise _fail(where, "an invalid trial has no median")
        if t["reason"] not in INVALID_REASONS:
            raise _fail(where, f"reason {t['reason']!r} is not one of {INVALID_REASONS}")
    _typed(f"{where}.detail", t["detail"], (str,), optional=True)
    _typed(f"{where}.worker", t["worker"], (str,), optional=True)
    _typed(f"{where}.study", t["study"], (str,))
    env = _typed(f"{where}.environment", t["environment"], (dict,))
    for k, v in env.items():
        if v is not None and not isinstance(v, (str, int, float, bool)):
            raise _fail(where, f"environment field {k!r} must be a JSON scalar")
    try:
        stamp = datetime.fromisoformat(_typed(f"{where}.created_at", t["created_at"], (str,)))
    except ValueError:
        raise _fail(where, f"created_at {t['created_at']!r} is not an ISO 8601 time") from None
    if stamp.tzinfo is None:
        raise _fail(where, "created_at must carry a time zone")


def validate_document(doc: Any) -> None:
    """Raise :class:`ExchangeFormatError` unless ``doc`` is a complete, untampered export."""
    _fields("document", doc, _DOC_FIELDS)
    if doc["format"] != FORMAT:
        raise _fail("format", f"expected {FORMAT!r}, got {doc['format']!r}")
    version = _typed("format_version", doc["format_version"], (int,))
    if version > FORMAT_VERSION or version < 1:
        raise _fail("format_version", f"{version} is not supported (this sparvar-compiler reads 1 to "
                                      f"{FORMAT_VERSION}); upgrade sparvar-compiler")
    targets, workloads = set(), set()
    for i, t in enumerate(_list(doc, "targets")):
        _fields(f"targets[{i}]", t, _TARGET_FIELDS)
        targets.add(_keyed(f"targets[{i}]", t["key"], target_key, {k: t[k] for k in ("name", "arch", "sm_count")}))
    for i, w in enumerate(_list(doc, "workloads")):
        _fields(f"workloads[{i}]", w, _WORKLOAD_FIELDS)
        workloads.add(_keyed(f"workloads[{i}]", w["key"], workload_key, w["spec"]))
    best: dict[tuple[str, str], tuple[float, int]] = {}
    seen: dict[tuple[str, str, str, str], int] = {}
    for i, t in enumerate(_list(doc, "trials")):
        _check_trial(i, t, workloads, targets)
        identity = (t["workload_key"], t["target_key"], t["config_key"], t["study"])
        if identity in seen:
            raise _fail(f"trials[{i}]", f"repeats trials[{seen[identity]}]")
        seen[identity] = i
        pair = identity[:2]
        if t["valid"] and (t["median_ms"], i) < best.get(pair, (math.inf, -1)):
            best[pair] = (t["median_ms"], i)
    claimed = set()
    for i, w in enumerate(_list(doc, "winners")):
        _fields(f"winners[{i}]", w, _WINNER_FIELDS)
        pair = (w["workload_key"], w["target_key"])
        identity = (*pair, w["config_key"], w["study"])
        if identity not in seen:
            raise _fail(f"winners[{i}]", "names a trial that is not in the document")
        if pair in claimed:
            raise _fail(f"winners[{i}]", "a second winner for one workload and target")
        if pair not in best or best[pair][1] != seen[identity]:
            raise _fail(f"winners[{i}]", "is not the best valid trial of its workload and target")
        claimed.add(pair)
    if claimed != set(best):
        raise _fail("winners", f"{len(set(best) - claimed)} workload/target pairs with valid trials have none")
    _check_usable(doc)


def _check_usable(doc: Mapping[str, Any]) -> None:
    """Every valid trial of a well-formed document is one the compiler can use (see the module docstring)."""
    # The validator needs the code generators (and torch): imported here, so that the database itself never does.
    from ..codegen.spec import KernelSpec
    from ..errors import SparvarError
    from ..tuner.validate import registered_gpu, validate_record

    specs = {w["key"]: w["spec"] for w in doc["workloads"]}
    targets = {t["key"]: t for t in doc["targets"]}
    for i, t in enumerate(doc["trials"]):
        if not t["valid"]:
            continue
        spec_d, target = specs[t["workload_key"]], targets[t["target_key"]]
        where = (f"trials[{i}] ({spec_d['backend']}/{spec_d['kind']} {spec_d['q_len']}x{spec_d['kv_len']} "
                 f"{spec_d['block_m']}x{spec_d['block_n']} on {target['name']})")
        try:
            spec = KernelSpec(**spec_d)
            validate_record(spec, t["config"], registered_gpu(target), t["median_ms"])
        except SparvarError as e:
            raise _fail(where, str(e)) from None


def import_document(db: TuningDatabase, doc: Any) -> dict[str, int]:
    """Check ``doc`` (:func:`validate_document`) and record all of it in one transaction.

    Returns
    -------
    dict
        ``trials_added`` and ``trials_present`` (already stored: same workload, target, config and study).
    """
    validate_document(doc)
    added = present = 0
    with db.batch() as w:
        for t in doc["targets"]:
            w.add_target(t)
        for wl in doc["workloads"]:
            w.add_workload(wl["spec"])
        for t in doc["trials"]:
            _, inserted = w.record(
                t["workload_key"], t["target_key"], t["config"], t["timings_ms"], valid=t["valid"],
                reason=t["reason"], detail=t["detail"], environment=t["environment"], study=t["study"],
                worker=t["worker"], created_at=datetime.fromisoformat(t["created_at"]))
            added += inserted
            present += not inserted
    return {"trials_added": added, "trials_present": present}


def import_json(db: TuningDatabase, source: str | os.PathLike | Mapping[str, Any]) -> dict[str, int]:
    """:func:`import_document` from a file path or an already-parsed document."""
    if isinstance(source, Mapping):
        return import_document(db, source)
    try:
        doc = read_json(source, what="a tuning export")
    except JsonInputError as e:
        raise ExchangeFormatError(f"import refused: cannot read {e}") from None
    except OSError as e:
        raise ExchangeFormatError(f"import refused: cannot read {source}: {e.strerror or e}") from None
    return import_document(db, doc)


def build_shipped_database(path: str | os.PathLike, exports: Iterable[str | os.PathLike | Mapping] = (), *,
                           studies: bool = True, progress=None) -> Path:
    """Create the read-only database that ships with the package: a fresh database holding ``exports``, with
    (``studies``) one Optuna study per workload and target holding all of its trials
    (:func:`sparvar_compiler.tuner.plan.record_studies`), frozen to one self-contained, vacuumed file without a
    WAL (:func:`~.store.freeze_sqlite`) and moved into place atomically.

    ``python -m sparvar_compiler.db build-shipped`` rebuilds ``tuning_db/sparvar.sqlite`` from
    ``tuning_db/winners-*.json``.
    """
    from .studies import release_storage

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        with TuningDatabase.open(tmp) as db:
            for source in exports:
                import_json(db, source)
            if studies:
                # Naming studies after the plans that yield their workloads needs the planner: imported here,
                # so that reading and writing records never does.
                from ..tuner.plan import record_studies

                try:
                    record_studies(db, progress=progress)
                finally:
                    release_storage(db.storage_url)
        freeze_sqlite(tmp)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
            leftover.unlink(missing_ok=True)
    return path
