"""Stage 6: load an emitted runtime module and run its kernels (CUDA driver API only; no compiler).

    import sparvar_compiler.runtime as rt
    module = rt.load("out/infinity-8b-h100")
    o = module.attention(q, k, v, scale_index, layer_index)

``load`` also opens a module set (one member per aspect ratio, :class:`ModuleSet`). Every loaded module is
registered with the ``torch.ops.sparvar.attention`` operator (:mod:`.op`), which ``torch.compile`` traces as
one opaque call. Loading needs torch, numpy and pyyaml only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .module import SparvarModule
from .moduleset import ModuleSet


def load(directory: str | Path, device: str | torch.device | None = None) -> SparvarModule | ModuleSet:
    """Load an emitted module, or a module set (a directory with ``moduleset.json``): checks every file's hash
    and the target GPU, and loads the kernels (nothing is compiled).

    Raises
    ------
    ModuleError
        Missing or modified files, a manifest for another GPU, or a malformed module.
    """
    from ..emit.manifest import SET_MANIFEST

    if (Path(directory) / SET_MANIFEST).is_file():
        return ModuleSet(directory, device)
    return SparvarModule(directory, device)


__all__ = ["ModuleSet", "SparvarModule", "load"]
