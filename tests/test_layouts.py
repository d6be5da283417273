"""CSLA layouts against the published figures and an independent brute-force expansion."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brute_force import block_kinds, token_mask
from sparvar_compiler.errors import LayoutError
from sparvar_compiler.planner import BlockLayout, PlanConfig, csla_layout, csla_token_mask, make_plan
from sparvar_compiler.planner.csla import gather_density, plan_token_mask

BLOCKS = [(bm, bn) for bm in (32, 64, 128) for bn in (32, 64, 128)]


@pytest.mark.parametrize("block, expected", [(128, (79.0, 81.7, 83.6)), (64, (86.0, 87.0, 87.9))])
def test_published_block_sparsity_infinity_1024(block, expected):
    plan = make_plan("infinity-8b", 1024, "1:1")
    got = tuple(round(100 * csla_layout(plan, s, block, block).sparsity(), 1) for s in (10, 11, 12))
    assert got == expected


def test_key_gather_union_matches_issue_figures():
    mask = plan_token_mask(make_plan("infinity-8b"), 12)
    assert round(100 * gather_density(mask, 64), 1) == 9.2
    assert round(100 * gather_density(mask, 128), 1) == 10.5


@pytest.mark.parametrize("model, res, aspect, scale", [
    ("infinity-2b", 512, "1:1", 9),      # square 32x32 against 10 scales
    ("infinity-2b", 256, "3:1", 6),      # tall rectangular grids (each axis by its own ratio)
    ("infinity-2b", 256, "2:5", 6),      # wide
    ("var-d16", 256, "1:1", 9),
])
def test_token_mask_matches_brute_force(model, res, aspect, scale):
    plan = make_plan(model, res, aspect, PlanConfig(windows=None))
    cfg = plan.config
    fast = csla_token_mask(plan.grids, scale, cfg.windows, cfg.sink_scales)
    slow = token_mask(plan.grids, scale, cfg.windows, cfg.sink_scales)
    assert fast.shape == slow.shape and np.array_equal(fast, slow)


@pytest.mark.parametrize("bm, bn", BLOCKS)
def test_block_kinds_match_brute_force_every_block_size(bm, bn):
    # A rectangular schedule whose lengths are not multiples of any block: 21x28 queries, 1685 keys.
    plan = make_plan("infinity-2b", 1024, "3:4")
    mask = token_mask(plan.grids, 8, plan.config.windows, plan.config.sink_scales)
    layout = csla_layout(plan, 8, bm, bn, token_masks=True)
    assert np.array_equal(layout.kinds(), block_kinds(mask, bm, bn))
    assert np.array_equal(layout.to_token_mask(exact=True), mask)
    whole = layout.to_token_mask(exact=False)
    assert np.all(whole >= mask) and whole.sum() == layout.computed_pairs()


@st.composite
def schedules(draw):
    n = draw(st.integers(3, 7))
    h, w = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    grids = []
    for _ in range(n):
        grids.append((h, w))
        h += draw(st.integers(0, 3))
        w += draw(st.integers(0, 3))
    windows = [draw(st.sampled_from([-1, 1, 2, 3, 5])) for _ in range(n)]
    sinks = draw(st.integers(0, n - 1))
    q = draw(st.integers(0, n - 1))
    return grids, windows, sinks, q


@settings(max_examples=60, deadline=None)
@given(schedules(), st.sampled_from([16, 32]), st.sampled_from([16, 32]))
def test_random_schedules_match_brute_force(case, bm, bn):
    grids, windows, sinks, q = case
    mask = csla_token_mask(grids, q, windows, sinks)
    assert np.array_equal(mask, token_mask(grids, q, windows, sinks))
    layout = BlockLayout.from_token_mask(mask, bm, bn)
    assert np.array_equal(layout.kinds(), block_kinds(mask, bm, bn))
    assert np.array_equal(layout.to_token_mask(exact=True), mask)
    t = layout.transpose()
    assert np.array_equal(t.to_token_mask(exact=True), mask.T)
    assert t.transpose() == layout


def test_layout_bsr_tables_and_sparsity_agree(rng):
    active = rng.random((7, 11)) < 0.3
    active[2] = False          # an empty row
    active[5] = True           # a dense row
    layout = BlockLayout.from_block_mask(active, 7 * 32 - 5, 11 * 64 - 9, 32, 64)
    assert layout.sparsity() == pytest.approx(1 - active.mean())
    num, idx = layout.tables("active")
    for i in range(7):
        assert list(idx[i, :num[i]]) == list(np.nonzero(active[i])[0])
    offsets, cols = layout.bsr()
    assert offsets[-1] == active.sum() and list(cols[offsets[5]:offsets[6]]) == list(range(11))


def test_layout_npz_round_trip_and_hash(tmp_path, rng):
    mask = rng.random((100, 150)) < 0.05
    layout = BlockLayout.from_token_mask(mask, 32, 32)
    layout.to_npz(tmp_path / "l.npz")
    back = BlockLayout.from_npz(tmp_path / "l.npz")
    assert back == layout and back.content_hash() == layout.content_hash()
    assert np.array_equal(back.to_token_mask(exact=True), mask)
    flipped = mask.copy()
    flipped[0, 0] = not flipped[0, 0]
    assert BlockLayout.from_token_mask(flipped, 32, 32).content_hash() != layout.content_hash()
    assert BlockLayout.from_token_mask(mask, 32, 32, token_masks=False).content_hash() != layout.content_hash()
    assert BlockLayout.from_token_mask(mask, 32, 64).content_hash() != layout.content_hash()


def test_layout_arrays_are_read_only():
    layout = BlockLayout.dense(64, 64, 32, 32)
    with pytest.raises(ValueError):
        layout.full_indices[0] = 1


@pytest.mark.parametrize("bad", [
    dict(block_m=48), dict(block_n=100), dict(q_len=0),
])
def test_layout_rejects_bad_construction(bad):
    args = dict(q_len=64, kv_len=64, block_m=32, block_n=32)
    args.update(bad)
    with pytest.raises(LayoutError):
        BlockLayout.dense(**args) if "q_len" in bad else BlockLayout.from_block_mask(
            np.ones((2, 2), bool), 64, 64, args["block_m"], args["block_n"])


def test_layout_rejects_overlapping_full_and_partial():
    off = np.array([0, 1])
    with pytest.raises(LayoutError, match="both full and partial"):
        BlockLayout(32, 32, 32, 32, off, np.array([0]), off, np.array([0]))


def test_npz_refuses_non_layout_file(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.arange(3))
    with pytest.raises(LayoutError):
        BlockLayout.from_npz(tmp_path / "x.npz")


def test_text_and_png_views(tmp_path):
    layout = csla_layout(make_plan("var-d16"), 9, 32, 32)
    text = layout.to_text()
    rows = text.splitlines()[1:]
    assert len(rows) == layout.q_blocks and "#" in text and "." in text
    png = layout.plot(tmp_path / "l.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
