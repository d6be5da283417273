"""CS4A at run time: what a module does for the layers below the bound layer.

At the decision scale S (dispatch op ``cs4a_decision``) a layer runs dense attention with its log-sum-exp
(cuDNN, else FlashAttention), the statistics kernel (softmax column mass per query group), the selection (the
top-k kernel for tokens, torch ops for D-CSLA) and, with the residual on, the sparse attention of S itself to
keep ``O_dense - O_sparse``. The selection and residual are kept per layer. At a later scale (op ``cs4a``) the
layer fills its fixed-shape tables from that selection and runs the dynamic kernel, then adds the upsampled
residual.

Nothing here synchronises with the host or allocates a shape that depends on data, so a whole image stays
capturable in one CUDA graph. Calls must come in generation order: a layer's decision-scale call before its
later-scale calls (a later call without one raises).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..codegen.artifact import CompiledKernel
from ..codegen.spec import KernelInputError
from ..cs4a.select import (block_mass, dcsla_select, fill_tables, group_mass, kernel_tables_mask,
                           tables_from_data, topk_keys, upsample_add)
from ..emit.manifest import ModuleError


def dense_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention and its natural-log log-sum-exp ``[B, H, Nq]`` (float32): cuDNN, else FlashAttention on
    the GPU; float32 math on the CPU."""
    B, H, N, _ = q.shape
    if q.device.type == "cuda":
        key = (tuple(q.shape), k.shape[2], q.dtype, q.device)
        known = _LSE_BACKEND.get(key)
        if known is not None:  # no trial and error once a shape has a backend (it may be inside a graph capture)
            out, lse = known(q, k, v, scale)
            return out, lse.reshape(B, H, N).float().contiguous()
        last: Exception | None = None
        for fn in (_cudnn, _flash):
            try:
                out, lse = fn(q, k, v, scale)
            except RuntimeError as e:  # this backend refuses the shape or dtype: try the next one
                last = e
                continue
            _LSE_BACKEND[key] = fn
            return out, lse.reshape(B, H, N).float().contiguous()
        raise RuntimeError(f"no SDPA backend returned a log-sum-exp: {last}")
    s = q.float() @ k.float().transpose(-1, -2) * scale
    lse = torch.logsumexp(s, dim=-1)
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype), lse.contiguous()


def _cudnn(q, k, v, scale):
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    return r[0], r[1]


def _flash(q, k, v, scale):
    r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return r[0], r[1]


_LSE_BACKEND: dict[tuple, object] = {}


