"""Hostile and careless command lines (issue 15): every one ends in one line on stderr naming the input and the
problem, with the documented exit status (2: usage, input or environment; 1: a check failed), never a
traceback - unless ``SPARVAR_DEBUG=1`` asks for it, or the error is a bug.

Flags are refused while parsing (before any work); what escapes a verb is mapped by ``cli.main``. Compiles are
the smallest there are (Infinity-2B at 256 px, CSLA off, 32x32 blocks) and read no user database (``--db`` names
a file that is not there)."""

import errno
import json
import sqlite3

import numpy as np
import pytest

import sparvar_compiler.cli as cli
from sparvar_compiler.cli import main
from sparvar_compiler.cli_args import KERNEL_BACKENDS
from sparvar_compiler.errors import SparvarError

SMALL = ["--model", "infinity-2b", "--resolution", "256", "--cs4a", "off"]
COMPILE = ["compile", *SMALL, "--gpu", "h100", "--tune", "never"]
TUNE = ["tune", "--model", "var-d16", "--gpu", "h100", "--runner", "replay"]
FIDELITY = ["fidelity", "--model", "var-d16", "--synthetic", "local"]
CALIBRATE = ["calibrate", "--model", "var-d16", "--synthetic", "local"]
TINY = """name: tiny-var
family: custom
depth: 4
width: 128
heads: 2
head_dim: 32
schedules:
  - resolution: 512
    scales: "1,2,4,6,8,12,16,24,32"
"""


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("SPARVAR_DEBUG", raising=False)


def fails(capsys, argv, *needles, code=2):
    """Run ``main(argv)``: it returns ``code``, stdout is empty, and stderr ends with exactly one error line (a
    verb's progress lines may come before it) holding every needle; returns that line."""
    assert main([str(a) for a in argv]) == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err and lines, captured.err
    errors = [line for line in lines if ": error: " in line or "verify failed" in line]
    assert errors == [lines[-1]], captured.err
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    assert captured.out == "" or code == 1  # verify --json prints its verdict
    return lines[-1]


def parse_fails(capsys, argv, *needles):
    """A flag refused while parsing: stderr is that one line, and it says where the usage is."""
    line = fails(capsys, argv, *needles)
    assert capsys.readouterr().err == "" and "--help' shows the usage" in line
    return line


# ---------------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("argv, needles", [
    ([*COMPILE, "--block-sizes", "abc"], ["--block-sizes", "'abc' is not a block size"]),
    ([*COMPILE, "--block-sizes", "64,96"], ["--block-sizes", "'96' is not a block size"]),
    ([*COMPILE, "--block-sizes", ","], ["--block-sizes", "names no block size"]),
    ([*COMPILE, "--backend", "bogus"], ["--backend", "unknown backend 'bogus'; known: triton, tvm"]),
    ([*COMPILE, "--trials", "0"], ["--trials", "must be >= 1, got 0"]),
    ([*COMPILE, "--batch", "0"], ["--batch", "must be in 1..4096, got 0"]),
    ([*COMPILE, "--batch", "5000"], ["--batch", "got 5000"]),
    ([*COMPILE, "--batch", "two"], ["--batch", "'two' is not an integer"]),
    ([*TUNE, "--budget-s", "0"], ["--budget-s", "must be a finite number > 0"]),
    ([*TUNE, "--budget-s", "nan"], ["--budget-s", "got nan"]),
    ([*TUNE, "--budget-s", "-3"], ["--budget-s", "got -3"]),
    ([*TUNE, "--workers", "0"], ["--workers", "must be in 1..1024, got 0"]),
    ([*TUNE, "--replay", "/nonexistent/results.json"], ["--replay", "/nonexistent/results.json does not exist"]),
    ([*COMPILE, "--db", "mysql://u@h/db"], ["--db", "mysql://u@h/db", "'mysql' databases are not supported"]),
    ([*FIDELITY, "--query-sample", "-5"], ["--query-sample", "must be >= 0, got -5"]),
    ([*FIDELITY, "--seed", "-1"], ["--seed", "got -1"]),
    ([*FIDELITY, "--heads", "0"], ["--heads", "got 0"]),
    ([*FIDELITY, "--layers", "0,-2"], ["--layers", "integers >= 0"]),
    ([*FIDELITY, "--modes", "sparvar,bogus"], ["--modes", "unknown mode 'bogus'; known: "]),
    ([*CALIBRATE, "--trials", "0"], ["--trials", "must be in 1..100000, got 0"]),
    ([*CALIBRATE, "--max-verify", "0"], ["--max-verify", "must be >= 1"]),
    ([*CALIBRATE, "--min-mass", "1.5"], ["--min-mass", "<= 1"]),
    ([*CALIBRATE, "--topk-fractions", "0,0.2"], ["--topk-fractions", "fractions in (0, 1]"]),
    ([*CALIBRATE, "--blocks", "48"], ["--blocks", "'48' is not a block size"]),
    ([*CALIBRATE, "--storage", "mysql://u@h/db"], ["--storage", "'mysql' databases are not supported"]),
    ([*COMPILE, "-o", "."], ["-o/--output", "is the current directory or holds it"]),
    ([*COMPILE, "-o", "/"], ["-o/--output", "is the current directory or holds it"]),
])
def test_bad_flags_are_refused_while_parsing(argv, needles, capsys):
    parse_fails(capsys, argv, *needles)


