"""Command line: ``sparvar-compile``.

``sparvar-compile --model infinity-8b --gpu h100`` is the main job (``compile``); other stages are sub-commands
(``plan``, ``models``, ``gpus``). Input errors print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from .errors import PlanConfigError, SparvarError
from .planner import (PlanConfig, csla_layout, format_summary, get_gpu, get_model, list_gpus, list_models,
                      load_config_file, make_plan, plan_summary)
from .planner.layout import check_block_size

COMMANDS = ("compile", "plan", "models", "gpus")


def _windows(text: str) -> tuple[int, ...]:
    """``"-1x8,1,1,3,5,7"``: comma-separated windows, ``VxN`` repeats ``V`` ``N`` times."""
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        value, _, count = part.partition("x")
        try:
            out += [int(value)] * (int(count) if count else 1)
        except ValueError:
            raise PlanConfigError(f"--windows: {part!r} is not a window (an integer, or VALUExCOUNT)") from None
    return tuple(out)


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"registry name ({', '.join(list_models())}) or a model .yaml")
    p.add_argument("--resolution", help="image side in pixels (1024, 768, 512, 256) or 1M/0.60M/0.25M/0.06M")
    p.add_argument("--aspect", help="height:width ratio, e.g. 1:1, 4:3, 3:4 or 1.333 (default 1:1)")
    p.add_argument("--plan-config", type=Path, help="YAML file of plan options (flags below override it)")
    g = p.add_argument_group("plan options (defaults: see README)")
    g.add_argument("--decision-scale", type=int)
    g.add_argument("--bound-layer", type=int)
    g.add_argument("--sink-scales", type=int, help="number of leading scales kept whole")
    g.add_argument("--windows", type=_windows, help="per key scale, e.g. --windows=-1x8,1,1,3,5,7")
    g.add_argument("--skip-last", type=int, help="skip the last N scales")
    g.add_argument("--cs4a", choices=("token", "block", "off"))
    g.add_argument("--key-mapping", choices=("identity", "flat", "dap"))
    g.add_argument("--token-exact", action="store_true", default=None,
                   help="mask partial blocks to the exact CSLA token mask")


def _plan_from_args(args: argparse.Namespace):
    model = get_model(args.model)
    config = load_config_file(args.plan_config) if args.plan_config else PlanConfig()
    config = config.replace(decision_scale=args.decision_scale, bound_layer=args.bound_layer,
                            sink_scales=args.sink_scales, windows=args.windows, skip_last=args.skip_last,
                            cs4a=args.cs4a, key_mapping=args.key_mapping, token_exact=args.token_exact)
    return make_plan(model, args.resolution, args.aspect, config)


def _cmd_plan(args: argparse.Namespace) -> int:
    bm = check_block_size(args.block_m, "--block-m")
    bn = check_block_size(args.block_n, "--block-n")
    plan = _plan_from_args(args)
    summary = plan_summary(plan, bm, bn)
    if args.json:
        print(json.dumps({"plan": plan.to_dict(), **summary}))
    else:
        print(format_summary(summary))
    for directory, write in ((args.export_layouts, "npy"), (args.plot, "png")):
        if directory is None:
            continue
        directory.mkdir(parents=True, exist_ok=True)
        for s in plan.scales:
            if not s.has_csla:
                continue
            layout = csla_layout(plan, s.index, bm, bn)
            target = directory / f"scale{s.index}.{write}"
            if write == "npy":
                np.save(target, layout.active(), allow_pickle=False)
            else:
                layout.plot(target, title=f"{plan.model} scale {s.index} ({s.h}x{s.w}): {layout.summary()}")
        if not args.json:
            print(f"wrote {write} layouts to {directory}")
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    gpu = get_gpu(args.gpu)
    plan = _plan_from_args(args)
    print(f"target: {gpu.name} ({gpu.arch}, {gpu.sm_count} SMs)")
    print(format_summary(plan_summary(plan, 128, 128)))
    print("\ncode generation, tuning and emission are not built yet: this prints the plan only.")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    for name in list_models():
        m = get_model(name)
        res = ", ".join(str(r) for r in m.resolutions)
        print(f"{name:14} depth {m.depth:2}  width {m.width:4}  heads {m.heads:2}  head_dim {m.head_dim:3}  "
              f"resolutions {res}  ({len(m.schedules)} schedules) {m.notes}")
    return 0


def _cmd_gpus(args: argparse.Namespace) -> int:
    for name in list_gpus():
        g = get_gpu(name)
        print(f"{name:10} {g.arch:7} {g.sm_count:4} SMs  {g.smem_per_block // 1024} KB shared memory per block")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparvar-compile",
        description="Compile a VAR model's scale schedule into block-sparse attention kernels (SparVAR).",
        epilog="Without a sub-command, runs 'compile': sparvar-compile --model infinity-8b --gpu h100")
    parser.add_argument("--version", action="version", version=f"sparvar-compiler {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("compile", help="plan, generate, tune and emit a runtime module (the main job)")
    _add_plan_args(p)
    p.add_argument("--gpu", required=True, help=f"target GPU ({', '.join(list_gpus())})")
    p.add_argument("-o", "--output", type=Path, help="output directory of the runtime module")
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("plan", help="print the plan: per scale grid, lengths, modes and block sparsity")
    _add_plan_args(p)
    p.add_argument("--block-m", type=int, default=128, help="query block (16..256, power of two)")
    p.add_argument("--block-n", type=int, default=128, help="key block (16..256, power of two)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--export-layouts", type=Path, metavar="DIR",
                   help="write scale<index>.npy boolean [q_blocks, kv_blocks] active-block arrays")
    p.add_argument("--plot", type=Path, metavar="DIR", help="write scale<index>.png pictures of the layouts")
    p.set_defaults(func=_cmd_plan)

    sub.add_parser("models", help="list registered models").set_defaults(func=_cmd_models)
    sub.add_parser("gpus", help="list registered GPUs").set_defaults(func=_cmd_gpus)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv = ["compile", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except SparvarError as e:
        print(f"sparvar-compile: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
