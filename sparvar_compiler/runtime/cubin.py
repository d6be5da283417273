"""Launch a :class:`~sparvar_compiler.codegen.artifact.CompiledKernel` through the CUDA driver API alone.

``LoadedKernel.load(compiled)`` loads the binary once into the device's primary context (the one torch uses),
checks it against the device before anything runs (arch, block size, shared memory, registers, and - on
drivers that can tell - the parameter list), raises the dynamic shared memory limit above 48 KB, and allocates
the kernel's scratch buffers. ``launch(args)`` then binds every parameter by name, in the binary's order::

    kind      value in ``args``                                  what the kernel receives
    ptr       a contiguous CUDA tensor on the kernel's device    tensor.data_ptr() (16-byte aligned)
    i32/i64   a Python (or numpy) integer in range               the integer
    f32       a Python (or numpy) real number                    the number as float32
    scratch   nothing: the launcher owns it                      a cached device buffer of ``nbytes``
                                                                 (zeroed once at load), or null when 0

Missing or unknown names, CPU tensors, tensors on another device, non-contiguous or misaligned tensors, and
values of the wrong kind raise :class:`LaunchArgumentError` before anything is launched. Pointer parameters
must be 16-byte aligned because compilers specialise on it (Triton marks aligned pointers ``divisibility=16``
and emits vector loads that would silently misread an offset view).

The batch is a launch size: ``launch(args, batch=B)`` scales the grid (and a persistent kernel's work-item
count, and the scratch buffers, which grow with the number of programs) from the batch the kernel was built
at. A scratch buffer that must grow for a new batch is allocated on that batch's first launch, so launch once
at each batch before capturing it in a CUDA graph (or call :meth:`LoadedKernel.reserve`); buffers are never
freed while the kernel lives, since a captured graph may hold their addresses.

A launch allocates nothing and never synchronises, so it can be captured in a CUDA graph. Values are written
into ctypes storage made once at load; ``cuLaunchKernel`` copies them, so reusing the storage is safe, and a
lock keeps concurrent launches from different threads apart.
"""

from __future__ import annotations

import ctypes
import math
import numbers
import re
import threading
from typing import Any, Iterable, Mapping

import torch

from ..codegen.artifact import CompiledKernel, KernelParam
from ..codegen.spec import KernelConfigError, KernelInputError
from ..errors import SparvarError
from . import cuda_driver as cu

POINTER_ALIGNMENT = 16
DEFAULT_SHARED_LIMIT = 48 * 1024  # what a block gets without opting in
_SLOT_TYPES = {"ptr": ctypes.c_void_p, "scratch": ctypes.c_void_p, "i32": ctypes.c_int32,
               "i64": ctypes.c_int64, "f32": ctypes.c_float}
PARAM_SIZES = {"ptr": 8, "scratch": 8, "i32": 4, "i64": 8, "f32": 4}
_INT_RANGES = {"i32": (-(2 ** 31), 2 ** 31 - 1), "i64": (-(2 ** 63), 2 ** 63 - 1)}


class LaunchArgumentError(KernelInputError):
    """Launch arguments that do not match a compiled kernel's parameters (names, kinds, devices, values)."""


class KernelBinaryError(SparvarError):
    """A compiled kernel whose binary does not match its record (entry name, parameter list)."""


