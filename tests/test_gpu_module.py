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


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_every_kernel_matches_dense_attention_on_its_layout(module_dir, batch):
    """Every kernel, tuned at the module's batch, at batches 1, 2 and 4 (the batch is a launch size)."""
    import sparvar_compiler.runtime as rt
    from sparvar_compiler.planner.layout import BlockLayout
    from sparvar_compiler.tuner.measure import golden, same_dtype_reference

    m = rt.load(module_dir)
    assert not m.fallback and m.manifest["kernels"]
    for name, k in m.manifest["kernels"].items():
        s = k["scale"]
        layer = next(r["layer"] for r in m.manifest["dispatch"] if r["kernel"] == name)
        tokens, kv = m._shape[s]
        q = torch.nn.functional.normalize(torch.randn(batch, m.heads, tokens, m.head_dim, device="cuda"), dim=-1)
        key = torch.nn.functional.normalize(torch.randn(batch, m.heads, kv, m.head_dim, device="cuda"), dim=-1)
        val = torch.randn(batch, m.heads, kv, m.head_dim, device="cuda")
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


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_cs4a_layers_match_the_reference_pipeline(module_dir, batch):
    """A CS4A layer over one image: the decision scale's selection is a top-k of the float64 statistics (up to
    ties), and every later scale equals float64 attention restricted to the tables filled from that selection,
    plus the upsampled float64 residual - at batches 1, 2 and 4."""
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
    q, k, v = _infinity_like(batch, m.heads, tokens, kv, m.head_dim, m.dtype)
    dense = m.attention(q, k, v, S, layer, out=torch.full_like(q, float("nan")))
    full = torch.ones(tokens, kv, dtype=torch.bool, device="cuda")
    assert relative_error(dense, golden(q, k, v, full, m.default_scale)) < 0.02
    sel = c._selection[layer]
    if c.mode == "token":
        mass = torch.stack([group_mass_reference(q[b:b + 1], k[b:b + 1], m.default_scale, c.group)[0]
                            for b in range(batch)])
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
        qs, ks, vs = _infinity_like(batch, m.heads, tokens, kv, m.head_dim, m.dtype)
        out = m.attention(qs, ks, vs, s, layer, out=torch.full_like(qs, float("nan")))
        t = c._tables[s]
        mask = kernel_tables_mask(t, fill_tables(t, sel))
        grids = (c._grid[S], c._grid[s])
        want = golden(qs, ks, vs, mask, m.default_scale) + upsample_grid(resid, *grids)
        same = same_dtype_reference(qs, ks, vs, mask, m.default_scale) + upsample_grid(resid_bf16, *grids)
        err, ref_err = relative_error(out, want), relative_error(same, want)
        assert err <= 3 * ref_err, f"scale {s} ({'token' if isinstance(t, TokenTables) else 'block'}): " \
                                   f"rel err {err:.3g} vs bf16 pipeline {ref_err:.3g}"


def test_whole_image_through_the_operator_in_one_cuda_graph(module_dir):
    """Every (scale, layer) call of an image through torch.ops.sparvar.attention, captured in one CUDA graph and
    replayed on new inputs: the replay equals the eager calls on those inputs (CS4A state included)."""
    import sparvar_compiler.runtime as rt

    m = rt.load(module_dir)
    depth = m.manifest["model"]["depth"]
    layers = sorted({0, depth - 1, next((r["layer"] for r in m.manifest["dispatch"] if r["op"] == "cs4a"), 0)})
    shapes = m.scale_lengths()
    static = {s: _infinity_like(2, m.heads, n, kv, m.head_dim, m.dtype) for s, (n, kv) in enumerate(shapes)}
    outs = {(s, l): torch.empty_like(static[s][0]) for s in static for l in layers}

    def image():
        for s in static:
            for l in layers:
                if m.op(s, l)[0] != "skip":
                    m.attention_op(*static[s], s, l, out=outs[(s, l)])

    image()  # eager warm-up (lazy allocations, SDPA backend choice)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        image()
    fresh = {s: _infinity_like(2, m.heads, n, kv, m.head_dim, m.dtype) for s, (n, kv) in enumerate(shapes)}
    for s, t in fresh.items():
        for dst, src in zip(static[s], t):
            dst.copy_(src)
    graph.replay()
    replayed = {key: o.clone() for key, o in outs.items()}
    image()  # the same inputs, eagerly
    for key, o in outs.items():
        assert torch.equal(replayed[key], o), key


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """The CPU tests' tiny Infinity-like model, as a module set for this GPU."""
    import sys
    from pathlib import Path

    from sparvar_compiler.emit.moduleset import emit_module_set
    from sparvar_compiler.planner import get_model
    from sparvar_compiler.planner.gpus import gpu_from_device_name

    sys.path.insert(0, str(Path(__file__).parent))
    from test_integration_infinity import ASPECTS, TINY

    props = torch.cuda.get_device_properties(0)
    gpu = gpu_from_device_name(props.name, props.multi_processor_count)
    if gpu is None:
        pytest.skip(f"{props.name} is not in the GPU registry")
    d = tmp_path_factory.mktemp("tiny")
    (d / "tiny.yaml").write_text(TINY)
    model = get_model(str(d / "tiny.yaml"))
    emit_module_set(model, 256, ASPECTS, gpu, d / "set", block_sizes=(32,), progress=lambda s: None)
    return model, d / "set"


