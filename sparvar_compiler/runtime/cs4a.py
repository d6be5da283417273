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
from typing import Any, Callable

import numpy as np
import torch

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
                 fallback: bool, read: Callable[[str], bytes] | None = None):
        """``section`` and ``plan`` come from a manifest checked by :func:`~sparvar_compiler.emit.manifest.
        check_manifest`; ``read(rel)`` returns a module file's checked bytes (default: the file under
        ``directory``, as listed)."""
        read = read or (lambda rel: (directory / rel).read_bytes())
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
            self._tables[scale] = _tables(entry, plan, section, read(entry["tables_file"]))
            self._specs[scale] = entry["spec"]
            if not fallback:
                self._kernels[scale] = _load(read, entry, device)
        self._stats = None if fallback else _load(read, section["stats"], device)
        self._topk = None if fallback or "topk" not in section else _load(read, section["topk"], device)
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


def _load(read: Callable[[str], bytes], entry: dict[str, Any], device: torch.device):
    from .cubin import LoadedKernel
    from .module import compiled_kernel

    return LoadedKernel.load(compiled_kernel(f"cs4a kernel {entry['name']}", entry["meta"], read(entry["binary"])),
                             device)


def _tables(entry: dict[str, Any], plan: dict[str, Any], section: dict[str, Any], data: bytes):
    """The static tables of one CS4A scale from its npz ``data``: every array of the shape and dtype its scalars
    and the plan give, every index within what it indexes (the kernels read each entry, padding included)."""
    from .module import read_npz

    t = entry["tables"]
    scale, what = t["scale"], f"cs4a tables of scale {t['scale']} ({entry['tables_file']})"
    dec = plan["scales"][section["decision_scale"]]
    i32, i64 = np.dtype(np.int32), np.dtype(np.int64)
    if t["kind"] == "token":
        rows, dec_rows, width_of = -(-t["q_len"] // t["group_size"]), -(-dec["tokens"] // t["group_size"]), t["kv_len"]
        shapes = {"decision_group": (i64, (rows,)), "static_keys": (i32, None), "static_len": (i32, (rows,))}
        if section["mapping"] != "identity" and scale != section["decision_scale"]:
            shapes["key_map"] = (i32, (t["decision_kv_len"],))
        static, decision = "static_keys", "decision_group"
    else:
        rows, dec_rows = -(-t["q_len"] // t["block"]), -(-dec["tokens"] // t["block"])
        width_of = -(-t["kv_len"] // t["block"])
        shapes = {"decision_row": (i64, (rows,)), "static_blocks": (i64, None), "static_len": (i32, (rows,))}
        static, decision = "static_blocks", "decision_row"

    def check(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        if name not in shapes:
            raise ModuleError(f"{what}: array {name} is not one the manifest's tables have")
        want_dtype, want_shape = shapes[name]
        ok = shape == want_shape if want_shape is not None else (len(shape) == 2 and shape[0] == rows
                                                                  and shape[1] <= width_of)
        if dtype != want_dtype or not ok:
            raise ModuleError(f"{what}: array {name} is {dtype} {shape}, the manifest needs {want_dtype} "
                              f"{want_shape or f'({rows}, at most {width_of})'}")

    arrays = read_npz(data, what, check)
    missing = sorted(set(shapes) - set(arrays))
    if missing:
        raise ModuleError(f"{what}: has no array {missing[0]}")
    within = [(decision, dec_rows), (static, width_of)] + ([("key_map", t["kv_len"])] if "key_map" in arrays else [])
    for name, bound in within:
        a = arrays[name]
        if a.size and (int(a.min()) < 0 or int(a.max()) >= bound):
            raise ModuleError(f"{what}: {name} holds an index outside 0..{bound - 1}")
    lens = arrays["static_len"]
    if lens.size and (int(lens.min()) < 0 or int(lens.max()) > arrays[static].shape[1]):
        raise ModuleError(f"{what}: static_len holds a length outside 0..{arrays[static].shape[1]}")
    try:
        tables = tables_from_data(t, {n: a.copy() for n, a in arrays.items()})
    except (ValueError, TypeError) as e:
        raise ModuleError(f"{what}: {e}") from None
    if t["kind"] == "block" and tables.capacity != entry["spec"]["capacity"]:
        raise ModuleError(f"{what}: capacity {tables.capacity} is not its kernel's {entry['spec']['capacity']}")
    if t["kind"] == "token" and t["capacity"] < t["topk"] + arrays[static].shape[1]:
        raise ModuleError(f"{what}: capacity {t['capacity']} cannot hold top-{t['topk']} and "
                          f"{arrays[static].shape[1]} static keys")
    return tables
