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
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Any

PARAM_KINDS = ("ptr", "i32", "i64", "f32", "scratch")


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
        k = cls(meta["backend"], meta["arch"], meta["entry"], binary, meta["binary_format"],
                tuple(KernelParam(p["name"], p["kind"], p.get("nbytes", 0)) for p in meta["params"]),
                tuple(meta["grid"]), tuple(meta["block"]), int(meta["shared_bytes"]), dict(meta["resources"]),
                dict(meta["spec"]), dict(meta["config"]), int(meta.get("batch", meta["spec"].get("batch", 1))),
                None if meta.get("batch_grid") is None else tuple(int(x) for x in meta["batch_grid"]),
                tuple(sorted((str(n), int(v)) for n, v in dict(meta.get("batch_scalars") or {}).items())))
        if "sha256" in meta and meta["sha256"] != k.sha256:
            raise ValueError(f"kernel {k.entry}: binary sha256 {k.sha256} does not match the recorded "
                             f"{meta['sha256']}")
        return k

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "CompiledKernel":
        return cls.from_meta(d, base64.b64decode(d["binary_b64"]))
