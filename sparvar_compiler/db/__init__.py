"""Tuning database: every trial of every kernel config, the winner per workload and target, and the
environment each was measured in.

Stage "db" of the pipeline (tuner -> **db** -> emitter). A SQLite file by default, any SQLAlchemy URL for a
shared fleet; see :mod:`.store`. Keys are in :mod:`.keys`, the reuse policy in :mod:`.environment`, schema
versions in :mod:`.migrations`, JSON export/import in :mod:`.exchange` (which reads through :mod:`.bounded_json`
and refuses records the compiler cannot use), the Optuna studies beside the records in :mod:`.studies`, the text
view of :meth:`LayeredDatabase.stats` in :mod:`.report`. Database failures leave every public method as one-line
:class:`TuningDatabaseError`.
"""

from .environment import Mismatch, SoftMismatchWarning, classify_mismatch, collect_environment
from .exchange import build_shipped_database, export_document, export_json, import_document, import_json
from .keys import config_key, target_key, workload_key
from .report import format_stats
from .schema import (INVALID_REASONS, SCHEMA_VERSION, CorruptRecordError, EnvironmentMismatchError,
                     ExchangeFormatError, SchemaVersionError, SkippedRecordWarning, TuningDatabaseError)
from .store import (LayeredDatabase, TrialRecord, TuningDatabase, default_database_url, freeze_sqlite,
                    mask_password, shipped_database_path, user_database_path)

__all__ = [
    "INVALID_REASONS", "SCHEMA_VERSION", "CorruptRecordError", "EnvironmentMismatchError", "ExchangeFormatError",
    "LayeredDatabase", "Mismatch", "SchemaVersionError", "SkippedRecordWarning", "SoftMismatchWarning",
    "TrialRecord", "TuningDatabase", "TuningDatabaseError", "build_shipped_database", "classify_mismatch",
    "collect_environment", "config_key", "default_database_url", "export_document", "export_json", "format_stats",
    "freeze_sqlite", "import_document", "import_json", "mask_password", "shipped_database_path", "target_key",
    "user_database_path", "workload_key",
]
