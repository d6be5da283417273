"""Optuna studies beside the tuning records, as users open them: the shipped studies, the studies every tuning
run keeps (TPE, exhaustive, replay, bundle, workers), calibration's kept study, and the layered ``db stats`` view.

The ``check_*`` helpers take a database URL and are reused by test_db_postgres.py.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from test_db import ENV, H100, SPEC, cfg

from sparvar_compiler.codegen.spec import KernelSpec
from sparvar_compiler.db import (LayeredDatabase, TuningDatabase, build_shipped_database, default_database_url,
                                 export_document, format_stats, shipped_database_path, target_key,
                                 user_database_path, workload_key)
from sparvar_compiler.planner import csla_layout, get_gpu, make_plan
from sparvar_compiler.tuner.measure import Measurement
from sparvar_compiler.tuner.plan import tune_plan, worker_start, workload_contexts
from sparvar_compiler.tuner.runners import ReplayRunner, replay_key
from sparvar_compiler.tuner.search import StudyContext, Tuner, candidates, study_name

GPU = get_gpu("h100")
NAME = "var-d16/256px-1:1/scale9/triton-block-64x64/h100"
CONTEXT = StudyContext("var-d16", 256, "1:1", 9)


def _workload():
    layout = csla_layout(make_plan("var-d16"), 9, 64, 64)
    spec = KernelSpec("triton", "block", 2, 16, layout.q_len, layout.kv_len, 64, "bf16", 64, 64,
                      layout.content_hash())
    return spec, layout


def _replay(spec, n=None):
    """A measurement for the first ``n`` candidates: every fifth invalid, the others a smooth function."""
    records = {}
    for i, c in enumerate(candidates(spec, GPU)[:n]):
        d = c.to_dict()
        if i % 5 == 3:
            m = Measurement(False, reason="wrong_result", detail="replayed mismatch")
        else:
            base = 0.1 + 0.01 * abs(d["num_warps"] - 4) + 0.003 * abs(d["num_stages"] - 3) + 0.0001 * i
            m = Measurement(True, [base, base * 1.02, base * 0.99])
        records[replay_key(spec, c)] = m
    return records


def _quiet(_line):
    pass


def _study_trials(url, name):
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def check_study_mirrors_records(db, url, name, spec, gpu=GPU):
    """The study holds each recorded config of (spec, gpu) once: COMPLETE with the record's median, FAIL with
    its reason, and the workload's attributes."""
    records = {t.id: t for t in db.trials(spec.to_dict(), gpu.to_dict())}
    trials = _study_trials(url, name)
    ids = [t.user_attrs["sparvar_trial_id"] for t in trials]
    assert sorted(ids) == sorted(records), "one trial per recorded config, none twice"
    for t in trials:
        r = records[t.user_attrs["sparvar_trial_id"]]
        params = {k: v for k, v in t.params.items() if v is not None}
        assert params == r.config
        if r.valid:
            assert t.state == optuna.trial.TrialState.COMPLETE and t.value == pytest.approx(r.median_ms)
        else:
            assert t.state == optuna.trial.TrialState.FAIL and t.user_attrs["reason"] == r.reason
    attrs = optuna.load_study(study_name=name, storage=url).user_attrs
    assert attrs["workload_key"] == workload_key(spec.to_dict()) and attrs["target_key"] == target_key(gpu.to_dict())
    assert (attrs["q_len"], attrs["kv_len"], attrs["block_m"], attrs["gpu"]) == (spec.q_len, spec.kv_len,
                                                                                 spec.block_m, gpu.name)
    return trials


