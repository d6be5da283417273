"""Captures from an unmodified Infinity model and the softmax scale they are evaluated at.

The model is the stand-in of tests/infinity_standin.py, which binds SDPA at import as ``slow_attn`` exactly as
Infinity's basic.py does, so patching ``torch.nn.functional`` cannot see its self-attention. Covered: ``sv.capture``
records the chosen layers and heads, byte for byte what attention computes on; a capture that records nothing
raises with its cause; ``capture_sdpa`` on the stand-in raises and points at ``sv.capture``; bf16 is stored as
bf16 (file size) and reads back exactly, with our writer and with the ``safetensors`` package; ``save`` refuses
shapes that do not fit the model; the softmax scale defaults to the family's, is required where there is none, is
refused at load where it disagrees with the family's unless forced, and a missing one cannot change the figures.
"""

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparvar_compiler.fidelity import tensorfile
from sparvar_compiler.fidelity.captures import CaptureError, CaptureSet, default_softmax_scale
from sparvar_compiler.fidelity.evaluate import EvalOptions, evaluate
from sparvar_compiler.fidelity.hooks import CaptureWriter, capture_sdpa
from sparvar_compiler.fidelity.synthetic import SyntheticSource, write_synthetic_captures
from sparvar_compiler.fidelity.tensorfile import read_tensor_headers
from sparvar_compiler.integrations import infinity as sv
from sparvar_compiler.integrations.infinity import IntegrationError
from sparvar_compiler.planner import get_model, make_plan

sys.path.insert(0, str(Path(__file__).parent))
import infinity_standin as standin  # noqa: E402

HEADS, HEAD_DIM, DEPTH = 4, 64, 4
SPEC = f"""\
name: tiny-infinity-caps
family: {{family}}
depth: {DEPTH}
width: {HEADS * HEAD_DIM}
heads: {HEADS}
head_dim: {HEAD_DIM}
schedules:
  - {{{{resolution: 256, aspect: "1:1", scales: "1,2,4,6,8,12,16"}}}}
  - {{{{resolution: 256, aspect: "4:3", scales: "1,2,4x3,8x6,12x9,16x12,20x15"}}}}
  - {{{{resolution: 128, aspect: "1:1", scales: "2,3,5"}}}}
"""


def _spec(tmp_path_factory, family):
    d = tmp_path_factory.mktemp(family)
    (d / "m.yaml").write_text(SPEC.format(family=family).replace("tiny-infinity-caps", f"tiny-{family}-caps"))
    return get_model(str(d / "m.yaml"))


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return _spec(tmp_path_factory, "infinity")


def _model(seed=3):
    return standin.Infinity(depth=DEPTH, embed_dim=HEADS * HEAD_DIM, num_heads=HEADS, block_chunks=2, seed=seed,
                            text_channels=32)


