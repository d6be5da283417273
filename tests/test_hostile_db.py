"""Hostile and careless inputs at the tuning database (issue 15): each ends as a clear one-line error or as
correct behaviour, never as a traceback, a hang, a MemoryError or a record the compiler cannot use.

Records the compiler cannot use are refused by ``db import`` and skipped by the kernel choice
(``winners()`` + ``validate_record``); JSON is bounded before it is parsed; database failures are one line;
a read-only open writes nothing; a killed compile leaves no child and no temp directory behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_db import ENV, H100, SPEC, cfg, populate, spec

from sparvar_compiler import limits
from sparvar_compiler.codegen.spec import KernelConfig, KernelConfigError, KernelSpec
from sparvar_compiler.db import (EnvironmentMismatchError, ExchangeFormatError, LayeredDatabase,
                                 SkippedRecordWarning, TuningDatabase, TuningDatabaseError, build_shipped_database,
                                 export_document, export_json, import_document, import_json, shipped_database_path)
from sparvar_compiler.db.bounded_json import JsonInputError, parse_json, read_json
from sparvar_compiler.planner.gpus import get_gpu
from sparvar_compiler.tuner.validate import registered_gpu, roofline, usable_winner, validate_record

GPU = get_gpu("h100")
KSPEC = KernelSpec(**SPEC)


@pytest.fixture
def db(tmp_path):
    with TuningDatabase.open(tmp_path / "tuning.sqlite") as d:
        yield d


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and len(text) < 600, f"not one short line: {text!r}"
    return text


# ------------------------------------------------------------------------------- records the compiler cannot use

def _export_with(tmp_path, config, timings=(0.05,)):
    """An honest export (every format check passes) whose best record is ``config`` at ``timings``."""
    with TuningDatabase.open(tmp_path / "src.sqlite") as src:
        populate(src)
        src.record_trial(SPEC, H100, config, list(timings), environment=ENV, study="imported")
        return export_document(src, all_trials=True)


@pytest.mark.parametrize("config, timings, match", [
    (cfg(4), [1e-300], r"median_ms 1e-300 is below the fastest this workload can run on h100"),
    (cfg(4, programs=2 ** 40), [0.5], r"programs 1099511627776 is over 64 per SM of h100 \(8448\)"),
    (cfg(4, order="zigzag"), [0.5], r"order must be one of \('q_major', 'head_major'\), got 'zigzag'"),
    (cfg(4, swizzle=1), [0.5], r"unknown Triton config keys \['swizzle'\]"),
    (cfg(4, block_m=64.9), [0.5], r"block_m must be an integer, got 64.9"),
    (cfg(4, block_m=True), [0.5], r"block_m must be an integer, got True"),
    (cfg(4, block_m="64"), [0.5], r"block_m must be an integer, got '64'"),
    (cfg(4, tma=1), [0.5], r"tma must be a bool, got 1"),
    (cfg(32), [0.5], r"num_warps must be one of"),
])
def test_import_refuses_records_the_compiler_cannot_use(tmp_path, config, timings, match):
    doc = _export_with(tmp_path, config, timings)
    with TuningDatabase.open(tmp_path / "dst.sqlite") as dst:
        with pytest.raises(ExchangeFormatError, match=match) as e:
            import_document(dst, doc)
        text = _one_line(e.value)
        assert text.startswith("import refused: trials[") and "(triton/block 4096x10521 64x64 on h100)" in text
        assert dst.stats()["trials"]["total"] == 0, "the whole document is refused: nothing written"


def test_import_refuses_an_unknown_target(tmp_path):
    with TuningDatabase.open(tmp_path / "src.sqlite") as src:
        src.record_trial(SPEC, {"name": "h100", "arch": "sm_90", "sm_count": 7}, cfg(4), [1.0], environment=ENV)
        doc = export_document(src)
    with TuningDatabase.open(tmp_path / "dst.sqlite") as dst, pytest.raises(ExchangeFormatError,
                                                                              match="not a GPU this"):
        import_document(dst, doc)


def test_invalid_trials_are_kept_as_evidence(tmp_path):
    # A config that failed (out of resources, say) never wins, so it is not held to the compiler's rules.
    with TuningDatabase.open(tmp_path / "src.sqlite") as src:
        populate(src)
        src.record_trial(SPEC, H100, cfg(4, programs=2 ** 40), valid=False, reason="launch_error", environment=ENV)
        doc = export_document(src, all_trials=True)
    with TuningDatabase.open(tmp_path / "dst.sqlite") as dst:
        assert import_document(dst, doc)["trials_added"] == 7


def test_valid_export_still_imports(tmp_path):
    with TuningDatabase.open(tmp_path / "src.sqlite") as src:
        populate(src)
        export_json(src, tmp_path / "all.json", all_trials=True)
        winners = {pair: src.winner(*pair).config for pair in src.winner_keys()}
    with TuningDatabase.open(tmp_path / "dst.sqlite") as dst:
        assert import_json(dst, tmp_path / "all.json") == {"trials_added": 6, "trials_present": 0}
        assert {pair: dst.winner(*pair).config for pair in dst.winner_keys()} == winners


def test_shipped_records_pass_validation_with_their_layouts():
    # The floor must never refuse a real measurement: every shipped Infinity-2B winner, with its layout's FLOPs.
    from sparvar_compiler.emit.emitter import plan_workloads
    from sparvar_compiler.planner import make_plan

    checked = 0
    with TuningDatabase.open_shipped() as shipped:
        for _, kspec, layout in plan_workloads(make_plan("infinity-2b"), ("triton",), (64, 128), 2, cs4a=False):
            for record in shipped.winners(kspec.to_dict(), GPU.to_dict()):
                validate_record(kspec, record.config, GPU, record.median_ms, layout=layout)
                assert record.median_ms > 2 * roofline(kspec, GPU, layout).floor_ms
                checked += 1
    assert checked > 10


# ------------------------------------------------------------------------------------------- validate_record

def test_kernel_config_from_dict_is_strict():
    assert KernelConfig.from_dict({"num_warps": 8, "block_m": 64}) == KernelConfig(8, 2, (("block_m", 64),))
    for bad, match in [({"num_warps": 4.0}, "num_warps"), ({"num_warps": True}, "num_warps"),
                       ({"num_stages": "2"}, "num_stages"), ({"block_m": [64]}, "block_m"),
                       ({"block_m": float("inf")}, "block_m"), ({"": 1}, "names"), ({"x": None}, "'x'"),
                       ([("num_warps", 4)], "mapping")]:
        with pytest.raises(KernelConfigError, match=match):
            KernelConfig.from_dict(bad)


def test_validate_record_launch_limits_and_kinds():
    assert validate_record(KSPEC, {"num_warps": 8, "block_m": 64}, GPU) == KernelConfig(8, 2, (("block_m", 64),))
    validate_record(KSPEC, cfg(4, programs=264), GPU)  # two programs per SM: fine
    # At a batch of 4096, B*H is 114688: over CUDA's 65535 on the y axis (q_major), fine on x (head_major).
    big = KernelSpec(**{**SPEC, "batch": 4096})
    with pytest.raises(KernelConfigError, match=r"launch grid y = 114688 at batch 4096 is outside CUDA's 1..65535"):
        validate_record(big, cfg(4), GPU)
    validate_record(big, cfg(4, order="head_major"), GPU)
    # TVM records are checked by the TVM code generator without importing TVM.
    tvm_imported = "tvm" in sys.modules
    tvm_spec = KernelSpec(**{**SPEC, "backend": "tvm"})
    validate_record(tvm_spec, {"num_warps": 4, "block_m": 64, "block_n": 64}, GPU)
    with pytest.raises(KernelConfigError, match="mma must be one of"):
        validate_record(tvm_spec, {"num_warps": 4, "mma": "wmma"}, GPU)
    assert ("tvm" in sys.modules) == tvm_imported
    # Dynamic (CS4A) kernels: the launch checks apply; the floor counts q/out only (capacity bounds from above).
    dyn = KernelSpec(**{**SPEC, "dynamic": True, "capacity": 1024, "kind": "gather", "block_m": 192})
    validate_record(dyn, {"num_warps": 4, "block_m": 64, "block_n": 64}, GPU, 0.3)
    with pytest.raises(KernelConfigError, match="persistent"):
        validate_record(dyn, {"num_warps": 4, "block_m": 64, "programs": 132}, GPU)
    # The CS4A statistics and top-k kernels: their own rules, strict types, the floor.
    from sparvar_compiler.codegen.cs4a_stats import StatsSpec
    from sparvar_compiler.codegen.cs4a_topk import TopkSpec

    stats = StatsSpec(2, 28, 1600, 2000, 128, "bf16", 192)
    validate_record(stats, {"num_warps": 4, "block_m": 32, "block_n": 128, "key_split": 4}, GPU, 0.05)
    for bad in ({"key_split": True}, {"block_m": 48}, {"order": "q_major"}):
        with pytest.raises(KernelConfigError):
            validate_record(stats, {"num_warps": 4, **bad}, GPU)
    with pytest.raises(KernelConfigError, match="median_ms"):
        validate_record(stats, {"num_warps": 4}, GPU, 1e-9)
    validate_record(TopkSpec(500, 4121, 784), {"num_warps": 8}, GPU, 0.01)
    with pytest.raises(KernelConfigError, match="unknown CS4A top-k config keys"):
        validate_record(TopkSpec(500, 4121, 784), {"num_warps": 8, "block_m": 64}, GPU)
    for bad_ms in (0, -1.0, float("nan"), True, "1"):
        with pytest.raises(KernelConfigError, match="median_ms must be"):
            validate_record(KSPEC, cfg(4), GPU, bad_ms)


def test_roofline_floor():
    from sparvar_compiler.planner.layout import BlockLayout

    # q read + out written: 2 x 2*28*4096*128*2 bytes, less the 50 MB L2, at 2 x 3.35 TB/s.
    bound = roofline(KSPEC, GPU)
    assert bound.dram_bytes == 4 * 2 * 28 * 4096 * 128
    assert bound.floor_ms == pytest.approx((bound.dram_bytes - GPU.l2_bytes) / (2 * 3.35e12) * 1e3)
    dense_spec = KernelSpec("triton", "block", 2, 28, 4096, 4096, 128, "bf16", 128, 128, "")
    dense = roofline(dense_spec, GPU, BlockLayout.dense(4096, 4096, 128, 128))
    assert dense.flops == 4 * 128 * 2 * 28 * 4096 * 4096
    assert dense.floor_ms == pytest.approx(dense.flops / (2 * 989e12) * 1e3)
    tiny = KernelSpec("triton", "block", 1, 1, 64, 64, 64, "bf16", 64, 64, "")
    assert roofline(tiny, GPU).floor_ms == limits.MIN_KERNEL_MS
    assert registered_gpu({"name": "h100", "arch": "sm_90", "sm_count": 132}) is GPU


# ------------------------------------------------------------------------------------------- winners()

def test_winners_best_first_and_a_bad_winner_is_skipped(db):
    slow = db.record_trial(SPEC, H100, cfg(4), [0.9], environment=ENV)
    tie_a = db.record_trial(SPEC, H100, cfg(8), [0.5], environment=ENV)
    db.record_trial(SPEC, H100, cfg(2), valid=False, reason="wrong_result", environment=ENV)
    tie_b = db.record_trial(SPEC, H100, cfg(4, 3), [0.5], environment=ENV)
    # The fastest record is one the compiler cannot use (written before imports were checked).
    bad = db.record_trial(SPEC, H100, cfg(4, order="zigzag"), [0.2], environment=ENV)
    assert [r.id for r in db.winners(SPEC, H100)] == [bad, tie_a, tie_b, slow]
    assert db.winner(SPEC, H100).id == bad, "winner() is unchanged"
    with pytest.warns(SkippedRecordWarning, match=rf"tuning record {bad} .* order must be one of"):
        record, config = usable_winner(db, KSPEC, GPU)
    assert record.id == tie_a and config == KernelConfig(8, 2)
    assert list(db.winners(spec(heads=3), H100)) == []
    assert usable_winner(db, KernelSpec(**spec(heads=3)), GPU) is None


def test_winners_skip_hard_environment_mismatches(db):
    other = db.record_trial(SPEC, H100, cfg(4), [0.3], environment={**ENV, "triton": "9.0"})
    ours = db.record_trial(SPEC, H100, cfg(8), [0.6], environment=ENV)
    here = {**ENV, "gpu_name": None, "gpu_arch": None, "sm_count": None}
    assert [r.id for r in db.winners(SPEC, H100)] == [other, ours]
    assert [r.id for r in db.winners(SPEC, H100, here)] == [ours]
    with pytest.raises(EnvironmentMismatchError, match="triton"):  # as winner(): all refused
        list(db.winners(SPEC, H100, {**here, "triton": "7.0"}))


def test_layered_winners_user_layer_first(tmp_path):
    with TuningDatabase.open(tmp_path / "src.sqlite") as src:
        populate(src)
        doc = export_document(src)
    shipped = build_shipped_database(tmp_path / "pkg" / "sparvar.sqlite", [doc], studies=False)
    with LayeredDatabase(TuningDatabase.open(tmp_path / "user.sqlite"), TuningDatabase.open_shipped(shipped)) as ld:
        mine = ld.record_trial(SPEC, H100, cfg(4, block_m=64.9), [0.1], environment=ENV)
        records = list(ld.winners(SPEC, H100))
        assert [r.id for r in records][:1] == [mine] and [r.median_ms for r in records] == [0.1, 0.95]
        with pytest.warns(SkippedRecordWarning, match="block_m must be an integer, got 64.9"):
            record, _ = usable_winner(ld, KSPEC, GPU)
        assert record.median_ms == 0.95, "the shipped layer's record is used"


# ------------------------------------------------------------------------------------------- bounded JSON

def test_import_bounds_what_it_reads(tmp_path, db):
    with TuningDatabase.open(tmp_path / "src.sqlite") as src:
        populate(src)
        text = json.dumps(export_document(src, all_trials=True))
    cases = {
        "digits.json": (text.replace('"sm_count": 132', '"sm_count": 1' + "0" * 399, 1).encode(),
                        r"a number of 400 digits is over the limit of 64"),
        "float.json": (text.replace('"sm_count": 132', '"sm_count": 1e999', 1).encode(), "out of range"),
        "deep.json": (('{"format": ' + "[" * 200_000 + "]" * 200_000 + "}").encode(),
                      r"nesting deeper than 64 levels"),
        "open.json": (("[" * 200_000).encode(), "nesting deeper than 64"),
        "latin1.json": (b'{"format": "sparvar-tuning-db", "x": "caf\xe9"}',
                        r"not UTF-8 text \(byte 0xe9 at offset 41\)"),
        "utf16.json": (text.encode("utf-16"), "NUL byte|not UTF-8"),
        "nan.json": (b'{"format": NaN}', "NaN is not valid JSON"),
        "truncated.json": (text[:1000].encode(), "not valid JSON"),
    }
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ExchangeFormatError, match=match) as e:
            import_json(db, tmp_path / name)
        assert _one_line(e.value).startswith(f"import refused: cannot read {tmp_path / name}: "), name
    assert db.stats()["trials"]["total"] == 0


def test_dev_zero_and_huge_files_are_refused_before_reading(tmp_path, db):
    t0 = time.perf_counter()
    with pytest.raises(ExchangeFormatError, match=r"/dev/zero: not a tuning export text \(a NUL byte at offset 0\)"):
        import_json(db, "/dev/zero")
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:  # sparse: nothing is written to disk
        f.truncate(limits.MAX_JSON_BYTES + 1)
    with pytest.raises(ExchangeFormatError, match=r"bytes is over the limit of 268435456"):
        import_json(db, huge)
    with pytest.raises(ExchangeFormatError, match="cannot read .*missing.json: No such file"):
        import_json(db, tmp_path / "missing.json")
    assert time.perf_counter() - t0 < 5


def test_bounded_json_reader(tmp_path):
    assert parse_json(b'{"a": [1, 2.5, "x]]]]"], "b": {"c": null}}') == {"a": [1, 2.5, "x]]]]"], "b": {"c": None}}
    assert parse_json("[" * 64 + "]" * 64) == eval("[" * 64 + "]" * 64)  # exactly the limit
    with pytest.raises(JsonInputError, match="deeper than 64"):
        parse_json("[" * 65 + "]" * 65)
    assert parse_json('"' + "[" * 1000 + '"') == "[" * 1000  # brackets inside strings do not count
    assert parse_json('["\\"[[[["]') == ['"[[[[']
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen([sys.executable, "-c", f"open({str(fifo)!r}, 'w').write('[1, 2]')"])
    assert read_json(fifo) == [1, 2]  # a pipe is read in chunks, bounded all the same
    writer.wait(10)


def test_malformed_replay_file_is_one_line(tmp_path):
    from sparvar_compiler.tuner.runners import ReplayFileError, ReplayRunner

    for name, data, match in [("zero", None, "NUL byte"), ("list.json", b"[1]", "not a replay file"),
                              ("rec.json", b'{"records": [{"spec": {"heads": 1}}]}', r"records\[0\]: .*missing"),
                              ("cfg.json", json.dumps({"records": [{"spec": SPEC, "config": {"num_warps": 4.5},
                                                                    "measurement": {"valid": True}}]}).encode(),
                               r"records\[0\]: config field 'num_warps' must be an integer")]:
        path = "/dev/zero" if data is None else tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(ReplayFileError, match=match) as e:
            ReplayRunner.from_file(path)
        _one_line(e.value)


# ------------------------------------------------------------------------------------------- database failures

def test_dropped_table_is_one_line(tmp_path):
    path = tmp_path / "t.sqlite"
    with TuningDatabase.open(path) as d:
        d.record_trial(SPEC, H100, cfg(4), [1.0], environment=ENV)
        export_json(d, tmp_path / "doc.json")
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE sparvar_winners")
    conn.commit()
    conn.close()
    with TuningDatabase.open(path, readonly=True) as d:
        for call in (lambda: d.winner(SPEC, H100), lambda: d.stats(), lambda: d.winner_keys()):
            with pytest.raises(TuningDatabaseError, match="no such table: sparvar_winners") as e:
                call()
            assert _one_line(e.value) == f"tuning database {path}: no such table: sparvar_winners"
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE sparvar_trials")
    conn.commit()
    conn.close()
    with TuningDatabase.open(path, readonly=True) as d:
        with pytest.raises(TuningDatabaseError, match="no such table: sparvar_trials"):
            list(d.winners(SPEC, H100))
        with pytest.raises(TuningDatabaseError, match="no such table"):
            d.trials()
    with TuningDatabase.open(tmp_path / "other.sqlite") as d:
        conn = sqlite3.connect(tmp_path / "other.sqlite")
        conn.execute("DROP TABLE sparvar_trials")
        conn.commit()
        conn.close()
        with pytest.raises(TuningDatabaseError, match="no such table: sparvar_trials") as e:
            import_json(d, tmp_path / "doc.json")
        _one_line(e.value)


@pytest.mark.parametrize("url, match", [
    ("mysql://bob:s3cret@db.example/tuning", r"tuning database mysql://bob:\*\*\*@db.example/tuning: no driver for "
                                             r"mysql is installed"),
    ("postgresql+psycopg://bob:s3cret@host:port/db", r"postgresql\+psycopg://bob:\*\*\*@host:port/db: not a "
                                                     r"database URL"),
    ("nosuchdialect://x/y", "not a database URL"),
    ("://", "not a database URL"),
])
def test_bad_database_urls_are_one_line(url, match):
    with pytest.raises(TuningDatabaseError, match=match) as e:
        TuningDatabase.open(url)
    assert "s3cret" not in _one_line(e.value)


def test_postgres_stopped_mid_import_and_mid_compile(tmp_path, monkeypatch):
    from pg_server import PostgresServer, _unavailable, find_postgres_bin

    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed")
    bindir = find_postgres_bin()
    if bindir is None:
        _unavailable("no PostgreSQL server binaries")
    from bench.pg_bundle import stop_postmaster

    from sparvar_compiler.db.store import Writer

    with TuningDatabase.open(tmp_path / "src.sqlite") as src:
        populate(src)
        export_json(src, tmp_path / "doc.json", all_trials=True)
    server = PostgresServer(bindir)
    try:
        server.start()
        url = server.create_database()
        db = TuningDatabase.open(url)
        db.record_trial(SPEC, H100, cfg(4), [1.0], environment=ENV)
        calls = []
        record = Writer.record

        def record_then_stop(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # the server goes away in the middle of the import's transaction
                stop_postmaster(server.proc)
            return record(self, *args, **kwargs)

        monkeypatch.setattr(Writer, "record", record_then_stop)
        with pytest.raises(TuningDatabaseError, match=r"tuning database postgresql\+psycopg://sparvar@127\.0\.0\.1")\
                as e:
            import_json(db, tmp_path / "doc.json")
        _one_line(e.value)
        monkeypatch.undo()
        # A compile that reads winners from the stopped server.
        for call in (lambda: db.winner(SPEC, H100), lambda: list(db.winners(SPEC, H100)),
                     lambda: db.record_trial(SPEC, H100, cfg(8), [1.0], environment=ENV)):
            with pytest.raises(TuningDatabaseError, match="tuning database postgresql") as e:
                call()
            _one_line(e.value)
        db.close()
        with pytest.raises(TuningDatabaseError, match="cannot open the tuning database postgresql") as e:
            TuningDatabase.open(url)
        _one_line(e.value)
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------- read-only

def test_readonly_open_default_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARVAR_DB", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPARVAR_CACHE_DIR", str(cache))
    # No user database: the stack is the shipped one alone, and nothing is created.
    with LayeredDatabase.open_default(readonly=True) as ld:
        assert [layer.url for layer in ld.layers] == [str(shipped_database_path())]
        assert all(layer.readonly for layer in ld.layers)
    assert not cache.exists()
    with LayeredDatabase.open_default(shipped=False, readonly=True) as ld:
        assert ld.layers == () and ld.winner(SPEC, H100) is None and list(ld.winners(SPEC, H100)) == []
        with pytest.raises(TuningDatabaseError, match="no tuning database"):
            ld.record_trial(SPEC, H100, cfg(), [1.0])
    # An existing user database (WAL, closed cleanly: no -wal/-shm) is read without writing a byte.
    with TuningDatabase.open(cache / "tuning.sqlite") as d:
        d.record_trial(SPEC, H100, cfg(), [0.01 + 1.0], environment=ENV)
    before = (cache / "tuning.sqlite").read_bytes()
    with LayeredDatabase.open_default(readonly=True) as ld:
        assert [layer.readonly for layer in ld.layers] == [True, True]
        assert ld.winner(SPEC, H100).median_ms == 1.01
        with pytest.raises(TuningDatabaseError, match="read-only"):
            ld.record_trial(SPEC, H100, cfg(8), [1.0])
    assert (cache / "tuning.sqlite").read_bytes() == before
    # Only SQLite's own WAL side files may appear beside it (the directory is writable here).
    assert {p.name for p in cache.iterdir()} <= {"tuning.sqlite", "tuning.sqlite-wal", "tuning.sqlite-shm"}


_READONLY_CHILD = textwrap.dedent("""
    import os, sys
    from sparvar_compiler.db import LayeredDatabase
    cache = sys.argv[1]
    assert not os.access(cache, os.W_OK), "the directory must be read-only for this test"
    with LayeredDatabase.open_default(os.path.join(cache, "tuning.sqlite"), readonly=True) as ld:
        print(ld.winner({SPEC!r}, {H100!r}).median_ms, len(ld.layers))
    with LayeredDatabase.open_default(os.path.join(cache, "none", "tuning.sqlite"), readonly=True) as ld:
        print(len(ld.layers))
