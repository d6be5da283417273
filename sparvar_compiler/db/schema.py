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

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, Double, ForeignKey, Index, Integer, String, Text, UniqueConstraint
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
