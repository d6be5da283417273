"""The fidelity report: a printed table per regime, scale and mode, JSON with every figure, a heat-map PNG.

Every figure carries its regime: ``captured`` (q/k/v of a real model) or the synthetic regime of its layer
(``local``, ``content``, ...). Synthetic figures describe attention in a constructed regime; they are never
image quality, and the report says so.
"""

from __future__ import annotations

import json
import platform
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from .evaluate import Evaluation

SYNTHETIC_NOTE = ("SYNTHETIC regime: q/k/v built from explicit knobs (sinks, locality, cross-scale similarity, "
                  "content); figures show how each plan mode treats that regime, not image quality")
CAPTURED_NOTE = "captured q/k/v of a real model: attention fidelity per call, not image quality (no PSNR here)"
HEATMAP_MODES = ("csla_block", "cs4a_token", "random", "sparvar")


def summarise(ev: Evaluation) -> list[dict[str, Any]]:
    """Per (regime, scale, mode): means over layers and heads of mass, rel. L2 and cosine; the worst row's mass;
    the density (computed pairs / dense pairs); how many (layer, head) figures went in."""
    groups: dict[tuple[str, int, str], list] = defaultdict(list)
    skipped: dict[tuple[str, int], int] = defaultdict(int)
    for r in ev.records:
        if r.status == "skipped":
            skipped[(r.regime, r.scale)] += 1
            continue
        groups[(r.regime, r.scale, r.mode)].append(r)
    out = []
    for (regime, scale, mode), rs in sorted(groups.items()):
        row: dict[str, Any] = {"regime": regime, "scale": scale, "mode": mode, "n": len(rs)}
        for key in ("mass", "rel_l2", "cosine", "density", "rel_l2_no_residual"):
            vals = [getattr(r, key) for r in rs if getattr(r, key) is not None]
            if vals:
                row[key] = float(np.mean(vals))
        mins = [r.mass_min for r in rs if r.mass_min is not None]
        if mins:
            row["mass_min"] = float(np.min(mins))
        out.append(row)
    for (regime, scale), n in sorted(skipped.items()):
        out.append({"regime": regime, "scale": scale, "mode": "sparvar", "status": "skipped", "n": n})
    return out


def format_table(summary: list[dict[str, Any]], synthetic: bool) -> str:
    """A plain-text table of :func:`summarise`'s rows, one block per regime."""
    lines = [SYNTHETIC_NOTE if synthetic else CAPTURED_NOTE]
    head = f"{'scale':>5} {'mode':<16} {'density':>7} {'mass':>6} {'worst':>6} {'rel L2':>7} {'cosine':>7}  n"
    regime = None
    for r in summary:
        if r["regime"] != regime:
            regime = r["regime"]
            lines += ["", f"regime: {regime}", head]
        if r.get("status") == "skipped":
            lines.append(f"{r['scale']:>5} {'sparvar':<16} skipped (scale skipping: no attention computed)")
            continue

        def f(key: str, width: int, fmt: str = ".3f") -> str:
            return f"{r[key]:>{width}{fmt}}" if key in r else f"{'-':>{width}}"

        extra = f"  (no residual: {r['rel_l2_no_residual']:.3f})" if "rel_l2_no_residual" in r else ""
        lines.append(f"{r['scale']:>5} {r['mode']:<16} {f('density', 7)} {f('mass', 6)} {f('mass_min', 6)} "
                     f"{f('rel_l2', 7)} {f('cosine', 7)}  {r['n']}{extra}")
    return "\n".join(lines)


def report_dict(ev: Evaluation, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything of an evaluation as JSON-able data (summary and per-head records)."""
    synthetic = ev.source.get("kind") == "synthetic"
    return {
        "kind": "sparvar-fidelity",
        "note": SYNTHETIC_NOTE if synthetic else CAPTURED_NOTE,
        "regime_source": "synthetic" if synthetic else "captured",
        "model": ev.plan.model, "resolution": ev.plan.resolution, "aspect": ev.plan.aspect,
        "plan_config": ev.plan.config.to_dict(),
        "options": {"block": ev.options.block, "query_sample": ev.options.query_sample,
                    "modes": list(ev.options.modes), "seed": ev.options.seed},
        "rows_per_scale": {str(k): v for k, v in ev.rows.items()},
        "source": ev.source,
        "seconds": round(ev.seconds, 2),
        "notes": ev.notes,
        "environment": {"sparvar": __version__, "torch": torch.__version__, "numpy": np.__version__,
                        "python": platform.python_version(), "machine": platform.machine(), "device": "cpu"},
        **(extra or {}),
        "summary": summarise(ev),
        "records": [r.to_dict() for r in ev.records],
    }


def write_json(ev: Evaluation, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report_dict(ev, extra), indent=1) + "\n")
    return p


def heatmap_grid(ev: Evaluation, mode: str, key: str = "mass") -> tuple[list[int], list[int], np.ndarray]:
    """``(layers, scales, values [layers, scales])``: the head-mean of ``key`` per (layer, scale); NaN where
    the mode has no figure (e.g. CS4A at the decision scale, skipped scales)."""
    layers = sorted({r.layer for r in ev.records})
    scales = sorted({r.scale for r in ev.records})
    acc: dict[tuple[int, int], list[float]] = defaultdict(list)
    for r in ev.records:
        if r.mode == mode and r.status == "ok" and getattr(r, key) is not None:
            acc[(r.layer, r.scale)].append(getattr(r, key))
    grid = np.full((len(layers), len(scales)), np.nan)
    for (layer, scale), vals in acc.items():
        grid[layers.index(layer), scales.index(scale)] = float(np.mean(vals))
    return layers, scales, grid


def write_heatmap(ev: Evaluation, path: str | Path, modes: tuple[str, ...] = HEATMAP_MODES) -> Path | str:
    """A PNG of captured mass (layers x scales) per mode. Returns the path, or a message if matplotlib is
    missing (the JSON has the same figures)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no heat map written (the JSON holds the same figures)"
    present = [m for m in modes if any(r.mode == m for r in ev.records)]
    if not present:
        return "no figures to plot"
    fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present) + 1, 4.5), dpi=110, squeeze=False)
    im = None
    for i, (ax, mode) in enumerate(zip(axes[0], present)):
        layers, scales, grid = heatmap_grid(ev, mode)
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(mode, fontsize=9)
        ax.set_xticks(range(len(scales)), [str(s) for s in scales], fontsize=7)
        step = max(1, len(layers) // 12)
        ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)],
                      fontsize=7)
        ax.set_xlabel("query scale")
        if i == 0:
            ax.set_ylabel("layer")
    synthetic = ev.source.get("kind") == "synthetic"
    what = f"synthetic preset {ev.source['preset']['name']} (regime, not image quality)" if synthetic else "captured"
    fig.suptitle(f"{ev.plan.model}: captured softmax mass per (layer, scale), head mean; {what}", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="captured mass")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
