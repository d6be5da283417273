"""Fidelity report and calibration: float64 figures vs straightforward references, captures that must be refused,
the synthetic regimes, random baselines over several draws, summary rows over the same layers, the softmax scale
in every report, and a calibration that reports its pick's error and never recommends a plan below its floor or
above its error cap.

Shapes are small (a 9-scale custom model, last scale 32x32) so the file runs in well under a minute on 2 cores.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from sparvar_compiler.cli import main
from sparvar_compiler.cs4a.select import cs4a_masks, decision_mask, group_mass_reference, upsample_residual
from sparvar_compiler.errors import PlanConfigError, SparvarError
from sparvar_compiler.fidelity.calibrate import (Floor, SearchSpace, calibrate, grown_windows, pareto_front,
                                                 plan_cost)
from sparvar_compiler.fidelity.captures import CaptureError, CaptureSet
from sparvar_compiler.fidelity.evaluate import ALL_MODES, EvalOptions, evaluate, sample_rows
from sparvar_compiler.fidelity.hooks import CaptureWriter, capture_sdpa
from sparvar_compiler.fidelity.masks import (CS4ASelector, cs4a_layer_masks, cs4a_plan, decision_band_mask,
                                             random_block_draw)
from sparvar_compiler.fidelity.metrics import (captured_mass, cosine_similarity, masked_output, relative_l2,
                                               sparse_attention)
from sparvar_compiler.fidelity.modes import DEFAULT_MAX_ERROR
from sparvar_compiler.fidelity.report import format_report, summarise
from sparvar_compiler.fidelity.synthetic import SyntheticSource, synthetic_head, write_synthetic_captures
from sparvar_compiler.fidelity.tensorfile import read_tensors, write_tensors
from sparvar_compiler.planner import PlanConfig, get_model, load_config_file, make_plan
from sparvar_compiler.planner.config import check_runtime_support
from sparvar_compiler.planner.csla import csla_layout, csla_token_mask

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
BLOCK = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.yaml"
    path.write_text(TINY)
    return get_model(path)


@pytest.fixture(scope="module")
def tiny_plan(tiny):
    # Decision scale 6 (16x16), bound layer 1, groups of 64 queries: several groups per scale.
    return make_plan(tiny, config=PlanConfig(group_size=64, dcsla_block=16, dcsla_min_blocks=4))


# ---------------------------------------------------------------------------------------------- references
def _ref_softmax_row(logits):
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    s = sum(e)
    return [x / s for x in e]


def _ref_metrics(q, k, v, mask, scale):
    """Loops over rows: (mass [B,H,R], sparse out [B,H,R,D], dense out) in float64 python/numpy."""
    B, H, R, _ = q.shape
    N, D = k.shape[2], v.shape[3]
    mass = np.zeros((B, H, R))
    out = np.zeros((B, H, R, D))
    dense = np.zeros((B, H, R, D))
    for b in range(B):
        for h in range(H):
            for r in range(R):
                logits = [float(np.dot(q[b, h, r], k[b, h, j])) * scale for j in range(N)]
                p = _ref_softmax_row(logits)
                dense[b, h, r] = sum(p[j] * v[b, h, j] for j in range(N))
                keep = [j for j in range(N) if mask[b, h, r, j]]
                mass[b, h, r] = sum(p[j] for j in keep)
                if keep:
                    ps = _ref_softmax_row([logits[j] for j in keep])
                    out[b, h, r] = sum(pj * v[b, h, j] for pj, j in zip(ps, keep))
    return mass, out, dense


def _ref_rel_cos(x, ref):
    rel = [np.linalg.norm(x[:, h] - ref[:, h]) / np.linalg.norm(ref[:, h]) for h in range(x.shape[1])]
    cos = []
    for h in range(x.shape[1]):
        vals = []
        for b in range(x.shape[0]):
            for r in range(x.shape[2]):
                a, c = x[b, h, r], ref[b, h, r]
                n = np.linalg.norm(a) * np.linalg.norm(c)
                vals.append(float(a @ c / n) if n > 0 else 0.0)
        cos.append(np.mean(vals))
    return np.array(rel), np.array(cos)


def test_metrics_match_loop_reference(rng):
    B, H, R, N, D = 2, 2, 5, 13, 8
    q, k, v = (rng.standard_normal((B, H, n, D)) for n in (R, N, N))
    mask = rng.random((B, H, R, N)) < 0.4
    mask[0, 0, 1] = False  # an empty row: output 0, like the kernels
    mass, out, dense = _ref_metrics(q, k, v, mask, 0.7)
    qt, kt, vt, mt = (torch.from_numpy(a) for a in (q, k, v, mask))
    L = qt @ kt.transpose(-1, -2) * 0.7
    P = torch.softmax(L, -1)
    np.testing.assert_allclose(captured_mass(P, mt).numpy(), mass, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(masked_output(L, vt, mt).numpy(), out, rtol=1e-10, atol=1e-13)
    m2, o2 = sparse_attention(P, L, vt, mt)
    np.testing.assert_allclose(o2.numpy(), out, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(m2.numpy(), mass, rtol=1e-12, atol=1e-15)
    rel, cos = _ref_rel_cos(out, dense)
    np.testing.assert_allclose(relative_l2(torch.from_numpy(out), torch.from_numpy(dense)).numpy(), rel, rtol=1e-12)
    np.testing.assert_allclose(cosine_similarity(torch.from_numpy(out), torch.from_numpy(dense)).numpy(), cos,
                               rtol=1e-12)


def test_sparse_attention_recovers_underflowed_rows():
    # Kept keys 2000 below the row maximum: their dense probabilities underflow to 0 in float64.
    L = torch.tensor([[[[0.0, -2000.0, -2001.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[1.0], [2.0], [4.0]]]], dtype=torch.float64)
    mask = torch.tensor([[[[False, True, True]]]])
    mass, out = sparse_attention(torch.softmax(L, -1), L, v, mask)
    assert float(mass) == 0.0
    e = math.exp(-1.0)
    assert float(out) == pytest.approx((2.0 + 4.0 * e) / (1.0 + e), rel=1e-12)


# ---------------------------------------------------------------------------------------------- CS4A masks
def test_group_mass_reference_is_the_whole_matrix_definition(rng):
    q = torch.from_numpy(rng.standard_normal((1, 2, 150, 16)))
    k = torch.from_numpy(rng.standard_normal((1, 2, 230, 16)))
    # One group at a time equals the whole softmax matrix summed per group, to rounding (row alignment changes
    # vectorised summation order), so top-k choices match but for exact ties.
    p = torch.softmax(q @ k.transpose(-1, -2) * 0.4, dim=-1)
    whole = torch.stack([p[:, :, g * 64:(g + 1) * 64].sum(2) for g in range(3)], dim=2)
    torch.testing.assert_close(group_mass_reference(q, k, 0.4, 64), whole, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("mode, mapping", [("token", "identity"), ("token", "dap"), ("token", "flat"),
                                           ("block", "identity")])
def test_row_masks_equal_cs4a_masks(tiny, tiny_plan, mode, mapping):
    src = SyntheticSource(tiny, "content", heads=2, batch=2, seed=3)
    S = tiny_plan.config.decision_scale
    q, k, _ = (torch.from_numpy(np.ascontiguousarray(a)) for a in src.qkv(S, 0))
    cplan = cs4a_plan(tiny_plan, mode, mapping)
    sc = src.softmax_scale
    ref = cs4a_masks(cplan, q, k, sc, mapping=mapping, mode=mode)
    assert set(ref) == {7, 8}
    rows = {s: sample_rows(cplan.scales[s].tokens, 40, 1, s) for s in ref}
    sel = CS4ASelector(q, k, sc)
    got = sel.masks(cplan, mode, mapping, rows)
    for s, m in ref.items():
        assert torch.equal(got[s][0], m[:, :, rows[s]])
        assert got[s][1] == pytest.approx(float(m.double().sum(-1).mean()), rel=1e-12)
    assert torch.equal(sel.decision_mask(cplan, mode), decision_mask(cplan, q, k, sc, mapping=mapping, mode=mode))


# ---------------------------------------------------------------------------------------------- evaluation
def _block_mask(token_mask, block):
    """Independent coarsening: a block is active if any pair in it is kept; active blocks whole."""
    qn, kn = token_mask.shape
    out = np.zeros_like(token_mask)
    for i in range(0, qn, block):
        for j in range(0, kn, block):
            if token_mask[i:i + block, j:j + block].any():
                out[i:i + block, j:j + block] = True
    return out


def _gather_mask(token_mask, block):
    out = np.zeros_like(token_mask)
    for i in range(0, token_mask.shape[0], block):
        out[i:i + block] = token_mask[i:i + block].any(axis=0)
    return out


def test_evaluate_matches_float64_reference(tiny, tiny_plan):
    src = SyntheticSource(tiny, "mixed", heads=2, batch=1, seed=5)
    opts = EvalOptions(block=BLOCK, query_sample=24, modes=ALL_MODES, layers=(0, 2), seed=2)
    ev = evaluate(src, tiny_plan, opts, progress=None)
    cfg = tiny_plan.config
    by = {(r.scale, r.layer, r.head, r.mode): r for r in ev.records}
    S = cfg.decision_scale
    sc = src.softmax_scale  # custom: no family default, SDPA's 1/sqrt(32); the synthetic logits do not depend on it
    assert sc == pytest.approx(32 ** -0.5) and ev.softmax_scale == sc
    for layer in (0, 2):
        qS, kS, vS = src.qkv(S, layer)
        LS = torch.from_numpy(np.ascontiguousarray(qS)) @ torch.from_numpy(kS).transpose(-1, -2) * sc
        for s in range(S, tiny_plan.num_scales):
            rows = sample_rows(tiny_plan.scales[s].tokens, 24, 2, s)
            q, k, v = src.qkv(s, layer)
            q = np.ascontiguousarray(q[:, :, rows])
            exact = csla_token_mask(tiny_plan.grids, s, cfg.windows, cfg.sink_scales)
            masks = {"csla_exact": exact, "csla_block": _block_mask(exact, BLOCK),
                     "csla_gather": _gather_mask(exact, BLOCK)}
            mode = tiny_plan.scales[s].modes[layer].value
            masks["sparvar"] = masks["csla_block"] if mode == "csla" else None
            if s > S:
                cplan = cs4a_plan(tiny_plan, "token", "identity")
                full = cs4a_masks(cplan, torch.from_numpy(np.ascontiguousarray(qS)), torch.from_numpy(kS), sc)[s]
                masks["cs4a_token"] = full.numpy()[:, :, rows]
            for name, m in masks.items():
                if m is None:
                    continue
                mm = np.broadcast_to(m[rows] if m.ndim == 2 else m, (1, 2, len(rows), k.shape[2]))
                mass, out, dense = _ref_metrics(q, k, v, mm, sc)
                if name == "cs4a_token":
                    # SparVAR's residual: the decision scale's dense minus sparse output, upsampled.
                    dm = decision_mask(cplan, torch.from_numpy(np.ascontiguousarray(qS)), torch.from_numpy(kS), sc)
                    P = torch.softmax(LS, -1)
                    res = P @ torch.from_numpy(vS) - masked_output(LS, torch.from_numpy(vS), dm)
                    out = out + upsample_residual(res, cplan, s).numpy()[:, :, rows]
                rel, cos = _ref_rel_cos(out, dense)
                for h in range(2):
                    r = by[(s, layer, h, name)]
                    assert r.mass == pytest.approx(mass[0, h].mean(), rel=1e-9), (s, layer, name)
                    assert r.mass_min == pytest.approx(mass[0, h].min(), rel=1e-9, abs=1e-12)
                    assert r.rel_l2 == pytest.approx(rel[h], rel=1e-7, abs=1e-10), (s, layer, name)
                    assert r.cosine == pytest.approx(cos[h], rel=1e-9)
    # The random layout keeps as many blocks per query block as CSLA, elsewhere.
    for s in range(S, tiny_plan.num_scales):
        r_rand = [r for r in ev.records if r.scale == s and r.mode == "random"]
        r_csla = [r for r in ev.records if r.scale == s and r.mode == "csla_block"]
        assert r_rand[0].density == pytest.approx(r_csla[0].density, abs=0.03)


def test_skip_last_reports_skipped_scales(tiny):
    plan = make_plan(tiny, config=PlanConfig(skip_last=1, group_size=64))
    src = SyntheticSource(tiny, "local", heads=1, seed=1)
    ev = evaluate(src, plan, EvalOptions(block=BLOCK, query_sample=16, layers=(3,)), progress=None)
    last = plan.num_scales - 1
    assert [r.status for r in ev.records if r.scale == last and r.mode == "sparvar"] == ["skipped"]
    assert any(r.mode == "skip_upsample" and r.rel_l2 is not None for r in ev.records if r.scale == last)
    assert not any(r.mode == "csla_block" for r in ev.records if r.scale == last)


# ---------------------------------------------------------------------------------------------- synthetic
def test_synthetic_logits_are_the_documented_terms(tiny, rng):
    from sparvar_compiler.fidelity.synthetic import HeadKnobs

    knobs = HeadKnobs(sink_strength=-1.5, locality_width=1.3, cross_scale_similarity=0.8, content_strength=0.0)
    sched = tiny.schedule()
    q, k, _ = synthetic_head(sched, knobs, 32, 6, 4, np.random.default_rng(0))
    off, grids = sched.kv_offsets, sched.grids
    for _ in range(50):
        s = int(rng.integers(4, len(grids)))
        t = int(rng.integers(0, s + 1))
        (hq, wq), (hk, wk) = grids[s], grids[t]
        i, j = int(rng.integers(hq * wq)), int(rng.integers(hk * wk))
        (y, x), (u, w) = divmod(i, wq), divmod(j, wk)
        dy = hq * ((y + 0.5) / hq - (u + 0.5) / hk)
        dx = wq * ((x + 0.5) / wq - (w + 0.5) / wk)
        want = -1.5 if t < 4 else -(dy * dy + dx * dx) / (2 * 1.3 ** 2)
        assert q[off[s] + i] @ k[off[t] + j] == pytest.approx(want, abs=1e-9)


def test_regimes_local_vs_content(tiny, tiny_plan):
    """Local heads: CSLA keeps most of the mass and beats random clearly (random keeps the sink blocks too, which
    hold much of a local head's mass on this small model). Content heads: it does not, CS4A does."""
    opts = EvalOptions(block=BLOCK, query_sample=64, layers=(0, 1), modes=("csla_block", "random", "cs4a_token",
                                                                           "random_cs4a"))

    def mean(ev, mode):
        return np.mean([r.mass for r in ev.records if r.mode == mode and r.scale > tiny_plan.config.decision_scale])

    local = evaluate(SyntheticSource(tiny, "local", heads=2), tiny_plan, opts, progress=None)
    content = evaluate(SyntheticSource(tiny, "content", heads=2), tiny_plan, opts, progress=None)
    assert mean(local, "csla_block") > 0.9 and mean(local, "csla_block") > mean(local, "random") + 0.3
    assert mean(content, "csla_block") < 0.75
    assert mean(content, "cs4a_token") > mean(content, "csla_block") + 0.1
    assert mean(content, "cs4a_token") > mean(content, "random_cs4a") + 0.3


def test_random_baseline_is_mean_and_sd_over_draws_per_layer_and_head(tiny, tiny_plan):
    """Each (layer, head) gets its own draws; the record is their mean and sd; the sink blocks are kept and the
    density is csla_block's."""
    src = SyntheticSource(tiny, "local", heads=2, seed=3)
    draws, rows_n, seed = 5, 20, 4
    ev = evaluate(src, tiny_plan, EvalOptions(block=BLOCK, query_sample=rows_n, modes=("csla_block", "random"),
                                              layers=(1, 2), seed=seed, random_draws=draws), progress=None)
    S = tiny_plan.config.decision_scale
    sink_keys = tiny_plan.scales[tiny_plan.config.sink_scales].kv_offset
    for s in (S, S + 2):
        layout = csla_layout(tiny_plan, s, BLOCK, BLOCK)
        rows = sample_rows(tiny_plan.scales[s].tokens, rows_n, seed, s)
        masks = {}
        for layer in (1, 2):
            q, k, v = src.qkv(s, layer)
            L = torch.from_numpy(np.ascontiguousarray(q[:, :, rows])) @ torch.from_numpy(k).transpose(-1, -2)
            P = torch.softmax(L * src.softmax_scale, -1)
            per_draw = []
            for d in range(draws):
                m = random_block_draw(layout, rows, 2, (seed, s, layer, d), sink_keys)
                masks[(layer, d)] = m
                assert m[..., :sink_keys].all()  # the sink blocks (whole blocks) are kept
                per_row = torch.from_numpy(layout.active()[rows // BLOCK].sum(-1))  # blocks per query row
                assert torch.equal(m[:, :, ::BLOCK].sum(-1), per_row.expand(2, -1))
                per_draw.append((P * m[None]).sum(-1).mean(dim=(0, 2)).numpy())
            per_draw = np.array(per_draw)  # [draws, heads]
            for h in range(2):
                rec = next(r for r in ev.records if (r.scale, r.layer, r.head, r.mode) == (s, layer, h, "random"))
                csla = next(r for r in ev.records if (r.scale, r.layer, r.head, r.mode) == (s, layer, h,
                                                                                          "csla_block"))
                assert rec.draws == draws and rec.density == pytest.approx(csla.density, rel=1e-12)
                assert rec.mass == pytest.approx(per_draw[:, h].mean(), rel=1e-10)
                assert rec.mass_sd == pytest.approx(per_draw[:, h].std(ddof=1), rel=1e-8)
                assert rec.mass_sd > 0 and rec.rel_l2_sd > 0 and rec.cosine_sd is not None
        # Drawn per (layer, head): heads, layers and draws differ.
        assert not torch.equal(masks[(1, 0)][0], masks[(1, 0)][1])
        assert not torch.equal(masks[(1, 0)], masks[(2, 0)]) and not torch.equal(masks[(1, 0)], masks[(1, 1)])
    summary = [r for r in summarise(ev) if r["mode"] == "random"]
    assert all(r["draws"] == draws and "mass_sd" in r for r in summary)
    text = format_report(ev)
    assert "+-" in text and f"sink blocks (the kv blocks holding the sink scales' keys" in text
    assert f"mean and sd over {draws} draws" in text


def test_summary_rows_average_over_the_same_layers(tiny, tiny_plan):
    """The sparvar row's error without the residual averages over the same layers as its error (CSLA layers at
    their own error), and the row says which layers the residual applies to."""
    src = SyntheticSource(tiny, "mixed", heads=2, seed=1)
    ev = evaluate(src, tiny_plan, EvalOptions(block=BLOCK, query_sample=24, modes=("sparvar", "cs4a_token"),
                                              layers=(0, 1, 2, 3)), progress=None)
    bound = tiny_plan.config.bound_layer
    assert bound == 1
    rows = summarise(ev)
    for s in (7, 8):
        recs = [r for r in ev.records if r.scale == s and r.mode == "sparvar"]
        row = next(r for r in rows if r["scale"] == s and r["mode"] == "sparvar" and r["regime"] == "content")
        content = [r for r in recs if r.regime == "content"]
        assert row["layers"] == sorted({r.layer for r in content}) and row["residual_layers"] == [0]
        assert row["rel_l2"] == pytest.approx(np.mean([r.rel_l2 for r in content]))
        want = np.mean([r.rel_l2_no_residual if r.rel_l2_no_residual is not None else r.rel_l2 for r in content])
        assert row["rel_l2_no_residual"] == pytest.approx(want)
        local = next(r for r in rows if r["scale"] == s and r["mode"] == "sparvar" and r["regime"] == "local")
        assert local["layers"] == [1, 2, 3] and "rel_l2_no_residual" not in local  # CSLA only: no residual
        # cs4a_token applies in every layer: the residual applies to all of them.
        cs4a = next(r for r in rows if r["scale"] == s and r["mode"] == "cs4a_token" and r["regime"] == "local")
        assert cs4a["residual_layers"] == [1, 2, 3]
    text = format_report(ev)
    assert "regime: local; every row averages over layers 1-3 (all heads)" in text
    assert "over the same layers; the residual applies in layers 0)" in text
    # A residual-off plan records the error it would have had with the residual, over the same layers.
    off = make_plan(tiny, config=dataclasses.replace(tiny_plan.config, residual=False))
    ev_off = evaluate(src, off, EvalOptions(block=BLOCK, query_sample=24, modes=("sparvar",), layers=(0, 1)),
                      progress=None)
    by_on = {(r.scale, r.layer, r.head): r for r in ev.records if r.mode == "sparvar"}
    for r in ev_off.records:
        if r.plan_mode == "cs4a":
            on = by_on[(r.scale, r.layer, r.head)]
            assert r.rel_l2_with_residual == pytest.approx(on.rel_l2, rel=1e-9)
            assert r.rel_l2 == pytest.approx(on.rel_l2_no_residual, rel=1e-9)


def test_decision_band_widens_the_decision_pattern_only(tiny, tiny_plan):
    """decision_band: the decision-scale pattern gains the first later scale's band around each group; the
    later scales' patterns are unchanged; the runtime refuses the option."""
    from sparvar_compiler.planner.cs4a import band_keys

    src = SyntheticSource(tiny, "local", heads=2, seed=2)
    S = tiny_plan.config.decision_scale
    q, k, _ = (torch.from_numpy(np.ascontiguousarray(a)) for a in src.qkv(S, 0))
    banded = make_plan(tiny, config=dataclasses.replace(tiny_plan.config, decision_band=True))
    sc = src.softmax_scale
    plain = cs4a_plan(tiny_plan, "token", "identity")
    wide = cs4a_plan(banded, "token", "identity")
    m0, d0 = cs4a_layer_masks(plain, q, k, sc, "token", "identity")
    m1, d1 = cs4a_layer_masks(wide, q, k, sc, "token", "identity")
    assert all(torch.equal(m0[s], m1[s]) for s in m0)
    band = decision_band_mask(wide)
    dec = tiny_plan.scales[S]
    gs = tiny_plan.config.group_size
    for g, keys in enumerate(band_keys(dec.h, dec.w, dec.kv_offset, gs, tiny_plan.config.band_windows[0])):
        want = torch.zeros(dec.kv_len, dtype=torch.bool)
        want[torch.from_numpy(keys)] = True
        assert torch.equal(band[g * gs], want)
    assert torch.equal(d1, d0 | band) and bool((d1 & ~d0).any())
    assert torch.equal(CS4ASelector(q, k, sc).decision_mask(wide, "token"), d1)
    # Off by default and then absent from the plan's dict (plan files and module manifests read as before).
    assert "decision_band" not in tiny_plan.config.to_dict() and banded.config.to_dict()["decision_band"] is True
    check_runtime_support(tiny_plan.config)
    with pytest.raises(PlanConfigError, match="'decision_band: true' is not supported by the runtime yet"):
        check_runtime_support(banded.config)


# ---------------------------------------------------------------------------------------------- captures
@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_capture_roundtrip(tiny, tmp_path, suffix):
    src = SyntheticSource(tiny, "mixed", heads=2, batch=2, seed=4, layers=(0, 3))
    write_synthetic_captures(src, tmp_path / "c", suffix=suffix, dtype="float64")
    caps = CaptureSet.open(tmp_path / "c", tiny)
    assert caps.layers == (0, 3) and caps.softmax_scale == src.softmax_scale and caps.shape() == (2, 2, 32)
    for s in (0, 5, 8):
        for a, b in zip(caps.qkv(s, 3), src.qkv(s, 3)):
            np.testing.assert_array_equal(a, b)


def test_safetensors_bf16_is_widened_exactly(tmp_path):
    vals = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    bits = (vals.view(np.uint32) >> 16).astype("<u2")
    header = json.dumps({"x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    (tmp_path / "t.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bits.tobytes())
    np.testing.assert_array_equal(read_tensors(tmp_path / "t.safetensors")["x"], vals)


def _good_capture(tiny, d):
    w = CaptureWriter(d, tiny, suffix=".npz", softmax_scale=0.5)
    sched = tiny.schedule()
    rng = np.random.default_rng(0)
    for s in range(sched.num_scales):
        t = sched.tokens[s]
        w.save(s, 0, *(rng.standard_normal((1, 2, t, 32)) for _ in range(3)))
    return w


def test_bad_captures_are_refused(tiny, tmp_path):
    d = tmp_path / "c"
    w = _good_capture(tiny, d)
    caps = CaptureSet.open(d, tiny)
    with pytest.raises(CaptureError, match=r"scale 6 of layer 1 is missing \(layer 1 has scales none\)"):
        caps.require([6, 7, 8], [0, 1])
    # Per-scale k/v: the cache of scale 8 needs every earlier scale of the layer.
    index = json.loads((d / "captures.json").read_text())
    index["entries"] = [e for e in index["entries"] if e["scale"] != 3]
    (d / "captures.json").write_text(json.dumps(index))
    with pytest.raises(CaptureError, match=r"the cache needs scales 0..8 of layer 0, but scale 3 is not captured"):
        CaptureSet.open(d, tiny).qkv(8, 0)
    with pytest.raises(CaptureError, match=r"scale 3 of layer 0 is missing \(layer 0 has scales 0-2, 4-8\)"):
        CaptureSet.open(d, tiny).require([3], [0])
    w.close()  # rewrites the full index
    # Wrong number of queries.
    write_tensors(d / "s07_l000.npz", {"q": np.zeros((1, 2, 5, 32)), "k": np.zeros((1, 2, 576, 32)),
                                       "v": np.zeros((1, 2, 576, 32))})
    with pytest.raises(CaptureError, match=r"s07_l000.npz: q has 5 queries; scale 7 \(24x24\) has 576"):
        CaptureSet.open(d, tiny).qkv(7, 0)
    # NaN.
    bad = np.zeros((1, 2, 576, 32))
    bad[0, 1, 3, 4] = np.nan
    write_tensors(d / "s07_l000.npz", {"q": bad, "k": np.zeros((1, 2, 576, 32)), "v": np.zeros((1, 2, 576, 32))})
    with pytest.raises(CaptureError, match="s07_l000.npz: q holds 1 NaN/inf values"):
        CaptureSet.open(d, tiny).qkv(7, 0)
    # Wrong head dim (another model's capture).
    write_tensors(d / "s07_l000.npz", {n: np.zeros((1, 2, 576, 64)) for n in "qkv"})
    with pytest.raises(CaptureError, match="head dim 64, but tiny-var has head dim 32"):
        CaptureSet.open(d, tiny).qkv(7, 0)
    # An npz holding an object array (pickled).
    np.savez(d / "s07_l000.npz", q=np.array([{"a": 1}], dtype=object), k=np.zeros(1), v=np.zeros(1))
    with pytest.raises(CaptureError, match="object array"):
        CaptureSet.open(d, tiny).qkv(7, 0)
    # A pickle file listed in the index.
    index = json.loads((d / "captures.json").read_text())
    index["entries"][0]["file"] = "s00_l000.pt"
    (d / "s00_l000.pt").write_bytes(b"\x80\x04")
    (d / "captures.json").write_text(json.dumps(index))
    with pytest.raises(CaptureError, match="pickle-based and are refused"):
        CaptureSet.open(d, tiny)
    # A directory of pickles without an index.
    p = tmp_path / "pk"
    p.mkdir()
    (p / "q.pt").write_bytes(b"\x80\x04")
    with pytest.raises(CaptureError, match="no captures.json index; it holds pickle-based files"):
        CaptureSet.open(p, tiny)
    # A scale the schedule does not have; the wrong model.
    index["entries"][0] = {"scale": 9, "layer": 0, "file": "s01_l000.npz"}
    (d / "captures.json").write_text(json.dumps(index))
    with pytest.raises(CaptureError, match=r"scale 9 is not in the schedule \(scales 0..8"):
        CaptureSet.open(d, tiny)
    with pytest.raises(CaptureError, match="captures are of model 'tiny-var', not 'infinity-2b'"):
        CaptureSet.open(d, "infinity-2b")
    assert w.entries


def test_capture_sdpa_records_self_attention_only(tiny, tmp_path):
    import torch.nn.functional as F

    sched = tiny.schedule()
    w = CaptureWriter(tmp_path / "c", tiny, heads=[1], suffix=".safetensors")
    with capture_sdpa(w):
        for s, t in enumerate(sched.tokens[:4]):
            for layer in range(2):
                q = torch.randn(2, 2, t, 32)
                k = torch.randn(2, 2, sched.kv_lens[s], 32)
                F.scaled_dot_product_attention(q, k, k, scale=0.25)
                F.scaled_dot_product_attention(q, torch.randn(2, 2, 7, 32), torch.randn(2, 2, 7, 32))  # cross
    assert F.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"
    caps = CaptureSet.open(tmp_path / "c", tiny)
    assert sorted(caps.files) == [(s, l) for s in range(4) for l in range(2)]
    assert caps.softmax_scale == 0.25 and caps.head_ids == (1,)
    q, k, v = caps.qkv(3, 1)
    assert q.shape == (2, 1, 36, 32) and k.shape == (2, 1, sched.kv_lens[3], 32)


# ---------------------------------------------------------------------------------------------- calibration
def test_grown_windows():
    base = (-1, -1, -1, -1, 1, 1, 3, 5, 7)
    assert grown_windows(base, 4, 0, 0) == base
    assert grown_windows(base, 4, 1, 0) == (-1, -1, -1, -1, 3, 3, 5, 7, 9)
    assert grown_windows((-1,) * 6 + (3, 5, 7), 4, 0, 1) == (-1,) * 5 + (1, 3, 5, 7)
    assert grown_windows((-1,) * 6 + (3, 5, 7), 4, 0, 5) == (-1,) * 4 + (1, 1, 3, 5, 7)  # never into sinks


def test_plan_cost_is_computed_pairs(tiny):
    dense = make_plan(tiny, config=PlanConfig(bound_layer=4, cs4a="off"))
    assert plan_cost(dense, 16, {}) == pytest.approx(1.0)
    csla = make_plan(tiny, config=PlanConfig(bound_layer=0))
    want = got_total = 0.0
    for sp in csla.scales:
        full = sp.tokens * sp.kv_len
        got_total += full * 4
        if sp.index >= csla.config.decision_scale:
            exact = csla_token_mask(csla.grids, sp.index, csla.config.windows, csla.config.sink_scales)
            want += _block_mask(exact, 16).sum() * 4
        else:
            want += full * 4
    assert plan_cost(csla, 16, {}) == pytest.approx(want / got_total, rel=1e-12)


@pytest.mark.parametrize("floor", [Floor(min_mass=0.85), Floor(min_mass=0.8, max_rel_error=0.5, aggregate="mean")])
def test_calibration_meets_its_floor(tiny, tiny_plan, tmp_path, floor):
    src = SyntheticSource(tiny, "mixed", heads=2, seed=7)
    space = SearchSpace(decision_scales=(5, 6), blocks=(16, 32), topk_fractions=(0.1, 0.3))
    res = calibrate(src, tiny_plan, floor, trials=10, query_sample=48, space=space, seed=1, progress=None)
    assert not res.fallback
    # Independently re-evaluate the recommendation on the data it was given.
    plan = make_plan(tiny, config=res.config)
    scales = tuple(range(res.config.decision_scale, plan.num_scales))
    ev = evaluate(src, plan, EvalOptions(block=res.block, query_sample=48, seed=1, modes=("sparvar",),
                                         scales=scales), progress=None)
    per = {}
    for r in ev.records:
        per.setdefault((r.scale, r.layer), []).append(r)
    masses = [np.mean([r.mass for r in rs]) for rs in per.values()]
    errors = [np.mean([r.rel_l2 for r in rs]) for rs in per.values()]
    agg = min if floor.aggregate == "min" else np.mean
    assert agg(masses) >= floor.min_mass
    if floor.max_rel_error is not None:
        assert (max(errors) if floor.aggregate == "min" else np.mean(errors)) <= floor.max_rel_error
    assert res.mass == pytest.approx(agg(masses), rel=1e-9)
    assert res.cost < 1.0
    # The YAML is a plan config the compiler takes.
    path = res.write_yaml(tmp_path / "cal.yaml")
    assert load_config_file(path) == res.config
    assert f"--block-sizes {res.block}" in path.read_text()


@pytest.mark.parametrize("preset", ["local", "content", "content-fresh", "mixed"])
def test_calibration_reports_error_with_its_pick(tiny, tiny_plan, preset):
    """On every synthetic preset, with the default floor (error cap on): the pick comes with its verified mass,
    error and cosine, per scale and aggregated, in the result, the YAML comments and the JSON; the error is
    within the cap."""
    src = SyntheticSource(tiny, preset, heads=1, seed=3)
    space = SearchSpace(decision_scales=(6,), blocks=(16,), topk_fractions=(0.2, 0.4), window_growth=(0, 1),
                        window_extra_scales=(0,))
    floor = Floor(min_mass=0.85)
    assert floor.max_rel_error == DEFAULT_MAX_ERROR
    res = calibrate(src, tiny_plan, floor, trials=6, query_sample=32, space=space, seed=0, progress=None)
    assert res.rel_error is not None and res.rel_error <= floor.max_rel_error
    assert res.mass >= floor.min_mass and res.cosine is not None
    assert res.softmax_scale == src.softmax_scale and "SDPA's 1/sqrt(head_dim)" in res.softmax_scale_source
    text = res.yaml_text()
    assert f"relative L2 error {res.rel_error:.4f}" in text and f"cosine {res.cosine:.4f}" in text
    assert "# softmax scale: " in text
    data = res.to_dict()
    assert data["rel_error"] == res.rel_error and data["softmax_scale"]["value"] == src.softmax_scale
    if res.fallback:
        assert res.config.cs4a == "off" and "no sparse candidate met the floor" in res.notes[0]
        return
    assert [r["scale"] for r in res.per_scale] == list(range(6, 9))
    for r in res.per_scale:
        assert r["rel_l2_max"] <= floor.max_rel_error and r["mass_min"] >= floor.min_mass
        assert f"#   scale {r['scale']:>2}: mass {r['mass_mean']:.4f}" in text
    if res.config.bound_layer > 0:  # CS4A layers: the residual's measured effect, with and without
        assert res.residual_groups and all({"rel_l2_with", "rel_l2_without"} <= set(g) for g in res.residual_groups)
        assert "CS4A residual" in text


def test_calibration_never_returns_a_plan_above_the_error_cap(tiny, tiny_plan):
    """A case where the cheapest plan meeting the mass floor is above the cap: the cap makes calibrate pick a
    costlier plan (or the dense one), whose error, re-evaluated independently, is within the cap."""
    src = SyntheticSource(tiny, "mixed", heads=2, seed=7)
    space = SearchSpace(decision_scales=(5, 6), blocks=(16, 32), topk_fractions=(0.1, 0.3))
    kw = dict(trials=10, query_sample=48, space=space, seed=1, progress=None)
    mass_only = calibrate(src, tiny_plan, Floor(min_mass=0.8, max_rel_error=None), **kw)
    assert not mass_only.fallback and mass_only.rel_error is not None
    cap = 0.8 * mass_only.rel_error  # the cheapest mass-passing plan is above it
    res = calibrate(src, tiny_plan, Floor(min_mass=0.8, max_rel_error=cap), **kw)
    over = [c for c in res.candidates if c.stage == "search" and c.mass >= 0.8 and c.rel_error > cap]
    assert over and min(c.cost for c in over) < res.cost
    assert res.rel_error <= cap and res.mass >= 0.8
    if res.fallback:
        assert any("exceeded the error cap" in n for n in res.notes)
    plan = make_plan(tiny, config=res.config)
    scales = tuple(range(res.config.decision_scale, plan.num_scales))
    ev = evaluate(src, plan, EvalOptions(block=res.block, query_sample=48, seed=1, modes=("sparvar",),
                                         scales=scales), progress=None)
    per: dict = {}
    for r in ev.records:
        per.setdefault((r.scale, r.layer), []).append(r.rel_l2)
    assert max(np.mean(v) for v in per.values()) == pytest.approx(res.rel_error, rel=1e-9)
    # Every verified candidate above the cap was refused.
    assert all(c.rel_error <= cap for c in res.candidates if c.stage == "verify" and c.feasible)


def test_pareto_front():
    pts = [(0.2, 0.9, 0.3), (0.3, 0.95, 0.2), (0.25, 0.85, 0.4), (0.2, 0.9, 0.35), (0.5, 0.99, 0.2)]
    assert pareto_front(pts) == [0, 1, 4]  # 2 is worse than 0 in all three, 3 worse than 0 in error


def test_calibration_falls_back_to_dense(tiny, tiny_plan):
    src = SyntheticSource(tiny, "content", heads=1, seed=2)
    space = SearchSpace(decision_scales=(6,), blocks=(16,), topk_fractions=(0.1,), window_growth=(0,),
                        window_extra_scales=(0,))
    res = calibrate(src, tiny_plan, Floor(min_mass=0.9999), trials=4, query_sample=32, space=space,
                    progress=None)
    assert res.fallback and res.mass == 1.0 and res.cost == pytest.approx(1.0)
    assert res.config.cs4a == "off" and res.config.bound_layer == tiny.depth
    assert "NOTE: no sparse candidate met the floor" in res.yaml_text()


def test_calibrate_points_at_decision_scales_when_a_scale_is_missing(tiny, tmp_path):
    """Captures of the last scales only (whole-cache k/v): the default decision scales need scale 4, which is
    missing; the message names --decision-scales and the decision scales the data allows."""
    src = SyntheticSource(tiny, "local", heads=1, seed=0, layers=(0, 1))
    sched = tiny.schedule()
    w = CaptureWriter(tmp_path / "c", tiny, suffix=".npz", softmax_scale=src.softmax_scale)
    for layer in (0, 1):
        for s in (6, 7, 8):
            w.save(s, layer, *src.qkv(s, layer))
    w.close()
    caps = CaptureSet.open(tmp_path / "c", tiny)
    plan = make_plan(tiny, config=PlanConfig(group_size=64))
    with pytest.raises(SparvarError, match=r"scale 4 of layer 0 is missing.*pass --decision-scales .*"
                                           r"e\.g\. --decision-scales 6,7$"):
        calibrate(caps, plan, trials=1, progress=None)
    res = calibrate(caps, plan, Floor(min_mass=0.5, max_rel_error=None), trials=2, query_sample=16,
                    space=SearchSpace((6, 7), blocks=(16,)), progress=None)
    assert res.verify_layers == (0, 1) and sched.num_scales == 9


# ---------------------------------------------------------------------------------------------- command line
def test_cli_fidelity_and_calibrate(tiny, tmp_path, capsys):
    model = str(tmp_path / "tiny.yaml")
    (tmp_path / "tiny.yaml").write_text(TINY)
    out = tmp_path / "rep"
    assert main(["fidelity", "--model", model, "--synthetic", "mixed", "--heads", "1", "--layers", "0,3",
                 "--query-sample", "32", "--block", "64", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SYNTHETIC regime" in text and "regime: content" in text and "regime: local" in text
    assert f"softmax scale: {32 ** -0.5:.6g} (synthetic data: no family default (custom)" in text
    data = json.loads((out / "fidelity.json").read_text())
    assert data["regime_source"] == "synthetic" and data["source"]["preset"]["name"] == "mixed"
    assert data["softmax_scale"]["value"] == pytest.approx(32 ** -0.5)
    assert "1/sqrt(32)" in data["softmax_scale"]["source"] and "random" in data["baselines"]
    assert {r["mode"] for r in data["summary"]} >= {"csla_block", "random", "cs4a_token", "sparvar", "dense"}
    assert (out / "fidelity.png").stat().st_size > 1000
    caps = tmp_path / "caps"
    write_synthetic_captures(SyntheticSource(get_model(model), "mixed", heads=1), caps)
    yaml_path = tmp_path / "cal.yaml"
    assert main(["calibrate", "--model", model, "--captures", str(caps), "--trials", "5", "--min-mass", "0.8",
                 "--query-sample", "32", "--blocks", "16", "--decision-scales", "6", "-o", str(yaml_path),
                 "--json", str(tmp_path / "cal.json")]) == 0
    load_config_file(yaml_path)
    cal = json.loads((tmp_path / "cal.json").read_text())
    assert cal["kind"] == "sparvar-calibration" and cal["floor"]["max_rel_error"] == DEFAULT_MAX_ERROR
    assert cal["rel_error"] is not None and cal["softmax_scale"]["value"] == pytest.approx(32 ** -0.5)
    assert (tmp_path / "cal.pareto.png").stat().st_size > 1000  # the chart beside the YAML
    assert "cal.pareto.png" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["fidelity", "--model", "infinity-2b", "--captures", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["fidelity", "--model", "infinity-2b", "--synthetic", "local", "--modes", "bogus"]) == 2
    assert "unknown mode 'bogus'" in capsys.readouterr().err
