"""Registry, schedules, plan modes and plan-config validation."""

import json

import pytest

from sparvar_compiler.errors import GpuError, ModelError, PlanConfigError, ScheduleError
from sparvar_compiler.planner import Mode, Plan, PlanConfig, get_gpu, get_model, list_models, make_plan
from sparvar_compiler.planner.config import config_from_mapping, load_config_file
from sparvar_compiler.planner.gpus import gpu_from_device_name
from sparvar_compiler.planner.models import load_model_file
from sparvar_compiler.planner.schedules import parse_schedule


def test_infinity_cumulative_kv_lengths():
    s = get_model("infinity-8b").schedule(1024, "1:1")
    assert s.kv_lens == (1, 5, 21, 57, 121, 265, 521, 921, 1497, 2521, 4121, 6425, 10521)


@pytest.mark.parametrize("aspect, total", [("5:4", 10774), ("4:3", 10973), ("3:2", 10997), ("7:4", 11252),
                                           ("2:1", 11269), ("5:2", 10805), ("3:1", 11123)])
def test_infinity_aspect_totals_and_inverses(aspect, total):
    m = get_model("infinity-2b")
    s = m.schedule(1024, aspect)
    a, b = aspect.split(":")
    inv = m.schedule(1024, f"{b}:{a}")
    assert s.total_tokens == total == inv.total_tokens
    assert inv.grids == tuple((w, h) for h, w in s.grids)
    assert s.grids[-1][0] >= s.grids[-1][1]  # height over width: 5:4 is taller than wide


def test_infinity_has_15_aspects_and_resolution_prefixes():
    m = get_model("infinity-8b")
    assert len(m.aspects(1024)) == 15
    full = m.schedule(1024)
    for res, n in ((768, 12), (512, 10), (256, 7)):
        assert m.schedule(res).grids == full.grids[:n]
    assert m.schedule("0.25M").grids == full.grids[:10]
    assert m.schedule(1024, "1.333").aspect == "4:3"


def test_var_schedules():
    assert get_model("var-d16").schedule().total_tokens == 680
    assert get_model("var-d36").schedule(512).total_tokens == 2240
    big = get_model("var-d36").schedule(1024)
    assert big.total_tokens == 9451 and big.config_only
    d30 = get_model("var-d30")
    assert (d30.depth, d30.heads, d30.width, d30.head_dim) == (30, 30, 1920, 64)


def test_registry_shapes():
    m = get_model("infinity-8b")
    assert (m.depth, m.width, m.heads, m.head_dim) == (40, 3584, 28, 128)
    assert get_model("infinity-20b").heads == 36
    assert set(list_models()) >= {"infinity-2b", "infinity-8b", "infinity-20b", "var-d16", "var-d20", "var-d24",
                                  "var-d30", "var-d36"}


def test_gpu_registry():
    h100 = get_gpu("h100")
    assert (h100.arch, h100.sm_count, h100.capability) == ("sm_90", 132, (9, 0))
    assert get_gpu("B200").arch == "sm_100" and get_gpu("l40s").sm_count == 142
    assert gpu_from_device_name("NVIDIA H100 80GB HBM3").name == "h100"
    assert gpu_from_device_name("NVIDIA H200").name == "h200"
    with pytest.raises(GpuError, match="known GPUs: h100"):
        get_gpu("v100")


def test_default_plan_infinity_8b_matches_sparvar():
    plan = make_plan("infinity-8b")
    c = plan.config
    assert (c.decision_scale, c.bound_layer, c.sink_scales) == (10, 11, 5)
    assert c.windows == (-1,) * 8 + (1, 1, 3, 5, 7)
    for s in plan.scales[:10]:
        assert set(s.modes) == {Mode.DENSE}
    s10, s12 = plan.scales[10], plan.scales[12]
    assert s10.modes[:11] == (Mode.DECISION,) * 11 and s10.modes[11:] == (Mode.CSLA,) * 29
    assert s12.modes[:11] == (Mode.CS4A,) * 11 and s12.modes[11:] == (Mode.CSLA,) * 29
    assert (s12.tokens, s12.kv_offset, s12.kv_len) == (4096, 6425, 10521)


def test_plan_options_static_off_and_skip():
    static = make_plan("infinity-8b", config=PlanConfig(bound_layer=0))
    assert all(m == Mode.CSLA for s in static.scales[10:] for m in s.modes)
    off = make_plan("infinity-8b", config=PlanConfig(cs4a="off"))
    assert off.scales[11].modes[:11] == (Mode.DENSE,) * 11
    skip = make_plan("infinity-8b", config=PlanConfig(skip_last=2))
    assert set(skip.scales[11].modes) == set(skip.scales[12].modes) == {Mode.SKIPPED}
    assert skip.scales[12].kv_len == 10521