class ParamPacker:
    """Binds launch arguments by name into the ``void*[]`` array that ``cuLaunchKernel`` reads.

    Parameters
    ----------
    entry:
        Kernel name, for messages.
    params:
        The kernel's parameters in the binary's order.
    device:
        Where ``ptr`` tensors must live (a CUDA device; the CPU only in tests of the packing itself).
    scratch:
        Device address of each ``scratch`` parameter's buffer (0 for null).
    """

    def __init__(self, entry: str, params: Iterable[KernelParam], device: torch.device,
                 scratch: Mapping[str, int]) -> None:
        self.entry = entry
        self.params = tuple(params)
        self.device = torch.device(device)
        names = [p.name for p in self.params]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise KernelBinaryError(f"kernel {entry}: parameter names must be unique, repeated: {dup}")
        self.slots = [_SLOT_TYPES[p.kind]() for p in self.params]
        self.arg_names = frozenset(p.name for p in self.params if p.kind != "scratch")
        for p, slot in zip(self.params, self.slots):
            if p.kind == "scratch":
                if p.name not in scratch:
                    raise KernelBinaryError(f"kernel {entry}: no buffer for scratch parameter {p.name}")
                slot.value = int(scratch[p.name]) or None
        self._bind = [(p.name, p.kind, s) for p, s in zip(self.params, self.slots) if p.kind != "scratch"]
        self._scratch_slots = {p.name: s for p, s in zip(self.params, self.slots) if p.kind == "scratch"}
        # cuLaunchKernel reads the value behind each pointer at launch time.
        self.array = (ctypes.c_void_p * max(1, len(self.slots)))(*[ctypes.addressof(s) for s in self.slots])

    def set_scratch(self, addresses: Mapping[str, int]) -> None:
        """Point scratch parameters at other buffers (a larger batch needs larger ones)."""
        for name, address in addresses.items():
            self._scratch_slots[name].value = int(address) or None

    def _fail(self, message: str) -> LaunchArgumentError:
        return LaunchArgumentError(f"kernel {self.entry}: {message}")

    def _check_names(self, args: Mapping[str, Any]) -> None:
        given = set(args)
        missing = sorted(self.arg_names - given)
        extra = sorted(given - self.arg_names)
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            scratch = sorted(n for n in extra if any(p.name == n and p.kind == "scratch" for p in self.params))
            unknown = sorted(set(extra) - set(scratch))
            if unknown:
                parts.append(f"unknown {unknown}")
            if scratch:
                parts.append(f"{scratch} are scratch buffers the launcher owns; do not pass them")
        raise self._fail("arguments do not match the parameters: " + "; ".join(parts)
                         + f" (expected {[p.name for p in self.params if p.kind != 'scratch']})")

    def pointer(self, name: str, value: Any) -> int:
        if not isinstance(value, torch.Tensor):
            raise self._fail(f"parameter {name} (ptr) needs a tensor, got {type(value).__name__}")
        if value.device != self.device:
            raise self._fail(f"tensor {name} is on {value.device}, the kernel runs on {self.device}")
        if not value.is_contiguous():
            raise self._fail(f"tensor {name} must be contiguous, got shape {tuple(value.shape)} strides "
                             f"{value.stride()}")
        ptr = value.data_ptr()
        if ptr % POINTER_ALIGNMENT:
            raise self._fail(f"tensor {name} must be {POINTER_ALIGNMENT}-byte aligned (an offset view?), "
                             f"address {ptr:#x}")
        return ptr

    def scalar(self, name: str, kind: str, value: Any) -> int | float:
        if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
            what = ("a tensor (pass a Python number: reading a device value would synchronise)"
                    if isinstance(value, torch.Tensor) else type(value).__name__)
            raise self._fail(f"parameter {name} ({kind}) needs a number, got {what}")
        if kind == "f32":
            return float(value)
        if not isinstance(value, numbers.Integral):
            raise self._fail(f"parameter {name} ({kind}) needs an integer, got {value!r}")
        lo, hi = _INT_RANGES[kind]
        if not lo <= int(value) <= hi:
            raise self._fail(f"parameter {name} ({kind}) = {int(value)} is out of range [{lo}, {hi}]")
        return int(value)

    def pack(self, args: Mapping[str, Any]) -> ctypes.Array:
        """Validate ``args`` and write them into the slots; returns the parameter array (reused)."""
        if not isinstance(args, Mapping):
            raise self._fail(f"arguments must be a mapping of parameter name to value, got {type(args).__name__}")
        if args.keys() != self.arg_names:
            self._check_names(args)
        # Convert everything first so a bad value leaves the slots untouched.
        values = [self.pointer(n, args[n]) if k == "ptr" else self.scalar(n, k, args[n]) for n, k, _ in self._bind]
        for (_, _, slot), v in zip(self._bind, values):
            slot.value = v
        return self.array


def parse_arch(arch: str) -> tuple[int, int, str]:
    """``"sm_90a"`` -> ``(9, 0, "a")``."""
    m = re.fullmatch(r"(?:sm|compute)_(\d+)(\d)([af]?)", arch.strip())
    if not m:
        raise KernelBinaryError(f"cannot read the target arch {arch!r} (expected e.g. sm_90 or sm_90a)")
    return int(m.group(1)), int(m.group(2)), m.group(3)