def _generate(model, schedule):
    text = standin.make_text(B=1, text_len=6, text_channels=model.Ct5, seed=0)
    sched = standin.schedule_of(schedule.grids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model.autoregressive_infer_cfg(scale_schedule=sched, label_B_or_BLT=text, B=1,
                                              cfg_list=[3.0] * len(sched), tau_list=[1.0] * len(sched),
                                              inference_mode=True)[1]


def _unpatched(model):
    return sv.patched(model) is None and not any(b.sa.use_flex_attn or "forward" in vars(b)
                                                 for b in model.unregistered_blocks)


# ---------------------------------------------------------------------------------------------- sv.capture
def test_capture_records_selected_layers_and_heads_exactly(spec, tmp_path, monkeypatch):
    schedule = spec.schedule(256, "1:1")
    model = _model()
    seen = []  # what Infinity's default path hands slow_attn, call by call (layer = call % depth)

    def recorder(query, key, value, **kw):  # the same math as the capture's dense attention
        seen.append((query, key, value))
        return torch.nn.functional.scaled_dot_product_attention(query.to(value.dtype), key.to(value.dtype), value,
                                                                scale=kw.get("scale"))

    monkeypatch.setattr(standin, "slow_attn", recorder)
    before = _generate(model, schedule)
    monkeypatch.undo()
    writer = CaptureWriter(tmp_path / "caps", spec, resolution=256, aspect="1:1")
    assert (writer.softmax_scale, writer.softmax_scale_source) == (1.0, "family default")
    with sv.capture(model, writer, layers=[1, 3], heads=[2, 0]) as patch:
        during = _generate(model, schedule)
    assert _unpatched(model)
    assert all(torch.equal(a, b) for a, b in zip(during, before))  # attention stayed dense: the same image
    n = schedule.num_scales
    assert sorted((s, l) for _, s, l in patch.calls) == [(s, l) for s in range(n) for l in (1, 3)]
    index = json.loads((tmp_path / "caps" / "captures.json").read_text())
    assert index["heads"] == [2, 0] and index["softmax_scale"] == 1.0 and index["softmax_scale_source"] == "model"
    caps = CaptureSet.open(tmp_path / "caps", spec)
    assert sorted(caps.files) == [(s, l) for s in range(n) for l in (1, 3)]
    assert caps.head_ids == (2, 0) and caps.heads_text() == "2 of 4: [2, 0]"
    assert caps.describe()["heads"] == "2 of 4: [2, 0]" and caps.describe()["head_ids"] == [2, 0]
    assert (caps.softmax_scale, caps.softmax_scale_source) == (1.0, "index")
    # Stored: bf16 (what SDPA under autocast computes on), this scale's keys only, the chosen heads in order.
    headers = read_tensor_headers(caps.files[(n - 1, 3)])
    assert {h.dtype_name for h in headers.values()} == {"BF16"}
    assert headers["k"].shape == (2, 2, schedule.tokens[-1], HEAD_DIM)
    sel = torch.tensor([2, 0])
    for s in (0, 3, n - 1):
        for layer in (1, 3):
            q, k, v = seen[s * DEPTH + layer]
            got = caps.qkv_torch(s, layer)
            want = [t.index_select(1, sel).to(torch.bfloat16) for t in (q, k, v)]
            assert all(g.dtype == torch.bfloat16 and torch.equal(g, w) for g, w in zip(got, want))  # the rebuilt cache
            qn, kn, vn = caps.qkv(s, layer)
            assert kn.dtype == np.float32 and np.array_equal(kn, want[1].float().numpy())


def test_capture_that_records_nothing_raises(spec, tmp_path):
    model = _model()
    schedule = spec.schedule(256, "1:1")
    with pytest.raises(IntegrationError, match="sv.capture recorded nothing: no self-attention call reached the hook"):
        with sv.capture(model, CaptureWriter(tmp_path / "a", spec, resolution=256)):
            pass  # no generation inside the block
    assert _unpatched(model)
    wrong = CaptureWriter(tmp_path / "b", spec, resolution=256, aspect="4:3")
    with pytest.raises(IntegrationError, match=r"(?s)recorded scales 0-1 of layer 0, but tiny-infinity-caps at 256 px "
                                               r"4:3 has scales 0-6 \(20 of 28 self-attention calls matched none.*"
                                               r"pass CaptureWriter\(resolution=..., aspect=...\)"):
        with sv.capture(model, wrong):
            _generate(model, schedule)  # 1:1 generated, the writer is for 4:3: only scales 0 and 1 agree
    assert _unpatched(model)
    other = CaptureWriter(tmp_path / "b2", spec, resolution=128)  # scales 2x2, 3x3, 5x5: none matches a call
    with pytest.raises(IntegrationError, match=r"(?s)sv.capture recorded nothing: 28 attention calls, none a "
                                               r"self-attention of a scale of tiny-infinity-caps at 128 px 1:1 "
                                               r"\(the first had 1 queries over 1 keys\)"):
        with sv.capture(model, other):
            _generate(model, schedule)
    assert _unpatched(model)
    with pytest.raises(IntegrationError, match=r"28 calls matched scales .* but layers=\[\] filtered out every one"):
        with sv.capture(model, CaptureWriter(tmp_path / "c", spec, resolution=256), layers=[]):
            _generate(model, schedule)
    with pytest.raises(IntegrationError, match=r"layer 4 is not in 0..3"):
        with sv.capture(model, CaptureWriter(tmp_path / "d", spec, resolution=256), layers=[0, 4]):
            pass
    # An error inside the block is the one the caller sees, and the model is restored.
    with pytest.raises(KeyError, match="inside"):
        with sv.capture(model, CaptureWriter(tmp_path / "e", spec, resolution=256)):
            raise KeyError("inside")
    assert _unpatched(model)
    # Two generations in one capture: the second would overwrite the first, so the writer refuses it.
    with pytest.raises(CaptureError, match="scale 0 of layer 0 is already captured"):
        with sv.capture(model, CaptureWriter(tmp_path / "f", spec, resolution=256), layers=[0]):
            _generate(model, schedule)
            _generate(model, schedule)
    assert _unpatched(model)


def test_capture_sdpa_sees_nothing_of_infinity_and_says_where_to_go(spec, tmp_path):
    import torch.nn.functional as F

    model = _model()
    writer = CaptureWriter(tmp_path / "caps", spec, resolution=256)
    with pytest.raises(CaptureError, match=r"(?s)capture_sdpa recorded nothing.*slow_attn.*"
                                           r"sparvar_compiler.integrations.infinity.capture\(model, writer\)"):
        with capture_sdpa(writer):
            _generate(model, spec.schedule(256, "1:1"))
    assert F.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention" and not writer.entries
    with pytest.raises(CaptureError, match=r"capture_sdpa recorded nothing: no call of .* was made\. .*slow_attn"):
        with capture_sdpa(CaptureWriter(tmp_path / "none", spec, resolution=256)):
            pass


def test_capture_refuses_a_writer_that_does_not_fit_the_model(spec, tmp_path, tmp_path_factory):
    model = _model()
    with pytest.raises(IntegrationError, match=r"calls attention with softmax scale 1, but the writer's is 0.5 "
                                               r"\(explicit\)"):
        with sv.capture(model, CaptureWriter(tmp_path / "a", spec, resolution=256, softmax_scale=0.5)):
            pass
    assert _unpatched(model)
    custom = _spec(tmp_path_factory, "custom")
    w = CaptureWriter(tmp_path / "b", custom, resolution=256)
    assert w.softmax_scale is None
    with sv.capture(model, w, layers=[0], kv="cache"):  # no default: the model's sa.scale is taken
        _generate(model, custom.schedule(256, "1:1"))
    assert (w.softmax_scale, w.softmax_scale_source) == (1.0, "model")
    caps = CaptureSet.open(tmp_path / "b", custom)
    last = custom.schedule(256).num_scales - 1
    assert caps.heads_text() == "all 4" and caps.qkv_torch(last, 0)[1].shape[2] == custom.schedule(256).kv_lens[-1]
    assert read_tensor_headers(caps.files[(last, 0)])["k"].shape[2] == custom.schedule(256).kv_lens[-1]
    other = get_model("infinity-2b")
    with pytest.raises(IntegrationError, match="the writer is for infinity-2b .* the model has 4 blocks"):
        with sv.capture(model, CaptureWriter(tmp_path / "c", other)):
            pass


# ---------------------------------------------------------------------------------------------- storage
@pytest.mark.parametrize("writer", ["ours", "package"])
def test_bf16_is_stored_as_bf16_and_reads_back_exactly(spec, tmp_path, monkeypatch, writer):
    if writer == "package":
        pytest.importorskip("safetensors")
    else:
        monkeypatch.setattr(tensorfile, "safetensors_package", lambda: None)
    schedule = spec.schedule(256, "1:1")
    s = schedule.num_scales - 1
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, HEADS, schedule.tokens[s], HEAD_DIM, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(2, HEADS, schedule.kv_lens[s], HEAD_DIM, generator=gen).to(torch.bfloat16) for _ in "kv")
    w16 = CaptureWriter(tmp_path / "bf16", spec, resolution=256)
    path16 = w16.save(s, 0, q, k, v)
    w32 = CaptureWriter(tmp_path / "f32", spec, resolution=256, dtype="float32")
    path32 = w32.save(s, 0, q, k, v)
    elements = q.numel() + k.numel() + v.numel()
    header = int.from_bytes(path16.read_bytes()[:8], "little")
    assert path16.stat().st_size == 8 + header + 2 * elements  # 2 bytes per value
    assert path32.stat().st_size - 8 - int.from_bytes(path32.read_bytes()[:8], "little") == 4 * elements
    assert {h.dtype_name for h in read_tensor_headers(path16).values()} == {"BF16"}
    caps = CaptureSet.open(tmp_path / "bf16", spec)
    got = caps.qkv_torch(s, 0)
    assert all(g.dtype == torch.bfloat16 and torch.equal(g, t) for g, t in zip(got, (q, k, v)))
    assert all(torch.equal(g, t.float()) for g, t in zip(caps.qkv_torch(s, 0, torch.float32), (q, k, v)))
    assert all(np.array_equal(a, t.float().numpy()) for a, t in zip(caps.qkv(s, 0), (q, k, v)))
    # .npz cannot hold bf16: widened exactly to float32.
    wz = CaptureWriter(tmp_path / "npz", spec, resolution=256, suffix=".npz")
    wz.save(s, 0, q, k, v)
    assert all(np.array_equal(a, t.float().numpy())
               for a, t in zip(CaptureSet.open(tmp_path / "npz", spec).qkv(s, 0), (q, k, v)))


