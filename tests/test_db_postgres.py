"""The tuning database on PostgreSQL: the same checks as on SQLite, against a private server (pg_server.py).

Skipped when no PostgreSQL binaries are installed, unless SPARVAR_REQUIRE_POSTGRES=1.
"""

from __future__ import annotations

import multiprocessing

import pytest
from test_db import (ENV, H100, SPEC, cfg, check_export_import, check_migration_from_v1, check_newer_version_refused,
                     check_round_trip, check_schema_matches_models, collect, run_concurrent_writers)

from sparvar_compiler.db import TuningDatabase, TuningDatabaseError


def test_schema_matches_models(postgres_server):
    check_schema_matches_models(postgres_server.create_database(), postgres_server.create_database())


def test_round_trip(postgres_url):
    check_round_trip(postgres_url)


def test_concurrent_writer_processes(postgres_url):
    run_concurrent_writers(postgres_url, workers=4, n_configs=30)


def _open_and_record(url: str, worker: int, start, done) -> None:
    start.wait()
    with TuningDatabase.open(url) as d:
        d.record_trial(SPEC, H100, cfg(4, 2, tile=worker), [1.0 + worker], environment=ENV)
    done.put(worker)


def test_concurrent_first_open_creates_schema_once(postgres_url):
    # The advisory lock in migrations.upgrade: without it, racing CREATE TABLEs fail.
    ctx = multiprocessing.get_context("spawn")
    start, done = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_open_and_record, args=(postgres_url, w, start, done)) for w in range(4)]
    for p in procs:
        p.start()
    start.set()
    assert sorted(collect(procs, done)) == list(range(len(procs)))
    with TuningDatabase.open(postgres_url) as d:
        assert d.stats()["trials"]["total"] == 4 and d.winner(SPEC, H100).config["tile"] == 0


def test_migration_from_v1(postgres_url):
    check_migration_from_v1(postgres_url)


def test_newer_version_refused(postgres_url):
    check_newer_version_refused(postgres_url)


def test_export_import_between_sqlite_and_postgres(postgres_server, tmp_path):
    check_export_import(str(tmp_path / "a.sqlite"), postgres_server.create_database(), tmp_path)
    check_export_import(postgres_server.create_database(), str(tmp_path / "b.sqlite"), tmp_path)


def test_readonly(postgres_url):
    with TuningDatabase.open(postgres_url) as d:
        d.record_trial(SPEC, H100, cfg(), [1.0], environment=ENV)
    with TuningDatabase.open(postgres_url, readonly=True) as d:
        assert d.winner(SPEC, H100).median_ms == 1.0
        with pytest.raises(TuningDatabaseError, match="read-only"):
            d.record_trial(SPEC, H100, cfg(8), [0.5], environment=ENV)


def test_tuning_keeps_studies(postgres_url):
    from test_studies import check_tuning_keeps_studies

    check_tuning_keeps_studies(postgres_url)


def test_layered_stats(postgres_url, tmp_path):
    from test_studies import check_layered_stats

    check_layered_stats(postgres_url, tmp_path)
