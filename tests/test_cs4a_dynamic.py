"""CS4A's dynamic half on the CPU: statistics, selection, mapping to later scales, the dynamic kernels (Triton
interpreter) and the runtime module's CS4A path, each against a straightforward reference.

References here are written from SPEC.md's definitions with Python sets and loops; they share no indexing code
with ``sparvar_compiler.cs4a`` beyond the static planner tables (group mapping, bands, key mapping), which
``test_cs4a_static.py`` checks against the published figures.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparvar_compiler.codegen.triton_backend import use_interpreter

use_interpreter()

from sparvar_compiler.codegen import cs4a_stats  # noqa: E402
from sparvar_compiler.codegen import triton_backend as tb  # noqa: E402
from sparvar_compiler.codegen.reference import check_close, reference_attention, relative_error  # noqa: E402
from sparvar_compiler.codegen.spec import KernelConfig, KernelInputError, KernelSpec  # noqa: E402
from sparvar_compiler.cs4a import (block_mass, block_tables, compact_rows, cs4a_masks, dcsla_select,  # noqa: E402
                                   decision_mask, group_mass, group_mass_reference, token_tables, topk_keys,
                                   upsample_grid, upsample_residual)
from sparvar_compiler.emit.manifest import ModuleError  # noqa: E402
from sparvar_compiler.planner import PlanConfig, make_plan  # noqa: E402
from sparvar_compiler.planner.cs4a import band_keys, cs4a_tables, group_mapping  # noqa: E402
from sparvar_compiler.planner.models import model_from_mapping  # noqa: E402

SMALL = dict(group_size=32, key_tile=16, dcsla_block=16, dcsla_min_blocks=4)


def _model(scales: str, name: str = "tiny-cs4a", heads: int = 2, head_dim: int = 64):
    return model_from_mapping({"name": name, "family": "infinity", "depth": 3, "heads": heads, "head_dim": head_dim,
                               "schedules": [{"resolution": 256, "scales": scales}]}, "test model")


SQUARE = "1,2,4,6,8,12,16"
RECT = "1x1,2x3,3x4,4x6,6x8,9x12,12x16"  # height x width, not square


def _plan(scales=SQUARE, **cfg):
    return make_plan(_model(scales), config=PlanConfig(**{**SMALL, **cfg}))


# ------------------------------------------------------------------------------------------- statistics
def test_group_mass_matches_the_softmax_definition():
    q, k = torch.randn(2, 3, 70, 16, dtype=torch.float64), torch.randn(2, 3, 131, 16, dtype=torch.float64)
    scale = 0.3
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    want = torch.stack([p[:, :, g * 32:(g + 1) * 32].sum(2) for g in range(3)], dim=2)  # groups 32, 32, 6
    assert torch.allclose(group_mass_reference(q, k, scale, 32), want)
    lse = torch.logsumexp(q @ k.transpose(-1, -2) * scale, dim=-1)
    assert torch.allclose(group_mass(q, k, lse, scale, 32).double(), want, atol=1e-5)


@pytest.mark.parametrize("q_len,kv_len,head_dim,group,stride", [(70, 131, 64, 32, 1), (100, 257, 128, 48, 1),
                                                                 (64, 90, 64, 32, 2)])
def test_statistics_kernel_against_float64(q_len, kv_len, head_dim, group, stride):
    B, H, scale = 2, 2, 0.2
    q, k = torch.randn(B, H, q_len, head_dim), torch.randn(B, H, kv_len, head_dim)
    s = q.double() @ k.double().transpose(-1, -2) * scale
    lse = torch.logsumexp(s, dim=-1).float().contiguous()
    spec = cs4a_stats.StatsSpec(B, H, q_len, kv_len, head_dim, "fp32", group, stride)
    kern = cs4a_stats.build(spec, cs4a_stats.default_config(spec))
    mass = torch.full((B, H, spec.groups, kv_len), float("nan"))
    kern(q, k, lse, scale, mass=mass)
    p = torch.softmax(s, dim=-1)
    rows = torch.zeros(q_len, dtype=torch.bool)
    rows[torch.arange(q_len) % group % stride == 0] = True  # every stride-th query of each group
    p = p * rows[:, None]
    want = torch.stack([p[:, :, g * group:(g + 1) * group].sum(2) for g in range(spec.groups)], 2) * stride
    assert torch.allclose(mass.double(), want, rtol=1e-4, atol=1e-5)


def test_statistics_kernel_refuses_bad_inputs():
    spec = cs4a_stats.StatsSpec(1, 2, 40, 50, 64, "fp32", 32)
    kern = cs4a_stats.build(spec)
    q, k, lse = torch.randn(1, 2, 40, 64), torch.randn(1, 2, 50, 64), torch.zeros(1, 2, 40)
    with pytest.raises(KernelInputError, match="lse"):
        kern(q, k, lse[:, :, :-1].contiguous())
    with pytest.raises(KernelInputError, match="k must"):
        kern(q, k[:, :, :49].contiguous(), lse)
    with pytest.raises(KernelInputError, match="float32"):
        kern(q, k, lse.double())
    with pytest.raises(Exception, match="multiple of block_m"):
        cs4a_stats.build(cs4a_stats.StatsSpec(1, 2, 40, 50, 64, "fp32", 24), KernelConfig(4, 2, (("block_m", 16),)))


# ------------------------------------------------------------------------------------------- selection
def test_topk_and_dcsla_selection_against_loops(rng):
    mass = torch.from_numpy(rng.random((2, 3, 4, 57)))
    got = topk_keys(mass, 9)
    for b, h, g in np.ndindex(2, 3, 4):
        want = sorted(np.argsort(-mass[b, h, g].numpy(), kind="stable")[:9])
        assert got[b, h, g].tolist() == want
    blocks, count = dcsla_select(mass, 0.6, 3, 20)
    for b, h, g in np.ndindex(2, 3, 4):
        row = mass[b, h, g].numpy()
        order = np.argsort(-row, kind="stable")
        need = 1 + int(np.sum(np.cumsum(row[order]) < 0.6 * row.sum()))
        n = min(max(need, 3), 20)
        assert int(count[b, h, g]) == n
        assert set(blocks[b, h, g, :n].tolist()) == set(order[:n].tolist())


def test_compact_rows_against_sets(rng):
    idx = torch.from_numpy(rng.integers(0, 30, size=(3, 5, 40)))
    num, out = compact_rows(idx, 30)
    for r in np.ndindex(3, 5):
        want = sorted(set(idx[r].tolist()))
        assert int(num[r]) == len(want)
        assert out[r][: len(want)].tolist() == want
        assert set(out[r][len(want):].tolist()) <= set(want)  # padding repeats real indices


def _want_token_keys(plan, scale, topk, mapping):
    """Per (b, h, group): the key set SPEC.md defines, from the static planner tables and Python sets."""
    cfg = plan.config
    S = cfg.decision_scale
    sets = {}
    if scale == S:  # the residual's sparse output: the group's own top-k keys
        for b, h, g in np.ndindex(*topk.shape[:3]):
            sets[b, h, g] = set(topk[b, h, g].tolist())
        return sets
    st = cs4a_tables(plan, mapping).scale(scale)
    for b, h, g in np.ndindex(*topk.shape[:2], st.groups):
        keys = {int(st.key_map[i]) for i in topk[b, h, st.decision_group[g]].tolist()}
        keys |= set(st.band[g, : st.band_len[g]].tolist()) | set(range(st.sink_keys))
        for j in st.reused_bands:
            pj = plan.scales[j]
            bj = band_keys(pj.h, pj.w, pj.kv_offset, cfg.group_size, cfg.band_windows[j - S - 1])
            keys |= set(bj[group_mapping(st.groups, len(bj))[g]].tolist())
        sets[b, h, g] = keys
    return sets


@pytest.mark.parametrize("scales", [SQUARE, RECT])
@pytest.mark.parametrize("mapping", ["identity", "flat", "dap"])
def test_token_tables_match_the_definition(scales, mapping, rng):
    plan = _plan(scales, key_mapping=mapping)
    S = plan.config.decision_scale
    dec = plan.scales[S]
    mass = torch.from_numpy(rng.random((2, 2, -(-dec.tokens // 32), dec.kv_len)))
    for scale in [S] + [s.index for s in plan.scales if s.index > S]:
        t = token_tables(plan, scale, mapping)
        topk = topk_keys(mass, t.topk)
        num, idx = t.fill(topk)
        assert idx.dtype == torch.int32 and idx.shape[-1] == t.capacity and t.capacity % 128 == 0
        want = _want_token_keys(plan, scale, topk, mapping)
        for (b, h, g), keys in want.items():
            n = int(num[b, h, g])
            row = idx[b, h, g].tolist()
            assert row[:n] == sorted(keys), (scale, b, h, g)
            assert set(row[n:]) <= keys and max(row) < t.kv_len


@pytest.mark.parametrize("scales", [SQUARE, RECT])
def test_block_tables_match_the_definition(scales, rng):
    plan = _plan(scales, cs4a="block")
    cfg = plan.config
    bs, S = cfg.dcsla_block, cfg.decision_scale
    dec = plan.scales[S]
    rows_s = -(-dec.tokens // bs)
    mass = torch.from_numpy(rng.random((1, 2, rows_s, -(-dec.kv_len // bs))))
    cap = block_tables(plan, S).select_capacity
    blocks, count = dcsla_select(mass, cfg.dcsla_coverage, cfg.dcsla_min_blocks, cap)
    sinks = -(-plan.scales[cfg.sink_scales].kv_offset // bs)
    for scale in range(S, plan.num_scales):
        sp = plan.scales[scale]
        t = block_tables(plan, scale)
        num, idx = t.fill(blocks, count)
        rows, kb = -(-sp.tokens // bs), -(-sp.kv_len // bs)
        dmap = group_mapping(rows, rows_s)
        for b, h, r in np.ndindex(1, 2, rows):
            d = dmap[r]
            want = set(blocks[b, h, d, : count[b, h, d]].tolist()) | set(range(sinks))
            first = (sp.kv_offset + r * bs) // bs
            last = (sp.kv_offset + min(sp.tokens, (r + 1) * bs) - 1) // bs
            want |= {c for c in range(first - 1, last + 2) if 0 <= c < kb}
            assert idx[b, h, r, : num[b, h, r]].tolist() == sorted(want), (scale, r)


def test_upsample_grid_is_half_pixel_bilinear():
    src = torch.randn(1, 2, 3 * 4, 5, dtype=torch.float64)
    out = upsample_grid(src, (3, 4), (5, 7))
    grid = src.reshape(1, 2, 3, 4, 5)
    for y, x in np.ndindex(5, 7):
        sy, sx = max((y + 0.5) * 3 / 5 - 0.5, 0), max((x + 0.5) * 4 / 7 - 0.5, 0)
        y0, x0 = int(sy), int(sx)
        y1, x1 = min(y0 + 1, 2), min(x0 + 1, 3)
        wy, wx = sy - y0, sx - x0
        want = ((1 - wy) * ((1 - wx) * grid[:, :, y0, x0] + wx * grid[:, :, y0, x1])
                + wy * ((1 - wx) * grid[:, :, y1, x0] + wx * grid[:, :, y1, x1]))
        assert torch.allclose(out[:, :, y * 7 + x], want)


# ------------------------------------------------------------------------------------------- kernels
def _mask_from_tables(num, idx, rows, q_len, kv_len, block=None):
    """Straightforward expansion: loops over rows and entries."""
    B, H, R, _ = idx.shape
    mask = torch.zeros(B, H, q_len, kv_len, dtype=torch.bool)
    for b, h, r in np.ndindex(B, H, R):
        for e in idx[b, h, r, : num[b, h, r]].tolist():
            cols = slice(e, e + 1) if block is None else slice(e * block, min(kv_len, (e + 1) * block))
            mask[b, h, r * rows:(r + 1) * rows, cols] = True
    return mask


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("mode", ["token", "block"])
def test_dynamic_kernels_against_dense_restricted_to_the_selection(mode, head_dim, rng):
    plan = _plan(RECT if head_dim == 64 else SQUARE, cs4a=mode)
    cfg = plan.config
    S = cfg.decision_scale
    B, H, scale = 2, 2, 0.125
    dec = plan.scales[S]
    qd, kd = torch.randn(B, H, dec.tokens, head_dim), torch.randn(B, H, dec.kv_len, head_dim)
    for sp in plan.scales[S:]:
        q, k, v = (torch.randn(B, H, n, head_dim) for n in (sp.tokens, sp.kv_len, sp.kv_len))
        if mode == "token":
            t = token_tables(plan, sp.index)
            num, idx = t.fill(topk_keys(group_mass_reference(qd, kd, scale, cfg.group_size), t.topk))
            spec = KernelSpec("triton", "gather", B, H, sp.tokens, sp.kv_len, head_dim, "fp32", t.group_size, 64,
                              "t", dynamic=True, capacity=t.capacity)
            cfgk = KernelConfig(4, 1, (("block_m", 32), ("block_n", 32), ("order", "q_major")))
            tables, rows, block = {"key_num": num, "key_idx": idx}, t.group_size, None
        else:
            t = block_tables(plan, sp.index)
            mass = block_mass(group_mass_reference(qd, kd, scale, t.block), t.block)
            num, idx = t.fill(*dcsla_select(mass, cfg.dcsla_coverage, cfg.dcsla_min_blocks, t.select_capacity))
            spec = KernelSpec("triton", "block", B, H, sp.tokens, sp.kv_len, head_dim, "fp32", t.block, t.block, "b",
                              dynamic=True, capacity=t.capacity)
            cfgk = KernelConfig(4, 1, (("block_m", 16), ("block_n", 16), ("order", "head_major")))
            tables, rows, block = {"kv_num": num, "kv_idx": idx}, t.block, t.block
        kern = tb.build(spec, cfgk)
        out = torch.full_like(q, float("nan"))  # poisoned: every row must be written
        kern(q, k, v, scale, out=out, tables=tables)
        mask = _mask_from_tables(num, idx, rows, sp.tokens, sp.kv_len, block)
        golden = reference_attention(q, k, v, mask, scale, dtype=torch.float64)
        ok, err, ref = check_close(out, golden, reference_attention(q, k, v, mask, scale))
        assert ok, (mode, sp.index, err, ref)


def test_dynamic_kernel_refuses_bad_tables():
    spec = KernelSpec("triton", "gather", 1, 2, 40, 90, 64, "fp32", 32, 64, "t", dynamic=True, capacity=128)
    kern = tb.build(spec, KernelConfig(4, 1, (("block_m", 32), ("block_n", 32))))
    q, k = torch.randn(1, 2, 40, 64), torch.randn(1, 2, 90, 64)
    num, idx = torch.full((1, 2, 2), 3, dtype=torch.int32), torch.zeros(1, 2, 2, 128, dtype=torch.int32)
    with pytest.raises(KernelInputError, match="takes tables"):
        kern(q, k, k, tables=None)
    with pytest.raises(KernelInputError, match="int32"):
        kern(q, k, k, tables={"key_num": num, "key_idx": idx.long()})
    with pytest.raises(KernelInputError, match="shape"):
        kern(q, k, k, tables={"key_num": num[:, :, :1].contiguous(), "key_idx": idx})
    bad = idx.clone()
    bad[0, 0, 0, 0] = 90
    with pytest.raises(KernelInputError, match=r"\[0, 90\)"):
        kern(q, k, k, tables={"key_num": num, "key_idx": bad})
    with pytest.raises(Exception, match="multiple of 128"):
        tb.build(KernelSpec("triton", "gather", 1, 2, 40, 90, 64, "fp32", 32, 64, "t", dynamic=True, capacity=100),
                 KernelConfig(4, 1, (("block_m", 32), ("block_n", 32))))


def test_static_spec_keys_are_unchanged_by_the_dynamic_fields():
    spec = KernelSpec("triton", "block", 2, 28, 4096, 10521, 128, "bf16", 64, 64, "h")
    assert "dynamic" not in spec.to_dict() and "capacity" not in spec.to_dict()
    dyn = KernelSpec("triton", "gather", 2, 28, 4096, 10521, 128, "bf16", 192, 64, "h", dynamic=True, capacity=2048)
    assert dyn.to_dict()["capacity"] == 2048 and dyn.key() != spec.key()


# ------------------------------------------------------------------------------------------- module
@pytest.fixture(scope="module")
def cs4a_modules(tmp_path_factory):
    from sparvar_compiler.emit.emitter import emit_module
    from sparvar_compiler.planner.gpus import get_gpu

    out = {}
    for mode in ("token", "block"):
        plan = make_plan(_model(RECT, heads=2, head_dim=64), config=PlanConfig(**{**SMALL, "cs4a": mode}))
        d = tmp_path_factory.mktemp(f"cs4a-{mode}") / "module"
        emit_module(plan, get_gpu("h100"), d, progress=lambda s: None)
        out[mode] = (plan, d)
    return out


@pytest.mark.parametrize("mode", ["token", "block"])
def test_module_runs_cs4a_like_the_reference_pipeline(cs4a_modules, mode):
    import sparvar_compiler.runtime as rt

    plan, d = cs4a_modules[mode]
    m = rt.load(d, device="cpu")
    manifest = m.manifest
    assert manifest["cs4a"]["mode"] == mode and manifest["cs4a"]["residual"] is True
    S = plan.config.decision_scale
    assert m.op(S, 0) == ("cs4a_decision", None) and m.op(S + 1, 0) == ("cs4a", None)
    B, H, D = 2, plan.heads, plan.head_dim
    inputs = {s.index: [torch.randn(B, H, n, D).bfloat16() for n in (s.tokens, s.kv_len, s.kv_len)]
              for s in plan.scales}
    outs = {}
    for s in plan.scales:
        q, k, v = inputs[s.index]
        outs[s.index] = m.attention(q, k, v, s.index, 0, out=torch.full_like(q, float("nan")))
    qd, kd, vd = (t.double() for t in inputs[S])
    dense = torch.ones(qd.shape[2], kd.shape[2], dtype=torch.bool)
    golden_res = reference_attention(qd, kd, vd, dense, 1.0) - reference_attention(
        qd, kd, vd, decision_mask(plan, qd, kd, 1.0), 1.0)
    qb, kb, vb = inputs[S]
    bf16_res = reference_attention(qb, kb, vb, dense, 1.0) - reference_attention(
        qb, kb, vb, decision_mask(plan, qd, kd, 1.0), 1.0)
    for sc, mask in cs4a_masks(plan, qd, kd, 1.0).items():
        q, k, v = inputs[sc]
        golden = reference_attention(q.double(), k.double(), v.double(), mask, 1.0) + upsample_residual(
            golden_res, plan, sc)
        same = reference_attention(q, k, v, mask, 1.0) + upsample_residual(bf16_res, plan, sc)
        ok, err, ref = check_close(outs[sc], golden, same)
        assert ok, (sc, err, ref)
    assert relative_error(outs[S], reference_attention(qd, kd, vd, dense, 1.0)) < 0.02  # the decision scale is dense


def test_module_cs4a_needs_the_decision_call_first(cs4a_modules):
    import sparvar_compiler.runtime as rt

    plan, d = cs4a_modules["token"]
    m = rt.load(d, device="cpu")
    s = plan.scales[plan.config.decision_scale + 1]
    q, k = torch.randn(2, 2, s.tokens, 64).bfloat16(), torch.randn(2, 2, s.kv_len, 64).bfloat16()
    with pytest.raises(KernelInputError, match="decision-scale call"):
        m.attention(q, k, k, s.index, 0)


def test_module_refuses_tampered_cs4a_tables(cs4a_modules, tmp_path):
    import shutil

    import sparvar_compiler.runtime as rt

    _, d = cs4a_modules["token"]
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    scales = json.loads((bad / "manifest.json").read_text())["cs4a"]["scales"]
    entry = scales[str(max(int(s) for s in scales))]
    with np.load(bad / entry["tables_file"]) as z:
        arrays = {n: z[n] for n in z.files}
    arrays["static_keys"] = arrays["static_keys"] + 1
    np.savez_compressed(bad / entry["tables_file"], **arrays)
    with pytest.raises(ModuleError, match="modified"):
        rt.load(bad, device="cpu")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["cs4a"]["scales"].pop(str(max(int(s) for s in manifest["cs4a"]["scales"])))
    shutil.rmtree(bad)
    shutil.copytree(d, bad)
    from sparvar_compiler.emit.manifest import write_manifest

    # A consistent edit (the digest sidecar rewritten too) still fails the schema: cs4a dispatch without its kernel.
    (bad / "manifest.json").unlink()
    (bad / "manifest.sha256").unlink()
    with pytest.raises(ModuleError, match="cs4a"):
        write_manifest(bad, manifest)
    data = json.dumps(manifest)
    import hashlib
    (bad / "manifest.json").write_text(data)
    (bad / "manifest.sha256").write_text(f"{hashlib.sha256(data.encode()).hexdigest()}  manifest.json\n")
    with pytest.raises(ModuleError, match="cs4a"):
        rt.load(bad, device="cpu")


def test_topk_kernel_matches_topk_and_breaks_ties_by_index():
    from sparvar_compiler.codegen import cs4a_topk

    kern = cs4a_topk.build(cs4a_topk.TopkSpec(2 * 3 * 4, 301, 37))
    mass = torch.rand(2, 3, 4, 301)
    assert torch.equal(kern(mass).long(), topk_keys(mass, 37))
    ties = (torch.floor(torch.rand(2, 3, 4, 301) * 4) / 4).contiguous()  # four distinct values: many ties
    got = kern(ties).view(24, 37)
    for r, row in enumerate(ties.view(24, 301)):
        t = row.sort(descending=True).values[36]
        above = torch.nonzero(row > t).flatten()
        want = torch.cat([above, torch.nonzero(row == t).flatten()[: 37 - len(above)]]).sort().values
        assert torch.equal(got[r].long(), want), r
    with pytest.raises(KernelInputError, match="float32"):
        kern(mass.double())


def test_upsample_add_equals_interpolate_plus_add():
    from sparvar_compiler.cs4a.select import upsample_add

    res = torch.randn(2, 3, 12 * 5, 16, dtype=torch.float64)
    out = torch.randn(2, 3, 20 * 9, 16, dtype=torch.float64)
    want = out + upsample_grid(res, (12, 5), (20, 9))
    assert torch.allclose(upsample_add(out, res, (12, 5), (20, 9)), want)


def test_reused_token_buffers_hold_the_same_tables(rng):
    plan = _plan()
    S = plan.config.decision_scale
    t = token_tables(plan, S + 2)
    dec = plan.scales[S]
    for _ in range(2):  # the second call writes only the selected columns into the kept buffers
        mass = torch.from_numpy(rng.random((2, 2, -(-dec.tokens // 32), dec.kv_len)))
        topk = topk_keys(mass, t.topk)
        fresh = t.fill(topk)
        reused = t.fill(topk, reuse=True)
        assert torch.equal(fresh[0], reused[0]) and torch.equal(fresh[1], reused[1])
