"""Triton backend: kernels against an independent float64 reference, config checks, cubins for named GPUs.

Without a CUDA device the kernels run in Triton's interpreter on CPU tensors (fp32 and fp16; the interpreter's
bf16 dot is not trustworthy), which must be chosen before anything imports Triton: this module does it at
import. On a GPU host the same tests run the compiled kernels, in bf16 too.

The reference never uses the backend's own tables: it expands the layout to a dense boolean mask
(``BlockLayout.to_token_mask``), or for the gather kind takes the union of that exact mask over each query
block with numpy, and runs plain masked attention in float64 (golden) and in the test dtype (the error a
correct kernel may have).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from sparvar_compiler.codegen import triton_backend as tb
from sparvar_compiler.codegen.artifact import CompiledKernel
from sparvar_compiler.codegen.reference import check_close, reference_attention
from sparvar_compiler.codegen.render import TemplateError, render
from sparvar_compiler.codegen.spec import KernelConfig, KernelConfigError, KernelInputError, KernelSpec
from sparvar_compiler.errors import LayoutError
from sparvar_compiler.planner import csla_layout, get_gpu, make_plan
from sparvar_compiler.planner.gpus import GpuSpec
from sparvar_compiler.planner.layout import BlockLayout

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETER_READY = ON_GPU or tb.use_interpreter()
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LOW_PRECISION = ("fp16", "bf16") if ON_GPU else ("fp16",)


@pytest.fixture(autouse=True)
def _triton_mode():
    if not INTERPRETER_READY:
        pytest.fail("Triton was imported in compiled mode before this module could select the interpreter; "
                    "run this file on its own or call triton_backend.use_interpreter() earlier")


# ---------------------------------------------------------------------------------------------- helpers
def odd_q_len(bm: int) -> int:
    """Five query blocks, the last one 13 queries short of full (77 for 16-row blocks)."""
    return 4 * bm + 13


def random_layout(q_len: int, kv_len: int, bm: int, bn: int, seed: int) -> BlockLayout:
    """Random blocks (empty / partial with random bits / full) in every query block from 3 on (the short last
    one included); query block 0 is empty, block 1 fully dense, and block 2 holds a single partial block whose
    first half of queries keep nothing (a token-exact kernel must give them 0 and lse -inf)."""
    rng = np.random.default_rng(seed)
    qb, kb = -(-q_len // bm), -(-kv_len // bn)
    assert qb >= 4, "too few query blocks for the special rows plus a random one"
    kinds = rng.choice(3, size=(qb, kb), p=[0.5, 0.3, 0.2])
    kinds[0], kinds[1], kinds[2] = 0, 2, 0
    mask = np.repeat(np.repeat(kinds == 2, bm, axis=0), bn, axis=1)
    bits = rng.random(mask.shape) < 0.3
    mask |= np.repeat(np.repeat(kinds == 1, bm, axis=0), bn, axis=1) & bits
    col = int(rng.integers(kb))
    rows, cols = slice(2 * bm + bm // 2, 3 * bm), slice(col * bn, (col + 1) * bn)
    mask[rows, cols] = bits[rows, cols]
    return BlockLayout.from_token_mask(np.ascontiguousarray(mask[:q_len, :kv_len]), bm, bn, token_masks=True)


def expected_mask(kind: str, token_exact: bool, layout: BlockLayout) -> torch.Tensor:
    """What the kernel must attend to, built from the layout alone (not from the backend's tables)."""
    if kind == "block":
        return torch.from_numpy(layout.to_token_mask(exact=token_exact))
    exact = layout.to_token_mask(exact=True)
    qb, bm = layout.q_blocks, layout.block_m
    padded = np.zeros((qb * bm, layout.kv_len), dtype=bool)
    padded[: layout.q_len] = exact
    union = padded.reshape(qb, bm, -1).any(axis=1)
    return torch.from_numpy(np.repeat(union, bm, axis=0)[: layout.q_len])


def make_spec(layout: BlockLayout, kind: str = "block", token_exact: bool = False, B: int = 2, H: int = 3,
              D: int = 64, dtype: str = "fp32", return_lse: bool = True) -> KernelSpec:
    return KernelSpec("triton", kind, B, H, layout.q_len, layout.kv_len, D, dtype, layout.block_m, layout.block_n,
                      layout.content_hash(), token_exact, return_lse)


def config(warps: int = 4, stages: int = 2, **extra) -> KernelConfig:
    return KernelConfig(warps, stages, tuple(sorted(extra.items())))


def fresh_seed() -> int:
    """Inputs are new every run; failures print the seed to reproduce them."""
    return int.from_bytes(os.urandom(4), "little")


def inputs(spec: KernelSpec, seed: int, batch: int | None = None):
    g = torch.Generator().manual_seed(seed)
    shapes = ((spec.q_len,), (spec.kv_len,), (spec.kv_len,))
    b = spec.batch if batch is None else batch
    return tuple(torch.randn(b, spec.heads, n, spec.head_dim, generator=g).to(DTYPES[spec.dtype])
                 .to(DEVICE) for (n,) in shapes)


def check_kernel(spec: KernelSpec, cfg: KernelConfig, layout: BlockLayout, scale: float | None = None,
                 qkv=None, batch: int | None = None, kernel=None):
    """Run the kernel on fresh random inputs (or ``qkv``) with poisoned outputs and compare with the references;
    ``batch`` runs it at another batch than the spec's (a launch size)."""
    kernel = kernel or tb.build(spec, cfg, layout)
    seed = fresh_seed() if qkv is None else "of the caller's inputs"
    q, k, v = inputs(spec, seed, batch) if qkv is None else qkv
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=DEVICE) if spec.return_lse else None
    result = kernel(q, k, v, scale=scale, out=out, lse=lse)
    if spec.return_lse:
        assert result[0] is out and result[1] is lse
    else:
        assert result is out
    mask = expected_mask(spec.kind, spec.token_exact, layout).to(DEVICE)
    assert mask.any() and not mask.all(), "a trivial mask would not test the layout walk"
    gold, gold_lse = reference_attention(q.double(), k.double(), v.double(), mask, scale, return_lse=True)
    same = reference_attention(q, k, v, mask, scale)
    ok, err, ref = check_close(out, gold, same)
    assert ok, f"kernel error {err:.3g} vs same-dtype reference {ref:.3g} (input seed {seed})"
    empty = ~mask.any(dim=1)
    assert torch.all(out[:, :, empty] == 0), f"rows with nothing kept must be exactly 0 (input seed {seed})"
    if spec.return_lse:
        assert torch.equal(torch.isneginf(lse), torch.isneginf(gold_lse).expand_as(lse))
        assert torch.all(torch.isneginf(lse[:, :, empty]))
        finite = torch.isfinite(gold_lse)
        tol = 1e-4 if spec.dtype == "fp32" else 2e-3
        torch.testing.assert_close(lse[finite].double(), gold_lse[finite].double(), atol=tol, rtol=tol,
                                   msg=lambda m: f"{m} (input seed {seed})")
    return out, mask