""")


def test_readonly_open_default_in_a_readonly_directory(tmp_path):
    """The real thing: a cache directory the process cannot write (root ignores file modes, so as root the check
    runs without the capabilities that let it)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="sparvar-ro-"))  # not under tmp_path: /tmp/pytest-of-root is 0700
    try:
        cache = root / "cache"
        with TuningDatabase.open(cache / "tuning.sqlite") as d:
            d.record_trial(SPEC, H100, cfg(), [0.75], environment=ENV)
        assert sorted(p.name for p in cache.iterdir()) == ["tuning.sqlite"], "closed cleanly: no -wal/-shm"
        os.chmod(cache / "tuning.sqlite", 0o444)
        os.chmod(cache, 0o555)
        os.chmod(root, 0o755)
        command = [sys.executable, "-c", _READONLY_CHILD.format(SPEC=SPEC, H100=H100), str(cache)]
        if os.geteuid() == 0:  # root as the owner of the files, without the capabilities that bypass modes
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
            command = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--", *command]
        repo = str(Path(__file__).resolve().parents[1])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": repo, "HOME": str(root),
               "PYTHONDONTWRITEBYTECODE": "1", "SPARVAR_CACHE_DIR": str(cache)}
        out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == ["0.75", "2", "1"]
        assert sorted(p.name for p in cache.iterdir()) == ["tuning.sqlite"]
    finally:
        for p in (root, root / "cache"):
            if p.exists():
                os.chmod(p, stat.S_IRWXU)
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------- compile child

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_compile_child_dies_with_its_parent(tmp_path):
    from sparvar_compiler.codegen import triton_backend as tb

    mark = tmp_path / "child.pid"
    code = f"import os, time\nopen({str(mark)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n"
    argv = tb._child_argv(code)[:-1]  # the parent appends its own PID, as _compile_in_child does
    parent = subprocess.Popen([sys.executable, "-c", "import os, subprocess, sys, json; "
                               "subprocess.run(json.loads(sys.argv[1]) + [str(os.getpid())])", json.dumps(argv)])
    try:
        deadline = time.monotonic() + 30
        while not (mark.exists() and mark.read_text()) and time.monotonic() < deadline:
            time.sleep(0.02)
        child = int(mark.read_text())
        assert _state(child) not in (None, "Z")
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _state(child) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _state(child) in (None, "Z"), "the compile child outlived its SIGKILLed parent"
    finally:
        parent.kill()
    # A child whose parent is already gone when it starts exits at once.
    assert subprocess.run(argv + ["1"], timeout=30).returncode == 3


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def test_stale_compile_dirs_are_cleaned(tmp_path):
    from sparvar_compiler.codegen import triton_backend as tb

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    dead_locked = tmp_path / f"sparvar-triton-{gone}-abc"  # its owner was SIGKILLed: the lock is free
    dead_locked.mkdir()
    (dead_locked / ".owner.lock").touch()
    (dead_locked / "kernel.cubin").write_bytes(b"x")
    dead_early = tmp_path / f"sparvar-triton-{gone}-def"  # killed before it made its lock
    dead_early.mkdir()
    alive = tmp_path / f"sparvar-triton-{os.getppid()}-ghi"  # a live process, no lock yet
    alive.mkdir()
    other = tmp_path / "sparvar-triton-notapid"
    other.mkdir()
    assert sorted(tb.clean_stale_compile_dirs(tmp_path)) == sorted([dead_locked, dead_early])
    assert alive.exists() and other.exists()
    # A directory in use holds its lock: another cleaner (here, another open file description) leaves it.
    with tb._compile_dir() as d:
        assert Path(d).name.startswith(f"sparvar-triton-{os.getpid()}-")
        assert not tb._stale_compile_dir(Path(d), os.getpid())
    assert not Path(d).exists()
