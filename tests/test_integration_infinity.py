"""``integrations.infinity`` on a stand-in with Infinity's structure and call signatures (tests/infinity_standin.py)
and on the Infinity-shaped bench model: routing of every (scale, layer), KV cache, CFG batch, three aspect ratios
from one module set, batches 1/2/4, remove(), and torch.compile(fullgraph=True) - all on the CPU fallback."""

import sys
from pathlib import Path

import pytest
import torch

import sparvar_compiler.runtime as rt
from sparvar_compiler.codegen.reference import relative_error
from sparvar_compiler.emit.emitter import emit_module
from sparvar_compiler.emit.moduleset import emit_module_set
from sparvar_compiler.integrations import infinity as sv
from sparvar_compiler.planner import PlanConfig, get_gpu, get_model, make_plan

sys.path.insert(0, str(Path(__file__).parent))
import infinity_standin as standin  # noqa: E402

TINY = """\
name: tiny-infinity4
family: infinity
depth: 4
width: 128
heads: 2
head_dim: 64
schedules:
  - {resolution: 256, aspect: "1:1", scales: "1,2,4,6,8,12,16"}
  - {resolution: 256, aspect: "4:3", scales: "1,2,4x3,8x6,12x9,16x12,20x15"}
  - {resolution: 256, aspect: "3:4", scales: "1,2,3x4,6x8,9x12,12x16,15x20"}
"""
ASPECTS = ("1:1", "4:3", "3:4")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    (d / "tiny.yaml").write_text(TINY)
    model = get_model(str(d / "tiny.yaml"))
    sparse = d / "set"
    emit_module_set(model, 256, ASPECTS, get_gpu("h100"), sparse, block_sizes=(32,), progress=lambda s: None)
    # Every layer below the bound and CS4A off: every call dense, so the patched model must equal the original.
    dense = d / "dense"
    plan = make_plan(model, 256, "1:1", PlanConfig(bound_layer=model.depth, cs4a="off"))
    emit_module(plan, get_gpu("h100"), dense, block_sizes=(32,), progress=lambda s: None)
    return model, sparse, dense


