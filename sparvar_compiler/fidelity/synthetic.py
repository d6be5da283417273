"""A VAR-like synthetic attention workload whose properties are explicit knobs, per head.

A synthetic workload proves only what its construction puts in: a head is local here because its logits
contain a locality term, not because VAR heads are. Figures from it describe a *regime*, never image quality.

Construction (per batch element and head; logits as the softmax sees them)
----------------------------------------------------------------------------
The source's ``softmax_scale`` is the model family's default (:func:`family_softmax_scale`: 1.0 for Infinity);
q is divided by it, so that ``softmax_scale * q . k`` is exactly the logit described here, whatever the
family: the figures never depend on the scale, and a report of synthetic data says so.

Every token has a normalised position ``n = ((u + 0.5) / h - 0.5, (v + 0.5) / w - 0.5)`` on its scale's
``h x w`` grid. q and k concatenate feature blocks whose dot products are, exactly:

* **locality** (4 + 1 features): for a query of scale ``s`` and a non-sink key,
  ``-(dy^2 + dx^2) / (2 sigma^2)``, with ``(dy, dx)`` the offset between the query and the key's centre
  projected onto the query's grid, in query-grid cells (``dy = h_s * (n_q - n_k)``), ``sigma`` =
  ``locality_width`` (``inf``: no locality term). The query side carries ``(h_s / sigma)^2``; a fifth feature
  cancels the query-only constant so that the term is exactly the Gaussian.
* **sinks** (1 feature): ``sink_strength`` for every key of the first ``sink_scales`` scales (the logit of a
  sink relative to a perfectly aligned local key); sink keys have no locality term.
* **content** (the other ``D - 6`` features): ``content_strength * z_q . z_k / sqrt(D - 6)`` with unit Gaussian
  ``z``: a random logit of standard deviation ``content_strength``. The decision scale's query content is a
  random field with correlation length ``content_smoothness`` (fraction of the image side; 0 = independent
  per token). **Cross-scale similarity** ``rho``: a later scale's query, key and value content is
  ``rho * (the decision scale's, nearest-cell upsampled) + sqrt(1 - rho^2) * fresh noise``; earlier scales are
  fresh. ``new_key_content`` scales the content of the keys after the decision scale (0: later queries find
  content only in the cache as it was at the decision scale, the premise of CS4A's identity key mapping).

Values are unit Gaussian (later scales: the same ``rho`` mix). Each head of a layer takes the layer regime's
knobs with a seeded jitter (width and content strength times ``exp(0.15 N)``, sinks plus ``0.3 N``) so that
heads differ as real heads do.

Presets
-------
``local``: strong locality and sinks, weak content (SparVAR's regime at and above the bound layer).
``content``: content-driven with high cross-scale similarity (the regime below the bound).
``content-fresh``: as ``content`` but no cross-scale similarity (a control: CS4A's premise removed).
``mixed``: ``content`` below the planner's default bound layer, ``local`` from it on (like SparVAR's Infinity).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import SparvarError
from ..planner.models import ModelSpec, get_model
from ..planner.schedules import Schedule

_FIXED_FEATURES = 6  # 5 locality + 1 sink


@dataclass(frozen=True)
class HeadKnobs:
    """The properties of one synthetic head (see the module docstring for what each builds)."""

    sink_strength: float = 0.0
    locality_width: float = 1.0
    cross_scale_similarity: float = 0.9
    content_strength: float = 0.5
    content_smoothness: float = 0.0
    new_key_content: float = 1.0

    def __post_init__(self) -> None:
        if not self.locality_width > 0:
            raise SparvarError(f"locality_width must be positive (inf for none), got {self.locality_width}")
        if not 0 <= self.cross_scale_similarity <= 1:
            raise SparvarError(f"cross_scale_similarity must be in [0, 1], got {self.cross_scale_similarity}")
        if self.content_strength < 0 or self.content_smoothness < 0 or self.new_key_content < 0:
            raise SparvarError("content_strength, content_smoothness and new_key_content must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if math.isinf(d["locality_width"]):
            d["locality_width"] = "inf"  # JSON has no infinity
        return d


LOCAL = HeadKnobs(sink_strength=-2.0, locality_width=1.0, cross_scale_similarity=0.9, content_strength=0.5)
CONTENT = HeadKnobs(sink_strength=3.0, locality_width=math.inf, cross_scale_similarity=0.95, content_strength=3.0,
                    content_smoothness=0.25, new_key_content=0.3)


@dataclass(frozen=True)
class Preset:
    """Per-layer regimes: layers below ``bound`` (``None``: the planner's default bound layer) get ``low``."""

    name: str
    description: str
    low: tuple[str, HeadKnobs]
    high: tuple[str, HeadKnobs]
    bound: int | str | None = "all-high"

    def bound_layer(self, depth: int) -> int:
        if self.bound == "all-high":
            return 0
        if self.bound == "all-low":
            return depth
        return round(11 * depth / 40) if self.bound is None else int(self.bound)

    def regime(self, layer: int, depth: int) -> tuple[str, HeadKnobs]:
        return self.low if layer < self.bound_layer(depth) else self.high

    def to_dict(self, depth: int) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "bound_layer": self.bound_layer(depth),
                "regimes": {self.low[0]: self.low[1].to_dict(), self.high[0]: self.high[1].to_dict()}}


