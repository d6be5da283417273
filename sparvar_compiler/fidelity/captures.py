"""Captured q/k/v of a real model: the directory format, and a loader that refuses anything doubtful.

Format (written by :class:`sparvar_compiler.fidelity.hooks.CaptureWriter`)::

    DIR/captures.json      the index (JSON)
    DIR/s10_l003.safetensors   one file per (scale, layer): tensors "q", "k", "v" ([B, H, N, D]); or .npz

    captures.json = {
      "format": "sparvar-captures", "version": 1,
      "model": "infinity-2b", "resolution": 1024, "aspect": "1:1",
      "softmax_scale": 1.0,                  # the scale the model's attention used (Infinity: 1.0)
      "softmax_scale_source": "model",       # optional: how the writer knew it ("explicit", "family default",
                                             # "model": read from the model's attention call)
      "heads": [0, 5],                       # optional: which model heads the files hold, in order (all if absent)
      "note": "free text",                   # optional (e.g. "synthetic preset mixed")
      "entries": [{"scale": 10, "layer": 3, "file": "s10_l003.safetensors"}, ...]
    }

Softmax scale: the figures depend on it (a CSLA mode on local heads keeps 0.968 of the mass at Infinity's 1.0 and
0.305 at ``1/sqrt(D)``), so it is never guessed silently. An index without one (written before the writer always
stored it) takes the model family's default (:func:`default_softmax_scale`), and
:attr:`CaptureSet.softmax_scale_source` says so; a custom model has no default, so its index must give one. A stored
scale that disagrees with the family's default is refused unless the caller forces it
(``CaptureSet.open(..., force_scale=True)``): one of the two is wrong, and the reader cannot know which.

Heads: the writer always lists them (``"heads"``). An older index without the list holds all of the model's heads if
the files have that many; files with fewer heads and no list are taken as heads ``0..H-1``, and
:meth:`CaptureSet.heads_text` says so.

``q`` holds the queries of that scale (``N = tokens(scale)``). ``k`` and ``v`` hold either the keys/values of that
scale only (``N = tokens(scale)``; the loader then concatenates scales ``0..scale`` of the same layer, which must
all be captured) or the whole cache the scale attends to (``N = kv_len(scale)``). B (batch; 2 with
classifier-free guidance), H and D must agree across files, D must be the model's head dim. Dtypes: float16,
bfloat16 (safetensors: the writer keeps bf16 as bf16), float32, float64; every value finite. :meth:`CaptureSet.qkv`
returns numpy arrays (bf16 widened exactly to float32: numpy has no bfloat16), :meth:`CaptureSet.qkv_torch` torch
tensors in the stored dtype or the one asked for.

Compatibility: every index written before these additions reads as it did, except that a missing
``softmax_scale`` now means the family's default (it meant ``1/sqrt(D)``, wrong for Infinity) and is refused for
a custom model. An index written now is read by older readers too (the additions are optional keys).

Pickle-based files (``.pt``, ``.pth``, ``.pkl``, ``.pickle``, ``.bin``, ``.ckpt``) and ``.npz`` files holding object
arrays are refused: loading them can run code. Every problem raises :class:`CaptureError` naming the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .. import limits
from ..arrays import bounded_json
from ..errors import SparvarError
from ..planner.models import ModelSpec, get_model
from ..planner.schedules import Schedule
from .tensorfile import PICKLE_SUFFIXES, TENSOR_SUFFIXES, TensorFileError, read_tensor_headers, read_tensors_torch

INDEX_NAME = "captures.json"
FORMAT_NAME = "sparvar-captures"
FORMAT_VERSION = 1
_FLOAT_NAMES = ("float16", "float32", "float64", "F16", "F32", "F64", "BF16")  # npz (numpy) and safetensors names


class CaptureError(SparvarError):
    """Captures that cannot be used: missing index, scales or files, wrong shapes or dtypes, NaN/inf, pickle."""


def entry_name(scale: int, layer: int, suffix: str = ".safetensors") -> str:
    """File name of one (scale, layer) capture."""
    return f"s{scale:02d}_l{layer:03d}{suffix}"


def default_softmax_scale(model: ModelSpec) -> float | None:
    """The softmax scale a model family's attention uses, or None where the family has none.

    * ``infinity``: 1.0 (Infinity L2-normalises q and k, multiplies q by a learned per-head scale and calls
      attention with ``scale=1``).
    * ``var``: ``1/sqrt(head_dim)``, the scale the planner and emitter assume for this family. FoundationVision's
      released VAR checkpoints are built with ``attn_l2_norm=True`` and use 1 (``0.25/sqrt(head_dim)`` without
      it): captures of those models must state their scale and be opened with ``force_scale=True``.
    * ``custom``: none; the capture must state it.
    """
    if model.family == "infinity":
        return 1.0
    if model.family == "var":
        return 1.0 / math.sqrt(model.head_dim)
    return None


def same_scale(a: float, b: float) -> bool:
    """Two softmax scales are the same one (a float32 round trip of either still is)."""
    return math.isclose(float(a), float(b), rel_tol=1e-6)


def heads_text(head_ids: Iterable[int] | None, model_heads: int, stored: int | None = None) -> str:
    """``"4 of 28: [0, 7, 14, 21]"`` / ``"all 28"``; ``head_ids`` None: the index names none, so ``stored``
    heads (if known) are taken as ``0..stored-1``."""
    if head_ids is not None:
        ids = list(head_ids)
        if ids == list(range(model_heads)):
            return f"all {model_heads}"
        return f"{len(ids)} of {model_heads}: {ids}"
    if stored is None or stored == model_heads:
        return f"all {model_heads}"
    return f"{stored} of {model_heads}: {list(range(stored))} (the index names none: taken as heads 0..{stored - 1})"


@dataclass
class CaptureSet:
    """An opened capture directory (index validated; tensors loaded and validated on first use).

    Attributes
    ----------
    directory, model, schedule:
        Where the captures are, and the model and schedule they belong to.
    softmax_scale:
        The softmax scale every figure is computed at: the index's, or the model family's default where the index
        gives none (see the module docstring).
    softmax_scale_source:
        Where it came from: ``"index"`` or ``"family default"``.
    softmax_scale_forced:
        True when the index's scale disagrees with the family's default and the set was opened with
        ``force_scale=True``.
    files:
        ``(scale, layer) -> path`` of every capture.
    head_ids:
        The model's head numbers the tensors hold, in order (None: the index names none; see :meth:`heads_text`).
    note:
        Free text from the index.
    """

    directory: Path
    model: ModelSpec
    schedule: Schedule
    softmax_scale: float
    files: dict[tuple[int, int], Path]
    head_ids: tuple[int, ...] | None = None
    note: str = ""
    softmax_scale_source: str = "index"
    softmax_scale_forced: bool = False
    _shape: tuple[int, int, int] | None = field(default=None, repr=False)  # (B, H, D) once a file is read
    _own: dict[tuple[int, int], tuple[Any, Any, Any]] = field(default_factory=dict, repr=False)  # torch, as stored

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, directory: str | Path, model: ModelSpec | str | None = None,
             force_scale: bool = False) -> "CaptureSet":
        """Open and validate the index of a capture directory.

        ``model`` (a spec or registry name), if given, must match the index's model. ``force_scale``: accept a
        stored softmax scale that disagrees with the model family's default (:func:`default_softmax_scale`).

        Raises
        ------
        CaptureError
            Missing or malformed index, unknown model or schedule, a missing softmax scale where the family has no
            default, a stored one that disagrees with the family's (unless forced), entries out of range,
            duplicates, missing or pickle-based files.
        """
        d = Path(directory)
        if not d.is_dir():
            raise CaptureError(f"captures directory {str(d)!r} does not exist")
        index = d / INDEX_NAME
        if not index.is_file():
            pickles = sorted(p.name for p in d.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            hint = (f"; it holds pickle-based files ({', '.join(pickles[:3])}), which are refused: save q/k/v as "
                    ".safetensors or .npz with sparvar_compiler.fidelity.hooks.CaptureWriter") if pickles else ""
            raise CaptureError(f"{d}: no {INDEX_NAME} index{hint}")
        try:
            with open(index, "rb") as f:
                raw = f.read(limits.MAX_JSON_BYTES + 1)
            limits.check_limit(len(raw), limits.MAX_JSON_BYTES, "MAX_JSON_BYTES", f"{index}: size in bytes",
                               CaptureError)
            data = bounded_json(raw.decode("utf-8"), str(index), CaptureError)
        except (OSError, UnicodeDecodeError) as e:
            raise CaptureError(f"{index}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise CaptureError(f"{index}: not a capture index (expected \"format\": \"{FORMAT_NAME}\")")
        if data.get("version") != FORMAT_VERSION:
            raise CaptureError(f"{index}: capture format version {data.get('version')!r} is not supported "
                               f"(this reader knows version {FORMAT_VERSION})")
        spec = _index_model(data, model, index)
        try:
            schedule = spec.schedule(data.get("resolution"), data.get("aspect"))
        except SparvarError as e:
            raise CaptureError(f"{index}: {e}") from None
        scale, source, forced = _index_scale(data, spec, index, force_scale)
        heads = data.get("heads")
        if heads is not None:
            if (not isinstance(heads, list) or not heads
                    or not all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h < spec.heads
                               for h in heads)):
                raise CaptureError(f"{index}: heads must be a list of head numbers in 0..{spec.heads - 1}")
            if len(set(heads)) != len(heads):
                raise CaptureError(f"{index}: heads {heads} name a head twice")
            heads = tuple(heads)
        files = _index_entries(data, d, index, schedule, spec)
        return cls(d, spec, schedule, scale, files, heads, str(data.get("note", "")), source, forced)

    # ------------------------------------------------------------------ contents
    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for _, layer in self.files}))

    def scales(self, layer: int) -> tuple[int, ...]:
        return tuple(sorted(s for s, l in self.files if l == layer))

    def require(self, scales: Iterable[int], layers: Iterable[int]) -> None:
        """Check that every (scale, layer) needed is captured (name the first missing one)."""
        for layer in layers:
            for s in scales:
                if (s, layer) not in self.files:
                    have = self.scales(layer)
                    raise CaptureError(
                        f"{self.directory}: scale {s} of layer {layer} is missing (layer {layer} has scales "
                        f"{_ranges(have) or 'none'}); the evaluation needs scales {_ranges(sorted(set(scales)))}")

    def check_plan(self, plan: Any) -> None:
        """Refuse a plan of another schedule than the captures' (the figures would pair the plan's scales with
        other scales' tokens): name both and the flags that pick the captures' schedule."""
        grids = tuple(tuple(g) for g in plan.grids)
        if grids != tuple(tuple(g) for g in self.schedule.grids) or plan.model != self.model.name:
            raise CaptureError(
                f"{self.directory}: the captures are of {self.model.name} at {self.schedule.resolution} px "
                f"{self.schedule.aspect}, the plan is of {plan.model} at {plan.resolution} px {plan.aspect}: pass "
                f"--resolution {self.schedule.resolution} --aspect {self.schedule.aspect}")

    def shape(self) -> tuple[int, int, int]:
        """``(B, H, D)`` of the captures (reads one file if none was read yet)."""
        if self._shape is None:
            s, layer = min(self.files)
            self._load(s, layer)
        assert self._shape is not None
        return self._shape

    def stored_heads(self) -> int:
        """H of the files, from one file's header (no tensor is read)."""
        if self._shape is not None:
            return self._shape[1]
        path = self.files[min(self.files)]
        try:
            q = read_tensor_headers(path).get("q")
        except TensorFileError as e:
            raise CaptureError(str(e)) from None
        if q is None or len(q.shape) != 4:
            raise CaptureError(f"{path}: tensor 'q' is missing or not [B, H, N, D]")
        return q.shape[1]

    def heads_text(self) -> str:
        """Which heads the captures hold, for a report: ``"4 of 28: [0, 7, 14, 21]"`` or ``"all 28"``."""
        stored = None if self.head_ids is not None else self.stored_heads()
        return heads_text(self.head_ids, self.model.heads, stored)

    # ------------------------------------------------------------------ tensors
    def qkv(self, scale: int, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``q [B, H, tokens(scale), D]`` and the whole cache ``k, v [B, H, kv_len(scale), D]`` of one scale, as
        numpy arrays (bf16 captures widened exactly to float32)."""
        return tuple(_numpy(t) for t in self._qkv(scale, layer))  # type: ignore[return-value]

    def qkv_torch(self, scale: int, layer: int, dtype: Any = None) -> tuple[Any, Any, Any]:
        """Like :meth:`qkv`, as CPU torch tensors: in the stored dtype (``torch.bfloat16`` stays bf16) or in
        ``dtype``."""
        q, k, v = self._qkv(scale, layer)
        return (q, k, v) if dtype is None else (q.to(dtype), k.to(dtype), v.to(dtype))

    def _qkv(self, scale: int, layer: int) -> tuple[Any, Any, Any]:
        import torch

        q, k, v = self._load(scale, layer)
        kv_len = self.schedule.kv_lens[scale]
        if k.shape[2] == kv_len:
            return q, k, v
        # Per-scale k/v: the cache is the concatenation of scales 0..scale of this layer.
        need = range(scale + 1)
        missing = [s for s in need if (s, layer) not in self.files]
        if missing:
            raise CaptureError(
                f"{self.files[(scale, layer)]}: k/v hold scale {scale} only, so the cache needs scales 0..{scale} "
                f"of layer {layer}, but scale {missing[0]} is not captured")
        parts = [self._load(s, layer) for s in need]
        for s, (_, ks, _) in zip(need, parts):
            if ks.shape[2] != self.schedule.tokens[s]:
                raise CaptureError(f"{self.files[(s, layer)]}: k has {ks.shape[2]} keys; to build the cache of scale "
                                   f"{scale} it must hold scale {s}'s {self.schedule.tokens[s]} tokens only")
        if len({p[1].dtype for p in parts}) != 1:
            raise CaptureError(f"{self.directory}: the k/v of scales 0..{scale} of layer {layer} are stored in "
                               f"different dtypes ({sorted({str(p[1].dtype) for p in parts})})")
        return q, torch.cat([p[1] for p in parts], dim=2), torch.cat([p[2] for p in parts], dim=2)

    def regime(self, layer: int) -> str:
        return "captured"

    def describe(self) -> dict[str, Any]:
        """What a report stores about the data: ``heads`` says which heads were stored (``"4 of 28: [0, 7, 14,
        21]"``), ``head_ids`` lists them, ``softmax_scale`` / ``softmax_scale_source`` which scale the figures use
        and where it came from."""
        stored = self.stored_heads()
        ids = list(self.head_ids) if self.head_ids is not None else list(range(stored))
        out = {"kind": "captures", "directory": str(self.directory), "model": self.model.name,
               "resolution": self.schedule.resolution, "aspect": self.schedule.aspect,
               "heads": heads_text(self.head_ids, self.model.heads, stored), "head_ids": ids,
               "layers": list(self.layers), "softmax_scale": self.softmax_scale,
               "softmax_scale_source": self.softmax_scale_source, "note": self.note}
        if self.softmax_scale_forced:
            default = default_softmax_scale(self.model)
            out["softmax_scale_forced"] = (f"the index's {self.softmax_scale:g} disagrees with the {self.model.family} "
                                           f"family's {default:g}; opened with force_scale")
        return out

    def release(self, layer: int | None = None) -> None:
        """Drop cached tensors (of one layer, or all)."""
        for key in [k for k in self._own if layer is None or k[1] == layer]:
            del self._own[key]

    def _load(self, scale: int, layer: int) -> tuple[Any, Any, Any]:
        key = (scale, layer)
        if key in self._own:
            return self._own[key]
        if key not in self.files:
            raise CaptureError(f"{self.directory}: scale {scale} of layer {layer} is not captured")
        path = self.files[key]
        # Headers first: every shape is checked against the schedule and the model before a tensor is read.
        try:
            headers = read_tensor_headers(path)
        except TensorFileError as e:
            raise CaptureError(str(e)) from None
        missing = [n for n in ("q", "k", "v") if n not in headers]
        if missing:
            raise CaptureError(f"{path}: tensor {missing[0]!r} is missing (a capture holds q, k and v)")
        for name in ("q", "k", "v"):
            h = headers[name]
            if len(h.shape) != 4:
                raise CaptureError(f"{path}: {name} has shape {list(h.shape)}; expected [B, H, N, D]")
            if h.dtype_name not in _FLOAT_NAMES:
                raise CaptureError(f"{path}: {name} has dtype {h.dtype_name}; expected float16, bfloat16, float32 "
                                   "or float64")
        self._check_shapes(path, scale, *(headers[n].shape for n in ("q", "k", "v")))
        try:
            tensors = read_tensors_torch(path, ("q", "k", "v"), headers)
        except TensorFileError as e:
            raise CaptureError(str(e)) from None
        import torch

        q, k, v = (tensors[n] for n in ("q", "k", "v"))
        for name, a in (("q", q), ("k", k), ("v", v)):
            finite = torch.isfinite(a)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise CaptureError(f"{path}: {name} holds {bad} NaN/inf values")
        self._shape = (q.shape[0], q.shape[1], q.shape[3])
        self._own[key] = (q, k, v)
        return q, k, v

    def _check_shapes(self, path: Path, scale: int, q: tuple[int, ...], k: tuple[int, ...], v: tuple[int, ...]
                      ) -> None:
        """q/k/v shapes (from the headers) against the schedule, the model and the other captures."""
        tokens, kv_len = self.schedule.tokens[scale], self.schedule.kv_lens[scale]
        if q[2] != tokens:
            raise CaptureError(f"{path}: q has {q[2]} queries; scale {scale} ({self.schedule.grids[scale][0]}x"
                               f"{self.schedule.grids[scale][1]}) has {tokens}")
        if k != v:
            raise CaptureError(f"{path}: k {list(k)} and v {list(v)} differ in shape")
        if k[2] not in (tokens, kv_len):
            raise CaptureError(f"{path}: k/v have {k[2]} tokens; expected {tokens} (this scale only) or "
                               f"{kv_len} (the whole cache of scale {scale})")
        if q[:2] != k[:2] or q[3] != k[3]:
            raise CaptureError(f"{path}: q {list(q)} and k {list(k)} disagree in B, H or D")
        b, h, _, d = q
        if d != self.model.head_dim:
            raise CaptureError(f"{path}: head dim {d}, but {self.model.name} has head dim {self.model.head_dim}")
        if h > self.model.heads or (self.head_ids is not None and h != len(self.head_ids)):
            want = len(self.head_ids) if self.head_ids is not None else f"at most {self.model.heads}"
            raise CaptureError(f"{path}: {h} heads; expected {want}")
        if self._shape is not None and self._shape != (b, h, d):
            raise CaptureError(f"{path}: B, H, D = {(b, h, d)} differ from the other captures' {self._shape}")


def _numpy(t: Any) -> np.ndarray:
    import torch

    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _index_scale(data: dict[str, Any], spec: ModelSpec, index: Path, force: bool) -> tuple[float, str, bool]:
    """``(scale, source, forced)`` of an index (see the module docstring)."""
    default = default_softmax_scale(spec)
    scale = data.get("softmax_scale")
    if scale is None:
        if default is None:
            raise CaptureError(
                f"{index}: no softmax_scale, and {spec.name} (family {spec.family}) has no default: add "
                f"\"softmax_scale\": <the scale its attention uses> to {INDEX_NAME} (SDPA without a scale uses "
                f"1/sqrt(head_dim) = {1 / math.sqrt(spec.head_dim):.6g})")
        return default, "family default", False
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise CaptureError(f"{index}: softmax_scale must be a positive number, got {scale!r}")
    if default is not None and not same_scale(scale, default):
        if not force:
            raise CaptureError(
                f"{index}: softmax_scale {scale:g} disagrees with the {spec.family} family's default {default:g} "
                f"({spec.name}); the figures depend on it, so one of the two is wrong. If the model really calls "
                f"attention with {scale:g}, open the captures with force_scale=True")
        return float(scale), "index", True
    return float(scale), "index", False


def _index_model(data: dict[str, Any], model: ModelSpec | str | None, index: Path) -> ModelSpec:
    name = data.get("model")
    if model is not None:
        spec = get_model(model) if isinstance(model, str) else model
        if name is not None and name != spec.name:
            raise CaptureError(f"{index}: captures are of model {name!r}, not {spec.name!r}")
        return spec
    if not isinstance(name, str):
        raise CaptureError(f"{index}: 'model' is missing (name the model the captures come from)")
    try:
        return get_model(name)
    except SparvarError as e:
        raise CaptureError(f"{index}: {e}") from None


def _index_entries(data: dict[str, Any], d: Path, index: Path, schedule: Schedule,
                   spec: ModelSpec) -> dict[tuple[int, int], Path]:
    entries = data.get("entries")
    if not isinstance(entries, list) or not entries:
        raise CaptureError(f"{index}: 'entries' must be a non-empty list of {{scale, layer, file}}")
    files: dict[tuple[int, int], Path] = {}
    n = schedule.num_scales
    if len(entries) > n * spec.depth:
        raise CaptureError(f"{index}: 'entries' lists {len(entries)} captures; {spec.name} at {schedule.resolution} "
                           f"{schedule.aspect} has only {n * spec.depth} (scale, layer) pairs")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not {"scale", "layer", "file"} <= set(e):
            raise CaptureError(f"{index}: entries[{i}] must have scale, layer and file")
        s, layer, name = e["scale"], e["layer"], e["file"]
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < n:
            raise CaptureError(f"{index}: entries[{i}]: scale {s!r} is not in the schedule (scales 0..{n - 1} of "
                               f"{spec.name} at {schedule.resolution} {schedule.aspect})")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < spec.depth:
            raise CaptureError(f"{index}: entries[{i}]: layer {layer!r} is not in 0..{spec.depth - 1}")
        if not isinstance(name, str) or Path(name).name != name:
            raise CaptureError(f"{index}: entries[{i}]: file must be a plain file name in the directory, got {name!r}")
        path = d / name
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise CaptureError(f"{path}: {path.suffix} files are pickle-based and are refused (loading them can run "
                               "arbitrary code); save q/k/v as .safetensors or .npz")
        if path.suffix not in TENSOR_SUFFIXES:
            raise CaptureError(f"{path}: unknown capture file type {path.suffix!r}; expected "
                               f"{' or '.join(TENSOR_SUFFIXES)}")
        if not path.is_file():
            raise CaptureError(f"{path}: listed in {INDEX_NAME} but missing")
        if (s, layer) in files:
            raise CaptureError(f"{index}: scale {s} of layer {layer} is listed twice")
        files[(s, layer)] = path
    return files


def ranges_text(values: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    vals = sorted(values)
    parts, i = [], 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        parts.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ", ".join(parts)


_ranges = ranges_text  # the name other modules imported first
