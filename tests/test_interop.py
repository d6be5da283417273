"""BlockLayout <-> FlexAttention BlockMask and plain BSR (FlashInfer's form).

Round trips must be exact (content hash), and FlexAttention run with a converted mask must compute what our
independent reference computes on the dense-expanded layout.
"""

import warnings

import numpy as np
import pytest
import torch
from torch.nn.attention import flex_attention as fa

from sparvar_compiler.codegen.interop import (BsrLayout, from_block_mask, from_bsr, layout_mask_mod,
                                              to_block_mask, to_bsr)
from sparvar_compiler.codegen.reference import check_close, reference_attention
from sparvar_compiler.errors import LayoutError
from sparvar_compiler.planner import csla_layout, make_plan
from sparvar_compiler.planner.layout import EMPTY, FULL, PARTIAL, BlockLayout


def mixed_layout(rng, q_len, kv_len, bm, bn):
    """A token-mask layout with every kind of block, one empty query block and one dense query block."""
    qb, kb = -(-q_len // bm), -(-kv_len // bn)
    kinds = rng.choice([EMPTY, PARTIAL, FULL], size=(qb, kb), p=[0.4, 0.35, 0.25])
    kinds[0] = EMPTY
    kinds[min(1, qb - 1)] = FULL
    mask = np.zeros((qb * bm, kb * bn), dtype=bool)
    for i in range(qb):
        for j in range(kb):
            block = mask[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            if kinds[i, j] == FULL:
                block[:] = True
            elif kinds[i, j] == PARTIAL:
                block[:] = rng.random(block.shape) < 0.3
                block[rng.integers(bm), rng.integers(bn)] = True
    layout = BlockLayout.from_token_mask(mask[:q_len, :kv_len].copy(), bm, bn)
    assert not layout.active()[0].any() and layout.active()[min(1, qb - 1)].all()
    return layout


def table_dense(num, idx, kv_blocks):
    """[q_blocks, kv_blocks] boolean of one BlockMask table (batch 0, head 0), read independently of interop."""
    out = np.zeros((num.shape[-1], kv_blocks), dtype=bool)
    for r, n in enumerate(num[0, 0].tolist()):
        out[r, idx[0, 0, r, :n].tolist()] = True
    return out


def flex(q, k, v, block_mask, scale=None):
    with warnings.catch_warnings():  # eager flex warns that it is unfused; that is what we test here
        warnings.simplefilter("ignore")
        return fa.flex_attention(q, k, v, block_mask=block_mask, scale=scale, return_aux=fa.AuxRequest(lse=True))


SHAPES = [(77, 201, 16, 32), (130, 95, 32, 16), (200, 333, 64, 64)]


@pytest.mark.parametrize("q_len,kv_len,bm,bn", SHAPES)
def test_block_mask_tables_and_token_exact_round_trip(rng, q_len, kv_len, bm, bn):
    layout = mixed_layout(rng, q_len, kv_len, bm, bn)
    mask = to_block_mask(layout, token_exact=True)
    assert mask.BLOCK_SIZE == (bm, bn) and tuple(mask.seq_lengths) == (q_len, kv_len)
    kinds = layout.kinds()
    assert np.array_equal(table_dense(mask.full_kv_num_blocks, mask.full_kv_indices, layout.kv_blocks),
                          kinds == FULL)
    assert np.array_equal(table_dense(mask.kv_num_blocks, mask.kv_indices, layout.kv_blocks), kinds == PARTIAL)
    assert np.array_equal(mask.to_dense()[0, 0].numpy().astype(bool), layout.active())  # flex's own reading
    back = from_block_mask(mask, token_masks=True)
    assert back.content_hash() == layout.content_hash()


@pytest.mark.parametrize("q_len,kv_len,bm,bn", SHAPES)
def test_block_level_block_mask_computes_every_active_block_whole(rng, q_len, kv_len, bm, bn):
    layout = mixed_layout(rng, q_len, kv_len, bm, bn)
    mask = to_block_mask(layout)
    assert int(mask.kv_num_blocks.sum()) == 0, "block level: no partial blocks, mask_mod off the hot path"
    assert np.array_equal(table_dense(mask.full_kv_num_blocks, mask.full_kv_indices, layout.kv_blocks),
                          layout.active())
    whole = BlockLayout.from_block_mask(layout.active(), q_len, kv_len, bm, bn)
    assert from_block_mask(mask).content_hash() == whole.content_hash()
    # A layout that is already all full survives the block-level trip exactly.
    assert from_block_mask(to_block_mask(whole)).content_hash() == whole.content_hash()


@pytest.mark.parametrize("token_exact", [False, True])
def test_mask_mod_keeps_exactly_the_layout(rng, token_exact):
    layout = mixed_layout(rng, 93, 150, 16, 32)
    dense = fa.create_mask(layout_mask_mod(layout, token_exact), 1, 1, 93, 150, device="cpu")[0, 0]
    assert np.array_equal(dense.numpy(), layout.to_token_mask(exact=token_exact))


@pytest.mark.parametrize("token_exact", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_flex_with_converted_mask_matches_reference(rng, token_exact, head_dim):
    q_len, kv_len, bm, bn = (77, 201, 16, 32) if head_dim == 64 else (70, 150, 32, 32)
    layout = mixed_layout(rng, q_len, kv_len, bm, bn)
    torch.manual_seed(int(rng.integers(2 ** 31)))
    B, H = 2, 3
    q, k, v = (torch.randn(B, H, n, head_dim) for n in (q_len, kv_len, kv_len))
    scale = 1.0 if token_exact else None  # Infinity's explicit scale, and the default 1/sqrt(d)
    out, aux = flex(q, k, v, to_block_mask(layout, token_exact), scale=scale)
    dense = torch.from_numpy(layout.to_token_mask(exact=token_exact))
    golden, golden_lse = reference_attention(q.double(), k.double(), v.double(), dense, scale=scale,
                                             return_lse=True)
    same_dtype = reference_attention(q, k, v, dense, scale=scale)
    ok, err, ref_err = check_close(out, golden, same_dtype)
    assert ok, f"flex error {err:.3e} vs fp32 reference {ref_err:.3e}"
    empty_rows = ~dense.any(dim=1)
    assert empty_rows[:bm].all(), "the first query block is empty by construction"
    assert torch.all(out[:, :, empty_rows] == 0)
    assert torch.all(torch.isneginf(aux.lse[:, :, empty_rows]))
    kept = ~empty_rows
    assert torch.allclose(aux.lse[:, :, kept].double(), golden_lse[:, :, kept].double(), atol=1e-4)


@pytest.mark.slow
def test_compiled_flex_on_cpu_follows_the_tables(rng):
    """Compiled flex skips blocks by the tables and masks only partial blocks: the path the GPU bench uses."""
    layout = mixed_layout(rng, 77, 201, 16, 32)
    B, H, D = 2, 3, 64
    q, k, v = (torch.randn(B, H, n, D) for n in (77, 201, 201))
    compiled = torch.compile(fa.flex_attention, dynamic=False)
    out = compiled(q, k, v, block_mask=to_block_mask(layout, token_exact=True))
    dense = torch.from_numpy(layout.to_token_mask(exact=True))
    golden = reference_attention(q.double(), k.double(), v.double(), dense)
    ok, err, ref_err = check_close(out, golden, reference_attention(q, k, v, dense))
    assert ok, f"compiled flex error {err:.3e} vs fp32 reference {ref_err:.3e}"


def test_real_csla_layout_round_trips():
    layout = csla_layout(make_plan("infinity-8b"), 10, 64, 64, token_masks=True)
    assert layout.q_len == 1600 and layout.kv_len == 4121
    assert from_block_mask(to_block_mask(layout, True), token_masks=True) == layout
    assert from_bsr(to_bsr(layout, with_mask=True)) == layout
    whole = BlockLayout.from_block_mask(layout.active(), 1600, 4121, 64, 64)
    assert from_bsr(to_bsr(layout)) == whole
    assert from_block_mask(to_block_mask(layout)) == whole


def test_from_block_mask_rejects_what_a_layout_cannot_hold(rng):
    layout = mixed_layout(rng, 77, 201, 16, 32)
    m = to_block_mask(layout, token_exact=True)
    kv_num = m.full_kv_num_blocks.repeat(1, 2, 1)  # two heads ...
    kv_idx = m.full_kv_indices.repeat(1, 2, 1, 1)
    kv_num[0, 1, 2] = 1 - min(int(kv_num[0, 0, 2]), 1)  # ... that disagree (0 <-> 1 full block)
    per_head = fa.BlockMask.from_kv_blocks(m.kv_num_blocks.repeat(1, 2, 1), m.kv_indices.repeat(1, 2, 1, 1),
                                           kv_num, kv_idx, BLOCK_SIZE=(16, 32), seq_lengths=(77, 201))
    with pytest.raises(LayoutError, match="differs between batch elements or heads"):
        from_block_mask(per_head)
    with pytest.raises(LayoutError, match="query blocks"):
        from_block_mask(m, q_len=200)
    with pytest.raises(LayoutError, match="outside"):
        from_block_mask(m, kv_len=33)
    small = fa.BlockMask.from_kv_blocks(m.kv_num_blocks, m.kv_indices, BLOCK_SIZE=8, seq_lengths=(40, 56))
    with pytest.raises(LayoutError, match="power of two"):
        from_block_mask(small)
    twice = fa.BlockMask.from_kv_blocks(m.full_kv_num_blocks, m.full_kv_indices, m.full_kv_num_blocks,
                                        m.full_kv_indices, BLOCK_SIZE=(16, 32), seq_lengths=(77, 201))
    with pytest.raises(LayoutError, match="twice"):
        from_block_mask(twice)


def test_token_exact_conversions_need_token_masks(rng):
    layout = BlockLayout.from_block_mask(rng.random((4, 5)) < 0.5, 64, 80, 16, 16)
    for call in (lambda: to_block_mask(layout, token_exact=True), lambda: to_bsr(layout, with_mask=True),
                 lambda: layout_mask_mod(layout, token_exact=True)):
        with pytest.raises(LayoutError, match="token masks"):
            call()


@pytest.mark.parametrize("q_len,kv_len,bm,bn", SHAPES)
def test_bsr_round_trips_and_matches_the_layout(rng, q_len, kv_len, bm, bn):
    layout = mixed_layout(rng, q_len, kv_len, bm, bn)
    bsr = to_bsr(layout, with_mask=True)
    assert (bsr.M, bsr.N, bsr.R, bsr.C) == (q_len, kv_len, bm, bn)
    assert bsr.indptr.dtype == np.int32 and bsr.indices.dtype == np.int32
    assert bsr.mask.shape == (bsr.indices.size, bm, bn)
    # Independent check of the structure: expand BSR + per-block masks by hand and compare token masks.
    dense = np.zeros((-(-q_len // bm) * bm, -(-kv_len // bn) * bn), dtype=bool)
    for r in range(bsr.indptr.size - 1):
        for p in range(bsr.indptr[r], bsr.indptr[r + 1]):
            c = bsr.indices[p]
            dense[r * bm:(r + 1) * bm, c * bn:(c + 1) * bn] = bsr.mask[p]
    assert np.array_equal(dense[:q_len, :kv_len], layout.to_token_mask(exact=True))
    assert not dense[q_len:].any() and not dense[:, kv_len:].any()
    assert from_bsr(bsr).content_hash() == layout.content_hash()
    plain = to_bsr(layout)
    assert plain.mask is None
    assert from_bsr(plain) == BlockLayout.from_block_mask(layout.active(), q_len, kv_len, bm, bn)
    kw = plain.plan_kwargs()
    assert set(kw) == {"indptr", "indices", "M", "N", "R", "C"} and kw["indptr"].dtype == torch.int32
    assert "mask" in bsr.plan_kwargs() and bsr.plan_kwargs()["mask"].dtype == torch.bool


def test_from_bsr_rejects_malformed_input():
    ok = dict(M=40, N=50, R=16, C=16)
    with pytest.raises(LayoutError, match="indptr"):
        from_bsr(BsrLayout(np.array([0, 1]), np.array([0]), **ok))
    with pytest.raises(LayoutError, match="indices"):
        from_bsr(BsrLayout(np.array([0, 1, 1, 1]), np.array([4]), **ok))
    with pytest.raises(LayoutError, match="twice"):
        from_bsr(BsrLayout(np.array([0, 2, 2, 2]), np.array([1, 1]), **ok))
    with pytest.raises(LayoutError, match="mask"):
        from_bsr(BsrLayout(np.array([0, 1, 1, 1]), np.array([1]), mask=np.ones((1, 16, 8), bool), **ok))
    with pytest.raises(LayoutError, match="power of two"):
        from_bsr(BsrLayout(np.array([0, 0]), np.array([], dtype=np.int32), M=8, N=8, R=8, C=8))
