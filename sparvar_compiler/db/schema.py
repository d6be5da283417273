"""What the tuning database holds: the latest schema as typed SQLAlchemy models, and its errors.

Tables
------
``schema_version``
    One row (``id = 1``): the schema version of the file. :mod:`.migrations` brings older files up to date and
    refuses newer ones.
``targets``
    A GPU that kernels are tuned for, keyed by :func:`.keys.target_key` of (name, arch, SM count): an H100 SXM
    and an H100 PCIe are both ``sm_90`` but do not share results.
``workloads``
    A resolved ``KernelSpec.to_dict()`` (JSON), keyed by :func:`.keys.workload_key`.
``trials``
    Every measurement, valid or not: the config (JSON) and its key, all timings in ms (JSON list), their
    median, validity and, when invalid, a reason from :data:`INVALID_REASONS` plus free text, the environment it
    ran in (JSON), study and worker ids, and the time it was recorded. ``(workload, target, config key, study)``
    is unique, so a trial is recorded once however many workers race to record it.
``winners``
    Per (workload, target) the id of the best valid trial: lowest median, ties kept by the earlier trial.

The models describe the newest schema (:data:`SCHEMA_VERSION`); the migration steps are what create it, and a
test checks that the two agree.
"""

from __future__ import annotations

import re
import sqlite3
import sys
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, Double, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ..errors import SparvarError

SCHEMA_VERSION = 2
INVALID_REASONS = ("compile_error", "wrong_result", "timeout", "out_of_resources", "launch_error")
KEY_LENGTH = 64  # hex sha256


class TuningDatabaseError(SparvarError):
    """A tuning database that cannot be opened or used as asked, or a record that cannot be stored."""


class SchemaVersionError(TuningDatabaseError):
    """The file's schema is newer than this sparvar-compiler, or older and opened read-only, or not ours."""


class CorruptRecordError(TuningDatabaseError):
    """A stored row that is malformed or whose key does not match its content; it is never used."""


class EnvironmentMismatchError(TuningDatabaseError):
    """A record measured on another GPU or under an incompatible library version (a *hard* mismatch)."""


class ExchangeFormatError(TuningDatabaseError):
    """A JSON export that is malformed, tampered with, or of a newer format."""


class SkippedRecordWarning(UserWarning):
    """A tuning record that cannot be used (malformed, or failing
    :func:`~sparvar_compiler.tuner.validate.validate_record`) was passed over; the next one, or the default
    config, is used instead."""


# ---------------------------------------------------------------------------------------------------- errors

_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@/\s]*@")


def mask_password(url: str) -> str:
    """``url`` with any password replaced by ``***`` (also for a URL too malformed to parse)."""
    return _PASSWORD.sub(r"\1***@", url)


def is_driver_error(e: BaseException) -> bool:
    """An error of the database or its driver: SQLAlchemy's, sqlite3's, psycopg's, or Optuna's storage error
    (which wraps them)."""
    if isinstance(e, (SQLAlchemyError, sqlite3.Error)):
        return True
    # Only modules something imported can have raised: nothing is imported here to find out.
    psycopg, optuna = sys.modules.get("psycopg"), sys.modules.get("optuna.exceptions")
    return (psycopg is not None and isinstance(e, psycopg.Error)) or (
        optuna is not None and isinstance(e, optuna.StorageInternalError))


def first_line(e: BaseException) -> str:
    """The driver's own message (SQLAlchemy wraps it as ``orig``, Optuna as the cause), first line, without
    SQLAlchemy's ``(module.Class)`` prefix or the SQL."""
    inner = e
    for _ in range(8):
        nested = getattr(inner, "orig", None)
        if nested is None and inner.__cause__ is not None and is_driver_error(inner.__cause__):
            nested = inner.__cause__
        if nested is None or nested is inner:
            break
        inner = nested
    text = str(inner).strip()
    line = text.splitlines()[0].strip() if text else type(inner).__name__
    line = re.sub(r"^\([\w.]+\)\s*", "", line)
    return line[:300] or type(inner).__name__


def database_error(url: str, e: BaseException, opening: bool = False) -> TuningDatabaseError:
    """The one-line :class:`TuningDatabaseError` for a driver error ``e`` of the database at ``url``:
    ``tuning database URL: PROBLEM`` (``cannot open the tuning database URL: PROBLEM`` while ``opening``)."""
    what = f"{'cannot open the' if opening else ''} tuning database {mask_password(url)}".strip()
    return TuningDatabaseError(f"{what}: {first_line(e)}")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[float]: JSON}


class SchemaVersion(Base):
    __tablename__ = "sparvar_schema_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(Integer)


class Target(Base):
    __tablename__ = "sparvar_targets"

    key: Mapped[str] = mapped_column(String(KEY_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    arch: Mapped[str] = mapped_column(String(32))
    sm_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arch": self.arch, "sm_count": self.sm_count}


class Workload(Base):
    __tablename__ = "sparvar_workloads"

    key: Mapped[str] = mapped_column(String(KEY_LENGTH), primary_key=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Trial(Base):
    __tablename__ = "sparvar_trials"
    __table_args__ = (
        UniqueConstraint("workload_key", "target_key", "config_key", "study", name="uq_trials_identity"),
        # Added by schema v2: the winner and best-trial queries filter on these.
        Index("ix_sparvar_trials_best", "workload_key", "target_key", "valid", "median_ms"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    workload_key: Mapped[str] = mapped_column(String(KEY_LENGTH), ForeignKey("sparvar_workloads.key"))
    target_key: Mapped[str] = mapped_column(String(KEY_LENGTH), ForeignKey("sparvar_targets.key"))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    config_key: Mapped[str] = mapped_column(String(KEY_LENGTH))
    timings_ms: Mapped[list[float]] = mapped_column(JSON)
    median_ms: Mapped[float | None] = mapped_column(Double)
    valid: Mapped[bool]
    reason: Mapped[str | None] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)
    environment: Mapped[dict[str, Any]] = mapped_column(JSON)
    study: Mapped[str] = mapped_column(String(128))
    worker: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Winner(Base):
    __tablename__ = "sparvar_winners"

    workload_key: Mapped[str] = mapped_column(String(KEY_LENGTH), ForeignKey("sparvar_workloads.key"), primary_key=True)
    target_key: Mapped[str] = mapped_column(String(KEY_LENGTH), ForeignKey("sparvar_targets.key"), primary_key=True)
    trial_id: Mapped[int] = mapped_column(Integer, ForeignKey("sparvar_trials.id"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
