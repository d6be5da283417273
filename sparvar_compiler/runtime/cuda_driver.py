"""A minimal ctypes binding of the CUDA driver API (``libcuda.so.1``): enough to load a cubin and launch it.

This is what lets a GPU host run kernels that were compiled elsewhere, with neither Triton's nor TVM's compiler
installed. It imports neither (nor torch); ``sparvar_compiler.runtime.cubin`` puts torch tensors and streams on
top of it.

Importing this module is always safe. The library is opened on first use; on a machine without an NVIDIA driver
that first use raises :class:`CudaDriverError` saying so. Every driver call's return code is checked, and a
failure raises :class:`CudaDriverError` naming the call and the driver's error name and text, e.g.
``cuModuleLoadData failed: CUDA_ERROR_NO_BINARY_FOR_GPU (no kernel image is available for execution on the
device)``.

Contexts: kernels run in the device's *primary* context, the one the CUDA runtime (and so torch) uses, so
pointers from ``tensor.data_ptr()`` and torch's streams are valid in it. :meth:`CudaDriver.make_current` retains
that context once per device and makes it current on the calling thread when it is not already.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Sequence

# CUfunction_attribute / CUdevice_attribute values from cuda.h (stable across CUDA 11-13).
FUNC_MAX_THREADS_PER_BLOCK = 0
FUNC_SHARED_SIZE_BYTES = 1
FUNC_LOCAL_SIZE_BYTES = 3
FUNC_NUM_REGS = 4
FUNC_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
DEV_MULTIPROCESSOR_COUNT = 16
DEV_COMPUTE_CAPABILITY_MAJOR = 75
DEV_COMPUTE_CAPABILITY_MINOR = 76
DEV_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97

CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_VALUE = 1

# Used when the library itself cannot name an error (it is missing, or cuGetErrorName failed too).
_KNOWN_ERRORS = {
    1: "CUDA_ERROR_INVALID_VALUE", 2: "CUDA_ERROR_OUT_OF_MEMORY", 3: "CUDA_ERROR_NOT_INITIALIZED",
    4: "CUDA_ERROR_DEINITIALIZED", 34: "CUDA_ERROR_STUB_LIBRARY", 100: "CUDA_ERROR_NO_DEVICE",
    101: "CUDA_ERROR_INVALID_DEVICE", 200: "CUDA_ERROR_INVALID_IMAGE", 201: "CUDA_ERROR_INVALID_CONTEXT",
    209: "CUDA_ERROR_NO_BINARY_FOR_GPU", 218: "CUDA_ERROR_INVALID_PTX", 222: "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
    400: "CUDA_ERROR_INVALID_HANDLE", 500: "CUDA_ERROR_NOT_FOUND", 700: "CUDA_ERROR_ILLEGAL_ADDRESS",
    701: "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", 719: "CUDA_ERROR_LAUNCH_FAILED", 999: "CUDA_ERROR_UNKNOWN",
}

_c_int, _c_uint, _c_size_t, _vp = ctypes.c_int, ctypes.c_uint, ctypes.c_size_t, ctypes.c_void_p
_P = ctypes.POINTER

# name -> argtypes; every function returns CUresult (int). Out-parameters are pointers.
_PROTOTYPES: dict[str, tuple[Any, ...]] = {
    "cuGetErrorName": (_c_int, _P(ctypes.c_char_p)),
    "cuGetErrorString": (_c_int, _P(ctypes.c_char_p)),
    "cuInit": (_c_uint,),
    "cuDriverGetVersion": (_P(_c_int),),
    "cuDeviceGet": (_P(_c_int), _c_int),
    "cuDeviceGetAttribute": (_P(_c_int), _c_int, _c_int),
    "cuDeviceGetName": (ctypes.c_char_p, _c_int, _c_int),
    "cuDevicePrimaryCtxRetain": (_P(_vp), _c_int),
    "cuCtxGetCurrent": (_P(_vp),),
    "cuCtxSetCurrent": (_vp,),
    "cuModuleLoadData": (_P(_vp), _vp),
    "cuModuleUnload": (_vp,),
    "cuModuleGetFunction": (_P(_vp), _vp, ctypes.c_char_p),
    "cuFuncGetAttribute": (_P(_c_int), _c_int, _vp),
    "cuFuncSetAttribute": (_vp, _c_int, _c_int),
    # CUDA >= 12.4 drivers only; used for a best-effort check of the parameter list.
    "cuFuncGetParamInfo": (_vp, _c_size_t, _P(_c_size_t), _P(_c_size_t)),
    "cuLaunchKernel": (_vp, _c_uint, _c_uint, _c_uint, _c_uint, _c_uint, _c_uint, _c_uint, _vp, _vp, _vp),
}
_OPTIONAL = frozenset({"cuFuncGetParamInfo", "cuGetErrorName", "cuGetErrorString"})


class CudaDriverError(RuntimeError):
    """The CUDA driver is missing, or a driver call failed (the message names the call and the error)."""

    def __init__(self, message: str, call: str | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.call = call
        self.code = code


def _load_library() -> Any:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise CudaDriverError(f"the CUDA driver library libcuda.so.1 could not be loaded ({e}); this machine has "
                              f"no NVIDIA driver, so compiled kernels cannot be launched here") from None


class CudaDriver:
    """The driver API functions the launcher needs, with every return code checked.

    Parameters
    ----------
    lib:
        An already opened library (tests pass a stand-in); default: ``libcuda.so.1``, opened on first use.
    """

    def __init__(self, lib: Any = None) -> None:
        self._lib = lib
        self._fns: dict[str, Any] | None = None
        self._lock = threading.RLock()  # re-entered: make_current -> device -> init -> _functions
        self._initialised = False
        self._contexts: dict[int, int] = {}

    # ------------------------------------------------------------------ library and errors
    def _functions(self) -> dict[str, Any]:
        if self._fns is None:
            with self._lock:
                if self._fns is None:
                    lib = self._lib if self._lib is not None else _load_library()
                    fns = {}
                    for name, argtypes in _PROTOTYPES.items():
                        f = getattr(lib, name, None)
                        if f is None:
                            if name in _OPTIONAL:
                                continue
                            raise CudaDriverError(f"the CUDA driver library has no {name}: driver too old?")
                        if isinstance(f, ctypes._CFuncPtr):  # real symbols get their C signature
                            f.argtypes, f.restype = argtypes, _c_int
                        fns[name] = f
                    self._lib, self._fns = lib, fns
        return self._fns

    def error_text(self, code: int) -> str:
        """``"CUDA_ERROR_X (description)"`` for a CUresult, as far as the driver (or our table) can tell."""
        fns = self._fns or {}
        name = desc = None
        for fn, out in (("cuGetErrorName", "name"), ("cuGetErrorString", "desc")):
            if fn in fns:
                p = ctypes.c_char_p()
                try:
                    if fns[fn](code, ctypes.pointer(p)) == CUDA_SUCCESS and p.value:
                        if out == "name":
                            name = p.value.decode(errors="replace")
                        else:
                            desc = p.value.decode(errors="replace")
                except (ctypes.ArgumentError, OSError):
                    pass
        name = name or _KNOWN_ERRORS.get(code, f"CUresult {code}")
        return f"{name} ({desc})" if desc else name

    def check(self, call: str, result: int, detail: str = "") -> None:
        """Raise :class:`CudaDriverError` unless ``result`` is ``CUDA_SUCCESS``."""
        if result != CUDA_SUCCESS:
            where = f" ({detail})" if detail else ""
            raise CudaDriverError(f"{call} failed{where}: {self.error_text(result)}", call, int(result))

    def _call(self, name: str, *args: Any, detail: str = "") -> None:
        self.check(name, self._functions()[name](*args), detail)

    def has(self, name: str) -> bool:
        """Whether the loaded driver exports ``name`` (optional functions may be missing on old drivers)."""
        return name in self._functions()

    # ------------------------------------------------------------------ devices and contexts
    def init(self) -> None:
        if not self._initialised:
            self._call("cuInit", 0)
            self._initialised = True

    def driver_version(self) -> int:
        """CUDA version the driver supports, as ``1000 * major + 10 * minor`` (12040 is 12.4)."""
        v = _c_int()
        self._call("cuDriverGetVersion", ctypes.pointer(v))
        return v.value

    def device(self, ordinal: int) -> int:
        self.init()
        d = _c_int()
        self._call("cuDeviceGet", ctypes.pointer(d), ordinal, detail=f"device {ordinal}")
        return d.value

    def device_attribute(self, attribute: int, ordinal: int) -> int:
        v = _c_int()
        self._call("cuDeviceGetAttribute", ctypes.pointer(v), attribute, self.device(ordinal),
                   detail=f"attribute {attribute} of device {ordinal}")
        return v.value

    def device_name(self, ordinal: int) -> str:
        buf = ctypes.create_string_buffer(256)
        self._call("cuDeviceGetName", buf, 256, self.device(ordinal))
        return buf.value.decode(errors="replace")

    def capability(self, ordinal: int) -> tuple[int, int]:
        return (self.device_attribute(DEV_COMPUTE_CAPABILITY_MAJOR, ordinal),
                self.device_attribute(DEV_COMPUTE_CAPABILITY_MINOR, ordinal))

    def current_context(self) -> int | None:
        ctx = _vp()
        self._call("cuCtxGetCurrent", ctypes.pointer(ctx))
        return ctx.value

    def make_current(self, ordinal: int) -> int:
        """Make device ``ordinal``'s primary context current on this thread (retained once); return it."""
        ctx = self._contexts.get(ordinal)
        if ctx is None:
            with self._lock:
                ctx = self._contexts.get(ordinal)
                if ctx is None:
                    dev = self.device(ordinal)
                    out = _vp()
                    self._call("cuDevicePrimaryCtxRetain", ctypes.pointer(out), dev, detail=f"device {ordinal}")
                    ctx = out.value
                    self._contexts[ordinal] = ctx
        if self.current_context() != ctx:
            self._call("cuCtxSetCurrent", ctx)
        return ctx

    # ------------------------------------------------------------------ modules and functions
    def load_module(self, image: bytes) -> int:
        """``cuModuleLoadData`` on a cubin, fatbin or NUL-terminated PTX image (in the current context)."""
        mod = _vp()
        buf = ctypes.create_string_buffer(image, len(image))
        self._call("cuModuleLoadData", ctypes.pointer(mod), buf)
        return mod.value

    def unload_module(self, module: int) -> None:
        self._call("cuModuleUnload", module)

    def get_function(self, module: int, name: str) -> int:
        fn = _vp()
        self._call("cuModuleGetFunction", ctypes.pointer(fn), module, name.encode(),
                   detail=f"kernel {name!r} not in the binary?")
        return fn.value

    def func_attribute(self, function: int, attribute: int) -> int:
        v = _c_int()
        self._call("cuFuncGetAttribute", ctypes.pointer(v), attribute, function, detail=f"attribute {attribute}")
        return v.value

    def set_func_attribute(self, function: int, attribute: int, value: int) -> None:
        self._call("cuFuncSetAttribute", function, attribute, value, detail=f"attribute {attribute} = {value}")

    def param_sizes(self, function: int, limit: int = 4096) -> list[int] | None:
        """Byte sizes of the kernel's parameters in order, or None when the driver cannot tell (< CUDA 12.4)."""
        fns = self._functions()
        if "cuFuncGetParamInfo" not in fns:
            return None
        sizes: list[int] = []
        off, size = _c_size_t(), _c_size_t()
        for i in range(limit):
            r = fns["cuFuncGetParamInfo"](function, i, ctypes.pointer(off), ctypes.pointer(size))
            if r == CUDA_ERROR_INVALID_VALUE:  # index past the last parameter
                # Nothing at index 0 is indistinguishable from "cannot tell": report unknown, not "no parameters".
                return sizes or None
            if r != CUDA_SUCCESS:
                return None  # e.g. not supported for this binary: the check is best effort
            sizes.append(size.value)
        return sizes

    def launch(self, function: int, grid: Sequence[int], block: Sequence[int], shared_bytes: int, stream: int,
               params: Any, detail: str = "") -> None:
        """``cuLaunchKernel``; ``params`` is the ``void*[]`` of pointers to each argument's value."""
        self._call("cuLaunchKernel", function, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                   shared_bytes, stream, params, None, detail=detail)


_DRIVER: CudaDriver | None = None


def driver() -> CudaDriver:
    """The process-wide driver binding (the library is opened on first use, not here)."""
    global _DRIVER
    if _DRIVER is None:
        _DRIVER = CudaDriver()
    return _DRIVER
