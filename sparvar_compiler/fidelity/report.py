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


#: Bin edges of the heat map's mass colours, below and above the floor: reds below it, blues above it.
_BELOW_EDGES = (0.5, 0.7, 0.8)
_ABOVE_EDGES = (0.95, 0.98, 0.99, 0.999)
_REDS = ("#67000d", "#a50f15", "#de2d26", "#fb6a4a", "#fcbba1")   # dark (mass 0) -> light (just under floor)
_BLUES = ("#dbe9f6", "#9ecae1", "#5a9fd0", "#2171b5", "#08306b")  # light (just over floor) -> dark (1.0)
_NO_FIGURE = "#e4e4e4"


def mass_bins(floor: float = 0.9) -> tuple[list[float], list[str]]:
    """``(edges, colours)`` of the heat map: ``len(edges) == len(colours) + 1``, from 0 to 1, with ``floor`` an
    edge. Bins below the floor are reds (darker the lower), bins at or above it blues (darker the closer to 1),
    so a mass of 0.9 and 1.0 differ in lightness and anything under the floor differs in hue. Above the floor the
    bins are finer (0.95, 0.98, 0.99, 0.999): the difference between 0.99 and 1.0 is what a sparse plan is
    judged on."""
    if not 0.0 < floor < 1.0:
        raise ValueError(f"floor must be between 0 and 1, got {floor!r}")
    below = [0.0] + [e for e in _BELOW_EDGES if e < floor] + [floor]
    above = [e for e in _ABOVE_EDGES if e > floor] + [1.0]
    n_below, n_above = len(below) - 1, len(above)
    colours = list(_REDS[-n_below:]) if n_below <= len(_REDS) else list(_REDS) * n_below
    colours += list(_BLUES[-n_above:])
    return below + above, colours


def mass_colour(mass: float | None, floor: float = 0.9) -> str:
    """The heat map's colour (``#rrggbb``) of one captured-mass figure; grey for None or NaN."""
    if mass is None or not np.isfinite(mass):
        return _NO_FIGURE
    edges, colours = mass_bins(floor)
    i = int(np.searchsorted(edges, min(max(float(mass), 0.0), 1.0), side="right")) - 1
    return colours[min(i, len(colours) - 1)]


