"""The Infinity stand-in (tests/infinity_standin.py) on the CPU: finite, deterministic outputs; a KV cache that
grows by one scale per step to the cumulative token count; the dtypes Infinity hands to attention under bf16
autocast; the ``use_flex_attn`` / ``attn_fn`` hook the integration patches; and the real control flow around
``scale_ind`` in both branches of ``CrossAttnBlock.forward``."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import infinity_standin as inf  # noqa: E402

SQUARE = inf.schedule_of([1, 2, 4, 6, 8])
TALL = inf.schedule_of([1, 2, (4, 3), (8, 6)])  # the 1.333 (h:w) prefix of Infinity's 1M schedule
TEXT_LEN = 8


def model(**kw):
    return inf.Infinity(depth=4, embed_dim=128, num_heads=2, block_chunks=2, seed=0, **kw)


def generate(m, schedule, B, autocast=True, text_seed=1, cfg=3.0):
    text = inf.make_text(B, TEXT_LEN, m.Ct5, seed=text_seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return m.autoregressive_infer_cfg(vae=None, scale_schedule=schedule, label_B_or_BLT=text, B=B,
                                          cfg_list=[cfg] * len(schedule), tau_list=[1.0] * len(schedule),
                                          cfg_insertion_layer=[0], inference_mode=True)


class AttnRecorder:
    """Stands in for ``slow_attn``: records what every self-attention call receives, then runs SDPA."""

    def __init__(self):
        self.calls = []

    def __call__(self, query, key, value, scale=None, attn_mask=None, dropout_p=0.0):
        self.calls.append({"q": tuple(query.shape), "k": tuple(key.shape), "v": tuple(value.shape),
                           "dtypes": (query.dtype, key.dtype, value.dtype), "scale": scale, "mask": attn_mask,
                           "dropout_p": dropout_p})
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scale, attn_mask=attn_mask,
                                                                dropout_p=dropout_p)


def test_structure_mirrors_infinity_names():
    m = model()
    assert m.depth == 4 and m.num_block_chunks == 2 and len(m.block_chunks) == 2
    assert isinstance(m.unregistered_blocks, list) and len(m.unregistered_blocks) == 4
    chained = [blk for chunk in m.block_chunks for blk in chunk.module]
    assert all(a is b for a, b in zip(chained, m.unregistered_blocks))
    assert all(type(chunk).__name__ == "MultipleLayers" for chunk in m.block_chunks)
    for blk in m.unregistered_blocks:
        assert type(blk).__name__ == "CrossAttnBlock" and type(blk.sa).__name__ == "SelfAttention"
        sa = blk.sa
        assert (sa.num_heads, sa.head_dim, sa.cos_attn, sa.scale, sa.using_flash, sa.use_flex_attn) == \
               (2, 64, True, 1, False, False)
        assert sa.scale_mul_1H11.shape == (1, 2, 1, 1)
        assert torch.all(sa.scale_mul_1H11.clamp_max(sa.max_scale_mul).exp() <= 100)
        assert sa.zero_k_bias.abs().sum() == 0 and not sa.caching and sa.cached_k is None
        assert sa.mat_qkv.bias is None and sa.q_bias.shape == sa.v_bias.shape == (128,)


@pytest.mark.parametrize("schedule", [SQUARE, TALL], ids=["square", "4:3"])
@pytest.mark.parametrize("B", [1, 2])
def test_runs_finite_deterministic_and_grows_the_cache(monkeypatch, schedule, B):
    rec = AttnRecorder()
    monkeypatch.setattr(inf, "slow_attn", rec)
    m = model()
    ret, logits, summed = generate(m, schedule, B)
    tokens = [h * w for _, h, w in schedule]
    cumulative = [sum(tokens[:i + 1]) for i in range(len(tokens))]
    assert len(rec.calls) == len(schedule) * m.depth  # one self-attention call per (scale, block)
    for i, call in enumerate(rec.calls):
        si = i // m.depth
        assert call["q"] == (2 * B, 2, tokens[si], 64)  # CFG batch 2B, queries of this scale only
        assert call["k"] == call["v"] == (2 * B, 2, cumulative[si], 64)  # the whole cache so far
        assert call["dtypes"] == (torch.float32, torch.float32, torch.bfloat16)  # Infinity under bf16 autocast
        assert call["scale"] == 1 and call["mask"] is None and call["dropout_p"] == 0
    for (_, h, w), r, lg in zip(schedule, ret, logits):
        assert r.shape == (B, m.d_vae, h, w) and lg.shape == (B, h * w, 2 * m.d_vae)
        assert torch.isfinite(r).all() and torch.isfinite(lg).all()
    assert summed.shape == (B, m.d_vae, schedule[-1][1], schedule[-1][2]) and torch.isfinite(summed).all()
    assert all(not b.sa.caching and b.sa.cached_k is None and b.sa.cached_v is None for b in m.unregistered_blocks)
    # Deterministic: the same call again, and a fresh model of the same seed, give identical outputs.
    again = generate(m, schedule, B)[1]
    fresh = generate(model(), schedule, B)[1]
    for a, b, c in zip(logits, again, fresh):
        assert torch.equal(a, b) and torch.equal(a, c)
    # The weights depend on the seed.
    if B == 1:
        other = generate(inf.Infinity(depth=4, embed_dim=128, num_heads=2, block_chunks=2, seed=1), schedule, B)[1]
        assert not torch.equal(logits[-1], other[-1])


def test_float32_without_autocast(monkeypatch):
    rec = AttnRecorder()
    monkeypatch.setattr(inf, "slow_attn", rec)
    generate(model(), SQUARE[:3], 1, autocast=False)
    assert {c["dtypes"] for c in rec.calls} == {(torch.float32,) * 3}


def test_attn_fn_hook_replaces_slow_attn_exactly():
    """The hook the integration uses: with ``use_flex_attn`` on a block's ``sa`` and an ``attn_fn`` reaching it,
    the call goes to ``attn_fn(q, k, v, scale=...)``; an SDPA ``attn_fn`` reproduces the default bit for bit."""
    m = model()
    ref = generate(m, TALL, 2)[1]
    seen = []

    def attn_fn(q, k, v, scale=None):
        seen.append((q.shape[2], k.shape[2], scale))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

    m.use_flex_attn = True
    for si in range(len(TALL)):
        m.attn_fn_compile_dict[tuple(TALL[:si + 1])] = attn_fn
    for b in m.unregistered_blocks:
        b.sa.use_flex_attn = True
    hooked = generate(m, TALL, 2)[1]
    assert len(seen) == len(TALL) * m.depth and all(s == 1 for _, _, s in seen)
    assert all(torch.equal(a, b) for a, b in zip(ref, hooked))
    # And attention matters: a zero attention output changes every scale after the first.
    m.attn_fn_compile_dict = {k: (lambda q, k, v, scale=None: torch.zeros_like(q).to(v.dtype))
                              for k in m.attn_fn_compile_dict}
    zeroed = generate(m, TALL, 2)[1]
    assert not torch.equal(zeroed[-1], ref[-1])


@pytest.mark.parametrize("fused_norm", [True, False])
def test_scale_ind_reaches_self_attention_in_the_fused_branch_only(fused_norm):
    m = model(fused_norm=fused_norm)
    got = []
    for b in m.unregistered_blocks:
        orig = b.sa.forward

        def spy(*args, _orig=orig, **kw):
            got.append(kw.get("scale_ind", "absent"))
            return _orig(*args, **kw)

        b.sa.forward = spy
    generate(m, SQUARE[:3], 1)
    want = [si for si in range(3) for _ in range(m.depth)] if fused_norm else ["absent"] * (3 * m.depth)
    assert got == want


def test_self_attention_calls_sdpa_under_the_name_bound_at_import(monkeypatch):
    """Like Infinity's basic.py, the stand-in binds SDPA once at import as ``slow_attn``: replacing
    ``torch.nn.functional.scaled_dot_product_attention`` afterwards reaches only the cross-attention calls (which
    look it up at call time), never self-attention - why ``capture_sdpa`` records nothing on Infinity."""
    import torch.nn.functional as F

    original, seen = F.scaled_dot_product_attention, []

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[2], k.shape[2]))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    assert inf.slow_attn is original
    generate(model(), SQUARE[:3], 1)
    # Cross-attention only: every call's keys are the packed text of both CFG halves.
    assert len(seen) == 3 * 4 and all(kv_len == 2 * TEXT_LEN for _, kv_len in seen)