def check_tuning_keeps_studies(url):
    """Exhaustive and TPE runs, with and without a context, each keep their study; warm reruns add nothing."""
    spec, layout = _workload()
    records = _replay(spec)
    with TuningDatabase.open(url) as db:
        res = Tuner(db, GPU, ReplayRunner(records), progress=_quiet).tune(spec, layout, trials=10,
                                                                           mode="exhaustive", context=CONTEXT)
        assert res.study == NAME and res.measured == 10
        trials = check_study_mirrors_records(db, db.storage_url, NAME, spec)
        assert len(trials) == 10 and sum(t.state == optuna.trial.TrialState.FAIL for t in trials) == 2
        attrs = optuna.load_study(study_name=NAME, storage=db.storage_url).user_attrs
        assert (attrs["model"], attrs["resolution"], attrs["aspect"], attrs["scale"]) == ("var-d16", 256, "1:1", 9)
        # TPE continues the same workload: the sampler sees the 10 records, measures 4 more into the same study.
        runner = ReplayRunner(records)
        res = Tuner(db, GPU, runner, progress=_quiet).tune(spec, layout, trials=14, mode="tpe", seed=3,
                                                            context=CONTEXT)
        assert res.measured == 4 and runner.served == 4
        assert len(check_study_mirrors_records(db, db.storage_url, NAME, spec)) == 14
        for mode in ("tpe", "exhaustive"):  # warm: nothing measured, nothing added
            runner = ReplayRunner(records)
            Tuner(db, GPU, runner, progress=_quiet).tune(spec, layout, trials=14, mode=mode, context=CONTEXT)
            assert runner.served == 0 and len(_study_trials(db.storage_url, NAME)) == 14
        # Without a context the study keeps the hash name of earlier databases; a new study takes in the
        # configs recorded under other names.
        old = study_name(spec, GPU)
        assert old.startswith("sparvar-") and len(old) == len("sparvar-") + 16 + 1 + 8
        res = Tuner(db, GPU, ReplayRunner(records), progress=_quiet).tune(spec, layout, trials=14)
        assert res.study == old and res.measured == 0
        assert len(check_study_mirrors_records(db, db.storage_url, old, spec)) == 14
        summaries = {s.study_name: s for s in optuna.get_all_study_summaries(db.storage_url)}
        assert set(summaries) == {NAME, old} and summaries[NAME].n_trials == 14


def test_tuning_keeps_studies(tmp_path):
    check_tuning_keeps_studies(f"sqlite:///{tmp_path / 't.sqlite'}")


def test_study_names():
    spec, _ = _workload()
    assert study_name(spec, GPU, CONTEXT) == NAME
    import dataclasses

    odd = dataclasses.replace(spec, batch=4, dtype="fp16", token_exact=True)
    assert study_name(odd, GPU, CONTEXT) == "var-d16/256px-1:1/scale9/triton-block-64x64-b4-fp16-exact/h100"
    cs4a = KernelSpec("triton", "gather", 2, 28, 4096, 10521, 128, "bf16", 192, 64, "ab" * 32, dynamic=True,
                      capacity=2048)
    assert study_name(cs4a, GPU, StudyContext("infinity-8b", 1024, "1:1", 12)) == \
        "infinity-8b/1024px-1:1/scale12/triton-cs4a-gather-192x64/h100"
    long = StudyContext("m" * 200, 1024, "1:1", 12)
    assert study_name(spec, GPU, long) == study_name(spec, GPU), "too long for the records: the hash name"


def test_a_taken_readable_name_gets_a_suffix(tmp_path):
    """Two workloads with one context (a plan with other windows, same model and scale) get two studies."""
    import dataclasses

    spec, layout = _workload()
    other = dataclasses.replace(spec, layout_hash="0" * 64)
    url = f"sqlite:///{tmp_path / 't.sqlite'}"
    with TuningDatabase.open(url) as db:
        first = Tuner(db, GPU, ReplayRunner(_replay(spec, 3)), progress=_quiet).tune(
            spec, layout, trials=3, mode="exhaustive", context=CONTEXT)
        second = Tuner(db, GPU, ReplayRunner({}), progress=_quiet).tune(
            other, layout, trials=3, mode="exhaustive", context=CONTEXT)
        again = Tuner(db, GPU, ReplayRunner({}), progress=_quiet).tune(
            other, layout, trials=3, mode="exhaustive", context=CONTEXT)
    assert first.study == NAME and second.study == again.study == f"{NAME}/{workload_key(other.to_dict())[:8]}"


def test_tune_plan_names_studies_after_the_plan(tmp_path):
    """tune_plan (the CLI's tune and compile --tune) names each study after the plan and scale; progress lines
    go to the given callable; worker_start spreads workers."""
    plan = make_plan("var-d16")
    records = []
    from sparvar_compiler.emit.emitter import plan_workloads

    for _, spec, _ in plan_workloads(plan, ("triton",), (32,)):
        for c in candidates(spec, GPU)[:3]:
            records.append({"spec": spec.to_dict(), "config": c.to_dict(),
                            "measurement": {"valid": True, "times_ms": [0.1, 0.1]}})
    lines = []
    url = f"sqlite:///{tmp_path / 't.sqlite'}"
    with TuningDatabase.open(url) as db:
        results = tune_plan(plan, GPU, db, ("triton",), (32,), 3, None, runner=ReplayRunner.from_records(records),
                            mode="exhaustive", progress=lines.append)
    assert [(scale, r.study) for scale, r in results] == \
        [(s, f"var-d16/256px-1:1/scale{s}/triton-block-32x32/h100") for s in (7, 8, 9)] + \
        [(s, f"var-d16/256px-1:1/scale{s}/triton-cs4a-gather-192x64/h100") for s in (7, 8, 9)]
    assert sum(line.startswith("tuning scale") for line in lines) == 6 and any("trial 3/3" in x for x in lines)
    summaries = optuna.get_all_study_summaries(url)
    assert sorted(s.n_trials for s in summaries) == [3] * 6
    assert [worker_start(f"w{i}", (i, 3), 9) for i in range(3)] == [0, 3, 6]
    assert worker_start(None, None, 9) == 0 and 0 <= worker_start("host-a", None, 9) < 9


