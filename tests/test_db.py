"""Tuning database on SQLite: keys, records, winners, reuse policy, concurrency, crashes, migrations, exchange.

The ``check_*`` / ``run_*`` helpers take a database URL and are reused by test_db_postgres.py.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import multiprocessing
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import time
import typing
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import MetaData, Table, create_engine, inspect, update

from sparvar_compiler.db import (INVALID_REASONS, SCHEMA_VERSION, CorruptRecordError, EnvironmentMismatchError,
                                 ExchangeFormatError, LayeredDatabase, SchemaVersionError, SoftMismatchWarning,
                                 TuningDatabase, TuningDatabaseError, build_shipped_database, classify_mismatch,
                                 config_key, export_document, export_json, import_document, import_json,
                                 shipped_database_path, target_key, user_database_path, workload_key)
from sparvar_compiler.db.keys import WORKLOAD_FIELDS, resolve_workload
from sparvar_compiler.db.migrations import schema_version, upgrade
from sparvar_compiler.db.schema import Base, SchemaVersion, Trial, Workload

# Kept as plain data so that spawned writer processes do not import torch; a test checks it against KernelSpec.
SPEC = {"backend": "triton", "kind": "block", "batch": 2, "heads": 28, "q_len": 4096, "kv_len": 10521,
        "head_dim": 128, "dtype": "bf16", "block_m": 64, "block_n": 64, "layout_hash": "5eed" * 16,
        "token_exact": False, "return_lse": False, "scale_kind": "explicit"}
H100 = {"name": "h100", "arch": "sm_90", "sm_count": 132}
H100_PCIE = {"name": "h100-pcie", "arch": "sm_90", "sm_count": 114}
ENV = {"gpu_name": "NVIDIA H100 80GB HBM3", "gpu_arch": "sm_90", "sm_count": 132, "cuda": "12.8",
       "driver": "570.86.15", "torch": "2.11.0", "triton": "3.6.0", "tvm": None, "sparvar": "0.1.0",
       "python": "3.12.3"}


def spec(**changes):
    return {**SPEC, **changes}


def cfg(warps=4, stages=2, **extra):
    return {"num_warps": warps, "num_stages": stages, **extra}


@pytest.fixture
def db(tmp_path):
    with TuningDatabase.open(tmp_path / "tuning.sqlite") as d:
        yield d


# ------------------------------------------------------------------------------------------------------ keys

def test_workload_fields_mirror_kernel_spec():
    from sparvar_compiler.codegen.spec import KernelSpec

    hints = typing.get_type_hints(KernelSpec)
    fields = {f.name: f for f in dataclasses.fields(KernelSpec)}
    assert list(WORKLOAD_FIELDS) == list(fields)
    for name, (kind, default) in WORKLOAD_FIELDS.items():
        assert hints[name] is kind, name
        has_default = fields[name].default is not dataclasses.MISSING
        assert has_default == (name in ("token_exact", "return_lse", "scale_kind", "dynamic", "capacity")), name
        if has_default:
            assert default == fields[name].default, name
    assert resolve_workload(KernelSpec(**SPEC).to_dict()) == dict(sorted(SPEC.items()))


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    return value + "x"


def test_changing_any_workload_field_changes_the_key():
    from sparvar_compiler.codegen.spec import KernelSpec

    base = KernelSpec(**SPEC)
    keys = {workload_key(base.to_dict())}
    for f in dataclasses.fields(KernelSpec):
        changed = dataclasses.replace(base, **{f.name: _changed(getattr(base, f.name))})
        key = workload_key(changed.to_dict())
        assert key not in keys, f"changing {f.name} did not change the workload key"
        keys.add(key)
    assert len(keys) == len(dataclasses.fields(KernelSpec)) + 1


def test_changing_any_target_or_config_field_changes_the_key():
    keys = {target_key(H100)}
    for name in H100:
        keys.add(target_key({**H100, name: _changed(H100[name])}))
    assert len(keys) == len(H100) + 1
    base = cfg(4, 2, block_k=32, swizzle=True)
    keys = {config_key(base)}
    for name in base:
        keys.add(config_key({**base, name: _changed(base[name])}))
    keys.add(config_key({**base, "new_knob": 1}))
    assert len(keys) == len(base) + 2


def test_keys_resolve_defaults_and_ignore_order():
    minimal = {k: v for k, v in SPEC.items() if k not in ("token_exact", "return_lse")}
    assert workload_key(minimal) == workload_key(dict(reversed(list(SPEC.items()))))
    assert config_key({}) == config_key(cfg(4, 2)) != config_key(cfg(8, 2))
    # Extra GpuSpec fields (shared memory, L2) follow from the card and do not split its records.
    assert target_key({**H100, "smem_per_block": 232448, "l2_bytes": 52428800}) == target_key(H100)
    assert target_key(H100) != target_key(H100_PCIE)


def test_key_scheme_is_pinned():
    # Changing how keys are computed orphans every stored record; this must only change on purpose.
    # The scheme: sha256 of sorted-key compact JSON of the resolved value.
    sha = lambda text: hashlib.sha256(text.encode()).hexdigest()  # noqa: E731
    assert target_key(H100) == sha('{"arch":"sm_90","name":"h100","sm_count":132}') == \
           "ff295607abd71ce72b3c77bf9231167b7f40303322c9e9a35b6770083135c15c"
    assert config_key({}) == sha('{"num_stages":2,"num_warps":4}')
    assert workload_key(SPEC) == sha(
        '{"backend":"triton","batch":2,"block_m":64,"block_n":64,"dtype":"bf16","head_dim":128,"heads":28,'
        '"kind":"block","kv_len":10521,"layout_hash":"' + "5eed" * 16 + '","q_len":4096,"return_lse":false,'
        '"scale_kind":"explicit","token_exact":false}')


@pytest.mark.parametrize("bad, match", [
    (spec(heads=True), "heads"), (spec(heads="28"), "heads"), (spec(heads=0), "positive"),
    (spec(token_exact=1), "token_exact"), (spec(layout_hash=""), "empty"), (spec(causal=True), "unknown"),
    ({k: v for k, v in SPEC.items() if k != "dtype"}, "missing"), ([("backend", "triton")], "mapping"),
])
def test_malformed_workload_refused(bad, match):
    with pytest.raises(TuningDatabaseError, match=match):
        workload_key(bad)


@pytest.mark.parametrize("bad", [{"num_warps": 4.0}, {"num_warps": False}, {"tile": [1, 2]},
                                 {"tile": float("nan")}, {"": 1}])
def test_malformed_config_refused(bad):
    with pytest.raises(TuningDatabaseError):
        config_key(bad)


# -------------------------------------------------------------------------------------------- records, winners

def check_round_trip(url):
    """Record valid and invalid trials on two targets; read everything back."""
    with TuningDatabase.open(url) as d:
        t1 = d.record_trial(SPEC, H100, cfg(4), [1.5, 1.0, 2.0], environment=ENV, worker="w0")
        t2 = d.record_trial(SPEC, H100, cfg(8), [0.7, 0.9, 0.8], environment=ENV)
        t3 = d.record_trial(SPEC, H100, cfg(16), valid=False, reason="out_of_resources",
                            detail="smem 260 KB > 227 KB", environment=ENV)
        t4 = d.record_trial(SPEC, H100_PCIE, cfg(4), [2.0], environment=ENV)
        assert len({t1, t2, t3, t4}) == 4
        best = d.winner(SPEC, H100)
        assert (best.id, best.config, best.median_ms, best.timings_ms) == (t2, cfg(8), 0.8, (0.7, 0.9, 0.8))
        assert d.winner(workload_key(SPEC), target_key(H100_PCIE)).id == t4
        assert d.winner(spec(heads=16), H100) is None
        [bad] = d.trials(SPEC, H100, valid=False)
        assert (bad.id, bad.reason, bad.detail, bad.median_ms, bad.timings_ms) == \
               (t3, "out_of_resources", "smem 260 KB > 227 KB", None, ())
        assert [t.id for t in d.trials()] == [t1, t2, t3, t4]
        assert d.trials(SPEC, H100)[0].worker == "w0" and d.trials()[0].environment == ENV
        assert d.workload(workload_key(SPEC)) == resolve_workload(SPEC)
        assert d.target(target_key(H100_PCIE)) == H100_PCIE
        stats = d.stats()
        assert stats == {"schema_version": SCHEMA_VERSION, "targets": 2, "workloads": 1, "winners": 2, "studies": 0,
                         "trials": {"total": 4, "valid": 3,
                                    "invalid": {r: int(r == "out_of_resources") for r in INVALID_REASONS}}}
    with TuningDatabase.open(url, readonly=True) as d:  # reopened: everything persisted
        assert d.winner(SPEC, H100).id == t2 and len(d.trials()) == 4


def test_round_trip(tmp_path):
    check_round_trip(str(tmp_path / "t.sqlite"))


def test_sqlite_url_and_path_open_the_same_file(tmp_path):
    path = tmp_path / "sub" / "t.sqlite"
    with TuningDatabase.open(f"sqlite:///{path}") as d:
        d.record_trial(SPEC, H100, cfg(), [1.0], environment=ENV)
    with TuningDatabase.open(path) as d:
        assert len(d.trials()) == 1


def test_winner_rules(db):
    slow = db.record_trial(SPEC, H100, cfg(2), [3.0], environment=ENV)
    assert db.winner(SPEC, H100).id == slow
    db.record_trial(SPEC, H100, cfg(4), valid=False, reason="wrong_result", environment=ENV)
    db.record_trial(SPEC, H100, cfg(4, 3), valid=False, reason="timeout", environment=ENV)
    assert db.winner(SPEC, H100).id == slow, "an invalid trial must never win"
    fast = db.record_trial(SPEC, H100, cfg(8), [1.0, 5.0, 1.0], environment=ENV)  # median 1.0
    assert db.winner(SPEC, H100).id == fast
    tie = db.record_trial(SPEC, H100, cfg(16), [1.0], environment=ENV)
    assert db.winner(SPEC, H100).id == fast, "a tie keeps the earlier trial"
    db.record_trial(SPEC, H100, cfg(8, 3), [1.01], environment=ENV)
    assert db.winner(SPEC, H100).id == fast
    best = db.record_trial(SPEC, H100, cfg(8, 4), [0.99], environment=ENV, study="second-run")
    assert db.winner(SPEC, H100).id == best and tie != best


def test_duplicate_trial_recorded_once(db):
    first = db.record_trial(SPEC, H100, cfg(), [1.0], environment=ENV, study="s")
    again = db.record_trial(SPEC, H100, {}, [0.1], environment=ENV, study="s")  # same config, resolved
    other_study = db.record_trial(SPEC, H100, cfg(), [2.0], environment=ENV, study="t")
    assert again == first != other_study
    assert [t.timings_ms for t in db.trials()] == [(1.0,), (2.0,)]
    assert db.winner(SPEC, H100).id == first


@pytest.mark.parametrize("kwargs, match", [
    ({"timings_ms": []}, "needs timings"),
    ({"timings_ms": [1.0, float("nan")]}, "finite"),
    ({"timings_ms": [0.0]}, "positive"),
    ({"timings_ms": [True]}, "positive"),
    ({"timings_ms": [1.0], "reason": "timeout"}, "no invalid reason"),
    ({"valid": False}, "reason"),
    ({"valid": False, "reason": "slow"}, "reason"),
    ({"valid": 1, "timings_ms": [1.0]}, "bool"),
    ({"timings_ms": [1.0], "study": ""}, "study"),
    ({"timings_ms": [1.0], "worker": 3}, "worker"),
    ({"timings_ms": [1.0], "environment": {"torch": ["2", "11"]}}, "JSON scalar"),
    ({"timings_ms": [1.0], "environment": {"torch": float("inf")}}, "JSON"),
])
def test_malformed_trial_refused(db, kwargs, match):
    kwargs = {"environment": ENV, **kwargs}
    with pytest.raises(TuningDatabaseError, match=match):
        db.record_trial(SPEC, H100, cfg(), **kwargs)
    assert db.stats()["trials"]["total"] == 0


def test_insert_or_get_without_on_conflict(db, monkeypatch):
    # The portable path other dialects take: a savepoint per insert, the unique violation caught.
    import sparvar_compiler.db.store as store

    monkeypatch.setattr(store, "_NATIVE_UPSERT", {})
    first = db.record_trial(SPEC, H100, cfg(), [2.0], environment=ENV)
    assert db.record_trial(SPEC, H100, cfg(), [1.0], environment=ENV) == first
    better = db.record_trial(SPEC, H100, cfg(8), [1.0], environment=ENV)
    assert db.winner(SPEC, H100).id == better and len(db.trials()) == 2
    assert db.stats()["targets"] == db.stats()["workloads"] == 1


def test_default_environment_is_this_process(db):
    from sparvar_compiler.db import collect_environment

    db.record_trial(SPEC, H100, cfg(), [1.0])
    assert db.trials()[0].environment == collect_environment()


def test_unknown_keys_refused(db):
    with pytest.raises(TuningDatabaseError, match="unknown workload key"):
        db.record_trial(workload_key(SPEC), H100, cfg(), [1.0], environment=ENV)
    wk = db.add_workload(SPEC)
    tk = db.add_target(H100)
    assert db.record_trial(wk, tk, cfg(), [1.0], environment=ENV) == 1


def test_batch_is_atomic(db):
    with pytest.raises(RuntimeError):
        with db.batch() as w:
            w.record_trial(SPEC, H100, cfg(2), [1.0], environment=ENV)
            w.record_trial(SPEC, H100, cfg(4), [1.0], environment=ENV)
            raise RuntimeError("tuner crashed")
    assert db.stats()["trials"]["total"] == 0 and db.stats()["workloads"] == 0


# ---------------------------------------------------------------------------------------- SQLite specifics

def test_wal_busy_timeout_foreign_keys_on_every_connection(db):
    conns = [db._engine.connect() for _ in range(3)]  # three pooled connections at once
    try:
        for c in conns:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    finally:
        for c in conns:
            c.close()


def test_readonly(tmp_path):
    path = tmp_path / "t.sqlite"
    with pytest.raises(TuningDatabaseError, match="no tuning database"):
        TuningDatabase.open(path, readonly=True)
    with TuningDatabase.open(path) as writer:
        writer.record_trial(SPEC, H100, cfg(), [1.0], environment=ENV)
        with TuningDatabase.open(path, readonly=True) as reader:  # beside a live writer (WAL)
            assert reader.winner(SPEC, H100).median_ms == 1.0
            with pytest.raises(TuningDatabaseError, match="read-only"):
                reader.record_trial(SPEC, H100, cfg(8), [1.0], environment=ENV)
            writer.record_trial(SPEC, H100, cfg(8), [0.5], environment=ENV)
            assert reader.winner(SPEC, H100).median_ms == 0.5


def test_unreadable_file_refused(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(TuningDatabaseError, match="cannot open the tuning database"):
        TuningDatabase.open(junk)


def test_memory_and_uri_sqlite_refused():
    for url in ("sqlite://", "sqlite:///:memory:"):
        with pytest.raises(TuningDatabaseError, match="plain file"):
            TuningDatabase.open(url)


def trial_values(i: int) -> dict:
    """Deterministic outcome of config ``i`` in the race: every 5th invalid, config 7 the unique best."""
    if i % 5 == 0:
        return {"valid": False, "reason": INVALID_REASONS[i % len(INVALID_REASONS)], "detail": f"cfg {i}"}
    timings = [0.5, 0.6, 0.4] if i == 7 else [1.0 + (i * 37 % 11) / 10, 1.0 + (i * 13 % 7) / 10, 2.0]
    return {"timings_ms": timings}


def _race_writer(url: str, worker: int, n_configs: int, start, results) -> None:
    with TuningDatabase.open(url) as d:
        order = list(range(n_configs))
        random.Random(worker).shuffle(order)
        ids = {}
        start.wait()
        for i in order:
            ids[i] = d.record_trial(SPEC, H100, cfg(4, 2, tile=i), environment=ENV, study="race",
                                    worker=f"w{worker}", **trial_values(i))
    results.put((worker, ids))


def collect(procs, results, timeout: float = 120.0) -> list:
    """One result per process; fails at once (not at the timeout) if a process dies without one."""
    got, deadline = [], time.monotonic() + timeout
    while len(got) < len(procs):
        try:
            got.append(results.get(timeout=0.2))
            continue
        except queue.Empty:
            pass
        dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
        if dead or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            pytest.fail(f"writer processes failed (exit codes {dead}) or timed out")
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return got


def run_concurrent_writers(url: str, workers: int = 4, n_configs: int = 30) -> None:
    """``workers`` processes race to record the same ``n_configs`` trials; each is stored exactly once."""
    TuningDatabase.open(url).close()  # created up front; first-open races are covered by migration locking
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race_writer, args=(url, w, n_configs, start, results)) for w in range(workers)]
    for p in procs:
        p.start()
    start.set()
    got = dict(collect(procs, results))
    with TuningDatabase.open(url, readonly=True) as d:
        trials = d.trials(study="race")
        tiles = sorted(t.config["tile"] for t in trials)
        assert tiles == list(range(n_configs)), "every trial recorded exactly once"
        by_tile = {t.config["tile"]: t for t in trials}
        for ids in got.values():  # losers got the winner's row back
            assert ids == {i: t.id for i, t in by_tile.items()}
        for i, t in by_tile.items():
            expected = trial_values(i)
            assert t.valid == expected.get("valid", True) and t.reason == expected.get("reason")
            assert list(t.timings_ms) == expected.get("timings_ms", [])
        winner = d.winner(SPEC, H100)
        assert winner.config["tile"] == 7
        assert (winner.median_ms, winner.id) == min((t.median_ms, t.id) for t in trials if t.valid)
        assert d.stats()["winners"] == 1 and len({t.worker for t in trials}) >= 1


def test_concurrent_writer_processes(tmp_path):
    run_concurrent_writers(str(tmp_path / "race.sqlite"))


def test_concurrent_first_open_creates_schema_once(tmp_path):
    url = str(tmp_path / "fresh.sqlite")
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race_writer, args=(url, w, 4, start, results)) for w in range(3)]
    for p in procs:
        p.start()
    start.set()
    collect(procs, results)
    with TuningDatabase.open(url) as d:
        assert d.stats()["trials"]["total"] == 4 and d.stats()["schema_version"] == SCHEMA_VERSION


def _killed_writer(path: str, holding) -> None:
    d = TuningDatabase.open(path)
    for i in range(1, 6):
        d.record_trial(SPEC, H100, cfg(4, 2, tile=i), [float(i)], environment=ENV)
    with d.batch() as w:
        w.record_trial(SPEC, H100, cfg(4, 2, tile=100), [0.01], environment=ENV)
        w.record_trial(spec(heads=1), H100, cfg(4, 2, tile=101), [0.01], environment=ENV)
        holding.set()
        time.sleep(120)  # killed here, inside the write transaction


def test_killed_writer_loses_nothing_committed(tmp_path):
    path = str(tmp_path / "killed.sqlite")
    ctx = multiprocessing.get_context("spawn")
    holding = ctx.Event()
    proc = ctx.Process(target=_killed_writer, args=(path, holding))
    proc.start()
    try:
        assert holding.wait(timeout=60), "writer never reached its open transaction"
        with TuningDatabase.open(path, readonly=True) as d:  # readers are not blocked by the open transaction
            assert len(d.trials()) == 5
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL
    with TuningDatabase.open(path) as d:
        assert sorted(t.config["tile"] for t in d.trials()) == [1, 2, 3, 4, 5]
        assert d.winner(SPEC, H100).config["tile"] == 1
        assert d.stats()["workloads"] == 1, "the uncommitted workload is gone"
        with d._engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        t0 = time.monotonic()
        d.record_trial(SPEC, H100, cfg(4, 2, tile=100), [0.01], environment=ENV)  # the lock died with it
        assert time.monotonic() - t0 < 5
        assert d.winner(SPEC, H100).config["tile"] == 100


# ------------------------------------------------------------------------------------------ reuse policy

@pytest.mark.parametrize("field, recorded, current, kind", [
    ("gpu_name", "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "hard"),
    ("gpu_arch", "sm_90", "sm_80", "hard"),
    ("sm_count", 132, 114, "hard"),
    ("triton", "3.6.0", "4.0.0", "hard"),
    ("triton", "3.6.0", "3.9.0", "soft"),
    ("triton", "3.6.0", "3.6.1", "soft"),
    ("tvm", "0.27.0.post1", "0.28.0", "hard"),  # 0.x: the minor is the breaking component
    ("tvm", "0.27.0", "0.27.0.post1", "soft"),
    ("cuda", "12.8", "13.0", "hard"),
    ("cuda", "12.4", "12.8", "soft"),
    ("torch", "2.11.0", "2.13.0+cpu", "soft"),
    ("torch", "2.11.0", "2.11.1", "soft"),
    ("torch", "2.11.0", "weird", "soft"),
    ("driver", "550.54.15", "570.86.15", "soft"),
    ("python", "3.11.7", "3.12.3", "soft"),
    ("sparvar", "0.1.0", "0.2.0", "soft"),
    ("torch", "2.11.0", None, None),  # absent on one side: not compared
    ("tvm", None, "0.27.0", None),
    ("triton", "3.6.0", "3.6.0", None),
])
def test_classify_mismatch(field, recorded, current, kind):
    hard, soft = classify_mismatch({**ENV, field: recorded}, {**ENV, field: current})
    assert ([m.field for m in hard], [m.field for m in soft]) == \
           ([field] * (kind == "hard"), [field] * (kind == "soft"))


def test_classify_target_mismatch():
    hard, soft = classify_mismatch(ENV, ENV, H100, H100_PCIE)
    assert sorted(m.field for m in hard) == ["target.name", "target.sm_count"] and not soft
    assert classify_mismatch(ENV, ENV, H100, {"arch": "sm_90", "sm_count": 132}) == ([], [])
    assert classify_mismatch(None, ENV) == ([], [])


def test_winner_reuse_policy(db):
    db.record_trial(SPEC, H100, cfg(), [1.0], environment=ENV)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert db.winner(SPEC, H100, environment=ENV).median_ms == 1.0  # identical: silent
    with pytest.warns(SoftMismatchWarning, match="triton: recorded '3.6.0', current '3.6.2'"):
        assert db.winner(SPEC, H100, environment={**ENV, "triton": "3.6.2"}) is not None
    with pytest.raises(EnvironmentMismatchError, match="triton: recorded '3.6.0', current '4.1.0'"):
        db.winner(SPEC, H100, environment={**ENV, "triton": "4.1.0"})
    a100 = {**ENV, "gpu_name": "NVIDIA A100-SXM4-80GB", "gpu_arch": "sm_80", "sm_count": 108}
    with pytest.raises(EnvironmentMismatchError, match="target.arch") as err:
        db.winner(SPEC, H100, environment=a100)
    assert "gpu_name" in str(err.value) and "target.sm_count" in str(err.value)
    # Compiling for the H100 on a machine without a GPU: nothing to compare the card with.
    no_gpu = {**ENV, "gpu_name": None, "gpu_arch": None, "sm_count": None}
    assert db.winner(SPEC, H100, environment=no_gpu) is not None


def test_collect_environment_does_not_import_tvm_or_torch():
    code = ("import json, sys; from sparvar_compiler.db import collect_environment; "
            "e = collect_environment(probe_gpu=False); "
            "print(json.dumps([e, 'tvm' in sys.modules, 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    env, tvm_imported, torch_imported = json.loads(out.stdout)
    assert not tvm_imported and not torch_imported
    from importlib.metadata import PackageNotFoundError, version

    import sparvar_compiler

    def installed(name):  # the GPU host has no TVM
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    assert env["tvm"] == installed("apache-tvm") and env["triton"] == installed("triton")
    assert env["torch"] == version("torch") and env["sparvar"] == sparvar_compiler.__version__
    assert env["gpu_name"] is None and env["python"] == ".".join(map(str, sys.version_info[:3]))


@pytest.mark.parametrize("text, version", [
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\nGCC version: 12",
     "550.54.15"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16)",
     "570.86.15"),
    ("garbage", None),
])
def test_parse_driver_version(text, version):
    from sparvar_compiler.db.environment import parse_driver_version

    assert parse_driver_version(text) == version


def test_collect_environment_probes_torch():
    import torch

    from sparvar_compiler.db import collect_environment

    env = collect_environment()
    assert env["cuda"] == torch.version.cuda
    if not torch.cuda.is_available():
        assert env["gpu_name"] is env["gpu_arch"] is env["sm_count"] is None


# ---------------------------------------------------------------------------------------- corrupt rows

def _engine(url):
    return create_engine(url if "://" in url else f"sqlite:///{url}")


@pytest.mark.parametrize("column, value, match", [
    ("config", [1, 2], "config must be a JSON object"),
    ("config", {"num_warps": 4, "num_stages": 3}, "does not match its config"),
    ("config_key", "0" * 64, "does not match its config"),
    ("timings_ms", {"a": 1}, "timings"),
    ("median_ms", 0.123, "median"),
    ("environment", ["x"], "environment"),
])
def test_corrupt_trial_refused_on_read(tmp_path, column, value, match):
    path = str(tmp_path / "t.sqlite")
    with TuningDatabase.open(path) as d:
        t = d.record_trial(SPEC, H100, cfg(), [1.0, 2.0], environment=ENV)
    engine = _engine(path)
    with engine.begin() as c:
        c.execute(update(Trial).where(Trial.id == t).values({column: value}))
    engine.dispose()
    with TuningDatabase.open(path) as d:
        for read in (lambda: d.winner(SPEC, H100), d.trials, lambda: export_document(d)):
            with pytest.raises(CorruptRecordError, match=match):
                read()


def test_corrupt_workload_refused_on_read(tmp_path):
    path = str(tmp_path / "t.sqlite")
    with TuningDatabase.open(path) as d:
        d.record_trial(SPEC, H100, cfg(), [1.0], environment=ENV)
    engine = _engine(path)
    with engine.begin() as c:
        c.execute(update(Workload).values(spec=spec(heads=16)))
    engine.dispose()
    with TuningDatabase.open(path) as d:
        with pytest.raises(CorruptRecordError, match="does not hash to its key"):
            d.winner(SPEC, H100)
        with pytest.raises(CorruptRecordError, match="does not hash to its key"):
            d.workload(workload_key(SPEC))


# ------------------------------------------------------------------------------------------ migrations

def schema_signature(url) -> dict:
    """Tables, columns (type, nullability), keys and indexes as the database reports them."""
    engine = _engine(url)
    try:
        insp = inspect(engine)
        out = {}
        for t in sorted(insp.get_table_names()):
            out[t] = {
                "columns": {c["name"]: (str(c["type"]), c["nullable"]) for c in insp.get_columns(t)},
                "pk": tuple(insp.get_pk_constraint(t)["constrained_columns"]),
                "fks": sorted((tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
                              for f in insp.get_foreign_keys(t)),
                "unique": sorted((u["name"], tuple(u["column_names"])) for u in insp.get_unique_constraints(t)),
                "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                                  for i in insp.get_indexes(t)),
            }
        return out
    finally:
        engine.dispose()


def check_schema_matches_models(migrated_url, models_url):
    TuningDatabase.open(migrated_url).close()
    engine = _engine(models_url)
    Base.metadata.create_all(engine)
    engine.dispose()
    migrated, models = schema_signature(migrated_url), schema_signature(models_url)
    assert migrated == models
    assert ("ix_sparvar_trials_best", ("workload_key", "target_key", "valid", "median_ms"), False) in \
           migrated["sparvar_trials"]["indexes"]


def test_schema_matches_models(tmp_path):
    check_schema_matches_models(str(tmp_path / "migrated.sqlite"), str(tmp_path / "models.sqlite"))


def check_migration_from_v1(url):
    """A database created at schema v1, holding a winner, opens at the current version with its data."""
    engine = _engine(url)
    with engine.begin() as c:
        assert upgrade(c, to=1) == (0, 1)
        md = MetaData()
        tables = {n: Table(n, md, autoload_with=c) for n in ("sparvar_targets", "sparvar_workloads", "sparvar_trials", "sparvar_winners")}
        assert "ix_sparvar_trials_best" not in {i["name"] for i in inspect(c).get_indexes("sparvar_trials")}
        now = datetime(2025, 1, 1, tzinfo=timezone.utc)
        wk, tk = workload_key(SPEC), target_key(H100)
        c.execute(tables["sparvar_targets"].insert().values(key=tk, created_at=now, **H100))
        c.execute(tables["sparvar_workloads"].insert().values(key=wk, spec=resolve_workload(SPEC), created_at=now))
        trial_id = c.scalar(tables["sparvar_trials"].insert().returning(tables["sparvar_trials"].c.id).values(
            workload_key=wk, target_key=tk, config=cfg(), config_key=config_key(cfg()),
            timings_ms=[1.0, 3.0], median_ms=2.0, valid=True, reason=None, detail=None, environment=ENV,
            study="v1", worker=None, created_at=now))
        c.execute(tables["sparvar_winners"].insert().values(workload_key=wk, target_key=tk, trial_id=trial_id,
                                                   updated_at=now))
    engine.dispose()
    with pytest.raises(SchemaVersionError, match="older"):
        TuningDatabase.open(url, readonly=True)
    with TuningDatabase.open(url) as d:
        assert d.stats()["schema_version"] == SCHEMA_VERSION
        assert d.winner(SPEC, H100).median_ms == 2.0
        d.record_trial(SPEC, H100, cfg(8), [1.0], environment=ENV)
        assert d.winner(SPEC, H100).median_ms == 1.0
    engine = _engine(url)
    assert "ix_sparvar_trials_best" in {i["name"] for i in inspect(engine).get_indexes("sparvar_trials")}
    engine.dispose()


def test_migration_from_v1(tmp_path):
    check_migration_from_v1(str(tmp_path / "v1.sqlite"))


def check_newer_version_refused(url):
    TuningDatabase.open(url).close()
    engine = _engine(url)
    with engine.begin() as c:
        c.execute(update(SchemaVersion).values(version=SCHEMA_VERSION + 1))
    engine.dispose()
    for readonly in (False, True):
        with pytest.raises(SchemaVersionError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
            TuningDatabase.open(url, readonly=readonly)
    engine = _engine(url)
    with engine.connect() as c:  # refused without touching it
        assert schema_version(c) == SCHEMA_VERSION + 1
    engine.dispose()


def test_newer_version_refused(tmp_path):
    check_newer_version_refused(str(tmp_path / "new.sqlite"))


def test_foreign_database_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    conn.close()
    with pytest.raises(SchemaVersionError, match="not a sparvar tuning database"):
        TuningDatabase.open(path)


# ------------------------------------------------------------------------------------------ exchange

def populate(d):
    """Two workloads on two targets, valid and invalid trials, two studies."""
    d.record_trial(SPEC, H100, cfg(4), [1.2, 1.1], environment=ENV)
    d.record_trial(SPEC, H100, cfg(8), [0.9, 1.0, 0.95], environment=ENV, worker="w1")
    d.record_trial(SPEC, H100, cfg(16), valid=False, reason="compile_error", detail="ptxas", environment=ENV)
    d.record_trial(spec(q_len=2304, kv_len=6425), H100, cfg(4), [0.3], environment=ENV, study="other")
    d.record_trial(SPEC, H100_PCIE, cfg(4), [1.7], environment={**ENV, "sm_count": 114})
    d.record_trial(spec(head_dim=64), H100_PCIE, cfg(2), valid=False, reason="timeout", environment=ENV)


def _without_time(doc):
    return {k: v for k, v in doc.items() if k != "exported_at"}


def check_export_import(source_url, dest_url, tmp_path):
    with TuningDatabase.open(source_url) as src:
        populate(src)
        full = export_json(src, tmp_path / "all.json", all_trials=True)
        winners_only = export_document(src)
        assert len(full["trials"]) == 6 and len(winners_only["trials"]) == len(winners_only["winners"]) == 3
        assert json.loads((tmp_path / "all.json").read_text()) == full
    with TuningDatabase.open(dest_url) as dst:
        assert import_json(dst, tmp_path / "all.json") == {"trials_added": 6, "trials_present": 0}
        assert import_json(dst, tmp_path / "all.json") == {"trials_added": 0, "trials_present": 6}
        assert import_document(dst, winners_only) == {"trials_added": 0, "trials_present": 3}
        assert _without_time(export_document(dst, all_trials=True)) == _without_time(full)
        assert dst.stats()["trials"]["total"] == 6
    with TuningDatabase.open(source_url) as src, TuningDatabase.open(dest_url) as dst:
        for wk, tk in src.winner_keys():
            assert dst.winner(wk, tk) == dataclasses.replace(src.winner(wk, tk), id=dst.winner(wk, tk).id)


def test_export_import_round_trip(tmp_path):
    check_export_import(str(tmp_path / "a.sqlite"), str(tmp_path / "b.sqlite"), tmp_path)


def _tamper_workload(doc):
    doc["workloads"][0]["spec"]["heads"] += 1


def _tamper_config(doc):
    doc["trials"][0]["config"]["num_warps"] = 2


def _tamper_timings(doc):
    doc["trials"][1]["timings_ms"] = [0.001]  # a faster claim than the median says


def _tamper_winner(doc):
    # Claim the slower of the two valid trials of (SPEC, H100) as the winner.
    w = next(w for w in doc["winners"] if w["target_key"] == target_key(H100)
             and w["workload_key"] == workload_key(SPEC))
    [slower] = [t for t in doc["trials"] if (t["workload_key"], t["target_key"]) == (w["workload_key"],
                w["target_key"]) and t["valid"] and t["config_key"] != w["config_key"]]
    w["config_key"] = slower["config_key"]


@pytest.mark.parametrize("tamper, match", [
    (_tamper_workload, r"workloads\[0\]: key .* does not match its content"),
    (_tamper_config, r"trials\[0\]: key .* does not match"),
    (_tamper_timings, "not the median"),
    (_tamper_winner, "not the best valid trial"),
    (lambda d: d["targets"][0].update(sm_count=7), r"targets\[0\]: key"),
    (lambda d: d["trials"][0].update(valid=1), "valid"),
    (lambda d: d["trials"][0].update(reason="pruned"), "no invalid reason"),
    (lambda d: d["trials"][2].update(reason="pruned"), "reason 'pruned'"),
    (lambda d: d["trials"][0].update(extra=1), "unknown"),
    (lambda d: d["trials"][0].pop("environment"), "missing"),
    (lambda d: d["trials"][0].update(created_at="yesterday"), "ISO 8601"),
    (lambda d: d["trials"][0].update(workload_key="0" * 64), "not in the document"),
    (lambda d: d["trials"].append(copy.deepcopy(d["trials"][0])), "repeats"),
    (lambda d: d["winners"].pop(), "have none"),
    (lambda d: d.update(format_version=2), "format_version"),
    (lambda d: d.update(format="tvm-meta-schedule"), "format"),
    (lambda d: d.update(trials={}), "must be a list"),
])
def test_tampered_import_refused(tmp_path, tamper, match):
    with TuningDatabase.open(tmp_path / "a.sqlite") as src:
        populate(src)
        doc = export_document(src, all_trials=True)
    tamper(doc)
    with TuningDatabase.open(tmp_path / "b.sqlite") as dst:
        with pytest.raises(ExchangeFormatError, match=match):
            import_document(dst, doc)
        assert dst.stats()["trials"]["total"] == dst.stats()["workloads"] == 0, "nothing written"


def test_import_refuses_unreadable_json(tmp_path, db):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": NaN}')
    with pytest.raises(ExchangeFormatError, match="cannot read"):
        import_json(db, bad)


# ---------------------------------------------------------------------------------- shipped, user, layered

def test_shipped_database_is_a_frozen_current_database_of_the_shipped_exports():
    path = shipped_database_path()
    assert path.is_file(), "tuning_db/sparvar.sqlite must ship"
    before = path.read_bytes()
    conn = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete", "shipped file must not need -wal"
    conn.close()
    with TuningDatabase.open_shipped() as d:
        stats = d.stats()
        assert stats["schema_version"] == SCHEMA_VERSION, "rebuild tuning_db/sparvar.sqlite after a migration"
        # It holds exactly the winners exported to tuning_db/winners-*.json (measured on real cards).
        exports = sorted(path.parent.glob("winners-*.json"))
        docs = [json.loads(p.read_text()) for p in exports]
        assert stats["trials"]["total"] == sum(len(doc["trials"]) for doc in docs)
        assert stats["winners"] == sum(len(doc["winners"]) for doc in docs)
        with pytest.raises(TuningDatabaseError, match="read-only"):
            d.add_target(H100)
    assert path.read_bytes() == before
    assert not any(path.with_name(path.name + s).exists() for s in ("-wal", "-shm", "-journal"))


def test_user_database_path(monkeypatch, tmp_path):
    monkeypatch.delenv("SPARVAR_DB", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("SPARVAR_CACHE_DIR", str(tmp_path / "cache"))
    assert user_database_path() == tmp_path / "cache" / "tuning.sqlite"
    with TuningDatabase.open() as d:
        d.record_trial(SPEC, H100, cfg(), [1.0], environment=ENV)
    assert (tmp_path / "cache" / "tuning.sqlite").is_file()
    monkeypatch.delenv("SPARVAR_CACHE_DIR")
    assert user_database_path() == Path.home() / ".cache" / "sparvar" / "tuning.sqlite"


def test_layered_database(tmp_path):
    with TuningDatabase.open(tmp_path / "src.sqlite") as src:
        populate(src)
        doc = export_document(src)
    shipped_path = build_shipped_database(tmp_path / "pkg" / "sparvar.sqlite", [doc])
    assert sorted(p.name for p in shipped_path.parent.iterdir()) == ["sparvar.sqlite"]
    shipped_bytes = shipped_path.read_bytes()
    user = TuningDatabase.open(tmp_path / "user.sqlite")
    with LayeredDatabase(user, TuningDatabase.open_shipped(shipped_path)) as layered:
        assert layered.winner(SPEC, H100).median_ms == 0.95  # from the shipped layer
        layered.record_trial(SPEC, H100, cfg(32), [0.5], environment=ENV)
        assert layered.winner(SPEC, H100).median_ms == 0.5  # the user's own record first
        assert layered.winner(spec(heads=3), H100) is None
        # The user's record is for another triton major; the shipped one is not: fall through to it.
        layered.record_trial(SPEC, H100_PCIE, cfg(32), [0.1], environment={**ENV, "triton": "4.0.0"})
        here = {**ENV, "gpu_name": None, "gpu_arch": None, "sm_count": None}
        assert layered.winner(SPEC, H100_PCIE, environment=here).median_ms == 1.7
        with pytest.raises(EnvironmentMismatchError, match="triton"):
            layered.winner(SPEC, H100_PCIE, environment={**here, "triton": "5.0"})
    assert shipped_path.read_bytes() == shipped_bytes, "writes never touch the shipped file"


def test_layered_open_default(monkeypatch, tmp_path):
    monkeypatch.delenv("SPARVAR_DB", raising=False)
    monkeypatch.setenv("SPARVAR_CACHE_DIR", str(tmp_path))
    with LayeredDatabase.open_default() as layered:
        assert [layer.readonly for layer in layered.layers] == [False, True]
        assert layered.layers[1].url == str(shipped_database_path())
        layered.record_trial(SPEC, H100, cfg(), [1.0], environment=ENV)
        assert layered.winner(SPEC, H100).median_ms == 1.0
    assert (tmp_path / "tuning.sqlite").is_file()
