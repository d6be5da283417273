"""The tuner end to end on the CPU: Optuna + replayed timings + a real database (SQLite and PostgreSQL)."""

import math
import multiprocessing as mp

import optuna
import pytest

from sparvar_compiler.codegen.spec import KernelSpec
from sparvar_compiler.db import SkippedRecordWarning, TuningDatabase, config_key
from sparvar_compiler.planner import csla_layout, get_gpu, make_plan
from sparvar_compiler.tuner.measure import Measurement
from sparvar_compiler.tuner.runners import ReplayRunner, replay_key
from sparvar_compiler.tuner.search import Tuner, candidates, study_name

GPU = get_gpu("h100")


def _workload():
    layout = csla_layout(make_plan("var-d16"), 9, 64, 64)
    spec = KernelSpec("triton", "block", 2, 16, layout.q_len, layout.kv_len, 64, "bf16", 64, 64,
                      layout.content_hash())
    return spec, layout


def _replay(spec):
    """Timings for every candidate: a smooth function of the knobs, with some invalid ones."""
    records = {}
    for i, c in enumerate(candidates(spec, GPU)):
        d = c.to_dict()
        if i % 7 == 3:
            m = Measurement(False, reason="wrong_result", detail="replayed")
        elif i % 11 == 5:
            m = Measurement(False, reason="compile_error", detail="replayed")
        else:
            base = 0.1 + 0.01 * abs(d["num_warps"] - 4) + 0.003 * abs(d["num_stages"] - 3) + 0.0001 * i
            m = Measurement(True, [base, base * 1.01, base * 0.99])
        records[replay_key(spec, c)] = m
    return records


def _expected_best(spec, records):
    valid = [(m.median_ms, c) for c in candidates(spec, GPU)
             if (m := records[replay_key(spec, c)]).valid]
    return min(valid, key=lambda t: t[0])


@pytest.mark.parametrize("mode", ["exhaustive", "tpe"])
def test_tuner_replay_finds_best_and_records_everything(tmp_path, mode):
    spec, layout = _workload()
    records = _replay(spec)
    db = TuningDatabase.open(tmp_path / "t.sqlite")
    n = len(candidates(spec, GPU))
    res = Tuner(db, GPU, ReplayRunner(records), worker="w0", progress=lambda s: None).tune(
        spec, layout, trials=n, mode=mode, seed=1)
    best_ms, best_cfg = _expected_best(spec, records)
    assert res.best_ms == pytest.approx(best_ms) and res.best_config == best_cfg
    assert res.best_ms <= res.default_ms and res.gain >= 1.0
    trials = db.trials(db.add_workload(spec.to_dict()), db.add_target(GPU.to_dict()))
    assert len(trials) == n == len({t.config_key for t in trials})
    assert {t.reason for t in trials if not t.valid} == {"wrong_result", "compile_error"}
    # A second run with a warm database measures nothing new.
    runner = ReplayRunner(records)
    again = Tuner(db, GPU, runner, progress=lambda s: None).tune(spec, layout, trials=n, mode=mode, seed=1)
    assert runner.served == 0 and again.best_config == best_cfg and again.measured == 0


def test_invalid_never_wins(tmp_path):
    spec, layout = _workload()
    records = _replay(spec)
    fastest_bad = next(c for c in candidates(spec, GPU) if not records[replay_key(spec, c)].valid)
    records[replay_key(spec, fastest_bad)] = Measurement(False, [0.0001], reason="wrong_result")
    db = TuningDatabase.open(tmp_path / "t.sqlite")
    res = Tuner(db, GPU, ReplayRunner(records), progress=lambda s: None).tune(spec, layout, trials=100,
                                                                                mode="exhaustive")
    assert res.best_config != fastest_bad and math.isfinite(res.best_ms)