def _generate(model, grids, B=1, cfg=3.0, seed=0):
    text = standin.make_text(B=B, text_len=6, text_channels=model.Ct5, seed=seed)
    sched = standin.schedule_of(grids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ret, logits, img = model.autoregressive_infer_cfg(scale_schedule=sched, label_B_or_BLT=text, B=B,
                                                          cfg_list=[cfg] * len(sched), tau_list=[1.0] * len(sched),
                                                          inference_mode=True)
    return logits, img


def _standin(seed=1):
    return standin.Infinity(depth=4, embed_dim=128, num_heads=2, block_chunks=2, seed=seed, text_channels=32)


def test_dense_plan_patched_equals_the_original(tiny):
    """A plan that keeps every call dense: patched logits equal the unpatched model's (same bf16 math as SDPA
    under autocast), and remove() restores the model exactly."""
    spec, _, dense_dir = tiny
    model = _standin()
    grids = make_plan(spec, 256, "1:1").grids
    before_logits, before_img = _generate(model, grids)
    patch = sv.apply(model, dense_dir, device="cpu")
    assert all(b.sa.use_flex_attn for b in model.unregistered_blocks)
    logits, img = _generate(model, grids)
    assert sum(patch.calls.values()) == len(grids) * spec.depth  # every (scale, layer) once
    assert {(s, l) for _, s, l in patch.calls} == {(s, l) for s in range(len(grids)) for l in range(spec.depth)}
    for a, b in zip(logits, before_logits):
        assert relative_error(a, b) < 2e-2
    assert relative_error(img, before_img) < 2e-2
    sv.remove(model)
    assert not any("forward" in vars(b) or "kv_caching" in vars(b.sa) or b.sa.use_flex_attn
                   for b in model.unregistered_blocks)
    again, _ = _generate(model, grids)
    assert all(torch.equal(a, b) for a, b in zip(again, before_logits))
    with pytest.raises(sv.IntegrationError, match="not patched"):
        sv.remove(model)


class _Oracle:
    """Infinity's ``slow_attn`` replaced by the module's own call, with (scale, layer) derived independently of
    the integration: the i-th call of an image is layer i % depth of scale i // depth."""

    def __init__(self, module, depth):
        self.module, self.depth, self.i = module, depth, 0

    def __call__(self, query, key, value, scale=None, attn_mask=None, dropout_p=0.0):
        scale_index, layer = divmod(self.i, self.depth)
        self.i += 1
        q, k, v = (t.to(torch.bfloat16).contiguous() for t in (query, key, value))
        return self.module.attention(q, k, v, scale_index, layer, scale=scale).to(value.dtype)


@pytest.mark.parametrize("aspect,B,cfg", [("1:1", 1, 3.0), ("4:3", 2, 3.0), ("3:4", 1, 1.0)])
def test_sparse_plan_routes_every_call_like_an_independent_oracle(tiny, aspect, B, cfg, monkeypatch):
    """One module set, three aspect ratios, CFG batch 2B (batches 2 and 4) and no CFG (batch 1): the patched model
    gives exactly what the model gives when its SDPA is replaced by the member's own call at the (scale, layer)
    counted from the call order - so the integration picks the member, scale, layer, KV cache and batch right.
    And the sparse plan stays close to dense attention."""
    spec, set_dir, _ = tiny
    modules = rt.load(set_dir, device="cpu")
    plan = make_plan(spec, 256, aspect)
    member = modules.member_for(plan.grids)
    model = _standin(seed=2)
    dense_logits, _ = _generate(model, plan.grids, B=B, cfg=cfg)

    oracle = _Oracle(member, spec.depth)
    monkeypatch.setattr(standin, "slow_attn", oracle)
    want, want_img = _generate(model, plan.grids, B=B, cfg=cfg)
    assert oracle.i == len(plan.grids) * spec.depth
    monkeypatch.undo()

    patch = sv.apply(model, modules)
    got, img = _generate(model, plan.grids, B=B, cfg=cfg)
    assert {a for a, _, _ in patch.calls} == {aspect}
    assert all(torch.equal(a, b) for a, b in zip(got, want)), "patched != oracle"
    assert torch.equal(img, want_img)
    # The plan is sparse from the decision scale on; its error against dense stays small on this local model.
    ops = {member.op(s.index, layer)[0] for s in plan.scales for layer in range(spec.depth)}
    assert {"kernel", "cs4a", "cs4a_decision"} <= ops
    assert relative_error(got[-1], dense_logits[-1]) < 0.25
    sv.remove(model)


def test_refuses_models_and_modules_that_do_not_fit(tiny):
    spec, set_dir, dense_dir = tiny
    with pytest.raises(sv.IntegrationError, match="not an Infinity model"):
        sv.apply(torch.nn.Linear(2, 2), dense_dir)
    wrong = standin.Infinity(depth=2, embed_dim=128, num_heads=2, block_chunks=1)
    with pytest.raises(sv.IntegrationError, match="plans 4 layers, the model has 2 blocks"):
        sv.apply(wrong, dense_dir)
    heads = standin.Infinity(depth=4, embed_dim=256, num_heads=2, block_chunks=2)
    with pytest.raises(sv.IntegrationError, match="heads of 64"):
        sv.apply(heads, dense_dir)
    model = _standin()
    model.unregistered_blocks[1].sa.using_flash = True
    with pytest.raises(sv.IntegrationError, match="customized_flash_attn=False"):
        sv.apply(model, dense_dir, device="cpu")
    model.unregistered_blocks[1].sa.using_flash = False
    sv.apply(model, set_dir, device="cpu")
    with pytest.raises(sv.IntegrationError, match="already patched"):
        sv.apply(model, set_dir, device="cpu")
    sv.remove(model)


def test_torch_compile_fullgraph_of_patched_blocks(tiny):
    """Each patched block compiled with fullgraph=True (the attention is one operator node; the KV cache and the
    module's CS4A state are side effects the graph keeps): the image matches eager."""
    spec, set_dir, _ = tiny
    plan = make_plan(spec, 256, "4:3")
    model = _standin(seed=3)
    sv.apply(model, set_dir, device="cpu")
    eager, _ = _generate(model, plan.grids)
    torch._dynamo.reset()
    for layer in (0, spec.depth - 1):  # a CS4A layer and a CSLA layer (every block would only take longer)
        model.unregistered_blocks[layer].compile(fullgraph=True, backend="aot_eager", dynamic=False)
    # One graph per (block, scale): more than dynamo's default of 8 recompiles per code object.
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512):
        compiled, _ = _generate(model, plan.grids)
    for a, b in zip(compiled, eager):
        assert relative_error(a, b) < 1e-2
    sv.remove(model)


