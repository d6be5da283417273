"""Captured q/k/v of a real model: the directory format, and a loader that refuses anything doubtful.

Format (written by :class:`sparvar_compiler.fidelity.hooks.CaptureWriter`)::

    DIR/captures.json      the index (JSON)
    DIR/s10_l003.safetensors   one file per (scale, layer): tensors "q", "k", "v" ([B, H, N, D]); or .npz

    captures.json = {
      "format": "sparvar-captures", "version": 1,
      "model": "infinity-2b", "resolution": 1024, "aspect": "1:1",
      "softmax_scale": 1.0,                  # the scale the model's attention used (Infinity: 1.0)
      "heads": [0, 5],                       # optional: which model heads the files hold (all if absent)
      "note": "free text",                   # optional (e.g. "synthetic preset mixed")
      "entries": [{"scale": 10, "layer": 3, "file": "s10_l003.safetensors"}, ...]
    }

``q`` holds the queries of that scale (``N = tokens(scale)``). ``k`` and ``v`` hold either the keys/values of that
scale only (``N = tokens(scale)``; the loader then concatenates scales ``0..scale`` of the same layer, which must
all be captured) or the whole cache the scale attends to (``N = kv_len(scale)``). B (batch; 2 with
classifier-free guidance), H and D must agree across files, D must be the model's head dim. Dtypes: float16,
bfloat16 (safetensors), float32, float64; every value finite.

Pickle-based files (``.pt``, ``.pth``, ``.pkl``, ``.pickle``, ``.bin``, ``.ckpt``) and ``.npz`` files holding object
arrays are refused: loading them can run code. Every problem raises :class:`CaptureError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .. import limits
from ..arrays import bounded_json
from ..errors import SparvarError
from ..planner.models import ModelSpec, get_model
from ..planner.schedules import Schedule
from .tensorfile import PICKLE_SUFFIXES, TENSOR_SUFFIXES, TensorFileError, read_tensor_headers, read_tensors

INDEX_NAME = "captures.json"
FORMAT_NAME = "sparvar-captures"
FORMAT_VERSION = 1
_FLOAT_NAMES = ("float16", "float32", "float64", "F16", "F32", "F64", "BF16")  # npz (numpy) and safetensors names


class CaptureError(SparvarError):
    """Captures that cannot be used: missing index, scales or files, wrong shapes or dtypes, NaN/inf, pickle."""


def entry_name(scale: int, layer: int, suffix: str = ".safetensors") -> str:
    """File name of one (scale, layer) capture."""
    return f"s{scale:02d}_l{layer:03d}{suffix}"


@dataclass
class CaptureSet:
    """An opened capture directory (index validated; tensors loaded and validated on first use).

    Attributes
    ----------
    directory, model, schedule:
        Where the captures are, and the model and schedule they belong to.
    softmax_scale:
        The softmax scale the model used (``1/sqrt(D)`` if the index gives none).
    files:
        ``(scale, layer) -> path`` of every capture.
    head_ids:
        The model's head numbers the tensors hold, in order.
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
    _shape: tuple[int, int, int] | None = field(default=None, repr=False)  # (B, H, D) once a file is read
    _own: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, directory: str | Path, model: ModelSpec | str | None = None) -> "CaptureSet":
        """Open and validate the index of a capture directory.

        ``model`` (a spec or registry name), if given, must match the index's model.

        Raises
        ------
        CaptureError
            Missing or malformed index, unknown model or schedule, entries out of range, duplicates, missing or
            pickle-based files.
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
        scale = data.get("softmax_scale")
        if scale is None:
            scale = 1.0 / np.sqrt(spec.head_dim)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale <= 0:
            raise CaptureError(f"{index}: softmax_scale must be a positive number, got {scale!r}")
        heads = data.get("heads")
        if heads is not None:
            if (not isinstance(heads, list) or not heads
                    or not all(isinstance(h, int) and 0 <= h < spec.heads for h in heads)):
                raise CaptureError(f"{index}: heads must be a list of head numbers in 0..{spec.heads - 1}")
            heads = tuple(heads)
        files = _index_entries(data, d, index, schedule, spec)
        return cls(d, spec, schedule, float(scale), files, heads, str(data.get("note", "")))

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

    def shape(self) -> tuple[int, int, int]:
        """``(B, H, D)`` of the captures (reads one file if none was read yet)."""
        if self._shape is None:
            s, layer = min(self.files)
            self._load(s, layer)
        assert self._shape is not None
        return self._shape

    # ------------------------------------------------------------------ tensors
    def qkv(self, scale: int, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``q [B, H, tokens(scale), D]`` and the whole cache ``k, v [B, H, kv_len(scale), D]`` of one scale."""
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
        return q, np.concatenate([p[1] for p in parts], axis=2), np.concatenate([p[2] for p in parts], axis=2)

    def regime(self, layer: int) -> str:
        return "captured"

    def describe(self) -> dict[str, Any]:
        return {"kind": "captures", "directory": str(self.directory), "model": self.model.name,
                "resolution": self.schedule.resolution, "aspect": self.schedule.aspect,
                "heads": list(self.head_ids) if self.head_ids is not None else "all",
                "layers": list(self.layers), "note": self.note}

    def release(self, layer: int | None = None) -> None:
        """Drop cached tensors (of one layer, or all)."""
        for key in [k for k in self._own if layer is None or k[1] == layer]:
            del self._own[key]

    def _load(self, scale: int, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
            tensors = read_tensors(path, ("q", "k", "v"), headers)
        except TensorFileError as e:
            raise CaptureError(str(e)) from None
        q, k, v = (tensors[n] for n in ("q", "k", "v"))
        for name, a in (("q", q), ("k", k), ("v", v)):
            if not np.isfinite(a).all():
                bad = int((~np.isfinite(a)).sum())
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


def _ranges(values: Iterable[int]) -> str:
    vals = sorted(values)
    parts, i = [], 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        parts.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ", ".join(parts)