def test_implausible_timing_is_invalid_and_an_unusable_winner_is_passed_over(tmp_path):
    """The tuner checks records with validate_record: a measured time below the roofline bound is recorded as a
    wrong result, and a stored record the compiler cannot use never becomes the tuned config."""
    spec, layout = _workload()
    records = _replay(spec)
    space = candidates(spec, GPU)
    fake = next(c for c in space[1:] if records[replay_key(spec, c)].valid)
    records[replay_key(spec, fake)] = Measurement(True, [1e-9, 1e-9, 1e-9])  # the kernel did not run
    db = TuningDatabase.open(tmp_path / "t.sqlite")
    bad = db.record_trial(spec.to_dict(), GPU.to_dict(), {**space[0].to_dict(), "order": "zigzag"}, [0.001],
                          environment={}, study="imported")
    with pytest.warns(SkippedRecordWarning, match=f"tuning record {bad} .*order must be one of"):
        res = Tuner(db, GPU, ReplayRunner(records), progress=lambda s: None).tune(spec, layout, trials=len(space),
                                                                                    mode="exhaustive")
    honest = min(((m.median_ms, c) for c in space if (m := records[replay_key(spec, c)]).valid and c != fake),
                 key=lambda t: t[0])
    assert res.best_ms == pytest.approx(honest[0]) and res.best_config == honest[1]
    [stored] = [t for t in db.trials() if t.config_key == config_key(fake.to_dict())]
    assert not stored.valid and stored.reason == "wrong_result" and "below the fastest" in stored.detail
    db.close()


def test_candidates_pass_validate_record():
    big = KernelSpec("triton", "block", 4096, 32, 4096, 10521, 64, "bf16", 64, 64, "")
    space = candidates(big, GPU)  # B*H = 131072: only head_major launches fit CUDA's grid
    assert space and all(c.get("order") == "head_major" for c in space)
    assert len(candidates(KernelSpec(**{**big.to_dict(), "batch": 2}), GPU)) > 2 * len(space) - 2


def _worker(url, index, n, seed, out):
    spec, layout = _workload()
    db = TuningDatabase.open(url)
    res = Tuner(db, GPU, ReplayRunner(_replay(spec)), worker=f"w{index}", progress=lambda s: None).tune(
        spec, layout, trials=n, mode="tpe", seed=seed + index)
    out.put((index, config_key(res.best_config.to_dict()), res.best_ms))
    db.close()


def _run_workers(url, workers, n):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, i, n, 7, q)) for i in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        assert p.exitcode == 0, f"worker {p.name} ended with exit code {p.exitcode}"
    return [q.get(timeout=10) for _ in procs]


def _check_shared_study(url):
    spec, _ = _workload()
    n = len(candidates(spec, GPU))
    results = _run_workers(url, 3, n)
    best_ms, best_cfg = _expected_best(spec, _replay(spec))
    assert {r[1] for r in results} == {config_key(best_cfg.to_dict())}
    db = TuningDatabase.open(url)
    trials = db.trials(db.add_workload(spec.to_dict()), db.add_target(GPU.to_dict()))
    # Every config recorded exactly once across the workers, none lost; the study holds each once too.
    assert len(trials) == len({t.config_key for t in trials}) == n
    study = optuna.load_study(study_name=study_name(spec, GPU), storage=url)
    assert sorted(t.user_attrs["sparvar_trial_id"] for t in study.get_trials()) == sorted(t.id for t in trials)
    db.close()


def test_three_sqlite_workers_share_one_study(tmp_path):
    _check_shared_study(f"sqlite:///{tmp_path / 'shared.sqlite'}")


def test_three_postgres_workers_share_one_study(postgres_url):
    _check_shared_study(postgres_url)


def test_bundle_build_here_then_ingest_measured_results(tmp_path, capsys):
    """Build-here/measure-there: the bundle holds a cubin per candidate and the reference mask; the GPU host's
    results (replay format; faked here from the bundle's own candidate list) are ingested by the tuner."""
    import json

    import numpy as np

    from sparvar_compiler.cli import main
    from sparvar_compiler.codegen.artifact import CompiledKernel

    bundle = tmp_path / "bundle"
    assert main(["tune", "--model", "var-d16", "--gpu", "h100", "--runner", "bundle", "--bundle", str(bundle),
                 "--block-sizes", "32", "--trials", "2"]) == 0
    doc = json.loads((bundle / "bundle.json").read_text())
    assert doc["target"]["name"] == "h100" and len(doc["workloads"]) == 3
    records = []
    for i, w in enumerate(doc["workloads"]):
        with np.load(bundle / w["data"], allow_pickle=False) as z:
            assert "table_kv_idx" in z.files and tuple(z["mask_shape"]) == (w["spec"]["q_len"], w["spec"]["kv_len"])
        for j, c in enumerate(w["candidates"]):
            k = CompiledKernel.from_json_dict(json.loads((bundle / c["kernel"]).read_text()))
            assert k.binary[:4] == b"\x7fELF" and k.arch.startswith("sm_90")
            ms = 0.1 + 0.01 * i + (0.005 if j == 0 else 0.0)  # the second candidate wins everywhere
            records.append({"spec": w["spec"], "config": c["config"],
                            "measurement": {"valid": True, "times_ms": [ms, ms]}})
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"format": "sparvar-replay", "target": doc["target"], "records": records}))
    db_path = tmp_path / "t.sqlite"
    assert main(["tune", "--model", "var-d16", "--gpu", "h100", "--runner", "replay", "--replay", str(results),
                 "--block-sizes", "32", "--trials", "2", "--db", str(db_path)]) == 0
    db = TuningDatabase.open(db_path)
    for w in doc["workloads"]:
        win = db.winner(w["spec"], GPU.to_dict())
        assert win is not None and win.config == w["candidates"][1]["config"]
    assert main(["tune", "--model", "var-d16", "--gpu", "h200", "--runner", "replay", "--replay", str(results),
                 "--block-sizes", "32", "--db", str(db_path)]) == 2
    assert "measured on h100, not h200" in capsys.readouterr().err


