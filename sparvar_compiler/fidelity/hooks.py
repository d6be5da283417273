"""Capture q/k/v from a real model, for ``sparvar-compile calibrate`` and ``fidelity --captures``.

Three ways in:

* FoundationVision/Infinity: :func:`sparvar_compiler.integrations.infinity.capture` records through the model's
  own ``attn_fn`` hook (Infinity's ``basic.py`` binds SDPA at import as ``slow_attn``, so patching
  ``torch.nn.functional`` never sees its calls)::

      writer = CaptureWriter("caps", "infinity-8b", resolution=1024, aspect="1:1")
      with sv.capture(infinity, writer, layers=range(0, 40, 4), heads=[0, 7, 14, 21]):
          infinity.autoregressive_infer_cfg(...)          # one image

* A model that calls ``torch.nn.functional.scaled_dot_product_attention`` by that name: wrap generation in
  :func:`capture_sdpa`, which records every call whose shapes are a self-attention of the schedule (queries of one
  scale over the cache up to it, or over that scale only) and numbers layers in call order per scale.
  Cross-attention calls (keys = text tokens) do not match and are left alone.
* Anything else: call :meth:`CaptureWriter.save` from the model's attention code with the q, k, v it passes to
  attention (after normalisation and RoPE): ``writer.save(scale, layer, q, k, v)``; or adapt a forward hook with
  :func:`attention_forward_hook`.

Both context managers raise when they recorded nothing, naming the likely cause, instead of leaving an empty
directory that fails later. :meth:`CaptureWriter.save` checks every shape against the model and schedule before it
writes. bf16 tensors are stored as bf16 (half the bytes of float32; the ``safetensors`` package writes them when it
is installed, the writer in :mod:`.tensorfile` otherwise). Files are ``.safetensors`` (default) or ``.npz``;
nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..planner.models import ModelSpec, get_model
from .captures import (FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, CaptureError, default_softmax_scale, entry_name,
                       heads_text, same_scale)
from .tensorfile import BF16Words, write_tensors

_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _as_torch(name: str, t: Any) -> Any:
    """A torch tensor of ``t`` (numpy input: shares its memory), floating point."""
    import torch

    if isinstance(t, torch.Tensor):
        t = t.detach()
    else:
        a = np.asarray(t)
        if a.dtype.kind != "f":
            raise CaptureError(f"{name} has dtype {a.dtype}; captures are floating point")
        if not a.dtype.isnative or not a.flags.writeable:
            a = a.astype(a.dtype.newbyteorder("="))  # a copy torch can take
        t = torch.from_numpy(np.ascontiguousarray(a))
    if not t.is_floating_point():
        raise CaptureError(f"{name} has dtype {t.dtype}; captures are floating point")
    return t


class CaptureWriter:
    """Write captures in the directory format of :mod:`sparvar_compiler.fidelity.captures`.

    Parameters
    ----------
    directory:
        Created if missing; the index ``captures.json`` is rewritten after every save, so a partial capture is
        usable.
    model:
        Registry name (or spec) of the model captured.
    resolution, aspect:
        The schedule generated (default: the model's default, ``"1:1"``).
    softmax_scale:
        The scale the model's attention uses. Default: the model family's
        (:func:`~sparvar_compiler.fidelity.captures.default_softmax_scale`: 1.0 for Infinity); a family without
        one (custom models) must be given one, or have it read from the model by a capture hook, before the first
        :meth:`save`. The hooks check it against the scale the model's attention is called with.
    heads:
        Model head numbers to keep, in order (default: all); keeps files small. The index lists them.
    suffix:
        ``".safetensors"`` or ``".npz"``.
    dtype:
        Store as ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``; default None keeps each tensor's
        own dtype (bf16 stays bf16 in ``.safetensors``; ``.npz`` cannot hold bf16, which is widened exactly to
        float32 there).
    note:
        Free text for the index.

    Attributes
    ----------
    softmax_scale, softmax_scale_source:
        The scale written to the index and how it was known: ``"explicit"``, ``"family default"`` or
        ``"model"`` (read from the model's attention calls).
    entries:
        ``(scale, layer) -> file name`` of every capture saved.
    """

    def __init__(self, directory: str | Path, model: str | ModelSpec, resolution: int | None = None,
                 aspect: str | None = None, softmax_scale: float | None = None,
                 heads: Sequence[int] | None = None, suffix: str = ".safetensors",
                 dtype: str | np.dtype | None = None, note: str = "") -> None:
        self.model = get_model(model) if isinstance(model, str) else model
        self.schedule = self.model.schedule(resolution, aspect)
        if suffix not in (".safetensors", ".npz"):
            raise CaptureError(f"capture files are .safetensors or .npz, not {suffix!r}")
        if dtype is not None:
            try:
                dtype = "bfloat16" if str(dtype) == "bfloat16" else str(np.dtype(dtype))
            except TypeError:
                pass
            if dtype not in _DTYPES:
                raise CaptureError(f"captures are stored as {', '.join(_DTYPES)}, not {dtype}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if softmax_scale is not None:
            self.softmax_scale: float | None = _positive(softmax_scale)
            self.softmax_scale_source = "explicit"
        else:
            self.softmax_scale = default_softmax_scale(self.model)
            self.softmax_scale_source = "family default" if self.softmax_scale is not None else "none"
        self.heads: list[int] | None = None
        if heads is not None:
            self.select_heads(heads)
        self.suffix = suffix
        self.dtype: str | None = dtype
        self.note = note
        self.entries: dict[tuple[int, int], str] = {}
        self._bhd: tuple[int, int, int] | None = None  # (B, H, D) as stored, of the first save

    # ------------------------------------------------------------------ settings the hooks complete
    def select_heads(self, heads: Sequence[int]) -> None:
        """Keep only these model heads (in this order); before the first :meth:`save` only."""
        ids = [int(h) for h in heads]
        if not ids:
            raise CaptureError("heads must name at least one head")
        bad = [h for h in ids if not 0 <= h < self.model.heads]
        if bad:
            raise CaptureError(f"head {bad[0]} is not in 0..{self.model.heads - 1} ({self.model.name} has "
                               f"{self.model.heads} heads)")
        if len(set(ids)) != len(ids):
            raise CaptureError(f"heads {ids} name a head twice")
        if getattr(self, "entries", None) and ids != self.heads:
            raise CaptureError(f"heads {ids} asked for after captures of heads {self.heads} were saved")
        self.heads = ids

    def use_model_scale(self, scale: float, where: str = "the model") -> None:
        """Record the softmax scale the model's attention is called with: it becomes the writer's if it had none,
        and must agree with the writer's otherwise (CaptureError naming both)."""
        scale = _positive(scale)
        if self.softmax_scale is None:
            self.softmax_scale, self.softmax_scale_source = scale, "model"
        elif not same_scale(scale, self.softmax_scale):
            raise CaptureError(
                f"{where} calls attention with softmax scale {scale:g}, but the writer's is {self.softmax_scale:g} "
                f"({self.softmax_scale_source}); captures at the wrong scale give wrong figures. Pass "
                f"CaptureWriter(softmax_scale={scale:g}) if the model really uses it (a scale other than the "
                f"{self.model.family} family's default is then refused at load unless forced)")
        elif self.softmax_scale_source == "family default":
            self.softmax_scale_source = "model"

    # ------------------------------------------------------------------ writing
    def save(self, scale: int, layer: int, q: Any, k: Any, v: Any) -> Path:
        """Save one (scale, layer): ``q [B, H, tokens, D]``, ``k``/``v`` ``[B, H, tokens or kv_len, D]``.

        Tensors may be torch (any device) or numpy. ``H`` is the model's head count (the writer's ``heads`` are
        selected from it), or the number of the writer's ``heads`` (already selected). Without ``heads``, fewer
        heads than the model's are taken as heads ``0..H-1`` and the index says so.

        Raises
        ------
        CaptureError
            Before anything is written: scale or layer out of range, a (scale, layer) saved twice, no softmax
            scale known, a shape that does not fit the model and schedule or the earlier saves (B, H, tokens,
            kv_len, D), a non-float dtype, NaN/inf.
        """
        n = self.schedule.num_scales
        if not 0 <= scale < n:
            raise CaptureError(f"scale {scale} is not in the schedule (0..{n - 1})")
        if not 0 <= layer < self.model.depth:
            raise CaptureError(f"layer {layer} is not in 0..{self.model.depth - 1}")
        if (scale, layer) in self.entries:
            raise CaptureError(f"scale {scale} of layer {layer} is already captured in {self.directory}: capture one "
                               "generation per writer (a second one would overwrite the first)")
        if self.softmax_scale is None:
            raise CaptureError(f"{self.model.name} (family {self.model.family}) has no default softmax scale: pass "
                               "CaptureWriter(softmax_scale=...) with the scale its attention uses (SDPA without "
                               f"one uses 1/sqrt(head_dim) = {1 / math.sqrt(self.model.head_dim):.6g})")
        where = f"scale {scale} of layer {layer}"
        q, k, v = (_as_torch(f"{where}: {name}", t) for name, t in (("q", q), ("k", k), ("v", v)))
        selected = self._check_shapes(where, scale, q.shape, k.shape, v.shape)
        for name, t in (("q", q), ("k", k), ("v", v)):
            finite = t.isfinite()
            if not bool(finite.all()):
                raise CaptureError(f"{where}: {name} holds {int((~finite).sum())} NaN/inf values")
        arrays = {name: self._stored(t, selected) for name, t in (("q", q), ("k", k), ("v", v))}
        name = entry_name(scale, layer, self.suffix)
        path = write_tensors(self.directory / name, arrays)
        self.entries[(scale, layer)] = name
        self._write_index()
        return path

    def _check_shapes(self, where: str, scale: int, q: Sequence[int], k: Sequence[int], v: Sequence[int]) -> bool:
        """Validate shapes; True when the writer's heads are to be selected from all of the model's."""
        m, tokens, kv_len = self.model, self.schedule.tokens[scale], self.schedule.kv_lens[scale]
        for name, shape in (("q", q), ("k", k), ("v", v)):
            if len(shape) != 4:
                raise CaptureError(f"{where}: {name} has shape {list(shape)}; expected [B, H, N, D]")
        if tuple(k) != tuple(v):
            raise CaptureError(f"{where}: k {list(k)} and v {list(v)} differ in shape")
        if q[2] != tokens:
            g = self.schedule.grids[scale]
            raise CaptureError(f"{where}: q has {q[2]} queries; scale {scale} ({g[0]}x{g[1]}) of {m.name} at "
                               f"{self.schedule.resolution} {self.schedule.aspect} has {tokens}")
        if k[2] not in (tokens, kv_len):
            raise CaptureError(f"{where}: k/v have {k[2]} tokens; expected {tokens} (this scale only) or {kv_len} "
                               f"(the whole cache of scale {scale})")
        if (q[0], q[1], q[3]) != (k[0], k[1], k[3]):
            raise CaptureError(f"{where}: q {list(q)} and k {list(k)} disagree in B, H or D")
        b, h, d = q[0], q[1], q[3]
        if d != m.head_dim:
            raise CaptureError(f"{where}: head dim {d}, but {m.name} has head dim {m.head_dim}")
        if h == m.heads:
            selected = self.heads is not None
        elif self.heads is not None and h == len(self.heads):
            selected = False  # the caller selected them already
        elif self.heads is None and 0 < h < m.heads:
            selected = False  # taken as heads 0..h-1 (the index says so)
        else:
            want = f"{m.heads}" + (f" (or the {len(self.heads)} selected)" if self.heads is not None else "")
            raise CaptureError(f"{where}: {h} heads; {m.name} has {want}")
        stored = (b, len(self.heads) if selected else h, d)
        if self._bhd is not None and self._bhd != stored:
            raise CaptureError(f"{where}: B, H, D = {stored} (as stored) differ from the earlier captures' "
                               f"{self._bhd}")
        self._bhd = stored
        return selected

    def _stored(self, t: Any, select: bool) -> np.ndarray | BF16Words:
        import torch

        if select:
            t = t.index_select(1, torch.tensor(self.heads, device=t.device))
        want = self.dtype
        if want is None and t.dtype == torch.bfloat16 and self.suffix == ".npz":
            want = "float32"  # .npz cannot hold bf16: widen exactly
        if want is not None:
            t = t.to(getattr(torch, want))
        t = t.contiguous().cpu()
        if t.dtype == torch.bfloat16:
            return BF16Words.from_torch(t)
        return t.numpy()

    def stored_head_ids(self) -> list[int]:
        """The model heads the files hold (before any save: what they will hold if all heads are given)."""
        if self.heads is not None:
            return list(self.heads)
        h = self._bhd[1] if self._bhd is not None else self.model.heads
        return list(range(h))

    def heads_text(self) -> str:
        """``"4 of 28: [0, 7, 14, 21]"`` / ``"all 28"``."""
        return heads_text(self.stored_head_ids(), self.model.heads)

    def _write_index(self) -> None:
        index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model": self.model.name,
                 "resolution": self.schedule.resolution, "aspect": self.schedule.aspect,
                 "softmax_scale": self.softmax_scale, "softmax_scale_source": self.softmax_scale_source,
                 "heads": self.stored_head_ids(), "note": self.note,
                 "entries": [{"scale": s, "layer": l, "file": f} for (s, l), f in sorted(self.entries.items())]}
        tmp = self.directory / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=1) + "\n")
        os.replace(tmp, self.directory / INDEX_NAME)  # atomic: a reader never sees half an index

    def close(self) -> None:
        self._write_index()

    def __enter__(self) -> "CaptureWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def match_scale(self, q_len: int, kv_len: int) -> int | None:
        """The scale whose self-attention has these lengths, or None (e.g. cross-attention)."""
        for s, (tokens, cache) in enumerate(zip(self.schedule.tokens, self.schedule.kv_lens)):
            if q_len == tokens and kv_len in (tokens, cache):
                return s
        return None

    def schedule_text(self) -> str:
        return f"{self.model.name} at {self.schedule.resolution} px {self.schedule.aspect}"


