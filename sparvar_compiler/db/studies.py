"""Optuna studies beside the tuning records: one study per (workload, target), one trial per recorded config.

The tuning database is the record of what was measured; a study is the view of it that Optuna's tools open
(``optuna-dashboard URL``, ``optuna studies --storage URL``). Its tables live in the same database as ours
(``studies``, ``trials``, ... next to the ``sparvar_*`` tables).

A study holds each recorded config once, as a COMPLETE trial (value: the median ms) or a FAIL trial (user
attributes ``reason`` and ``detail``), with categorical parameters (one per config knob) and the user attribute
``sparvar_trial_id`` (the record it mirrors). Two rules keep concurrent workers from adding a config twice:

* the process whose insert of a record succeeded (records are unique per workload, target, config and study
  name) adds its trial, after the record commits;
* the process that creates a study (Optuna lets one creation succeed) adds the records stored before under other
  study names: earlier runs, imports, the shipped exports.

A crash between a record's commit and its trial leaves that config out of the study; the record stands.

Reading study attributes (:func:`read_study_attrs`, for ``db stats``) needs SQLAlchemy only; Optuna is
imported where studies are written.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Connection, Integer, MetaData, String, Table, Text, inspect, select

from .schema import database_error, is_driver_error

_log = logging.getLogger(__name__)

#: Optuna's study tables (its schema, stable since Optuna 3.2), described for reading without Optuna.
_OPTUNA = MetaData()
_STUDIES = Table("studies", _OPTUNA, Column("study_id", Integer, primary_key=True), Column("study_name", String))
_STUDY_ATTRS = Table("study_user_attributes", _OPTUNA, Column("study_user_attribute_id", Integer, primary_key=True),
                     Column("study_id", Integer), Column("key", String), Column("value_json", Text))

_DETAIL_CHARS = 300
_storages: dict[str, Any] = {}


def _retrying(action: Callable[[], Any], url: str) -> Any:
    """Run ``action``, retrying a few times: workers starting together race to create Optuna's tables and
    studies, and the loser's error is an assorted SQLAlchemy one."""
    for attempt in range(8):
        try:
            return action()
        except Exception as e:  # noqa: BLE001 - see above; the last attempt's error is raised
            release_storage(url)
            if attempt == 7:
                if is_driver_error(e):  # one line naming the database (password masked), not a traceback
                    raise database_error(url, e) from e
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def optuna_storage(url: str):
    """One Optuna ``RDBStorage`` per URL in this process (each opens an engine and checks Optuna's schema,
    creating its tables in a database that has none)."""
    storage = _storages.get(url)
    if storage is None:
        import optuna

        storage = _storages[url] = _retrying(lambda: optuna.storages.RDBStorage(url), url)
    return storage


def release_storage(url: str) -> None:
    """Close this process's connections to ``url``'s study storage (before freezing or moving the file)."""
    storage = _storages.pop(url, None)
    if storage is not None:
        storage.remove_session()
        storage.engine.dispose()


def config_domains(configs: Iterable[Mapping[str, Any]]) -> dict[str, list]:
    """Per config knob, the values the configs use, sorted; None where some configs leave the knob out."""
    dicts = [dict(c) for c in configs]
    doms: dict[str, set] = {}
    for d in dicts:
        for k, v in d.items():
            doms.setdefault(k, set()).add(v)
    for k, vals in doms.items():
        if any(k not in d for d in dicts):
            vals.add(None)
    return {k: sorted(v, key=lambda x: (str(type(x)), str(x))) for k, v in sorted(doms.items())}


