"""TVM backend: the llvm kernel against a float64 dense-mask reference, the CUDA kernel compiled to cubins without
a GPU, and the CUDA kernel's generated source *executed* on the CPU by a lane-level emulator.

The emulator (``_EMULATOR`` below, compiled with g++) runs TVM's generated CUDA C unchanged: one fiber per CUDA
thread, warp collectives (ldmatrix, mma.sync m16n8k16, shuffles) exchange operands between the 32 fibers of a
warp following the PTX ISA fragment layouts, wgmma between the 128 fibers of a warpgroup (shared-memory operands
decoded from their descriptors with the 128-byte swizzle, K-major and MN-major canonical layouts as CUTLASS
documents them), ``__syncthreads`` is a CTA barrier, shared memory is poisoned with NaN before every CTA, and
cp.async / wgmma results either land at issue ("eager") or only when their ``wait_group`` retires the group
("lazy", the latest the hardware may deliver them), so missing waits and barriers show up as NaN or wrong
values. Deleting any wait or barrier, swapping a descriptor's strides or a fragment's halves, or dropping
``ldmatrix.trans`` each fails these tests (checked by hand). It checks fragment layouts, swizzles, descriptors,
the pipeline and tail masking; it says nothing about speed, and the GPU run remains the final word.
"""

import ctypes
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sparvar_compiler.codegen import tvm_backend as tb
from sparvar_compiler.codegen.reference import check_close, layout_mask, reference_attention
from sparvar_compiler.codegen.render import TemplateError, render
from sparvar_compiler.codegen.spec import KernelConfig, KernelConfigError, KernelInputError, KernelSpec
from sparvar_compiler.errors import LayoutError
from sparvar_compiler.planner import csla_layout, make_plan
from sparvar_compiler.planner.gpus import get_gpu
from sparvar_compiler.planner.layout import BlockLayout

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH (runs the CUDA emulator)")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPARVAR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "sparvar-cache"))


