"""The tuning database: open, record trials, look up winners.

A database is a SQLite file by default (WAL mode, so readers never block the writer and several processes can
tune at once) or any SQLAlchemy URL, e.g. ``postgresql+psycopg://user@host/db`` for a fleet. Every write is one
transaction: a trial and the winner update it causes commit together or not at all.

Where the files are
-------------------
* :func:`shipped_database_path` - ``sparvar_compiler/tuning_db/sparvar.sqlite``, package data, opened
  read-only (and immutable, so no ``-wal``/``-shm`` files are created beside it).
* :func:`user_database_path` - ``$SPARVAR_CACHE_DIR/tuning.sqlite``, else
  ``$XDG_CACHE_HOME/sparvar/tuning.sqlite``, else ``~/.cache/sparvar/tuning.sqlite``.
* :func:`default_database_url` - ``$SPARVAR_DB`` (a URL or path, so that a PostgreSQL password need not be on a
  command line), else the user database: what :meth:`TuningDatabase.open` and
  :meth:`LayeredDatabase.open_default` open when no URL or path is given.

:class:`LayeredDatabase` reads winners from the user database first and the shipped one second, and writes
only to the user database; :meth:`LayeredDatabase.stats` shows which winner each layer supplies.
``LayeredDatabase.open_default(readonly=True)`` writes nothing anywhere: for a compile that will not tune.

Errors
------
Every public method raises :class:`~.schema.TuningDatabaseError` (a one-line message naming the database, its
password masked, and the driver's first line) for what goes wrong in the database: a dropped table, a server
stopped mid-transaction, a URL without an installed driver (``mysql://``), a malformed URL. SQLAlchemy, sqlite3
and psycopg exceptions never leave this module.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sqlite3
import statistics
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool

from .environment import SoftMismatchWarning, classify_mismatch, collect_environment, target_of
from .keys import (canonical_json, config_key, resolve_config, resolve_target, resolve_workload, target_key,
                   workload_key)
from .migrations import check_supported, schema_version, upgrade
from .schema import (INVALID_REASONS, SCHEMA_VERSION, CorruptRecordError, EnvironmentMismatchError,
                     SchemaVersionError, SkippedRecordWarning, Target, Trial, TuningDatabaseError, Winner, Workload,
                     database_error, first_line, is_driver_error, mask_password, utcnow)
from .studies import read_study_attrs, release_storage

BUSY_TIMEOUT_MS = 30_000
_WRITE = "sparvar_write"  # execution option: begin SQLite transactions with BEGIN IMMEDIATE
_NAME_LENGTH = 128
# Dialects with INSERT .. ON CONFLICT DO NOTHING; any other dialect uses a savepoint per insert.
_NATIVE_UPSERT = {"sqlite": sqlite_insert, "postgresql": pg_insert}


def user_database_path() -> Path:
    """``$SPARVAR_CACHE_DIR/tuning.sqlite``, else ``$XDG_CACHE_HOME/sparvar/tuning.sqlite``, else
    ``~/.cache/sparvar/tuning.sqlite`` (empty variables count as unset)."""
    root = os.environ.get("SPARVAR_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "tuning.sqlite"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sparvar" / "tuning.sqlite"


def default_database_url() -> str:
    """The tuning database used when none is named: ``$SPARVAR_DB`` (a SQLAlchemy URL or a file path) if set,
    else :func:`user_database_path`."""
    return os.environ.get("SPARVAR_DB") or str(user_database_path())


def shipped_database_path() -> Path:
    """The read-only database shipped with the package (``tuning_db/sparvar.sqlite`` in a checkout)."""
    from ..resources import data_dir

    return data_dir("tuning_db") / "sparvar.sqlite"


@dataclass(frozen=True)
class TrialRecord:
    """One stored trial, checked on read (see :class:`~.schema.Trial` for the fields)."""

    id: int
    workload_key: str
    target_key: str
    config: dict[str, Any]
    config_key: str
    timings_ms: tuple[float, ...]
    median_ms: float | None
    valid: bool
    reason: str | None
    detail: str | None
    environment: dict[str, Any]
    study: str
    worker: str | None
    created_at: datetime


# ---------------------------------------------------------------------------------------------------- checks

def _check_timings(timings: Any, where: str, error: type[TuningDatabaseError]) -> tuple[float, ...]:
    if not isinstance(timings, (list, tuple)):
        raise error(f"{where}: timings must be a list of milliseconds, got {type(timings).__name__}")
    for t in timings:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise error(f"{where}: every timing must be a finite positive number of ms, got {t!r}")
    return tuple(float(t) for t in timings)


def _check_name(value: Any, what: str, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value or len(value) > _NAME_LENGTH:
        raise TuningDatabaseError(f"{what} must be a non-empty string of at most {_NAME_LENGTH} characters, "
                                  f"got {value!r}")


def _check_environment(env: Any, where: str, error: type[TuningDatabaseError]) -> dict[str, Any]:
    if not isinstance(env, Mapping) or not all(isinstance(k, str) for k in env):
        raise error(f"{where}: environment must be a mapping with string keys, got {env!r}")
    for k, v in env.items():
        if v is not None and not isinstance(v, (str, int, float, bool)):
            raise error(f"{where}: environment field {k!r} must be a JSON scalar, got {type(v).__name__}")
    try:
        canonical_json(dict(env))
    except ValueError as e:
        raise error(f"{where}: environment is not JSON: {e}") from None
    return dict(env)


def _as_utc(t: datetime) -> datetime:
    # SQLite keeps no zone; every time we store is UTC.
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _trial_record(t: Trial) -> TrialRecord:
    """Check a stored trial row; a malformed one raises :class:`CorruptRecordError`, it is never used."""
    where = f"trial {t.id}"

    def bad(msg: str) -> CorruptRecordError:
        return CorruptRecordError(f"corrupt tuning record: {where}: {msg}")

    if not isinstance(t.config, dict):
        raise bad(f"config must be a JSON object, got {type(t.config).__name__}")
    try:
        key = config_key(t.config)
    except TuningDatabaseError as e:
        raise bad(str(e)) from None
    if key != t.config_key:
        raise bad(f"config key {t.config_key} does not match its config {t.config} ({key})")
    timings = _check_timings(t.timings_ms, where, CorruptRecordError)
    if t.valid is True:
        if not timings or t.reason is not None:
            raise bad("a valid trial must have timings and no invalid reason")
        if t.median_ms is None or not math.isclose(t.median_ms, statistics.median(timings), rel_tol=1e-12):
            raise bad(f"median {t.median_ms} is not the median of its timings")
    elif t.valid is False:
        if t.reason not in INVALID_REASONS:
            raise bad(f"invalid reason {t.reason!r} is not one of {INVALID_REASONS}")
    else:
        raise bad(f"valid flag must be a boolean, got {t.valid!r}")
    env = _check_environment(t.environment, where, CorruptRecordError)
    if not isinstance(t.study, str) or not t.study:
        raise bad(f"study must be a non-empty string, got {t.study!r}")
    return TrialRecord(t.id, t.workload_key, t.target_key, dict(t.config), t.config_key, timings, t.median_ms,
                       t.valid, t.reason, t.detail, env, t.study, t.worker, _as_utc(t.created_at))


def _checked_workload(row: Workload) -> dict[str, Any]:
    try:
        ok = isinstance(row.spec, dict) and workload_key(row.spec) == row.key
    except TuningDatabaseError:
        ok = False
    if not ok:
        raise CorruptRecordError(f"corrupt tuning record: workload {row.key}: its spec {row.spec!r} does not "
                                 f"hash to its key")
    return resolve_workload(row.spec)


def _checked_target(row: Target) -> dict[str, Any]:
    try:
        ok = target_key(row.to_dict()) == row.key
    except TuningDatabaseError:
        ok = False
    if not ok:
        raise CorruptRecordError(f"corrupt tuning record: target {row.key}: {row.to_dict()} does not hash to its "
                                 f"key")
    return row.to_dict()


def _key_of(value: Mapping[str, Any] | str, resolve, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return resolve(value)
    raise TuningDatabaseError(f"{what} must be a key string or a mapping, got {type(value).__name__}")


@functools.cache
def _this_environment() -> dict[str, Any]:
    return collect_environment()


# ---------------------------------------------------------------------------------------------------- errors

@contextmanager
def _boundary(url: str, opening: bool = False) -> Iterator[None]:
    """Turn a driver error raised inside into :func:`database_error`; anything else passes."""
    try:
        yield
    except TuningDatabaseError:
        raise
    except Exception as e:
        if not is_driver_error(e):
            raise
        raise database_error(url, e, opening) from e


def _mapped(method):
    """A :class:`TuningDatabase` or :class:`Writer` method whose driver errors become one-line
    :class:`TuningDatabaseError` (the object's ``url`` names the database)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _boundary(self.url):
            return method(self, *args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------------------------------- engines

def _sqlite_engine(path: Path, readonly: bool, immutable: bool) -> Engine:
    path = path.expanduser().resolve()
    if readonly:
        if not path.is_file():
            raise TuningDatabaseError(f"no tuning database at {path}")
        uri = path.as_uri() + "?mode=ro" + ("&immutable=1" if immutable else "")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = path.as_uri()

    def open_uri(target: str) -> sqlite3.Connection:
        # isolation_level=None: the driver must not issue its own BEGIN; the "begin" listener below does.
        return sqlite3.connect(target, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)

    def connect() -> sqlite3.Connection:
        conn = open_uri(uri)
        if not readonly or immutable:
            return conn
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError:
            # A WAL database can be read without write access only if its -shm/-wal files exist; in a read-only
            # directory (a read-only cache, a read-only install) where they do not, nobody can be writing it
            # either, so it is read as immutable.
            conn.close()
            if os.access(path.parent, os.W_OK):
                raise
            return open_uri(uri + "&immutable=1")

    engine = create_engine("sqlite://", creator=connect, poolclass=QueuePool)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 30000")  # BUSY_TIMEOUT_MS; SQL text is never built from values
        cur.execute("PRAGMA foreign_keys = ON")
        if not readonly:
            cur.execute("PRAGMA journal_mode = WAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        # A writer takes the write lock up front: a deferred transaction that reads and then writes cannot wait
        # for a concurrent writer (SQLITE_BUSY_SNAPSHOT), it can only fail.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

    return engine


def freeze_sqlite(path: str | Path) -> None:
    """Make a SQLite database a single self-contained file for shipping: rollback journal, vacuumed.

    A WAL database needs ``-wal``/``-shm`` files beside it even to be read, which a read-only install location
    cannot hold.
    """
    conn = sqlite3.connect(Path(path).expanduser().resolve().as_uri(), uri=True, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("VACUUM")
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------------- database

class TuningDatabase:
    """Trials, winners, targets and workloads in one SQLAlchemy database. Use :meth:`open`."""

    def __init__(self, engine: Engine, url: str, readonly: bool, storage_url: str | None = None) -> None:
        self._base = engine
        # A full SQLAlchemy URL (password included) for Optuna's study storage on the same database.
        self.storage_url = storage_url or engine.url.render_as_string(hide_password=False)
        self._engine = engine
        if readonly and engine.dialect.name == "postgresql":
            self._engine = engine.execution_options(postgresql_readonly=True)
        self._write_engine = engine.execution_options(**{_WRITE: True})
        self.url = url
        self.readonly = readonly
        try:
            if readonly:
                with self._engine.connect() as conn:
                    found = schema_version(conn)
                check_supported(found)
                if found == 0:
                    raise SchemaVersionError(f"{url} is not an initialised tuning database")
                if found < SCHEMA_VERSION:
                    raise SchemaVersionError(f"{url} has schema version {found}, older than {SCHEMA_VERSION}; "
                                             f"open it writable once to migrate it")
            else:
                with self._write_engine.begin() as conn:
                    upgrade(conn)
        except TuningDatabaseError:
            engine.dispose()
            raise
        except Exception as e:
            engine.dispose()
            if not is_driver_error(e):
                raise
            raise database_error(url, e, opening=True) from e
        except BaseException:
            engine.dispose()
            raise

    @classmethod
    def open(cls, url_or_path: str | os.PathLike | None = None, readonly: bool = False) -> "TuningDatabase":
        """Open (creating and migrating when writable) a tuning database.

        Parameters
        ----------
        url_or_path:
            A file path or ``sqlite:///path`` URL (a SQLite file in WAL mode), any other SQLAlchemy URL such as
            ``postgresql+psycopg://user@host:5432/db``, or None for :func:`default_database_url`.
        readonly:
            Refuse writes; the database must exist and be at the current schema version.

        Raises
        ------
        SchemaVersionError
            The schema is newer than this code, or older and ``readonly``, or the database is not ours.
        TuningDatabaseError
            Anything else that keeps it from opening.
        """
        if url_or_path is None:
            url_or_path = default_database_url()
        text = os.fspath(url_or_path)
        if "://" not in text:
            path = Path(text).expanduser()
            with _boundary(str(path), opening=True):
                engine = _sqlite_engine(path, readonly, False)
            return cls(engine, str(path), readonly, f"sqlite:///{path.resolve()}")
        try:
            url = make_url(text)
            url.get_dialect()  # an unknown dialect is an error here, not at the first query
        except (SQLAlchemyError, ValueError) as e:
            raise TuningDatabaseError(f"tuning database {mask_password(text)}: not a database URL "
                                      f"({first_line(e)}); give a SQLite file path or a URL such as "
                                      f"postgresql+psycopg://user@host/db") from None
        shown = url.render_as_string(hide_password=True)
        if url.get_backend_name() == "sqlite":
            if not url.database or url.database == ":memory:" or url.database.startswith("file:"):
                raise TuningDatabaseError(f"a SQLite tuning database must be a plain file path, got "
                                          f"{mask_password(text)!r}")
            path = Path(url.database).expanduser()
            with _boundary(url.database, opening=True):
                engine = _sqlite_engine(path, readonly, False)
            return cls(engine, url.database, readonly, f"sqlite:///{path.resolve()}")
        if url.get_backend_name() == "postgresql" and url.get_driver_name() in ("psycopg", "psycopg2"):
            from .._optional import require

            require(url.get_driver_name(), "postgres", "a PostgreSQL tuning database")
        try:
            engine = create_engine(url, pool_pre_ping=True)
        except ImportError as e:
            raise TuningDatabaseError(f"tuning database {shown}: no driver for {url.drivername} is installed "
                                      f"({e}); sparvar-compiler supports SQLite files and "
                                      f"postgresql+psycopg:// URLs") from None
        except (SQLAlchemyError, ValueError, TypeError) as e:
            raise TuningDatabaseError(f"tuning database {shown}: cannot use this URL: {first_line(e)}") from None
        return cls(engine, shown, readonly)

    @classmethod
    def open_shipped(cls, path: str | os.PathLike | None = None) -> "TuningDatabase":
        """The shipped database (or a frozen SQLite file at ``path``), read-only and immutable."""
        path = Path(path) if path is not None else shipped_database_path()
        return cls(_sqlite_engine(path, readonly=True, immutable=True), str(path), readonly=True)

    def close(self) -> None:
        """Close the connections to the database (and to its Optuna study storage, if this process opened
        it)."""
        release_storage(self.storage_url)
        self._base.dispose()

    def __enter__(self) -> "TuningDatabase":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TuningDatabase({self.url!r}, readonly={self.readonly})"

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        with Session(self._engine, expire_on_commit=False) as s, s.begin():
            try:
                yield s
            except json.JSONDecodeError as e:
                raise CorruptRecordError(f"corrupt tuning record: a JSON column does not parse: {e}") from None

    @contextmanager
    def batch(self) -> Iterator["Writer"]:
        """One write transaction: everything recorded through the yielded :class:`Writer` commits together
        when the block ends, or not at all if it raises.

        On PostgreSQL, keep concurrent batches small or disjoint: two batches recording the same trials in
        different orders can deadlock, and the server then aborts one of them.
        """
        if self.readonly:
            raise TuningDatabaseError(f"{self.url} is opened read-only")
        with _boundary(self.url), Session(self._write_engine, expire_on_commit=False) as s, s.begin():
            yield Writer(s, self.url)

    # Writes: each its own transaction.
    @_mapped
    def add_target(self, gpu: Mapping[str, Any]) -> str:
        """Store a target (``GpuSpec.to_dict()`` or ``{"name", "arch", "sm_count"}``); returns its key."""
        with self.batch() as w:
            return w.add_target(gpu)

    @_mapped
    def add_workload(self, spec: Mapping[str, Any]) -> str:
        """Store a workload (``KernelSpec.to_dict()``); returns its key."""
        with self.batch() as w:
            return w.add_workload(spec)

    @_mapped
    def record_trial(self, workload: Mapping[str, Any] | str, target: Mapping[str, Any] | str,
                     config: Mapping[str, Any], timings_ms: Sequence[float] = (), *, valid: bool = True,
                     reason: str | None = None, detail: str | None = None,
                     environment: Mapping[str, Any] | None = None, study: str = "default",
                     worker: str | None = None) -> int:
        """Record one trial and, if it is valid and the best so far, make it the winner; see
        :meth:`Writer.record_trial`."""
        with self.batch() as w:
            return w.record_trial(workload, target, config, timings_ms, valid=valid, reason=reason,
                                  detail=detail, environment=environment, study=study, worker=worker)

    # Reads.
    @_mapped
    def winner(self, workload: Mapping[str, Any] | str, target: Mapping[str, Any] | str,
               environment: Mapping[str, Any] | None = None) -> TrialRecord | None:
        """The best valid trial of a workload on a target, or None if there is none.

        Parameters
        ----------
        workload, target:
            Keys, or the spec / GPU mappings they are computed from.
        environment:
            Where the kernel will be built and run (:func:`~.environment.collect_environment`). Given, the
            record's environment and target are compared with it: a hard mismatch raises, a soft one warns.
            When compiling for a card that is not the one present, leave the ``gpu_*``/``sm_count`` fields out.

        Raises
        ------
        EnvironmentMismatchError
            A hard mismatch; the message names every differing field.
        CorruptRecordError
            The stored winner, its workload or its target is malformed.

        Warns
        -----
        SoftMismatchWarning
            A soft mismatch; the record is returned.
        """
        wk = _key_of(workload, workload_key, "workload")
        tk = _key_of(target, target_key, "target")
        with self._reading() as s:
            row = s.get(Winner, (wk, tk))
            if row is None:
                return None
            trial = s.get(Trial, row.trial_id)
            if trial is None or (trial.workload_key, trial.target_key) != (wk, tk):
                raise CorruptRecordError(f"corrupt tuning record: the winner of workload {wk} on target {tk} "
                                         f"points at trial {row.trial_id}, which is not one of theirs")
            record = _trial_record(trial)
            if not record.valid:
                raise CorruptRecordError(f"corrupt tuning record: winner trial {record.id} is invalid")
            _checked_workload(s.get(Workload, wk))
            stored_target = _checked_target(s.get(Target, tk))
        if environment is not None:
            hard, soft = classify_mismatch(record.environment, environment, stored_target, target_of(environment))
            what = f"tuning record {record.id} ({stored_target['name']}, workload {wk[:12]})"
            if hard:
                raise EnvironmentMismatchError(f"{what} was measured elsewhere and cannot be reused: "
                                               + "; ".join(map(str, hard)))
            if soft:
                warnings.warn(SoftMismatchWarning(f"{what} is used although "
                                                  + "; ".join(map(str, soft))), stacklevel=3)
        return record

    def winners(self, workload: Mapping[str, Any] | str, target: Mapping[str, Any] | str,
                environment: Mapping[str, Any] | None = None) -> Iterator[TrialRecord]:
        """Every usable valid trial of a workload on a target, best first: lowest median, ties to the lower id
        (the order that makes the first one :meth:`winner`).

        A caller that cannot use a record (one that fails
        :func:`~sparvar_compiler.tuner.validate.validate_record`) takes the next. Trials whose environment
        is a hard mismatch for ``environment`` are skipped, a soft mismatch warns when its record is reached (as
        in :meth:`winner`), and a malformed stored trial is skipped with a warning instead of ending the
        iteration. The rows are read when iteration starts.

        Raises
        ------
        EnvironmentMismatchError
            At the end of the iteration, if records exist but every one was a hard mismatch (what
            :meth:`winner` raises).
        CorruptRecordError
            The workload or target row is malformed.
        TuningDatabaseError
            The database fails while the rows are read.
        """
        wk = _key_of(workload, workload_key, "workload")
        tk = _key_of(target, target_key, "target")
        return self._winners(wk, tk, environment)

    def _winners(self, wk: str, tk: str, environment: Mapping[str, Any] | None) -> Iterator[TrialRecord]:
        with _boundary(self.url), self._reading() as s:
            rows = list(s.scalars(select(Trial).where(Trial.workload_key == wk, Trial.target_key == tk,
                                                      Trial.valid.is_(True))
                                  .order_by(Trial.median_ms, Trial.id)))
            if not rows:
                return
            workload_row, target_row = s.get(Workload, wk), s.get(Target, tk)
            if workload_row is None or target_row is None:
                raise CorruptRecordError(f"corrupt tuning record: trials of workload {wk} on target {tk} "
                                         f"without their workload or target")
            _checked_workload(workload_row)
            stored_target = _checked_target(target_row)
        refused: EnvironmentMismatchError | None = None
        yielded = False
        for row in rows:
            try:
                record = _trial_record(row)
            except CorruptRecordError as e:
                warnings.warn(SkippedRecordWarning(f"{e}; skipped"), stacklevel=2)
                continue
            if environment is not None:
                hard, soft = classify_mismatch(record.environment, environment, stored_target,
                                               target_of(environment))
                what = f"tuning record {record.id} ({stored_target['name']}, workload {wk[:12]})"
                if hard:
                    refused = refused or EnvironmentMismatchError(
                        f"{what} was measured elsewhere and cannot be reused: " + "; ".join(map(str, hard)))
                    continue
                if soft:
                    warnings.warn(SoftMismatchWarning(f"{what} is used although " + "; ".join(map(str, soft))),
                                  stacklevel=2)
            yielded = True
            yield record
        if refused is not None and not yielded:
            raise refused

    @_mapped
    def trials(self, workload: Mapping[str, Any] | str | None = None,
               target: Mapping[str, Any] | str | None = None, *, study: str | None = None,
               valid: bool | None = None) -> list[TrialRecord]:
        """Stored trials in recording order, filtered by any of workload, target, study and validity."""
        query = select(Trial).order_by(Trial.id)
        if workload is not None:
            query = query.where(Trial.workload_key == _key_of(workload, workload_key, "workload"))
        if target is not None:
            query = query.where(Trial.target_key == _key_of(target, target_key, "target"))
        if study is not None:
            query = query.where(Trial.study == study)
        if valid is not None:
            query = query.where(Trial.valid == valid)
        with self._reading() as s:
            return [_trial_record(t) for t in s.scalars(query)]

    @_mapped
    def workload(self, key: str) -> dict[str, Any] | None:
        """The resolved spec stored under ``key`` (checked), or None."""
        with self._reading() as s:
            row = s.get(Workload, key)
            return None if row is None else _checked_workload(row)

    @_mapped
    def target(self, key: str) -> dict[str, Any] | None:
        """The target stored under ``key`` (checked), or None."""
        with self._reading() as s:
            row = s.get(Target, key)
            return None if row is None else _checked_target(row)

    @_mapped
    def workloads(self) -> dict[str, dict[str, Any]]:
        with self._reading() as s:
            return {row.key: _checked_workload(row) for row in s.scalars(select(Workload).order_by(Workload.key))}

    @_mapped
    def targets(self) -> dict[str, dict[str, Any]]:
        with self._reading() as s:
            return {row.key: _checked_target(row) for row in s.scalars(select(Target).order_by(Target.key))}

    @_mapped
    def winner_keys(self) -> list[tuple[str, str]]:
        """(workload key, target key) of every winner."""
        with self._reading() as s:
            rows = s.execute(select(Winner.workload_key, Winner.target_key)
                             .order_by(Winner.workload_key, Winner.target_key))
            return [tuple(r) for r in rows]

    @_mapped
    def studies(self) -> dict[str, dict[str, Any]]:
        """``{name: user attributes}`` of the Optuna studies stored beside the records
        (:mod:`.studies`; read without Optuna)."""
        with self._engine.connect() as conn:
            return read_study_attrs(conn)

    @_mapped
    def stats(self) -> dict[str, Any]:
        """Counts: ``targets``, ``workloads``, ``winners``, ``studies`` (Optuna's, beside the records), and
        ``trials`` as ``{"total", "valid", "invalid": {reason: n for every reason}}``, plus ``schema_version``."""
        studies = len(self.studies())
        with self._reading() as s:
            count = lambda model: s.scalar(select(func.count()).select_from(model))  # noqa: E731
            rows = s.execute(select(Trial.reason, func.count()).where(Trial.valid.is_(False))
                             .group_by(Trial.reason))
            by_reason = {reason: n for reason, n in rows}
            valid = s.scalar(select(func.count()).select_from(Trial).where(Trial.valid.is_(True)))
            out = {"schema_version": schema_version(s.connection()), "targets": count(Target),
                   "workloads": count(Workload), "winners": count(Winner), "studies": studies}
        invalid = {r: by_reason.pop(r, 0) for r in INVALID_REASONS}
        invalid.update(by_reason)  # reasons only a corrupt row could hold stay visible
        out["trials"] = {"total": valid + sum(invalid.values()), "valid": valid, "invalid": invalid}
        return out


class Writer:
    """Writes inside one :meth:`TuningDatabase.batch` transaction (``url``: the database's, for errors)."""

    def __init__(self, session: Session, url: str = "") -> None:
        self._s = session
        self.url = url

    def _insert_ignore(self, model, values: dict[str, Any], unique: list[str]) -> bool:
        """Insert unless a row with the same ``unique`` columns exists (or is being inserted by a concurrent
        transaction, whose outcome this waits for); True if this call inserted it."""
        build = _NATIVE_UPSERT.get(self._s.get_bind().dialect.name)
        if build is not None:
            # RETURNING says whether a row went in (rowcount is not reliable once RETURNING is implied).
            stmt = (build(model).values(**values).on_conflict_do_nothing(index_elements=unique)
                    .returning(*model.__table__.primary_key.columns))
            return self._s.execute(stmt).first() is not None
        try:  # other dialects: a savepoint survives the unique violation
            with self._s.begin_nested():
                self._s.execute(insert(model).values(**values))
            return True
        except IntegrityError:
            return False

    @_mapped
    def add_target(self, gpu: Mapping[str, Any]) -> str:
        resolved = resolve_target(gpu)
        key = target_key(resolved)
        self._insert_ignore(Target, {"key": key, **resolved, "created_at": utcnow()}, ["key"])
        return key

    @_mapped
    def add_workload(self, spec: Mapping[str, Any]) -> str:
        resolved = resolve_workload(spec)
        key = workload_key(resolved)
        self._insert_ignore(Workload, {"key": key, "spec": resolved, "created_at": utcnow()}, ["key"])
        return key

    def _existing(self, model, key: str, what: str) -> str:
        if self._s.get(model, key) is None:
            raise TuningDatabaseError(f"unknown {what} key {key}; pass the {what} itself to add it")
        return key

    @_mapped
    def record_trial(self, workload: Mapping[str, Any] | str, target: Mapping[str, Any] | str,
                     config: Mapping[str, Any], timings_ms: Sequence[float] = (), *, valid: bool = True,
                     reason: str | None = None, detail: str | None = None,
                     environment: Mapping[str, Any] | None = None, study: str = "default",
                     worker: str | None = None) -> int:
        """Record a trial once; returns its id.

        Parameters
        ----------
        workload, target:
            ``KernelSpec.to_dict()`` / ``GpuSpec.to_dict()`` (stored if new) or the key of a stored one.
        config:
            ``KernelConfig.to_dict()``; keyed by :func:`~.keys.config_key`.
        timings_ms:
            Every measured time; a valid trial needs at least one, and its median ranks it.
        valid, reason, detail:
            An invalid trial needs ``reason`` from :data:`~.schema.INVALID_REASONS`; ``detail`` is free text.
        environment:
            Where it was measured; defaults to :func:`~.environment.collect_environment` of this process.
        study, worker:
            Which tuning run and which process recorded it.

        Returns
        -------
        int
            The id of the new trial, or of the trial already stored with the same workload, target, config and
            study (then nothing is written: the first record stands).
        """
        return self.record(workload, target, config, timings_ms, valid=valid, reason=reason, detail=detail,
                           environment=environment, study=study, worker=worker)[0]

    @_mapped
    def record(self, workload: Mapping[str, Any] | str, target: Mapping[str, Any] | str,
               config: Mapping[str, Any], timings_ms: Sequence[float] = (), *, valid: bool = True,
               reason: str | None = None, detail: str | None = None, environment: Mapping[str, Any] | None = None,
               study: str = "default", worker: str | None = None,
               created_at: datetime | None = None) -> tuple[int, bool]:
        """:meth:`record_trial` that also says whether this call inserted the trial, and can keep the time
        it was first recorded (``created_at``, for imports)."""
        if not isinstance(valid, bool):
            raise TuningDatabaseError(f"valid must be a bool, got {valid!r}")
        timings = _check_timings(timings_ms, "trial", TuningDatabaseError)
        if valid and (reason is not None or not timings):
            raise TuningDatabaseError("a valid trial needs timings and no invalid reason")
        if not valid and reason not in INVALID_REASONS:
            raise TuningDatabaseError(f"an invalid trial needs a reason from {INVALID_REASONS}, got {reason!r}")
        if detail is not None and not isinstance(detail, str):
            raise TuningDatabaseError(f"detail must be a string, got {type(detail).__name__}")
        _check_name(study, "study", optional=False)
        _check_name(worker, "worker", optional=True)
        env = _check_environment(_this_environment() if environment is None else environment, "trial",
                                 TuningDatabaseError)
        resolved_config = resolve_config(config)
        ck = config_key(resolved_config)
        wk = (self._existing(Workload, workload, "workload") if isinstance(workload, str)
              else self.add_workload(workload))
        tk = self._existing(Target, target, "target") if isinstance(target, str) else self.add_target(target)
        median = statistics.median(timings) if valid else None
        values = {"workload_key": wk, "target_key": tk, "config": resolved_config, "config_key": ck,
                  "timings_ms": list(timings), "median_ms": median, "valid": valid, "reason": reason,
                  "detail": detail, "environment": env, "study": study, "worker": worker,
                  "created_at": created_at or utcnow()}
        inserted = self._insert_ignore(Trial, values, ["workload_key", "target_key", "config_key", "study"])
        trial_id = self._s.scalar(select(Trial.id).where(Trial.workload_key == wk, Trial.target_key == tk,
                                                         Trial.config_key == ck, Trial.study == study))
        if trial_id is None:
            raise TuningDatabaseError(f"trial for workload {wk} on target {tk} was neither inserted nor found")
        if inserted and valid:
            self._offer_winner(wk, tk, trial_id, median)
        return trial_id, inserted

    def _offer_winner(self, wk: str, tk: str, trial_id: int, median: float) -> None:
        if self._insert_ignore(Winner, {"workload_key": wk, "target_key": tk, "trial_id": trial_id,
                                        "updated_at": utcnow()}, ["workload_key", "target_key"]):
            return
        # Row lock on PostgreSQL; SQLite's write transaction already excludes other writers.
        row = self._s.scalars(select(Winner).where(Winner.workload_key == wk, Winner.target_key == tk)
                              .with_for_update()).one()
        best = self._s.execute(select(Trial.median_ms, Trial.valid).where(Trial.id == row.trial_id)).one()
        # Lower median wins; a tie keeps the earlier trial (lower id), so racing writers agree on one winner.
        beaten = not best.valid or best.median_ms is None or (median, trial_id) < (best.median_ms, row.trial_id)
        if beaten:
            row.trial_id = trial_id
            row.updated_at = utcnow()
            self._s.flush()


class LayeredDatabase:
    """Winners from several databases, first match wins; writes go to the first.

    The usual stack is the user's database over the shipped one (:meth:`open_default`). A layer whose record is
    refused for a hard environment mismatch is passed over; if no layer has a usable record the first refusal
    is raised. A stack may be empty (a read-only :meth:`open_default` with neither database present): it has
    no winners.
    """

    def __init__(self, *layers: TuningDatabase) -> None:
        self.layers: tuple[TuningDatabase, ...] = layers

    @classmethod
    def open_default(cls, user: str | os.PathLike | None = None, shipped: bool = True,
                     readonly: bool = False) -> "LayeredDatabase":
        """The user database (``user`` or :func:`default_database_url`) over the shipped one, if present.

        ``readonly``: for a compile that will not tune (no GPU, ``--tune never``). The user database is opened
        read-only: a user SQLite file that does not exist is left out (the stack is then the shipped database
        alone; no directory or file is created), no record is written, and a read-only cache directory or
        install location works. (Reading a WAL-mode SQLite file makes SQLite keep its ``-wal``/``-shm`` side
        files beside it where the directory is writable; in a read-only directory the file is read as
        immutable.)
        """
        target = user if user is not None else default_database_url()
        layers: list[TuningDatabase] = []
        try:
            if not (readonly and _missing_sqlite_file(target)):
                layers.append(TuningDatabase.open(target, readonly=readonly))
            path = shipped_database_path() if shipped else None
            if path is not None and path.is_file():
                layers.append(TuningDatabase.open_shipped(path))
        except BaseException:
            for layer in layers:
                layer.close()
            raise
        return cls(*layers)

    @property
    def user(self) -> TuningDatabase:
        """The first layer (the one written to)."""
        if not self.layers:
            raise TuningDatabaseError("no tuning database is open (the user database does not exist and nothing "
                                      "else was found)")
        return self.layers[0]

    def winner(self, workload: Mapping[str, Any] | str, target: Mapping[str, Any] | str,
               environment: Mapping[str, Any] | None = None) -> TrialRecord | None:
        """:meth:`TuningDatabase.winner` of the first layer that has a usable one."""
        refused: EnvironmentMismatchError | None = None
        for layer in self.layers:
            try:
                found = layer.winner(workload, target, environment)
            except EnvironmentMismatchError as e:
                refused = refused or e
                continue
            if found is not None:
                return found
        if refused is not None:
            raise refused
        return None

    def winners(self, workload: Mapping[str, Any] | str, target: Mapping[str, Any] | str,
                environment: Mapping[str, Any] | None = None) -> Iterator[TrialRecord]:
        """:meth:`TuningDatabase.winners` of every layer in turn (the first layer's records first, best first
        within each), so that a caller that cannot use a record takes the next one. Raises the first layer's
        :class:`EnvironmentMismatchError` at the end if no layer had a usable record but some were refused."""
        return self._winners(workload, target, environment)

    def _winners(self, workload, target, environment) -> Iterator[TrialRecord]:
        refused: EnvironmentMismatchError | None = None
        yielded = False
        for layer in self.layers:
            try:
                for record in layer.winners(workload, target, environment):
                    yielded = True
                    yield record
            except EnvironmentMismatchError as e:
                refused = refused or e
        if refused is not None and not yielded:
            raise refused

    def stats(self, environment: Mapping[str, Any] | None = None, *, backends: Sequence[str] = ("triton",),
              block_sizes: Sequence[int] = (64, 128), match_plans: bool = True) -> dict[str, Any]:
        """What a compile reads: every layer and every winner, which layer supplies it and which it shadows.

        Parameters
        ----------
        environment:
            Where kernels will be built (:func:`~.environment.collect_environment`): a winner a hard mismatch
            refuses is marked ``refused`` and the next layer's supplies its workload, as in :meth:`winner`.
        backends, block_sizes:
            What compile chooses among (its defaults), for ``picked``.
        match_plans:
            Find the model and scale of a winner whose database has no study for it by matching its workload
            against the registered models' default plans (imports the planner and torch).

        Returns
        -------
        dict
            ``layers``: per layer ``index``, ``url``, ``readonly`` and :meth:`TuningDatabase.stats`.
            ``targets``: ``{gpu: {"name", "arch", "sm_count", "models": {model: [winner, ...]}}}``, where ``gpu``
            is the target's name (with its arch and SM count if two targets share a name) and each winner is
            ``{"model", "resolution", "aspect", "scale", "backend", "kind", "dynamic", "block_m", "block_n",
            "q_len", "kv_len", "heads", "batch", "median_ms", "config", "trial_id", "study", "layer", "source",
            "workload_key", "target_key", "shadowed", "refused", "picked"}``: ``layer``/``source`` the layer it
            is read from, ``shadowed`` true when an earlier layer supplies its workload, ``refused`` the hard
            mismatch that passes it over (else None), ``picked`` true for the kernel compile chooses for its
            model, image and scale (None where the model is unknown).
            ``summary``: counts of ``winners`` (supplied), ``shadowed``, ``refused`` and ``picked``.
        """
        layers = [{"index": i, "url": layer.url, "readonly": layer.readonly, **layer.stats()}
                  for i, layer in enumerate(self.layers)]
        contexts = _winner_contexts(self.layers)
        entries: list[dict[str, Any]] = []
        pairs = list(dict.fromkeys(pair for layer in self.layers for pair in layer.winner_keys()))
        for wk, tk in pairs:
            supplied = False
            for i, layer in enumerate(self.layers):
                refused = None
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", SoftMismatchWarning)
                        record = layer.winner(wk, tk, environment)
                except EnvironmentMismatchError as e:
                    refused, record = str(e), layer.winner(wk, tk)
                if record is None:
                    continue
                spec, target = layer.workload(wk), layer.target(tk)
                ctx = contexts.get((wk, tk)) or contexts.get((wk, None)) or {}
                entries.append({
                    "model": ctx.get("model"), "resolution": ctx.get("resolution"), "aspect": ctx.get("aspect"),
                    "scale": ctx.get("scale"), "backend": spec["backend"], "kind": spec["kind"],
                    "dynamic": bool(spec.get("dynamic", False)), "block_m": spec["block_m"],
                    "block_n": spec["block_n"], "q_len": spec["q_len"], "kv_len": spec["kv_len"],
                    "heads": spec["heads"], "batch": spec["batch"], "median_ms": record.median_ms,
                    "config": record.config, "trial_id": record.id, "study": record.study, "layer": i,
                    "source": layer.url, "workload_key": wk, "target_key": tk, "target": target, "_spec": spec,
                    "shadowed": supplied and refused is None, "refused": refused, "picked": None})
                supplied = supplied or refused is None
        if match_plans and any(e["model"] is None for e in entries):
            _match_plans(entries)
        _mark_picked(entries, tuple(backends), tuple(block_sizes))
        return {"layers": layers, "targets": _group_by_target(entries),
                "summary": {"winners": sum(not e["shadowed"] and e["refused"] is None for e in entries),
                            "shadowed": sum(e["shadowed"] for e in entries),
                            "refused": sum(e["refused"] is not None for e in entries),
                            "picked": sum(bool(e["picked"]) for e in entries)}}

    def record_trial(self, *args, **kwargs) -> int:
        """:meth:`TuningDatabase.record_trial` on the writable layer."""
        return self.user.record_trial(*args, **kwargs)

    def batch(self):
        return self.user.batch()

    def close(self) -> None:
        for layer in self.layers:
            layer.close()

    def __enter__(self) -> "LayeredDatabase":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _missing_sqlite_file(url_or_path: str | os.PathLike) -> bool:
    """Whether ``url_or_path`` names a SQLite file that does not exist (a URL of another database: False)."""
    text = os.fspath(url_or_path)
    if "://" not in text:
        return not Path(text).expanduser().exists()
    try:
        url = make_url(text)
    except (SQLAlchemyError, ValueError):
        return False
    return url.get_backend_name() == "sqlite" and bool(url.database) and not Path(url.database).expanduser().exists()


# ---------------------------------------------------------------------------------------------------- layered stats

_CONTEXT_FIELDS = ("model", "resolution", "aspect", "scale")


def _winner_contexts(layers: Sequence[TuningDatabase]) -> dict[tuple[str, str | None], dict[str, Any]]:
    """Model, image and scale per (workload key, target key) - and per (workload key, None) for any target -
    from the user attributes of the layers' studies (``"unknown"`` ones left out); earlier layers first."""
    out: dict[tuple[str, str | None], dict[str, Any]] = {}
    for layer in layers:
        try:
            studies = layer.studies()
        except TuningDatabaseError:  # unreadable Optuna tables only cost the names
            continue
        for attrs in studies.values():
            wk, tk = attrs.get("workload_key"), attrs.get("target_key")
            if not isinstance(wk, str) or attrs.get("model") in (None, "unknown"):
                continue
            ctx = {k: attrs.get(k) for k in _CONTEXT_FIELDS}
            out.setdefault((wk, tk), ctx)
            out.setdefault((wk, None), ctx)
    return out


def _match_plans(entries: list[dict[str, Any]]) -> None:
    """Fill the model, image and scale of entries without them from the registered models' default plans."""
    from ..tuner.plan import workload_contexts  # the planner (and torch): only when a winner has no study

    found = workload_contexts({e["workload_key"]: e["_spec"] for e in entries if e["model"] is None})
    for e in entries:
        ctx = found.get(e["workload_key"])
        if e["model"] is None and ctx is not None:
            e.update(model=ctx.model, resolution=ctx.resolution, aspect=ctx.aspect, scale=ctx.scale)


def _mark_picked(entries: list[dict[str, Any]], backends: tuple[str, ...], block_sizes: tuple[int, ...]) -> None:
    """``picked``: per target, model, image and scale, the fastest supplied static winner among ``backends``
    and square ``block_sizes`` (as the emitter chooses), and the dynamic CS4A winner (Triton only)."""
    best: dict[tuple, dict[str, Any]] = {}
    for e in entries:
        if e["model"] is None:
            continue
        e["picked"] = False
        if e["shadowed"] or e["refused"] is not None or e["backend"] not in backends:
            continue
        if not e["dynamic"] and (e["block_m"] != e["block_n"] or e["block_m"] not in block_sizes):
            continue
        if e["dynamic"] and e["backend"] != "triton":
            continue
        group = (e["target_key"], e["model"], e["resolution"], e["aspect"], e["scale"], e["dynamic"], e["batch"])
        if group not in best or e["median_ms"] < best[group]["median_ms"]:
            best[group] = e
    for e in best.values():
        e["picked"] = True


def _group_by_target(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    names: dict[str, set[str]] = {}
    for e in entries:
        names.setdefault(e["target"]["name"], set()).add(e["target_key"])
    out: dict[str, dict[str, Any]] = {}

    def order(e: dict[str, Any]) -> tuple:
        return (str(e["resolution"]), str(e["aspect"]), e["scale"] if isinstance(e["scale"], int) else -1,
                e["dynamic"], e["backend"], e["block_m"], e["block_n"], e["layer"])

    for e in sorted(entries, key=order):
        target = e.pop("target")
        e.pop("_spec", None)
        label = target["name"] if len(names[target["name"]]) == 1 else (
            f"{target['name']} ({target['arch']}, {target['sm_count']} SMs)")
        group = out.setdefault(label, {**target, "models": {}})
        group["models"].setdefault(e["model"] or "unknown", []).append(e)
    return {k: {**v, "models": dict(sorted(v["models"].items()))} for k, v in sorted(out.items())}