def test_tune_workers_flag_runs_processes_sharing_one_database(tmp_path, capsys):
    """``tune --workers 2`` (replay runner, one SQLite file): two processes split the trials - every config
    recorded exactly once - and the parent prints the winners, which are the recorded best."""
    import json

    from sparvar_compiler.cli import main
    from sparvar_compiler.emit.emitter import plan_workloads
    from sparvar_compiler.planner import make_plan

    plan = make_plan("var-d16")
    records, best = [], {}
    for i, (_, spec, _) in enumerate(plan_workloads(plan, ("triton",), (32,))):
        for j, config in enumerate(candidates(spec, GPU)[:6]):
            ms = 0.2 + 0.01 * i - 0.001 * ((j * 7) % 6)  # a different config wins per workload
            records.append({"spec": spec.to_dict(), "config": config.to_dict(),
                            "measurement": {"valid": True, "times_ms": [ms, ms]}})
            if spec.key() not in best or ms < best[spec.key()][0]:
                best[spec.key()] = (ms, config_key(config.to_dict()), spec)
    replay = tmp_path / "results.json"
    replay.write_text(json.dumps({"target": GPU.to_dict(), "records": records}))
    db_path = tmp_path / "shared.sqlite"
    assert main(["tune", "--model", "var-d16", "--gpu", "h100", "--runner", "replay", "--replay", str(replay),
                 "--block-sizes", "32", "--trials", "6", "--db", str(db_path), "--workers", "2"]) == 0
    err = capsys.readouterr().err  # the workers' lines are progress: on stderr
    assert "[w0]" in err and "[w1]" in err
    db = TuningDatabase.open(db_path)
    target = db.add_target(GPU.to_dict())
    for ms, ckey, spec in best.values():
        trials = db.trials(db.add_workload(spec.to_dict()), target)
        assert len(trials) == len({t.config_key for t in trials}) == 6
        assert db.winner(spec.to_dict(), GPU.to_dict()).config_key == ckey
    assert main(["tune", "--model", "var-d16", "--gpu", "h100", "--runner", "replay", "--replay", str(replay),
                 "--workers", "2"]) == 2  # no --db: the workers would not share anything


class _SlowReplay(ReplayRunner):
    """A replay runner that takes a little time per measurement, as a GPU does, so workers overlap."""

    def measure(self, spec, config, layout):
        import time

        time.sleep(0.03)
        return super().measure(spec, config, layout)


def _same_seed_worker(url, index, n, mode, out):
    spec, layout = _workload()
    db = TuningDatabase.open(url)
    runner = _SlowReplay(_replay(spec))
    Tuner(db, GPU, runner, worker=f"w{index}", progress=lambda s: None).tune(spec, layout, trials=n, mode=mode,
                                                                              seed=0)
    out.put(runner.served)
    db.close()


@pytest.mark.parametrize("mode", ["tpe", "exhaustive"])
def test_workers_with_one_seed_split_the_work(tmp_path, mode):
    """Two workers started alike (the CLI's --workers: same seed, same space) split the work: each draws its
    own proposals (TPE) or walks the space from its own offset (exhaustive), so they rarely measure the same
    config at the same time."""
    spec, _ = _workload()
    n = min(16, len(candidates(spec, GPU)))
    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_same_seed_worker, args=(url, i, n, mode, q)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        assert p.exitcode == 0
    served = sum(q.get(timeout=10) for _ in procs)
    # Identical proposals would measure nearly everything twice (2n); both workers measure the default config.
    assert served <= 1.5 * n, served
    db = TuningDatabase.open(url)
    trials = db.trials(db.add_workload(spec.to_dict()), db.add_target(GPU.to_dict()))
    assert len(trials) == len({t.config_key for t in trials}) >= n
