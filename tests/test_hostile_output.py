"""Output paths, atomic emission, model names and module permissions (issue 15): every careless or hostile
output path as a regression. A compiler never deletes what it did not write: each case ends in one clear error
(exit 2 through the CLI) with the user's files untouched, or in a valid module and nothing else beside it."""

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from sparvar_compiler.cli import main
from sparvar_compiler.emit import emitter
from sparvar_compiler.emit import output as output_mod
from sparvar_compiler.emit.emitter import SkippedRecordWarning, choose_kernels, emit_module
from sparvar_compiler.emit.manifest import MANIFEST, verify_module
from sparvar_compiler.emit.moduleset import emit_module_set, verify_module_set
from sparvar_compiler.errors import ModelError, OutputPathError
from sparvar_compiler.planner import PlanConfig, get_gpu, get_model, make_plan
from sparvar_compiler.planner.models import model_from_mapping

PLAN = make_plan("var-d16", config=PlanConfig(cs4a="off"))
GPU = get_gpu("h100")
CLI_MODEL = ["--model", "infinity-2b", "--resolution", "256", "--cs4a", "off", "--block-sizes", "32", "--gpu", "h100"]
ROOT = os.geteuid() == 0


def emit(out, **kw):
    return emit_module(PLAN, GPU, out, block_sizes=(32,), progress=lambda s: None, **kw)


