"""The emitted runtime module on the CPU: emission, verification, tampering, loading (fallback path) and
dispatch, against references built independently from the layouts."""

import hashlib
import json
import shutil

import pytest
import torch

from sparvar_compiler.cli import main
from sparvar_compiler.codegen.reference import reference_attention, relative_error
from sparvar_compiler.codegen.spec import KernelInputError
from sparvar_compiler.emit import emitter
from sparvar_compiler.emit.emitter import emit_module
from sparvar_compiler.emit.manifest import ModuleError, verify_module
from sparvar_compiler.planner import PlanConfig, csla_layout, get_gpu, make_plan
import sparvar_compiler.runtime as rt

PLAN = make_plan("var-d16", config=PlanConfig(skip_last=0))


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "var-d16-h100"
    manifest = emit_module(PLAN, get_gpu("h100"), out, db=None, block_sizes=(32,), progress=lambda s: None)
    return out, manifest


def _copy(module, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(module[0], dst)
    return dst


def test_module_is_complete_and_verifies(module):
    out, manifest = module
    assert verify_module(out, gpu="h100")["model"]["name"] == "var-d16"
    csla = [s.index for s in PLAN.scales if s.has_csla]
    assert sorted(k["scale"] for k in manifest["kernels"].values()) == csla
    for k in manifest["kernels"].values():
        assert (out / k["binary"]).read_bytes()[:4] == b"\x7fELF" and k["tuned"] is False
        assert k["meta"]["arch"].startswith("sm_90")
    modes = {(r["scale"], r["layer"]): r["op"] for r in manifest["dispatch"]}
    assert len(modes) == PLAN.num_scales * PLAN.depth
    assert modes[(0, 0)] == "sdpa" and modes[(csla[-1], PLAN.depth - 1)] == "kernel"
    assert not manifest["tuned"] and "load" in (out / "README.txt").read_text()


def test_fallback_calls_match_independent_references(module, rng):
    out, manifest = module
    m = rt.load(out)
    assert m.fallback and m.default_scale == pytest.approx(1 / 8)
    torch.manual_seed(int(rng.integers(1 << 30)))
    for s in PLAN.scales:
        q = torch.randn(2, PLAN.heads, s.tokens, 64, dtype=torch.bfloat16)
        k = torch.randn(2, PLAN.heads, s.kv_len, 64, dtype=torch.bfloat16)
        v = torch.randn(2, PLAN.heads, s.kv_len, 64, dtype=torch.bfloat16)
        for layer in (0, PLAN.depth - 1):
            op, name = m.op(s.index, layer)
            if op == "cs4a":
                continue  # stateful, checked against its reference pipeline in test_cs4a_dynamic.py
            out_t = torch.full_like(q, float("nan"))
            m.attention(q, k, v, s.index, layer, out=out_t)
            if op == "kernel":
                mask = torch.from_numpy(csla_layout(PLAN, s.index, 32, 32).to_token_mask())
            else:
                mask = torch.ones(s.tokens, s.kv_len, dtype=torch.bool)
            gold = reference_attention(q, k, v, mask, scale=1 / 8, dtype=torch.float64)
            same = reference_attention(q, k, v, mask, scale=1 / 8)
            assert relative_error(out_t, gold) <= 3 * relative_error(same, gold) + 1e-6, (s.index, layer, op)


def test_wrong_calls_are_refused(module):
    m = rt.load(module[0])
    s = PLAN.scales[-1]
    q = torch.randn(2, PLAN.heads, s.tokens, 64, dtype=torch.bfloat16)
    k = torch.randn(2, PLAN.heads, s.kv_len, 64, dtype=torch.bfloat16)
    with pytest.raises(KernelInputError, match=r"q must have shape \(2, 16, 256, 64\)"):
        m.attention(q[:, :, 1:], k, k, s.index, 0)
    with pytest.raises(KernelInputError, match="must be torch.bfloat16"):
        m.attention(q.float(), k.float(), k.float(), s.index, 0)
    with pytest.raises(KernelInputError, match="layer_index 16 is out of range"):
        m.attention(q, k, k, s.index, 16)
    with pytest.raises(KernelInputError, match="must be contiguous"):
        m.attention(q.transpose(2, 3).contiguous().transpose(2, 3), k, k, s.index, 0)


def test_one_byte_changed_is_refused(module, tmp_path):
    d = _copy(module, tmp_path)
    kernel = next(iter(module[1]["kernels"].values()))
    blob = bytearray((d / kernel["binary"]).read_bytes())
    blob[len(blob) // 2] ^= 1
    (d / kernel["binary"]).write_bytes(bytes(blob))
    with pytest.raises(ModuleError, match=f"file {kernel['binary']} was modified"):
        rt.load(d)
    assert main(["verify", str(d)]) == 1  # a bad module (usage errors exit 2)


def test_missing_file_extra_file_and_other_gpu(module, tmp_path):
    d = _copy(module, tmp_path)
    kernel = next(iter(module[1]["kernels"].values()))
    (d / kernel["layout"]).unlink()
    with pytest.raises(ModuleError, match=f"missing file {kernel['layout']}"):
        rt.load(d)
    d2 = tmp_path / "c2"
    shutil.copytree(module[0], d2)
    (d2 / "kernels" / "evil.cubin").write_bytes(b"x")
    with pytest.raises(ModuleError, match="not listed in the manifest"):
        verify_module(d2)
    with pytest.raises(ModuleError, match="built for h100, not h200"):
        verify_module(module[0], gpu="h200")
    d3 = tmp_path / "c3"
    shutil.copytree(module[0], d3)
    manifest = json.loads((d3 / "manifest.json").read_text())
    manifest["format_version"] = 99
    (d3 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModuleError, match="manifest.json was modified"):  # its digest is manifest.sha256's
        rt.load(d3)
    data = (d3 / "manifest.json").read_bytes()
    (d3 / "manifest.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  manifest.json\n")
    with pytest.raises(ModuleError, match="format version 99"):
        rt.load(d3)


def test_failed_emit_leaves_the_old_module_intact(module, tmp_path, monkeypatch):
    d = _copy(module, tmp_path)
    before = {p.name: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    calls = []

    def failing(spec, config, layout, gpu):
        calls.append(spec)
        raise RuntimeError("compiler crashed")

    real = emitter._backend("triton")

    class Crashing:
        default_config = staticmethod(real.default_config)
        compile_for_target = staticmethod(failing)
        _host_tables = staticmethod(real._host_tables)

    monkeypatch.setattr(emitter, "_backend", lambda name: Crashing)
    with pytest.raises(RuntimeError, match="compiler crashed"):
        emit_module(PLAN, get_gpu("h100"), d, block_sizes=(32,), progress=lambda s: None)
    assert calls
    assert {p.name: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".copy")]
    verify_module(d)


def test_main_job_emits_a_module(tmp_path, capsys):
    out = tmp_path / "mod"
    assert main(["--model", "var-d16", "--gpu", "a100", "--block-sizes", "32", "-o", str(out),
                 "--db", str(tmp_path / "empty.sqlite")]) == 0
    text = capsys.readouterr().out
    assert "UNTUNED" in text and f"module: {out}" in text
    assert verify_module(out, gpu="a100")["target"]["arch"] == "sm_80"
    assert main(["inspect", str(out)]) == 0


def test_integration_example_runs(capsys, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    monkeypatch.setattr(sys, "argv", ["swap_attention.py", "--gpu", "h100"])
    runpy.run_path(str(Path(__file__).parent.parent / "examples" / "swap_attention.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "scale 6 (16x16, kernel in the last layer)" in out
    assert "scale 0 (1x1, sdpa in the last layer): relative difference to dense 0.000e+00" in out