def _bad(schedule, s):
    t, kv = schedule.tokens[s], schedule.kv_lens[s]
    return [
        ((2, HEADS, t + 1, HEAD_DIM), (2, HEADS, kv, HEAD_DIM), f"q has {t + 1} queries; scale {s} \\(8x8\\)"),
        ((2, HEADS, t, HEAD_DIM), (2, HEADS, kv - 1, HEAD_DIM), f"k/v have {kv - 1} tokens; expected {t} .* or {kv}"),
        ((2, HEADS, t, 32), (2, HEADS, kv, 32), "head dim 32, but tiny-infinity-caps has head dim 64"),
        ((2, HEADS + 1, t, HEAD_DIM), (2, HEADS + 1, kv, HEAD_DIM), "5 heads; tiny-infinity-caps has 4"),
        ((2, HEADS, t, HEAD_DIM), (1, HEADS, kv, HEAD_DIM), "disagree in B, H or D"),
        ((HEADS, t, HEAD_DIM), (2, HEADS, kv, HEAD_DIM), r"q has shape \[4, 64, 64\]; expected \[B, H, N, D\]"),
    ]


def test_save_refuses_shapes_that_do_not_fit_the_model(spec, tmp_path):
    schedule = spec.schedule(256, "1:1")
    s = 4
    w = CaptureWriter(tmp_path / "c", spec, resolution=256, heads=[1, 3])
    for q_shape, k_shape, message in _bad(schedule, s):
        with pytest.raises(CaptureError, match=message):
            w.save(s, 0, torch.randn(q_shape), torch.randn(k_shape), torch.randn(k_shape))
    with pytest.raises(CaptureError, match=r"k \[2, 4, 121, 64\] and v \[2, 4, 120, 64\] differ"):
        w.save(s, 0, torch.randn(2, HEADS, 64, HEAD_DIM), torch.randn(2, HEADS, 121, HEAD_DIM),
               torch.randn(2, HEADS, 120, HEAD_DIM))
    nan = torch.randn(2, HEADS, 64, HEAD_DIM)
    nan[1, 2, 3, 4] = float("nan")
    with pytest.raises(CaptureError, match="q holds 1 NaN/inf values"):
        w.save(s, 0, nan, *(torch.randn(2, HEADS, 121, HEAD_DIM) for _ in "kv"))
    with pytest.raises(CaptureError, match="has dtype torch.int64; captures are floating point"):
        w.save(s, 0, torch.zeros(2, HEADS, 64, HEAD_DIM, dtype=torch.long), *(torch.randn(2, HEADS, 121, HEAD_DIM)
                                                                              for _ in "kv"))
    with pytest.raises(CaptureError, match="scale 7 is not in the schedule"):
        w.save(7, 0, *(torch.randn(1) for _ in "qkv"))
    assert not w.entries and not list((tmp_path / "c").glob("s*"))  # nothing was written
    # Consistency with earlier saves; the two heads selected already are accepted as such.
    w.save(s, 0, torch.randn(2, HEADS, 64, HEAD_DIM), *(torch.randn(2, HEADS, 121, HEAD_DIM) for _ in "kv"))
    w.save(s, 1, torch.randn(2, 2, 64, HEAD_DIM), *(torch.randn(2, 2, 64, HEAD_DIM) for _ in "kv"))
    with pytest.raises(CaptureError, match=r"B, H, D = \(1, 2, 64\) \(as stored\) differ from the earlier "
                                           r"captures' \(2, 2, 64\)"):
        w.save(s, 2, torch.randn(1, HEADS, 64, HEAD_DIM), *(torch.randn(1, HEADS, 121, HEAD_DIM) for _ in "kv"))
    with pytest.raises(CaptureError, match="head 4 is not in 0..3"):
        CaptureWriter(tmp_path / "d", spec, resolution=256, heads=[0, 4])
    caps = CaptureSet.open(tmp_path / "c", spec)
    assert caps.head_ids == (1, 3) and caps.heads_text() == "2 of 4: [1, 3]"


