"""Check-then-time of one kernel on the GPU: the evidence every tuning record carries.

A candidate's time counts only after its output matched a float64 reference built independently from the
layout (dense boolean mask) on fresh random inputs, with the output poisoned first. Timing is the median of
CUDA-event-timed launches, rotating over several input sets so that repeated runs do not measure the L2 cache.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..codegen.reference import layout_mask, reference_attention, relative_error
from ..codegen.spec import DTYPES, KernelSpec
from ..planner.layout import BlockLayout

# Outcomes the tuner may meet; the first five are stored in the database, the last two never reach it (a
# pruned config is never run, and a replay without a record has nothing to store).
INVALID_REASONS = ("compile_error", "wrong_result", "timeout", "out_of_resources", "launch_error", "pruned",
                   "not_recorded")
STORED_REASONS = INVALID_REASONS[:5]


@dataclass
class Measurement:
    """Outcome of one candidate: valid with its timings, or invalid with a reason from ``INVALID_REASONS``."""

    valid: bool
    times_ms: list[float] = field(default_factory=list)
    reason: str | None = None
    detail: str = ""
    rel_err: float | None = None
    ref_err: float | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else math.inf

    def to_dict(self) -> dict:
        return {"valid": self.valid, "times_ms": list(self.times_ms), "reason": self.reason, "detail": self.detail,
                "rel_err": self.rel_err, "ref_err": self.ref_err}

    @classmethod
    def from_dict(cls, d: dict) -> "Measurement":
        return cls(bool(d["valid"]), [float(t) for t in d.get("times_ms", [])], d.get("reason"),
                   str(d.get("detail", "")), d.get("rel_err"), d.get("ref_err"))


def make_inputs(spec: KernelSpec, device: str, generator: torch.Generator, sets: int = 1):
    """``sets`` fresh (q, k, v) triples drawn like Infinity's: L2-normalised q/k rows times a per-head scale."""
    dtype = DTYPES[spec.dtype]
    out = []
    for _ in range(sets):
        q = torch.randn(spec.batch, spec.heads, spec.q_len, spec.head_dim, device=device, generator=generator)
        k = torch.randn(spec.batch, spec.heads, spec.kv_len, spec.head_dim, device=device, generator=generator)
        v = torch.randn(spec.batch, spec.heads, spec.kv_len, spec.head_dim, device=device, generator=generator)
        out.append(tuple(t.to(dtype).contiguous() for t in (q, k, v)))
    return out


def spec_scale(spec: KernelSpec) -> float:
    """Softmax scale used for checks: Infinity's 1.0 is only sensible on normalised q/k, so checks use the
    default 1/sqrt(D) on random inputs for both kinds (the scale is a runtime argument either way)."""
    return 1.0 / math.sqrt(spec.head_dim)


def golden(q, k, v, mask: torch.Tensor, scale: float, chunk_heads: int = 4) -> torch.Tensor:
    """float64 masked attention (:func:`reference_attention`), chunked over heads to bound memory (4096 x 10521
    scores per head)."""
    B, H, _, _ = q.shape
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    m = mask.to(q.device)
    for b in range(B):
        for h0 in range(0, H, chunk_heads):
            sl = (slice(b, b + 1), slice(h0, h0 + chunk_heads))
            mm = m[sl] if m.dim() == 4 else m  # per-(batch, head) masks of dynamic (CS4A) kernels
            out[sl] = reference_attention(q[sl], k[sl], v[sl], mm, scale=scale, dtype=torch.float64)
    return out


def same_dtype_reference(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The same masked attention through SDPA in the inputs' dtype: the error a correct kernel may have."""
    am = mask.to(q.device)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=am, scale=scale)
    empty = ~am.any(-1)
    return out.masked_fill(empty[..., None] if am.dim() == 4 else empty[None, None, :, None], 0.0)


@dataclass
class Prepared:
    """Inputs, float64 golden and the same-dtype reference error of one workload, shared by its candidates."""

    sets: list
    scale: float
    gold: torch.Tensor
    ref_err: float


def prepare(spec: KernelSpec, layout: BlockLayout, *, device: str = "cuda", seed: int = 0, input_sets: int = 4,
            mask_exact: bool | None = None, mask: torch.Tensor | None = None) -> Prepared:
    """Draw the inputs and compute the golden once per workload (the same for every config tried)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    scale = spec_scale(spec)
    if mask is None:
        exact = spec.token_exact if mask_exact is None else mask_exact
        mask = layout_mask(layout, exact, device)
    sets = make_inputs(spec, device, gen, input_sets)
    q, k, v = sets[0]
    gold = golden(q, k, v, mask, scale)
    ref = relative_error(same_dtype_reference(q, k, v, mask, scale), gold)
    return Prepared(sets, scale, gold, ref)


def check_and_time(spec: KernelSpec, layout: BlockLayout, kernel: Callable, *, prepared: Prepared | None = None,
                   device: str = "cuda", seed: int = 0, factor: float = 3.0, warmup: int = 5, reps: int = 50,
                   input_sets: int = 4, mask_exact: bool | None = None,
                   mask: torch.Tensor | None = None) -> Measurement:
    """Check ``kernel(q, k, v, scale=..., out=...)`` against float64, then time it with CUDA events.

    ``mask`` defaults to the layout expanded (whole blocks, or exact token masks when ``spec.token_exact``).
    The output is poisoned with NaN before the checked call.
    """
    p = prepared or prepare(spec, layout, device=device, seed=seed, input_sets=input_sets, mask_exact=mask_exact,
                            mask=mask)
    sets, scale = p.sets, p.scale
    q, k, v = sets[0]
    out = torch.full_like(q, float("nan"))
    try:
        kernel(q, k, v, scale=scale, out=out)
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
        return Measurement(False, reason="out_of_resources", detail=str(e)[:500])
    except Exception as e:  # noqa: BLE001 - any launch failure makes the candidate invalid, with the reason
        return Measurement(False, reason="launch_error", detail=f"{type(e).__name__}: {e}"[:500])
    err = relative_error(out, p.gold)
    if not err <= max(factor * p.ref_err, 1e-6):
        return Measurement(False, reason="wrong_result", detail=f"rel_err {err:.3g} vs reference {p.ref_err:.3g}",
                           rel_err=err, ref_err=p.ref_err)
    outs = [torch.empty_like(q) for _ in sets]
    for i in range(warmup):
        qq, kk, vv = sets[i % len(sets)]
        kernel(qq, kk, vv, scale=scale, out=outs[i % len(sets)])
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        qq, kk, vv = sets[i % len(sets)]
        starts[i].record()
        kernel(qq, kk, vv, scale=scale, out=outs[i % len(sets)])
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return Measurement(True, times, rel_err=err, ref_err=p.ref_err)