class CS4ARuntime:
    """The CS4A state and kernels of one loaded module (see the module docstring)."""

    def __init__(self, section: dict[str, Any], plan: dict[str, Any], directory: Path, device: torch.device,
                 fallback: bool, files=None):
        files = files or (lambda rel: directory / rel)  # a module file's path (a set member's may be shared)
        self.mode = section["mode"]
        self.residual = bool(section["residual"])
        self.decision_scale = int(section["decision_scale"])
        self.coverage = float(section["coverage"])
        self.min_blocks = int(section["min_blocks"])
        self.group = int(section["group"])
        self.device, self.fallback = device, fallback
        self._grid = {s["index"]: (s["h"], s["w"]) for s in plan["scales"]}
        self._tables: dict[int, Any] = {}
        self._kernels: dict[int, Any] = {}
        self._specs: dict[int, dict] = {}
        for key, entry in section["scales"].items():
            scale = int(key)
            with np.load(files(entry["tables_file"]), allow_pickle=False) as z:
                arrays = {n: z[n] for n in z.files}
            try:
                self._tables[scale] = tables_from_data(entry["tables"], arrays)
            except (ValueError, TypeError) as e:
                raise ModuleError(f"cs4a tables of scale {scale}: {e}") from None
            self._specs[scale] = entry["spec"]
            if not fallback:
                self._kernels[scale] = _load(files, entry, device)
        self._stats = None if fallback else _load(files, section["stats"], device)
        self._topk = None if fallback or "topk" not in section else _load(files, section["topk"], device)
        dec = self._tables.get(self.decision_scale)
        if self.mode == "token":
            self.topk = int(next(iter(self._tables.values())).topk)
        else:
            self.select_capacity = int(next(iter(self._tables.values())).select_capacity)
        if self.residual and dec is None:
            raise ModuleError("cs4a residual is on but the module has no decision-scale kernel")
        self._selection: dict[int, Any] = {}
        self._residual: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------ decision
    def statistics(self, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
        """float32 ``[B, H, groups, kv_len]`` softmax column mass of the decision scale."""
        if self.fallback:
            return group_mass(q, k, lse, scale, self.group)
        B, H = q.shape[:2]
        groups = -(-q.shape[2] // self.group)
        mass = torch.empty(B, H, groups, k.shape[2], dtype=torch.float32, device=q.device)
        self._stats.launch({"q": q, "k": k, "lse": lse, "mass": mass, "scale": scale}, batch=B)
        return mass

    def select(self, mass: torch.Tensor):
        """The decision scale's selection: top-k key indices, or D-CSLA ``(blocks, count)``."""
        if self.mode == "token":
            if self._topk is None:
                return topk_keys(mass, self.topk)
            out = torch.empty(*mass.shape[:-1], self.topk, dtype=torch.int32, device=mass.device)
            self._topk.launch({"mass": mass, "out": out}, batch=mass.shape[0])
            return out
        dec_block = self.group
        return dcsla_select(block_mass(mass, dec_block), self.coverage, self.min_blocks, self.select_capacity)

    def decision(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float,
                 out: torch.Tensor | None) -> torch.Tensor:
        """Dense attention of the decision scale for ``layer``, recording its CS4A selection (and residual)."""
        dense, lse = dense_with_lse(q, k, v, scale)
        out = dense if out is None else out.copy_(dense)
        sel = self.select(self.statistics(q, k, lse, scale))
        self._selection[layer] = sel
        if self.residual:
            self._residual[layer] = out - self.sparse(q, k, v, self.decision_scale, sel, scale, None)
        return out

    # ------------------------------------------------------------------------------------------ later scales
    def sparse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_index: int, sel: Any, scale: float,
               out: torch.Tensor | None) -> torch.Tensor:
        """The dynamic kernel of ``scale_index`` over the tables filled from ``sel``."""
        t = self._tables[scale_index]
        filled = fill_tables(t, sel, reuse=not self.fallback)
        if self.fallback:
            from .module import masked_attention

            res = masked_attention(q, k, v, kernel_tables_mask(t, filled), scale)
            return res if out is None else out.copy_(res)
        out = torch.empty_like(q) if out is None else out
        self._kernels[scale_index].launch({"q": q, "k": k, "v": v, "out": out, "scale": scale, **filled},
                                          batch=q.shape[0])
        return out

    def later(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_index: int, layer: int,
              scale: float, out: torch.Tensor | None) -> torch.Tensor:
        """CS4A attention of a later scale for ``layer``, from that layer's decision-scale selection."""
        sel = self._selection.get(layer)
        if sel is None:
            raise KernelInputError(f"CS4A at scale {scale_index} layer {layer} needs that layer's decision-scale "
                                   f"call (scale {self.decision_scale}) first, in the same image")
        out = self.sparse(q, k, v, scale_index, sel, scale, out)
        if self.residual:
            upsample_add(out, self._residual[layer], self._grid[self.decision_scale], self._grid[scale_index])
        return out

    def reset(self) -> None:
        """Forget every layer's selection and residual (the next image starts from its decision scale)."""
        self._selection.clear()
        self._residual.clear()


def _load(files, entry: dict[str, Any], device: torch.device):
    from .cubin import LoadedKernel

    compiled = CompiledKernel.from_meta(entry["meta"], files(entry["binary"]).read_bytes())
    return LoadedKernel.load(compiled, device)
