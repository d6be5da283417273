"""Module sets (one member per aspect ratio, kernels pooled by content), any batch at run time, and the
``torch.ops.sparvar.attention`` operator - on the CPU fallback, against references built from the plan."""

import json
import shutil

import pytest
import torch

import sparvar_compiler.runtime as rt
from sparvar_compiler.codegen.reference import check_close, reference_attention, relative_error
from sparvar_compiler.codegen.spec import KernelInputError
from sparvar_compiler.cs4a import cs4a_masks, decision_mask, upsample_residual
from sparvar_compiler.emit.manifest import ModuleError
from sparvar_compiler.emit.moduleset import emit_module_set, member_name, verify_module_set
from sparvar_compiler.planner import csla_layout, get_gpu, get_model, make_plan

TINY = """\
name: tiny-infinity
family: infinity
depth: 3
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
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.yaml"
    path.write_text(TINY)
    return get_model(str(path))


@pytest.fixture(scope="module")
def module_set(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("set") / "tiny-all-h100"
    manifest = emit_module_set(tiny_model, 256, ASPECTS, get_gpu("h100"), out, block_sizes=(32,),
                               progress=lambda s: None)
    return out, manifest


def test_set_verifies_and_pools_its_kernels(module_set, tiny_model):
    out, manifest = module_set
    assert verify_module_set(out, gpu="h100") == manifest
    names = [m["name"] for m in manifest["members"]]
    assert names == [member_name(256, a) for a in ASPECTS]
    for m in manifest["members"]:
        plan = make_plan(tiny_model, 256, m["aspect"])
        assert [tuple(g) for g in m["grids"]] == list(plan.grids)
        member = json.loads((out / m["name"] / "manifest.json").read_text())
        assert member["shared_files"] and not any(f.startswith("kernels/") for f in member["files"])
    pooled = sorted(p.name for p in (out / "shared").iterdir())
    assert pooled == sorted(manifest["shared"])
    # 4:3 and 3:4 have the same decision-scale shapes: their statistics and top-k kernels are one file each.
    stats = manifest["stats"]
    assert stats["distinct_kernels"] < stats["kernels"]
    # Members and pool (the set manifest, written last, is not counted).
    assert stats["bytes"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.parent != out)


def test_loader_picks_a_member_by_grid(module_set, tiny_model):
    out, _ = module_set
    modules = rt.load(out, device="cpu")
    assert isinstance(modules, rt.ModuleSet) and len(modules) == 3
    for aspect in ASPECTS:
        plan = make_plan(tiny_model, 256, aspect)
        m = modules.member_for(plan.grids)
        assert m.manifest["plan"]["aspect"] == aspect
        assert modules.member_for([(1, h, w) for h, w in plan.grids]) is m  # Infinity's (t, h, w) triples
        assert modules.member_for(plan.grids[:4]) is m  # a prefix that only one member has
        if aspect == "1:1":
            assert modules.member_for_lengths(m.scale_lengths()) is m
        else:  # an aspect and its inverse have the same lengths everywhere: only the grid tells them apart
            with pytest.raises(KernelInputError, match="fit several members"):
                modules.member_for_lengths(m.scale_lengths())
        for s in plan.scales:
            assert m.scale_of(s.tokens, s.kv_len) == s.index
    with pytest.raises(KernelInputError, match="prefix of several"):
        modules.member_for([(1, 1), (2, 2)])
    with pytest.raises(KernelInputError, match="no member"):
        modules.member_for([(1, 1), (3, 3)])
    with pytest.raises(KernelInputError, match="no scale"):
        modules.member("256-1x1").scale_of(16, 17)


def _run_image(m, plan, layer, batch, seed):
    """Every scale of one layer, in generation order, at ``batch``; returns inputs and outputs per scale."""
    g = torch.Generator().manual_seed(seed)
    B, H, D = batch, plan.heads, plan.head_dim
    inputs, outs = {}, {}
    for s in plan.scales:
        q, k, v = (torch.randn(B, H, n, D, generator=g).bfloat16() for n in (s.tokens, s.kv_len, s.kv_len))
        inputs[s.index] = (q, k, v)
        outs[s.index] = m.attention(q, k, v, s.index, layer, out=torch.full_like(q, float("nan")))
    return inputs, outs


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_every_member_runs_any_batch_like_the_references(module_set, tiny_model, batch):
    """Kernels tuned at batch 2 run batches 1, 2 and 4: CSLA layers against the layout's token mask, CS4A
    layers against the reference pipeline (selection from the decision scale, residual), dense layers dense."""
    out, _ = module_set
    modules = rt.load(out, device="cpu")
    for aspect in ASPECTS:
        plan = make_plan(tiny_model, 256, aspect)
        m = modules.member_for(plan.grids)
        assert m.batch == 2
        S = plan.config.decision_scale
        # The last layer: dense below the decision scale, CSLA from it on.
        inputs, outs = _run_image(m, plan, plan.depth - 1, batch, seed=batch)
        sparse = 0
        for s in plan.scales:
            q, k, v = inputs[s.index]
            op, _ = m.op(s.index, plan.depth - 1)
            if op == "kernel":
                mask = torch.from_numpy(csla_layout(plan, s.index, 32, 32).to_token_mask())
                sparse += not mask.all()
            else:
                assert op == "sdpa"
                mask = torch.ones(s.tokens, s.kv_len, dtype=torch.bool)
            gold = reference_attention(q.double(), k.double(), v.double(), mask, 1.0)
            ok, err, ref = check_close(outs[s.index], gold, reference_attention(q, k, v, mask, 1.0))
            assert ok, (aspect, batch, s.index, op, err, ref)
        assert sparse, "no CSLA layout skips anything: the test would not see a wrong walk"
        # Layer 0: CS4A (decision scale, then the later scales from its selection).
        assert m.op(S, 0)[0] == "cs4a_decision"
        inputs, outs = _run_image(m, plan, 0, batch, seed=100 + batch)
        qd, kd, vd = (t.double() for t in inputs[S])
        dense = torch.ones(qd.shape[2], kd.shape[2], dtype=torch.bool)
        residual = reference_attention(qd, kd, vd, dense, 1.0) - reference_attention(
            qd, kd, vd, decision_mask(plan, qd, kd, 1.0), 1.0)
        qb, kb, vb = inputs[S]
        residual_same = reference_attention(qb, kb, vb, dense, 1.0) - reference_attention(
            qb, kb, vb, decision_mask(plan, qd, kd, 1.0), 1.0)
        masks = cs4a_masks(plan, qd, kd, 1.0)
        assert masks and all(mk.shape[0] == batch for mk in masks.values())
        for sc, mask in masks.items():
            q, k, v = inputs[sc]
            gold = reference_attention(q.double(), k.double(), v.double(), mask, 1.0) + upsample_residual(
                residual, plan, sc)
            same = reference_attention(q, k, v, mask, 1.0) + upsample_residual(residual_same, plan, sc)
            ok, err, ref = check_close(outs[sc], gold, same)
            assert ok, (aspect, batch, sc, err, ref)


def test_batches_are_independent(module_set, tiny_model):
    """Each batch element of a batch-4 call is what a batch-1 call on it gives (CS4A state included)."""
    out, _ = module_set
    m = rt.load(out, device="cpu").member(member_name(256, "4:3"))
    plan = make_plan(tiny_model, 256, "4:3")
    inputs, outs = _run_image(m, plan, 0, 4, seed=7)
    for b in (0, 3):
        for s in plan.scales:
            q, k, v = (t[b:b + 1].contiguous() for t in inputs[s.index])
            one = m.attention(q, k, v, s.index, 0)
            assert torch.equal(one, outs[s.index][b:b + 1]), (b, s.index)


def test_tampered_or_separated_members_are_refused(module_set, tmp_path):
    out, manifest = module_set
    copy = tmp_path / "set"
    shutil.copytree(out, copy)
    pooled = sorted((copy / "shared").iterdir())[0]
    blob = bytearray(pooled.read_bytes())
    blob[len(blob) // 2] ^= 1
    pooled.write_bytes(bytes(blob))
    with pytest.raises(ModuleError, match="shared file .* was modified"):
        rt.load(copy, device="cpu")
    alone = tmp_path / "alone"
    shutil.copytree(out / manifest["members"][0]["name"], alone)
    with pytest.raises(ModuleError, match="member of a module set"):
        rt.load(alone, device="cpu")
    shutil.copytree(out, tmp_path / "set2")
    (tmp_path / "set2" / "stray.txt").write_text("x")
    with pytest.raises(ModuleError, match="stray.txt is not part of the module set"):
        rt.load(tmp_path / "set2", device="cpu")


def test_operator_matches_the_direct_call(module_set, tiny_model):
    out, _ = module_set
    m = rt.load(out, device="cpu").member(member_name(256, "1:1"))
    plan = make_plan(tiny_model, 256, "1:1")
    s = plan.scales[-1]
    layer = plan.depth - 1
    q, k, v = (torch.randn(2, plan.heads, n, plan.head_dim).bfloat16() for n in (s.tokens, s.kv_len, s.kv_len))
    direct = m.attention(q, k, v, s.index, layer)
    assert torch.equal(torch.ops.sparvar.attention(q, k, v, m.op_key, s.index, layer, 1.0), direct)
    out_t = torch.full_like(q, float("nan"))
    torch.ops.sparvar.attention.out(q, k, v, m.op_key, s.index, layer, 1.0, out=out_t)
    assert torch.equal(out_t, direct)
    assert torch.equal(m.attention_op(q, k, v, s.index, layer), direct)
    with pytest.raises(KernelInputError, match="no loaded module has the key"):
        torch.ops.sparvar.attention(q, k, v, "gone#0", s.index, layer, 1.0)


def test_operator_compiles_fullgraph(module_set, tiny_model):
    """``torch.compile(fullgraph=True)`` of code calling the operator: one graph, same numbers."""
    out, _ = module_set
    m = rt.load(out, device="cpu").member(member_name(256, "1:1"))
    plan = make_plan(tiny_model, 256, "1:1")
    s = plan.scales[-1]
    layer = plan.depth - 1
    proj = torch.nn.Linear(plan.head_dim, plan.head_dim).bfloat16()

    def block(q, k, v):
        o = m.attention_op(q, k, v, s.index, layer, 1.0)
        return proj(o) + q

    q, k, v = (torch.randn(2, plan.heads, n, plan.head_dim).bfloat16() for n in (s.tokens, s.kv_len, s.kv_len))
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert relative_error(compiled(q, k, v), block(q, k, v)) == 0


def test_cli_emits_and_verifies_a_module_set(tiny_model, tmp_path, capsys):
    """``compile --aspect all`` (and a list) emits a set; verify --json checks it; plan refuses several aspects."""
    from sparvar_compiler.cli import main

    yaml = tmp_path / "tiny.yaml"
    yaml.write_text(TINY)
    out = tmp_path / "set"
    assert main(["compile", "--model", str(yaml), "--gpu", "h100", "--resolution", "256", "--aspect", "all",
                 "--block-sizes", "32", "--batch", "4", "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["module_set"] == str(out) and doc["batch"] == 4
    assert [m["aspect"] for m in doc["members"]] == list(ASPECTS)
    assert doc["stats"]["distinct_kernels"] < doc["stats"]["kernels"]
    assert all(json.loads((out / m["name"] / "manifest.json").read_text())["batch"] == 4 for m in doc["members"])
    assert main(["verify", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["members"] == [m["name"] for m in doc["members"]]
    two = tmp_path / "two"
    assert main(["compile", "--model", str(yaml), "--gpu", "h100", "--resolution", "256", "--aspect", "4:3,3:4",
                 "--block-sizes", "32", "-o", str(two)]) == 0
    assert [m["aspect"] for m in rt.load(two, device="cpu").manifest["members"]] == ["4:3", "3:4"]
    capsys.readouterr()
    assert main(["plan", "--model", str(yaml), "--aspect", "all"]) == 2
    assert "only 'compile' emits" in capsys.readouterr().err
