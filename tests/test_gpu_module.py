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