def test_known_backends_are_the_code_generators():
    from sparvar_compiler.codegen.spec import BACKENDS

    assert KERNEL_BACKENDS == BACKENDS


def test_a_password_never_shows(capsys, monkeypatch):
    line = parse_fails(capsys, [*COMPILE, "--db", "mysql://u:hunter2@h/db"], "u:***@h")
    assert "hunter2" not in line
    line = parse_fails(capsys, [*COMPILE, "--db", "postgresql+psycopg://u:hunter2@h:port/db"], "not a database URL")
    assert "hunter2" not in line
    monkeypatch.setenv("SPARVAR_DB", "mysql://u:hunter2@h/db")
    line = fails(capsys, COMPILE, "$SPARVAR_DB=mysql://u:***@h/db", "'mysql' databases are not supported")
    assert "hunter2" not in line


# ---------------------------------------------------------------------------------------------- output paths
def test_output_paths_of_the_wrong_kind(tmp_path, capsys):
    a_file, a_dir = tmp_path / "afile", tmp_path / "adir"
    a_file.write_text("keep")
    a_dir.mkdir()
    parse_fails(capsys, [*FIDELITY, "-o", a_file], f"{a_file} is a file, not a directory")
    parse_fails(capsys, [*CALIBRATE, "-o", a_dir], f"{a_dir} is a directory: name a file")
    parse_fails(capsys, [*CALIBRATE, "--json", a_dir], f"{a_dir} is a directory")
    parse_fails(capsys, ["plan", "--model", "var-d16", "--export-layouts", a_file], f"{a_file} is a file")
    parse_fails(capsys, ["plan", "--model", "var-d16", "--plot", a_file], f"{a_file} is a file")
    parse_fails(capsys, ["inspect", a_dir, "--plot", a_dir], f"{a_dir} is a directory")
    parse_fails(capsys, [*TUNE[:-1], "bundle", "--bundle", a_file], f"{a_file} is a file")
    parse_fails(capsys, [*COMPILE, "-o", a_file], f"{a_file} is a file, not a directory")
    parse_fails(capsys, [*COMPILE, "-o", a_file / "m"], f"{a_file} is a file, so {a_file / 'm'} cannot be made")
    fails(capsys, ["db", "export", a_dir, "--db", tmp_path / "t.sqlite"], "db export", f"{a_dir} is a directory")
    fails(capsys, ["db", "import", a_dir, "--db", tmp_path / "t.sqlite"], f"db import: {a_dir} is not a file")
    assert a_file.read_text() == "keep" and not any(a_dir.iterdir())


def test_a_read_only_folder_is_named_before_any_work(tmp_path, capsys, monkeypatch):
    """As root a chmod does not stop writes, so the OS's answer is simulated: a folder that cannot be written
    (``os.access``: read-only mounts answer no even to root)."""
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(tmp_path) else real(p, mode, **k))
    parse_fails(capsys, [*COMPILE, "-o", tmp_path / "m"], f"the folder {tmp_path} is not writable")
    parse_fails(capsys, [*FIDELITY, "-o", tmp_path / "rep"], f"the folder {tmp_path} is not writable")
    parse_fails(capsys, [*CALIBRATE, "-o", tmp_path / "c.yaml"], f"the folder {tmp_path} is not writable")


