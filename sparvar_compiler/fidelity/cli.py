"""``sparvar-compile fidelity`` and ``sparvar-compile calibrate``.

``fidelity --model M (--captures DIR | --synthetic PRESET)``: per scale and plan mode, captured softmax mass and
output error vs dense; writes ``fidelity.json`` and ``fidelity.png`` (layers x scales heat maps).
``calibrate --model M (--captures DIR | --synthetic PRESET)``: recommends the cheapest plan config meeting a
fidelity floor (captured mass) and error cap on that data and writes it as plan-config YAML (``--plan-config`` of
every other command), its verified figures in comments, and beside it ``<name>.pareto.png`` (cost vs mass vs
error of every candidate); ``--storage URL`` keeps its Optuna study in that database (open it with
``optuna-dashboard URL``; the same command again resumes it).

Results go to stdout; progress and notes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli_args import (add_plan_args, block_sizes, database_location, float_range, int_range, mask_url,
                        output_directory, output_file, plan_from_args)
from ..limits import MAX_BATCH, MAX_HEADS
from .modes import ALL_MODES, DEFAULT_MAX_ERROR, DEFAULT_MODES

SYNTHETIC_LAYERS = 8  # default layers evaluated from a synthetic model (evenly spaced, plus the bound layer)
MAX_LIST = 4096  # entries of a --layers/--scales list (far above any model's layers or scales)


def _int_list(text: str) -> tuple[int, ...]:
    """``0,3,5``: non-negative integers (layer or scale indices; the plan checks their range), repeats
    dropped."""
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a comma-separated list of integers") from None
    if not values:
        raise argparse.ArgumentTypeError("names no value")
    if len(values) > MAX_LIST or min(values) < 0:
        raise argparse.ArgumentTypeError(f"needs at most {MAX_LIST} integers >= 0, got {len(values)} "
                                         f"(smallest {min(values)})")
    return tuple(dict.fromkeys(values))


def _fractions(text: str) -> tuple[float, ...]:
    """``.1,.2``: numbers in (0, 1] (CS4A top-k fractions), repeats dropped."""
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a comma-separated list of numbers") from None
    if not values:
        raise argparse.ArgumentTypeError("names no value")
    bad = [v for v in values if not 0 < v <= 1]  # NaN fails it too
    if bad or len(values) > MAX_LIST:
        raise argparse.ArgumentTypeError(f"needs fractions in (0, 1], got {bad[0] if bad else len(values)}")
    return tuple(dict.fromkeys(values))


def _max_error(text: str) -> float | None:
    """``off`` (no error cap) or a number > 0."""
    if text.strip().lower() in ("off", "none"):
        return None
    return float_range(0)(text)


_CHOICES = {"search": (True, False), "on": (True,), "off": (False,)}


def _modes(text: str) -> tuple[str, ...]:
    """``csla_block,sparvar``: known plan modes, repeats dropped."""
    modes = tuple(dict.fromkeys(m for m in text.replace(" ", "").split(",") if m))
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode {unknown[0][:40]!r}; known: {', '.join(ALL_MODES)}"
                                         if unknown else "names no mode")
    return modes


def _add_source_args(p: argparse.ArgumentParser) -> None:
    from .synthetic import PRESETS

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--captures", type=Path, metavar="DIR",
                     help="q/k/v captured from the real model (captures.json + .safetensors/.npz files)")
    src.add_argument("--synthetic", choices=sorted(PRESETS), metavar="PRESET",
                     help=f"synthetic VAR-like regime ({', '.join(sorted(PRESETS))}); figures describe the regime, "
                          "not image quality")
    p.add_argument("--heads", type=int_range(1, MAX_HEADS), default=2, help="synthetic: heads per layer (default 2)")
    p.add_argument("--batch", type=int_range(1, MAX_BATCH), default=1, help="synthetic: batch (default 1)")
    p.add_argument("--seed", type=int_range(0, 2 ** 63 - 1), default=0,
                   help="seed of the synthetic data, row sampling and random layouts (>= 0)")
    p.add_argument("--query-sample", type=int_range(0), help="at most this many query rows per scale (0 = all)")
    p.add_argument("--force-scale", action="store_true",
                   help="captures: accept a stored softmax scale that disagrees with the model family's default")


def _source(args: argparse.Namespace, plan, all_layers: bool):
    from .captures import CaptureSet
    from .synthetic import SyntheticSource

    if args.captures is not None:
        from ..planner.models import get_model

        caps = CaptureSet.open(args.captures, get_model(args.model), force_scale=args.force_scale)
        caps.check_plan(plan)  # the plan's resolution and aspect must be the captures' schedule
        return caps
    src = SyntheticSource(args.model, args.synthetic, plan.resolution, plan.aspect, heads=args.heads,
                          batch=args.batch, seed=args.seed, decision_scale=plan.config.decision_scale,
                          sink_scales=plan.config.sink_scales)
    if not all_layers:
        src.layers = default_synthetic_layers(plan.depth, plan.config.bound_layer)
    return src


def default_synthetic_layers(depth: int, bound: int, count: int = SYNTHETIC_LAYERS) -> tuple[int, ...]:
    """``count`` evenly spaced layers, plus the two layers around the bound layer (where regimes change)."""
    import numpy as np

    picks = set(np.round(np.linspace(0, depth - 1, count)).astype(int).tolist())
    picks |= {b for b in (bound - 1, bound) if 0 <= b < depth}
    return tuple(sorted(picks))


def _cmd_fidelity(args: argparse.Namespace) -> int:
    from .evaluate import EvalOptions, evaluate
    from .report import format_report, write_heatmap, write_json

    plan = plan_from_args(args)
    source = _source(args, plan, all_layers=False)
    if args.layers and args.synthetic:
        source.layers = tuple(args.layers)  # type: ignore[misc]
    layers = args.layers or source.layers
    modes = args.modes or DEFAULT_MODES
    options = EvalOptions(block=args.block, query_sample=512 if args.query_sample is None else args.query_sample,
                          modes=modes, scales=args.scales, layers=tuple(layers), seed=args.seed)
    name = args.synthetic or Path(args.captures).name
    out = args.output or Path(f"fidelity-{plan.model}-{name}")
    _check_output(out, directory=True)
    what = f"synthetic {args.synthetic}" if args.synthetic else f"captures {args.captures}"
    print(f"fidelity: {plan.model} {plan.resolution} {plan.aspect}, {what}; layers {list(layers)}", file=sys.stderr)
    progress = (lambda msg: print(msg, file=sys.stderr, flush=True))
    ev = evaluate(source, plan, options, progress=progress)
    path = write_json(ev, out / "fidelity.json")
    png = write_heatmap(ev, out / "fidelity.png")
    print(format_report(ev))
    for note in ev.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {path}" + (f" and {png}" if isinstance(png, Path) else f"; {png}")
          + f" ({ev.seconds:.1f} s, rows per scale {ev.rows})", file=sys.stderr)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import Floor, SearchSpace, calibrate, pareto_path

    plan = plan_from_args(args)
    out = args.output or Path(f"calibrated-{plan.model}.yaml")
    _check_output(out, directory=False)
    source = _source(args, plan, all_layers=True)
    floor = Floor(args.min_mass, args.max_error, args.aggregate)
    space = SearchSpace.default(plan)
    space = SearchSpace(args.decision_scales or space.decision_scales, blocks=args.blocks or space.blocks,
                        topk_fractions=args.topk_fractions or space.topk_fractions,
                        residuals=_CHOICES[args.residual], decision_bands=_CHOICES[args.decision_band])
    progress = (lambda msg: print(msg, file=sys.stderr, flush=True))
    kept = {}
    if args.storage:
        kept = {"storage": args.storage, "study_name": args.study_name or calibration_study_name(plan, args)}
        print(f"calibrate: Optuna study {kept['study_name']!r} kept in {mask_url(args.storage)} (optuna-dashboard "
              "URL shows it)", file=sys.stderr)
    res = calibrate(source, plan, floor, trials=args.trials, search_layers=args.search_layers,
                    query_sample=128 if args.query_sample is None else args.query_sample, space=space,
                    seed=args.seed, max_verify=args.max_verify, layers=args.layers, progress=progress, **kept)
    res.write_yaml(out)
    png = res.write_pareto(pareto_path(out))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res.to_dict(), indent=1) + "\n")
    print(res.yaml_text())
    for note in res.notes:
        print(f"note: {note}", file=sys.stderr)
    wrote = [str(out)] + ([str(png)] if isinstance(png, Path) else []) + ([str(args.json)] if args.json else [])
    print(f"wrote {', '.join(wrote)} in {res.seconds:.1f} s" + ("" if isinstance(png, Path) else f"; {png}"),
          file=sys.stderr)
    return 0


def _check_output(path: Path, directory: bool) -> None:
    """A default output path is checked as ``-o`` is while parsing: before minutes of work."""
    from ..cli_args import output_path_problem
    from ..errors import OutputPathError

    problem = output_path_problem(path, directory)
    if problem:
        raise OutputPathError(problem)


def calibration_study_name(plan, args: argparse.Namespace) -> str:
    """A readable Optuna study name: :func:`~.calibrate.default_study_name` (model, image) and the data and the
    floor, e.g. ``calibrate/infinity-8b/1024px-1:1/synthetic-mixed/min-mass>=0.9,error<=0.5``: a study resumed
    with other data or another floor would mix objectives."""
    from .calibrate import default_study_name

    data = f"synthetic-{args.synthetic}" if args.synthetic else f"captures-{Path(args.captures).name}"
    error = f",error<={args.max_error:g}" if args.max_error is not None else ",no-error-cap"
    return f"{default_study_name(plan)}/{data}/{args.aggregate}-mass>={args.min_mass:g}{error}"


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``fidelity`` and ``calibrate`` on the main parser's sub-commands."""
    p = sub.add_parser("fidelity", help="captured attention mass and output error of every plan mode vs dense")
    add_plan_args(p)
    _add_source_args(p)
    p.add_argument("--layers", type=_int_list, help="layers to evaluate (default: captured ones; synthetic: "
                                                    f"{SYNTHETIC_LAYERS} evenly spaced plus the bound)")
    p.add_argument("--scales", type=_int_list, help="query scales (default: the decision scale to the last)")
    p.add_argument("--block", type=int, default=128, choices=(64, 128), help="layout block side (default 128)")
    p.add_argument("--modes", type=_modes, help=f"comma-separated modes (default {','.join(DEFAULT_MODES)}; all: "
                                   f"{','.join(ALL_MODES)})")
    p.add_argument("-o", "--output", type=output_directory, metavar="DIR",
                   help="writes fidelity.json and fidelity.png here")
    p.set_defaults(func=_cmd_fidelity)

    p = sub.add_parser("calibrate", help="recommend the cheapest plan config meeting a fidelity floor (Optuna)")
    add_plan_args(p)
    _add_source_args(p)
    p.add_argument("--layers", type=_int_list, help="layers to use (default: all captured; synthetic: all)")
    p.add_argument("--min-mass", type=float_range(0, 1), default=0.9, help="captured-mass floor, in (0, 1] "
                                                                          "(default 0.9)")
    p.add_argument("--max-error", type=_max_error, default=DEFAULT_MAX_ERROR, metavar="X|off",
                   help=f"cap on the relative L2 output error of the worst (scale, layer), > 0, or off (default "
                        f"{DEFAULT_MAX_ERROR:g}: every plan meeting the 0.9 mass floor on the synthetic presets "
                        "stays within it; on real captures choose it from your own fidelity report)")
    p.add_argument("--aggregate", choices=("min", "mean"), default="min",
                   help="floor on the worst (scale, layer) (default) or on the mean")
    p.add_argument("--trials", type=int_range(1, 100_000), default=40, help="Optuna trials (>= 1; default 40)")
    p.add_argument("--search-layers", type=int_range(0), default=0,
                   help="at most this many (evenly spaced) layers for the search (default 0 = all); verification "
                        "reads all")
    p.add_argument("--max-verify", type=int_range(1), default=3,
                   help="candidates verified on all layers before falling back to the dense plan (>= 1)")
    p.add_argument("--decision-scales", type=_int_list, help="decision scales to search (default n-5..n-2)")
    p.add_argument("--blocks", type=block_sizes, help="block sizes to search (default 64,128)")
    p.add_argument("--topk-fractions", type=_fractions, help="CS4A top-k fractions (default .1,.15,.2,.3,.4)")
    p.add_argument("--residual", choices=tuple(_CHOICES), default="search",
                   help="CS4A residual: search on and off, judged by measured error (default), or fix it")
    p.add_argument("--decision-band", choices=tuple(_CHOICES), default="off",
                   help="give the decision-scale CS4A pattern the later scales' local band (default off: the "
                        "runtime does not run it yet; 'search' or 'on' are for fidelity studies)")
    p.add_argument("-o", "--output", type=output_file, help="plan-config YAML (default calibrated-<model>.yaml); "
                                                           "the Pareto chart goes beside it (<name>.pareto.png)")
    p.add_argument("--json", type=output_file, help="also write every trial and the verification as JSON")
    p.add_argument("--storage", metavar="URL", type=database_location,
                   help="keep the Optuna study in this database (a SQLAlchemy URL such as sqlite:///cal.sqlite or "
                        "a PostgreSQL URL, or a file path): 'optuna-dashboard URL' shows every trial, and a rerun "
                        "with the same study continues it")
    p.add_argument("--study-name", help="Optuna study name with --storage (default: calibrate/MODEL/RESpx-ASPECT/"
                                        "DATA/FLOOR, e.g. calibrate/infinity-8b/1024px-1:1/synthetic-mixed/"
                                        "min-mass>=0.9)")
    p.set_defaults(func=_cmd_calibrate)
