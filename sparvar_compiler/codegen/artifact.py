"""A compiled kernel for a named GPU, independent of the compiler that made it.

Both backends (Triton and TVM) produce a :class:`CompiledKernel`: the binary (cubin) plus everything a launcher
needs - entry name, the ordered parameter list, grid, block and dynamic shared memory - and the compiler's
resource report. ``sparvar_compiler.runtime.cubin`` launches it through the CUDA driver API alone, so a GPU
host needs neither Triton's nor TVM's compiler.

Parameters are bound by name at launch: ``ptr`` takes a tensor's device pointer, ``i32``/``i64``/``f32`` a
scalar, ``scratch`` a device buffer of ``nbytes`` that the launcher allocates (null when 0).

The batch is a launch size, not a compile-time constant: ``batch_grid = (axis, extent)`` says that grid axis
``axis`` is ``batch * extent`` (``grid`` itself is for ``batch``, the batch it was built and tuned at), and
``batch_scalars`` names integer parameters that are ``batch * value`` (a persistent kernel's work-item count).
A scratch buffer scales with the number of programs. A kernel with neither runs at ``batch`` only.

A record read back (:meth:`CompiledKernel.from_meta`, e.g. from a module's manifest) is checked by
:func:`check_meta` first: every field present with its type and within CUDA's launch limits, or a
:class:`KernelMetaError` naming the field.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import SparvarError
from ..limits import MAX_BATCH, MAX_KERNEL_GRID, MAX_MODULE_FILE_BYTES, MAX_THREADS_PER_BLOCK

PARAM_KINDS = ("ptr", "i32", "i64", "f32", "scratch")
BACKENDS = ("triton", "tvm")
BINARY_FORMATS = ("cubin", "fatbin", "ptx")
MAX_PARAMS = 256                   # kernel parameters (ours take at most a dozen)
MAX_BLOCK = (1024, 1024, 64)       # CUDA's block dimensions (and MAX_THREADS_PER_BLOCK in all)
MAX_SHARED_BYTES = 1 << 20         # dynamic shared memory of one block (the largest GPU offers 228 KiB)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
_ARCH = re.compile(r"sm_(\d{1,3})(\d)([af]?)")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class KernelMetaError(SparvarError):
    """A kernel record (:meth:`CompiledKernel.meta`) with a missing field, or one of the wrong type or range."""


@dataclass(frozen=True)
class KernelParam:
    name: str
    kind: str
    nbytes: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PARAM_KINDS:
            raise ValueError(f"parameter {self.name}: kind must be one of {PARAM_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class CompiledKernel:
    """A kernel binary for one GPU arch and one fixed-shape workload.

    Attributes
    ----------
    backend, arch:
        ``"triton"``/``"tvm"`` and the target (``"sm_90"``, ``"sm_90a"``).
    entry:
        Symbol of the kernel function in the binary.
    binary, binary_format:
        The bytes and their kind (``"cubin"``, ``"fatbin"`` or ``"ptx"``).
    params:
        Kernel parameters in the binary's order.
    grid, block:
        Launch dimensions (the workload's shapes are fixed, so these are too).
    shared_bytes:
        Dynamic shared memory per block (a launcher raises the function's limit above 48 KB).
    batch, batch_grid, batch_scalars:
        The batch ``grid`` is for, and how the launch scales with another batch (see the module docstring).
    resources:
        The compiler's report: ``registers``, ``spill_bytes``, ``static_shared_bytes``, ``local_bytes``.
    spec, config:
        ``KernelSpec.to_dict()`` and ``KernelConfig.to_dict()`` of what was compiled.
    """

    backend: str
    arch: str
    entry: str
    binary: bytes = field(repr=False)
    binary_format: str
    params: tuple[KernelParam, ...]
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    resources: dict[str, int]
    spec: dict[str, Any]
    config: dict[str, Any]
    batch: int = 1
    batch_grid: tuple[int, int] | None = None
    batch_scalars: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.batch_grid is not None:
            axis, extent = self.batch_grid
            if axis not in (0, 1, 2) or self.grid[axis] != self.batch * extent:
                raise ValueError(f"kernel {self.entry}: batch_grid {self.batch_grid} does not match grid "
                                 f"{self.grid} at batch {self.batch}")

    @property
    def batch_generic(self) -> bool:
        """Whether the kernel runs any batch (its launch scales with the batch)."""
        return self.batch_grid is not None or bool(self.batch_scalars)

    def launch_grid(self, batch: int) -> tuple[int, int, int]:
        """The grid for ``batch``."""
        if batch == self.batch:
            return tuple(self.grid)  # type: ignore[return-value]
        if not self.batch_generic:
            raise ValueError(f"kernel {self.entry} was built for batch {self.batch} only, not {batch}")
        g = list(self.grid)
        if self.batch_grid is not None:
            g[self.batch_grid[0]] = batch * self.batch_grid[1]
        return tuple(g)  # type: ignore[return-value]

    def batch_scalar_values(self, batch: int) -> dict[str, int]:
        """The ``batch_scalars`` parameters' values for ``batch``."""
        return {name: batch * per for name, per in self.batch_scalars}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.binary).hexdigest()

    def meta(self) -> dict[str, Any]:
        """JSON-ready description without the binary (the manifest stores the binary as a separate file)."""
        return {
            "backend": self.backend, "arch": self.arch, "entry": self.entry, "binary_format": self.binary_format,
            "params": [{"name": p.name, "kind": p.kind, "nbytes": p.nbytes} for p in self.params],
            "grid": list(self.grid), "block": list(self.block), "shared_bytes": self.shared_bytes,
            "resources": dict(self.resources), "spec": self.spec, "config": self.config, "sha256": self.sha256,
            "batch": self.batch, "batch_grid": None if self.batch_grid is None else list(self.batch_grid),
            "batch_scalars": {n: v for n, v in self.batch_scalars},
        }

    def to_json_dict(self) -> dict[str, Any]:
        return {**self.meta(), "binary_b64": base64.b64encode(self.binary).decode()}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], binary: bytes) -> "CompiledKernel":
        """The kernel of record ``meta`` (:meth:`meta`'s form) and its ``binary``.

        Raises
        ------
        KernelMetaError
            A field missing, mistyped or out of range (see :func:`check_meta`), or a binary whose sha256 is not
            the recorded one.
        """
        check_meta(meta)
        k = cls(meta["backend"], meta["arch"], meta["entry"], binary, meta["binary_format"],
                tuple(KernelParam(p["name"], p["kind"], p.get("nbytes", 0)) for p in meta["params"]),
                tuple(meta["grid"]), tuple(meta["block"]), int(meta["shared_bytes"]), dict(meta["resources"]),
                dict(meta["spec"]), dict(meta["config"]), int(meta.get("batch", meta["spec"].get("batch", 1))),
                None if meta.get("batch_grid") is None else tuple(int(x) for x in meta["batch_grid"]),
                tuple(sorted((str(n), int(v)) for n, v in dict(meta.get("batch_scalars") or {}).items())))
        if "sha256" in meta and meta["sha256"] != k.sha256:
            raise KernelMetaError(f"kernel {k.entry}: binary sha256 {k.sha256} does not match the recorded "
                                  f"{meta['sha256']}")
        return k

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "CompiledKernel":
        if not isinstance(d, dict) or not isinstance(d.get("binary_b64"), str):
            raise KernelMetaError("a compiled kernel record needs its binary as base64 text in 'binary_b64'")
        if len(d["binary_b64"]) > MAX_MODULE_FILE_BYTES * 4 // 3 + 4:
            raise KernelMetaError(f"binary_b64: more than {MAX_MODULE_FILE_BYTES} bytes")
        try:
            binary = base64.b64decode(d["binary_b64"], validate=True)
        except ValueError as e:
            raise KernelMetaError(f"binary_b64: not base64 ({e})") from None
        return cls.from_meta(d, binary)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KernelMetaError(f"{where}: must be an integer, got {_describe(value)}")
    if not lo <= value <= hi:
        raise KernelMetaError(f"{where}: {value} is out of range {lo}..{hi}")
    return value


