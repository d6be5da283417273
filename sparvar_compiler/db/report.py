"""The text view of the tuning databases (``sparvar-compile db stats``): :func:`format_stats`."""

from __future__ import annotations

from typing import Any


def _config_text(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(config.items()))


def _counts(s: dict[str, Any]) -> dict[str, str]:
    trials = s["trials"]
    return {"winners": str(s["winners"]), "trials": str(trials["total"]), "valid": str(trials["valid"]),
            "invalid": str(trials["total"] - trials["valid"]), "workloads": str(s["workloads"]),
            "targets": str(s["targets"]), "studies": str(s.get("studies", 0))}


def _table(header: list[str], rows: list[list[str]], right: set[int], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return (indent + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _invalid_reasons(s: dict[str, Any]) -> str:
    reasons = {k: v for k, v in s["trials"]["invalid"].items() if v}
    return ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))


def format_stats(stats: dict[str, Any]) -> str:
    """A readable report of :meth:`~.store.LayeredDatabase.stats` (or of one
    :meth:`~.store.TuningDatabase.stats`): the layers with their counts, then per target GPU and model the
    winners, marking the kernel compile picks for each scale (``*``), shadowed winners and refused ones."""
    if "layers" not in stats:  # one database's counts
        return format_stats({"layers": [{"index": 0, "url": "database", "readonly": False, **stats}],
                             "targets": {}, "summary": None})
    lines = ["Tuning databases, first match wins:"]
    header = ["#", "database", "access", "winners", "trials", "valid", "invalid", "workloads", "targets",
              "studies"]
    rows = []
    for layer in stats["layers"]:
        c = _counts(layer)
        rows.append([str(layer["index"]), layer["url"], "read-only" if layer["readonly"] else "writable",
                     c["winners"], c["trials"], c["valid"], c["invalid"], c["workloads"], c["targets"],
                     c["studies"]])
    lines += _table(header, rows, right={3, 4, 5, 6, 7, 8, 9})
    for layer in stats["layers"]:
        reasons = _invalid_reasons(layer)
        if reasons:
            lines.append(f"  invalid trials in #{layer['index']}: {reasons}")
    summary = stats.get("summary")
    if summary is None:
        return "\n".join(lines)
    lines += ["", f"Winners: {summary['winners']} supplied, {summary['shadowed']} shadowed by an earlier layer, "
                  f"{summary['refused']} refused; * = the kernel compile picks for its scale "
                  f"({summary['picked']})"]
    if not stats["targets"]:
        lines.append("  (no winners: compile would use default configs)")
    for label, target in stats["targets"].items():
        lines += ["", f"{label} ({target['arch']}, {target['sm_count']} SMs)"]
        for model, winners in target["models"].items():
            lines.append(f"  {model}")
            rows = []
            for w in winners:
                image = (f"{w['resolution']}px {w['aspect']}" if w["resolution"] not in (None, "unknown")
                         else "?")
                scale = "?" if w["scale"] in (None, "unknown") else str(w["scale"])
                kind = f"cs4a {w['kind']}" if w["dynamic"] else w["kind"]
                kernel = f"{w['backend']}/{kind} {w['block_m']}x{w['block_n']}"
                note = ("shadowed" if w["shadowed"] else f"refused: {w['refused']}" if w["refused"] else
                        "" if w["model"] else f"{w['heads']} heads, {w['q_len']}x{w['kv_len']}")
                rows.append([image, scale, kernel, "*" if w["picked"] else "", f"{w['median_ms']:.4f}",
                             str(w["layer"]), _config_text(w["config"]), note])
            lines += _table(["image", "scale", "kernel", "", "ms", "layer", "config", ""], rows, right={4, 5},
                            indent="    ")
    return "\n".join(lines)