@pytest.mark.parametrize("kind, code, words, where, needle", [
    (PermissionError, errno.EACCES, "Permission denied", "kernels", "OUT/kernels: Permission denied"),
    (OSError, errno.EROFS, "Read-only file system", "", "OUT: Read-only file system"),
    (OSError, errno.ENOSPC, "No space left on device", None, "No space left on device (writing -o OUT)"),
    (IsADirectoryError, errno.EISDIR, "Is a directory", "README.txt", "OUT/README.txt: Is a directory"),
])
def test_os_errors_while_writing_are_one_line_naming_the_path(kind, code, words, where, needle, tmp_path, capsys,
                                                             monkeypatch):
    """What the OS says while the module is written (simulated: a root test cannot make a folder read-only)."""
    import sparvar_compiler.emit.emitter as emitter

    out = tmp_path / "m"
    error = kind(code, words) if where is None else kind(code, words, str(out / where) if where else str(out))

    def emit_module(*a, **k):
        raise error

    monkeypatch.setattr(emitter, "emit_module", emit_module)
    monkeypatch.delenv("SPARVAR_DEBUG", raising=False)
    argv = [*COMPILE, "--block-sizes", "32", "--db", tmp_path / "none.sqlite", "-o", out]
    fails(capsys, argv, needle.replace("OUT", str(out)), "(set SPARVAR_DEBUG=1 for the traceback)")
    monkeypatch.setenv("SPARVAR_DEBUG", "1")
    with pytest.raises(kind):
        main([str(a) for a in argv])


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    """One small module, compiled in-process with no database."""
    d = tmp_path_factory.mktemp("hostile")
    assert main([*COMPILE, "--block-sizes", "32", "--db", str(d / "none.sqlite"), "-o", str(d / "m")]) == 0
    return d / "m"


def test_a_directory_that_is_not_a_module_is_kept_unless_forced(module, tmp_path, capsys):
    theirs = tmp_path / "x"
    (theirs / "sub").mkdir(parents=True)
    (theirs / "thesis.txt").write_text("thesis")
    argv = [*COMPILE, "--block-sizes", "32", "--db", tmp_path / "none.sqlite", "-o", theirs]
    fails(capsys, argv, str(theirs), "is not a sparvar module", "--force")
    assert (theirs / "thesis.txt").read_text() == "thesis" and (theirs / "sub").is_dir()
    assert main([str(a) for a in argv] + ["--force"]) == 0
    capsys.readouterr()
    assert not (theirs / "thesis.txt").exists()
    assert main(["verify", str(theirs)]) == 0


def test_a_compile_that_does_not_tune_only_reads_its_database(tmp_path, capsys):
    """--tune never (and no GPU here): the database is opened read-only and left as it was (SQLite may keep its
    WAL index files beside it while reading)."""
    from sparvar_compiler.db import TuningDatabase

    path = tmp_path / "fleet.sqlite"
    TuningDatabase.open(path).close()
    before = path.read_bytes()
    assert main([*COMPILE, "--block-sizes", "32", "--db", str(path), "-o", str(tmp_path / "m")]) == 0
    assert f"database: {path}" in capsys.readouterr().err
    assert path.read_bytes() == before
    wal = tmp_path / "fleet.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0


