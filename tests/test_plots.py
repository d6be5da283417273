"""Pictures: the figures behind them (exact), and that each picture is a PNG of a readable size.

Manifests are built from a plan with the emitter's own dispatch rows (no kernels are compiled), so the numbers
checked here are the ones an emitted module's ``inspect --plot`` draws.
"""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import pytest

from sparvar_compiler.emit.cs4a import cs4a_scales
from sparvar_compiler.emit.emitter import _dispatch
from sparvar_compiler.emit.plots import (DENSE_CALL_OVERHEAD_MS, DENSE_TFLOPS, OPS, dense_attention_ms,
                                         dispatch_grid, expected_ms_per_scale, image_estimate, plot_dispatch)
from sparvar_compiler.errors import LayoutError, SparvarError
from sparvar_compiler.planner import PlanConfig, csla_layout, make_plan
from sparvar_compiler.planner.csla import key_scale_spans
from sparvar_compiler.planner.layout import BlockLayout

CSLA_MS = {10: 0.085, 11: 0.145, 12: 0.351}
CS4A_MS = {10: 0.112, 11: 0.215, 12: 0.535}


def _manifest(plan, gpu="h100", csla_ms=CSLA_MS, cs4a_ms=CS4A_MS, block=64):
    """The parts of an emitted manifest the plots read, for ``plan``: real dispatch rows, one CSLA kernel per
    scale with ``expected_ms`` from ``csla_ms`` (None = untuned), CS4A token kernels from ``cs4a_ms``."""
    kernels, by_scale = {}, {}
    for s in plan.scales:
        if s.has_csla:
            name = f"scale{s.index}_triton_block_{block}x{block}"
            layout = csla_layout(plan, s.index, block, block)
            ms = csla_ms.get(s.index)
            kernels[name] = {"scale": s.index, "expected_ms": ms, "tuned": ms is not None,
                             "sparsity": layout.sparsity()}
            by_scale[s.index] = name
    cs4a = None
    later = cs4a_scales(plan)
    if later:
        dec = plan.config.decision_scale
        cs4a = {"residual": True, "decision_scale": dec, "scales": {}}
        for i in (dec, *later):
            ms = cs4a_ms.get(i)
            cs4a["scales"][str(i)] = {"name": f"cs4a_scale{i}_gather", "expected_ms": ms, "tuned": ms is not None,
                                      "spec": {"kind": "gather", "capacity": 896, "block_n": 64}}
    return {"plan": plan.to_dict(), "target": {"name": gpu, "arch": "sm_90"}, "batch": 2, "dtype": "bf16",
            "dispatch": _dispatch(plan, by_scale), "kernels": kernels, "cs4a": cs4a}


@pytest.fixture(scope="module")
def plan8b():
    return make_plan("infinity-8b", 1024)


def _png_shape(path):
    image = pytest.importorskip("matplotlib.image")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return image.imread(path).shape


# ------------------------------------------------------------------------------------------ dispatch figures
def test_dispatch_grid_matches_the_manifest_rows(plan8b):
    m = _manifest(plan8b)
    ops, names = dispatch_grid(m)
    assert names == OPS and ops.shape == (40, 13)
    counts = dict(zip(OPS, np.bincount(ops.ravel(), minlength=len(OPS)).tolist()))
    manifest_ops = {"sdpa": "dense", "cs4a_decision": "decision", "cs4a": "CS4A", "kernel": "CSLA", "skip": "skip"}
    want = Counter(manifest_ops[r["op"]] for r in m["dispatch"])
    assert counts == {op: want.get(op, 0) for op in OPS}
    assert counts == {"dense": 400, "decision": 11, "CS4A": 22, "CSLA": 87, "skip": 0}
    for row in m["dispatch"]:
        assert OPS[ops[row["layer"], row["scale"]]] == manifest_ops[row["op"]]
    assert OPS[ops[10, 10]] == "decision" and OPS[ops[11, 10]] == "CSLA" and OPS[ops[0, 12]] == "CS4A"


