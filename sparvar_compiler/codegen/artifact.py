"""A compiled kernel for a named GPU, independent of the compiler that made it.

Both backends (Triton and TVM) produce a :class:`CompiledKernel`: the binary (cubin) plus everything a launcher
needs - entry name, the ordered parameter list, grid, block and dynamic shared memory - and the compiler's
resource report. ``sparvar_compiler.runtime.cubin`` launches it through the CUDA driver API alone, so a GPU
host needs neither Triton's nor TVM's compiler.

Parameters are bound by name at launch: ``ptr`` takes a tensor's device pointer, ``i32``/``i64``/``f32`` a
scalar, ``scratch`` a device buffer of ``nbytes`` that the launcher allocates (null when 0).
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
        }

    def to_json_dict(self) -> dict[str, Any]:
        return {**self.meta(), "binary_b64": base64.b64encode(self.binary).decode()}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], binary: bytes) -> "CompiledKernel":
        k = cls(meta["backend"], meta["arch"], meta["entry"], binary, meta["binary_format"],
                tuple(KernelParam(p["name"], p["kind"], p.get("nbytes", 0)) for p in meta["params"]),
                tuple(meta["grid"]), tuple(meta["block"]), int(meta["shared_bytes"]), dict(meta["resources"]),
                dict(meta["spec"]), dict(meta["config"]))
        if "sha256" in meta and meta["sha256"] != k.sha256:
            raise ValueError(f"kernel {k.entry}: binary sha256 {k.sha256} does not match the recorded "
                             f"{meta['sha256']}")
        return k

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "CompiledKernel":
        return cls.from_meta(d, base64.b64decode(d["binary_b64"]))