def random_layout(rng, q_len, kv_len, bm, bn, density=0.35):
    """Random blocks with one empty and (when there are 3+ query blocks) one dense query block."""
    qb, kb = -(-q_len // bm), -(-kv_len // bn)
    active = rng.random((qb, kb)) < density
    empty = int(rng.integers(qb))
    active[empty] = False
    if qb >= 3:
        active[(empty + 1 + int(rng.integers(qb - 1))) % qb] = True
    return BlockLayout.from_block_mask(active, q_len, kv_len, bm, bn)


def make_spec(layout, dtype, batch, heads, head_dim, return_lse=True):
    return KernelSpec("tvm", "block", batch, heads, layout.q_len, layout.kv_len, head_dim, dtype, layout.block_m,
                      layout.block_n, layout.content_hash(), return_lse=return_lse, scale_kind="explicit")


def inputs(spec):
    dt = TORCH_DTYPES[spec.dtype]
    q = torch.randn(spec.batch, spec.heads, spec.q_len, spec.head_dim).to(dt)
    k = torch.randn(spec.batch, spec.heads, spec.kv_len, spec.head_dim).to(dt)
    v = torch.randn(spec.batch, spec.heads, spec.kv_len, spec.head_dim).to(dt)
    return q, k, v


def check_result(layout, q, k, v, scale, out, lse, factor=3.0):
    """Kernel vs float64 golden within ``factor`` x a same-dtype reference; lse, -inf and zero rows exactly placed.

    The tensor-core kernels multiply 16-bit inputs exactly and accumulate in fp32, so they must beat a bf16/fp16
    torch reference outright (``factor=1``): with 3x, a stale accumulator feeding one tile's scores still passes.
    """
    mask = layout_mask(layout, exact=False)
    golden, golden_lse = reference_attention(q, k, v, mask, scale, dtype=torch.float64, return_lse=True)
    same = reference_attention(q, k, v, mask, scale)
    ok, err, ref_err = check_close(out, golden, same, factor=factor)
    assert ok, f"relative error {err:.3g} vs same-dtype reference {ref_err:.3g}"
    empty = ~mask.any(dim=1)
    assert torch.all(out[:, :, empty] == 0)
    if lse is not None:
        assert torch.equal(torch.isinf(lse), torch.isinf(golden_lse).expand_as(lse))
        finite = torch.isfinite(golden_lse)
        assert torch.allclose(lse[finite].double(), golden_lse[finite].double(), atol=2e-4, rtol=2e-4)


# ---------------------------------------------------------------------------------------------- llvm kernel
LLVM_CASES = [
    # dtype, head_dim, block_m, block_n, q_len, kv_len, batch, heads
    ("fp32", 64, 32, 16, 77, 201, 2, 3),
    ("fp32", 128, 16, 32, 45, 99, 2, 2),
    ("fp32", 64, 64, 64, 128, 192, 1, 2),  # lengths that are multiples of the blocks
    ("bf16", 64, 16, 64, 50, 130, 2, 2),
    ("fp16", 128, 32, 32, 33, 70, 1, 3),
]


@pytest.mark.parametrize("dtype,head_dim,bm,bn,q_len,kv_len,batch,heads", LLVM_CASES)
def test_llvm_kernel_matches_reference(rng, dtype, head_dim, bm, bn, q_len, kv_len, batch, heads):
    layout = random_layout(rng, q_len, kv_len, bm, bn)
    spec = make_spec(layout, dtype, batch, heads, head_dim)
    kernel = tb.build(spec, tb.default_config(spec), layout)
    q, k, v = inputs(spec)
    scale = float(rng.uniform(0.05, 0.4))
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"))
    got, got_lse = kernel(q, k, v, scale=scale, out=out, lse=lse)
    assert got is out and got_lse is lse
    check_result(layout, q, k, v, scale, out, lse)


def test_llvm_kernel_default_scale_dense_and_empty_layouts(rng):
    for active in (np.ones((3, 4), bool), np.zeros((3, 4), bool)):
        layout = BlockLayout.from_block_mask(active, 40, 60, 16, 16)
        spec = make_spec(layout, "fp32", 1, 2, 64, return_lse=False)
        q, k, v = inputs(spec)
        out = tb.build(spec, tb.default_config(spec), layout)(q, k, v)
        assert isinstance(out, torch.Tensor)
        check_result(layout, q, k, v, 1 / 8, out, None)


def test_llvm_kernel_on_a_real_csla_layout(rng):
    plan = make_plan("var-d16")
    layout = csla_layout(plan, 9, 32, 32)
    assert 0.0 < layout.sparsity() < 1.0
    spec = make_spec(layout, "fp32", 1, 2, 64)
    q, k, v = inputs(spec)
    out, lse = tb.build(spec, tb.default_config(spec), layout)(q, k, v, scale=1.0)
    check_result(layout, q, k, v, 1.0, out, lse)


# ---------------------------------------------------------------------------------------------- rendering
def test_render_is_strict_and_specialised(rng):
    layout = random_layout(rng, 77, 201, 32, 32)
    spec = make_spec(layout, "bf16", 2, 2, 64)
    cfg = tb.default_config(spec)
    src = tb.render_source(spec, cfg, "cuda")
    assert "{{" not in src and "{%" not in src
    assert "T.ptx[MMA]" in src and "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in src
    assert "lse: T.Buffer" in src and "KV_LEN)" in src  # tail masking present for 201 keys
    even = make_spec(BlockLayout.dense(64, 128, 32, 32), "fp16", 1, 1, 64, return_lse=False)
    even_src = tb.render_source(even, tb.default_config(even), "cuda")
    assert "lse" not in even_src.split("def ")[1].split("):")[0]
    assert "KV_LEN - 1" not in even_src and ".f16.f16.f32" in even_src
    llvm = tb.render_source(spec, cfg, "llvm")
    assert "T.parallel" in llvm and "T.ptx" not in llvm
    params = dict(entry="x", spec_json="{}", batch=1, heads=1, q_len=1, kv_len=1, head_dim=64, block_m=16,
                  block_n=16, q_blocks=1, lut_width=1, tvm_dtype="float32", return_lse=False, even_n=True)
    with pytest.raises(TemplateError, match="even_m"):
        render("tvm/block_sparse_attention_llvm.py.jinja", **params)
    assert "def x(" in render("tvm/block_sparse_attention_llvm.py.jinja", **params, even_m=True)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small_kernel():
    layout = BlockLayout.from_block_mask(np.eye(3, 4, dtype=bool), 40, 60, 16, 16)
    spec = make_spec(layout, "fp32", 2, 2, 64)
    return layout, spec, tb.build(spec, tb.default_config(spec), layout)


def test_bad_inputs_raise_before_launch(small_kernel):
    layout, spec, kernel = small_kernel
    q, k, v = inputs(spec)
    bad = [
        ((q[0], k, v), {}, KernelInputError, "rank 4"),
        ((q.half(), k, v), {}, KernelInputError, "share a dtype"),
        ((q.half(), k.half(), v.half()), {}, KernelInputError, "takes fp32"),
        ((q.transpose(2, 3).contiguous().transpose(2, 3), k, v), {}, KernelInputError, "contiguous"),
        ((q[:, :, :39].contiguous(), k, v), {}, LayoutError, "layout is 40x60"),
        ((q, k[:, :1].contiguous(), v), {}, KernelInputError, "k and v must be"),
        ((q[:1].contiguous(), k[:1].contiguous(), v[:1].contiguous()), {}, KernelInputError, "shape"),
        ((q, k, v), {"scale": 0.0}, KernelInputError, "positive"),
        ((q, k, v), {"scale": float("nan")}, KernelInputError, "positive"),
        ((q, k, v), {"out": torch.empty(2, 2, 40, 32)}, KernelInputError, "out must be"),
        ((q, k, v), {"lse": torch.empty(2, 2, 40, dtype=torch.float64)}, KernelInputError, "lse must be"),
    ]
    for args, kwargs, err, match in bad:
        with pytest.raises(err, match=match):
            kernel(*args, **kwargs)
    no_lse = make_spec(layout, "fp32", 2, 2, 64, return_lse=False)
    with pytest.raises(KernelInputError, match="return_lse=False"):
        tb.build(no_lse, tb.default_config(no_lse), layout)(q, k, v, lse=torch.empty(2, 2, 40))


def test_bad_specs_and_layouts(small_kernel):
    layout, spec, _ = small_kernel
    cfg = tb.default_config(spec)
    other = BlockLayout.from_block_mask(np.ones((3, 4), bool), 40, 60, 16, 16)
    with pytest.raises(LayoutError, match="hash"):
        tb.build(spec, cfg, other)
    with pytest.raises(LayoutError, match="blocks"):
        tb.build(spec, cfg, BlockLayout.dense(40, 60, 32, 16))
    for change, match in ((dict(token_exact=True), "token_exact"), (dict(kind="gather"), "block kernels"),
                          (dict(backend="triton"), "backend"), (dict(head_dim=96), "head_dim")):
        bad = KernelSpec(**{**spec.to_dict(), **change})
        with pytest.raises(KernelConfigError, match=match):
            tb.build(bad, cfg, layout)
    with pytest.raises(KernelConfigError, match="not supported on cuda"):
        tb.render_source(spec, cfg, "cuda")  # fp32 has no tensor-core kernel
    with pytest.raises(KernelConfigError, match="llvm only"):
        tb.build(spec, cfg, layout, target="cuda")


# ---------------------------------------------------------------------------------------------- configs
def test_validate_config_and_search_space():
    spec = KernelSpec("tvm", "block", 2, 28, 4096, 10521, 128, "bf16", 64, 64, "", scale_kind="explicit")
    h100, a100 = get_gpu("h100"), get_gpu("a100")
    assert tb.default_config(spec) in tb.search_space(spec, h100)
    for cfg in tb.search_space(spec, h100):
        tb.validate_config(spec, cfg, h100)
    bad = [
        (KernelConfig(4, 2, (("block_m", 48),)), "block_m=48"),
        (KernelConfig(4, 2, (("block_m", 64), ("block_n", 128))), "divide"),
        (KernelConfig(3, 2), "num_warps"),
        (KernelConfig(4, 5), "num_stages"),
        (KernelConfig(1, 2, (("block_m", 64),)), "rows"),
        (KernelConfig(4, 2, (("swizzle", 1),)), "unknown"),
        (KernelConfig(4, 2, (("q_in_regs", "yes"),)), "bool"),
        (KernelConfig(4, 2, (("mma", "wmma"),)), "mma must be"),
        (KernelConfig(2, 2, (("block_m", 32), ("mma", "wgmma"))), "warpgroup"),
        (KernelConfig(4, 2, (("q_in_regs", False), ("mma", "wgmma"))), "mma_sync kernels only"),
        (KernelConfig(4, 3, (("overlap", True),)), "overlap applies"),
        (KernelConfig(4, 1, (("mma", "wgmma"), ("overlap", True))), "overlap applies"),
    ]
    for cfg, match in bad:
        with pytest.raises(KernelConfigError, match=match):
            tb.validate_config(spec, cfg)
    big = KernelSpec(**{**spec.to_dict(), "block_m": 128, "block_n": 128})
    greedy = KernelConfig(8, 4, (("block_m", 128), ("block_n", 128)))
    with pytest.raises(KernelConfigError, match="shared memory"):
        tb.validate_config(big, greedy, h100)
    fits_h100 = KernelConfig(8, 3, (("block_m", 128), ("block_n", 128)))  # 224 KB
    tb.validate_config(big, fits_h100, h100)
    with pytest.raises(KernelConfigError, match="shared memory"):
        tb.validate_config(big, fits_h100, a100)
    two_tiles = KernelConfig(2, 2, (("block_m", 64), ("block_n", 64)))
    with pytest.raises(KernelConfigError, match="registers"):
        tb.validate_config(spec, two_tiles, h100)  # 32 rows per warp at D=128 cannot also hold all of Q
    tb.validate_config(spec, KernelConfig(2, 2, (("block_m", 64), ("block_n", 32), ("q_in_regs", False))), h100)
    space = tb.search_space(spec, h100)
    assert any(not tb.q_in_regs(c) for c in space) and len(space) == len(set(space))
    assert set(tb.shortlist(spec, h100)) <= set(space)
    assert any(tb.mma_kind(c) == "wgmma" for c in tb.shortlist(spec, h100))
    assert not any(tb.mma_kind(c) == "wgmma" for c in tb.search_space(spec, a100))
    with pytest.raises(KernelConfigError, match="sm_90"):
        tb.validate_config(spec, KernelConfig(4, 2, (("mma", "wgmma"),)), a100)


def test_compiled_report_checks():
    h100 = get_gpu("h100")
    ok = {"registers": 168, "spill_bytes": 0, "spill_load_bytes": 0, "local_bytes": 0, "static_shared_bytes": 0}
    tb.check_resources(ok, 81920, 128, h100)
    with pytest.raises(KernelConfigError, match="registers"):
        tb.check_resources({**ok, "registers": 255, "spill_bytes": 64}, 81920, 128, h100)
    with pytest.raises(KernelConfigError, match="registers"):
        tb.check_resources({**ok, "registers": 255}, 81920, 512, h100)
    with pytest.raises(KernelConfigError, match="shared memory"):
        tb.check_resources({**ok, "static_shared_bytes": 4096}, h100.smem_per_block, 128, h100)
    report = ("ptxas info    : Compiling entry function 'k_kernel' for 'sm_90'\nptxas info    : Function properties "
              "for k_kernel\n    8 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads\n"
              "ptxas info    : Used 255 registers, used 1 barriers, 16 bytes smem\n")
    assert tb.parse_ptxas_report(report, "k_kernel") == {
        "registers": 255, "spill_bytes": 12, "spill_load_bytes": 12, "local_bytes": 8, "static_shared_bytes": 16}


# ---------------------------------------------------------------------------------------------- cubins
@needs_nvcc
@pytest.mark.parametrize("gpu_name,mma", [("h100", "mma_sync"), ("a100", "mma_sync"), ("l40s", "mma_sync"),
                                          ("b200", "mma_sync"), ("h100", "wgmma")])
def test_compile_for_target_makes_a_cubin(gpu_name, mma):
    plan = make_plan("var-d16")
    layout = csla_layout(plan, 9, 64, 64)
    spec = KernelSpec("tvm", "block", 2, 16, layout.q_len, layout.kv_len, 128, "bf16", 64, 64,
                      layout.content_hash(), return_lse=True, scale_kind="explicit")
    gpu = get_gpu(gpu_name)
    cfg = KernelConfig.from_dict({**tb.default_config(spec).to_dict(), "mma": mma})
    ck = tb.compile_for_target(spec, cfg, layout, gpu)
    arch = "sm_90a" if mma == "wgmma" else gpu.arch
    assert ck.binary[:4] == b"\x7fELF" and ck.binary_format == "cubin" and ck.arch == arch
    names = [p.name for p in ck.params]
    assert names == sorted(names[:-1]) + ["scale"]  # TVM's order: buffers alphabetically, then the scalar
    assert {p.kind for p in ck.params[:-1]} == {"ptr"} and ck.params[-1].kind == "f32"
    assert ck.entry.endswith("_kernel") and ck.block == (128, 1, 1) and ck.grid == (4, 32, 1)
    assert ck.shared_bytes == (64 + 2 * 2 * 64) * 128 * 2
    assert 96 <= ck.resources["registers"] <= 255 and ck.resources["spill_bytes"] == 0
    assert ck.meta()["spec"] == spec.to_dict()
    q = torch.zeros(2, 16, layout.q_len, 128, dtype=torch.bfloat16)
    k = torch.zeros(2, 16, layout.kv_len, 128, dtype=torch.bfloat16)
    args = tb.launch_args(layout, q, k, k, torch.empty_like(q), torch.empty(q.shape[:3]), 1.0)
    assert set(args) == set(names)
    assert args["kv_idx"].shape == (layout.q_blocks, layout.kv_blocks) and args["kv_idx"].dtype == torch.int32
    num, idx = layout.tables("active")
    assert torch.equal(args["kv_num"], torch.from_numpy(num))
    assert all(torch.equal(args["kv_idx"][i, :n], torch.from_numpy(idx[i, :n])) for i, n in enumerate(num))


@needs_nvcc
def test_compile_for_target_rejects_what_the_gpu_cannot_run():
    spec = KernelSpec("tvm", "block", 1, 1, 512, 512, 128, "fp16", 128, 128, "")
    with pytest.raises(KernelConfigError, match="shared memory"):
        tb.compile_for_target(spec, KernelConfig(8, 3, (("block_m", 128), ("block_n", 128))), None,
                              get_gpu("l40s"))


@needs_nvcc
def test_write_bundle(tmp_path):
    import json

    spec = KernelSpec("tvm", "block", 1, 2, 100, 130, 64, "bf16", 32, 32, "")
    out = tb.write_bundle(tmp_path, [spec], get_gpu("h100"), "default", log=lambda *_: None,
                          cases=[{"model": "test", "query_scale": 0}])
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["kernels"]
    assert entry["case"] == {"model": "test", "query_scale": 0} and not manifest["rejected"]
    from sparvar_compiler.codegen.artifact import CompiledKernel

    ck = CompiledKernel.from_json_dict(json.loads((out / entry["file"]).read_text()))
    assert ck.spec == spec.to_dict() and ck.config == tb.default_config(spec).to_dict()
    assert entry["resources"] == ck.resources


# ---------------------------------------------------------------------------------------------- CUDA, emulated
_EMULATOR = r"""
// CPU emulation of the CUDA subset TVM's TIRx emits for our kernels: one OS thread per CTA, one ucontext fiber
// per CUDA thread, warp collectives (ldmatrix, mma, shfl) exchange lanes through per-warp mailboxes.
#include <ucontext.h>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(x)
#define __align__(x) alignas(x)
#define CUDART_INF_F INFINITY
typedef unsigned int uint;

struct nv_bfloat16 {
  uint16_t bits;
  nv_bfloat16() = default;
  nv_bfloat16(float f) {
    uint32_t u; std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { bits = 0x7fc0; return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    bits = (uint16_t)(u >> 16);
  }
  operator float() const { uint32_t u = (uint32_t)bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
struct half {
  _Float16 v;
  half() = default;
  half(float f) : v((_Float16)f) {}
  operator float() const { return (float)v; }
};

struct dim3e { int x, y, z; };
struct Fiber { ucontext_t ctx; dim3e tid; int state; int done; std::vector<char> stack;
               std::vector<std::pair<int, std::vector<std::pair<uint32_t, const void*>>>> groups;
               std::vector<std::pair<int, std::vector<std::pair<float*, float>>>> wg_groups; };

static thread_local Fiber* g_cur = nullptr;
static thread_local std::vector<Fiber>* g_fibers = nullptr;
static thread_local ucontext_t g_sched;
static thread_local dim3e g_block;
static thread_local char* g_smem = nullptr;
static thread_local int g_lazy = 0;
static thread_local long g_smem_bytes = 0;
static thread_local const char* g_error = nullptr;

#define threadIdx (g_cur->tid)
#define blockIdx (g_block)

enum { RUN = 0, WAIT_WARP = 1, WAIT_CTA = 2, WAIT_WG = 3 };

static inline void fail(const char* msg) { if (!g_error) g_error = msg; }

static inline void yield_() { swapcontext(&g_cur->ctx, &g_sched); }

// Barrier over lanes [lo, hi): every fiber in range must arrive with the same kind.
static void barrier(int kind) {
  int lo, hi;
  if (kind == WAIT_WARP) { lo = g_cur->tid.x & ~31; hi = lo + 32; }
  else if (kind == WAIT_WG) { lo = g_cur->tid.x & ~127; hi = lo + 128; }
  else { lo = 0; hi = (int)g_fibers->size(); }
  if (hi > (int)g_fibers->size()) hi = (int)g_fibers->size();
  g_cur->state = kind;
  bool all = true;
  for (int i = lo; i < hi; ++i) if ((*g_fibers)[i].state != kind) { all = false; break; }
  if (all) { for (int i = lo; i < hi; ++i) (*g_fibers)[i].state = RUN; return; }
  while (g_cur->state == kind) { yield_(); if (g_error) { g_cur->state = RUN; return; } }
}

// Per-warp mailboxes, double-buffered by collective parity so one barrier per collective suffices.
struct Mail { uint32_t u[32][10]; float f[32][4]; };
static thread_local std::vector<Mail> g_mail;  // [warps * 2]
static thread_local std::vector<int> g_phase;  // per fiber
static inline Mail& mail() { int w = g_cur->tid.x >> 5; return g_mail[w * 2 + (g_phase[g_cur->tid.x]++ & 1)]; }
static inline int lane() { return g_cur->tid.x & 31; }

static inline uint32_t tvm_builtin_cuda_cvta_generic_to_shared(const void* p) {
  long off = (const char*)p - g_smem;
  if (off < 0 || off >= g_smem_bytes) { fail("shared address out of range"); return 0; }
  return (uint32_t)off;
}
static inline void check_smem(uint32_t off, int n) { if ((long)off + n > g_smem_bytes) fail("shared access out of range"); }
static inline uint16_t smem16(uint32_t off) { check_smem(off, 2); uint16_t x; std::memcpy(&x, g_smem + off, 2); return x; }
static inline uint32_t smem32(uint32_t off) { check_smem(off, 4); uint32_t x; std::memcpy(&x, g_smem + off, 4); return x; }

static void ldmatrix(uint32_t* r, int num, bool trans, uint32_t addr) {
  Mail& m = mail(); int l = lane();
  m.u[l][0] = addr;
  barrier(WAIT_WARP);
  int g = l >> 2, t = l & 3;
  for (int i = 0; i < num; ++i) {
    if (addr % 16 && l < 8 * num) fail("ldmatrix row address not 16-byte aligned");
    if (!trans) {
      r[i] = smem32(m.u[i * 8 + g][0] + 4 * t);
    } else {
      uint32_t lo = smem16(m.u[i * 8 + 2 * t][0] + 2 * g), hi = smem16(m.u[i * 8 + 2 * t + 1][0] + 2 * g);
      r[i] = lo | (hi << 16);
    }
  }
}
#define LDM(NAME, NUM, TRANS) \
  static inline void NAME(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t p) { \
    uint32_t r[4]; ldmatrix(r, NUM, TRANS, p); r0 = r[0]; r1 = r[1]; r2 = r[2]; r3 = r[3]; }
LDM(tvm_builtin_ptx_ldmatrix_sync_aligned_m8n8_x4_shared_b16, 4, false)
LDM(tvm_builtin_ptx_ldmatrix_sync_aligned_m8n8_x4_trans_shared_b16, 4, true)
static inline void tvm_builtin_ptx_ldmatrix_sync_aligned_m8n8_x2_shared_b16(uint32_t& r0, uint32_t& r1, uint32_t p) {
  uint32_t r[4]; ldmatrix(r, 2, false, p); r0 = r[0]; r1 = r[1]; }
static inline void tvm_builtin_ptx_ldmatrix_sync_aligned_m8n8_x2_trans_shared_b16(uint32_t& r0, uint32_t& r1, uint32_t p) {
  uint32_t r[4]; ldmatrix(r, 2, true, p); r0 = r[0]; r1 = r[1]; }

template <typename E> static inline float elem(uint32_t packed, int hi) {
  E e; uint16_t b = hi ? (uint16_t)(packed >> 16) : (uint16_t)(packed & 0xffff); std::memcpy(&e, &b, 2); return (float)e; }

template <typename E>
static void mma16816(float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                     uint32_t b0, uint32_t b1, float c0, float c1, float c2, float c3) {
  Mail& m = mail(); int l = lane();
  uint32_t* u = m.u[l]; u[0] = a0; u[1] = a1; u[2] = a2; u[3] = a3; u[4] = b0; u[5] = b1;
  barrier(WAIT_WARP);
  float A[16][16], B[16][8];
  for (int ln = 0; ln < 32; ++ln) {
    int g = ln >> 2, t = ln & 3; uint32_t* v = m.u[ln];
    for (int e = 0; e < 2; ++e) {
      A[g][2 * t + e] = elem<E>(v[0], e); A[g + 8][2 * t + e] = elem<E>(v[1], e);
      A[g][2 * t + 8 + e] = elem<E>(v[2], e); A[g + 8][2 * t + 8 + e] = elem<E>(v[3], e);
      B[2 * t + e][g] = elem<E>(v[4], e); B[2 * t + 8 + e][g] = elem<E>(v[5], e);
    }
  }
  int g = l >> 2, t = l & 3;
  float c[4] = {c0, c1, c2, c3}, d[4];
  for (int e = 0; e < 4; ++e) {
    int row = g + (e >> 1) * 8, col = 2 * t + (e & 1);
    float s = 0.f;
    for (int kk = 0; kk < 16; ++kk) s += A[row][kk] * B[kk][col];
    d[e] = c[e] + s;
  }
  d0 = d[0]; d1 = d[1]; d2 = d[2]; d3 = d[3];
}
static inline void tvm_builtin_ptx_mma_sync_aligned_m16n8k16_row_col_f32_bf16_bf16_f32(
    float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
    uint32_t b1, float c0, float c1, float c2, float c3) {
  mma16816<nv_bfloat16>(d0, d1, d2, d3, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3); }
static inline void tvm_builtin_ptx_mma_sync_aligned_m16n8k16_row_col_f32_f16_f16_f32(
    float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
    uint32_t b1, float c0, float c1, float c2, float c3) {
  mma16816<half>(d0, d1, d2, d3, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3); }

static inline void tvm_builtin_ptx_cvt_bf16x2_f32_rn_bf16x2_f32(uint32_t& d, float a, float b) {
  nv_bfloat16 hi(a), lo(b); d = (uint32_t)lo.bits | ((uint32_t)hi.bits << 16); }
static inline void tvm_builtin_ptx_cvt_f16x2_f32_rn_f16x2_f32(uint32_t& d, float a, float b) {
  half hi(a), lo(b); uint16_t h, l; std::memcpy(&h, &hi, 2); std::memcpy(&l, &lo, 2); d = (uint32_t)l | ((uint32_t)h << 16); }

template <typename V> static inline V shfl_(V var, int src_of_lane_xor, bool is_xor) {
  Mail& m = mail(); int l = lane();
  std::memcpy(&m.u[l][0], &var, sizeof(V));
  barrier(WAIT_WARP);
  int src = is_xor ? (l ^ src_of_lane_xor) : src_of_lane_xor;
  V out; std::memcpy(&out, &m.u[src & 31][0], sizeof(V)); return out;
}
template <typename V> static inline V __shfl_xor_sync(unsigned mask, V var, int lm, int w) { return shfl_(var, lm, true); }
template <typename V> static inline V __shfl_sync(unsigned mask, V var, int src, int w) { return shfl_(var, src, false); }

static inline void tvm_builtin_cuda_cta_sync() { barrier(WAIT_CTA); }

// cp.async: eager mode copies at issue; lazy mode at the wait that retires the group (the latest legal moment).
static inline void cp_async_(uint32_t dst, const void* src, bool zero) {
  check_smem(dst, 16);
  if (dst % 16) fail("cp.async destination not 16-byte aligned");
  if (((uintptr_t)src) % 16) fail("cp.async source not 16-byte aligned");
  if (!g_lazy) { if (zero) std::memset(g_smem + dst, 0, 16); else std::memcpy(g_smem + dst, src, 16); return; }
  if (g_cur->groups.empty() || g_cur->groups.back().first) g_cur->groups.push_back({0, {}});
  g_cur->groups.back().second.push_back({dst, zero ? nullptr : src});
}
static inline void tvm_builtin_ptx_cp_async_cg_ignore_src_async_cg_shared_global_16(uint32_t dst, const void* src, uint32_t ignore) {
  cp_async_(dst, src, ignore != 0); }
static inline void tvm_builtin_ptx_cp_async_cg_async_cg_shared_global_16(uint32_t dst, const void* src) {
  cp_async_(dst, src, false); }
static inline void tvm_builtin_ptx_cp_async_commit_group_async_commit_group() {
  if (!g_lazy) return;
  if (g_cur->groups.empty() || g_cur->groups.back().first) g_cur->groups.push_back({0, {}});
  g_cur->groups.back().first = 1;  // closed
}
static inline void cp_async_wait_(int n) {
  if (!g_lazy) return;
  auto& gs = g_cur->groups;
  int closed = 0; for (auto& g : gs) closed += g.first;
  int retire = std::max(0, closed - n);
  int i = 0;
  while (retire > 0 && i < (int)gs.size()) {
    if (gs[i].first) {
      for (auto& c : gs[i].second) { if (c.second) std::memcpy(g_smem + c.first, c.second, 16); else std::memset(g_smem + c.first, 0, 16); }
      gs.erase(gs.begin() + i); --retire;
    } else ++i;
  }
}
#define WAITG(N) static inline void tvm_builtin_ptx_cp_async_wait_group_async_wait_group_##N() { cp_async_wait_(N); }
WAITG(0) WAITG(1) WAITG(2) WAITG(3) WAITG(4) WAITG(5) WAITG(6) WAITG(7)

// ---- wgmma (sm_90a): descriptors as CUTLASS's GmmaDescriptor; 128-byte swizzle = address bits [4,7) ^= [7,10)
static inline void ptx_wgmma_encode_matrix_descriptor(uint64_t* desc, void* addr, int ldo, int sdo, int swizzle) {
  static const uint64_t layout[4] = {0, 3, 2, 1};
  uint64_t start = tvm_builtin_cuda_cvta_generic_to_shared(addr);
  *desc = ((start >> 4) & 0x3FFF) | ((uint64_t)(ldo & 0x3FFF) << 16) | ((uint64_t)(sdo & 0x3FFF) << 32) |
          (layout[swizzle & 3] << 62);
}
struct WgMail { uint32_t a[128][4]; uint64_t da[128], db[128]; uint32_t sd[128]; };
static thread_local std::vector<WgMail> g_wgmail;  // [warpgroups * 2]
static thread_local std::vector<int> g_wgphase;
static inline uint32_t swz128(uint32_t addr) { return addr ^ (((addr >> 7) & 7) << 4); }
template <typename E> static inline float smem_elem(uint32_t addr) {
  uint16_t b = smem16(swz128(addr)); E e; std::memcpy(&e, &b, 2); return (float)e; }
static bool check_desc(uint64_t d) {
  if ((d >> 62) != 1) { fail("wgmma descriptor: only the 128-byte swizzle is emulated"); return false; }
  if (((d >> 49) & 7) != 0) { fail("wgmma descriptor: base offset must be 0"); return false; }
  uint32_t start = (uint32_t)(d & 0x3FFF) << 4;
  if (start % 1024 >= 128) { fail("wgmma descriptor: start is not in the first row of a 1024-byte swizzle atom"); return false; }
  return true;
}
template <typename E>
static void wgmma_emu(int N, bool rs, bool trans_b, float** d, const uint32_t* a, uint64_t da, uint64_t db, uint32_t sd) {
  int t = g_cur->tid.x & 127, wg = g_cur->tid.x >> 7;
  WgMail& m = g_wgmail[wg * 2 + (g_wgphase[g_cur->tid.x]++ & 1)];
  if (rs) for (int i = 0; i < 4; ++i) m.a[t][i] = a[i];
  m.da[t] = da; m.db[t] = db; m.sd[t] = sd;
  barrier(WAIT_WG);
  for (int i = 0; i < 128; ++i)
    if ((!rs && m.da[i] != m.da[0]) || m.db[i] != m.db[0] || (m.sd[i] != 0) != (m.sd[0] != 0)) {
      fail("wgmma operands differ across the warpgroup"); return; }
  static thread_local float A[64][16], B[16][256];
  if (rs) {
    for (int ln = 0; ln < 128; ++ln) {
      int w = ln >> 5, g = (ln & 31) >> 2, tq = ln & 3; const uint32_t* v = m.a[ln];
      for (int e = 0; e < 2; ++e) {
        A[16 * w + g][2 * tq + e] = elem<E>(v[0], e); A[16 * w + g + 8][2 * tq + e] = elem<E>(v[1], e);
        A[16 * w + g][2 * tq + 8 + e] = elem<E>(v[2], e); A[16 * w + g + 8][2 * tq + 8 + e] = elem<E>(v[3], e);
      }
    }
  } else {
    if (!check_desc(da)) return;
    uint32_t start = (uint32_t)(da & 0x3FFF) << 4, sbo = (uint32_t)((da >> 32) & 0x3FFF) << 4;
    for (int r = 0; r < 64; ++r) for (int k = 0; k < 16; ++k)  // K-major: rows of 128 B, 8-row groups SBO apart
      A[r][k] = smem_elem<E>(start + (r / 8) * sbo + (r % 8) * 128 + k * 2);
  }
  if (!check_desc(db)) return;
  uint32_t start = (uint32_t)(db & 0x3FFF) << 4, lbo = (uint32_t)((db >> 16) & 0x3FFF) << 4,
           sbo = (uint32_t)((db >> 32) & 0x3FFF) << 4;
  for (int k = 0; k < 16; ++k) for (int n = 0; n < N; ++n)
    B[k][n] = trans_b ? smem_elem<E>(start + (n / 64) * lbo + (n % 64) * 2 + (k / 8) * sbo + (k % 8) * 128)  // MN-major
                      : smem_elem<E>(start + (n / 8) * sbo + (n % 8) * 128 + k * 2);  // K-major
  int w = t >> 5, g = (t & 31) >> 2, tq = t & 3;
  auto& gs = g_cur->wg_groups;
  if (g_lazy && (gs.empty() || gs.back().first)) gs.push_back({0, {}});
  for (int i = 0; i < N / 2; ++i) {
    int row = 16 * w + g + 8 * ((i % 4) >= 2), col = (i / 4) * 8 + 2 * tq + (i % 2);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    float c = *d[i];
    if (g_lazy)  // a wgmma chained onto an in-flight one accumulates onto its pending result, as the hardware does
      for (auto& pg : gs) for (auto& p : pg.second) if (p.first == d[i]) c = p.second;
    float val = (sd ? c : 0.f) + acc;
    if (g_lazy) gs.back().second.push_back({d[i], val}); else *d[i] = val;
  }
}
static inline void tvm_builtin_ptx_wgmma_fence_fence_sync_aligned() {}
static inline void tvm_builtin_ptx_fence_proxy_proxy_async_shared__cta() {}
static inline void tvm_builtin_ptx_wgmma_commit_group_commit_group_sync_aligned() {
  if (!g_lazy) return;
  auto& gs = g_cur->wg_groups;
  if (gs.empty() || gs.back().first) gs.push_back({0, {}});
  gs.back().first = 1;
}
static inline void wgmma_wait_(int n) {
  if (!g_lazy) return;
  auto& gs = g_cur->wg_groups;
  int closed = 0; for (auto& g : gs) closed += g.first;
  for (int retire = std::max(0, closed - n); retire > 0 && !gs.empty(); --retire) {
    for (auto& r : gs.front().second) *r.first = r.second;
    gs.erase(gs.begin());
  }
}
#define WGWAIT(N) static inline void tvm_builtin_ptx_wgmma_wait_group_wait_group_sync_aligned_##N() { wgmma_wait_(N); }
WGWAIT(0) WGWAIT(1) WGWAIT(2) WGWAIT(3)

static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }

// launch: run every CTA of the grid on this OS thread, one fiber per CUDA thread.
typedef void (*entry_fn)(void**);
static entry_fn g_entry; static void** g_args;
static void fiber_main() { g_entry(g_args); g_cur->done = 1; g_cur->state = -1; swapcontext(&g_cur->ctx, &g_sched); }

static const char* emu_launch(entry_fn entry, void** args, int gx, int gy, int gz, int nthreads, long smem_bytes, int lazy) {
  g_entry = entry; g_args = args; g_lazy = lazy; g_error = nullptr; g_smem_bytes = smem_bytes;
  std::vector<char> smem(smem_bytes + 16);
  for (int bz = 0; bz < gz; ++bz) for (int by = 0; by < gy; ++by) for (int bx = 0; bx < gx; ++bx) {
    g_block = {bx, by, bz};
    // poison shared memory: a kernel must never read what it did not write
    for (long i = 0; i < smem_bytes; i += 2) { uint16_t nan = 0x7fc1; std::memcpy(smem.data() + i, &nan, 2); }
    g_smem = smem.data();
    std::vector<Fiber> fibers(nthreads);
    g_fibers = &fibers;
    g_mail.assign(((nthreads + 31) / 32) * 2, Mail{});
    g_phase.assign(nthreads, 0);
    g_wgmail.assign(((nthreads + 127) / 128) * 2, WgMail{});
    g_wgphase.assign(nthreads, 0);
    for (int t = 0; t < nthreads; ++t) {
      Fiber& f = fibers[t]; f.tid = {t, 0, 0}; f.state = RUN; f.done = 0; f.stack.resize(1 << 17);
      getcontext(&f.ctx); f.ctx.uc_stack.ss_sp = f.stack.data(); f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = nullptr; makecontext(&f.ctx, fiber_main, 0);
    }
    int remaining = nthreads;
    while (remaining > 0 && !g_error) {
      bool progressed = false;
      for (int t = 0; t < nthreads; ++t) {
        Fiber& f = fibers[t];
        if (f.done || f.state != RUN) continue;
        g_cur = &f; progressed = true;
        swapcontext(&g_sched, &f.ctx);
        if (f.done) --remaining;
      }
      if (!progressed && remaining > 0) { fail("deadlock: threads wait at different barriers"); break; }
    }
    if (g_error) return g_error;
  }
  return nullptr;
}
"""

_SIG = re.compile(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (\w+)\(([^)]*)\)\s*;')


def _wgmma_wrappers(source):
    """C++ stand-ins for the wgmma helpers TVM generated (one per shape, dtype, form and transpose)."""
    pattern = r"void (tvm_builtin_ptx_wgmma_(bf16|f16)_(ss|rs)_mma_async_sync_aligned_m64n(\d+)k16_\w+)\("
    for name, dtype, form, n in sorted(set(re.findall(pattern, source))):
        n, rs = int(n), form == "rs"
        elem = "nv_bfloat16" if dtype == "bf16" else "half"
        acc = ", ".join(f"float& d{i}" for i in range(n // 2))
        a = "uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3" if rs else "uint64_t a_desc"
        yield (f"static inline void {name}({acc}, {a}, uint64_t b_desc, uint32_t sd) {{\n"
               f"  float* d[] = {{{', '.join(f'&d{i}' for i in range(n // 2))}}};\n"
               f"  uint32_t a[4] = {{{'a0, a1, a2, a3' if rs else '0, 0, 0, 0'}}};\n"
               f"  wgmma_emu<{elem}>({n}, {str(rs).lower()}, {name[-1]}, d, a, {'0' if rs else 'a_desc'}, b_desc, sd);\n"
               f"}}\n")


def _emulator(source, workdir):
    """Compile TVM's CUDA source for the CPU emulator; returns (run function, parameter list)."""
    threads, name, decls = _SIG.search(source).groups()
    kernel = source[source.index('extern "C" __global__'):].replace('extern "C"', "")
    kernel = re.sub(r"extern __shared__ __align__\(\d+\) (\w+) smem_ptr\[\];",
                    r"\1* smem_ptr = (\1*)g_smem;", kernel)
    params, casts = [], []
    for i, decl in enumerate(d.strip() for d in decls.split(",")):
        pname, ptr = decl.split()[-1], "*" in decl
        ctype = decl.split("*")[0].strip() if ptr else " ".join(decl.split()[:-1])
        params.append((pname.removesuffix("_ptr"), ctype, ptr))
        casts.append(f"({ctype}*)a[{i}]" if ptr else f"*({ctype}*)a[{i}]")
    code = (_EMULATOR + "".join(_wgmma_wrappers(source)) + kernel +
            f'\nstatic void entry_(void** a) {{ {name}({", ".join(casts)}); }}\n'
            'extern "C" const char* emu_run(void** a, int gx, int gy, int gz, int nt, long smem, int lazy) '
            '{ return emu_launch(entry_, a, gx, gy, gz, nt, smem, lazy); }\n')
    so = Path(workdir) / f"emu_{hashlib.sha256(code.encode()).hexdigest()[:16]}.so"
    if not so.exists():
        cpp = so.with_suffix(".cpp")
        cpp.write_text(code)
        subprocess.run(["g++", "-std=c++20", "-O1", "-w", "-shared", "-fPIC", "-o", str(so), str(cpp)], check=True)
    lib = ctypes.CDLL(str(so))
    lib.emu_run.restype = ctypes.c_char_p
    lib.emu_run.argtypes = [ctypes.POINTER(ctypes.c_void_p)] + [ctypes.c_int] * 4 + [ctypes.c_long, ctypes.c_int]

    def run(values, grid, shared, lazy):
        keep, arr = [], (ctypes.c_void_p * len(params))()
        for i, (pname, ctype, ptr) in enumerate(params):
            if ptr:
                arr[i] = values[pname].data_ptr()
            else:
                keep.append(ctypes.c_float(values[pname]) if ctype == "float" else ctypes.c_int(values[pname]))
                arr[i] = ctypes.cast(ctypes.pointer(keep[-1]), ctypes.c_void_p)
        err = lib.emu_run(arr, *grid, int(threads), shared, int(lazy))
        if err:
            raise AssertionError(f"emulated kernel failed: {err.decode()}")

    return run, [p[0] for p in params]


EMULATED_CASES = [
    # dtype, head_dim, layout block, kernel tile (m, n), warps, stages, Q in registers, q_len, kv_len, batch,
    # heads, lse, lazy cp.async
    ("bf16", 64, (32, 32), (32, 32), 2, 2, True, 77, 201, 2, 2, True, True),
    ("fp16", 128, (64, 64), (64, 32), 4, 3, True, 70, 150, 1, 2, False, False),  # sub-tiled kv blocks
    ("bf16", 64, (32, 64), (32, 64), 1, 1, True, 64, 256, 1, 2, True, True),  # 32 rows per warp, even lengths
    ("bf16", 128, (128, 64), (64, 64), 4, 2, True, 150, 100, 1, 1, True, False),  # sub-tiled query blocks
    ("bf16", 128, (64, 64), (64, 32), 2, 2, False, 90, 130, 1, 1, True, True),  # Q re-read, 32 rows per warp
]
WGMMA_CASES = [
    # dtype, head_dim, layout block, kernel tile (m, n), warps, stages, overlap, q_len, kv_len, batch, heads,
    # lse, lazy
    ("bf16", 128, (64, 64), (64, 64), 4, 2, False, 150, 201, 1, 2, True, True),
    ("fp16", 64, (128, 128), (128, 64), 8, 3, False, 200, 300, 1, 1, False, False),  # two warpgroups, sub-tiles
    ("bf16", 64, (64, 128), (64, 128), 4, 2, False, 128, 256, 2, 1, True, True),  # even lengths, m64n128 S
    ("bf16", 128, (64, 64), (64, 64), 4, 3, True, 150, 330, 1, 2, True, True),  # P V overlapped
    ("fp16", 64, (128, 64), (128, 32), 8, 2, True, 130, 200, 1, 1, False, True),  # overlapped, no prefetch
]


@needs_gxx
@pytest.mark.parametrize("dtype,head_dim,block,tile,warps,stages,q_regs,q_len,kv_len,batch,heads,lse,lazy",
                         EMULATED_CASES)
def test_cuda_kernel_emulated_on_cpu(rng, tmp_path_factory, dtype, head_dim, block, tile, warps, stages, q_regs,
                                     q_len, kv_len, batch, heads, lse, lazy):
    layout = random_layout(rng, q_len, kv_len, *block, density=0.5)
    spec = make_spec(layout, dtype, batch, heads, head_dim, return_lse=lse)
    cfg = KernelConfig(warps, stages, (("block_m", tile[0]), ("block_n", tile[1]), ("q_in_regs", q_regs)))
    tb.validate_config(spec, cfg, get_gpu("h100"))
    run, names = _emulator(tb.cuda_source(spec, cfg, layout), tmp_path_factory.getbasetemp())
    q, k, v = inputs(spec)
    out = torch.full_like(q, float("nan"))
    lse_t = torch.full(q.shape[:3], float("nan")) if lse else None
    scale = float(rng.uniform(0.05, 0.3))
    args = tb.launch_args(layout, q, k, v, out, lse_t, scale)
    assert sorted(args) == sorted(names)
    run(args, tb.grid(spec, cfg), tb.shared_bytes(spec, cfg), lazy)
    check_result(layout, q, k, v, scale, out, lse_t, factor=1.0)


@needs_gxx
@pytest.mark.parametrize("dtype,head_dim,block,tile,warps,stages,overlap,q_len,kv_len,batch,heads,lse,lazy",
                         WGMMA_CASES)
def test_wgmma_kernel_emulated_on_cpu(rng, tmp_path_factory, dtype, head_dim, block, tile, warps, stages, overlap,
                                      q_len, kv_len, batch, heads, lse, lazy):
    layout = random_layout(rng, q_len, kv_len, *block, density=0.5)
    spec = make_spec(layout, dtype, batch, heads, head_dim, return_lse=lse)
    cfg = KernelConfig(warps, stages, (("block_m", tile[0]), ("block_n", tile[1]), ("mma", "wgmma"),
                                       ("overlap", overlap)))
    tb.validate_config(spec, cfg, get_gpu("h100"))
    run, names = _emulator(tb.cuda_source(spec, cfg, layout, "sm_90a"), tmp_path_factory.getbasetemp())
    q, k, v = inputs(spec)
    out = torch.full_like(q, float("nan"))
    lse_t = torch.full(q.shape[:3], float("nan")) if lse else None
    scale = float(rng.uniform(0.05, 0.3))
    run(tb.launch_args(layout, q, k, v, out, lse_t, scale), tb.grid(spec, cfg), tb.shared_bytes(spec, cfg), lazy)
    check_result(layout, q, k, v, scale, out, lse_t, factor=1.0)