@pytest.mark.parametrize("model, res, decision, bound, sinks", [
    ("var-d16", 256, 7, 4, 5), ("var-d30", 256, 7, 8, 5), ("infinity-2b", 256, 4, 9, 2),
    ("infinity-2b", 512, 7, 9, 5), ("infinity-20b", 1024, 10, 16, 5),
])
def test_documented_defaults_for_other_models(model, res, decision, bound, sinks):
    c = make_plan(model, res).config
    assert (c.decision_scale, c.bound_layer, c.sink_scales) == (decision, bound, sinks)
    assert c.windows[-5:] == (1, 1, 3, 5, 7)[-len(c.windows):]


def test_every_registered_schedule_plans():
    count = 0
    for name in list_models():
        m = get_model(name)
        for s in m.schedules:
            plan = make_plan(m, s.resolution, s.aspect)
            assert [sp.kv_len for sp in plan.scales] == list(s.kv_lens)
            count += 1
    assert count == 3 * 60 + 4 + 2


def test_plan_json_round_trip():
    plan = make_plan("infinity-2b", 1024, "2:1", PlanConfig(skip_last=1, key_mapping="dap"))
    back = Plan.from_dict(json.loads(plan.to_json()))
    assert back == plan


@pytest.mark.parametrize("change, match", [
    (dict(decision_scale=13), "decision_scale 13 is out of range"),
    (dict(decision_scale=0), "decision_scale 0 is out of range"),
    (dict(bound_layer=41), "bound_layer 41 is out of range"),
    (dict(windows=(1, 2, 3)), "windows has 3 entries but the schedule has 13"),
    (dict(sink_scales=11), "sink_scales 11"),
    (dict(skip_last=3), "would skip the decision scale"),
    (dict(windows=(0,) * 13), r"windows\[0\] = 0"),
])
def test_plan_config_errors_name_the_problem(change, match):
    with pytest.raises(PlanConfigError, match=match):
        make_plan("infinity-8b", config=PlanConfig(**change))


@pytest.mark.parametrize("data, match", [
    ({"decison_scale": 9}, "unknown option 'decison_scale'"),
    ({"cs4a": "maybe"}, "'cs4a' must be one of"),
    ({"windows": "a,b"}, "'windows' must be a list of integers"),
    ({"token_exact": "yes"}, "'token_exact' must be true or false"),
    ({"topk_fraction": 2}, "'topk_fraction'"),
    ([1, 2], "expected a mapping"),
])
def test_plan_config_mapping_errors(data, match):
    with pytest.raises(PlanConfigError, match=match):
        config_from_mapping(data, "cfg.yaml")


def test_plan_config_yaml_file(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_text("decision_scale: 9\nbound_layer: 20\nwindows: [-1, -1, -1, -1, -1, -1, -1, 1, 1, 3, 5, 7, 9]\n")
    plan = make_plan("infinity-8b", config=load_config_file(p))
    assert plan.config.decision_scale == 9 and plan.scales[9].modes[0] == Mode.DECISION
    assert plan.config.windows[-1] == 9


MODEL_YAML = """
name: tiny-var
family: var
depth: 6
heads: 4
head_dim: 64
schedules:
  - resolution: 128
    scales: "1,2,3x4,6x8,8x10,12x16"
"""


def test_user_model_yaml(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text(MODEL_YAML)
    m = load_model_file(p)
    assert m.width == 256 and m.schedule().grids[2] == (3, 4)
    plan = make_plan(str(p))
    assert plan.config.decision_scale == 3 and plan.num_scales == 6


@pytest.mark.parametrize("edit, match", [
    (("depth: 6", "depth: six"), "'depth' must be a positive integer"),
    (("heads: 4\n", ""), "missing field 'heads'"),
    (('"1,2,3x4,6x8,8x10,12x16"', '"1,2,3x4,2x2"'), r"scales\[3\]: grid 2x2 is smaller"),
    (('"1,2,3x4,6x8,8x10,12x16"', '"1,2,3y4"'), r"scales\[2\]"),
    (("family: var", "famly: var"), "unknown field 'famly'"),
    (("name: tiny-var", "name: ''"), "'name' must be a non-empty string"),
])
def test_user_model_yaml_errors_name_the_field(tmp_path, edit, match):
    p = tmp_path / "m.yaml"
    p.write_text(MODEL_YAML.replace(*edit))
    with pytest.raises(ModelError, match=match):
        load_model_file(p)


def test_unknown_model_resolution_aspect():
    with pytest.raises(ModelError, match="known models: infinity-2b"):
        get_model("infinity-3b")
    with pytest.raises(ScheduleError, match="this model has: 256, 512, 768, 1024"):
        make_plan("infinity-8b", 2048)
    with pytest.raises(ScheduleError, match="unknown aspect ratio '16:9'"):
        make_plan("infinity-8b", 1024, "16:9")
    with pytest.raises(ScheduleError):
        parse_schedule("1")