# ---------------------------------------------------------------------------------------------- softmax scale
def test_softmax_scale_defaults_to_the_family_and_is_required_without_one(spec, tmp_path, tmp_path_factory):
    var, custom = _spec(tmp_path_factory, "var"), _spec(tmp_path_factory, "custom")
    assert default_softmax_scale(spec) == 1.0 and default_softmax_scale(var) == 1 / math.sqrt(HEAD_DIM)
    assert default_softmax_scale(custom) is None
    assert CaptureWriter(tmp_path / "v", var, resolution=256).softmax_scale == 1 / math.sqrt(HEAD_DIM)
    qkv = [torch.randn(1, HEADS, 1, HEAD_DIM) for _ in "qkv"]
    w = CaptureWriter(tmp_path / "c", custom, resolution=256)
    with pytest.raises(CaptureError, match=r"tiny-custom-caps \(family custom\) has no default softmax scale: pass "
                                           r"CaptureWriter\(softmax_scale=...\)"):
        w.save(0, 0, *qkv)
    assert not w.entries
    CaptureWriter(tmp_path / "c", custom, resolution=256, softmax_scale=0.2).save(0, 0, *qkv)
    assert CaptureSet.open(tmp_path / "c", custom).softmax_scale == 0.2
    # An index without a scale (as older writers left it): the family's default, or refused without one.
    for model, d in ((spec, "i"), (custom, "c2")):
        CaptureWriter(tmp_path / d, model, resolution=256, softmax_scale=1.0).save(0, 0, *qkv)
        index = json.loads((tmp_path / d / "captures.json").read_text())
        for key in ("softmax_scale", "softmax_scale_source", "heads"):
            del index[key]
        (tmp_path / d / "captures.json").write_text(json.dumps(index))
    caps = CaptureSet.open(tmp_path / "i", spec)
    assert (caps.softmax_scale, caps.softmax_scale_source) == (1.0, "family default")
    assert caps.describe()["softmax_scale_source"] == "family default" and caps.heads_text() == "all 4"
    with pytest.raises(CaptureError, match=r"no softmax_scale, and tiny-custom-caps \(family custom\) has no default"):
        CaptureSet.open(tmp_path / "c2", custom)