def test_dispatch_grid_skip_and_static_plans():
    ops, _ = dispatch_grid(_manifest(make_plan("infinity-8b", 1024, config=PlanConfig(skip_last=2))))
    assert dict(zip(OPS, np.bincount(ops.ravel(), minlength=5).tolist())) == \
        {"dense": 411, "decision": 0, "CS4A": 0, "CSLA": 29, "skip": 80}
    assert (ops[:, 11:] == OPS.index("skip")).all()
    ops, _ = dispatch_grid(_manifest(make_plan("infinity-8b", 1024, config=PlanConfig(bound_layer=0))))
    assert (ops[:, 10:] == OPS.index("CSLA")).all() and (ops[:, :10] == OPS.index("dense")).all()


def test_dispatch_grid_refuses_a_malformed_dispatch(plan8b):
    m = _manifest(plan8b)
    m["dispatch"] = m["dispatch"][1:]
    with pytest.raises(SparvarError, match="no row for scale 0, layer 0"):
        dispatch_grid(m)
    m = _manifest(plan8b)
    m["dispatch"][3]["op"] = "flash"
    with pytest.raises(SparvarError, match="'flash'"):
        dispatch_grid(m)
    m = _manifest(plan8b)
    m["dispatch"].append(dict(m["dispatch"][0]))
    with pytest.raises(SparvarError, match="repeated"):
        dispatch_grid(m)


def _dense(q, kv, heads=28, rate=570.0):
    return 4 * 2 * heads * q * kv * 128 / (rate * 1e12) * 1e3 + DENSE_CALL_OVERHEAD_MS


def test_expected_ms_per_scale_exact(plan8b):
    per = expected_ms_per_scale(_manifest(plan8b))
    assert [p["scale"] for p in per] == list(range(13))
    s12, s10, s3 = per[12], per[10], per[3]
    assert (s12["q_len"], s12["kv_len"], s12["grid"]) == (4096, 10521, (64, 64))
    assert s12["dense_ms"] == pytest.approx(_dense(4096, 10521), rel=1e-12)
    assert s12["dense_ms"] == pytest.approx(2.184, abs=1e-3)  # SPEC.md measured 2.169 ms (cuDNN, H100)
    assert s12["calls"] == {"dense": 0, "decision": 0, "CS4A": 11, "CSLA": 29, "skip": 0}
    assert s12["csla"]["ms"] == s12["csla"]["cost_ms"] == 0.351 and s12["csla"]["tuned"]
    assert s12["cs4a"]["ms"] == 0.535 and s12["cs4a"]["kept"] == pytest.approx(896 / 10521)
    assert s12["image_ms"]["sparse"] == pytest.approx(11 * 0.535 + 29 * 0.351, rel=1e-12)
    assert s12["image_ms"]["dense"] == pytest.approx(40 * _dense(4096, 10521), rel=1e-12)
    # decision scale: dense plus the residual pass below the bound layer, CSLA above it
    assert s10["calls"] == {"dense": 0, "decision": 11, "CS4A": 0, "CSLA": 29, "skip": 0}
    assert s10["residual"]["ms"] == 0.112 and s10["cs4a"] is None
    assert s10["image_ms"]["sparse"] == pytest.approx(11 * (_dense(1600, 4121) + 0.112) + 29 * 0.085, rel=1e-12)
    assert s3["csla"] is None and s3["calls"]["dense"] == 40
    assert s3["image_ms"]["sparse"] == s3["image_ms"]["dense"] == pytest.approx(40 * _dense(36, 57), rel=1e-12)
    est = image_estimate(_manifest(plan8b))
    assert est["sparse"] == pytest.approx(sum(p["image_ms"]["sparse"] for p in per), rel=1e-12)
    assert est["dense"] == pytest.approx(sum(p["image_ms"]["dense"] for p in per), rel=1e-12)
    # the dense model reproduces SPEC.md's 3.67 ms per layer over all 13 scales (cuDNN, H100) within 1%
    assert est["dense"] / 40 == pytest.approx(3.67, rel=0.01)
    assert est["untuned"] == [] and est["rate_measured"]
    assert est["speedup"] == pytest.approx(est["dense"] / est["sparse"])