# ---------------------------------------------------------------------------------------------- block kind
@pytest.mark.parametrize("token_exact", [False, True])
@pytest.mark.parametrize("bn", [16, 32, 64])
@pytest.mark.parametrize("bm", [16, 32, 64])
def test_block_kernel_odd_lengths(bm, bn, token_exact):
    layout = random_layout(odd_q_len(bm), 201, bm, bn, seed=bm * 7 + bn)
    spec = make_spec(layout, "block", token_exact, return_lse=(bm + bn) % 32 == 0)
    check_kernel(spec, config(block_m=bm, block_n=bn), layout)


@pytest.mark.parametrize("layout_blocks,tiles,order,token_exact,kv_len", [
    ((64, 64), (32, 16), "q_major", False, 201),   # short last block: one tile, masked
    ((64, 64), (16, 16), "head_major", True, 232),  # short last block: three tiles, the last masked
    ((32, 64), (32, 32), "head_major", False, 224),  # short last block of one whole tile: no mask at all
    ((64, 32), (32, 32), "q_major", True, 224),  # the last block is whole
])
def test_block_kernel_sub_tiles(layout_blocks, tiles, order, token_exact, kv_len):
    """Kernel tiles smaller than the layout's blocks walk each block in sub-tiles (and the short last block)."""
    layout = random_layout(odd_q_len(layout_blocks[0]), kv_len, *layout_blocks, seed=5)
    spec = make_spec(layout, "block", token_exact)
    check_kernel(spec, config(block_m=tiles[0], block_n=tiles[1], order=order), layout)