@pytest.mark.parametrize("aspect,B", [("1:1", 1), ("4:3", 2), ("3:4", 1)])
def test_patched_standin_with_cuda_graphs_equals_eager(tiny_set, aspect, B):
    """integrations.infinity on the GPU: the stand-in patched eagerly, then with graphs=True (image 1 eager, 2
    captured, 3 replayed): every image's logits equal the eager patched image's; and the patched image is close
    to the unpatched model's."""
    import sys
    from pathlib import Path

    from sparvar_compiler.integrations import infinity as sv
    from sparvar_compiler.planner import make_plan

    sys.path.insert(0, str(Path(__file__).parent))
    import infinity_standin as standin

    spec, set_dir = tiny_set
    plan = make_plan(spec, 256, aspect)
    model = standin.Infinity(depth=4, embed_dim=128, num_heads=2, block_chunks=2, seed=4, text_channels=32,
                             device="cuda")

    def generate():
        text = standin.make_text(B=B, text_len=6, text_channels=32, seed=1, device="cuda")
        sched = standin.schedule_of(plan.grids)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model.autoregressive_infer_cfg(scale_schedule=sched, label_B_or_BLT=text, B=B,
                                                  cfg_list=[3.0] * len(sched), tau_list=[1.0] * len(sched),
                                                  inference_mode=True)[1]

    dense = generate()
    sv.apply(model, set_dir)
    eager = generate()
    assert relative_error(eager[-1], dense[-1]) < 0.25
    sv.remove(model)
    patch = sv.apply(model, set_dir, graphs=True)
    for image in range(3):
        got = generate()
        for a, b in zip(got, eager):
            assert torch.equal(a, b), (aspect, image)
    g = patch.block_graphs
    assert g.captures == len(plan.grids) * spec.depth and g.replays == 2 * g.captures
    sv.remove(model)


def test_patched_blocks_compile_fullgraph_with_inductor(tiny_set):
    """torch.compile(fullgraph=True) with Inductor over patched blocks on the GPU matches eager."""
    import sys
    from pathlib import Path

    from sparvar_compiler.integrations import infinity as sv
    from sparvar_compiler.planner import make_plan

    sys.path.insert(0, str(Path(__file__).parent))
    import infinity_standin as standin

    spec, set_dir = tiny_set
    plan = make_plan(spec, 256, "4:3")
    model = standin.Infinity(depth=4, embed_dim=128, num_heads=2, block_chunks=2, seed=5, text_channels=32,
                             device="cuda")
    sv.apply(model, set_dir)

    def generate():
        text = standin.make_text(B=1, text_len=6, text_channels=32, seed=1, device="cuda")
        sched = standin.schedule_of(plan.grids)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model.autoregressive_infer_cfg(scale_schedule=sched, label_B_or_BLT=text, B=1,
                                                  cfg_list=[3.0] * len(sched), tau_list=[1.0] * len(sched),
                                                  inference_mode=True)[1]

    eager = generate()
    torch._dynamo.reset()
    for b in model.unregistered_blocks:
        b.compile(fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=512):
        compiled = generate()
    for a, b in zip(compiled, eager):
        assert relative_error(a, b) < 2e-2
    sv.remove(model)