def test_untuned_kernels_get_a_flop_estimate_and_are_named(plan8b):
    m = _manifest(plan8b, csla_ms={10: 0.085, 11: 0.145}, cs4a_ms={10: 0.112, 11: 0.215})
    s12 = expected_ms_per_scale(m)[12]
    dense = _dense(4096, 10521)
    kept = 1.0 - m["kernels"]["scale12_triton_block_64x64"]["sparsity"]
    assert s12["csla"]["ms"] is None and not s12["csla"]["tuned"]
    assert s12["csla"]["cost_ms"] == pytest.approx(kept * (dense - DENSE_CALL_OVERHEAD_MS) + DENSE_CALL_OVERHEAD_MS)
    assert s12["cs4a"]["cost_ms"] == pytest.approx(896 / 10521 * (dense - DENSE_CALL_OVERHEAD_MS)
                                                   + DENSE_CALL_OVERHEAD_MS)
    assert image_estimate(m)["untuned"] == ["cs4a_scale12_gather", "scale12_triton_block_64x64"]


def test_skipped_scales_cost_nothing_and_unknown_gpus_have_no_dense_figure():
    plan = make_plan("infinity-8b", 1024, config=PlanConfig(skip_last=2))
    est = image_estimate(_manifest(plan))
    per = expected_ms_per_scale(_manifest(plan))
    assert per[12]["image_ms"] == {"sparse": 0.0, "dense": 0.0,
                                   "dense_unskipped": pytest.approx(40 * _dense(4096, 10521))}
    assert est["dense_unskipped"] > est["dense"] > est["sparse"] > 0
    assert dense_attention_ms(4096, 10521, 2, 28, 128, "mystery-gpu") is None
    unknown = image_estimate(_manifest(make_plan("infinity-8b", 1024), gpu="mystery-gpu"))
    assert unknown["sparse"] is None and unknown["dense"] is None and unknown["rate_tflops"] is None
    assert set(DENSE_TFLOPS) >= {"h100", "h200"}


def test_plot_dispatch_writes_a_readable_png(tmp_path, plan8b):
    pytest.importorskip("matplotlib")
    out = plot_dispatch(_manifest(plan8b), tmp_path / "sub" / "dispatch.png")
    h, w = _png_shape(out)[:2]
    assert w >= 1600 and h >= 800
    untuned = _manifest(make_plan("infinity-2b", 256, config=PlanConfig(cs4a="off")), gpu="a100", csla_ms={})
    h, w = _png_shape(plot_dispatch(untuned, tmp_path / "untuned.png"))[:2]
    assert w >= 1600 and h >= 700
    unknown = _manifest(make_plan("infinity-8b", 1024, config=PlanConfig(skip_last=2)), gpu="mystery-gpu")
    assert _png_shape(plot_dispatch(unknown, tmp_path / "unknown.png"))[1] >= 1600