def _dark(hex_colour: str) -> bool:
    r, g, b = (int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return 0.299 * r + 0.587 * g + 0.114 * b < 0.5


def _mass_label(v: float) -> str:
    """``1`` for 1 (to float32 rounding); 4 decimals at or above 0.999 so that 0.9996 never reads as 1; else 3."""
    if v >= 1.0 - 1e-6:
        return "1"
    text = f"{v:.4f}" if v >= 0.999 else f"{v:.3f}"
    return ">.9999" if text.startswith("1") else text.removeprefix("0")


_MODE_TITLES = {"csla_block": "CSLA, whole blocks", "csla_exact": "CSLA, exact tokens", "csla_gather":
                "CSLA, key gather", "random": "random blocks (same density)", "cs4a_token": "CS4A, token top-k",
                "cs4a_block": "CS4A, D-CSLA blocks", "random_cs4a": "random keys (CS4A budget)",
                "sparvar": "SparVAR plan (per layer mode)", "dense": "dense"}


def write_heatmap(ev: Evaluation, path: str | Path, modes: tuple[str, ...] = HEATMAP_MODES,
                  floor: float = 0.9) -> Path | str:
    """A PNG of captured mass (layers x scales) per mode, coloured by :func:`mass_bins` around ``floor`` and
    annotated with each value while the grid is small enough to read. Returns the path, or a message if
    matplotlib is missing (the JSON has the same figures)."""
    try:
        from matplotlib.colors import BoundaryNorm, ListedColormap
        from matplotlib.figure import Figure
    except ImportError:
        return ("matplotlib is not installed: no heat map written (the JSON holds the same figures; "
                "pip install 'sparvar-compiler[plot]')")
    present = [m for m in modes if any(r.mode == m for r in ev.records)]
    if not present:
        return "no figures to plot"
    edges, colours = mass_bins(floor)
    cmap = ListedColormap(colours).with_extremes(bad=_NO_FIGURE)
    norm = BoundaryNorm(edges, cmap.N)
    layers, scales, _ = heatmap_grid(ev, present[0])
    annotate = len(layers) <= 32 and len(scales) <= 14
    panel_w = max(2.4, 0.62 * len(scales) + 0.9)
    height = max(4.2, 0.27 * len(layers) + 2.6)
    width = panel_w * len(present) + 1.6
    fig = Figure(figsize=(width, height), dpi=120)
    grid = fig.add_gridspec(1, len(present) + 1, width_ratios=[1.0] * len(present) + [0.06],
                            left=0.75 / width, right=1 - 0.75 / width, top=1 - 1.05 / height, bottom=0.85 / height,
                            wspace=0.12)
    cfg = ev.plan.config
    bound = cfg.bound_layer
    S = cfg.decision_scale
    im = None
    for i, mode in enumerate(present):
        ax = fig.add_subplot(grid[0, i])
        _, _, values = heatmap_grid(ev, mode)
        _, _, density = heatmap_grid(ev, mode, "density")
        im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        if annotate:
            for (r, c), v in np.ndenumerate(values):
                text, colour = ("-", "#777777") if not np.isfinite(v) else \
                    (_mass_label(v), "white" if _dark(mass_colour(v, floor)) else "black")
                ax.text(c, r, text, ha="center", va="center", fontsize=7, color=colour)
        ax.set_xticks(range(len(scales)), [f"{s}{' S' if s == S else ''}\n{ev.plan.scales[s].h}x"
                                           f"{ev.plan.scales[s].w}" for s in scales], fontsize=7.5)
        ax.set_xticks(np.arange(len(scales) + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(len(layers) + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", linewidth=0.8)
        ax.tick_params(which="minor", length=0)
        step = max(1, -(-len(layers) // 32))
        if i == 0:
            ax.set_yticks(range(0, len(layers), step), [str(layers[j]) for j in range(0, len(layers), step)],
                          fontsize=7.5)
            ax.set_ylabel("layer", fontsize=9)
        else:
            ax.set_yticks(range(0, len(layers), step), [])
        if bound is not None and layers[0] < bound <= layers[-1]:
            row = next(j for j, layer in enumerate(layers) if layer >= bound)
            ax.axhline(row - 0.5, color="black", linewidth=1.3, linestyle="--")
        ax.set_xlabel("query scale", fontsize=8.5)
        mean_density = np.nanmean(density) if np.isfinite(density).any() else float("nan")
        sub = f"keeps {100 * mean_density:.0f}% of pairs" if np.isfinite(mean_density) else ""
        ax.set_title(f"{_MODE_TITLES.get(mode, mode)}\n{mode}" + (f", {sub}" if sub else ""), fontsize=8.5)
    cax = fig.add_subplot(grid[0, -1])
    bar = fig.colorbar(im, cax=cax, spacing="uniform", ticks=edges)
    bar.ax.set_yticklabels([f"{e:g}".removeprefix("0") if 0 < e < 1 else f"{e:g}" for e in edges], fontsize=7.5)
    bar.ax.axhline(floor, color="black", linewidth=2.0)
    bar.set_label(f"captured softmax mass (floor {floor:g}: reds below, blues above)", fontsize=8)
    synthetic = ev.source.get("kind") == "synthetic"
    what = (f"SYNTHETIC preset '{ev.source['preset']['name']}': a regime, not image quality" if synthetic
            else "captured q/k/v")
    fig.suptitle(f"{ev.plan.model} {ev.plan.resolution} px: softmax mass each plan mode keeps, per (layer, query "
                 f"scale), mean over heads\n{what}; S = decision scale; dashed line = bound layer {bound}; "
                 f"'-' = no figure (mode not used there)",
                 fontsize=9.5)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