def _dims(value: Any, where: str, limits: tuple[int, int, int]) -> tuple[int, int, int]:
    if not isinstance(value, list) or len(value) != 3:
        raise KernelMetaError(f"{where}: must be a list of three sizes, got {_describe(value)}")
    return tuple(_int(v, f"{where}[{i}]", 1, limits[i]) for i, v in enumerate(value))  # type: ignore[return-value]


def check_meta(meta: Any, where: str = "meta") -> None:
    """Check a kernel record of :meth:`CompiledKernel.meta`'s form, field by field, before anything reads it.

    Every field :meth:`CompiledKernel.from_meta` uses must be present with its type: ``backend`` a name,
    ``binary_format`` known, ``arch`` an ``sm_XY[a|f]`` name, ``entry`` and parameter names identifiers (unique),
    parameter kinds of :data:`PARAM_KINDS` (``nbytes`` only for scratch), ``grid``/``block`` within CUDA's
    launch limits, ``shared_bytes`` bounded, ``resources`` integer counts, ``spec``/``config`` objects, and -
    when present (records from before batch-generic kernels lack them) - ``sha256`` a hex digest, ``batch`` in
    range, ``batch_grid`` an ``(axis, extent)`` with ``grid[axis] == batch * extent``, ``batch_scalars`` integer
    parameters.

    Raises
    ------
    KernelMetaError
        Naming the field (``meta.grid[1]: 0 is out of range 1..65535``).
    """
    if not isinstance(meta, dict):
        raise KernelMetaError(f"{where}: must be an object, got {_describe(meta)}")
    for key in ("backend", "arch", "entry", "binary_format", "params", "grid", "block", "shared_bytes",
                "resources", "spec", "config"):
        if key not in meta:
            raise KernelMetaError(f"{where}: has no '{key}'")
    if not isinstance(meta["backend"], str) or not _IDENTIFIER.fullmatch(meta["backend"]):
        raise KernelMetaError(f"{where}.backend: must be a backend name, got {_describe(meta['backend'])}")
    if not isinstance(meta["arch"], str) or not _ARCH.fullmatch(meta["arch"]):
        raise KernelMetaError(f"{where}.arch: must be a CUDA arch such as sm_90 or sm_90a, got "
                              f"{_describe(meta['arch'])}")
    if not isinstance(meta["entry"], str) or not _IDENTIFIER.fullmatch(meta["entry"]):
        raise KernelMetaError(f"{where}.entry: must be a kernel symbol name, got {_describe(meta['entry'])}")
    if meta["binary_format"] not in BINARY_FORMATS:
        raise KernelMetaError(f"{where}.binary_format: must be one of {', '.join(BINARY_FORMATS)}, got "
                              f"{_describe(meta['binary_format'])}")
    params = meta["params"]
    if not isinstance(params, list) or len(params) > MAX_PARAMS:
        raise KernelMetaError(f"{where}.params: must be a list of at most {MAX_PARAMS} parameters")
    kinds: dict[str, str] = {}
    for i, p in enumerate(params):
        at = f"{where}.params[{i}]"
        if not isinstance(p, dict) or not {"name", "kind"} <= set(p) or not set(p) <= {"name", "kind", "nbytes"}:
            raise KernelMetaError(f"{at}: must be an object of name, kind and nbytes, got {_describe(p)}")
        if not isinstance(p["name"], str) or not _IDENTIFIER.fullmatch(p["name"]):
            raise KernelMetaError(f"{at}.name: must be an identifier, got {_describe(p['name'])}")
        if p["name"] in kinds:
            raise KernelMetaError(f"{at}.name: {p['name']} is listed twice")
        if p["kind"] not in PARAM_KINDS:
            raise KernelMetaError(f"{at}.kind: must be one of {', '.join(PARAM_KINDS)}, got {_describe(p['kind'])}")
        nbytes = _int(p.get("nbytes", 0), f"{at}.nbytes", 0, MAX_MODULE_FILE_BYTES)
        if nbytes and p["kind"] != "scratch":
            raise KernelMetaError(f"{at}.nbytes: only a scratch parameter has a size, {p['name']} is {p['kind']}")
        kinds[p["name"]] = p["kind"]
    grid = _dims(meta["grid"], f"{where}.grid", MAX_KERNEL_GRID)
    block = _dims(meta["block"], f"{where}.block", MAX_BLOCK)
    if math.prod(block) > MAX_THREADS_PER_BLOCK:
        raise KernelMetaError(f"{where}.block: {list(block)} is {math.prod(block)} threads, more than "
                              f"{MAX_THREADS_PER_BLOCK}")
    _int(meta["shared_bytes"], f"{where}.shared_bytes", 0, MAX_SHARED_BYTES)
    resources = meta["resources"]
    if not isinstance(resources, dict) or len(resources) > 64:
        raise KernelMetaError(f"{where}.resources: must be an object of counts")
    for name, value in resources.items():
        _int(value, f"{where}.resources.{name}", 0, 2 ** 31 - 1)
    for key in ("spec", "config"):
        if not isinstance(meta[key], dict):
            raise KernelMetaError(f"{where}.{key}: must be an object, got {_describe(meta[key])}")
    if "sha256" in meta and (not isinstance(meta["sha256"], str) or not _SHA256.fullmatch(meta["sha256"])):
        raise KernelMetaError(f"{where}.sha256: must be 64 lower-case hex digits, got {_describe(meta['sha256'])}")
    batch = _int(meta.get("batch", meta["spec"].get("batch", 1)), f"{where}.batch", 1, MAX_BATCH)
    batch_grid = meta.get("batch_grid")
    if batch_grid is not None:
        if not isinstance(batch_grid, list) or len(batch_grid) != 2:
            raise KernelMetaError(f"{where}.batch_grid: must be null or [axis, extent], got {_describe(batch_grid)}")
        axis = _int(batch_grid[0], f"{where}.batch_grid[0]", 0, 2)
        extent = _int(batch_grid[1], f"{where}.batch_grid[1]", 1, MAX_KERNEL_GRID[axis])
        if grid[axis] != batch * extent:
            raise KernelMetaError(f"{where}.batch_grid: {batch_grid} does not match grid {list(grid)} at batch "
                                  f"{batch}")
    scalars = meta.get("batch_scalars")
    if scalars is not None:
        if not isinstance(scalars, dict) or len(scalars) > len(kinds):
            raise KernelMetaError(f"{where}.batch_scalars: must map integer parameters to a count per batch item")
        for name, value in scalars.items():
            if kinds.get(name) not in ("i32", "i64"):
                raise KernelMetaError(f"{where}.batch_scalars.{name}: not an integer parameter of the kernel")
            _int(value, f"{where}.batch_scalars.{name}", 1, 2 ** 31 - 1)
