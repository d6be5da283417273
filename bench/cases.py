"""Cases of the GPU kernel benchmark (bench/kernels.py), as data: one per (model, query scale, block size).

Every case is one attention call of the largest scales of Infinity at 1024x1024 1:1 with classifier-free
guidance (batch 2), bf16, head dim 128, the softmax scale 1/sqrt(d), and the static CSLA layout that SparVAR
uses there, built by the planner (with token masks, which the key-gather kernel needs; block-level kernels
ignore them). The tag ``model/s<scale>/<bm>x<bn>`` names a case on the command line and in the results.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from sparvar_compiler.planner import BlockLayout, csla_layout, get_model, make_plan

MODELS = ("infinity-8b", "infinity-2b")
QUERY_SCALES = (10, 11, 12)
BLOCKS = (64, 128)
BATCH = 2  # classifier-free guidance doubles the batch of one image


@dataclass(frozen=True)
class KernelCase:
    """One benchmarked attention call."""

    model: str
    query_scale: int
    block_m: int
    block_n: int
    batch: int
    heads: int
    head_dim: int
    dtype: str = "bf16"

    @property
    def tag(self) -> str:
        return f"{self.model}/s{self.query_scale}/{self.block_m}x{self.block_n}"

    def layout(self) -> BlockLayout:
        """The case's CSLA layout (with token masks; cached by the planner)."""
        return _layout(self.model, self.query_scale, self.block_m, self.block_n)

    def to_dict(self) -> dict:
        return {"model": self.model, "query_scale": self.query_scale, "block_m": self.block_m,
                "block_n": self.block_n, "batch": self.batch, "heads": self.heads, "head_dim": self.head_dim,
                "dtype": self.dtype}


@lru_cache(maxsize=None)
def _layout(model: str, query_scale: int, block_m: int, block_n: int) -> BlockLayout:
    return csla_layout(make_plan(model), query_scale, block_m, block_n, token_masks=True)


def make_case(model: str, query_scale: int, block: int) -> KernelCase:
    m = get_model(model)
    return KernelCase(m.name, query_scale, block, block, BATCH, m.heads, m.head_dim)


CASES: tuple[KernelCase, ...] = tuple(make_case(m, s, b) for m in MODELS for s in QUERY_SCALES for b in BLOCKS)


def select(models: Iterable[str] | None = None, scales: Iterable[int] | None = None,
           blocks: Iterable[int] | None = None) -> list[KernelCase]:
    """The cases matching every given filter (None: all), in the order of :data:`CASES`.

    Models, scales or blocks outside the default set make new cases (any registered model works).
    """
    models = tuple(models) if models else MODELS
    scales = tuple(scales) if scales else QUERY_SCALES
    blocks = tuple(blocks) if blocks else BLOCKS
    return [make_case(m, s, b) for m in models for s in scales for b in blocks]
