"""The end-to-end benchmark's Infinity-shaped generator (bench/infinity_model.py) and its driver (bench/run.py),
on the CPU with a tiny model: deterministic weights, a KV cache that grows to the plan's lengths, the attention
switch's shapes, backends that compute the same attention giving the same image, scale skipping, and the bound
arithmetic of the report."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import run as bench_run  # noqa: E402
from bench.infinity_model import InfinityConfig, InfinityGenerator, dense_attention, make_text  # noqa: E402
from sparvar_compiler.planner import PlanConfig, csla_layout, get_gpu, make_plan  # noqa: E402
from sparvar_compiler.planner.plan import Mode  # noqa: E402

SPEC = bench_run.quick_model()  # 2 layers, 2 heads of 64, scales 1..16 (7 scales)


def tiny(plan, **kw):
    return InfinityConfig.from_plan(plan, width=plan.heads * plan.head_dim, text_dim=32, text_len=8, **kw)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


class Recorder:
    """An attention switch that records every call and delegates to ``inner``."""

    def __init__(self, inner=dense_attention):
        self.inner, self.calls = inner, []

    def __call__(self, q, k, v, s, layer):
        self.calls.append((s, layer, tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype,
                           all(t.is_contiguous() for t in (q, k, v))))
        return self.inner(q, k, v, s, layer)


def test_weights_are_deterministic_per_seed():
    cfg = tiny(make_plan(SPEC))
    a, b, c = (InfinityGenerator(cfg, seed=s) for s in (3, 3, 4))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() and len(sa) > 10
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].numel() > 64)
    assert all(p.dtype == torch.bfloat16 for n, p in sa.items() if not n.endswith("q_scale"))
    assert torch.equal(make_text(cfg, seed=1), make_text(cfg, seed=1))
    # Infinity's shapes: the real models have the registry's dimensions and about their nominal sizes.
    for name, billions in (("infinity-2b", 2.2), ("infinity-8b", 7.9)):
        big = InfinityConfig.from_plan(make_plan(name))
        assert (big.head_dim, big.mlp_ratio, big.text_len, big.text_dim, big.batch) == (128, 4.0, 512, 2048, 2)
        per_block = 4 * big.width ** 2 + 2 * big.width ** 2 + 2 * big.width * 2048 + 8 * big.width ** 2
        assert per_block * big.depth / 1e9 == pytest.approx(billions, rel=0.05)


def test_kv_cache_grows_per_scale_to_the_plan_kv_len():
    plan = make_plan(SPEC)
    cfg = tiny(plan)
    assert cfg.kv_lens == tuple(s.kv_len for s in plan.scales)
    model = InfinityGenerator(cfg)
    rec = Recorder()
    state = model.begin_image(make_text(cfg))
    previous = None
    with torch.no_grad():
        for s in plan.scales:
            model.run_scale(state, rec)
            for layer in range(cfg.depth):
                assert tuple(state.k_cache[layer].shape) == (2, cfg.heads, s.kv_len, cfg.head_dim)
                assert tuple(state.v_cache[layer].shape) == (2, cfg.heads, s.kv_len, cfg.head_dim)
            if previous is not None:  # growth appends: the earlier scales' keys are kept as they were
                assert torch.equal(state.k_cache[0][:, :, : previous.shape[2]], previous)
            previous = state.k_cache[0].clone()
    # The switch is called once per (scale, layer), in natural order, with the plan's shapes.
    assert [(c[0], c[1]) for c in rec.calls] == [(s.index, layer) for s in plan.scales for layer in range(cfg.depth)]
    for s_idx, layer, qs, ks, vs, dtype, contiguous in rec.calls:
        s = plan.scales[s_idx]
        assert qs == (2, cfg.heads, s.tokens, cfg.head_dim)
        assert ks == vs == (2, cfg.heads, s.kv_len, cfg.head_dim)
        assert dtype == torch.bfloat16 and contiguous


def test_queries_are_cosine_normalised_with_a_per_head_scale():
    cfg = tiny(make_plan(SPEC))
    model = InfinityGenerator(cfg, dtype=torch.float32)
    seen = {}

    def grab(q, k, v, s, layer):
        seen.setdefault((s, layer), (q, k))
        return dense_attention(q, k, v, s, layer)

    with torch.no_grad():
        model.generate(make_text(cfg, dtype=torch.float32), grab)
    q, k = seen[(3, 1)]
    qn = q.norm(dim=-1)  # RoPE rotates, so the norms are the per-head scales and 1
    assert torch.allclose(qn, model.blocks[1].q_scale.view(1, -1, 1).expand_as(qn), rtol=1e-4)
    assert torch.allclose(k.norm(dim=-1), torch.ones_like(k[..., 0]), rtol=1e-4)
    assert 10 <= float(model.blocks[1].q_scale.min()) and float(model.blocks[1].q_scale.max()) <= 20


def _float64_attention(q, k, v, s, layer, mask=None):
    """Independent reference: explicit softmax in float64 (optionally with a boolean [Nq, Nkv] mask)."""
    scores = q.double() @ k.double().transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.double()).to(q.dtype)


def test_dense_backend_and_an_equivalent_reference_give_the_same_image():
    cfg = tiny(make_plan(SPEC))
    model = InfinityGenerator(cfg, dtype=torch.float32, seed=5)
    text = make_text(cfg, dtype=torch.float32)
    with torch.no_grad():
        sdpa = model.generate(text, dense_attention)
        ref = model.generate(text, _float64_attention)
        none = model.generate(text, bench_run.no_attention)
    assert torch.isfinite(sdpa).all()
    assert rel(sdpa, ref) < 1e-4
    assert rel(none, ref) > 0.1  # attention matters to the image: the comparison above is not vacuous


def test_skip_last_skips_the_last_transformer_passes():
    plan = make_plan(SPEC, config=PlanConfig(skip_last=2))
    assert [s.index for s in plan.scales if s.modes[0] == Mode.SKIPPED] == [5, 6]
    cfg = tiny(plan)
    model = InfinityGenerator(cfg)
    text = make_text(cfg)
    rec = Recorder()
    with torch.no_grad():
        skipped = model.generate(text, rec, skip_last=2)
        state = model.begin_image(text)
        for _ in range(5):
            model.run_scale(state, dense_attention)
        after5 = state.f_hat.clone()
        model.run_scale(state, dense_attention)
    assert sorted({c[0] for c in rec.calls}) == [0, 1, 2, 3, 4]
    assert skipped.shape == (1, cfg.code_dim, 16, 16)  # the output still covers the last grid
    assert torch.equal(skipped, after5)
    assert rel(state.f_hat, after5) > 1e-3  # a computed scale 5 would have changed it


@pytest.fixture(scope="module")
def sparse_module(tmp_path_factory):
    """A module for the tiny model: layer 0 dense, layer 1 CSLA (32x32 blocks) from the decision scale on."""
    from sparvar_compiler.emit.emitter import emit_module
    import sparvar_compiler.runtime as rt

    plan = make_plan(SPEC, config=PlanConfig(bound_layer=1, cs4a="off"))
    out = tmp_path_factory.mktemp("e2e") / "tiny-h100"
    emit_module(plan, get_gpu("h100"), out, block_sizes=(32,), progress=lambda s: None)
    return plan, rt.load(out, device="cpu")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_sparse_backends_with_the_same_layouts_compute_the_same_attention(sparse_module):
    """Inside a real image: at every call the module (CPU fallback) and eager flex over the same layouts match an
    independent float64 block-sparse reference, where dense attention does not; the images agree too."""
    plan, module = sparse_module
    assert module.fallback
    cfg = tiny(plan)
    model = InfinityGenerator(cfg, seed=2)
    text = make_text(cfg)
    layouts = {s.index: csla_layout(plan, s.index, 32, 32) for s in plan.scales if s.has_csla}
    assert sorted(layouts) == [4, 5, 6] and layouts[5].sparsity() > 0.2 and layouts[6].sparsity() > 0.3
    ours = bench_run.module_attention(module)
    flex = bench_run.FlexBackend(plan, layouts, torch.device("cpu"), dense_attention, compile=False)
    errors = []

    def blockwise_reference(q, k, v, s, layer):
        if plan.scales[s].modes[layer] != Mode.CSLA:
            return _float64_attention(q, k, v, s, layer)
        lay = layouts[s]  # expand the active blocks whole, independently of the layout's own expansion
        dense = np.kron(lay.active(), np.ones((lay.block_m, lay.block_n), dtype=bool))
        mask = torch.from_numpy(dense[: q.shape[2], : k.shape[2]].copy())
        gold = _float64_attention(q.double(), k.double(), v.double(), s, layer, mask)
        poisoned = torch.full_like(q, float("nan"))
        module.attention(q, k, v, s, layer, out=poisoned)
        errors.append((rel(poisoned, gold), rel(flex(q, k, v, s, layer), gold),
                       rel(dense_attention(q, k, v, s, layer), gold)))
        return gold.to(q.dtype)

    with torch.no_grad():
        ref = model.generate(text, blockwise_reference)
        image = model.generate(text, ours)
        flex_image = model.generate(text, flex)
    assert len(errors) == 3  # layer 1 of scales 4, 5, 6 (scale 4's layout keeps every block at 32x32)
    for err_ours, err_flex, err_dense in errors:
        assert err_ours < 0.01 and err_flex < 0.01, errors
    for err_ours, err_flex, err_dense in errors[1:]:
        assert err_dense > 10 * max(err_ours, err_flex), errors  # the layouts really drop keys
    assert torch.isfinite(image).all()
    assert rel(image, ref) < 0.02 and rel(flex_image, ref) < 0.02


def test_summary_reports_speedups_and_the_bound_arithmetic():
    def row(key, skip, total, att):
        backend, _, plan = key.partition(":")
        return {"backend": backend, "plan": plan or None, "key": key, "skip_scales": skip,
                "total_ms_per_image": total, "attention_ms_per_image": att}

    runs = [row("flash", 0, 1000.0, 240.0), row("cudnn", 0, 900.0, 150.0), row("none", 0, 800.0, 0.0),
            row("module:sparvar", 0, 830.0, 40.0), row("flex:sparvar", 0, 850.0, 50.0),
            row("flash", 2, 600.0, 100.0), row("none", 2, 500.0, 0.0), row("module:sparvar", 2, 520.0, 15.0)]
    s = bench_run.summarize(runs)
    zero, two = s["skip0"], s["skip2"]
    assert zero["max_speedup_vs_flash"] == pytest.approx(1.25)
    assert zero["self_attention_share_of_flash_total"] == pytest.approx(0.2)
    assert zero["paper_speedup_within_bound"] is False and "1.57x" in zero["arithmetic"]
    ours = zero["module"]["module:sparvar"]
    assert ours["bound_fraction"] == pytest.approx(170 / 200) and ours["meets_bound_target"]
    assert ours["speedup_vs_flash"] == pytest.approx(1000 / 830)
    assert ours["speedup_vs_cudnn"] == pytest.approx(900 / 830)
    assert ours["speedup_vs_flex_same_plan"] == pytest.approx(850 / 830)
    assert two["module"]["module:sparvar"]["bound_fraction"] == pytest.approx(0.8)
    assert two["module"]["module:sparvar"]["speedup_vs_flash_no_skip"] == pytest.approx(1000 / 520)
    assert two["max_speedup_vs_flash_no_skip"] == pytest.approx(2.0)


def test_quick_run_writes_the_results_file_and_chart(tmp_path):
    out = tmp_path / "e2e.json"
    rc = bench_run.main(["--quick", "--device", "cpu", "--backends", "flash,none", "--skip-last", "0,2",
                         "--reps", "1", "--keep-compile-caches", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "infinity-e2e" and result["card"] == "cpu"
    (model,) = result["models"].values()
    assert {(r["key"], r["skip_scales"]) for r in model["runs"]} == {
        ("flash", 0), ("none", 0), ("flash", 2), ("none", 2)}
    for r in model["runs"]:
        assert {"attention_ms_per_image", "total_ms_per_image", "skip_scales"} <= r.keys()
        assert len(r["per_scale_total_ms"]) == 7 - r["skip_scales"] and r["image_finite"]
    assert "arithmetic" in model["summary"]["skip0"]
    pytest.importorskip("matplotlib")
    png = tmp_path / "again.png"
    assert bench_run.main(["--plot-from", str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
