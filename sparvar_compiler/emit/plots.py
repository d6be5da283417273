"""Pictures of an emitted runtime module: what runs at every (layer, scale), and what it is expected to cost.

:func:`plot_dispatch` draws two panels from a module's ``manifest.json`` (``runtime.read_manifest`` or
``json.load``):

(a) a layer x scale map coloured by the op the runtime dispatches (dense / decision / CS4A / CSLA / skip);
(b) at every scale with a sparse op, the expected ms of one call (one layer) of each op against dense attention
    of the same ``(q_len, kv_len)`` shape.

The numbers come from two pure functions, :func:`dispatch_grid` and :func:`expected_ms_per_scale` (and the
whole-image :func:`image_estimate`), so they can be checked without looking at a picture.

Where the figures come from
---------------------------
* Sparse kernels: ``expected_ms`` of the manifest (the tuning database's measured median for the tuned config).
  An untuned kernel has none; it is drawn hatched at a *FLOP estimate*: the dense estimate of its shape scaled by
  the fraction of keys it reads (``1 - sparsity`` for CSLA, ``capacity / kv_len`` for CS4A).
* Dense attention is not measured by the compiler. It is estimated as
  ``4 * B * H * q_len * kv_len * D / rate + DENSE_CALL_OVERHEAD_MS`` with ``rate`` from :data:`DENSE_TFLOPS`.
* The decision scale's layers below the bound layer run dense attention plus CS4A statistics, top-k selection and
  (with the residual on) a sparse pass of the decision scale itself. The residual pass is counted (its kernel has
  an ``expected_ms``); statistics, selection and the table fills of later scales have no figure in the manifest
  and are **not** counted, so the sparse totals are a little low where CS4A is on.

matplotlib is optional (``pip install 'sparvar-compiler[plot]'``); it is imported only when a picture is drawn,
and through :class:`matplotlib.figure.Figure`, so drawing never switches a caller's pyplot backend.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SparvarError

#: Dense attention rate (TFLOP/s, bf16, causal-free, D=128) per target GPU, and where it comes from.
#: h100: SPEC.md "cuDNN dense reaches ~570-620 TFLOP/s on these shapes"; 570 reproduces its measured cuDNN
#: 2.169 ms at Infinity-8B scale 12 (4096 x 10521, B=2, 28 heads). h200: SPEC.md's H200 run, cuDNN dense
#: 2.236 ms on the same shape (553 TFLOP/s). The others are ROUGH figures (not measured by us): h100-pcie is
#: the H100 figure scaled by the PCIe/SXM bf16 peak ratio (756/989); a100 is FlashAttention-2's published
#: forward rate on an A100 (~230); l40s is ~55% of its 362 TFLOP/s bf16 peak; b200 is ~60% of its 2250 peak.
DENSE_TFLOPS: dict[str, float] = {"h100": 570.0, "h200": 553.0, "h100-pcie": 435.0, "a100": 230.0,
                                  "l40s": 200.0, "b200": 1400.0}
#: GPUs whose :data:`DENSE_TFLOPS` entry comes from a measurement in SPEC.md; the rest are labelled "rough".
MEASURED_DENSE_RATES = frozenset({"h100", "h200"})
#: Fixed cost of one dense call (launch and short-shape inefficiency), in ms. Fitted on SPEC.md's H100 figures:
#: cuDNN over all 13 scales of one Infinity-8B layer takes 3.67 ms, scales 10-12 alone 3.31 ms, while the FLOPs
#: of scales 0-9 at 570 TFLOP/s take 0.20 ms: 0.16 ms over 10 calls. With it, the estimate of scales 10 / 11 / 12
#: is 0.348 / 0.761 / 2.184 ms against the measured 0.367 / 0.776 / 2.169.
DENSE_CALL_OVERHEAD_MS = 0.016

#: Op names in the order of :func:`dispatch_grid`'s codes, and the manifest ``dispatch[*].op`` each one is.
OPS: tuple[str, ...] = ("dense", "decision", "CS4A", "CSLA", "skip")
_MANIFEST_OPS = {"sdpa": 0, "cs4a_decision": 1, "cs4a": 2, "kernel": 3, "skip": 4}
_OP_COLOURS = ("#c3c8cf", "#8c62b8", "#ee8a3c", "#2b74b3", "#ffffff")
_OP_LABELS = ("dense (SDPA)", "decision: dense + CS4A statistics", "CS4A (dynamic top-k keys)",
              "CSLA (static block-sparse)", "skipped scale")
_PLOT_EXTRA = "pip install 'sparvar-compiler[plot]'"


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SparvarError(f"drawing a picture needs matplotlib: {_PLOT_EXTRA}") from None
    return Figure


# ---------------------------------------------------------------------------------------------- pure figures
def dense_attention_ms(q_len: int, kv_len: int, batch: int, heads: int, head_dim: int, gpu: str) -> float | None:
    """Estimated ms of one dense attention call on ``gpu`` (see :data:`DENSE_TFLOPS`); None for an unknown GPU."""
    rate = DENSE_TFLOPS.get(gpu)
    if rate is None:
        return None
    flops = 4.0 * batch * heads * q_len * kv_len * head_dim
    return flops / (rate * 1e12) * 1e3 + DENSE_CALL_OVERHEAD_MS


def dispatch_grid(manifest: dict[str, Any]) -> tuple[np.ndarray, tuple[str, ...]]:
    """``(ops [depth, scales] int8, OPS)``: the op code of every (layer, scale) of the manifest's dispatch.

    ``ops[layer, scale]`` indexes :data:`OPS`. Raises :class:`SparvarError` if a row names an unknown op or a
    (layer, scale) is missing or listed twice.
    """
    plan = manifest["plan"]
    depth, n = int(plan["depth"]), len(plan["scales"])
    grid = np.full((depth, n), -1, dtype=np.int8)
    for row in manifest["dispatch"]:
        op = _MANIFEST_OPS.get(row["op"])
        if op is None:
            raise SparvarError(f"manifest dispatch op {row['op']!r} is not one of {', '.join(_MANIFEST_OPS)}")
        layer, scale = int(row["layer"]), int(row["scale"])
        if not (0 <= layer < depth and 0 <= scale < n) or grid[layer, scale] != -1:
            raise SparvarError(f"manifest dispatch row (scale {scale}, layer {layer}) is out of range or repeated")
        grid[layer, scale] = op
    if np.any(grid < 0):
        layer, scale = (int(x) for x in np.argwhere(grid < 0)[0])
        raise SparvarError(f"manifest dispatch has no row for scale {scale}, layer {layer}")
    return grid, OPS


def _kernel_cost(entry: dict[str, Any], kept: float, dense_ms: float | None) -> dict[str, Any]:
    ms = entry.get("expected_ms")
    estimate = None
    if dense_ms is not None:
        estimate = kept * (dense_ms - DENSE_CALL_OVERHEAD_MS) + DENSE_CALL_OVERHEAD_MS
    return {"ms": None if ms is None else float(ms), "tuned": bool(entry.get("tuned")), "kept": kept,
            "flop_estimate_ms": estimate, "cost_ms": float(ms) if ms is not None else estimate}


def _cs4a_kept(entry: dict[str, Any], kv_len: int) -> float:
    spec = entry.get("spec", {})
    capacity = int(spec.get("capacity") or entry.get("tables", {}).get("capacity") or kv_len)
    keys = capacity * int(spec.get("block_n", 1)) if spec.get("kind") == "block" else capacity
    return min(1.0, keys / kv_len)


def expected_ms_per_scale(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Per scale of the plan, the calls per image and the expected ms of one call of each op.

    Each item has ``scale``, ``grid`` (h, w), ``q_len``, ``kv_len``, ``calls`` (op name -> layers running it),
    ``dense_ms`` (estimate of one dense call, None for a GPU without a :data:`DENSE_TFLOPS` entry), and, where the
    scale has them, ``csla`` / ``cs4a`` / ``residual`` (the decision scale's residual pass) dicts with ``kernel``,
    ``ms`` (the manifest's ``expected_ms``; None if untuned), ``tuned``, ``kept`` (fraction of keys read),
    ``flop_estimate_ms`` and ``cost_ms`` (``ms``, else the FLOP estimate). ``image_ms`` holds ``sparse`` (this
    module, summed over the scale's layers) and ``dense`` (dense attention for the same non-skipped calls); a
    figure is None when it cannot be estimated.
    """
    ops, _ = dispatch_grid(manifest)
    plan = manifest["plan"]
    gpu = manifest["target"]["name"]
    batch = int(manifest.get("batch") or 2)
    heads, head_dim = int(plan["heads"]), int(plan["head_dim"])
    cs4a = manifest.get("cs4a") or {}
    cs4a_scales = cs4a.get("scales", {})
    kernel_of = {int(r["scale"]): r["kernel"] for r in manifest["dispatch"] if r["op"] == "kernel"}
    out = []
    for s in plan["scales"]:
        i, q_len, kv_len = int(s["index"]), int(s["tokens"]), int(s["kv_len"])
        counts = np.bincount(ops[:, i], minlength=len(OPS))
        dense = dense_attention_ms(q_len, kv_len, batch, heads, head_dim, gpu)
        item: dict[str, Any] = {"scale": i, "grid": (int(s["h"]), int(s["w"])), "q_len": q_len, "kv_len": kv_len,
                                "calls": {name: int(c) for name, c in zip(OPS, counts)}, "dense_ms": dense,
                                "csla": None, "cs4a": None, "residual": None}
        if counts[OPS.index("CSLA")]:
            name = kernel_of[i]
            entry = manifest["kernels"][name]
            item["csla"] = {"kernel": name, **_kernel_cost(entry, 1.0 - float(entry["sparsity"]), dense)}
        if counts[OPS.index("CS4A")]:
            entry = cs4a_scales[str(i)]
            item["cs4a"] = {"kernel": entry["name"], **_kernel_cost(entry, _cs4a_kept(entry, kv_len), dense)}
        if counts[OPS.index("decision")] and cs4a.get("residual") and str(i) in cs4a_scales:
            entry = cs4a_scales[str(i)]
            item["residual"] = {"kernel": entry["name"], **_kernel_cost(entry, _cs4a_kept(entry, kv_len), dense)}
        residual = item["residual"]["cost_ms"] if item["residual"] else 0.0
        per_call = {"dense": dense, "skip": 0.0,
                    "CSLA": item["csla"] and item["csla"]["cost_ms"],
                    "CS4A": item["cs4a"] and item["cs4a"]["cost_ms"],
                    "decision": None if dense is None or residual is None else dense + residual}
        sparse: float | None = 0.0
        for name, c in item["calls"].items():
            if c:
                cost = per_call[name]
                sparse = None if cost is None or sparse is None else sparse + c * cost
        executed = int(ops.shape[0] - counts[OPS.index("skip")])
        item["image_ms"] = {"sparse": sparse, "dense": None if dense is None else executed * dense,
                            "dense_unskipped": None if dense is None else ops.shape[0] * dense}
        out.append(item)
    return out


