"""The runtime side of an emitted module: load it, then call ``attention`` in place of dense self-attention.

Loading needs torch and the CUDA driver only: the module's cubins are loaded through the driver API, its tables
are npz arrays; nothing is compiled. On a machine without CUDA the module loads in CPU fallback mode, where
every planned sparse call runs reference attention over the same layouts (for tests and CI).

Calls are CUDA-graph capturable: shapes are fixed by the manifest (but for the batch, a launch size: any batch
runs, the kernels being tuned at the manifest's ``batch``), kernel launches allocate nothing and never
synchronise; pass ``out=`` to avoid even the output allocation.

Loading trusts nothing in the directory. :func:`~sparvar_compiler.emit.manifest.verify_module` checks the
manifest's digest, its schema and every file's hash first, so every field read here is present, typed and in
range; each file is then read once more without following symlinks and re-hashed
(:func:`~sparvar_compiler.emit.manifest.read_module_file`), every npz header is checked against the shapes and
dtypes the manifest implies before its data is read (:func:`read_npz`), and every table a kernel indexes by must
stay within its layout (a kernel reads padding entries too). A problem is one :class:`ModuleError`.
"""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..codegen.artifact import CompiledKernel, KernelMetaError
from ..codegen.spec import DTYPES, KernelInputError
from ..emit.manifest import ModuleError, module_file, read_module_file, verify_module
from ..errors import SparvarError
from ..limits import MAX_ARRAYS_PER_FILE
from ..planner.gpus import gpu_from_device_name
from . import op as _op