def _jsonable(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


@dataclass
class RecordStudy:
    """The Optuna study of one workload on one target, as opened by :func:`open_record_study`."""

    study: Any  # optuna.Study
    name: str
    domains: dict[str, list]
    created: bool

    def add(self, config: Mapping[str, Any], *, valid: bool, timings_ms: Iterable[float] = (),
            reason: str | None = None, detail: str | None = None, worker: str | None = None,
            record_id: int | None = None, created_at: datetime | None = None) -> bool:
        """Add one recorded config as a trial; False (and a log line) when Optuna refuses it, e.g. a knob value
        outside the study's domains after the search space changed. The record, not the study, is the truth."""
        import optuna
        from optuna.distributions import CategoricalDistribution

        config = dict(config)
        params = {k: config.get(k) for k in self.domains}
        if set(config) - set(self.domains) or any(v not in self.domains[k] for k, v in params.items()):
            _log.warning("study %s: config %s is outside the study's knob domains; not added", self.name, config)
            return False
        attrs: dict[str, Any] = {}
        if record_id is not None:
            attrs["sparvar_trial_id"] = record_id
        if worker:
            attrs["worker"] = worker
        if not valid:
            attrs["reason"] = reason
            if detail:
                attrs["detail"] = detail[:_DETAIL_CHARS]
        timings = list(timings_ms)
        trial = optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE if valid else optuna.trial.TrialState.FAIL,
            value=statistics.median(timings) if valid else None,
            params=params,
            distributions={k: CategoricalDistribution(v) for k, v in self.domains.items()},
            user_attrs=attrs)
        if created_at is not None:
            trial.datetime_start = trial.datetime_complete = created_at
        try:
            self.study.add_trial(trial)
        except Exception as e:  # noqa: BLE001 - a study write never stops tuning: the record is already stored
            _log.warning("study %s: optuna refused the trial of %s: %s", self.name, config, e)
            return False
        return True

    def add_record(self, record) -> bool:
        """:meth:`add` a stored :class:`~.store.TrialRecord`."""
        return self.add(record.config, valid=record.valid, timings_ms=record.timings_ms, reason=record.reason,
                        detail=record.detail, worker=record.worker, record_id=record.id,
                        created_at=record.created_at)


def study_owner(url: str, name: str) -> dict[str, Any] | None:
    """The user attributes of the study called ``name`` in the storage at ``url``, or None if there is none."""

    def read() -> dict[str, Any] | None:
        storage = optuna_storage(url)
        try:
            study_id = storage.get_study_id_from_name(name)
        except KeyError:
            return None
        return storage.get_study_user_attrs(study_id)

    return _retrying(read, url)


def open_record_study(url: str, name: str, attrs: Mapping[str, Any], domains: Mapping[str, list],
                      earlier: Callable[[], Iterable[Any]] = lambda: ()) -> RecordStudy:
    """Create or load the study ``name`` in the Optuna storage at ``url``.

    The process that creates it sets ``attrs`` as its user attributes and adds ``earlier()`` (stored trial
    records, one per config: the first of each config key counts). Workers starting together may race to
    create Optuna's tables; a failed attempt is retried.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study created

    def create_or_load() -> tuple[Any, bool]:
        storage = optuna_storage(url)
        try:
            return optuna.create_study(study_name=name, storage=storage, direction="minimize"), True
        except optuna.exceptions.DuplicatedStudyError:
            return optuna.load_study(study_name=name, storage=storage), False

    study, created = _retrying(create_or_load, url)
    out = RecordStudy(study, name, {k: list(v) for k, v in domains.items()}, created)
    if created:
        for k, v in attrs.items():
            study.set_user_attr(k, _jsonable(v))
        done = set()
        for record in earlier():
            if record.config_key not in done:
                done.add(record.config_key)
                out.add_record(record)
    return out


# ---------------------------------------------------------------------------------------------------- reading

def read_study_attrs(conn: Connection) -> dict[str, dict[str, Any]]:
    """``{study name: user attributes}`` of every Optuna study in the database behind ``conn`` (none when it has
    no Optuna tables). Attribute values that are not JSON are skipped."""
    names = set(inspect(conn).get_table_names())
    if not {"studies", "study_user_attributes"} <= names:
        return {}
    out: dict[str, dict[str, Any]] = {name: {} for name in conn.execute(select(_STUDIES.c.study_name)).scalars()}
    rows = conn.execute(select(_STUDIES.c.study_name, _STUDY_ATTRS.c.key, _STUDY_ATTRS.c.value_json)
                        .join(_STUDY_ATTRS, _STUDY_ATTRS.c.study_id == _STUDIES.c.study_id))
    for name, key, value in rows:
        try:
            out[name][key] = json.loads(value)
        except (TypeError, ValueError):
            continue
    return out
