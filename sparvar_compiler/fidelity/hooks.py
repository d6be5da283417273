"""Capture q/k/v from a real model, for ``sparvar-compile calibrate`` and ``fidelity --captures``.

Two ways in:

* Call :meth:`CaptureWriter.save` from the model's attention code with the q, k, v it passes to attention (after
  normalisation and RoPE): ``writer.save(scale, layer, q, k, v)``.
* Or wrap generation in :func:`capture_sdpa`, which records every call of
  ``torch.nn.functional.scaled_dot_product_attention`` whose shapes are a self-attention of the schedule (queries
  of one scale over the cache up to it, or over that scale only) and numbers layers in call order per scale.
  Cross-attention calls (keys = text tokens) do not match and are left alone::

      writer = CaptureWriter("caps", "infinity-2b", resolution=1024, heads=[0, 7])
      with capture_sdpa(writer):
          model.generate(prompt)          # one image, B = 2 with classifier-free guidance
      writer.close()

For a module whose forward hook can reach q/k/v, :func:`attention_forward_hook` adapts a user function to
``register_forward_hook``. Files are ``.safetensors`` (default) or ``.npz``; nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..planner.models import ModelSpec, get_model
from .captures import FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, CaptureError, entry_name
from .tensorfile import write_tensors


def _to_numpy(t: Any, dtype: np.dtype | None) -> np.ndarray:
    try:
        import torch

        if isinstance(t, torch.Tensor):
            t = t.detach()
            if t.dtype == torch.bfloat16:  # numpy has no bfloat16: widen (exact)
                t = t.float()
            t = t.cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency, but the writer works without it
        pass
    a = np.asarray(t)
    return a.astype(dtype, copy=False) if dtype is not None else a


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
        The scale the model's attention uses (Infinity: 1.0; default ``1/sqrt(head_dim)``).
    heads:
        Model head numbers to keep (default: all); keeps files small.
    suffix:
        ``".safetensors"`` or ``".npz"``.
    dtype:
        Store as this numpy dtype (default: float32; bf16 inputs are widened exactly).
    note:
        Free text for the index.
    """

    def __init__(self, directory: str | Path, model: str | ModelSpec, resolution: int | None = None,
                 aspect: str | None = None, softmax_scale: float | None = None,
                 heads: Sequence[int] | None = None, suffix: str = ".safetensors",
                 dtype: str | np.dtype | None = "float32", note: str = "") -> None:
        self.model = get_model(model) if isinstance(model, str) else model
        self.schedule = self.model.schedule(resolution, aspect)
        if suffix not in (".safetensors", ".npz"):
            raise CaptureError(f"capture files are .safetensors or .npz, not {suffix!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.softmax_scale = softmax_scale
        self.heads = None if heads is None else [int(h) for h in heads]
        self.suffix = suffix
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.note = note
        self.entries: dict[tuple[int, int], str] = {}

    def save(self, scale: int, layer: int, q: Any, k: Any, v: Any) -> Path:
        """Save one (scale, layer): ``q [B, H, tokens, D]``, ``k``/``v`` ``[B, H, tokens or kv_len, D]``.

        Tensors may be torch (any device) or numpy; heads are selected if the writer was given ``heads``.
        """
        n = self.schedule.num_scales
        if not 0 <= scale < n:
            raise CaptureError(f"scale {scale} is not in the schedule (0..{n - 1})")
        if not 0 <= layer < self.model.depth:
            raise CaptureError(f"layer {layer} is not in 0..{self.model.depth - 1}")
        arrays = {name: _to_numpy(t, self.dtype) for name, t in (("q", q), ("k", k), ("v", v))}
        if self.heads is not None:
            arrays = {name: a[:, self.heads] for name, a in arrays.items()}
        name = entry_name(scale, layer, self.suffix)
        path = write_tensors(self.directory / name, arrays)
        self.entries[(scale, layer)] = name
        self._write_index()
        return path

    def _write_index(self) -> None:
        index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model": self.model.name,
                 "resolution": self.schedule.resolution, "aspect": self.schedule.aspect,
                 "softmax_scale": self.softmax_scale, "note": self.note,
                 "entries": [{"scale": s, "layer": l, "file": f} for (s, l), f in sorted(self.entries.items())]}
        if self.heads is not None:
            index["heads"] = self.heads
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


@contextlib.contextmanager
def capture_sdpa(writer: CaptureWriter, layers: Sequence[int] | None = None) -> Iterator[CaptureWriter]:
    """Record self-attention calls of ``F.scaled_dot_product_attention`` made inside the ``with`` block.

    Calls are matched to a scale by their query and key lengths (:meth:`CaptureWriter.match_scale`); the n-th
    matching call of a scale is layer n. ``layers`` restricts which layers are saved. The softmax scale of the
    first recorded call is written to the index if the writer has none.
    """
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    counters: dict[int, int] = {}
    keep = None if layers is None else set(layers)

    def recording(query, key, value, *args, **kwargs):
        scale = writer.match_scale(query.shape[-2], key.shape[-2]) if query.dim() == 4 else None
        if scale is not None:
            layer = counters.get(scale, 0)
            counters[scale] = layer + 1
            if keep is None or layer in keep:
                if writer.softmax_scale is None:
                    s = kwargs.get("scale")
                    writer.softmax_scale = float(s) if s is not None else None
                writer.save(scale, layer, query, key, value)
        return original(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = recording
    try:
        yield writer
    finally:
        F.scaled_dot_product_attention = original
        writer.close()


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