class SparvarModule:
    """A loaded runtime module. Use :func:`load`.

    Attributes
    ----------
    manifest:
        The module's manifest (model, plan, target, kernels, dispatch).
    device:
        Where it runs (``cuda:N``, or ``cpu`` in fallback mode).
    """

    def __init__(self, directory: str | Path, device: str | torch.device | None = None, *,
                 _verified: dict[str, Any] | None = None):
        self.directory = Path(directory)
        # Everything below reads the manifest only after its schema check (emit.manifest.check_manifest), every
        # file through read_module_file (no symlink, re-hashed), and every array after its header matched the
        # manifest. ``_verified``: the manifest a ModuleSet has just verified with the whole set.
        self.manifest = verify_module(self.directory) if _verified is None else _verified
        m = self.manifest
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.fallback = self.device.type != "cuda"
        # ``batch`` is what the kernels were tuned at; calls take any batch.
        self.batch, self.heads, self.head_dim = m["batch"], m["model"]["heads"], m["model"]["head_dim"]
        self.dtype = DTYPES[m["dtype"]]
        self.default_scale = float(m["softmax_scale"])
        scales = m["plan"]["scales"]
        self._shape = {s["index"]: (s["tokens"], s["kv_len"]) for s in scales}
        # (tokens, kv_len) -> scale: the KV length grows with every scale, so the pair names one scale.
        self._by_lengths = {v: k for k, v in self._shape.items()}
        if not self.fallback:
            self._check_target()
        self._kernels: dict[str, Any] = {}
        self._tables: dict[str, dict[str, torch.Tensor]] = {}
        self._masks: dict[str, torch.Tensor] = {}
        for name, k in m["kernels"].items():
            layout = _kernel_layout(self.directory, m, name, k)
            arrays = _kernel_tables(read_module_file(self.directory, m, k["layout"]), name, k, layout)
            if self.fallback:
                self._masks[name] = torch.from_numpy(layout.to_token_mask(exact=k["spec"]["token_exact"]))
            else:
                from .cubin import LoadedKernel

                compiled = compiled_kernel(f"kernel {name}", k["meta"],
                                           read_module_file(self.directory, m, k["binary"]))
                self._kernels[name] = LoadedKernel.load(compiled, self.device)
                self._tables[name] = {t: torch.from_numpy(a).to(self.device) for t, a in arrays.items()}
        # The schema holds exactly one dispatch row per (scale, layer), each op known and on a kernel of its scale.
        self._ops: list[list[tuple[str, Any]]] = [[("sdpa", None)] * m["model"]["depth"] for _ in scales]
        for row in m["dispatch"]:
            self._ops[row["scale"]][row["layer"]] = (row["op"], row["kernel"])
        self.cs4a = None
        if m["cs4a"] is not None:
            from .cs4a import CS4ARuntime

            self.cs4a = CS4ARuntime(m["cs4a"], m["plan"], self.directory, self.device, self.fallback,
                                    read=lambda rel: read_module_file(self.directory, m, rel))
        self.op_key = _op.register(self)  # what torch.ops.sparvar.attention calls this module by

    def _check_target(self) -> None:
        target = self.manifest["target"]
        props = torch.cuda.get_device_properties(self.device)
        arch = f"sm_{props.major}{props.minor}"
        here = gpu_from_device_name(props.name, props.multi_processor_count)
        problems = []
        if arch != target["arch"]:
            problems.append(f"arch {arch} != {target['arch']}")
        if props.multi_processor_count != target["sm_count"]:
            problems.append(f"{props.multi_processor_count} SMs != {target['sm_count']}")
        if here is not None and here.name != target["name"] and here.arch == target["arch"] and (
                here.sm_count != target["sm_count"]):
            problems.append(f"GPU {here.name} != {target['name']}")
        if problems:
            raise ModuleError(f"module was built for {target['name']} ({target['arch']}, {target['sm_count']} SMs) "
                              f"but this device is {props.name}: {'; '.join(problems)}")

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        """``(h, w)`` of every scale, coarsest first."""
        return tuple((s["h"], s["w"]) for s in self.manifest["plan"]["scales"])

    def scale_lengths(self) -> list[tuple[int, int]]:
        """``(tokens, kv_len)`` of every scale: what a call's q and k lengths must be."""
        return [self._shape[i] for i in range(len(self._shape))]

    def scale_of(self, q_len: int, kv_len: int) -> int:
        """The scale whose queries and KV cache have these lengths (what an attention hook knows)."""
        hit = self._by_lengths.get((int(q_len), int(kv_len)))
        if hit is None:
            raise KernelInputError(f"no scale of this module ({self.manifest['model']['name']} "
                                   f"{self.manifest['plan']['resolution']} px {self.manifest['plan']['aspect']}) has "
                                   f"{q_len} queries against {kv_len} keys; its scales: {self.scale_lengths()}")
        return hit

    def reset(self) -> None:
        """Forget CS4A state (each layer's decision-scale selection): call between images if an image was cut
        short. A complete image needs nothing (each decision-scale call replaces its layer's selection)."""
        if self.cs4a is not None:
            self.cs4a.reset()

    def attention_op(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_index: int, layer_index: int,
                     scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`attention` through the ``torch.ops.sparvar.attention`` operator (what ``torch.compile``
        traces as one node)."""
        return _op.attention(q, k, v, self.op_key, int(scale_index), int(layer_index),
                            self.default_scale if scale is None else float(scale), out)

    def op(self, scale_index: int, layer_index: int) -> tuple[str, str | None]:
        """What a call runs: ``("kernel", name)``, ``("sdpa", None)``, ``("cs4a_decision", None)`` (dense plus
        CS4A statistics and selection), ``("cs4a", None)`` (a dynamic CS4A kernel) or ``("skip", None)``."""
        if not 0 <= scale_index < len(self._ops):
            raise KernelInputError(f"scale_index {scale_index} is out of range 0..{len(self._ops) - 1}")
        if not 0 <= layer_index < len(self._ops[scale_index]):
            raise KernelInputError(f"layer_index {layer_index} is out of range 0..{len(self._ops[scale_index]) - 1}")
        return self._ops[scale_index][layer_index]

    def _check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_index: int,
               out: torch.Tensor | None) -> None:
        tokens, kv_len = self._shape[scale_index]
        if not isinstance(q, torch.Tensor):
            raise KernelInputError(f"q must be a torch.Tensor, got {type(q).__name__}")
        batch = q.shape[0] if q.dim() == 4 and q.shape[0] >= 1 else "B"
        want_q = (batch, self.heads, tokens, self.head_dim)
        want_kv = (batch, self.heads, kv_len, self.head_dim)
        for name, t, want in (("q", q, want_q), ("k", k, want_kv), ("v", v, want_kv)):
            if not isinstance(t, torch.Tensor):
                raise KernelInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != want:
                raise KernelInputError(f"scale {scale_index}: {name} must have shape {want} [batch, heads, tokens, "
                                       f"head_dim] (any batch >= 1), got {tuple(t.shape)}")
            if t.dtype != self.dtype:
                raise KernelInputError(f"{name} must be {self.dtype} (the module was compiled for it), got {t.dtype}")
            if t.device != self.device:
                raise KernelInputError(f"{name} is on {t.device}, the module runs on {self.device}")
            if not t.is_contiguous():
                raise KernelInputError(f"{name} must be contiguous, got strides {t.stride()}")
        if out is not None and (tuple(out.shape) != want_q or out.dtype != self.dtype or out.device != self.device
                                or not out.is_contiguous()):
            raise KernelInputError(f"out must be a contiguous {self.dtype} tensor of shape {want_q} on {self.device}")

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_index: int, layer_index: int,
                  scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention of one (scale, layer) as planned: q ``[B, H, tokens, D]`` against the KV cache
        ``[B, H, kv_len, D]`` of that scale (no mask inside a scale: the queries see every cached key the plan
        keeps). ``scale`` defaults to the module's softmax scale (1.0 for Infinity's normalised q/k).

        CS4A layers are stateful within an image: call a layer's decision scale before its later scales, as
        generation does (each decision-scale call replaces that layer's selection)."""
        op, name = self.op(scale_index, layer_index)
        self._check(q, k, v, scale_index, out)
        scale = self.default_scale if scale is None else float(scale)
        if not 0 < scale < math.inf:
            raise KernelInputError(f"scale must be a positive finite number, got {scale!r}")
        if op == "skip":
            raise KernelInputError(f"scale {scale_index} is skipped by this module's plan: it runs no attention")
        if op == "cs4a_decision":
            return self.cs4a.decision(q, k, v, layer_index, scale, out)
        if op == "cs4a":
            return self.cs4a.later(q, k, v, scale_index, layer_index, scale, out)
        if op == "kernel":
            if self.fallback:
                res = masked_attention(q, k, v, self._masks[name], scale)
                return res if out is None else out.copy_(res)
            out = torch.empty_like(q) if out is None else out
            self._kernels[name].launch({"q": q, "k": k, "v": v, "out": out, "scale": scale, **self._tables[name]},
                                       batch=q.shape[0])
            return out
        res = _dense(q, k, v, scale)
        return res if out is None else out.copy_(res)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """The CPU fallback of a sparse kernel: attention restricted to ``mask`` (``[Nq, Nkv]`` or ``[B, H, Nq, Nkv]``
    bool) through SDPA, which never holds the whole score matrix (a plain masked softmax at Infinity-8B's last
    scale takes 15 GB and minutes); rows with nothing kept give 0, as the kernels do."""
    keep = mask.to(q.device)
    res = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    empty = ~keep.any(dim=-1)
    if bool(empty.any()):
        res = res.masked_fill(empty.unsqueeze(-1).expand_as(res), 0)
    return res


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense attention through SDPA, preferring cuDNN then FlashAttention on the GPU."""
    if q.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
                         set_priority=True):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def compiled_kernel(what: str, meta: dict[str, Any], binary: bytes) -> CompiledKernel:
    """The :class:`CompiledKernel` of a checked manifest's record, any inconsistency a :class:`ModuleError`."""
    try:
        return CompiledKernel.from_meta(meta, binary)
    except (KernelMetaError, ValueError) as e:
        raise ModuleError(f"{what}: {e}") from None


def read_npz(data: bytes, what: str, check: Callable[[str, np.dtype, tuple[int, ...]], None]
             ) -> dict[str, np.ndarray]:
    """The arrays of the npz file ``data`` (bytes already checked against the manifest's sha256): each member's
    npy header is read (:func:`sparvar_compiler.arrays.read_npy_header`: numeric dtypes, sizes within the
    limits, no pickle) and passed to ``check`` - which raises for one the manifest does not allow - before its
    data is read. Raises :class:`ModuleError` naming ``what``."""
    from ..arrays import read_npy_header

    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
            if len(infos) > MAX_ARRAYS_PER_FILE:
                raise ModuleError(f"{what}: {len(infos)} arrays, more than {MAX_ARRAYS_PER_FILE}")
            for info in infos:
                name = info.filename.removesuffix(".npy")
                if name == info.filename or name in out or not name.isidentifier():
                    raise ModuleError(f"{what}: member {info.filename!r} is not an array of the module")
                with z.open(info) as f:
                    shape, dtype, fortran, nbytes = read_npy_header(f, f"{what}: array {name}", ModuleError)
                    if fortran:
                        raise ModuleError(f"{what}: array {name} is stored column-major; the module's are not")
                    check(name, dtype, shape)
                    buf = bytearray(nbytes)
                    got = 0
                    while got < nbytes:
                        more = f.readinto(memoryview(buf)[got:])
                        if not more:
                            break
                        got += more
                    if got != nbytes or f.read(1):
                        raise ModuleError(f"{what}: array {name} does not hold the {nbytes} bytes its header "
                                          "promises")
                    out[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    except SparvarError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, ValueError, EOFError,
            OSError) as e:
        raise ModuleError(f"{what}: not a readable npz file ({' '.join(str(e).split())[:200]})") from None
    return out


def _expect(what: str, arrays: dict[str, tuple[np.dtype, tuple[int, ...] | None]]):
    """A ``check`` for :func:`read_npz`: exactly ``arrays`` (name -> dtype, shape; None: any 1-D or 2-D shape
    checked later)."""
    def check(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        if name not in arrays:
            raise ModuleError(f"{what}: array {name} is not one the manifest lists")
        want_dtype, want_shape = arrays[name]
        if dtype != want_dtype or (want_shape is not None and shape != want_shape) or len(shape) > 3:
            raise ModuleError(f"{what}: array {name} is {dtype} {shape}, the manifest needs {want_dtype} "
                              f"{want_shape if want_shape is not None else '(any shape)'}")
    return check


def _kernel_layout(directory: Path, manifest: dict[str, Any], name: str, k: dict[str, Any]):
    """The kernel's BlockLayout, its shape and content hash those the manifest records for the kernel."""
    from ..planner.layout import BlockLayout

    read_module_file(directory, manifest, k["layout_file"])  # regular, inside the module, as listed
    try:
        layout = BlockLayout.from_npz(module_file(directory, manifest, k["layout_file"]))
    except (SparvarError, ValueError, OSError) as e:
        raise ModuleError(f"kernel {name}: layout_file {k['layout_file']}: {e}") from None
    spec = k["spec"]
    got = (layout.q_len, layout.kv_len, layout.block_m, layout.block_n)
    if got != (spec["q_len"], spec["kv_len"], spec["block_m"], spec["block_n"]):
        raise ModuleError(f"kernel {name}: layout_file is {got[0]}x{got[1]} in {got[2]}x{got[3]} blocks, its spec "
                          f"{spec['q_len']}x{spec['kv_len']} in {spec['block_m']}x{spec['block_n']} blocks")
    if layout.content_hash() != k["layout_hash"]:
        raise ModuleError(f"kernel {name}: layout does not match its recorded hash")
    return layout


def _kernel_tables(data: bytes, name: str, k: dict[str, Any], layout) -> dict[str, np.ndarray]:
    """The kernel's launch tables (``table_<name>`` arrays of its ``layout`` npz), checked against its layout: a
    kernel reads every entry (padding included), so each block index must be a block of the layout, each key
    a key of the scale, each count within its row."""
    what = f"kernel {name}: {k['layout']}"
    qb, kb = layout.q_blocks, layout.kv_blocks
    i32 = np.dtype(np.int32)
    shapes: dict[str, tuple[np.dtype, tuple[int, ...] | None]] = {"layout_active": (np.dtype(bool), (qb, kb))}
    for t in k["tables"]:
        if t in ("kv_num", "full_num", "partial_num", "key_num"):
            shapes[f"table_{t}"] = (i32, (qb,))
        elif t in ("kv_idx", "full_idx", "partial_idx"):
            shapes[f"table_{t}"] = (i32, (qb, kb))
        elif t == "key_idx":
            shapes[f"table_{t}"] = (i32, None)
        elif t == "partial_offsets":
            shapes[f"table_{t}"] = (i32, (qb + 1,))
        elif t == "partial_masks":
            masks = layout.partial_masks
            want = masks.shape if masks is not None and masks.size else (1,)
            shapes[f"table_{t}"] = (i32, tuple(want))
        else:
            raise ModuleError(f"kernel {name}: table {t} is not one the runtime knows")
    arrays = read_npz(data, what, _expect(what, shapes))
    missing = sorted(set(shapes) - set(arrays))
    if missing:
        raise ModuleError(f"{what}: has no array {missing[0]}")
    tables = {n.removeprefix("table_"): a for n, a in arrays.items() if n.startswith("table_")}
    which = {"kv": "active", "full": "full", "partial": "partial"}
    for prefix, kind in which.items():
        if f"{prefix}_idx" not in tables:
            continue
        num, idx = tables.get(f"{prefix}_num"), tables[f"{prefix}_idx"]
        want_num, want_idx = layout.tables(kind)
        if num is None or not np.array_equal(num, want_num) or idx.size and (idx.min() < 0 or idx.max() >= kb) or \
                any(not np.array_equal(idx[r, :n], want_idx[r, :n]) for r, n in enumerate(want_num)):
            raise ModuleError(f"{what}: tables {prefix}_num/{prefix}_idx are not those of the kernel's layout")
    if "key_idx" in tables:
        num, idx = tables.get("key_num"), tables["key_idx"]
        if num is None or idx.ndim != 2 or idx.shape[0] != qb or not layout.kv_len <= idx.shape[1] <= \
                layout.kv_len + 1024 or idx.min(initial=0) < 0 or idx.max(initial=0) >= layout.kv_len or \
                num.min(initial=0) < 0 or num.max(initial=0) > idx.shape[1]:
            raise ModuleError(f"{what}: tables key_num/key_idx are not within the scale's keys")
    if "partial_offsets" in tables and not np.array_equal(tables["partial_offsets"], layout.partial_offsets):
        raise ModuleError(f"{what}: table partial_offsets is not that of the kernel's layout")
    if "partial_masks" in tables and layout.partial_masks is not None and layout.partial_masks.size and \
            not np.array_equal(tables["partial_masks"], np.ascontiguousarray(layout.partial_masks).view(np.int32)):
        raise ModuleError(f"{what}: table partial_masks is not that of the kernel's layout")
    return tables


def load(directory: str | Path, device: str | torch.device | None = None) -> SparvarModule:
    """Load an emitted module: checks every file's hash, the target GPU, and loads the kernels (no compiling).

    Raises
    ------
    ModuleError
        Missing or modified files, a manifest for another GPU, or a malformed module.
    """
    return SparvarModule(directory, device)