# ---------------------------------------------------------------------------------------------- shipped

def test_shipped_studies_open_in_optuna(tmp_path):
    """optuna.get_all_study_summaries (what optuna-dashboard lists) and the optuna CLI read the shipped
    file through a plain SQLite URL: one readable study per (workload, target) with all its trials, and
    nothing written beside the file."""
    path = shipped_database_path()
    before = path.read_bytes()
    url = f"sqlite:///{path}"
    summaries = optuna.get_all_study_summaries(url)
    with TuningDatabase.open_shipped() as db:
        pairs = {(t.workload_key, t.target_key) for t in db.trials()}
        assert len(summaries) == len(pairs) == db.stats()["studies"]
        assert sum(s.n_trials for s in summaries) == db.stats()["trials"]["total"]
        names = {s.study_name for s in summaries}
        assert "infinity-8b/1024px-1:1/scale12/triton-block-64x64/h100" in names
        assert "infinity-2b/1024px-1:1/scale11/triton-cs4a-gather-192x64/h100" in names
        assert "infinity-8b/1024px-1:1/scale10/triton-block-128x128/h200" in names
        for s in summaries:
            a = s.user_attrs
            assert a["model"] in ("infinity-2b", "infinity-8b") and (a["resolution"], a["aspect"]) == (1024, "1:1")
            assert s.study_name == f"{a['model']}/1024px-1:1/scale{a['scale']}/" \
                                   f"{a['backend']}-{'cs4a-' if a['dynamic'] else ''}{a['kind']}-" \
                                   f"{a['block_m']}x{a['block_n']}/{a['gpu']}"
            win = db.winner(a["workload_key"], a["target_key"])
            assert s.best_trial.value == pytest.approx(win.median_ms)
        name = "infinity-8b/1024px-1:1/scale12/triton-block-64x64/h100"
        spec = KernelSpec(**db.workload(next(s.user_attrs["workload_key"] for s in summaries
                                             if s.study_name == name)))
        check_study_mirrors_records(db, url, name, spec)
    out = subprocess.run([str(Path(sys.executable).parent / "optuna"), "studies", "--storage", url, "-f", "json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert {s["name"] for s in json.loads(out.stdout)} == names
    assert path.read_bytes() == before
    assert not any(path.with_name(path.name + s).exists() for s in ("-wal", "-shm", "-journal"))
    # Installed read-only (a root-owned site-packages): still opens.
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copy(path, ro / "s.sqlite")
    (ro / "s.sqlite").chmod(0o444)
    ro.chmod(0o555)
    try:
        assert len(optuna.get_all_study_summaries(f"sqlite:///{ro / 's.sqlite'}")) == len(summaries)
        assert sorted(p.name for p in ro.iterdir()) == ["s.sqlite"]
    finally:
        ro.chmod(0o755)


def test_build_shipped_database_makes_studies(tmp_path):
    """Records whose workload a registered model's plan yields get readable studies; others the hash name and
    "unknown" attributes. The file is frozen: no WAL, nothing beside it."""
    spec, layout = _workload()
    with TuningDatabase.open(tmp_path / "src.sqlite") as src:
        Tuner(src, GPU, ReplayRunner(_replay(spec, 6)), environment=ENV, progress=_quiet).tune(
            spec, layout, trials=6, mode="exhaustive")  # no context: recorded under the hash name
        src.record_trial(SPEC, H100, cfg(8), [0.9], environment=ENV)  # no plan yields it
        doc = export_document(src, all_trials=True)
    path = build_shipped_database(tmp_path / "pkg" / "s.sqlite", [doc])
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.sqlite"]
    conn = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()
    summaries = {s.study_name: s for s in optuna.get_all_study_summaries(f"sqlite:///{path}")}
    unknown = f"sparvar-{workload_key(SPEC)[:16]}-{target_key(H100)[:8]}"
    assert set(summaries) == {NAME, unknown}
    assert summaries[NAME].n_trials == 6 and summaries[unknown].n_trials == 1
    assert summaries[unknown].user_attrs["model"] == "unknown" and summaries[unknown].user_attrs["scale"] == "unknown"
    assert workload_contexts({workload_key(spec.to_dict()): spec.to_dict()}) == {workload_key(spec.to_dict()): CONTEXT}


# ---------------------------------------------------------------------------------------------- bundle

def test_bundle_creates_studies_the_replay_fills(tmp_path):
    """build_bundle, given the database the results go to, creates each bundled workload's study (readable
    name, attributes, no trials); the replay of the measured results fills it."""
    from sparvar_compiler.tuner.bundle import build_bundle
    from sparvar_compiler.tuner.plan import plan_tasks

    plan = make_plan("var-d16")
    url = f"sqlite:///{tmp_path / 't.sqlite'}"
    tasks = [t for t in plan_tasks(plan, ("triton",), (32,)) if t[2].scale == 9]
    build_bundle(tasks, GPU, tmp_path / "bundle", max_candidates=2, progress=_quiet, db=url)
    doc = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    name = "var-d16/256px-1:1/scale9/triton-block-32x32/h100"
    assert [w["study"] for w in doc["workloads"]] == [name]
    [summary] = optuna.get_all_study_summaries(url)
    assert summary.study_name == name and summary.n_trials == 0 and summary.user_attrs["scale"] == 9
    records = [{"spec": w["spec"], "config": c["config"], "measurement": {"valid": True, "times_ms": [0.2 - 0.01 * j]}}
               for w in doc["workloads"] for j, c in enumerate(w["candidates"])]
    with TuningDatabase.open(url) as db:
        [(_, res)] = [r for r in tune_plan(plan, GPU, db, ("triton",), (32,), 2, None,
                                           runner=ReplayRunner.from_records(records), mode="exhaustive",
                                           progress=_quiet) if r[0] == 9 and not r[1].spec.dynamic]
        assert res.study == name
        check_study_mirrors_records(db, url, name, res.spec)
    assert {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(url)}[name] == 2


# ---------------------------------------------------------------------------------------------- calibrate

def test_calibrate_keeps_its_study(tmp_path):
    from test_fidelity import TINY

    from sparvar_compiler.fidelity.calibrate import Floor, SearchSpace, calibrate, default_study_name
    from sparvar_compiler.fidelity.synthetic import SyntheticSource
    from sparvar_compiler.planner import PlanConfig, get_model
    from sparvar_compiler.errors import SparvarError

    (tmp_path / "tiny.yaml").write_text(TINY)
    tiny = get_model(tmp_path / "tiny.yaml")
    plan = make_plan(tiny, config=PlanConfig(group_size=64, dcsla_block=16, dcsla_min_blocks=4))
    src = SyntheticSource(tiny, "mixed", heads=1, seed=7)
    space = SearchSpace(decision_scales=(5, 6), blocks=(16, 32), topk_fractions=(0.1, 0.3))
    storage = str(tmp_path / "cal.sqlite")  # a path: the SQLite file
    kw = dict(trials=4, query_sample=32, space=space, seed=1, progress=None, max_verify=1, storage=storage)
    calibrate(src, plan, Floor(min_mass=0.8), **kw)
    name = default_study_name(plan)
    assert name == "calibrate/tiny-var/512px-1:1"
    url = f"sqlite:///{tmp_path / 'cal.sqlite'}"
    [summary] = optuna.get_all_study_summaries(url)
    assert summary.study_name == name and summary.n_trials == 4
    assert summary.user_attrs["model"] == "tiny-var" and summary.user_attrs["min_mass"] == 0.8
    assert "mass" in summary.best_trial.user_attrs
    calibrate(src, plan, Floor(min_mass=0.8), **kw)  # continued: 4 more, the seeds not enqueued again
    assert optuna.get_all_study_summaries(url)[0].n_trials == 8
    calibrate(src, plan, Floor(min_mass=0.8), **{**kw, "study_name": "mine", "trials": 1})
    assert {s.study_name for s in optuna.get_all_study_summaries(url)} == {name, "mine"}
    with pytest.raises(SparvarError, match="other values of block"):
        calibrate(src, plan, Floor(min_mass=0.8), **{**kw, "space": SearchSpace((5, 6), blocks=(16, 64))})


# ---------------------------------------------------------------------------------------------- db stats, paths

def check_layered_stats(user_url, tmp_path):
    """The layered view: the user's winner shadows the shipped one for its workload, the other workloads come
    from the shipped layer, model and scale from the studies (or, for records without one, the plans)."""
    plan = make_plan("infinity-8b")
    from sparvar_compiler.emit.emitter import plan_workloads

    [spec, small] = [w[1] for w in plan_workloads(plan, ("triton",), (128, 32), cs4a=False) if w[0] == 12]
    with TuningDatabase.open(user_url) as user:
        user.record_trial(spec.to_dict(), GPU.to_dict(), cfg(8), [0.01], environment=ENV)  # shadows the shipped
        user.record_trial(small.to_dict(), GPU.to_dict(), cfg(8), [0.02], environment=ENV)  # no study: the plan
        user.record_trial(SPEC, H100, cfg(8), [0.5], environment=ENV)  # no plan yields it
    with LayeredDatabase(TuningDatabase.open(user_url), TuningDatabase.open_shipped()) as layered:
        stats = layered.stats()
    assert [layer["readonly"] for layer in stats["layers"]] == [False, True]
    assert stats["layers"][1]["studies"] > 0 and stats["layers"][0]["winners"] == 3
    h100 = stats["targets"]["h100"]["models"]
    mine = [w for w in h100["infinity-8b"] if w["scale"] == 12 and w["block_m"] == 128 and not w["dynamic"]]
    assert [(w["layer"], w["shadowed"], w["median_ms"]) for w in mine] == [(0, False, 0.01), (1, True, mine[1]["median_ms"])]
    picked = [w for w in h100["infinity-8b"] if w["scale"] == 12 and not w["dynamic"] and w["picked"]]
    assert picked == [mine[0]], "the user's faster 128x128 winner is what compile would take at scale 12"
    [found] = [w for w in h100["infinity-8b"] if w["block_m"] == 32]
    assert (found["scale"], found["resolution"], found["picked"]) == (12, 1024, False)  # 32x32: not compile's
    assert [w["picked"] for w in h100["unknown"]] == [None] and stats["summary"]["shadowed"] == 1
    assert all(w["model"] == "infinity-8b" for w in stats["targets"]["h200"]["models"]["infinity-8b"])
    text = format_stats(stats)
    assert "read-only" in text and "infinity-8b" in text and "shadowed" in text and "h200 (sm_90" in text
    json.dumps(stats)  # the CLI's --json prints it as it is
    # A hard mismatch passes the user's record over, as compile does.
    with LayeredDatabase(TuningDatabase.open(user_url), TuningDatabase.open_shipped()) as layered:
        refused = layered.stats({**ENV, "gpu_name": None, "gpu_arch": None, "sm_count": None, "triton": "9.0"})
    mine = [w for w in refused["targets"]["h100"]["models"]["infinity-8b"]
            if w["scale"] == 12 and w["block_m"] == 128 and not w["dynamic"]]
    assert "triton" in mine[0]["refused"] and not mine[1]["shadowed"]


def test_layered_stats(tmp_path):
    check_layered_stats(str(tmp_path / "user.sqlite"), tmp_path)


def test_default_database_url(monkeypatch, tmp_path):
    for var in ("SPARVAR_DB", "SPARVAR_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert user_database_path() == Path.home() / ".cache" / "sparvar" / "tuning.sqlite"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_database_path() == tmp_path / "xdg" / "sparvar" / "tuning.sqlite"
    assert default_database_url() == str(tmp_path / "xdg" / "sparvar" / "tuning.sqlite")
    monkeypatch.setenv("SPARVAR_CACHE_DIR", str(tmp_path / "cache"))
    assert user_database_path() == tmp_path / "cache" / "tuning.sqlite"
    monkeypatch.setenv("SPARVAR_DB", f"sqlite:///{tmp_path / 'env.sqlite'}")
    assert default_database_url() == f"sqlite:///{tmp_path / 'env.sqlite'}"
    with LayeredDatabase.open_default() as layered:
        layered.record_trial(SPEC, H100, cfg(), [1.0], environment=ENV)
        assert [layer.readonly for layer in layered.layers] == [False, True]
    with TuningDatabase.open() as db:  # the same database: $SPARVAR_DB
        assert len(db.trials()) == 1
    assert (tmp_path / "env.sqlite").is_file() and not (tmp_path / "cache").exists()
    monkeypatch.setenv("SPARVAR_DB", "")  # empty counts as unset
    assert default_database_url() == str(tmp_path / "cache" / "tuning.sqlite")
