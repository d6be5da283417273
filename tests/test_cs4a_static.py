"""Static CS4A tables: published budgets, group mapping, bands and key mappings vs straightforward references."""

import numpy as np
import pytest

from sparvar_compiler.planner import PlanConfig, cs4a_tables, key_mapping, make_plan
from sparvar_compiler.planner.cs4a import dcsla_capacity, group_mapping


def test_published_budgets_infinity_1024():
    t = cs4a_tables(make_plan("infinity-8b"))
    assert (t.decision_scale, t.decision_groups, t.topk) == (10, 9, 784)
    s11, s12 = t.scale(11), t.scale(12)
    assert (s11.groups, s12.groups) == (12, 22)
    assert (s11.band_capacity, s12.band_capacity) == (560, 784)
    assert (s11.budget, s12.budget) == (1344, 2128)
    assert s12.reused_bands == (11,)


def test_group_mapping_formula():
    for g_k, g_s in ((12, 9), (22, 9), (7, 7), (3, 10)):
        expected = [min(max(int(np.floor((g + 0.5) * g_s / g_k - 0.5 + 0.5)), 0), g_s - 1) for g in range(g_k)]
        assert list(group_mapping(g_k, g_s)) == expected
    assert list(group_mapping(9, 9)) == list(range(9))


@pytest.mark.parametrize("model, res, aspect", [("infinity-8b", 1024, "1:1"), ("infinity-2b", 1024, "4:7")])
def test_bands_are_window_unions(model, res, aspect):
    plan = make_plan(model, res, aspect)
    t = cs4a_tables(plan)
    for cs in t.scales:
        sp = plan.scales[cs.scale]
        r = plan.config.band_windows[cs.scale - t.decision_scale - 1] // 2
        for g in range(cs.groups):
            expected = set()
            for q in range(g * 192, min((g + 1) * 192, sp.tokens)):
                y, x = divmod(q, sp.w)
                for u in range(max(0, y - r), min(sp.h, y + r + 1)):
                    for v in range(max(0, x - r), min(sp.w, x + r + 1)):
                        expected.add(sp.kv_offset + u * sp.w + v)
            got = cs.band[g, :cs.band_len[g]]
            assert sorted(expected) == list(got)
            assert cs.band_len[g] <= cs.band_capacity and cs.band_capacity % t.key_tile == 0


@pytest.mark.parametrize("aspect", ["1:1", "2:5"])
def test_key_mappings(aspect):
    plan = make_plan("infinity-2b", 1024, aspect)
    S = plan.config.decision_scale
    n_s = plan.scales[S].kv_len
    for k in (11, 12):
        n_k = plan.scales[k].kv_len
        assert np.array_equal(key_mapping(plan, k, "identity"), np.arange(n_s))
        flat = key_mapping(plan, k, "flat")
        assert all(flat[i] == int(n_k / n_s * i) for i in (0, 1, n_s // 3, n_s - 1))
        dap = key_mapping(plan, k, "dap")
        shift = k - S
        for i in (0, 4, 30, n_s // 2, n_s - 1):
            j = max(s.index for s in plan.scales if s.kv_offset <= i)
            u, v = divmod(i - plan.scales[j].kv_offset, plan.scales[j].w)
            dst = plan.scales[j + shift]
            uu = int((u + 0.5) * dst.h / plan.scales[j].h)
            vv = int((v + 0.5) * dst.w / plan.scales[j].w)
            assert dap[i] == dst.kv_offset + uu * dst.w + vv
        assert dap.min() >= plan.scales[shift].kv_offset and dap.max() < n_k


def test_dap_adds_sinks_to_budget():
    t = cs4a_tables(make_plan("infinity-8b", config=PlanConfig(key_mapping="dap")))
    assert t.scale(11).sink_keys == 1 and t.scale(12).sink_keys == 5
    assert t.scale(12).budget == 2128 + 5


def test_no_tables_without_cs4a():
    assert cs4a_tables(make_plan("infinity-8b", config=PlanConfig(cs4a="off"))) is None
    assert cs4a_tables(make_plan("infinity-8b", config=PlanConfig(bound_layer=0))) is None


def test_dcsla_capacity():
    assert dcsla_capacity(165) == 82 and dcsla_capacity(20) == 16 and dcsla_capacity(10) == 10
