"""The command line: plan views, exports in FlexAttention/BSR form, ``--json`` on every verb (stdout holds one
JSON document, progress goes to stderr), exit codes (1: a bad module, 2: usage or input), ``SPARVAR_DB``,
``doctor``."""

import io
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sparvar_compiler.cli import main
from sparvar_compiler.planner import PlanConfig, csla_layout, make_plan

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--model", "infinity-2b", "--resolution", "256", "--cs4a", "off"]  # 3 small CSLA kernels


def run_cli(*argv, env=None, check=True):
    """``python -m sparvar_compiler ARGV`` in a child process: its real stdout and stderr, file descriptors
    included (what a kernel compile in a grandchild writes shows up here too)."""
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            **(env or {})}
    full = {k: v for k, v in full.items() if v is not None}
    proc = subprocess.run([sys.executable, "-m", "sparvar_compiler", *map(str, argv)], capture_output=True,
                          text=True, env=full, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def one_json(text):
    """stdout must be exactly one JSON document (strict: no NaN)."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


# ---------------------------------------------------------------------------------------------- plan
def test_plan_json(capsys):
    assert main(["plan", "--model", "infinity-8b", "--json", "--block-m", "64", "--block-n", "64"]) == 0
    captured = capsys.readouterr()
    out = one_json(captured.out)
    assert captured.err == ""
    scales = out["scales"]
    assert [s["kv_len"] for s in scales][-1] == 10521
    for s in scales:
        assert {"index", "h", "w", "tokens", "kv_len"} <= set(s)
    lay = scales[12]["layout"]
    assert (lay["block_m"], lay["block_n"], lay["q_blocks"], lay["kv_blocks"]) == (64, 64, 64, 165)
    assert round(100 * lay["sparsity"], 1) == 87.9
    assert "layout" not in scales[9]


def test_plan_table_exports_and_plots(tmp_path, capsys):
    args = ["plan", "--model", "infinity-2b", "--aspect", "4:3", "--export-layouts", str(tmp_path / "npy"),
            "--plot", str(tmp_path / "png")]
    assert main(args) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "decision 0-8, csla 9-31" in text and "image self-attention" in text
    assert "wrote" not in text and f"wrote {tmp_path / 'png' / 'scale12.png'}" in captured.err
    plan = make_plan("infinity-2b", 1024, "4:3")
    for s in (10, 11, 12):
        arr = np.load(tmp_path / "npy" / f"scale{s}.npy", allow_pickle=False)
        assert arr.dtype == bool and np.array_equal(arr, csla_layout(plan, s, 128, 128).active())
        for fmt in ("blockmask", "bsr"):
            assert (tmp_path / "npy" / f"scale{s}.{fmt}.npz").is_file()
        assert (tmp_path / "png" / f"scale{s}.png").stat().st_size > 1000
    assert not (tmp_path / "npy" / "scale9.npy").exists()
    readme = (tmp_path / "npy" / "README.txt").read_text()
    assert "BlockMask.from_kv_blocks" in readme and "BlockSparseAttentionWrapper" in readme


def test_plot_at_the_module_block_unless_flags_say_otherwise(tmp_path, monkeypatch, capsys):
    """``plan --plot`` draws at the emitter's default block (what an untuned module uses), with the key-scale
    boundaries once the planner provides them; explicit --block-m/--block-n win."""
    from sparvar_compiler.emit.emitter import DEFAULT_BLOCK
    from sparvar_compiler.planner.csla import key_scale_spans
    from sparvar_compiler.planner.layout import BlockLayout

    calls = []
    monkeypatch.setattr(BlockLayout, "plot", lambda self, path, title=None, **kw: calls.append(
        (self.block_m, self.block_n, title, kw)) or Path(path))
    assert main(["plan", "--model", "infinity-8b", "--plot", str(tmp_path)]) == 0
    assert [(bm, bn) for bm, bn, _, _ in calls] == [(DEFAULT_BLOCK, DEFAULT_BLOCK)] * 3
    assert "query scale 12 (64x64, 4096 tokens) x 10521 keys" in calls[-1][2]
    assert calls[-1][3]["key_scales"] == key_scale_spans(make_plan("infinity-8b"), 12)
    calls.clear()
    assert main(["plan", "--model", "infinity-8b", "--plot", str(tmp_path), "--block-m", "128",
                 "--block-n", "32"]) == 0
    assert [(bm, bn) for bm, bn, _, _ in calls] == [(128, 32)] * 3


@pytest.mark.parametrize("token_exact", [False, True])
def test_exported_layouts_round_trip_through_flex_and_bsr(tmp_path, token_exact, capsys):
    """The exported BlockMask tensors and BSR arrays, loaded as the README says, convert back
    (``interop.from_block_mask`` / ``from_bsr``) to the plan's layout: block level (active blocks whole) by
    default, exactly (token masks included) for a token-exact plan."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    from sparvar_compiler.codegen.interop import BsrLayout, from_block_mask, from_bsr
    from sparvar_compiler.planner.layout import BlockLayout

    out = tmp_path / "exp"
    argv = ["plan", *SMALL, "--block-m", "16", "--block-n", "32", "--export-layouts", str(out)]
    assert main(argv + (["--token-exact"] if token_exact else [])) == 0
    plan = make_plan("infinity-2b", 256, config=PlanConfig(cs4a="off", token_exact=token_exact))
    scales = [s.index for s in plan.scales if s.has_csla]
    assert scales and sorted(p.name for p in out.iterdir()) == sorted(
        ["README.txt"] + [f"scale{i}.{ext}" for i in scales for ext in ("npy", "blockmask.npz", "bsr.npz")])
    for i in scales:
        layout = csla_layout(plan, i, 16, 32)
        want = layout if token_exact else BlockLayout.from_block_mask(layout.active(), layout.q_len,
                                                                      layout.kv_len, 16, 32)
        with np.load(out / f"scale{i}.blockmask.npz", allow_pickle=False) as z:
            t = {k: torch.from_numpy(z[k]) for k in z.files}
        bm, bn = t["BLOCK_SIZE"].tolist()
        active = t["active"]
        mask_mod = ((lambda b, h, q, kv: t["token_mask"][q, kv]) if token_exact
                    else (lambda b, h, q, kv: active[q // bm, kv // bn]))
        mask = BlockMask.from_kv_blocks(t["kv_num_blocks"], t["kv_indices"], t["full_kv_num_blocks"],
                                        t["full_kv_indices"], BLOCK_SIZE=(bm, bn),
                                        seq_lengths=tuple(t["seq_lengths"].tolist()), mask_mod=mask_mod)
        assert from_block_mask(mask, token_masks=token_exact).content_hash() == want.content_hash()
        with np.load(out / f"scale{i}.bsr.npz", allow_pickle=False) as b:
            assert ("mask" in b.files) == token_exact
            bsr = BsrLayout(b["indptr"], b["indices"], int(b["M"]), int(b["N"]), int(b["R"]), int(b["C"]),
                            b["mask"] if token_exact else None)
            assert tuple(b["shape"]) == (layout.q_len, layout.kv_len) and tuple(b["block_shape"]) == (16, 32)
        assert from_bsr(bsr).content_hash() == want.content_hash()


def test_windows_flag_shorthand(capsys):
    assert main(["plan", "--model", "infinity-8b", "--json", "--windows=-1x8,1,1,3,5,9"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["windows"][-1] == 9


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv, message", [
    (["--model", "nope", "--gpu", "h100"], "unknown model 'nope'"),
    (["--model", "infinity-8b", "--gpu", "v100"], "unknown GPU 'v100'; known GPUs: h100"),
    (["plan", "--model", "infinity-8b", "--aspect", "16:9"], "unknown aspect ratio '16:9'"),
    (["plan", "--model", "infinity-8b", "--windows=1,1,3"], "windows has 3 entries"),
    (["plan", "--model", "infinity-8b", "--decision-scale", "13"], "decision_scale 13 is out of range"),
    (["plan", "--model", "infinity-8b", "--block-m", "96"], "--block-m must be a power of two"),
    (["plan", "--model", "infinity-8b", "--plan-config", "/nonexistent.yaml"], "does not exist"),
    (["verify", "/nonexistent/module"], "does not exist"),
    (["tune", "--model", "var-d16", "--gpu", "h100", "--runner", "replay"], "--runner replay needs --replay"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert captured.out == ""


@pytest.mark.parametrize("argv", [["verify"], ["models", "--bogus"], ["db", "frobnicate"], ["plan"]])
def test_usage_errors_exit_2(argv, capsys):
    """argparse's errors too are one line (saying where the usage is), returned as 2."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("sparvar-compile") and ": error: " in captured.err
    assert "--help' shows the usage" in captured.err


def test_help_and_version_return_0(capsys):
    assert main(["--version"]) == 0 and "sparvar-compiler" in capsys.readouterr().out
    assert main(["compile", "--help"]) == 0 and "--force" in capsys.readouterr().out


def test_no_command_prints_help_to_stderr_and_exits_2(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "exit status" in captured.err and "SPARVAR_DB" in captured.err


def test_help_documents_exit_codes_and_environment():
    from sparvar_compiler.cli import build_parser

    text = build_parser().format_help()
    for needle in ("exit status", "1    a check failed", "2    usage, input or environment error", "SPARVAR_DB",
                   "SPARVAR_DEBUG", "--json"):
        assert needle in text


def test_console_entry_point_no_traceback():
    proc = run_cli("--model", "infinity-9b", "--gpu", "h100", check=False)
    assert proc.returncode == 2
    assert "unknown model 'infinity-9b'" in proc.stderr and "Traceback" not in proc.stderr and proc.stdout == ""


def test_missing_optional_dependency_names_the_extra(monkeypatch, capsys):
    """An optional package missing (here: matplotlib for --plot) is an input error naming the extra."""
    import sparvar_compiler.cli as cli

    def no_matplotlib(*a, **k):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(cli, "_plot_layouts", no_matplotlib)
    assert main(["plan", "--model", "infinity-8b", "--plot", "/tmp/unused"]) == 2
    assert "pip install 'sparvar-compiler[plot]'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- listings, doctor
@pytest.mark.parametrize("verb, key, name", [("models", "models", "infinity-8b"), ("gpus", "gpus", "h100")])
def test_listings_json(verb, key, name, capsys):
    assert main([verb, "--json"]) == 0
    captured = capsys.readouterr()
    doc = one_json(captured.out)
    assert list(doc) == [key] and name in [r["name"] for r in doc[key]] and captured.err == ""
    assert main([verb]) == 0 and name in capsys.readouterr().out


def test_doctor_json_and_text_mask_the_password(monkeypatch, capsys):
    monkeypatch.setenv("SPARVAR_DB", "postgresql+psycopg://me:s3cret@db.example/tuning")
    assert main(["doctor", "--json"]) == 0
    captured = capsys.readouterr()
    doc = one_json(captured.out)
    assert {"python", "packages", "gpu", "driver", "tools", "databases", "triton_cache", "features"} <= set(doc)
    assert set(doc["features"]) == {"compile", "tune", "tvm", "postgres", "plots", "runtime"}
    assert doc["packages"]["torch"] and doc["packages"]["numpy"] and "tvm" in doc["packages"]
    assert doc["features"]["compile"]["ok"] and doc["features"]["runtime"]["ok"]
    assert doc["features"]["tune"]["ok"] == (doc["gpu"]["cuda_available"] and doc["gpu"]["registered"] is not None)
    assert doc["databases"]["sparvar_db"] == "postgresql+psycopg://me:***@db.example/tuning"
    assert {"nvcc", "cuobjdump", "ptxas"} <= set(doc["tools"])
    assert "s3cret" not in captured.out + captured.err
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "features" in text and "compile   ok" in text and "s3cret" not in text


def test_doctor_names_the_extra_of_a_missing_package(monkeypatch, capsys):
    import sparvar_compiler.cli as cli

    real = cli._dist_version
    monkeypatch.setattr(cli, "_dist_version", lambda names: None if "matplotlib" in names else real(names))
    assert main(["doctor", "--json"]) == 0  # missing features are reported, not failures
    plots = one_json(capsys.readouterr().out)["features"]["plots"]
    assert not plots["ok"] and plots["missing"] == ["matplotlib"]
    assert plots["install"] == "pip install 'sparvar-compiler[plot]'"
    monkeypatch.setattr(cli, "_dist_version", lambda names: None if "sqlalchemy" in names else real(names))
    assert main(["doctor", "--json"]) == 0
    compile_ = one_json(capsys.readouterr().out)["features"]["compile"]
    assert not compile_["ok"] and compile_["install"] == "pip install sqlalchemy"


def test_mask_url():
    from sparvar_compiler.cli_args import mask_url

    assert mask_url("postgresql+psycopg://u:p%40ss@h:5432/db") == "postgresql+psycopg://u:***@h:5432/db"
    assert mask_url("sqlite:////tmp/t.sqlite") == "sqlite:////tmp/t.sqlite"
    assert mask_url("/tmp/t.sqlite") == "/tmp/t.sqlite" and mask_url(None) is None


# ---------------------------------------------------------------------------------------------- progress
def test_progress_plain_lines_off_a_terminal_and_a_bar_on_one():
    from sparvar_compiler.cli import Progress

    lines = ["[1/2] compiling scale11_triton_block_64x64 for h100", "[2/2] compiling scale12_triton_block_64x64",
             "[cs4a] compiling cs4a_stats_scale10", "tuning scale 12 triton 64x64 (4096 x 10521)",
             "  [triton/block 4096x10521 64x64] trial 1/3: 0.4 ms; best 0.4 ms; eta 2s",
             "  [triton/block 4096x10521 64x64] trial 3/3: 0.3 ms; best 0.3 ms; eta 0s"]
    plain = io.StringIO()
    with Progress(plain, tty=False) as progress:
        assert not progress.bar
        for line in lines:
            progress(line)
    assert plain.getvalue() == "".join(f"{line}\n" for line in lines)
    tty = io.StringIO()
    with Progress(tty, tty=True) as progress:
        assert progress.bar
        for line in lines:
            progress(line)
    text = tty.getvalue()
    assert "2/2" in text and "3/3" in text and "\r" in text  # tqdm bars
    assert "[cs4a] compiling cs4a_stats_scale10\n" in text and "tuning scale 12" in text  # above the bar


# ---------------------------------------------------------------------------------------------- compile, modules
@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One small compile in a child process, its database given through SPARVAR_DB only: (directory, database,
    process)."""
    d = tmp_path_factory.mktemp("compiled")
    db = d / "fleet.sqlite"
    proc = run_cli("compile", *SMALL, "--gpu", "h100", "--tune", "never", "-o", d / "m", "--json",
                   env={"SPARVAR_DB": str(db)})
    return d, db, proc


def test_compile_json_with_progress_on_stderr_and_sparvar_db(compiled):
    d, db, proc = compiled
    doc = one_json(proc.stdout)  # nothing else on stdout, the kernel compiles' child processes included
    assert {"module", "target", "gpu_present", "database", "tuning", "kernels", "cs4a", "dispatch", "tuned",
            "cs4a_tuned", "expected_ms", "plan"} <= set(doc)
    assert doc["module"] == str(d / "m") and doc["target"]["name"] == "h100" and doc["tuning"] is None
    # SPARVAR_DB (no --db), over the shipped database; no tuning here, so it is only read: the missing file is
    # named and left uncreated.
    assert doc["database"][0] == f"{db} (not there: no winners)" and not db.exists()
    assert [k["scale"] for k in doc["kernels"]] == [4, 5, 6] and doc["cs4a"] is None
    k = doc["kernels"][0]
    assert (k["backend"], k["kind"], k["tuned"], k["expected_ms"]) == ("triton", "block", False, None)
    assert k["calls_per_image"] == 32 - doc["plan"]["config"]["bound_layer"]
    assert doc["tuned"] is False and doc["expected_ms"] == {"kernels_per_image": None, "complete": False}
    assert doc["dispatch"]["kernel"] == 3 * k["calls_per_image"]
    assert "[1/3] compiling scale4_triton_block" in proc.stderr and "target: h100" in proc.stderr
    assert f"database: {db} (not there: no winners) over " in proc.stderr


def test_inspect_and_verify_json(compiled, tmp_path, capsys):
    module = compiled[0] / "m"
    png = tmp_path / "dispatch.png"
    assert main(["inspect", str(module), "--json", "--plot", str(png)]) == 0
    captured = capsys.readouterr()
    doc = one_json(captured.out)
    assert doc["model"]["name"] == "infinity-2b" and doc["target"]["name"] == "h100"
    assert [k["name"] for k in doc["kernels"]] == [f"scale{i}_triton_block_64x64" for i in (4, 5, 6)]
    assert doc["plot"] == str(png) and png.stat().st_size > 1000 and f"wrote {png}" in captured.err
    assert main(["inspect", str(module)]) == 0
    assert "UNTUNED" in capsys.readouterr().out
    assert main(["verify", str(module), "--json", "--gpu", "h100"]) == 0
    doc = one_json(capsys.readouterr().out)
    assert doc["ok"] is True and doc["kernels"] == 3 and doc["target"] == "h100"
    assert main(["verify", str(module)]) == 0 and capsys.readouterr().out.startswith("ok: ")


def test_verify_of_a_tampered_module_exits_1(compiled, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(compiled[0] / "m", d)
    binary = sorted((d / "kernels").iterdir())[0]
    blob = bytearray(binary.read_bytes())
    blob[len(blob) // 2] ^= 1
    binary.write_bytes(bytes(blob))
    assert main(["verify", str(d)]) == 1
    captured = capsys.readouterr()
    assert "was modified" in captured.err and captured.out == ""
    assert main(["verify", str(d), "--json"]) == 1
    doc = one_json(capsys.readouterr().out)
    assert doc["ok"] is False and "was modified" in doc["error"]
    assert main(["verify", str(compiled[0] / "m"), "--gpu", "a100"]) == 1  # built for another GPU
    assert main(["inspect", str(d)]) == 1


@pytest.mark.slow
def test_main_job_prints_plan(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("SPARVAR_DB", raising=False)
    monkeypatch.setenv("SPARVAR_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["--model", "infinity-8b", "--gpu", "h100", "--tune", "never", "-o", str(tmp_path / "m")]) == 0
    captured = capsys.readouterr()
    assert "79.0%" in captured.out and f"module: {tmp_path / 'm'}" in captured.out
    assert "target: h100 (sm_90, 132 SMs)" in captured.err and "compiling" not in captured.out
    from sparvar_compiler.emit.manifest import verify_module

    # The shipped database holds H100 winners for every CSLA scale: the module is fully tuned.
    manifest = verify_module(tmp_path / "m", gpu="h100")
    assert manifest["tuned"] and sorted(k["scale"] for k in manifest["kernels"].values()) == [10, 11, 12]
    # ... and for the CS4A kernels of the layers below the bound (decision scale 10 for the residual, 11, 12).
    assert manifest["cs4a_tuned"] is True and sorted(manifest["cs4a"]["scales"]) == ["10", "11", "12"]
    assert "expected kernel time per image" in captured.out


# ---------------------------------------------------------------------------------------------- tune, db
def _replay_file(path):
    """Recorded timings for 2 configs of each var-d16 workload at block 32; the second config wins."""
    from sparvar_compiler.emit.emitter import plan_workloads
    from sparvar_compiler.planner import get_gpu
    from sparvar_compiler.tuner.search import candidates

    gpu = get_gpu("h100")
    records, best = [], []
    for i, (_, spec, _) in enumerate(plan_workloads(make_plan("var-d16"), ("triton",), (32,))):
        configs = candidates(spec, gpu)[:2]
        for j, config in enumerate(configs):
            ms = 0.2 + 0.01 * i - 0.001 * j
            records.append({"spec": spec.to_dict(), "config": config.to_dict(),
                            "measurement": {"valid": True, "times_ms": [ms, ms]}})
        best.append((0.2 + 0.01 * i - 0.001, configs[1].to_dict()))
    path.write_text(json.dumps({"target": gpu.to_dict(), "records": records}))
    return best


def test_tune_replay_and_db_verbs_json_with_sparvar_db(tmp_path, monkeypatch, capsys):
    """tune (replay runner), db stats/export/import with --json; the database comes from SPARVAR_DB (db stats:
    over the shipped one, as compile reads it), and --db wins over it (used alone)."""
    replay = tmp_path / "results.json"
    best = _replay_file(replay)
    fleet, other = tmp_path / "fleet.sqlite", tmp_path / "other.sqlite"
    monkeypatch.setenv("SPARVAR_DB", str(fleet))
    assert main(["tune", "--model", "var-d16", "--gpu", "h100", "--runner", "replay", "--replay", str(replay),
                 "--block-sizes", "32", "--trials", "2", "--json"]) == 0
    captured = capsys.readouterr()
    doc = one_json(captured.out)
    assert doc["database"] == str(fleet) and doc["target"]["name"] == "h100" and doc["runner"] == "replay"
    assert len(doc["results"]) == len(best)
    for r, (ms, config) in zip(doc["results"], best):
        assert r["best_ms"] == pytest.approx(ms) and r["config"] == config and r["measured"] == 2
    assert "tuning scale" in captured.err and "trial 2/2" in captured.err
    assert main(["tune", "--model", "var-d16", "--gpu", "h100", "--runner", "replay", "--replay", str(replay),
                 "--block-sizes", "32", "--trials", "2"]) == 0
    assert "tuned ms" in capsys.readouterr().out  # the table, all reused now

    bundle = tmp_path / "bundle"
    assert main(["tune", "--model", "var-d16", "--gpu", "h100", "--runner", "bundle", "--bundle", str(bundle),
                 "--block-sizes", "32", "--trials", "1", "--json"]) == 0
    doc = one_json(capsys.readouterr().out)
    assert doc["bundle"] == str(bundle / "bundle.json") and doc["workloads"] == len(best) and len(doc["next"]) == 2

    assert main(["db", "stats", "--json"]) == 0
    stats = one_json(capsys.readouterr().out)
    assert [layer["url"] for layer in stats["layers"]][:1] == [str(fleet)] and len(stats["layers"]) == 2
    assert stats["layers"][0]["winners"] == len(best)
    supplied = [w for t in stats["targets"].values() for ws in t["models"].values() for w in ws if w["layer"] == 0]
    assert len(supplied) == len(best) and {w["model"] for w in supplied} == {"var-d16"}
    exported = tmp_path / "winners.json"
    assert main(["db", "export", str(exported), "--json"]) == 0
    doc = one_json(capsys.readouterr().out)
    assert doc["winners"] == len(best) and doc["file"] == str(exported) and doc["database"] == str(fleet)
    assert main(["db", "import", str(exported), "--db", str(other), "--json"]) == 0
    counts = one_json(capsys.readouterr().out)
    assert counts["database"] == str(other) and counts["trials_added"] == len(best)
    assert main(["db", "stats", "--json", "--db", str(other)]) == 0
    stats = one_json(capsys.readouterr().out)
    assert [layer["url"] for layer in stats["layers"]] == [str(other)]
    assert stats["summary"]["winners"] == len(best)
    assert main(["db", "stats"]) == 0
    text = capsys.readouterr().out
    assert str(fleet) in text and "var-d16" in text


def test_db_stats_without_a_url_is_the_layered_view_compile_uses(tmp_path, monkeypatch, capsys):
    from sparvar_compiler.db import TuningDatabase, shipped_database_path

    monkeypatch.delenv("SPARVAR_DB", raising=False)
    monkeypatch.setenv("SPARVAR_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["db", "stats", "--json"]) == 0  # only read: a cache database that is not there is not made
    stats = one_json(capsys.readouterr().out)
    assert [layer["url"] for layer in stats["layers"]] == [str(shipped_database_path())]
    assert main(["db", "export", str(tmp_path / "w.json"), "--json"]) == 0  # an empty export, nothing created
    assert one_json(capsys.readouterr().out)["winners"] == 0
    assert json.loads((tmp_path / "w.json").read_text())["winners"] == []
    assert not (tmp_path / "cache").exists()
    TuningDatabase.open(tmp_path / "cache" / "tuning.sqlite").close()
    assert main(["db", "stats", "--json"]) == 0
    stats = one_json(capsys.readouterr().out)
    assert [layer["url"] for layer in stats["layers"]] == [str(tmp_path / "cache" / "tuning.sqlite"),
                                                          str(shipped_database_path())]
    with TuningDatabase.open_shipped(shipped_database_path()) as shipped:
        assert stats["summary"]["winners"] == shipped.stats()["winners"] > 0  # not the empty cache's 0
    assert {"h100", "h200"} <= set(stats["targets"])


def test_workers_start_on_different_workloads(tmp_path):
    """Worker I of K starts on workload I*n/K and wraps around (so workers mostly tune workloads of their own
    rather than racing on one); the results come back in the plan's order either way."""
    import argparse

    from sparvar_compiler.cli import _worker_slot
    from sparvar_compiler.db import TuningDatabase
    from sparvar_compiler.planner import get_gpu
    from sparvar_compiler.tuner.plan import tune_plan, worker_start
    from sparvar_compiler.tuner.runners import ReplayRunner

    assert [worker_start(f"w{i}", (i, 3), 9) for i in range(3)] == [0, 3, 6]
    assert worker_start(None, None, 9) == 0 and worker_start("w0", (0, 2), 0) == 0
    assert 0 <= worker_start("host-a", None, 9) < 9  # a named worker on another host: a hash of its name
    assert _worker_slot("1/2") == (1, 2)
    for bad in ("2/2", "-1/2", "x", "1"):
        with pytest.raises(argparse.ArgumentTypeError):
            _worker_slot(bad)
    plan, gpu = make_plan("var-d16"), get_gpu("h100")
    db = TuningDatabase.open(tmp_path / "t.sqlite")
    first = tune_plan(plan, gpu, db, ("triton",), (32,), 1, None, worker="w0", runner=ReplayRunner({}),
                      slot=(0, 1), progress=lambda line: None)
    lines = []
    second = tune_plan(plan, gpu, db, ("triton",), (32,), 1, None, worker="w1", runner=ReplayRunner({}),
                       slot=(1, 2), progress=lines.append)
    walked = [line.split()[2] for line in lines if line.startswith("tuning scale")]
    scales = [scale for scale, _ in first]
    n = len(scales)
    assert n >= 4 and walked == [str(s) for s in scales[n // 2:] + scales[: n // 2]]
    assert [scale for scale, _ in second] == scales


def test_tune_auto_leaves_out_workloads_with_a_database_winner(tmp_path, monkeypatch):
    """With the target GPU present, --tune auto tunes only what the databases lack: the shipped Infinity-8B
    winners (CSLA and CS4A) mean no GPU work; a model without winners has every workload tuned."""
    from sparvar_compiler.cli import _open_db
    from sparvar_compiler.planner import get_gpu
    from sparvar_compiler.tuner.plan import tune_plan
    from sparvar_compiler.tuner.runners import ReplayRunner

    monkeypatch.delenv("SPARVAR_DB", raising=False)
    monkeypatch.setenv("SPARVAR_CACHE_DIR", str(tmp_path / "cache"))
    gpu = get_gpu("h100")
    db = _open_db(None)
    runner = ReplayRunner({})  # serves nothing: any workload it is asked about is 'tuned' (and not recorded)
    quiet = lambda line: None  # noqa: E731
    assert tune_plan(make_plan("infinity-8b"), gpu, db, ("triton",), (64, 128), 2, None, runner=runner,
                     only_missing=True, progress=quiet) == []
    assert runner.served == 0
    tiny = make_plan(str(ROOT / "examples" / "tiny-infinity.yaml"))
    results = tune_plan(tiny, gpu, db, ("triton",), (64,), 2, None, runner=runner, only_missing=True,
                        progress=quiet)
    assert len(results) > 0 and runner.served > 0


# ---------------------------------------------------------------------------------------------- fidelity verbs
def test_fidelity_cli_does_not_import_the_main_cli():
    code = ("import sys, sparvar_compiler.fidelity.cli as f; "
            "assert 'sparvar_compiler.cli' not in sys.modules, 'import cycle'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_calibrate_storage_keeps_a_readable_study(tmp_path, capsys):
    """``calibrate --storage URL`` keeps its Optuna study there under a readable name (what optuna-dashboard
    lists); the plan YAML is the result on stdout, progress and notes go to stderr."""
    import optuna

    url = f"sqlite:///{tmp_path / 'cal.sqlite'}"
    argv = ["calibrate", "--model", str(ROOT / "examples" / "tiny-infinity.yaml"), "--synthetic", "mixed",
            "--heads", "1", "--trials", "3", "--query-sample", "16", "--blocks", "16", "-o", str(tmp_path / "p.yaml")]
    assert main(argv + ["--storage", url]) == 0
    captured = capsys.readouterr()
    name = "calibrate/tiny-infinity/256px-1:1/synthetic-mixed/min-mass>=0.9,error<=0.45"
    assert f"Optuna study {name!r} kept in {url}" in captured.err and "optuna-dashboard" in captured.err
    assert "wrote" not in captured.out and "decision_scale:" in captured.out
    studies = {s.study_name: s for s in optuna.get_all_study_summaries(url)}
    assert list(studies) == [name] and studies[name].n_trials >= 3
