"""Schema versions and the ordered steps between them.

Every database, new or old, is brought to :data:`~.schema.SCHEMA_VERSION` by running the steps after its
version, in order, inside one write transaction (SQLite and PostgreSQL both have transactional DDL, so a failed
upgrade leaves the file as it was). Each step describes its own tables with SQLAlchemy Core and never the ORM
models, because the models follow the newest schema while a step must keep doing what it did when it was
written. A file whose version is newer than this code knows is refused.

To change the schema: append a :class:`Migration` with the next version, bump ``SCHEMA_VERSION`` and change the
models to match (a test compares a migrated database with the models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sqlalchemy import (JSON, Boolean, Column, Connection, DateTime, Double, ForeignKey, Index, Integer, MetaData,
                        String, Table, Text, UniqueConstraint, func, inspect, select, update)

from .schema import KEY_LENGTH, SCHEMA_VERSION, SchemaVersionError

# Any constant works; it only has to be the same in every process that migrates a PostgreSQL database.
_PG_LOCK_ID = 0x53505652  # "SPVR"


@dataclass(frozen=True)
class Migration:
    """Bring a database from ``version - 1`` to ``version``."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def _version_table(metadata: MetaData) -> Table:
    return Table("sparvar_schema_version", metadata,
                 Column("id", Integer, primary_key=True, autoincrement=False),
                 Column("version", Integer, nullable=False))


def _initial_schema(conn: Connection) -> None:
    md = MetaData()
    versions = _version_table(md)
    key = lambda name, *args, **kw: Column(name, String(KEY_LENGTH), *args, **kw)  # noqa: E731
    created = lambda name="created_at": Column(name, DateTime(timezone=True), nullable=False)  # noqa: E731
    Table("sparvar_targets", md, key("key", primary_key=True),
          Column("name", String(128), nullable=False), Column("arch", String(32), nullable=False),
          Column("sm_count", Integer, nullable=False), created())
    Table("sparvar_workloads", md, key("key", primary_key=True), Column("spec", JSON, nullable=False), created())
    Table("sparvar_trials", md,
          Column("id", Integer, primary_key=True, autoincrement=True),
          key("workload_key", ForeignKey("sparvar_workloads.key"), nullable=False),
          key("target_key", ForeignKey("sparvar_targets.key"), nullable=False),
          Column("config", JSON, nullable=False), key("config_key", nullable=False),
          Column("timings_ms", JSON, nullable=False), Column("median_ms", Double, nullable=True),
          Column("valid", Boolean, nullable=False), Column("reason", String(32), nullable=True),
          Column("detail", Text, nullable=True), Column("environment", JSON, nullable=False),
          Column("study", String(128), nullable=False), Column("worker", String(128), nullable=True),
          created(),
          UniqueConstraint("workload_key", "target_key", "config_key", "study", name="uq_trials_identity"))
    Table("sparvar_winners", md,
          key("workload_key", ForeignKey("sparvar_workloads.key"), primary_key=True),
          key("target_key", ForeignKey("sparvar_targets.key"), primary_key=True),
          Column("trial_id", Integer, ForeignKey("sparvar_trials.id"), nullable=False),
          created("updated_at"))
    md.create_all(conn)
    conn.execute(versions.insert().values(id=1, version=0))


def _index_best_trials(conn: Connection) -> None:
    trials = Table("sparvar_trials", MetaData(), Column("workload_key", String), Column("target_key", String),
                   Column("valid", Boolean), Column("median_ms", Double))
    Index("ix_sparvar_trials_best", trials.c.workload_key, trials.c.target_key, trials.c.valid,
          trials.c.median_ms).create(conn)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema: targets, workloads, trials, winners", _initial_schema),
    Migration(2, "index trials by (workload, target, valid, median) for best-trial lookups", _index_best_trials),
)
assert [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


OPTUNA_TABLES = frozenset({
    "alembic_version", "studies", "study_directions", "study_user_attributes", "study_system_attributes",
    "trials", "trial_params", "trial_values", "trial_intermediate_values", "trial_user_attributes",
    "trial_system_attributes", "trial_heartbeats", "version_info",
})


def schema_version(conn: Connection) -> int:
    """The version stored in the database; 0 for an empty one.

    Raises
    ------
    SchemaVersionError
        The database has tables but no version: it is not a sparvar tuning database.
    """
    # Optuna's study tables share the database (one URL for records and studies); anything else means the
    # database belongs to something other than sparvar.
    names = set(inspect(conn).get_table_names()) - OPTUNA_TABLES
    if "sparvar_schema_version" not in names:
        if names:
            raise SchemaVersionError(f"not a sparvar tuning database: it has tables {sorted(names)[:8]} but no "
                                     f"sparvar_schema_version")
        return 0
    versions = _version_table(MetaData())
    found = conn.execute(select(versions.c.version).where(versions.c.id == 1)).scalar_one_or_none()
    if not isinstance(found, int) or found < 0:
        raise SchemaVersionError(f"schema_version row is missing or malformed ({found!r})")
    return found


def check_supported(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(f"the tuning database has schema version {version}, newer than the {SCHEMA_VERSION} "
                                 f"this sparvar-compiler understands; upgrade sparvar-compiler to use it")


def upgrade(conn: Connection, to: int = SCHEMA_VERSION) -> tuple[int, int]:
    """Run the missing steps up to version ``to`` on ``conn``, inside the caller's write transaction.

    Returns
    -------
    (before, after)
        The versions found and left.
    """
    if conn.dialect.name == "postgresql":
        # Serialise concurrent first opens: without it two processes could both create the tables.
        conn.execute(select(func.pg_advisory_xact_lock(_PG_LOCK_ID)))
    before = schema_version(conn)
    check_supported(before)
    versions = _version_table(MetaData())
    for step in MIGRATIONS:
        if before < step.version <= to:
            step.apply(conn)
            conn.execute(update(versions).where(versions.c.id == 1).values(version=step.version))
    return before, max(before, min(to, SCHEMA_VERSION))