PRESETS: dict[str, Preset] = {
    "local": Preset("local", "every layer local: strong 2-D locality and sinks, weak content",
                    ("local", LOCAL), ("local", LOCAL), "all-high"),
    "content": Preset("content", "every layer content-driven, high cross-scale similarity",
                      ("content", CONTENT), ("content", CONTENT), "all-low"),
    "content-fresh": Preset("content-fresh", "content-driven with no cross-scale similarity (control)",
                            ("content-fresh", replace(CONTENT, cross_scale_similarity=0.0)),
                            ("content-fresh", replace(CONTENT, cross_scale_similarity=0.0)), "all-low"),
    "mixed": Preset("mixed", "content below the default bound layer, local from it on (like SparVAR)",
                    ("content", CONTENT), ("local", LOCAL), None),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SparvarError(f"unknown synthetic preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def family_softmax_scale(model: ModelSpec) -> tuple[float, str]:
    """``(scale, source text)``: the model family's default softmax scale
    (:func:`~sparvar_compiler.fidelity.captures.default_softmax_scale`: 1.0 for Infinity, ``1/sqrt(head_dim)``
    for VAR); a custom model has none, and synthetic data then uses SDPA's ``1/sqrt(head_dim)``."""
    from .captures import default_softmax_scale

    scale = default_softmax_scale(model)
    if scale is not None:
        how = "1.0" if scale == 1.0 else f"1/sqrt(head_dim) = 1/sqrt({model.head_dim})"
        return scale, f"family default ({model.family}: {how})"
    return 1.0 / math.sqrt(model.head_dim), (f"no family default ({model.family}): SDPA's 1/sqrt(head_dim) = "
                                             f"1/sqrt({model.head_dim})")


def _positions(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ny = (np.arange(h) + 0.5) / h - 0.5
    nx = (np.arange(w) + 0.5) / w - 0.5
    return np.repeat(ny, w), np.tile(nx, h)


def _nearest(src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
    """Index of the ``src``-grid cell under each ``dst``-grid token (nearest-cell upsampling)."""
    (h, w), (h2, w2) = src, dst
    uu = np.minimum(np.floor((np.arange(h2) + 0.5) * h / h2).astype(np.int64), h - 1)
    vv = np.minimum(np.floor((np.arange(w2) + 0.5) * w / w2).astype(np.int64), w - 1)
    return (uu[:, None] * w + vv[None, :]).reshape(-1)


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # float32 draws are twice as fast; the noise's precision does not matter, the arrays stay float64.
    return rng.standard_normal(shape, dtype=np.float32).astype(np.float64)


def _smooth_field(rng: np.random.Generator, h: int, w: int, dims: int, length: float) -> np.ndarray:
    """``[h*w, dims]`` unit-variance random field with correlation length ``length`` (0: white noise)."""
    if length <= 0:
        return _normal(rng, (h * w, dims))
    lat = max(2, math.ceil(1.0 / length) + 1)
    lattice = _normal(rng, (lat, lat, dims))
    ny, nx = _positions(h, w)
    fy, fx = (ny + 0.5) * (lat - 1), (nx + 0.5) * (lat - 1)
    y0, x0 = np.minimum(fy.astype(int), lat - 2), np.minimum(fx.astype(int), lat - 2)
    ty, tx = (fy - y0)[:, None], (fx - x0)[:, None]
    f = ((1 - ty) * (1 - tx) * lattice[y0, x0] + (1 - ty) * tx * lattice[y0, x0 + 1]
         + ty * (1 - tx) * lattice[y0 + 1, x0] + ty * tx * lattice[y0 + 1, x0 + 1])
    # Interpolation shrinks the variance between lattice points; renormalise each token's vector.
    return f * math.sqrt(dims) / np.linalg.norm(f, axis=1, keepdims=True)


def synthetic_head(schedule: Schedule, knobs: HeadKnobs, head_dim: int, decision_scale: int, sink_scales: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One head's ``q, k, v`` over the whole schedule: float64 ``[total_tokens, head_dim]`` each, tokens of all
    scales in cache order (scale ``s``'s queries are rows ``kv_offset(s) : kv_offset(s) + tokens(s)``)."""
    if head_dim <= _FIXED_FEATURES:
        raise SparvarError(f"head_dim must exceed {_FIXED_FEATURES} for the synthetic construction, got {head_dim}")
    dc = head_dim - _FIXED_FEATURES
    grids, offs, toks = schedule.grids, schedule.kv_offsets, schedule.tokens
    total = sum(toks)
    q = np.zeros((total, head_dim))
    k = np.zeros((total, head_dim))
    v = np.zeros((total, head_dim))
    rho = knobs.cross_scale_similarity
    fresh = math.sqrt(max(0.0, 1.0 - rho * rho))
    S = decision_scale
    hs, ws = grids[S]
    zq_dec = _smooth_field(rng, hs, ws, dc, knobs.content_smoothness)
    zk_dec = _normal(rng, (hs * ws, dc))
    v_dec = _normal(rng, (hs * ws, head_dim))
    inv_sigma2 = 0.0 if math.isinf(knobs.locality_width) else 1.0 / knobs.locality_width ** 2
    for s, (h, w) in enumerate(grids):
        sl = slice(offs[s], offs[s] + toks[s])
        ny, nx = _positions(h, w)
        sink = s < sink_scales
        if not sink:
            k[sl, 0], k[sl, 1] = ny, nx
            k[sl, 2], k[sl, 3] = -ny ** 2 / 2, -nx ** 2 / 2
            k[sl, 4] = 1.0
        k[sl, 5] = 1.0 if sink else 0.0
        ay, ax = h * h * inv_sigma2, w * w * inv_sigma2
        q[sl, 0], q[sl, 1], q[sl, 2], q[sl, 3] = ay * ny, ax * nx, ay, ax
        q[sl, 4] = -(ay * ny ** 2 + ax * nx ** 2) / 2
        q[sl, 5] = knobs.sink_strength
        if s < S:
            zq, zk, vv = (_normal(rng, (toks[s], n)) for n in (dc, dc, head_dim))
        elif s == S:
            zq, zk, vv = zq_dec, zk_dec, v_dec
        else:
            up = _nearest((hs, ws), (h, w))
            zq = rho * zq_dec[up] + fresh * _normal(rng, (toks[s], dc))
            zk = knobs.new_key_content * (rho * zk_dec[up] + fresh * _normal(rng, (toks[s], dc)))
            vv = rho * v_dec[up] + fresh * _normal(rng, (toks[s], head_dim))
        q[sl, _FIXED_FEATURES:] = zq * (knobs.content_strength / math.sqrt(dc))
        k[sl, _FIXED_FEATURES:] = zk
        v[sl] = vv
    return q, k, v


class SyntheticSource:
    """Synthetic q/k/v for every (scale, layer) of a model's schedule, generated per layer on demand (seeded).

    Offers the same reading interface as :class:`~sparvar_compiler.fidelity.captures.CaptureSet`:
    ``qkv(scale, layer)``, ``layers``, ``shape()``, ``softmax_scale``, ``schedule``, ``model``, ``release()``,
    plus ``regime(layer)`` and ``describe()``.
    """

    def __init__(self, model: ModelSpec | str, preset: Preset | str, resolution: int | str | None = None,
                 aspect: str | None = None, heads: int = 2, batch: int = 1, seed: int = 0,
                 decision_scale: int | None = None, sink_scales: int | None = None,
                 layers: tuple[int, ...] | None = None) -> None:
        self.model = get_model(model) if isinstance(model, str) else model
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        self.schedule = self.model.schedule(resolution, aspect)
        n = self.schedule.num_scales
        self.decision_scale = max(n - 3, 1) if decision_scale is None else decision_scale
        self.sink_scales = max(1, min(5, n - 5)) if sink_scales is None else sink_scales
        if not 0 < self.decision_scale < n:
            raise SparvarError(f"decision_scale {self.decision_scale} is not in 1..{n - 1}")
        if heads < 1 or batch < 1:
            raise SparvarError("heads and batch must be >= 1")
        self.heads, self.batch, self.seed = heads, batch, seed
        self.softmax_scale, where = family_softmax_scale(self.model)
        self.softmax_scale_source = (f"synthetic data: {where}; q is built so that the logits are the "
                                     "construction's at this scale, so the figures do not depend on it")
        self.layers = tuple(range(self.model.depth)) if layers is None else tuple(layers)
        self.note = f"synthetic preset {self.preset.name}"
        self._cache: tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def shape(self) -> tuple[int, int, int]:
        return self.batch, self.heads, self.model.head_dim

    def regime(self, layer: int) -> str:
        return self.preset.regime(layer, self.model.depth)[0]

    def head_knobs(self, layer: int, head: int) -> HeadKnobs:
        """The knobs of one head: the layer regime's, with the seeded per-head jitter."""
        base = self.preset.regime(layer, self.model.depth)[1]
        r = np.random.default_rng([self.seed, layer, head, 7])
        j = r.standard_normal(3)
        return replace(base, locality_width=base.locality_width * math.exp(0.15 * j[0]),
                       content_strength=base.content_strength * math.exp(0.15 * j[1]),
                       sink_strength=base.sink_strength + 0.3 * j[2])

    def _layer(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._cache is not None and self._cache[0] == layer:
            return self._cache[1]
        total = sum(self.schedule.tokens)
        D = self.model.head_dim
        out = [np.empty((self.batch, self.heads, total, D)) for _ in range(3)]
        for h in range(self.heads):
            knobs = self.head_knobs(layer, h)
            for b in range(self.batch):
                rng = np.random.default_rng([self.seed, layer, h, b])
                q, k, v = synthetic_head(self.schedule, knobs, D, self.decision_scale, self.sink_scales, rng)
                out[0][b, h] = q / self.softmax_scale  # the logits are the construction's at softmax_scale
                out[1][b, h], out[2][b, h] = k, v
        self._cache = (layer, tuple(out))  # type: ignore[assignment]
        return self._cache[1]

    def qkv(self, scale: int, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``q [B, H, tokens(scale), D]`` and ``k, v [B, H, kv_len(scale), D]`` (float64)."""
        q, k, v = self._layer(layer)
        off, t, kv = self.schedule.kv_offsets[scale], self.schedule.tokens[scale], self.schedule.kv_lens[scale]
        return q[:, :, off:off + t], k[:, :, :kv], v[:, :, :kv]

    def release(self, layer: int | None = None) -> None:
        self._cache = None

    def describe(self) -> dict[str, Any]:
        return {"kind": "synthetic", "preset": self.preset.to_dict(self.model.depth), "heads": self.heads,
                "batch": self.batch, "seed": self.seed, "decision_scale": self.decision_scale,
                "sink_scales": self.sink_scales, "softmax_scale": self.softmax_scale,
                "softmax_scale_source": self.softmax_scale_source,
                "note": "synthetic regime built from explicit knobs: figures describe attention in that regime, "
                        "not image quality"}


def write_synthetic_captures(source: SyntheticSource, directory: str | Path, suffix: str = ".npz",
                             dtype: str = "float32", layers: tuple[int, ...] | None = None,
                             progress: Callable[[str], None] | None = None) -> Path:
    """Write a synthetic source as a capture directory (per-scale k/v, like a model's forward hooks would):
    for tests of the capture path and for timing calibration from files."""
    from .hooks import CaptureWriter

    writer = CaptureWriter(directory, source.model, source.schedule.resolution, source.schedule.aspect,
                           softmax_scale=source.softmax_scale, suffix=suffix, dtype=dtype, note=source.note)
    offs, toks = source.schedule.kv_offsets, source.schedule.tokens
    for layer in layers or source.layers:
        q, k, v = source._layer(layer)
        for s in range(source.schedule.num_scales):
            sl = slice(offs[s], offs[s] + toks[s])
            writer.save(s, layer, q[:, :, sl], k[:, :, sl], v[:, :, sl])
        if progress:
            progress(f"  wrote layer {layer}")
    writer.close()
    return Path(directory)