def run_cli(argv):
    """``main(argv)``'s exit status, whether the CLI returns it or argparse exits while parsing a flag."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def compile_cli(tmp_path, *args):
    """The main job through the CLI (exit status), with a private database."""
    return run_cli([*CLI_MODEL, "--db", str(tmp_path / "tuning.sqlite"), *args])


def one_line_error(capsys) -> str:
    """The CLI's error: one line on stderr (the CLI may refuse a path while parsing -o, or the emitter after)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def siblings(path: Path) -> list[str]:
    """Everything beside ``path`` that an emit could have left (hidden entries named after it)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def dead_pid() -> int:
    """The PID of a process that has exited (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------ refusals
def test_issue_reproduction_keeps_the_users_directory(tmp_path, monkeypatch, capsys):
    """The issue's reproduction: ``-o x`` where x holds a thesis exits 2, names --force, and deletes nothing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x" / "sub").mkdir(parents=True)
    (tmp_path / "x" / "thesis.txt").write_text("thesis\n")
    before = snapshot(tmp_path / "x")
    assert compile_cli(tmp_path, "-o", "x") == 2
    err = one_line_error(capsys)
    assert "not a sparvar module" in err and "--force" in err
    assert snapshot(tmp_path / "x") == before and siblings(tmp_path / "x") == []


def test_existing_file_is_refused_even_with_force(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    for force in (False, True):
        with pytest.raises(OutputPathError, match="is not a directory; it is never replaced"):
            emit(target, force=force)
    assert compile_cli(tmp_path, "-o", str(target)) == 2
    assert "not a directory" in one_line_error(capsys)
    assert target.read_text() == "mine\n" and siblings(target) == []


def test_read_only_directory_is_refused(tmp_path, capsys):
    """A read-only directory that is not a module is left as it is (it used to be swapped out and hidden)."""
    target = tmp_path / "ro"
    target.mkdir()
    (target / "data.bin").write_bytes(b"\x00\x01")
    target.chmod(0o555)
    try:
        assert compile_cli(tmp_path, "-o", str(target)) == 2
        assert "not a sparvar module" in one_line_error(capsys)
        assert stat.S_IMODE(target.stat().st_mode) == 0o555
        assert (target / "data.bin").read_bytes() == b"\x00\x01" and siblings(target) == []
    finally:
        target.chmod(0o755)


def test_unwritable_parent_is_one_line(tmp_path, monkeypatch, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    if ROOT:  # root writes anywhere: make the permission check answer as it would for a user
        real = os.access
        monkeypatch.setattr(output_mod.os, "access", lambda p, mode, **kw: False if Path(p) == parent
                            else real(p, mode, **kw))
    try:
        with pytest.raises(OutputPathError, match=f"cannot write in {parent} \\(permission denied\\)"):
            emit(parent / "module")
        assert compile_cli(tmp_path, "-o", str(parent / "module")) == 2
        assert "permission denied" in one_line_error(capsys)
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_symlink_is_refused_and_its_target_untouched(tmp_path, capsys):
    real = tmp_path / "real"
    emit(real)
    before = snapshot(real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    for force in (False, True):
        with pytest.raises(OutputPathError, match="is a symbolic link"):
            emit(link, force=force)
    assert compile_cli(tmp_path, "-o", str(link)) == 2
    assert "link" in one_line_error(capsys)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputPathError, match="is a symbolic link"):
        emit(dangling)
    assert link.is_symlink() and snapshot(real) == before and not (tmp_path / "nowhere").exists()


def test_current_directory_and_its_parents_are_refused(tmp_path, monkeypatch, capsys):
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("keep\n")
    monkeypatch.chdir(work)
    assert compile_cli(tmp_path, "-o", ".") == 2
    assert "current directory" in one_line_error(capsys)
    for path in (".", "..", "/", "x/..", "x/../..", "", str(work), str(work.parent), "../../a", "../work"):
        with pytest.raises(OutputPathError) as e:
            output_mod.check_output(path, force=True)
        assert "\n" not in str(e.value)
    assert (work / "keep.txt").read_text() == "keep\n"


def test_module_holding_a_users_file_is_not_replaced(tmp_path):
    target = tmp_path / "m"
    emit(target)
    (target / "kernels" / "my-notes.txt").write_text("notes\n")
    with pytest.raises(OutputPathError, match="also holds kernels/my-notes.txt"):
        emit(target)
    assert (target / "kernels" / "my-notes.txt").is_file()
    emit(target, force=True)
    assert not (target / "kernels" / "my-notes.txt").exists() and verify_module(target)


def test_non_module_manifest_is_not_a_module(tmp_path):
    """A directory is a module because its manifest says so, not because it has a manifest.json."""
    target = tmp_path / "d"
    target.mkdir()
    for text in ('{"format": "something-else"}', "[1, 2]", "not json", "[" * 100_000):
        (target / MANIFEST).write_text(text)
        with pytest.raises(OutputPathError, match="is not a sparvar module"):
            emit(target)
    assert (target / MANIFEST).read_text() == "[" * 100_000


# ------------------------------------------------------------------------------------------------ replacing
def test_force_replaces_a_directory_that_is_not_a_module(tmp_path):
    target = tmp_path / "x"
    (target / "sub").mkdir(parents=True)
    (target / "thesis.txt").write_text("thesis\n")
    emit(target, force=True)
    assert verify_module(target)["model"]["name"] == "var-d16"
    assert not (target / "thesis.txt").exists() and siblings(target) == []


def test_cli_force_replaces_a_directory(tmp_path, capsys):
    target = tmp_path / "x"
    target.mkdir()
    (target / "thesis.txt").write_text("thesis\n")
    assert compile_cli(tmp_path, "-o", str(target), "--force") == 0
    assert verify_module(target) and not (target / "thesis.txt").exists() and siblings(target) == []


def test_replacing_a_module_leaves_one_module_and_no_sibling(tmp_path):
    target = tmp_path / "m"
    emit(target)
    first = target.stat().st_ino
    lines = []
    emit_module(PLAN, GPU, target, block_sizes=(32,), progress=lines.append)
    assert target.stat().st_ino != first and verify_module(target)
    assert any("replaced the module that was at" in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_two_rename_fallback_replaces_too(tmp_path, monkeypatch):
    """Where renameat2 is missing the old output is renamed aside, then removed: same result."""
    monkeypatch.setattr(output_mod, "_renameat2", lambda src, dst, flags: False)
    target = tmp_path / "m"
    emit(target)
    emit(target)
    assert verify_module(target) and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_the_path_always_holds_a_module_while_it_is_replaced(tmp_path):
    """RENAME_EXCHANGE: a reader polling the path never finds it missing while modules replace each other."""
    if output_mod._renameat2_function() is None:
        pytest.skip("no renameat2 here: the two-rename fallback has a window by design")
    target = tmp_path / "m"
    emit(target)
    stop, gaps = threading.Event(), []

    def poll():
        while not stop.is_set():
            if not os.path.exists(target / MANIFEST):
                gaps.append(time.monotonic())

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for _ in range(5):
            emit(target)
    finally:
        stop.set()
        reader.join()
    assert gaps == [] and verify_module(target)


def test_failed_emit_leaves_the_old_module_and_nothing_else(tmp_path, monkeypatch):
    target = tmp_path / "m"
    emit(target)
    before = snapshot(target)

    def broken(*a, **k):
        raise RuntimeError("compiler crashed")

    monkeypatch.setattr(emitter, "choose_cs4a_kernels", broken)
    with pytest.raises(RuntimeError, match="compiler crashed"):
        emit(target)
    assert snapshot(target) == before and siblings(target) == []


def test_module_set_follows_the_same_rules(tmp_path):
    model = get_model("var-d16")
    target = tmp_path / "set"
    target.mkdir()
    (target / "thesis.txt").write_text("thesis\n")
    with pytest.raises(OutputPathError, match="is not a sparvar module"):
        emit_module_set(model, 256, ["1:1"], GPU, target, config=PlanConfig(cs4a="off"), block_sizes=(32,),
                        progress=lambda s: None)
    assert (target / "thesis.txt").is_file() and siblings(target) == []
    (target / "thesis.txt").unlink()
    target.rmdir()
    emit(target)  # a module, replaced by a set, replaced by a set, replaced by a module
    for _ in range(2):
        emit_module_set(model, 256, ["1:1"], GPU, target, config=PlanConfig(cs4a="off"), block_sizes=(32,),
                        progress=lambda s: None)
        assert verify_module_set(target)["members"][0]["name"] == "256-1x1"
        assert stat.S_IMODE(target.stat().st_mode) & 0o055 == 0o055 and siblings(target) == []
    emit(target)
    assert verify_module(target) and sorted(p.name for p in tmp_path.iterdir()) == ["set"]


# ------------------------------------------------------------------------------------------------ stale siblings
def test_stale_siblings_of_dead_emits_are_cleaned_and_nothing_else(tmp_path):
    target = tmp_path / "m"
    pid, host = dead_pid(), output_mod._HOST_TAG
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    stale = [tmp_path / f".m.tmp-{pid}-{host}-abcd1234", tmp_path / f".m.old-{pid}-{host}-0f0f0f0f",
             tmp_path / f".m.old-{pid}"]  # the last as earlier versions named it
    for d in stale:
        (d / "kernels").mkdir(parents=True)
        (d / "kernels" / "k.cubin").write_bytes(b"half")
    keep = [tmp_path / f".m.tmp-{os.getpid()}-{host}-live0000",  # a live emit's staging directory
            tmp_path / f".m.tmp-{pid}-{other_host}-abcd1234",    # another host's: its PID means nothing here
            tmp_path / f".other.tmp-{pid}-{host}-abcd1234",      # another output's
            tmp_path / ".m.notes",                               # the user's
            tmp_path / f".m.tmp-{pid}-abcd1234"]                 # not a name sparvar makes
    for d in keep:
        d.mkdir()
    (tmp_path / f".m.tmp-{pid}-{host}-file0000").write_text("a file, not ours\n")
    emit(target)
    assert verify_module(target) and not any(d.exists() for d in stale)
    assert all(d.is_dir() for d in keep) and (tmp_path / f".m.tmp-{pid}-{host}-file0000").is_file()


def test_killed_emit_is_cleaned_by_the_next(tmp_path):
    """SIGKILL an emit after its staging directory exists; the next emit to the path removes it."""
    target = tmp_path / "m"
    script = textwrap.dedent(f"""
        import os, signal
        from sparvar_compiler.emit import emitter
        from sparvar_compiler.planner import PlanConfig, get_gpu, make_plan
        def die(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        emitter.choose_cs4a_kernels = die
        emitter.emit_module(make_plan("var-d16", config=PlanConfig(cs4a="off")), get_gpu("h100"), {str(target)!r},
                            block_sizes=(32,), progress=lambda s: None)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = siblings(target)
    assert len(left) == 1 and left[0].startswith(".m.tmp-") and not target.exists()
    emit(target)
    assert verify_module(target) and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ------------------------------------------------------------------------------------------------ concurrency
def test_lock_waits_then_times_out_with_a_clear_error(tmp_path):
    target = tmp_path / "m"
    with output_mod.output_lock(target):
        t0 = time.monotonic()
        with pytest.raises(OutputPathError, match=r"waited 0 s for .*\.m\.lock: another sparvar-compile"):
            with output_mod.output_lock(target, timeout=0.3):
                pass
        assert time.monotonic() - t0 >= 0.3
    assert not (tmp_path / ".m.lock").exists()  # removed on release
    with output_mod.output_lock(target, timeout=0.3):  # and free again
        pass


def test_two_threads_emitting_to_one_path(tmp_path, monkeypatch):
    """Both reach the swap together (a barrier before the lock): both finish, one valid module remains."""
    target = tmp_path / "m"
    barrier = threading.Barrier(2, timeout=60)
    real_fix = output_mod.fix_modes
    monkeypatch.setattr(output_mod, "fix_modes", lambda root: (barrier.wait(), real_fix(root)))
    errors = []

    def one():
        try:
            emit(target)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert verify_module(target) and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_two_processes_emitting_to_one_path(tmp_path):
    target = tmp_path / "m"
    script = textwrap.dedent(f"""
        from sparvar_compiler.emit.emitter import emit_module
        from sparvar_compiler.planner import PlanConfig, get_gpu, make_plan
        plan, gpu = make_plan("var-d16", config=PlanConfig(cs4a="off")), get_gpu("h100")
        for _ in range(4):
            emit_module(plan, gpu, {str(target)!r}, block_sizes=(32,), progress=lambda s: None)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    assert verify_module(target) and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ------------------------------------------------------------------------------------------------ permissions
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_modes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        target = tmp_path / "m"
        emit(target)
    finally:
        os.umask(old)
    for p in [target, *target.rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, p


# ------------------------------------------------------------------------------------------------ model names
@pytest.mark.parametrize("name", ["../evil", "../../tmp/x", "a/b", "/abs", ".", "..", "a b", "x" * 129, "é", "a\\b",
                                  "", 7, None])
def test_model_names_are_restricted(name):
    data = {"name": name, "depth": 2, "heads": 2, "head_dim": 64, "schedules": [{"resolution": 256,
                                                                                  "scales": "1,2,4"}]}
    with pytest.raises(ModelError, match="m.yaml: field 'name'"):
        model_from_mapping(data, "m.yaml")


def test_dotted_model_name_with_a_path_is_refused_by_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "evil.yaml"
    model.write_text("name: ../escaped\ndepth: 2\nheads: 2\nhead_dim: 64\n"
                     "schedules:\n  - {resolution: 256, scales: '1,2,4'}\n")
    assert run_cli(["--model", str(model), "--gpu", "h100", "--cs4a", "off", "--block-sizes", "32",
                 "--db", str(tmp_path / "tuning.sqlite")]) == 2
    assert "field 'name'" in one_line_error(capsys)
    assert not any(p.name.startswith("escaped") for p in tmp_path.rglob("*"))
    ok = model_from_mapping({"name": "my-var_1.0", "depth": 2, "heads": 2, "head_dim": 64,
                             "schedules": [{"resolution": 256, "scales": "1,2,4"}]}, "ok.yaml")
    assert ok.name == "my-var_1.0"


# ------------------------------------------------------------------------------------------------ kernel choice
class _FakeDb:
    """A database whose records for every workload are ``records`` (best first), as an import could leave them."""

    def __init__(self, records):
        self.records = records

    def winners(self, workload, target, environment=None):
        return iter(self.records)

    def winner(self, workload, target, environment=None):
        return self.records[0] if self.records else None


def _record(id_, config, ms):
    return SimpleNamespace(id=id_, config=config, median_ms=ms, valid=True)


def test_invalid_winner_is_skipped_for_the_next_valid_record(tmp_path):
    plan = PLAN
    good = {"num_warps": 4, "num_stages": 2, "block_m": 32, "block_n": 32, "order": "q_major"}
    bad = [_record(1, {**good, "order": "sideways"}, 0.001), _record(2, {**good, "bogus_key": 1}, 0.002),
           _record(3, {**good, "block_m": 48}, 0.003)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choices = choose_kernels(plan, GPU, _FakeDb([*bad, _record(4, good, 0.05)]), block_sizes=(32,))
    skipped = [str(w.message) for w in caught if issubclass(w.category, SkippedRecordWarning)]
    assert len(skipped) == 3 * len(choices)
    for problem in ("order must be one of", "unknown Triton config keys", "block_m must be one of"):
        assert any(problem in m for m in skipped), problem
    assert all(c.tuned and c.source == "database trial 4" and c.config.get("order") == "q_major" for c in choices)
    with pytest.warns(SkippedRecordWarning):
        choices = choose_kernels(plan, GPU, _FakeDb(bad), block_sizes=(32,))
    assert all(not c.tuned and c.source == "default config (untuned)" for c in choices)


def test_invalid_cs4a_winner_falls_back_to_the_default(tmp_path):
    from sparvar_compiler.emit.cs4a import choose_cs4a_kernels

    plan = make_plan("var-d16")
    bad = [_record(9, {"num_warps": 3, "num_stages": 2, "block_m": 64, "block_n": 64, "order": "q_major"}, 0.01)]
    with pytest.warns(SkippedRecordWarning, match="tuning record 9 .* num_warps must be one of"):
        choices = choose_cs4a_kernels(plan, GPU, _FakeDb(bad), 2, "bf16", "default")
    assert choices and all(not c.tuned for c in choices)


def test_emit_with_an_invalid_record_still_emits(tmp_path):
    good = {"num_warps": 4, "num_stages": 2, "block_m": 32, "block_n": 32, "order": "q_major"}
    db = _FakeDb([_record(1, {**good, "order": "sideways"}, 0.001), _record(2, good, 0.05)])
    with pytest.warns(SkippedRecordWarning):
        manifest = emit_module(PLAN, GPU, tmp_path / "m", db=db, block_sizes=(32,), progress=lambda s: None)
    assert all(k["source"] == "database trial 2" for k in manifest["kernels"].values())
    assert json.loads((tmp_path / "m" / MANIFEST).read_text())["tuned"] is True