def image_estimate(manifest: dict[str, Any], per_scale: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Self-attention ms of one image: ``sparse`` (this module), ``dense`` (dense attention for the same calls),
    ``dense_unskipped`` (every scale dense, skipped ones too), ``speedup`` (dense / sparse), ``untuned`` (kernels
    counted at their FLOP estimate), ``rate_tflops`` and ``rate_measured`` (whether the dense rate is SPEC.md's
    measurement or a rough figure). Figures are None when the target GPU has no dense rate."""
    per_scale = expected_ms_per_scale(manifest) if per_scale is None else per_scale

    def total(key: str) -> float | None:
        vals = [p["image_ms"][key] for p in per_scale]
        return None if any(v is None for v in vals) else float(sum(vals))

    sparse, dense = total("sparse"), total("dense")
    untuned = sorted({p[k]["kernel"] for p in per_scale for k in ("csla", "cs4a", "residual")
                      if p[k] is not None and p[k]["ms"] is None})
    gpu = manifest["target"]["name"]
    return {"sparse": sparse, "dense": dense, "dense_unskipped": total("dense_unskipped"),
            "speedup": None if not sparse or dense is None else dense / sparse, "untuned": untuned,
            "gpu": gpu, "rate_tflops": DENSE_TFLOPS.get(gpu), "rate_measured": gpu in MEASURED_DENSE_RATES}


# ---------------------------------------------------------------------------------------------- the picture
def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def _draw_map(ax, manifest: dict[str, Any], ops: np.ndarray) -> list:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    depth, n = ops.shape
    plan = manifest["plan"]
    ax.imshow(ops, cmap=ListedColormap(_OP_COLOURS), vmin=-0.5, vmax=len(OPS) - 0.5, aspect="auto",
              interpolation="nearest")
    for i in np.nonzero((ops == OPS.index("skip")).all(axis=0))[0]:
        ax.text(i, depth / 2, "skipped", rotation=90, ha="center", va="center", fontsize=8, color="#777777")
    ax.set_xticks(range(n), [f"{s['index']}\n{s['h']}x{s['w']}" for s in plan["scales"]], fontsize=7)
    step = 1 if depth <= 48 else 2
    ax.set_yticks(range(0, depth, step), [str(i) for i in range(0, depth, step)], fontsize=6.5 if step == 1 else 7)
    ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(depth + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("scale (index, token grid h x w)", fontsize=8.5)
    ax.set_ylabel("layer", fontsize=8.5)
    bound = (plan.get("config") or {}).get("bound_layer")
    if bound is not None and 0 < bound < depth:
        ax.axhline(bound - 0.5, color="black", linewidth=1.2, linestyle="--")
        ax.annotate(f"bound layer {bound}", xy=(0, bound - 0.5), xytext=(2, 2), textcoords="offset points",
                    fontsize=7, va="bottom", ha="left", color="black",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    counts = np.bincount(ops.ravel(), minlength=len(OPS))
    handles = [Patch(facecolor=_OP_COLOURS[k], edgecolor="#555555", linewidth=0.5,
                     label=f"{_OP_LABELS[k]}: {counts[k]}")
               for k in range(len(OPS)) if counts[k]]
    ax.set_title("(a) op per (layer, scale)", fontsize=10, loc="left")
    return handles


def _draw_bars(ax, manifest: dict[str, Any], per_scale: list[dict[str, Any]]) -> None:
    from matplotlib.patches import Patch

    sparse = [p for p in per_scale if p["csla"] or p["cs4a"] or p["calls"]["decision"]]
    if not sparse:
        ax.text(0.5, 0.5, "no sparse op in this module: every call is dense", ha="center", va="center",
                transform=ax.transAxes, fontsize=10)
        ax.set_axis_off()
        return
    gpu = manifest["target"]["name"]
    rate = DENSE_TFLOPS.get(gpu)
    rough = "" if gpu in MEASURED_DENSE_RATES else "ROUGH "
    used = [b for b in ("dense", "decision", "CS4A", "CSLA") if any(_bar(p, b) for p in sparse)]
    width = 0.8 / len(used)
    dense_colour = _OP_COLOURS[0]
    top, any_untuned = 0.0, False
    for x, p in enumerate(sparse):
        present = [b for b in used if _bar(p, b)]
        for j, b in enumerate(present):
            base, value, untuned = _bar(p, b)  # type: ignore[misc]
            pos = x + (j - (len(present) - 1) / 2) * width
            colour = _OP_COLOURS[OPS.index(b)]
            if value is None:  # untuned, and no dense rate to estimate it from
                ax.text(pos, 0, " untuned:\n no figure", ha="center", va="bottom", fontsize=7, rotation=90)
                continue
            any_untuned |= untuned
            if base:  # decision layers: the dense call, then the residual pass on top of it
                ax.bar(pos, base, width * 0.92, color=dense_colour, edgecolor="#333333", linewidth=0.5)
            ax.bar(pos, value - base, width * 0.92, bottom=base, color="white" if untuned else colour,
                   edgecolor=colour if untuned else "#333333", hatch="////" if untuned else None,
                   linewidth=1.0 if untuned else 0.5)
            top = max(top, value)
            label = f"{value:.3f}" if value < 1 else f"{value:.2f}"
            if b != "dense" and p["dense_ms"]:
                label += f"\n{p['dense_ms'] / value:.1f}x"
            if untuned:
                label += "\nuntuned"
            ax.annotate(label, (pos, value), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7.5, linespacing=1.05)
    ax.set_ylim(0, top * 1.35 if top else 1)
    pad = max(0.0, (3 - len(sparse)) / 2)  # keep bars of one or two scales from filling the panel
    ax.set_xlim(-0.5 - pad, len(sparse) - 0.5 + pad)

    def tick(p: dict[str, Any]) -> str:
        calls = ", ".join(f"{p['calls'][b]} {b}" for b in ("dense", "decision", "CS4A", "CSLA", "skip")
                          if p["calls"][b])
        text = f"{p['scale']} ({p['grid'][0]}x{p['grid'][1]})\n{p['q_len']} q x {p['kv_len']} kv\n{calls}"
        img = p["image_ms"]
        if img["sparse"] is not None and img["dense"] is not None:
            text += f"\nper image {img['sparse']:.1f} vs {img['dense']:.1f} ms"
        return text

    ax.set_xticks(range(len(sparse)), [tick(p) for p in sparse], fontsize=7.5)
    ax.set_xlabel("scale: queries x keys of one call; layers per op; per image: this module vs dense",
                  fontsize=8.5)
    ax.set_ylabel("ms per call (one layer)", fontsize=8.5)
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    names = {"dense": f"dense attention, {rough}estimate ({rate:g} TFLOP/s)" if rate else "dense: no estimate",
             "decision": "decision layers: dense estimate + residual pass", "CS4A": "CS4A kernel (expected ms)",
             "CSLA": "CSLA kernel (expected ms)"}
    handles = [Patch(facecolor=_OP_COLOURS[OPS.index(b)], edgecolor="#333333", linewidth=0.5, label=names[b])
               for b in used]
    if any_untuned:
        handles.append(Patch(facecolor="white", edgecolor="#555555", hatch="////",
                             label="untuned: FLOP estimate (keys read, at the dense rate)"))
    ax.legend(handles=handles, loc="upper left", fontsize=7.5, frameon=False)
    ax.set_title("(b) expected ms of one call at each sparse scale; Nx = speed-up over dense", fontsize=10,
                 loc="left")


def _bar(p: dict[str, Any], bar: str) -> tuple[float, float | None, bool] | None:
    """``(base, height, untuned)`` of one bar of panel (b), or None if the scale has no such op. ``base`` is the
    dense part of a stacked decision bar (0 otherwise); ``height`` is None when there is no figure at all."""
    if bar == "dense":
        return None if p["dense_ms"] is None else (0.0, p["dense_ms"], False)
    if bar == "decision":
        if not p["calls"]["decision"]:
            return None
        if p["dense_ms"] is None:
            return 0.0, None, False
        res = p["residual"]
        if res is None:
            return 0.0, p["dense_ms"], False
        return p["dense_ms"], p["dense_ms"] + res["cost_ms"], res["ms"] is None
    entry = p["csla" if bar == "CSLA" else "cs4a"]
    if entry is None:
        return None
    return 0.0, entry["cost_ms"], entry["ms"] is None


def _title(manifest: dict[str, Any], est: dict[str, Any]) -> str:
    plan, target = manifest["plan"], manifest["target"]
    head = (f"{plan['model']} {plan['resolution']} px {plan['aspect']} on {target['name']} ({target['arch']}), "
            f"B={manifest.get('batch', 2)}, {plan['heads']} heads, head dim {plan['head_dim']}, "
            f"{manifest.get('dtype', 'bf16')}")
    if est["sparse"] is None or est["dense"] is None:
        return head + ": no dense rate for this GPU, so no whole-image estimate"
    rough = "" if est["rate_measured"] else "ROUGH "
    line = (f"self-attention per image ({rough}estimate): {est['sparse']:.1f} ms with this module vs "
            f"{est['dense']:.1f} ms dense ({est['speedup']:.2f}x)")
    if est["untuned"]:
        line += f", {len(est['untuned'])} untuned kernel(s) at a FLOP estimate"
    skipped = manifest["plan"]["config"].get("skip_last") or 0
    if skipped:
        line += f"; {est['dense_unskipped']:.1f} ms dense without skipping the last {skipped}"
    return head + "\n" + line


def _footnote(manifest: dict[str, Any], est: dict[str, Any], per_scale: list[dict[str, Any]]) -> str:
    gpu = est["gpu"]
    if est["rate_tflops"] is None:
        dense = f"dense: no rate known for {gpu}."
    elif est["rate_measured"]:
        dense = (f"dense = FLOPs / {est['rate_tflops']:g} TFLOP/s + {DENSE_CALL_OVERHEAD_MS} ms per call "
                 f"(cuDNN on {gpu.upper()}, SPEC.md).")
    else:
        dense = (f"dense = FLOPs / {est['rate_tflops']:g} TFLOP/s + {DENSE_CALL_OVERHEAD_MS} ms per call: a ROUGH "
                 f"rate for {gpu}, not measured.")
    only_dense = [p["scale"] for p in per_scale if not (p["csla"] or p["cs4a"] or p["calls"]["decision"])
                  and p["calls"]["dense"]]
    parts = [dense, "Sparse = the tuning database's expected ms."]
    if est["untuned"]:
        parts.append(f"{len(est['untuned'])} untuned kernel(s) at a FLOP estimate.")
    if manifest.get("cs4a"):
        parts.append("CS4A statistics, top-k and table fills are not in the manifest and not counted.")
    if only_dense and est["dense"] is not None:
        ms = sum(p["image_ms"]["dense"] for p in per_scale if p["scale"] in only_dense)
        parts.append(f"Dense-only scales {_ranges(only_dense)}: {ms:.1f} ms per image in both totals.")
    return " ".join(parts)


def plot_dispatch(manifest: dict[str, Any], path: str | Path) -> Path:
    """Write a PNG of a runtime module's dispatch map and per-scale expected ms against dense; returns the path.

    Parameters
    ----------
    manifest:
        The module's manifest (``json.load`` of ``manifest.json``, or :func:`~sparvar_compiler.emit.manifest.
        read_manifest`).
    path:
        Where to write the PNG (parent directories are created).

    Raises
    ------
    SparvarError
        If matplotlib is not installed (``pip install 'sparvar-compiler[plot]'``) or the dispatch is malformed.
    """
    figure = _figure_class()
    ops, _ = dispatch_grid(manifest)
    per_scale = expected_ms_per_scale(manifest)
    est = image_estimate(manifest, per_scale)
    depth = ops.shape[0]
    height = 2.7 + max(depth, 30) * 0.13  # inches: 0.13 per layer row, then fixed margins for text
    fig = figure(figsize=(15.0, height), dpi=120)
    grid = fig.add_gridspec(1, 2, width_ratios=(1.0, 1.55), left=0.05, right=0.985, top=1 - 0.85 / height,
                            bottom=1.8 / height, wspace=0.13)
    ax = fig.add_subplot(grid[0, 0])
    handles = _draw_map(ax, manifest, ops)
    box = ax.get_position()  # the legend goes under the map's tick labels, at a fixed distance in inches
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=((box.x0 + box.x1) / 2, 1.2 / height), ncol=2,
               fontsize=7.5, frameon=False, title="calls per image", title_fontsize=7.5)
    _draw_bars(fig.add_subplot(grid[0, 1]), manifest, per_scale)
    fig.suptitle(_title(manifest, est), fontsize=11)
    fig.text(0.5, 0.012, "\n".join(textwrap.wrap(_footnote(manifest, est, per_scale), 190)), ha="center",
             va="bottom", fontsize=7.5, color="#444444")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