@pytest.mark.parametrize("token_exact", [False, True])
def test_block_kernel_tma(token_exact):
    """K/V through TMA descriptors: the short last block relies on the descriptor's zero fill."""
    layout = random_layout(odd_q_len(32), 201, 32, 64, seed=9)
    spec = make_spec(layout, "block", token_exact, dtype="fp32" if not ON_GPU else "bf16")
    check_kernel(spec, config(block_m=32, block_n=32, tma=True), layout)


@pytest.mark.parametrize("kind,layout_blocks,tiles,order,programs,kv_len,extra", [
    ("block", (64, 64), (32, 16), "q_major", 3, 201, {}),  # sub-tiles; the short last block: one masked tile
    ("block", (64, 64), (16, 16), "head_major", 7, 232, {}),  # its three tiles, the last masked
    ("block", (32, 64), (32, 32), "q_major", 1000, 224, {}),  # more programs than items: some do nothing
    ("block", (32, 64), (32, 32), "q_major", 5, 201, {"tma": True}),
    ("gather", (32, 32), (32, 16), "q_major", 4, 201, {}),
    ("gather", (64, 32), (64, 64), "head_major", 9, 232, {}),
])
def test_persistent_kernels(kind, layout_blocks, tiles, order, programs, kv_len, extra):
    """A persistent launch (``programs``): few programs stride over every (query tile, batch*head) item, empty
    rows and the short last block included, and give what one program per item gives."""
    layout = random_layout(odd_q_len(layout_blocks[0]), kv_len, *layout_blocks, seed=programs)
    dtype = "bf16" if ON_GPU and extra.get("tma") else "fp32"
    spec = make_spec(layout, kind, False, dtype=dtype, return_lse=programs % 2 == 1)
    cfg = config(block_m=tiles[0], block_n=tiles[1], order=order, programs=programs, **extra)
    assert tb.grid(spec, cfg) == (programs, 1, 1)
    assert f"persistent over {programs} programs" in tb.render_source(spec, cfg, layout)
    check_kernel(spec, cfg, layout)


@pytest.mark.parametrize("kind,token_exact,extra", [
    ("block", False, {"order": "q_major"}),
    ("block", True, {"order": "head_major"}),
    ("gather", False, {"order": "head_major"}),
    ("block", False, {"order": "head_major", "programs": 5}),  # persistent: `items` follows the batch
    ("gather", False, {"order": "q_major", "programs": 3}),
])
def test_any_batch_runs_one_kernel(kind, token_exact, extra):
    """The batch is a launch size: one kernel built (tuned) at batch 2 computes batches 1, 2 and 4 exactly."""
    layout = random_layout(odd_q_len(32), 201, 32, 32, seed=11)
    spec = make_spec(layout, kind, token_exact, B=2, H=2, return_lse=True)
    cfg = config(block_m=32, block_n=16 if kind == "gather" else 32, **extra)
    kernel = tb.build(spec, cfg, layout)
    for batch in (1, 2, 4):
        out, _ = check_kernel(spec, cfg, layout, batch=batch, kernel=kernel)
        assert out.shape[0] == batch
    if extra.get("programs"):
        assert tb.work_items(spec, cfg, 4) == 2 * tb.work_items(spec, cfg, 2)
        assert tb.batch_axis(spec, cfg) is None
    else:
        axis = tb.batch_axis(spec, cfg)
        assert tb.grid(spec, cfg, 4)[axis] == 2 * tb.grid(spec, cfg, 2)[axis] == 4 * spec.heads


def test_persistent_config_is_checked(small):
    """programs must be a non-negative int and applies to static, block-level or union kernels only."""
    layout, spec, _ = small
    for bad in (-1, 2.5, True, "132"):
        with pytest.raises(KernelConfigError, match="programs"):
            tb.validate_config(spec, config(programs=bad), check_resources=False)
    exact = dataclasses.replace(spec, token_exact=True)
    with pytest.raises(KernelConfigError, match="persistent"):
        tb.validate_config(exact, config(programs=132), check_resources=False)
    # The tuner's space leaves persistent launches out; the benchmark derives them from a config.
    h100 = get_gpu("h100")
    assert not any(c.get("programs", 0) for c in tb.search_space(spec, h100))
    variants = tb.persistent_variants(spec, config(stages=3, order="head_major"), h100)
    assert [c.get("programs") for c in variants] == [132, 264]
    assert all(c.get("order") == "head_major" and c.num_stages == 3 for c in variants)
    for c in variants:
        tb.validate_config(spec, c, h100)
    assert tb.persistent_variants(exact, config(), h100) == []


