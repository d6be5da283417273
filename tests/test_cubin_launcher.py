"""The compiler-free launcher: ctypes driver binding, parameter packing, pre-launch checks, and (on a GPU) real
launches of a small probe kernel, including dynamic shared memory above 48 KB and CUDA-graph capture."""

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from sparvar_compiler.codegen.artifact import CompiledKernel, KernelParam
from sparvar_compiler.codegen.spec import KernelConfigError
from sparvar_compiler.errors import SparvarError
from sparvar_compiler.runtime import cuda_driver as cu
from sparvar_compiler.runtime.cubin import (PARAM_SIZES, KernelBinaryError, LaunchArgumentError, LoadedKernel,
                                            ParamPacker, _check_param_sizes, check_arch, check_launch_shape,
                                            parse_arch)

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# out[i] = alpha * x[i] + offset + (scratch != 0 ? 0.5 : 0) + (null_scratch == 0 ? 0.25 : 0), with x[i] staged
# through the top of dynamic shared memory (smem_floats floats), so a launch whose shared-memory opt-in was not
# raised fails. Hand-kept PTX ISA 7.0 for sm_70 (from nvcc -ptx), so any driver since CUDA 11 JIT-compiles it.
PROBE_PTX = """\
.version 7.0
.target sm_70
.address_size 64
.extern .shared .align 16 .b8 buf[];
.visible .entry sparvar_launch_probe(
.param .u64 p0, .param .u64 p1, .param .u32 p2, .param .u64 p3, .param .f32 p4, .param .u64 p5,
.param .u64 p6, .param .u32 p7)
{
.reg .pred %p<5>; .reg .f32 %f<13>; .reg .b32 %r<12>; .reg .b64 %rd<12>;
ld.param.u64 %rd1, [p0]; ld.param.u64 %rd2, [p1]; ld.param.u32 %r5, [p2]; ld.param.u64 %rd3, [p3];
ld.param.f32 %f3, [p4]; ld.param.u64 %rd4, [p5]; ld.param.u64 %rd5, [p6]; ld.param.u32 %r6, [p7];
mov.u32 %r1, %ntid.x; mov.u32 %r7, %ctaid.x; mov.u32 %r2, %tid.x;
mad.lo.s32 %r3, %r7, %r1, %r2;
setp.ge.s32 %p1, %r3, %r5;
mov.f32 %f12, 0f00000000;
@%p1 bra SKIP_LOAD;
cvta.to.global.u64 %rd6, %rd2; mul.wide.s32 %rd7, %r3, 4; add.s64 %rd8, %rd6, %rd7;
ld.global.f32 %f12, [%rd8];
SKIP_LOAD:
sub.s32 %r8, %r2, %r1; add.s32 %r9, %r8, %r6; shl.b32 %r10, %r9, 2;
mov.u32 %r11, buf; add.s32 %r4, %r11, %r10;
st.shared.f32 [%r4], %f12;
bar.sync 0;
@%p1 bra DONE;
ld.shared.f32 %f5, [%r4];
cvt.rn.f32.s64 %f6, %rd3;
fma.rn.f32 %f7, %f5, %f3, %f6;
setp.eq.s64 %p3, %rd4, 0; selp.f32 %f8, 0f00000000, 0f3F000000, %p3; add.f32 %f9, %f8, %f7;
setp.eq.s64 %p4, %rd5, 0; selp.f32 %f10, 0f3E800000, 0f00000000, %p4; add.f32 %f11, %f10, %f9;
cvta.to.global.u64 %rd9, %rd1; mul.wide.s32 %rd10, %r3, 4; add.s64 %rd11, %rd9, %rd10;
st.global.f32 [%rd11], %f11;
DONE:
ret;
}
"""
PROBE_PARAMS = (KernelParam("out", "ptr"), KernelParam("x", "ptr"), KernelParam("n", "i32"),
                KernelParam("offset", "i64"), KernelParam("alpha", "f32"), KernelParam("scratch", "scratch", 256),
                KernelParam("null_scratch", "scratch", 0), KernelParam("smem_floats", "i32"))
THREADS, SMEM = 128, 64 * 1024