def test_plots_name_the_extra_when_matplotlib_is_missing(tmp_path, monkeypatch, plan8b):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(SparvarError, match=r"sparvar-compiler\[plot\]"):
        plot_dispatch(_manifest(plan8b), tmp_path / "x.png")
    with pytest.raises(SparvarError, match=r"sparvar-compiler\[plot\]"):
        BlockLayout.dense(128, 128, 64, 64).plot(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("aspect", ["1:1", "4:3"])
def test_key_scale_spans_tile_the_kv_cache(aspect):
    plan = make_plan("infinity-8b", 1024, aspect)
    for q in range(plan.num_scales):
        spans = key_scale_spans(plan, q)
        assert [s[0] for s in spans] == list(range(q + 1))
        assert spans[0][1] == 0
        assert all(a[1] + a[2] == b[1] for a, b in zip(spans, spans[1:]))
        assert sum(s[2] for s in spans) == plan.scale(q).kv_len
        assert spans[-1] == (q, plan.scale(q).kv_offset, plan.scale(q).tokens)
    with pytest.raises(LayoutError, match="out of range"):
        key_scale_spans(plan, plan.num_scales)


def test_layout_plot_with_key_scales(tmp_path, plan8b):
    pytest.importorskip("matplotlib")
    layout = csla_layout(plan8b, 12, 64, 64)  # 64 x 165 blocks
    long_title = "infinity-8b scale 12 (64x64): " + layout.summary() + " and a long tail " * 8
    out = layout.plot(tmp_path / "a" / "s12.png", title=long_title, key_scales=key_scale_spans(plan8b, 12))
    h, w = _png_shape(out)[:2]
    assert w >= 1500 and h >= 600
    square = BlockLayout.from_block_mask(np.eye(165, dtype=bool), 10521, 10521, 64, 64)
    spans = key_scale_spans(plan8b, 12)
    h, w = _png_shape(square.plot(tmp_path / "sq.png", key_scales=spans, query_spans=spans))[:2]
    assert w >= 1500 and h >= 1300  # ~8 pixels a block each way
    assert _png_shape(BlockLayout.dense(100, 300, 64, 64).plot(tmp_path / "tiny.png"))[1] >= 700


# ------------------------------------------------------------------------------------------ fidelity heat map
def _rgb(hex_colour):
    return np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])


def test_heatmap_colours_separate_the_floor_from_one():
    from sparvar_compiler.fidelity.report import mass_bins, mass_colour

    edges, colours = mass_bins(0.9)
    assert len(edges) == len(colours) + 1 and edges[0] == 0.0 and edges[-1] == 1.0 and 0.9 in edges
    assert np.all(np.diff(edges) > 0)
    c90, c100, c899, c99 = (_rgb(mass_colour(v)) for v in (0.9, 1.0, 0.899, 0.99))
    assert np.linalg.norm(c90 - c100) > 0.6           # pale vs dark: clearly different
    assert c899[0] > c899[2] and c90[2] > c90[0]       # under the floor red, at it blue
    assert len({mass_colour(v) for v in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999)}) == 8
    assert mass_colour(0.9995) == mass_colour(1.0)     # the top bin is [0.999, 1]
    assert np.linalg.norm(c99 - c100) > 0.2
    assert mass_colour(float("nan")) == mass_colour(None) != mass_colour(0.0)
    assert mass_colour(1.0000001) == mass_colour(1.0) and mass_colour(-0.1) == mass_colour(0.0)
    assert 0.95 in mass_bins(0.95)[0]
    with pytest.raises(ValueError, match="floor"):
        mass_bins(1.0)


def test_write_heatmap_png(tmp_path):
    pytest.importorskip("matplotlib")
    from sparvar_compiler.fidelity.evaluate import EvalOptions, Evaluation, Record
    from sparvar_compiler.fidelity.report import heatmap_grid, write_heatmap

    plan = make_plan("infinity-2b", 256)
    records = [Record(scale, layer, 0, mode, "local", mass=m, density=0.3)
               for scale in (4, 5, 6) for layer in (0, 8, 9, 31)
               for mode, m in (("csla_block", 1.0), ("sparvar", 0.9 + 0.01 * scale), ("random", 0.5))]
    records.append(Record(5, 0, 0, "cs4a_token", "local", mass=0.97, density=0.1))
    ev = Evaluation(plan, EvalOptions(), {"kind": "synthetic", "preset": {"name": "local"}}, records)
    _, _, grid = heatmap_grid(ev, "cs4a_token")
    assert np.isnan(grid).sum() == grid.size - 1
    out = write_heatmap(ev, tmp_path / "f" / "fidelity.png")
    h, w = _png_shape(out)[:2]
    assert w >= 1000 and h >= 450
