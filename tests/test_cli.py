"""The command line: plan views, exports, and one-line errors with exit status 2."""

import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

from sparvar_compiler.cli import main
from sparvar_compiler.planner import csla_layout, make_plan


def test_plan_json(capsys):
    assert main(["plan", "--model", "infinity-8b", "--json", "--block-m", "64", "--block-n", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    scales = out["scales"]
    assert [s["kv_len"] for s in scales][-1] == 10521
    for s in scales:
        assert {"index", "h", "w", "tokens", "kv_len"} <= set(s)
    lay = scales[12]["layout"]
    assert (lay["block_m"], lay["block_n"], lay["q_blocks"], lay["kv_blocks"]) == (64, 64, 64, 165)
    assert round(100 * lay["sparsity"], 1) == 87.9
    assert "layout" not in scales[9]


def test_plan_table_and_exports(tmp_path, capsys):
    args = ["plan", "--model", "infinity-2b", "--aspect", "4:3", "--export-layouts", str(tmp_path / "npy"),
            "--plot", str(tmp_path / "png")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "decision 0-8, csla 9-31" in text and "image self-attention" in text
    plan = make_plan("infinity-2b", 1024, "4:3")
    for s in (10, 11, 12):
        arr = np.load(tmp_path / "npy" / f"scale{s}.npy", allow_pickle=False)
        assert arr.dtype == bool and np.array_equal(arr, csla_layout(plan, s, 128, 128).active())
        assert (tmp_path / "png" / f"scale{s}.png").stat().st_size > 1000
    assert not (tmp_path / "npy" / "scale9.npy").exists()


def test_windows_flag_shorthand(capsys):
    assert main(["plan", "--model", "infinity-8b", "--json", "--windows=-1x8,1,1,3,5,9"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["windows"][-1] == 9


@pytest.mark.parametrize("argv, message", [
    (["--model", "nope", "--gpu", "h100"], "unknown model 'nope'"),
    (["--model", "infinity-8b", "--gpu", "v100"], "unknown GPU 'v100'; known GPUs: h100"),
    (["plan", "--model", "infinity-8b", "--aspect", "16:9"], "unknown aspect ratio '16:9'"),
    (["plan", "--model", "infinity-8b", "--windows=1,1,3"], "windows has 3 entries"),
    (["plan", "--model", "infinity-8b", "--decision-scale", "13"], "decision_scale 13 is out of range"),
    (["plan", "--model", "infinity-8b", "--block-m", "96"], "--block-m must be a power of two"),
    (["plan", "--model", "infinity-8b", "--plan-config", "/nonexistent.yaml"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_console_entry_point_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "sparvar_compiler", "--model", "infinity-9b", "--gpu", "h100"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown model 'infinity-9b'" in proc.stderr and "Traceback" not in proc.stderr


def test_main_job_prints_plan(capsys, tmp_path):
    assert main(["--model", "infinity-8b", "--gpu", "h100", "-o", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "target: h100 (sm_90, 132 SMs)" in out and "79.0%" in out
    from sparvar_compiler.emit.manifest import verify_module

    # The shipped database holds H100 winners for every CSLA scale: the module is fully tuned.
    manifest = verify_module(tmp_path / "m", gpu="h100")
    assert manifest["tuned"] and sorted(k["scale"] for k in manifest["kernels"].values()) == [10, 11, 12]
    # ... and for the CS4A kernels of the layers below the bound (decision scale 10 for the residual, 11, 12).
    assert manifest["cs4a_tuned"] is True and sorted(manifest["cs4a"]["scales"]) == ["10", "11", "12"]


def test_workers_start_on_different_workloads(tmp_path, capsys):
    """Worker I of K starts on workload I*n/K and wraps around (so workers mostly tune workloads of their own
    rather than racing on one); the results come back in the plan's order either way."""
    import argparse

    from sparvar_compiler.cli import _tune_plan, _worker_slot, _worker_start
    from sparvar_compiler.db import TuningDatabase
    from sparvar_compiler.planner import get_gpu, make_plan
    from sparvar_compiler.tuner.runners import ReplayRunner

    assert [_worker_start(f"w{i}", (i, 3), 9) for i in range(3)] == [0, 3, 6]
    assert _worker_start(None, None, 9) == 0 and _worker_start("w0", (0, 2), 0) == 0
    assert 0 <= _worker_start("host-a", None, 9) < 9  # a named worker on another host: a hash of its name
    assert _worker_slot("1/2") == (1, 2)
    for bad in ("2/2", "-1/2", "x", "1"):
        with pytest.raises(argparse.ArgumentTypeError):
            _worker_slot(bad)
    plan, gpu = make_plan("var-d16"), get_gpu("h100")
    db = TuningDatabase.open(tmp_path / "t.sqlite")
    first = _tune_plan(plan, gpu, db, ("triton",), (32,), 1, None, worker="w0", runner=ReplayRunner({}),
                       slot=(0, 1))
    capsys.readouterr()
    second = _tune_plan(plan, gpu, db, ("triton",), (32,), 1, None, worker="w1", runner=ReplayRunner({}),
                        slot=(1, 2))
    walked = [line.split()[2] for line in capsys.readouterr().out.splitlines() if line.startswith("tuning scale")]
    scales = [scale for scale, _ in first]
    n = len(scales)
    assert n >= 4 and walked == [str(s) for s in scales[n // 2:] + scales[: n // 2]]
    assert [scale for scale, _ in second] == scales


def test_tune_auto_leaves_out_workloads_with_a_database_winner(tmp_path, monkeypatch):
    """With the target GPU present, --tune auto tunes only what the databases lack: the shipped Infinity-8B
    winners (CSLA and CS4A) mean no GPU work; a model without winners has every workload tuned."""
    from sparvar_compiler.cli import _open_db, _tune_plan
    from sparvar_compiler.planner import get_gpu, make_plan
    from sparvar_compiler.tuner.runners import ReplayRunner

    monkeypatch.setenv("SPARVAR_CACHE_DIR", str(tmp_path / "cache"))
    gpu = get_gpu("h100")
    db = _open_db(None)
    runner = ReplayRunner({})  # serves nothing: any workload it is asked about is 'tuned' (and not recorded)
    assert _tune_plan(make_plan("infinity-8b"), gpu, db, ("triton",), (64, 128), 2, None, runner=runner,
                      only_missing=True) == []
    assert runner.served == 0
    tiny = make_plan(str(Path(__file__).resolve().parent.parent / "examples" / "tiny-infinity.yaml"))
    results = _tune_plan(tiny, gpu, db, ("triton",), (64,), 2, None, runner=runner, only_missing=True)
    assert len(results) > 0 and runner.served > 0