def test_a_scale_that_disagrees_with_the_family_is_refused_unless_forced(spec, tmp_path):
    qkv = [torch.randn(1, HEADS, 1, HEAD_DIM) for _ in "qkv"]
    CaptureWriter(tmp_path / "c", spec, resolution=256, softmax_scale=0.125).save(0, 0, *qkv)
    with pytest.raises(CaptureError, match=r"softmax_scale 0.125 disagrees with the infinity family's default 1 "
                                           r"\(tiny-infinity-caps\).*force_scale=True"):
        CaptureSet.open(tmp_path / "c", spec)
    caps = CaptureSet.open(tmp_path / "c", spec, force_scale=True)
    assert (caps.softmax_scale, caps.softmax_scale_source, caps.softmax_scale_forced) == (0.125, "index", True)
    assert "disagrees with the infinity family's 1" in caps.describe()["softmax_scale_forced"]
    # capture_sdpa checks the scale the calls use against the writer's.
    w = CaptureWriter(tmp_path / "s", spec, resolution=256)
    with pytest.raises(CaptureError, match=r"calls attention with softmax scale 0.125, but the writer's is 1 "
                                           r"\(family default\)"):
        with capture_sdpa(w):
            torch.nn.functional.scaled_dot_product_attention(*qkv, scale=0.125)
    assert not w.entries