def _positive(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise CaptureError(f"softmax_scale must be a positive number, got {scale!r}")
    return float(scale)


def nothing_recorded(writer: CaptureWriter, calls: int, matched: int, first_lengths: tuple[int, int] | None,
                     layers: Sequence[int] | None, what: str, no_calls: str) -> str:
    """The message for a capture that recorded nothing: which of the three usual causes it was (``no_calls``
    explains the first)."""
    if calls == 0:
        return f"{what} recorded nothing: {no_calls}"
    if matched == 0:
        q_len, kv_len = first_lengths or (0, 0)
        return (f"{what} recorded nothing: {calls} attention calls, none a self-attention of a scale of "
                f"{writer.schedule_text()} (the first had {q_len} queries over {kv_len} keys): either the writer's "
                "schedule is not the one generated (pass CaptureWriter(resolution=..., aspect=...) of the image's "
                "schedule), or these were other attention calls (cross-attention over the text)")
    return (f"{what} recorded nothing: {matched} calls matched scales of {writer.schedule_text()}, but "
            f"layers={list(layers) if layers is not None else None} filtered out every one "
            f"(the model has layers 0..{writer.model.depth - 1})")


@contextlib.contextmanager
def capture_sdpa(writer: CaptureWriter, layers: Sequence[int] | None = None) -> Iterator[CaptureWriter]:
    """Record self-attention calls of ``torch.nn.functional.scaled_dot_product_attention`` made inside the ``with``
    block.

    Calls are matched to a scale by their query and key lengths (:meth:`CaptureWriter.match_scale`); the n-th
    matching call of a scale is layer n. ``layers`` restricts which layers are saved. The softmax scale of the
    calls (SDPA's ``1/sqrt(D)`` when a call passes none) becomes the writer's if it has none and must agree with
    it otherwise.

    Raises
    ------
    CaptureError
        At exit, when nothing was recorded (unless the block itself raised). A model that binds SDPA under its own
        name at import never calls the patched function: FoundationVision/Infinity's ``basic.py`` imports it as
        ``slow_attn``; use :func:`sparvar_compiler.integrations.infinity.capture` for it.
    """
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    counters: dict[int, int] = {}
    keep = None if layers is None else set(layers)
    seen = {"calls": 0, "matched": 0, "first": None}

    def recording(query, key, value, *args, **kwargs):
        if query.dim() == 4:
            seen["calls"] += 1
            if seen["first"] is None:
                seen["first"] = (int(query.shape[-2]), int(key.shape[-2]))
            scale = writer.match_scale(query.shape[-2], key.shape[-2])
            if scale is not None:
                seen["matched"] += 1
                layer = counters.get(scale, 0)
                counters[scale] = layer + 1
                if keep is None or layer in keep:
                    s = kwargs.get("scale", args[3] if len(args) > 3 else None)
                    writer.use_model_scale(1.0 / math.sqrt(query.shape[-1]) if s is None else float(s),
                                           "torch.nn.functional.scaled_dot_product_attention")
                    writer.save(scale, layer, query, key, value)
        return original(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = recording
    try:
        yield writer
    finally:
        F.scaled_dot_product_attention = original
        writer.close()
    if not writer.entries:
        cause = nothing_recorded(writer, seen["calls"], seen["matched"], seen["first"], layers, "capture_sdpa",
                                 "no call of torch.nn.functional.scaled_dot_product_attention was made")
        raise CaptureError(
            f"{cause}. A model that binds SDPA under its own name when it is imported, or calls flash-attn, never "
            "calls the patched function: FoundationVision/Infinity's infinity/models/basic.py imports it once as "
            "slow_attn, so for Infinity use sparvar_compiler.integrations.infinity.capture(model, writer), which "
            "records through the model's attn_fn hook; for another model, save from its attention code with "
            "CaptureWriter.save")


def attention_forward_hook(writer: CaptureWriter, layer: int, scale_of: Callable[[], int],
                           qkv_of: Callable[[Any, tuple, Any], tuple[Any, Any, Any]]) -> Callable:
    """A ``module.register_forward_hook`` callable that saves the module's q/k/v.

    ``qkv_of(module, inputs, output)`` returns ``(q, k, v)`` (model-specific: e.g. tensors the module stashed on
    itself); ``scale_of()`` returns the scale being generated (e.g. a counter the generation loop advances).
    """
    def hook(module, inputs, output):
        q, k, v = qkv_of(module, inputs, output)
        writer.save(scale_of(), layer, q, k, v)

    return hook