def check_arch(arch: str, binary_format: str, capability: tuple[int, int], device_name: str) -> None:
    """Raise :class:`KernelConfigError` if a binary for ``arch`` cannot run on a device of ``capability``.

    A cubin runs on its own major version with an equal or newer minor version; an arch-specific one
    (``sm_90a``) only on exactly that version; PTX on anything at least as new. A fatbin may hold several
    images, so only the driver can tell.
    """
    if binary_format == "fatbin":
        return
    major, minor, suffix = parse_arch(arch)
    dev = f"{device_name} (sm_{capability[0]}{capability[1]})"
    if binary_format == "ptx":
        ok = (major, minor) <= tuple(capability)
    elif suffix:
        ok = (major, minor) == tuple(capability)
    else:
        ok = major == capability[0] and minor <= capability[1]
    if not ok:
        raise KernelConfigError(f"the kernel was compiled for {arch} ({binary_format}) and cannot run on {dev}")


def check_launch_shape(entry: str, grid: tuple[int, ...], block: tuple[int, ...]) -> None:
    """Raise :class:`KernelConfigError` for launch dimensions no CUDA GPU accepts."""
    if len(grid) != 3 or len(block) != 3 or min(*grid, *block) < 1:
        raise KernelConfigError(f"kernel {entry}: grid {grid} and block {block} must be three positive sizes")
    if grid[0] > 2 ** 31 - 1 or grid[1] > 65535 or grid[2] > 65535:
        raise KernelConfigError(f"kernel {entry}: grid {grid} exceeds (2^31-1, 65535, 65535)")
    if block[0] > 1024 or block[1] > 1024 or block[2] > 64 or math.prod(block) > 1024:
        raise KernelConfigError(f"kernel {entry}: block {block} exceeds 1024 threads (z <= 64)")


