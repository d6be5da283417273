"""Plan summaries: per scale grid, lengths, modes and block sparsity, and the attention work kept for an image."""

from __future__ import annotations

from typing import Any

from .cs4a import cs4a_tables, dcsla_capacity
from .csla import csla_layout, plan_token_mask
from .plan import Mode, Plan


def plan_summary(plan: Plan, block_m: int = 128, block_n: int = 128) -> dict[str, Any]:
    """A JSON-ready summary of a plan: ``scales`` (each with ``index``, ``h``, ``w``, ``tokens``, ``kv_len``,
    ``modes`` and, where CSLA is planned, a ``layout`` object), CS4A budgets and the attention FLOPs of one
    image kept versus dense (counted as 4 * queries * keys * head_dim per head, the same batch for both)."""
    cfg = plan.config
    tables = cs4a_tables(plan)
    per_pair = 4 * plan.head_dim * plan.heads
    dense_total = kept_total = 0
    scales = []
    for s in plan.scales:
        item: dict[str, Any] = {
            "index": s.index, "h": s.h, "w": s.w, "tokens": s.tokens, "kv_offset": s.kv_offset,
            "kv_len": s.kv_len, "modes": s.mode_counts(), "modes_text": s.modes_text(),
        }
        dense_pairs = s.tokens * s.kv_len
        pairs = {Mode.DENSE: dense_pairs, Mode.DECISION: dense_pairs, Mode.SKIPPED: 0}
        if s.has_csla:
            layout = csla_layout(plan, s.index, block_m, block_n, token_masks=False)
            exact = int(plan_token_mask(plan, s.index).sum()) if cfg.token_exact else None
            pairs[Mode.CSLA] = exact if exact is not None else layout.computed_pairs()
            item["layout"] = {
                "block_m": block_m, "block_n": block_n, "q_blocks": layout.q_blocks,
                "kv_blocks": layout.kv_blocks, "active_blocks": layout.num_active,
                "full_blocks": int(layout.full_indices.size),
                "partial_blocks": int(layout.partial_indices.size),
                "sparsity": layout.sparsity(), "hash": layout.content_hash(),
            }
        if Mode.CS4A in s.modes and tables is not None:
            t = tables.scale(s.index)
            if cfg.cs4a == "token":
                keys = min(t.budget, s.kv_len)
                item["cs4a"] = {"kind": "token", "budget_keys": keys, "topk": t.topk,
                                "band_capacity": t.band_capacity, "sink_keys": t.sink_keys}
            else:
                kvb = -(-s.kv_len // block_n)
                cap = dcsla_capacity(kvb)
                keys = min(cap * block_n, s.kv_len)
                item["cs4a"] = {"kind": "block", "capacity_blocks": cap, "kv_blocks": kvb}
            pairs[Mode.CS4A] = s.tokens * keys
        kept = sum(pairs[m] for m in s.modes)
        dense = dense_pairs * len(s.modes)
        item["flops_dense"] = dense * per_pair
        item["flops_kept"] = kept * per_pair
        dense_total += dense
        kept_total += kept
        scales.append(item)
    return {
        "model": plan.model, "resolution": plan.resolution, "aspect": plan.aspect, "depth": plan.depth,
        "heads": plan.heads, "head_dim": plan.head_dim, "config": cfg.to_dict(),
        "block_m": block_m, "block_n": block_n, "scales": scales,
        "cs4a": tables.summary() if tables is not None else None,
        "image": {"flops_dense": dense_total * per_pair, "flops_kept": kept_total * per_pair,
                  "kept_fraction": kept_total / dense_total if dense_total else 0.0},
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The plan as a text table."""
    c = summary["config"]
    lines = [
        f"{summary['model']}  {summary['resolution']} px  aspect {summary['aspect']} (h:w)  "
        f"{summary['depth']} layers x {summary['heads']} heads x {summary['head_dim']}",
        f"decision scale {c['decision_scale']}, bound layer {c['bound_layer']}, sink scales 0-"
        f"{c['sink_scales'] - 1}, windows {c['windows']}, skip last {c['skip_last']}, cs4a {c['cs4a']} "
        f"({c['key_mapping']}), token exact {c['token_exact']}",
        "",
        f"{'scale':>5} {'grid':>9} {'tokens':>7} {'kv_len':>7}  {'sparsity':>8}  {'kept':>6}  modes",
    ]
    for s in summary["scales"]:
        sp = f"{100 * s['layout']['sparsity']:7.1f}%" if "layout" in s else f"{'-':>8}"
        kept = s["flops_kept"] / s["flops_dense"] if s["flops_dense"] else 0.0
        extra = ""
        if "cs4a" in s:
            cs = s["cs4a"]
            extra = (f"  [cs4a {cs['budget_keys']} keys]" if cs["kind"] == "token"
                     else f"  [d-csla <= {cs['capacity_blocks']} blocks]")
        grid = f"{s['h']}x{s['w']}"
        lines.append(f"{s['index']:>5} {grid:>9} {s['tokens']:>7} {s['kv_len']:>7}  {sp}  "
                     f"{100 * kept:5.1f}%  {s['modes_text']}{extra}")
    img = summary["image"]
    lines += [
        "",
        f"sparsity: fraction of {summary['block_m']}x{summary['block_n']} blocks skipped by CSLA; kept: attention "
        "FLOPs kept vs dense",
        f"image self-attention: {img['flops_kept'] / 1e12:.3f} of {img['flops_dense'] / 1e12:.3f} TFLOP per "
        f"batch element kept ({100 * img['kept_fraction']:.1f}%, {1 / max(img['kept_fraction'], 1e-12):.2f}x "
        "fewer)",
    ]
    return "\n".join(lines)