# ---------------------------------------------------------------------------------------------- verify
def test_verify_states_the_gpu_and_refuses_another(module, capsys):
    assert main(["verify", str(module)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {module}: infinity-2b built for h100 (sm_90, 132 SMs), ")
    assert main(["verify", str(module), "--gpu", "h100", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["target"], doc["arch"], doc["sm_count"]) == ("h100", "sm_90", 132)
    fails(capsys, ["verify", module, "--gpu", "a100"], "verify failed", "built for h100", "not a100", code=1)
    assert main(["verify", str(module), "--gpu", "a100", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False
    fails(capsys, ["verify", module, "--gpu", "v100"], "unknown GPU 'v100'")


# ---------------------------------------------------------------------------------------------- input files
@pytest.mark.parametrize("content, needles", [
    (b"\xff\xfe{}", ["not UTF-8 text"]),
    (b"{", ["not valid JSON"]),
    (b"[1, 2]", ["needs a 'records' list"]),
    (b'{"target": {"name": "h100"}, "records": [{"spec": 3}]}', ["record 0 needs 'spec', 'config'"]),
    (b'{"records": [{"spec": {"bogus": 1}, "config": {}, "measurement": {}}]}', ["'bogus'"]),
    (b"[" * 200_000 + b"]" * 200_000, ["nesting deeper than"]),
    (b'{"records": [], "n": ' + b"9" * 400 + b"}", ["a number of 400 digits"]),
    (b"\0" * 100, ["NUL"]),
])
def test_a_malformed_replay_file(content, needles, tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_bytes(content)
    fails(capsys, [*TUNE, "--replay", path, "--db", tmp_path / "t.sqlite"], f"--replay {path}", *needles)


@pytest.mark.parametrize("flag", ["--model", "--plan-config"])
@pytest.mark.parametrize("content, needle", [(b"name: \xff\xfe\n", "UTF-8"), (b"a: [1,\n", "YAML")])
def test_a_yaml_file_that_does_not_read(flag, content, needle, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    model = ["--model", path] if flag == "--model" else ["--model", "var-d16", "--plan-config", path]
    fails(capsys, ["plan", *model], str(path), needle)


def _export(tmp_path):
    from sparvar_compiler.db import TuningDatabase, export_json

    with TuningDatabase.open(tmp_path / "src.sqlite") as db:
        export_json(db, tmp_path / "export.json")
    return (tmp_path / "export.json").read_text()


@pytest.mark.parametrize("damage", ["digits", "depth"])
def test_an_import_with_a_huge_number_or_deep_nesting(damage, tmp_path, capsys):
    text = json.dumps(json.loads(_export(tmp_path)))
    bad = tmp_path / "bad.json"
    value = "9" * 400 if damage == "digits" else "[" * 200_000 + "]" * 200_000
    bad.write_text(text[:-1] + ', "n": ' + value + "}")
    fails(capsys, ["db", "import", bad, "--db", tmp_path / "t.sqlite"], str(bad))


@pytest.mark.parametrize("table", ["sparvar_trials", "sparvar_schema_version"])
def test_a_database_with_a_dropped_table(table, tmp_path, capsys):
    from sparvar_compiler.db import TuningDatabase

    path = tmp_path / "dropped.sqlite"
    TuningDatabase.open(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"DROP TABLE {table}")
    fails(capsys, ["db", "stats", "--db", path], str(path))
    fails(capsys, [*COMPILE, "--block-sizes", "32", "--db", path, "-o", tmp_path / "m"], str(path))
    assert not (tmp_path / "m").exists()


def test_a_postgresql_server_that_is_not_there(tmp_path, capsys):
    """A stopped server (nothing listens at the port): one line, the password masked. (A server stopped in the
    middle of an import or a compile: tests/test_db_postgres.py.)"""
    import socket

    pytest.importorskip("psycopg")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://fleet:hunter2@127.0.0.1:{port}/tuning"
    masked = f"postgresql+psycopg://fleet:***@127.0.0.1:{port}/tuning"
    for argv in (["db", "stats", "--db", url], [*COMPILE, "--block-sizes", "32", "--db", url, "-o", tmp_path / "m"],
                 ["db", "import", tmp_path / "none.json", "--db", url]):
        if argv[1] == "import":
            (tmp_path / "none.json").write_text(_export(tmp_path))
        line = fails(capsys, argv, masked, "Connection refused")
        assert "hunter2" not in line


def test_a_file_that_is_not_a_database(tmp_path, capsys):
    path = tmp_path / "garbage.sqlite"
    path.write_bytes(b"not a database" * 100)
    fails(capsys, ["db", "stats", "--db", path], str(path), "not a database")
    fails(capsys, ["db", "export", tmp_path / "out.json", "--db", path], str(path))


def _captures(tmp_path):
    from sparvar_compiler.fidelity.synthetic import SyntheticSource, write_synthetic_captures
    from sparvar_compiler.planner import get_model

    model = tmp_path / "tiny.yaml"
    model.write_text(TINY)
    caps = tmp_path / "caps"
    write_synthetic_captures(SyntheticSource(get_model(model), "mixed", heads=1), caps, layers=(0,))
    return model, caps


def test_captures_that_do_not_read(tmp_path, capsys):
    import zipfile

    model, caps = _captures(tmp_path)
    argv = ["fidelity", "--model", model, "--captures", caps, "--layers", "0", "--query-sample", "8",
            "-o", tmp_path / "rep"]
    victim = sorted(caps.glob("s08_*.npz"))[0]
    with zipfile.ZipFile(victim, "w") as z:  # an npz whose members are not .npy
        for name in ("q", "k", "v"):
            z.writestr(f"{name}.txt", "not an array")
    fails(capsys, argv, victim.name)
    victim.write_bytes(b"PK not a zip at all")
    fails(capsys, argv, victim.name)
    # safetensors with float offsets, in place of the npz the index names
    header = json.dumps({n: {"dtype": "F32", "shape": [1, 1, 1024, 32], "data_offsets": [0.5, 4.5]}
                         for n in "qkv"}).encode()
    st = victim.with_suffix(".safetensors")
    st.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    index = json.loads((caps / "captures.json").read_text())
    for e in index["entries"]:
        if e["file"] == victim.name:
            e["file"] = st.name
    (caps / "captures.json").write_text(json.dumps(index))
    victim.unlink()
    fails(capsys, argv, st.name)


# ---------------------------------------------------------------------------------------------- the boundary
def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("{")
    argv = [*TUNE, "--replay", str(path), "--db", str(tmp_path / "t.sqlite")]
    monkeypatch.setenv("SPARVAR_DEBUG", "1")
    with pytest.raises(SparvarError, match="not valid JSON"):
        main(argv)
    monkeypatch.setenv("SPARVAR_DEBUG", "0")
    assert main(argv) == 2


@pytest.mark.parametrize("error, needles", [
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), ["not UTF-8 text (invalid start byte"]),
    (json.JSONDecodeError("Expecting value", "x", 0), ["not valid JSON (Expecting value at line 1"]),
    (RecursionError("maximum recursion depth exceeded"), ["nested too deeply"]),
    (MemoryError(), ["too large to read into memory"]),
    (ValueError("cannot reshape array"), ["ValueError: cannot reshape array"]),
    (TypeError("'float' object cannot be interpreted as an integer"), ["TypeError: 'float' object"]),
    (KeyError("q"), ["KeyError: 'q'"]),
    (sqlite3.OperationalError("database is locked"), ["the tuning database ", "OperationalError: database is locked"]),
])
def test_what_escapes_a_verb_is_one_line_naming_the_input(error, needles, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SPARVAR_DEBUG", raising=False)
    config = tmp_path / "plan.yaml"
    config.write_text("{}\n")

    def plan_from_args(args):
        raise error

    monkeypatch.setattr(cli, "plan_from_args", plan_from_args)
    if not isinstance(error, sqlite3.Error):  # a database error names the database instead
        needles = [f"--plan-config {config}: ", *needles]
    fails(capsys, ["plan", "--model", "var-d16", "--plan-config", config], *needles,
          "(set SPARVAR_DEBUG=1 for the traceback)")


def test_sqlalchemy_errors_lose_the_sql_and_the_password(tmp_path, capsys, monkeypatch):
    from sqlalchemy.exc import OperationalError

    monkeypatch.delenv("SPARVAR_DEBUG", raising=False)
    monkeypatch.setenv("SPARVAR_DB", "postgresql+psycopg://fleet:hunter2@db.example/tuning")
    error = OperationalError("SELECT secret FROM x", {}, Exception("server closed the connection unexpectedly\n"
                                                                    "\tThis probably means the server terminated"))

    def stats(args):
        raise error

    monkeypatch.setattr(cli, "_cmd_db", stats)
    line = fails(capsys, ["db", "stats"], "the tuning database postgresql+psycopg://fleet:***@db.example/tuning",
                 "server closed the connection unexpectedly This probably means")
    assert "hunter2" not in line and "SELECT" not in line


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_cmd_models", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["models"])


def test_a_missing_module_that_is_not_ours(capsys, monkeypatch):
    monkeypatch.delenv("SPARVAR_DEBUG", raising=False)

    def missing(args):
        raise ModuleNotFoundError("No module named 'MySQLdb'", name="MySQLdb")

    monkeypatch.setattr(cli, "_cmd_models", missing)
    fails(capsys, ["models"], "needs the Python module MySQLdb, which is not installed", "SPARVAR_DEBUG=1")


def test_interrupted_is_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_models", interrupted)
    assert main(["models"]) == 130
    assert capsys.readouterr().err.strip() == "sparvar-compile: interrupted"


def test_library_checks_behind_the_flags(tmp_path):
    """The fidelity functions refuse what the flags refuse (they have other callers)."""
    from sparvar_compiler.fidelity.evaluate import EvalOptions

    from sparvar_compiler.fidelity.calibrate import calibrate

    with pytest.raises(SparvarError, match="query_sample must be an integer >= 0"):
        EvalOptions(query_sample=-5)
    assert EvalOptions(query_sample=np.int64(4)).query_sample == 4
    with pytest.raises(SparvarError, match="trials must be an integer >= 1, got 0"):
        calibrate(None, None, trials=0)  # it would report that no candidate met the floor, with none tried
    with pytest.raises(SparvarError, match="max_verify must be an integer >= 1"):
        calibrate(None, None, max_verify=0)