class LoadedKernel:
    """A compiled kernel loaded on one CUDA device, ready to launch; see the module docstring.

    Attributes
    ----------
    compiled:
        The :class:`CompiledKernel` it was loaded from.
    device:
        The CUDA device it runs on.
    resources:
        What the driver reports for the loaded function: ``registers``, ``local_bytes`` (spills and stack),
        ``static_shared_bytes``, ``max_threads_per_block`` (given its registers).
    """

    def __init__(self, compiled: CompiledKernel, device: torch.device, module: int, function: int,
                 resources: dict[str, int], scratch: dict[str, torch.Tensor], drv: cu.CudaDriver) -> None:
        addresses = {p.name: scratch[p.name].data_ptr() if p.name in scratch else 0
                     for p in compiled.params if p.kind == "scratch"}
        self._packer = ParamPacker(compiled.entry, compiled.params, device, addresses)
        self.compiled = compiled
        self.device = device
        self.resources = resources
        self._function = function
        self._scratch = scratch  # keeps the buffers alive as long as the kernel
        self._driver = drv
        self._module: int | None = module
        self._grid, self._block = tuple(compiled.grid), tuple(compiled.block)
        self._shared = int(compiled.shared_bytes)
        self._lock = threading.Lock()
        self._batch_scalars = frozenset(n for n, _ in compiled.batch_scalars)
        # Scratch buffers by the batch they are sized for; all stay alive (a captured graph may use them).
        self._scratch_batch = compiled.batch
        self._retired: list[torch.Tensor] = []

    @classmethod
    def load(cls, compiled: CompiledKernel, device: torch.device | int | str | None = None) -> "LoadedKernel":
        """Load ``compiled`` on ``device`` (default: torch's current CUDA device).

        Raises
        ------
        CudaDriverError
            No CUDA driver or device here, or a driver call failed.
        KernelConfigError
            The device cannot run the kernel (arch, launch shape, shared memory, registers).
        KernelBinaryError
            The binary does not hold ``compiled.entry``, or its parameter list disagrees with ``compiled.params``.
        """
        if compiled.binary_format not in ("cubin", "fatbin", "ptx"):
            raise KernelBinaryError(f"kernel {compiled.entry}: unknown binary format {compiled.binary_format!r}")
        entry = compiled.entry
        grid, block = tuple(compiled.grid), tuple(compiled.block)
        check_launch_shape(entry, grid, block)
        if not torch.cuda.is_available():
            raise cu.CudaDriverError(f"kernel {entry}: CUDA is not available to torch here, so it cannot be "
                                     f"loaded (build the artifact anywhere, launch it on a GPU host)")
        torch.cuda.init()
        dev = _cuda_device(device)
        drv = cu.driver()
        drv.make_current(dev.index)
        name = drv.device_name(dev.index)
        check_arch(compiled.arch, compiled.binary_format, drv.capability(dev.index), name)
        image = compiled.binary
        if compiled.binary_format == "ptx" and not image.endswith(b"\0"):
            image += b"\0"
        module = drv.load_module(image)
        try:
            try:
                function = drv.get_function(module, entry)
            except cu.CudaDriverError as e:
                raise KernelBinaryError(f"kernel {entry}: no such function in the binary ({e})") from None
            resources = {
                "registers": drv.func_attribute(function, cu.FUNC_NUM_REGS),
                "local_bytes": drv.func_attribute(function, cu.FUNC_LOCAL_SIZE_BYTES),
                "static_shared_bytes": drv.func_attribute(function, cu.FUNC_SHARED_SIZE_BYTES),
                "max_threads_per_block": drv.func_attribute(function, cu.FUNC_MAX_THREADS_PER_BLOCK),
            }
            _check_resources(compiled, resources, drv.device_attribute(cu.DEV_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                                                                       dev.index), name)
            if resources["static_shared_bytes"] + compiled.shared_bytes > DEFAULT_SHARED_LIMIT:
                drv.set_func_attribute(function, cu.FUNC_MAX_DYNAMIC_SHARED_SIZE_BYTES, compiled.shared_bytes)
            _check_param_sizes(entry, compiled.params, drv.param_sizes(function))
            scratch = {p.name: torch.zeros(p.nbytes, dtype=torch.uint8, device=dev)
                       for p in compiled.params if p.kind == "scratch" and p.nbytes > 0}
            return cls(compiled, dev, module, function, resources, scratch, drv)
        except BaseException:
            drv.unload_module(module)
            raise

    def _programs(self, batch: int) -> int:
        g = self.compiled.launch_grid(batch)
        return g[0] * g[1] * g[2]

    def reserve(self, batch: int) -> None:
        """Size the scratch buffers for launches of up to ``batch`` (do it before capturing a CUDA graph at a
        batch larger than any launched so far)."""
        self._check_batch(batch)
        with self._lock:
            self._grow_scratch(batch)

    def _check_batch(self, batch: Any) -> int:
        if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
            raise LaunchArgumentError(f"kernel {self.compiled.entry}: batch must be a positive integer, got "
                                      f"{batch!r}")
        if batch != self.compiled.batch and not self.compiled.batch_generic:
            raise LaunchArgumentError(f"kernel {self.compiled.entry} was built for batch {self.compiled.batch} "
                                      f"only (an artifact from before batch-generic kernels); got batch {batch}")
        g = self.compiled.launch_grid(int(batch))
        check_launch_shape(self.compiled.entry, g, self._block)
        return int(batch)

    def _grow_scratch(self, batch: int) -> None:
        """Make every scratch buffer large enough for ``batch`` (caller holds the lock)."""
        if not self._scratch or self._programs(batch) <= self._programs(self._scratch_batch):
            return
        if torch.cuda.is_current_stream_capturing():
            raise LaunchArgumentError(
                f"kernel {self.compiled.entry}: batch {batch} needs larger scratch buffers than any launch so far; "
                f"launch it once at this batch (or call reserve({batch})) before capturing a CUDA graph")
        scale_num, scale_den = self._programs(batch), self._programs(self.compiled.batch)
        new = {}
        for p in self.compiled.params:
            if p.kind == "scratch" and p.name in self._scratch:
                size = -(-p.nbytes * scale_num // scale_den)
                new[p.name] = torch.zeros(size, dtype=torch.uint8, device=self.device)
        self._retired.extend(self._scratch.values())
        self._scratch = new
        self._scratch_batch = batch
        self._packer.set_scratch({n: t.data_ptr() for n, t in new.items()})

    def launch(self, args: Mapping[str, Any], stream: Any = None, batch: int | None = None) -> None:
        """Launch once with ``args`` bound by parameter name, on ``stream`` (default: torch's current stream),
        for ``batch`` (default: the batch it was built at; see the module docstring).

        ``stream`` may be a ``torch.cuda.Stream`` or a raw ``CUstream`` handle (int). Nothing is allocated and
        nothing synchronises, so launches can be captured in a CUDA graph.
        """
        if self._module is None:
            raise KernelBinaryError(f"kernel {self.compiled.entry} was closed")
        batch = self.compiled.batch if batch is None else self._check_batch(batch)
        grid = self._grid if batch == self.compiled.batch else self.compiled.launch_grid(batch)
        if self._batch_scalars:
            given = self._batch_scalars & set(args)
            if given:
                raise LaunchArgumentError(f"kernel {self.compiled.entry}: {sorted(given)} follow the batch; do not "
                                          f"pass them")
            args = {**args, **self.compiled.batch_scalar_values(batch)}
        if stream is None:
            handle = torch.cuda.current_stream(self.device).cuda_stream
        elif isinstance(stream, torch.cuda.Stream):
            handle = stream.cuda_stream
        elif isinstance(stream, int):
            handle = stream
        else:
            raise LaunchArgumentError(f"stream must be a torch.cuda.Stream or a CUstream handle, got "
                                      f"{type(stream).__name__}")
        drv = self._driver
        with self._lock:
            self._grow_scratch(batch)
            params = self._packer.pack(args)
            drv.make_current(self.device.index)
            drv.launch(self._function, grid, self._block, self._shared, handle, params,
                       detail=f"kernel {self.compiled.entry}")

    __call__ = launch

    @property
    def arg_names(self) -> frozenset[str]:
        """Names ``launch`` expects (every parameter but the scratch buffers and the batch-derived scalars)."""
        return self._packer.arg_names - self._batch_scalars

    def close(self) -> None:
        """Unload the module (the kernel cannot be launched afterwards)."""
        module = getattr(self, "_module", None)
        if module is not None:
            self._module = None
            self._driver.unload_module(module)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the driver may already be gone
            pass

    def __repr__(self) -> str:
        c = self.compiled
        return (f"<LoadedKernel {c.entry} ({c.backend}, {c.arch}) on {self.device}: grid {c.grid}, block "
                f"{c.block}, {c.shared_bytes} B dynamic shared, {self.resources.get('registers')} registers>")


def _cuda_device(device: torch.device | int | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        raise LaunchArgumentError(f"compiled kernels run on CUDA devices, got {dev}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise LaunchArgumentError(f"no CUDA device {dev.index}: this machine has {torch.cuda.device_count()}")
    return dev


def _check_resources(compiled: CompiledKernel, res: dict[str, int], smem_optin: int, device_name: str) -> None:
    threads = math.prod(compiled.block)
    if threads > res["max_threads_per_block"]:
        raise KernelConfigError(f"kernel {compiled.entry}: {threads} threads per block but with "
                                f"{res['registers']} registers per thread {device_name} allows "
                                f"{res['max_threads_per_block']}")
    total = res["static_shared_bytes"] + compiled.shared_bytes
    if total > smem_optin:
        raise KernelConfigError(f"kernel {compiled.entry}: needs {total} bytes of shared memory "
                                f"({res['static_shared_bytes']} static + {compiled.shared_bytes} dynamic), "
                                f"{device_name} allows {smem_optin} per block")


def _check_param_sizes(entry: str, params: tuple[KernelParam, ...], sizes: list[int] | None) -> None:
    """Compare the record's parameter kinds with the sizes the driver reads from the binary (when it can)."""
    if sizes is None:
        return
    want = [PARAM_SIZES[p.kind] for p in params]
    if sizes != want:
        listed = ", ".join(f"{p.name}:{p.kind}" for p in params)
        raise KernelBinaryError(f"kernel {entry}: the binary's parameters have sizes {sizes} bytes but the "
                                f"record lists [{listed}] = {want} bytes")