def test_a_missing_softmax_scale_cannot_change_the_figures(tmp_path, tmp_path_factory):
    """The same captures with the scale stored and with none: identical figures for Infinity (its family's
    default is its 1.0). Control: at 1/sqrt(D) (forced) the local heads' CSLA mass collapses, so the check can
    fail."""
    d = tmp_path_factory.mktemp("nine")
    (d / "m.yaml").write_text("name: tiny-inf9\nfamily: infinity\ndepth: 2\nwidth: 64\nheads: 2\nhead_dim: 32\n"
                              "schedules:\n  - {resolution: 512, scales: \"1,2,4,6,8,12,16,24,32\"}\n")
    model = get_model(str(d / "m.yaml"))
    write_synthetic_captures(SyntheticSource(model, "local", heads=2), tmp_path / "stored", suffix=".safetensors")
    for name, value in (("missing", None), ("sdpa", 1 / math.sqrt(32))):
        shutil.copytree(tmp_path / "stored", tmp_path / name)
        index = json.loads((tmp_path / name / "captures.json").read_text())
        index.pop("softmax_scale_source")
        if value is None:
            index.pop("softmax_scale")
        else:
            index["softmax_scale"] = value
        (tmp_path / name / "captures.json").write_text(json.dumps(index))
    plan = make_plan(model)
    options = EvalOptions(block=16, query_sample=24, modes=("csla_block", "cs4a_token", "sparvar"))

    def figures(name, **kw):
        caps = CaptureSet.open(tmp_path / name, model, **kw)
        return caps, [r.to_dict() for r in evaluate(caps, plan, options, progress=None).records]

    stored, with_scale = figures("stored")
    missing, without = figures("missing")
    assert (stored.softmax_scale_source, missing.softmax_scale_source) == ("index", "family default")
    assert stored.softmax_scale == missing.softmax_scale == 1.0
    assert with_scale and with_scale == without
    _, at_sdpa = figures("sdpa", force_scale=True)
    masses = [(a["mass"], b["mass"]) for a, b in zip(with_scale, at_sdpa) if a["mode"] == "csla_block"]
    assert np.mean([a for a, _ in masses]) > np.mean([b for _, b in masses]) + 0.1


def test_a_plan_of_another_schedule_is_refused(spec, tmp_path):
    CaptureWriter(tmp_path / "c", spec, resolution=256, aspect="4:3").save(
        0, 0, *(torch.randn(1, HEADS, 1, HEAD_DIM) for _ in "qkv"))
    caps = CaptureSet.open(tmp_path / "c", spec)
    caps.check_plan(make_plan(spec, 256, "4:3"))
    with pytest.raises(CaptureError, match=r"captures are of tiny-infinity-caps at 256 px 4:3, the plan is of "
                                           r"tiny-infinity-caps at 256 px 1:1: pass --resolution 256 --aspect 4:3"):
        caps.check_plan(make_plan(spec, 256, "1:1"))


def test_decision_band_is_refused_before_anything_is_compiled(tmp_path):
    """decision_band exists for the fidelity masks only: emitting or tuning it fails at once, naming the option."""
    import pytest
    from sparvar_compiler.emit.emitter import emit_module, plan_workloads
    from sparvar_compiler.errors import PlanConfigError
    from sparvar_compiler.planner import PlanConfig, get_gpu, make_plan

    plan = make_plan("var-d16", config=PlanConfig(decision_band=True))
    with pytest.raises(PlanConfigError, match="decision_band"):
        emit_module(plan, get_gpu("h100"), tmp_path / "m", progress=lambda s: None)
    assert not (tmp_path / "m").exists()
    with pytest.raises(PlanConfigError, match="decision_band"):
        list(plan_workloads(plan))