def probe(binary=PROBE_PTX.encode(), fmt="ptx", arch="sm_70", n=1000, shared=SMEM, params=PROBE_PARAMS,
          entry="sparvar_launch_probe", block=(THREADS, 1, 1)):
    return CompiledKernel("test", arch, entry, binary, fmt, tuple(params), (-(-n // THREADS), 1, 1), block,
                          shared, {}, {}, {})


def probe_args(out, x, offset=-7, alpha=1.5, shared=SMEM):
    return {"out": out, "x": x, "n": x.numel(), "offset": offset, "alpha": alpha, "smem_floats": shared // 4}


def find_ptxas():
    """ptxas from PATH, $TRITON_PTXAS_PATH, or the copy Triton ships (found without importing Triton)."""
    candidates = [os.environ.get("TRITON_PTXAS_PATH"), shutil.which("ptxas")]
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        candidates.append(str(Path(spec.submodule_search_locations[0]) / "backends/nvidia/bin/ptxas"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def assemble(arch, tmp_path):
    ptxas = find_ptxas()
    if ptxas is None:
        pytest.skip("no ptxas here (PATH, TRITON_PTXAS_PATH or Triton's copy)")
    src = tmp_path / "probe.ptx"
    src.write_text(PROBE_PTX)
    out = tmp_path / f"probe_{arch}.cubin"
    subprocess.run([ptxas, f"-arch={arch}", str(src), "-o", str(out)], check=True, capture_output=True)
    return out.read_bytes()


# ------------------------------------------------------------------------------------------ driver binding (CPU)
def test_import_pulls_in_no_compiler():
    code = ("import sys, sparvar_compiler.runtime.cuda_driver, sparvar_compiler.runtime.cubin; "
            "bad = [m for m in ('triton', 'tvm') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_driver_fails_clearly_on_first_use(monkeypatch):
    def no_lib(name, *a, **k):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_lib)
    drv = cu.CudaDriver()  # constructing is free
    with pytest.raises(cu.CudaDriverError, match="libcuda.so.1 could not be loaded.*no NVIDIA driver"):
        drv.init()


NAMES = {209: b"CUDA_ERROR_NO_BINARY_FOR_GPU"}
TEXTS = {209: b"no kernel image is available for execution on the device"}


class FakeLib:
    """Stands in for libcuda: every function returns a CUresult and writes its out-parameters."""

    def __init__(self, failing=None, named=True):
        self.failing = failing or {}
        if named:
            self.cuGetErrorName = self._lookup(NAMES)
            self.cuGetErrorString = self._lookup(TEXTS)
        for name in cu._PROTOTYPES:
            if name not in ("cuGetErrorName", "cuGetErrorString", "cuFuncGetParamInfo") and not hasattr(self, name):
                setattr(self, name, self._fn(name))

    @staticmethod
    def _lookup(table):
        def f(code, out):
            if code not in table:
                return 1
            out.contents.value = table[code]
            return 0
        return f

    def _fn(self, name):
        return lambda *args: self.failing.get(name, 0)

    def cuFuncGetParamInfo(self, fn, index, offset, size):
        sizes = [8, 8, 4, 8]
        if index >= len(sizes):
            return cu.CUDA_ERROR_INVALID_VALUE
        offset.contents.value, size.contents.value = sum(sizes[:index]), sizes[index]
        return 0


def test_failed_call_names_the_call_and_the_error():
    drv = cu.CudaDriver(FakeLib(failing={"cuModuleLoadData": 209}))
    with pytest.raises(cu.CudaDriverError) as e:
        drv.load_module(b"\x7fELF")
    msg = str(e.value)
    assert msg.startswith("cuModuleLoadData failed")
    assert "CUDA_ERROR_NO_BINARY_FOR_GPU (no kernel image is available" in msg
    assert e.value.call == "cuModuleLoadData" and e.value.code == 209


def test_error_names_fall_back_to_our_table():
    drv = cu.CudaDriver(FakeLib(failing={"cuLaunchKernel": 701}, named=False))
    with pytest.raises(cu.CudaDriverError, match="cuLaunchKernel failed \\(kernel k\\): "
                                                 "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"):
        drv.launch(1, (1, 1, 1), (1, 1, 1), 0, 0, None, detail="kernel k")
    assert drv.error_text(12345) == "CUresult 12345"


def test_old_driver_without_a_required_function_is_reported():
    lib = FakeLib()
    del lib.cuModuleGetFunction
    with pytest.raises(cu.CudaDriverError, match="no cuModuleGetFunction"):
        cu.CudaDriver(lib).init()


def test_param_sizes_read_until_the_driver_says_stop():
    assert cu.CudaDriver(FakeLib()).param_sizes(1) == [8, 8, 4, 8]
    lib = FakeLib()
    lib.cuFuncGetParamInfo = None  # drivers before CUDA 12.4: no check possible
    assert cu.CudaDriver(lib).param_sizes(1) is None


# ------------------------------------------------------------------------------------------ packing (CPU)
def read_slot(array, i, ctype):
    return ctypes.cast(array[i], ctypes.POINTER(ctype)).contents.value


def test_packer_writes_each_kind_where_cuLaunchKernel_reads_it():
    packer = ParamPacker("probe", PROBE_PARAMS, torch.device("cpu"), {"scratch": 0xABC0, "null_scratch": 0})
    out, x = torch.empty(1000), torch.randn(1000)
    for offset, alpha in ((-7, 1.5), (2 ** 40, -0.25)):  # a second launch reuses the same storage
        arr = packer.pack(probe_args(out, x, offset, alpha))
        assert read_slot(arr, 0, ctypes.c_void_p) == out.data_ptr()
        assert read_slot(arr, 1, ctypes.c_void_p) == x.data_ptr()
        assert read_slot(arr, 2, ctypes.c_int32) == 1000
        assert read_slot(arr, 3, ctypes.c_int64) == offset
        assert read_slot(arr, 4, ctypes.c_float) == alpha
        assert read_slot(arr, 5, ctypes.c_void_p) == 0xABC0
        assert read_slot(arr, 6, ctypes.c_void_p) is None  # null pointer
        assert read_slot(arr, 7, ctypes.c_int32) == SMEM // 4
    assert packer.arg_names == {"out", "x", "n", "offset", "alpha", "smem_floats"}
    assert [PARAM_SIZES[p.kind] for p in PROBE_PARAMS] == [8, 8, 4, 8, 4, 8, 8, 4]


@pytest.mark.parametrize("change,message", [
    (lambda a: a.pop("alpha"), r"missing \['alpha'\]"),
    (lambda a: a.update(beta=1.0), r"unknown \['beta'\]"),
    (lambda a: a.update(scratch=torch.empty(4)), r"\['scratch'\] are scratch buffers the launcher owns"),
    (lambda a: a.update(n=True), r"n \(i32\) needs a number, got bool"),
    (lambda a: a.update(n=3.0), r"n \(i32\) needs an integer"),
    (lambda a: a.update(n=2 ** 31), r"out of range"),
    (lambda a: a.update(offset=-(2 ** 63) - 1), r"out of range"),
    (lambda a: a.update(alpha=torch.tensor(1.0)), r"alpha \(f32\) needs a number, got a tensor"),
    (lambda a: a.update(alpha="1"), r"alpha \(f32\) needs a number, got str"),
    (lambda a: a.update(out=[0.0]), r"out \(ptr\) needs a tensor, got list"),
    (lambda a: a.update(x=torch.randn(40, 50).t()), r"tensor x must be contiguous"),
    (lambda a: a.update(x=torch.randn(1001)[1:]), r"tensor x must be 16-byte aligned"),
    (lambda a: a.update(out=torch.empty(1000, device="meta")), r"tensor out is on meta"),
])
def test_bad_arguments_are_refused_before_launch(change, message):
    packer = ParamPacker("probe", PROBE_PARAMS, torch.device("cpu"), {"scratch": 0, "null_scratch": 0})
    args = probe_args(torch.empty(1000), torch.randn(1000))
    packer.pack(args)
    before = [read_slot(packer.array, i, ctypes.c_int64) for i in (3,)]
    change(args)
    with pytest.raises(LaunchArgumentError, match=message) as e:
        packer.pack(args)
    assert isinstance(e.value, SparvarError) and "kernel probe" in str(e.value)
    assert [read_slot(packer.array, i, ctypes.c_int64) for i in (3,)] == before  # nothing half-written


def test_cpu_tensors_are_refused_for_a_cuda_kernel():
    packer = ParamPacker("probe", PROBE_PARAMS, torch.device("cuda", 0), {"scratch": 0, "null_scratch": 0})
    with pytest.raises(LaunchArgumentError, match="tensor out is on cpu, the kernel runs on cuda:0"):
        packer.pack(probe_args(torch.empty(1000), torch.randn(1000)))
    with pytest.raises(LaunchArgumentError, match="mapping"):
        packer.pack([1, 2])


def test_parameter_records_are_checked():
    with pytest.raises(KernelBinaryError, match="unique"):
        ParamPacker("k", (KernelParam("a", "ptr"), KernelParam("a", "i32")), torch.device("cpu"), {})
    with pytest.raises(KernelBinaryError, match="no buffer for scratch"):
        ParamPacker("k", (KernelParam("s", "scratch", 8),), torch.device("cpu"), {})
    _check_param_sizes("k", PROBE_PARAMS, None)  # driver cannot tell: no check
    _check_param_sizes("k", PROBE_PARAMS, [8, 8, 4, 8, 4, 8, 8, 4])
    with pytest.raises(KernelBinaryError, match=r"sizes \[8, 8, 4\] bytes but the record lists \[out:ptr"):
        _check_param_sizes("k", PROBE_PARAMS, [8, 8, 4])


@pytest.mark.parametrize("arch,fmt,cap,ok", [
    ("sm_90", "cubin", (9, 0), True), ("sm_90a", "cubin", (9, 0), True), ("sm_80", "cubin", (8, 6), True),
    ("sm_80", "cubin", (9, 0), False), ("sm_90", "cubin", (8, 0), False), ("sm_90a", "cubin", (10, 0), False),
    ("sm_86", "cubin", (8, 0), False), ("sm_70", "ptx", (9, 0), True), ("sm_90", "ptx", (8, 0), False),
    ("sm_90", "fatbin", (8, 0), True),
])
def test_arch_compatibility(arch, fmt, cap, ok):
    if ok:
        check_arch(arch, fmt, cap, "GPU")
    else:
        with pytest.raises(KernelConfigError, match=f"compiled for {arch}"):
            check_arch(arch, fmt, cap, "GPU")


def test_arch_and_launch_shape_parsing():
    assert parse_arch("sm_90a") == (9, 0, "a") and parse_arch("sm_100") == (10, 0, "")
    with pytest.raises(KernelBinaryError):
        parse_arch("hopper")
    check_launch_shape("k", (2 ** 31 - 1, 65535, 65535), (1024, 1, 1))
    for grid, block in (((1, 1, 1), (1025, 1, 1)), ((1, 1, 1), (32, 32, 2)), ((1, 65536, 1), (1, 1, 1)),
                        ((0, 1, 1), (1, 1, 1)), ((1, 1), (1, 1, 1))):
        with pytest.raises(KernelConfigError, match="kernel k"):
            check_launch_shape("k", grid, block)


def test_load_checks_the_record_before_touching_the_driver():
    with pytest.raises(KernelBinaryError, match="binary format"):
        LoadedKernel.load(probe(fmt="elf"))
    with pytest.raises(KernelConfigError, match="exceeds 1024 threads"):
        LoadedKernel.load(probe(block=(2048, 1, 1)))


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU message")
def test_load_without_cuda_says_where_to_run_it():
    with pytest.raises(cu.CudaDriverError, match="CUDA is not available"):
        LoadedKernel.load(probe())


def test_assembled_probe_round_trips_as_an_artifact(tmp_path):
    cubin = assemble("sm_90", tmp_path)
    k = probe(cubin, "cubin", "sm_90")
    again = CompiledKernel.from_json_dict(k.to_json_dict())
    assert again.binary == cubin and again.params == PROBE_PARAMS and again.sha256 == k.sha256


class FakeDriver:
    """Records what LoadedKernel asks of the driver, so its load/launch sequence runs on the CPU."""

    def __init__(self, registers=40, max_threads=1024, optin=227 * 1024, sizes=None):
        self.calls = []
        self.attrs = {cu.FUNC_NUM_REGS: registers, cu.FUNC_LOCAL_SIZE_BYTES: 0, cu.FUNC_SHARED_SIZE_BYTES: 0,
                      cu.FUNC_MAX_THREADS_PER_BLOCK: max_threads}
        self.optin, self.sizes = optin, sizes

    def __getattr__(self, name):
        results = {"device_name": "Fake H100", "capability": (9, 0), "load_module": 11, "get_function": 22,
                   "make_current": 33}

        def call(*args, **kwargs):
            self.calls.append((name, args))
            if name == "func_attribute":
                return self.attrs[args[1]]
            if name == "device_attribute":
                return self.optin
            if name == "param_sizes":
                return self.sizes
            return results.get(name)
        return call


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch and the driver as a GPU host would show them, with tensors on the CPU standing in."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"cuda_stream": 77})())
    import sparvar_compiler.runtime.cubin as cubin_module
    monkeypatch.setattr(cubin_module, "_cuda_device", lambda device: torch.device("cpu"))

    def install(**kw):
        drv = FakeDriver(**kw)
        monkeypatch.setattr(cu, "_DRIVER", drv)
        return drv
    return install


def test_load_and_launch_drive_the_driver_in_order(fake_gpu):
    drv = fake_gpu(sizes=[8, 8, 4, 8, 4, 8, 8, 4])
    k = LoadedKernel.load(probe(arch="sm_70"))
    names = [c[0] for c in drv.calls]
    assert names.index("make_current") < names.index("load_module") < names.index("get_function")
    assert ("set_func_attribute", (22, cu.FUNC_MAX_DYNAMIC_SHARED_SIZE_BYTES, SMEM)) in drv.calls
    assert drv.calls[names.index("load_module")][1][0].endswith(b"}\n\0")  # PTX gets its NUL
    assert k.resources == {"registers": 40, "local_bytes": 0, "static_shared_bytes": 0,
                           "max_threads_per_block": 1024}
    out, x = torch.empty(1000), torch.randn(1000)
    drv.calls.clear()
    k.launch(probe_args(out, x))
    (name, (fn, grid, block, shared, stream, params)), = [c for c in drv.calls if c[0] == "launch"]
    assert (fn, grid, block, shared, stream) == (22, (8, 1, 1), (THREADS, 1, 1), SMEM, 77)
    assert read_slot(params, 0, ctypes.c_void_p) == out.data_ptr()
    assert read_slot(params, 5, ctypes.c_void_p) == k._scratch["scratch"].data_ptr()
    assert k._scratch["scratch"].numel() == 256 and "null_scratch" not in k._scratch
    k.close()
    assert ("unload_module", (11,)) in drv.calls
    with pytest.raises(KernelBinaryError, match="closed"):
        k.launch(probe_args(out, x))


def test_small_shared_memory_keeps_the_default_limit(fake_gpu):
    drv = fake_gpu()
    LoadedKernel.load(probe(shared=16 * 1024))
    assert not [c for c in drv.calls if c[0] == "set_func_attribute"]


@pytest.mark.parametrize("kw,message", [
    (dict(max_threads=64), "128 threads per block but with 40 registers per thread Fake H100 allows 64"),
    (dict(optin=48 * 1024), "needs 65536 bytes of shared memory"),
    (dict(sizes=[8, 8]), "record lists"),
])
def test_resource_and_parameter_mismatches_unload_and_raise(fake_gpu, kw, message):
    drv = fake_gpu(**kw)
    with pytest.raises((KernelConfigError, KernelBinaryError), match=message):
        LoadedKernel.load(probe())
    assert ("unload_module", (11,)) in drv.calls


# ------------------------------------------------------------------------------------------ real launches (GPU)
def expected(x, offset, alpha):
    return alpha * x + float(offset) + 0.75  # scratch is a real buffer, null_scratch is null


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", ["ptx", "cubin"])
def test_probe_runs_with_large_dynamic_shared_memory(fmt, tmp_path):
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    binary = PROBE_PTX.encode() if fmt == "ptx" else assemble(arch, tmp_path)
    k = LoadedKernel.load(probe(binary, fmt, "sm_70" if fmt == "ptx" else arch))
    assert k.resources["registers"] > 0 and k.resources["max_threads_per_block"] >= THREADS
    x = torch.randn(1000, device="cuda")
    out = torch.full_like(x, float("nan"))
    k.launch(probe_args(out, x))
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected(x, -7, 1.5))
    k.launch(probe_args(out, x, offset=2 ** 40, alpha=0.0))  # all 64 bits of an i64 arrive
    torch.cuda.synchronize()
    assert torch.all(out == float(2 ** 40))


@pytest.mark.gpu
@gpu
def test_probe_launch_is_graph_capturable_and_uses_the_given_stream():
    k = LoadedKernel.load(probe())
    x = torch.randn(1000, device="cuda")
    out = torch.full_like(x, float("nan"))
    args = probe_args(out, x)
    k.launch(args)  # warm up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        k.launch(args)
    x.copy_(torch.randn_like(x))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected(x, -7, 1.5))
    side = torch.cuda.Stream()
    out.fill_(float("nan"))
    torch.cuda.synchronize()
    k.launch(args, stream=side)
    side.synchronize()
    torch.testing.assert_close(out, expected(x, -7, 1.5))


@pytest.mark.gpu
@gpu
def test_probe_launches_from_another_thread():
    k = LoadedKernel.load(probe())
    x = torch.randn(1000, device="cuda")
    out = torch.full_like(x, float("nan"))
    errors = []

    def run():
        try:
            k.launch(probe_args(out, x))
            torch.cuda.synchronize()
        except Exception as e:  # surfaced below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert not errors, errors
    torch.testing.assert_close(out, expected(x, -7, 1.5))


@pytest.mark.gpu
@gpu
def test_device_limits_and_bad_binaries_are_refused_on_the_gpu():
    optin = cu.driver().device_attribute(cu.DEV_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, torch.cuda.current_device())
    with pytest.raises(KernelConfigError, match="shared memory"):
        LoadedKernel.load(probe(shared=optin + 1024))
    with pytest.raises(KernelConfigError, match="compiled for sm_999"):
        LoadedKernel.load(probe(arch="sm_999"))
    with pytest.raises(KernelBinaryError, match="no such function"):
        LoadedKernel.load(probe(entry="not_there"))
    with pytest.raises(cu.CudaDriverError, match="cuModuleLoadData"):
        LoadedKernel.load(probe(binary=b"\x7fELF not a cubin", fmt="cubin",
                                arch="sm_%d%d" % torch.cuda.get_device_capability()))
    k = LoadedKernel.load(probe())
    with pytest.raises(LaunchArgumentError, match="is on cpu"):
        k.launch(probe_args(torch.empty(1000), torch.randn(1000)))
    if cu.driver().param_sizes(k._function) is None:
        pytest.skip("this driver cannot report kernel parameters (CUDA < 12.4)")
    with pytest.raises(KernelBinaryError, match="record lists"):
        LoadedKernel.load(probe(params=PROBE_PARAMS[:-1]))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", ["block", "gather"])
def test_triton_cubin_runs_through_the_launcher(kind):
    """The compiler-free path end to end: a Triton kernel compiled to a cubin, launched by name-bound args."""
    from sparvar_compiler.codegen.reference import check_close, reference_attention
    from sparvar_compiler.codegen.spec import KernelSpec
    from sparvar_compiler.planner import csla_layout, make_plan
    from sparvar_compiler.planner.gpus import gpu_from_device_name

    tb = pytest.importorskip("sparvar_compiler.codegen.triton_backend")
    props = torch.cuda.get_device_properties(0)
    target = gpu_from_device_name(props.name, props.multi_processor_count)
    if target is None:
        pytest.skip(f"{props.name} is not in the GPU registry")
    layout = csla_layout(make_plan("var-d16"), 9, 64, 64, token_masks=True)  # 256 x 680 keys
    B, H, D = 2, 3, 64
    spec = KernelSpec("triton", kind, B, H, layout.q_len, layout.kv_len, D, "bf16", 64, 64, layout.content_hash())
    kernel = LoadedKernel.load(tb.compile_for_target(spec, tb.default_config(spec, target), layout, target))
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16)
               for n in (layout.q_len, layout.kv_len, layout.kv_len))
    out = torch.full_like(q, float("nan"))
    kernel.launch(tb.launch_args(layout, q, k, v, out, None, None, q.device, spec=spec))
    torch.cuda.synchronize()
    mask = torch.from_numpy(layout.to_token_mask(exact=kind == "gather"))
    if kind == "gather":  # block-union semantics: each query sees every key its query block keeps
        padded = torch.zeros(layout.q_blocks * layout.block_m, layout.kv_len, dtype=torch.bool)
        padded[: layout.q_len] = mask
        union = padded.view(layout.q_blocks, layout.block_m, layout.kv_len).any(dim=1)
        mask = union[torch.arange(layout.q_len) // layout.block_m]
    mask = mask.cuda()
    golden = reference_attention(q, k, v, mask, dtype=torch.float64)
    ok, err, ref = check_close(out, golden, reference_attention(q, k, v, mask))
    assert ok, f"cubin error {err:.2e} vs bf16 reference {ref:.2e}"


def test_first_call_make_current_does_not_deadlock():
    # Regression: make_current holds the driver lock and reaches init -> _functions, which takes it again;
    # on a fresh driver a plain Lock hung forever (seen on an H200 on the first load of a module).
    drv = cu.CudaDriver(FakeLib())
    done = []
    t = threading.Thread(target=lambda: done.append(drv.make_current(0)), daemon=True)
    t.start()
    t.join(10)
    assert done, "make_current on a fresh driver did not return"