def test_token_exact_row_starting_on_a_masked_tile():
    """Queries whose first partial block keeps none of their keys, then scores far below zero: the running
    maximum must stay -inf across the masked tile (a stand-in 0 would flush every later exp2 to zero)."""
    bm = bn = 16
    mask = np.zeros((3 * bm + 5, 4 * bn + 3), dtype=bool)
    # Query block 0: kv block 0 is partial and keeps nothing for the first half of the queries...
    mask[bm // 2:bm, :bn] = np.eye(bm // 2, bn, dtype=bool)
    # ...and kv block 2 (also partial) keeps six keys for every query.
    mask[:bm, 2 * bn + 1:2 * bn + 7] = True
    mask[bm:2 * bm, :] = True
    mask[2 * bm:, 4 * bn:] = True  # the short last kv block only
    layout = BlockLayout.from_token_mask(mask, bm, bn, token_masks=True)
    assert layout.full_indices.size and layout.partial_indices.size
    spec = make_spec(layout, "block", True)
    g = torch.Generator().manual_seed(fresh_seed())
    u = torch.ones(spec.head_dim) / spec.head_dim ** 0.5
    q = -200.0 * u + 0.5 * torch.randn(2, 3, layout.q_len, spec.head_dim, generator=g)
    k = u + 0.05 * torch.randn(2, 3, layout.kv_len, spec.head_dim, generator=g)
    v = torch.randn(2, 3, layout.kv_len, spec.head_dim, generator=g)
    out, _ = check_kernel(spec, config(block_m=bm, block_n=bn), layout, scale=1.0,
                          qkv=tuple(t.contiguous().to(DEVICE) for t in (q, k, v)))
    assert out.abs().amax() > 0.1


def test_block_kernel_whole_blocks_differ_from_exact():
    """token_exact=False computes partial blocks whole: its output differs from the exact one (so the two
    tests above cannot pass with the same kernel)."""
    layout = random_layout(odd_q_len(32), 201, 32, 32, seed=11)
    qkv = inputs(make_spec(layout), fresh_seed())
    whole, _ = check_kernel(make_spec(layout, "block", False), config(), layout, qkv=qkv)
    exact, _ = check_kernel(make_spec(layout, "block", True), config(), layout, qkv=qkv)
    assert not torch.allclose(whole, exact)


# ---------------------------------------------------------------------------------------------- gather kind
@pytest.mark.parametrize("bm,bn,tile_n", [(16, 16, 32), (32, 64, 16), (64, 32, 64)])
def test_gather_kernel_block_union(bm, bn, tile_n):
    layout = random_layout(odd_q_len(bm), 201, bm, bn, seed=bm + 3 * bn)
    spec = make_spec(layout, "gather", return_lse=tile_n != 16)
    check_kernel(spec, config(block_m=bm, block_n=tile_n), layout)


def test_gather_table_is_the_union():
    layout = random_layout(odd_q_len(32), 201, 32, 16, seed=2)
    counts, key_idx = tb.gather_table(layout)
    union = expected_mask("gather", False, layout).numpy()[:: layout.block_m]
    assert counts.tolist() == union.sum(axis=1).tolist()
    assert key_idx.shape == (layout.q_blocks, tb.key_capacity(layout.kv_len, layout.block_n))
    assert key_idx.shape[1] % 128 == 0
    for i, n in enumerate(counts):
        assert key_idx[i, :n].tolist() == np.flatnonzero(union[i]).tolist()
        assert np.all(key_idx[i, n:] == (key_idx[i, n - 1] if n else 0))
    assert counts[0] == 0
    no_masks = BlockLayout.from_block_mask(np.eye(3, 4, dtype=bool), 77, 201, 32, 64)
    with pytest.raises(LayoutError, match="token masks"):
        tb.gather_table(no_masks)


# ---------------------------------------------------------------------------------------------- dtypes, scale
@pytest.mark.parametrize("kind,token_exact", [("block", True), ("gather", False)])
def test_head_dim_128(kind, token_exact):
    layout = random_layout(odd_q_len(32), 201, 32, 32, seed=21)
    spec = make_spec(layout, kind, token_exact, B=2, H=2, D=128)
    check_kernel(spec, config(block_m=32, block_n=32), layout)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("kind,token_exact", [("block", False), ("block", True), ("gather", False)])
def test_low_precision(dtype, kind, token_exact):
    layout = random_layout(odd_q_len(32), 201, 32, 32, seed=4)
    spec = make_spec(layout, kind, token_exact, dtype=dtype)
    check_kernel(spec, tb.default_config(spec), layout)


def test_explicit_scale_is_used():
    layout = random_layout(odd_q_len(32), 201, 32, 32, seed=8)
    spec = make_spec(layout, "block", False, return_lse=False)
    qkv = inputs(spec, fresh_seed())
    default, _ = check_kernel(spec, config(), layout, scale=None, qkv=qkv)
    explicit, _ = check_kernel(spec, config(), layout, scale=1.0, qkv=qkv)
    assert not torch.allclose(default, explicit)


# ---------------------------------------------------------------------------------------------- a real layout
@pytest.mark.parametrize("kind,token_exact", [("block", False), ("block", True), ("gather", False)])
def test_csla_layout_of_a_var_plan(kind, token_exact):
    """VAR-d16's last scale: 256 queries x 680 keys (680 is not a multiple of 64), head dim 64."""
    layout = csla_layout(make_plan("var-d16"), 9, 64, 64, token_masks=True)
    assert layout.q_len == 256 and layout.kv_len == 680 and layout.partial_indices.size > 0
    spec = make_spec(layout, kind, token_exact, B=2, H=2)
    check_kernel(spec, config(block_m=64, block_n=64), layout, scale=1.0)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small():
    layout = random_layout(odd_q_len(32), 201, 32, 32, seed=1)
    spec = make_spec(layout, "block", False, return_lse=False)
    return layout, spec, tb.build(spec, config(), layout)


def test_bad_inputs_raise_before_launch(small):
    layout, spec, kernel = small
    q, k, v = inputs(spec, fresh_seed())
    with pytest.raises(KernelInputError, match="rank 4"):
        kernel(q[0], k, v)
    with pytest.raises(KernelInputError, match="share a dtype"):
        kernel(q, k.half(), v)
    with pytest.raises(KernelInputError, match="contiguous"):
        kernel(q.transpose(2, 3).contiguous().transpose(2, 3), k, v)
    with pytest.raises(LayoutError, match="layout is"):
        kernel(q[:, :, :70].contiguous(), k, v)
    with pytest.raises(KernelInputError, match="fp32"):
        kernel(q.half(), k.half(), v.half())
    with pytest.raises(KernelInputError, match="shape"):  # heads are part of the kernel, the batch is not
        kernel(q[:, :1].contiguous(), k[:, :1].contiguous(), v[:, :1].contiguous())
    with pytest.raises(KernelInputError, match="return_lse"):
        kernel(q, k, v, lse=torch.empty(q.shape[:3], device=DEVICE))
    with pytest.raises(KernelInputError, match="scale"):
        kernel(q, k, v, scale=-1.0)
    with pytest.raises(KernelInputError, match="out"):
        kernel(q, k, v, out=torch.empty_like(q, dtype=torch.float16))


def test_build_rejects_layouts_that_do_not_match(small):
    layout, spec, _ = small
    other = random_layout(odd_q_len(32), 201, 32, 32, seed=2)
    with pytest.raises(LayoutError, match="hash"):
        tb.build(spec, config(), other)
    with pytest.raises(LayoutError, match="does not match"):
        tb.build(spec, config(), random_layout(odd_q_len(32) + 1, 201, 32, 32, seed=1))
    no_masks = BlockLayout(layout.q_len, 201, 32, 32, layout.full_offsets, layout.full_indices, layout.partial_offsets,
                           layout.partial_indices)
    exact = make_spec(no_masks, "block", True)
    with pytest.raises(LayoutError, match="token masks"):
        tb.build(exact, config(), no_masks)
    with pytest.raises(LayoutError, match="token masks"):
        tb.build(make_spec(no_masks, "gather"), config(), no_masks)


def test_config_validation(small):
    layout, spec, _ = small
    for bad, match in [(config(block_m=64), "block_m"), (config(block_n=48), "block_n"),
                       (config(warps=3), "num_warps"), (config(stages=0), "num_stages"),
                       (config(order="diagonal"), "order"), (config(blockm=32), "unknown")]:
        with pytest.raises(KernelConfigError, match=match):
            tb.validate_config(spec, bad)
    big = KernelSpec("triton", "block", 2, 28, 4096, 10521, 128, "bf16", 128, 128, "x")
    huge = config(8, 4, block_m=128, block_n=128)
    with pytest.raises(KernelConfigError, match="shared memory"):
        tb.validate_config(big, huge, get_gpu("l40s"))
    tb.validate_config(big, tb.default_config(big, get_gpu("l40s")), get_gpu("l40s"))
    for gpu in ("h100", "a100", "l40s"):
        space = tb.search_space(big, get_gpu(gpu))
        assert space and len(set(space)) == len(space)
        for cfg in space:
            tb.validate_config(big, cfg, get_gpu(gpu))
    assert len(tb.search_space(big, get_gpu("h100"))) > len(tb.search_space(big, get_gpu("l40s")))


def test_render_is_strict_and_specialised(small):
    layout, spec, _ = small
    params = tb.template_params(spec, config(), layout)
    source = render(tb.template_name(spec), **params)
    assert source == tb.render_source(spec, config(), layout)
    compile(source, "kernel.py", "exec")
    for name in ("block_m", "kv_len", "order"):
        partial = {k: v for k, v in params.items() if k != name}
        with pytest.raises(TemplateError, match=name):
            render(tb.template_name(spec), **partial)
    assert "lse" not in source.split("def sparvar_block_attention_d64(")[1].split(")")[0]
    assert "Q_LEN = tl.constexpr(141)" in source and "EVEN_M = tl.constexpr(False)" in source
    full_only = BlockLayout.from_block_mask(np.ones((5, 7), dtype=bool), layout.q_len, 201, 32, 32)
    exact = make_spec(full_only, "block", True)
    assert "HAS_PARTIAL_BLOCKS = tl.constexpr(False)" in tb.render_source(exact, config(), full_only)
    assert "HAS_PARTIAL_BLOCKS = tl.constexpr(True)" in tb.render_source(exact, config())


def test_launch_args_name_every_parameter(small):
    layout, spec, kernel = small
    q, k, v = inputs(spec, fresh_seed())
    out = torch.empty_like(q)
    args = tb.launch_args(layout, q, k, v, out, None, None, DEVICE, spec=spec)
    assert set(args) == set(tb.kernel_params(spec))
    assert args["scale"] == pytest.approx(1 / 8) and args["kv_idx"].dtype == torch.int32
    assert args["kv_idx"].shape == (layout.q_blocks, layout.kv_blocks)
    every = tb.launch_args(layout, q, k, v, out, None, 1.0, DEVICE)
    for s in (make_spec(layout, "block", True, return_lse=False), make_spec(layout, "gather", return_lse=False)):
        assert set(tb.kernel_params(s)) <= set(every)


# ---------------------------------------------------------------------------------------------- cubins
@pytest.fixture(scope="module")
def csla_spec():
    layout = csla_layout(make_plan("var-d16"), 9, 64, 64, token_masks=True)
    return layout, make_spec(layout, "block", False, B=2, H=16, dtype="bf16")


@pytest.fixture(scope="module")
def sm90_kernel(csla_spec):
    layout, spec = csla_spec
    return tb.compile_for_target(spec, tb.default_config(spec, get_gpu("h100")), layout, get_gpu("h100"))


def _check_cubin(ck, spec, arch: str, warps: int):
    assert ck.binary[:4] == b"\x7fELF" and ck.binary_format == "cubin" and ck.arch == arch
    assert ck.entry == tb.kernel_name(spec)
    n = len(tb.kernel_params(spec))
    assert [p.name for p in ck.params[:n]] == list(tb.kernel_params(spec))
    assert [p.kind for p in ck.params[:n]] == ["ptr"] * (n - 1) + ["f32"]
    assert len(ck.params) > n and all(p.kind == "scratch" for p in ck.params[n:])
    assert ck.grid == (4, spec.batch * spec.heads, 1) and ck.block == (warps * 32, 1, 1)
    assert 0 < ck.shared_bytes <= get_gpu("h100").smem_per_block
    assert 32 <= ck.resources["registers"] <= 255 and ck.resources["spill_bytes"] >= 0
    assert ck.spec == spec.to_dict()


def test_compile_for_sm90(sm90_kernel, csla_spec):
    _, spec = csla_spec
    _check_cubin(sm90_kernel, spec, "sm_90a", tb.default_config(spec, get_gpu("h100")).num_warps)


@pytest.mark.parametrize("gpu_name,arch", [("a100", "sm_80"), ("l40s", "sm_89"), ("b200", "sm_100a")])
def test_compile_for_other_archs(csla_spec, gpu_name, arch):
    """Cubins for every registered architecture, built here without any GPU."""
    layout, spec = csla_spec
    cfg = config(4, 2, block_m=64, block_n=32)
    ck = tb.compile_for_target(spec, cfg, layout, get_gpu(gpu_name))
    _check_cubin(ck, spec, arch, 4)
    assert ck.config == cfg.to_dict()


def test_cubins_scale_with_the_batch(sm90_kernel, csla_spec):
    """One cubin serves every batch: the grid's batch*heads axis (or a persistent kernel's ``items``) scales, and
    the record survives the manifest round trip."""
    layout, spec = csla_spec
    ck = sm90_kernel
    assert ck.batch == spec.batch == 2 and ck.batch_generic and ck.batch_grid == (1, spec.heads)
    assert ck.launch_grid(2) == ck.grid and ck.launch_grid(5) == (ck.grid[0], 5 * spec.heads, 1)
    again = CompiledKernel.from_meta(ck.meta(), ck.binary)
    assert again == ck and again.launch_grid(1) == (ck.grid[0], spec.heads, 1)
    cfg = config(4, 2, block_m=64, block_n=64, order="head_major", programs=132)
    persistent = tb.compile_for_target(spec, cfg, layout, get_gpu("h100"))
    assert persistent.grid == (132, 1, 1) and persistent.batch_grid is None
    names = [p.name for p in persistent.params]
    assert names[:len(tb.kernel_params(spec, cfg))] == list(tb.kernel_params(spec, cfg))
    assert dict((p.name, p.kind) for p in persistent.params)["items"] == "i32"
    assert persistent.launch_grid(7) == (132, 1, 1)
    assert persistent.batch_scalar_values(3) == {"items": tb.work_items(spec, cfg, 3)}
    old = {k: v for k, v in ck.meta().items() if k not in ("batch", "batch_grid", "batch_scalars")}
    fixed = CompiledKernel.from_meta(old, ck.binary)  # an artifact from before batch-generic kernels
    assert not fixed.batch_generic and fixed.launch_grid(2) == ck.grid
    with pytest.raises(ValueError, match="built for batch 2 only"):
        fixed.launch_grid(4)


def test_compile_tma_reports_its_scratch(csla_spec):
    """Device-side TMA descriptors live in Triton's global scratch: the cubin's scratch parameter says how
    much the launcher must allocate for the whole grid; the knob is refused where TMA does not exist."""
    layout, spec = csla_spec
    cfg = config(4, 2, block_m=64, block_n=64, tma=True)
    ck = tb.compile_for_target(spec, cfg, layout, get_gpu("h100"))
    _check_cubin(ck, spec, "sm_90a", 4)
    scratch = {p.name: p.nbytes for p in ck.params if p.kind == "scratch"}
    programs = ck.grid[0] * ck.grid[1] * ck.grid[2]
    assert scratch["global_scratch"] >= 128 * programs and scratch["global_scratch"] % programs == 0
    with pytest.raises(KernelConfigError, match="sm_90"):
        tb.compile_for_target(spec, cfg, layout, get_gpu("a100"))
    with pytest.raises(KernelConfigError, match="block kind"):
        tb.validate_config(make_spec(layout, "gather"), cfg)


def test_compiled_resources_checked_against_the_gpu(sm90_kernel):
    h100 = get_gpu("h100")
    tb.check_resources(sm90_kernel, h100)
    tiny_smem = GpuSpec("tiny", "sm_90", 1, sm90_kernel.shared_bytes - 1, 228 * 1024, 1, ())
    with pytest.raises(KernelConfigError, match="shared memory"):
        tb.check_resources(sm90_kernel, tiny_smem)
    few_regs = GpuSpec("few", "sm_90", 1, h100.smem_per_block, h100.smem_per_sm, 1, (), regs_per_sm=4096)
    with pytest.raises(KernelConfigError, match="registers"):
        tb.check_resources(sm90_kernel, few_regs)