def test_bench_model_runs_through_a_module_at_any_batch(tmp_path):
    """bench/infinity_model.py's attention switch takes the module's operator: batch 1 (no CFG), 2 (one image
    with CFG) and 4 (two images) through the sparse plan stay close to dense attention, and the two images of
    batch 4 are each what batch 2 gives for the same text."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from infinity_model import InfinityConfig, InfinityGenerator, dense_attention

    plan = make_plan("var-d16")
    emit_module(plan, get_gpu("h100"), tmp_path / "m", block_sizes=(32,), progress=lambda s: None)
    module = rt.load(tmp_path / "m", device="cpu")

    def ours(q, k, v, si, li):
        return module.attention_op(q.bfloat16(), k.bfloat16(), v.bfloat16(), si, li, 1.0).float()

    images = {}
    for batch in (1, 2, 4):
        # Layers 0-5 of the module (CS4A below its bound layer, 4, CSLA above), to keep the CPU time short.
        cfg = InfinityConfig("t", 6, 256, plan.heads, plan.head_dim, tuple(plan.grids), text_len=4,
                             text_dim=32, batch=batch)
        gen = InfinityGenerator(cfg, dtype=torch.float32)
        g = torch.Generator().manual_seed(5)
        text = torch.randn(2, 4, 32, generator=g)
        text = text[:1] if batch == 1 else text.repeat_interleave(batch // 2, dim=0)  # cond rows, then uncond
        got, dense = gen.generate(text, ours), gen.generate(text, dense_attention)
        assert got.shape[0] == max(1, batch // 2)
        assert relative_error(got, dense) < 0.1, batch
        images[batch] = got
    # Equal up to float32 GEMM blocking, which depends on the batch.
    assert relative_error(images[4][0], images[2][0]) < 1e-3 and relative_error(images[4][1], images[2][0]) < 1e-3


def test_capture_records_what_attention_receives(tiny, tmp_path):
    """sv.capture writes the q/k/v of every chosen layer at every scale through the same hook, keeps attention
    dense (the image is the unpatched one), and leaves the model unpatched afterwards."""
    from sparvar_compiler.fidelity.captures import CaptureSet
    from sparvar_compiler.fidelity.hooks import CaptureWriter

    spec, _, _ = tiny
    plan = make_plan(spec, 256, "4:3")
    model = _standin(seed=6)
    before, _ = _generate(model, plan.grids)
    writer = CaptureWriter(tmp_path / "caps", spec, resolution=256, aspect="4:3", softmax_scale=1.0)
    with sv.capture(model, writer, layers=[0, 3]) as patch:
        during, _ = _generate(model, plan.grids)
    writer.close()
    assert sv.patched(model) is None and not any(b.sa.use_flex_attn for b in model.unregistered_blocks)
    for a, b in zip(during, before):
        assert relative_error(a, b) < 2e-2
    assert sorted((s, l) for _, s, l in patch.calls) == [(s, l) for s in range(len(plan.grids)) for l in (0, 3)]
    caps = CaptureSet.open(tmp_path / "caps", spec)
    assert sorted(caps.files) == [(s, l) for s in range(len(plan.grids)) for l in (0, 3)]
    assert caps.softmax_scale == 1.0
