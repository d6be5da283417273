"""The fidelity report: a printed table per regime, scale and mode, JSON with every figure, a heat-map PNG, and
the calibration's cost vs mass vs error chart.

Every figure carries its regime: ``captured`` (q/k/v of a real model) or the synthetic regime of its layer
(``local``, ``content``, ...). Synthetic figures describe attention in a constructed regime; they are never
image quality, and the report says so. Every report states the softmax scale its figures were computed with and
where that scale came from, what the random baselines keep, and which layers each summary row averages over.
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


def baseline_text(draws: int) -> dict[str, str]:
    """What each random baseline keeps, as the report states it."""
    return {
        "random": (f"as many kv blocks per query block as csla_block; the sink blocks (the kv blocks holding the sink "
                   f"scales' keys, which CSLA always keeps) kept, the other blocks drawn uniformly per (layer, head); "
                   f"mean and sd over {draws} draws"),
        "random_cs4a": (f"as many keys per query as cs4a_token, drawn uniformly per (layer, head, query); no sink kept "
                        f"(token CS4A keeps none for sure either); mean and sd over {draws} draws"),
    }


def layer_ranges(layers) -> str:
    """``0-3, 8, 10-11``."""
    vals = sorted(set(int(x) for x in layers))
    parts, i = [], 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        parts.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ", ".join(parts)


def summarise(ev: Evaluation) -> list[dict[str, Any]]:
    """Per (regime, scale, mode): means over layers and heads of mass, rel. L2 and cosine; the worst row's mass;
    the density (computed pairs / dense pairs); how many (layer, head) figures went in and the ``layers``.

    Every column of a row averages over the same records. The CS4A residual's other choice
    (``rel_l2_no_residual`` when the plan adds it, ``rel_l2_with_residual`` when it does not) counts a record
    the residual does not apply to (a CSLA or dense layer of the ``sparvar`` row) at its own error, so that it
    compares with ``rel_l2`` over the same layers; ``residual_layers`` names the layers it applies to. Random
    rows add ``mass_sd``/``rel_l2_sd``/``cosine_sd``: the mean over (layer, head) of the standard deviation over
    draws, and ``draws``."""
    groups: dict[tuple[str, int, str], list] = defaultdict(list)
    skipped: dict[tuple[str, int], list] = defaultdict(list)
    for r in ev.records:
        if r.status == "skipped":
            skipped[(r.regime, r.scale)].append(r)
            continue
        groups[(r.regime, r.scale, r.mode)].append(r)
    out = []
    for (regime, scale, mode), rs in sorted(groups.items()):
        row: dict[str, Any] = {"regime": regime, "scale": scale, "mode": mode, "n": len(rs),
                               "layers": sorted({r.layer for r in rs})}
        for key in ("mass", "rel_l2", "cosine", "density", "mass_sd", "rel_l2_sd", "cosine_sd"):
            vals = [getattr(r, key) for r in rs if getattr(r, key) is not None]
            if vals:
                row[key] = float(np.mean(vals))
        mins = [r.mass_min for r in rs if r.mass_min is not None]
        if mins:
            row["mass_min"] = float(np.min(mins))
        draws = {r.draws for r in rs if r.draws is not None}
        if draws:
            row["draws"] = max(draws)
        for other in ("rel_l2_no_residual", "rel_l2_with_residual"):
            applies = [r for r in rs if getattr(r, other) is not None]
            if applies and all(r.rel_l2 is not None for r in rs):
                vals = [getattr(r, other) if getattr(r, other) is not None else r.rel_l2 for r in rs]
                row[other] = float(np.mean(vals))
                row["residual_layers"] = sorted({r.layer for r in applies})
        out.append(row)
    for (regime, scale), rs in sorted(skipped.items()):
        out.append({"regime": regime, "scale": scale, "mode": "sparvar", "status": "skipped", "n": len(rs),
                    "layers": sorted({r.layer for r in rs})})
    return out


def softmax_scale_line(value: float | None, source: str | None) -> str:
    if value is None:
        return "softmax scale: not recorded"
    return f"softmax scale: {value:.6g} ({source or 'not stated by the source'})"


def format_table(summary: list[dict[str, Any]], synthetic: bool, softmax_scale: float | None = None,
                 softmax_scale_source: str | None = None, draws: int | None = None) -> str:
    """A plain-text table of :func:`summarise`'s rows, one block per regime, headed by the softmax scale and
    what the random baselines keep (when given)."""
    lines = [SYNTHETIC_NOTE if synthetic else CAPTURED_NOTE]
    if softmax_scale is not None:
        lines.append(softmax_scale_line(softmax_scale, softmax_scale_source))
    if draws is not None and any(r["mode"].startswith("random") for r in summary):
        for mode, text in baseline_text(draws).items():
            if any(r["mode"] == mode for r in summary):
                lines.append(f"{mode}: {text}")
    head = (f"{'scale':>5} {'mode':<16} {'density':>7} {'mass (+-sd)':>13} {'worst':>6} {'rel L2 (+-sd)':>13} "
            f"{'cosine':>7}  n")
    regime = None
    regime_layers: list[int] = []
    for r in summary:
        if r["regime"] != regime:
            regime = r["regime"]
            rows = [x for x in summary if x["regime"] == regime]
            regime_layers = sorted({layer for x in rows for layer in x.get("layers", [])})
            lines += ["", f"regime: {regime}; every row averages over layers {layer_ranges(regime_layers)} (all heads) "
                          "unless it names others", head]
        where = "" if r.get("layers", regime_layers) == regime_layers else f"  layers {layer_ranges(r['layers'])}"
        if r.get("status") == "skipped":
            lines.append(f"{r['scale']:>5} {'sparvar':<16} skipped (scale skipping: no attention computed){where}")
            continue

        def f(key: str, width: int, fmt: str = ".3f") -> str:
            return f"{r[key]:>{width}{fmt}}" if key in r else f"{'-':>{width}}"

        def with_sd(key: str, width: int) -> str:
            if key not in r:
                return f"{'-':>{width}}"
            text = f"{r[key]:.3f}" + (f"+-{r[key + '_sd']:.3f}" if key + "_sd" in r else "")
            return f"{text:>{width}}"

        extra = ""
        for other, label in (("rel_l2_no_residual", "no residual"), ("rel_l2_with_residual", "with residual")):
            if other in r:
                extra = (f"  ({label}: {r[other]:.3f} over the same layers; the residual applies in layers "
                         f"{layer_ranges(r['residual_layers'])})")
        lines.append(f"{r['scale']:>5} {r['mode']:<16} {f('density', 7)} {with_sd('mass', 13)} {f('mass_min', 6)} "
                     f"{with_sd('rel_l2', 13)} {f('cosine', 7)}  {r['n']}{where}{extra}")
    return "\n".join(lines)


def format_report(ev: Evaluation) -> str:
    """:func:`format_table` of an evaluation, with its softmax scale and baselines stated."""
    return format_table(summarise(ev), ev.source.get("kind") == "synthetic", ev.softmax_scale,
                        ev.softmax_scale_source, ev.options.random_draws)


def report_dict(ev: Evaluation, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything of an evaluation as JSON-able data (summary and per-head records)."""
    synthetic = ev.source.get("kind") == "synthetic"
    return {
        "kind": "sparvar-fidelity",
        "note": SYNTHETIC_NOTE if synthetic else CAPTURED_NOTE,
        "regime_source": "synthetic" if synthetic else "captured",
        "model": ev.plan.model, "resolution": ev.plan.resolution, "aspect": ev.plan.aspect,
        "softmax_scale": {"value": ev.softmax_scale, "source": ev.softmax_scale_source},
        "plan_config": ev.plan.config.to_dict(),
        "options": {"block": ev.options.block, "query_sample": ev.options.query_sample,
                    "modes": list(ev.options.modes), "seed": ev.options.seed,
                    "random_draws": ev.options.random_draws},
        "baselines": {m: t for m, t in baseline_text(ev.options.random_draws).items() if m in ev.options.modes},
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


_MODE_TITLES = {"csla_block": "CSLA, whole blocks", "csla_exact": "CSLA, exact tokens",
                "csla_gather": "CSLA, key gather", "random": "random blocks (same density, sinks kept)",
                "cs4a_token": "CS4A, token top-k", "cs4a_block": "CS4A, D-CSLA blocks",
                "random_cs4a": "random keys (CS4A budget, no sinks)", "sparvar": "SparVAR plan (per layer mode)",
                "dense": "dense"}


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
    scale = f"softmax scale {ev.softmax_scale:.6g}" if ev.softmax_scale is not None else "softmax scale not recorded"
    fig.suptitle(f"{ev.plan.model} {ev.plan.resolution} px: softmax mass each plan mode keeps, per (layer, query "
                 f"scale), mean over heads (random: and over {ev.options.random_draws} draws); {scale}\n{what}; "
                 f"S = decision scale; dashed line = bound layer {bound}; '-' = no figure (mode not used there)",
                 fontsize=9.5)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def write_pareto(result: Any, path: str | Path) -> Path | str:
    """A calibration's search as a chart (PNG): attention cost against relative L2 error (left) and captured
    mass (right) of every candidate, each coloured by the third figure (a candidate that misses the mass floor
    has no error figure: grey, right only); the floor and the cap as lines, the Pareto front over (cost, mass,
    error) ringed, the pick starred. Returns the path, or a message if
    matplotlib is missing (the JSON holds the same figures)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return ("matplotlib is not installed: no Pareto chart written (the --json output holds the same figures; "
                "pip install 'sparvar-compiler[plot]')")
    search = [c for c in result.candidates if c.stage == "search"]
    if not search:
        return "no candidate to plot"
    front = [result.candidates[i] for i in result.pareto()]
    floor = result.floor
    measured = np.array([c.rel_error is not None for c in search])
    cost = np.array([100 * c.cost for c in search])
    mass = np.array([c.mass for c in search])
    err = np.array([c.rel_error if c.rel_error is not None else np.nan for c in search])
    ok = np.array([c.feasible for c in search])
    on_front = np.array([any(c is f for f in front) for c in search])
    fig = Figure(figsize=(12, 5), dpi=120)
    axes = fig.subplots(1, 2)
    worst = floor.aggregate == "min"
    panels = ((axes[0], err, mass, f"relative L2 error ({'worst (scale, layer)' if worst else 'mean'})",
               "captured mass", "viridis", floor.max_rel_error),
              (axes[1], mass, err, f"captured mass ({'worst (scale, layer)' if worst else 'mean'})",
               "relative L2 error", "magma_r", floor.min_mass))
    for ax, y, colour, ylabel, clabel, cmap, line in panels:
        known = measured  # the points whose colour (or y) needs the error
        vals = colour[known]
        span = dict(vmin=float(np.min(vals)) if len(vals) else 0.0,
                    vmax=float(np.max(vals)) if len(vals) and np.max(vals) > np.min(vals)
                    else (float(np.min(vals)) if len(vals) else 0.0) + 1e-9)
        sel_ok, sel_bad = ok & known, ~ok & known
        sc = ax.scatter(cost[sel_ok], y[sel_ok], c=colour[sel_ok], cmap=cmap, s=28, edgecolors="black",
                        linewidths=0.6, label="meets the floor (search)", **span)
        if sel_bad.any():
            ax.scatter(cost[sel_bad], y[sel_bad], c=colour[sel_bad], cmap=cmap, s=26, marker="x",
                       label="misses the error cap", **span)
        if y is mass and (~measured).any():
            ax.scatter(cost[~measured], mass[~measured], s=22, marker="x", color="#aaaaaa",
                       label="misses the mass floor (error not measured)")
        ax.scatter(cost[on_front], y[on_front], s=110, facecolors="none", edgecolors="grey", linewidths=1.2,
                   label="Pareto front over (cost, mass, error)", zorder=6)
        if line is not None:
            ax.axhline(line, color="red", linestyle="--", linewidth=1.0,
                       label=("error cap" if y is err else "mass floor") + f" {line:g}")
        pick_y = result.rel_error if y is err else result.mass
        if pick_y is not None:
            ax.scatter([100 * result.cost], [pick_y], marker="*", s=260, color="gold", edgecolors="black",
                       zorder=5, label="recommended (verified on every layer)" + (" - dense" if result.fallback
                                                                                   else ""))
        ax.set_xlabel("attention cost, % of dense (query, key) pairs")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if known.any():
            fig.colorbar(sc, ax=ax, label=clabel + " (search layers)")
        ax.legend(fontsize=7, loc="best")
    synthetic = result.source.get("kind") == "synthetic"
    data = (f"SYNTHETIC preset '{result.source['preset']['name']}' (a regime, not image quality)" if synthetic
            else f"captures {result.source.get('directory')}")
    fig.suptitle(f"calibrate {result.model}: {len(search)} candidates on {data}\nfloor: {floor.describe()}",
                 fontsize=9.5)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
