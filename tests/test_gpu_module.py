"""GPU regression suite (``pytest -m gpu``): every kernel of an emitted module against dense attention on the
same layout. Skipped cleanly without a CUDA GPU.

By default it emits a module for the local GPU (infinity-2b, default plan, untuned configs unless your tuning
database has winners); set ``SPARVAR_MODULE=DIR`` to check a module you emitted yourself.
"""

import os

import pytest
import torch

from sparvar_compiler.codegen.reference import relative_error

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    if os.environ.get("SPARVAR_MODULE"):
        return os.environ["SPARVAR_MODULE"]
    from sparvar_compiler.emit.emitter import emit_module
    from sparvar_compiler.planner import make_plan
    from sparvar_compiler.planner.gpus import gpu_from_device_name

    props = torch.cuda.get_device_properties(0)
    gpu = gpu_from_device_name(props.name, props.multi_processor_count)
    if gpu is None:
        pytest.skip(f"{props.name} is not in the GPU registry")
    out = tmp_path_factory.mktemp("module") / "infinity-2b"
    emit_module(make_plan("infinity-2b"), gpu, out, progress=lambda s: None)
    return out


def test_every_kernel_matches_dense_attention_on_its_layout(module_dir):
    import sparvar_compiler.runtime as rt
    from sparvar_compiler.planner.layout import BlockLayout
    from sparvar_compiler.tuner.measure import golden, same_dtype_reference

    m = rt.load(module_dir)
    assert not m.fallback and m.manifest["kernels"]
    for name, k in m.manifest["kernels"].items():
        s = k["scale"]
        layer = next(r["layer"] for r in m.manifest["dispatch"] if r["kernel"] == name)
        tokens, kv = m._shape[s]
        q = torch.nn.functional.normalize(torch.randn(m.batch, m.heads, tokens, m.head_dim, device="cuda"), dim=-1)
        key = torch.nn.functional.normalize(torch.randn(m.batch, m.heads, kv, m.head_dim, device="cuda"), dim=-1)
        val = torch.randn(m.batch, m.heads, kv, m.head_dim, device="cuda")
        q, key, val = (t.to(m.dtype).contiguous() for t in (q * 12.0, key, val))
        out = torch.full_like(q, float("nan"))
        m.attention(q, key, val, s, layer, out=out)
        mask = torch.from_numpy(BlockLayout.from_npz(m.directory / k["layout_file"]).to_token_mask()).cuda()
        gold = golden(q, key, val, mask, m.default_scale)
        ref = same_dtype_reference(q, key, val, mask, m.default_scale)
        err, ref_err = relative_error(out, gold), relative_error(ref, gold)
        assert err <= 3 * ref_err, f"{name}: rel err {err:.3g} vs bf16 reference {ref_err:.3g}"


def test_wrong_shapes_and_devices_are_refused(module_dir):
    import sparvar_compiler.runtime as rt
    from sparvar_compiler.codegen.spec import KernelInputError

    m = rt.load(module_dir)
    tokens, kv = m._shape[12]
    q = torch.randn(m.batch, m.heads, tokens, m.head_dim, device="cuda", dtype=m.dtype)
    k = torch.randn(m.batch, m.heads, kv, m.head_dim, device="cuda", dtype=m.dtype)
    with pytest.raises(KernelInputError, match="shape"):
        m.attention(q[:, :, :-1], k, k, 12, 20)
    with pytest.raises(KernelInputError, match="must be torch.bfloat16"):
        m.attention(q.half(), k.half(), k.half(), 12, 20)
    with pytest.raises(KernelInputError, match="is on cpu"):
        m.attention(q.cpu(), k.cpu(), k.cpu(), 12, 20)


def _infinity_like(batch, heads, n_q, n_kv, dim, dtype):
    q = torch.nn.functional.normalize(torch.randn(batch, heads, n_q, dim, device="cuda"), dim=-1) * 12.0
    k = torch.nn.functional.normalize(torch.randn(batch, heads, n_kv, dim, device="cuda"), dim=-1)
    v = torch.randn(batch, heads, n_kv, dim, device="cuda")
    return tuple(t.to(dtype).contiguous() for t in (q, k, v))


def test_cs4a_layers_match_the_reference_pipeline(module_dir):
    """A CS4A layer over one image: the decision scale's selection is a top-k of the float64 statistics (up to
    ties), and every later scale equals float64 attention restricted to the tables filled from that selection,
    plus the upsampled float64 residual."""
    import sparvar_compiler.runtime as rt
    from sparvar_compiler.cs4a.select import (TokenTables, fill_tables, group_mass_reference, kernel_tables_mask,
                                              upsample_grid)
    from sparvar_compiler.tuner.measure import golden, same_dtype_reference

    m = rt.load(module_dir)
    if m.cs4a is None:
        pytest.skip("this module's plan has no CS4A layer")
    c = m.cs4a
    S = c.decision_scale
    layer = next(r["layer"] for r in m.manifest["dispatch"] if r["op"] == "cs4a_decision")
    tokens, kv = m._shape[S]
    q, k, v = _infinity_like(m.batch, m.heads, tokens, kv, m.head_dim, m.dtype)
    dense = m.attention(q, k, v, S, layer, out=torch.full_like(q, float("nan")))
    full = torch.ones(tokens, kv, dtype=torch.bool, device="cuda")
    assert relative_error(dense, golden(q, k, v, full, m.default_scale)) < 0.02
    sel = c._selection[layer]
    if c.mode == "token":
        mass = torch.stack([group_mass_reference(q[b:b + 1], k[b:b + 1], m.default_scale, c.group)[0]
                            for b in range(m.batch)])
        picked = torch.gather(mass, -1, sel.long())
        rest = mass.scatter(-1, sel.long(), float("-inf"))
        assert bool((picked.min(-1).values >= rest.max(-1).values - 1e-3 * mass.amax(-1)).all())
    tables_s = c._tables[S]
    mask_s = kernel_tables_mask(tables_s, fill_tables(tables_s, sel))
    resid = golden(q, k, v, full, m.default_scale) - golden(q, k, v, mask_s, m.default_scale)
    resid_bf16 = (same_dtype_reference(q, k, v, full, m.default_scale)
                  - same_dtype_reference(q, k, v, mask_s, m.default_scale))
    for s in sorted(int(x) for x in m.manifest["cs4a"]["scales"] if int(x) > S):
        tokens, kv = m._shape[s]
        qs, ks, vs = _infinity_like(m.batch, m.heads, tokens, kv, m.head_dim, m.dtype)
        out = m.attention(qs, ks, vs, s, layer, out=torch.full_like(qs, float("nan")))
        t = c._tables[s]
        mask = kernel_tables_mask(t, fill_tables(t, sel))
        grids = (c._grid[S], c._grid[s])
        want = golden(qs, ks, vs, mask, m.default_scale) + upsample_grid(resid, *grids)
        same = same_dtype_reference(qs, ks, vs, mask, m.default_scale) + upsample_grid(resid_bf16, *grids)
        err, ref_err = relative_error(out, want), relative_error(same, want)
        assert err <= 3 * ref_err, f"scale {s} ({'token' if isinstance(t, TokenTables) else 'block'}): " \
                                   f"rel err {err:.3g} vs bf16 pipeline {ref_err:.3g}"
