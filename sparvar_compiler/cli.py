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

COMMANDS = ("compile", "plan", "tune", "verify", "inspect", "db", "models", "gpus", "fidelity", "calibrate")


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


def _open_db(url: str | None):
    """The database a compile reads winners from: ``--db``, else the user's cache database over the shipped one."""
    from .db import LayeredDatabase, TuningDatabase

    if url:
        return TuningDatabase.open(url)
    return LayeredDatabase.open_default()


def _local_gpu_matches(gpu) -> bool:
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        props = torch.cuda.get_device_properties(0)
        return f"sm_{props.major}{props.minor}" == gpu.arch and props.multi_processor_count == gpu.sm_count
    except Exception:  # noqa: BLE001 - no usable GPU means "not present"
        return False


def _worker_slot(text: str) -> tuple[int, int]:
    """``I/K`` (0 <= I < K) as a tuple, for ``--worker-slot``."""
    try:
        i, k = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/K such as 0/2, got {text!r}") from None
    if not 0 <= i < k:
        raise argparse.ArgumentTypeError(f"need 0 <= I < K, got {text!r}")
    return i, k


def _worker_start(worker: str | None, slot: tuple[int, int] | None, n: int) -> int:
    """Index of the workload this worker tunes first. Workers sharing a database start on different workloads
    (worker I of K at I*n/K, a named worker at a hash of its name), so that each mostly tunes workloads of its
    own and the others' trials are reused, instead of all of them measuring one workload's default config and
    last trials side by side; they meet, and share trials, only where their walks overlap."""
    if n == 0 or (worker is None and slot is None):
        return 0
    if slot is not None:
        return slot[0] * n // slot[1]
    import zlib

    return zlib.crc32(worker.encode()) % n


def _tune_plan(plan, gpu, db, backends, block_sizes, trials, budget_s, worker=None, runner=None, mode="tpe",
               only_missing=False, slot=None):
    """Tune every workload of the plan; ``only_missing`` leaves out those the (layered) database already has a
    usable winner for, so that compiling on a GPU host with the shipped winners does no GPU work. A worker
    (``worker``, ``slot``) walks the workloads from its own start, wrapping around (:func:`_worker_start`)."""
    from .db import TuningDatabaseError, collect_environment
    from .emit.emitter import plan_workloads
    from .tuner.runners import LocalRunner
    from .tuner.search import Tuner

    local = runner is None
    environment = collect_environment(probe_gpu=local)
    tuner = Tuner(db if not hasattr(db, "user") else db.user, gpu, runner or LocalRunner(),
                  environment=environment, worker=worker)
    results = []
    workloads = list(plan_workloads(plan, backends, block_sizes))
    start = _worker_start(worker, slot, len(workloads))
    order = list(range(start, len(workloads))) + list(range(start))
    for i in order:
        scale, spec, layout = workloads[i]
        if only_missing:
            try:
                have = db.winner(spec.to_dict(), gpu.to_dict(), environment)
            except TuningDatabaseError:  # a record from another compiler or card: not usable here, so tune
                have = None
            if have is not None:
                continue
        print(f"tuning scale {scale} {spec.backend} {spec.block_m}x{spec.block_n} ({spec.q_len} x {spec.kv_len})",
              flush=True)
        results.append((i, scale, tuner.tune(spec, layout, trials=trials, budget_s=budget_s, mode=mode)))
    return [(scale, r) for _, scale, r in sorted(results, key=lambda x: x[0])]  # the plan's order


def _print_tune_table(results) -> None:
    print(f"\n{'scale':>5} {'kernel':<22} {'default ms':>10} {'tuned ms':>9} {'gain':>6}  measured/reused  config")
    for scale, r in results:
        kname = f"{r.spec.backend}/{r.spec.kind} {r.spec.block_m}x{r.spec.block_n}"
        cfg = r.best_config.to_dict() if r.best_config else None
        print(f"{scale:>5} {kname:<22} {r.default_ms:>10.4f} {r.best_ms:>9.4f} {r.gain:>6.2f}  "
              f"{r.measured:>4}/{r.reused:<4}        {cfg}")


def _cmd_compile(args: argparse.Namespace) -> int:
    from .db import collect_environment
    from .emit.emitter import emit_module

    gpu = get_gpu(args.gpu)
    plan = _plan_from_args(args)
    backends = tuple(args.backend.split(","))
    blocks = tuple(check_block_size(int(b), "--block-sizes") for b in args.block_sizes.split(","))
    present = _local_gpu_matches(gpu)
    if args.tune == "always" and not present:
        print(f"sparvar-compile: error: --tune always needs a local {gpu.name}; none is present", file=sys.stderr)
        return 2
    db = _open_db(args.db)
    print(f"target: {gpu.name} ({gpu.arch}, {gpu.sm_count} SMs); GPU present here: {'yes' if present else 'no'}")
    if args.tune == "always" or (args.tune == "auto" and present):
        results = _tune_plan(plan, gpu, db, backends, blocks, args.trials, args.budget_s,
                             only_missing=args.tune == "auto")
        if results:
            _print_tune_table(results)
        else:
            print("every workload has a database winner for this GPU: nothing to tune")
    out = args.output or Path("out") / f"{plan.model}-{plan.resolution}-{plan.aspect.replace(':', 'x')}-{gpu.name}"
    env = collect_environment(probe_gpu=False)
    import warnings

    from .db.environment import SoftMismatchWarning

    with warnings.catch_warnings(record=True) as caught:
        # One line for all records measured under other patch versions, not one warning per kernel.
        warnings.simplefilter("always", SoftMismatchWarning)
        manifest = emit_module(plan, gpu, out, db=db, backends=backends, block_sizes=blocks, environment=env)
    soft = [w for w in caught if issubclass(w.category, SoftMismatchWarning)]
    for w in caught:
        if not issubclass(w.category, SoftMismatchWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if soft:
        detail = str(soft[0].message).split(" although ", 1)[-1]
        print(f"note: {len(soft)} tuning record(s) were measured under other patch versions (e.g. {detail}); "
              "they are used, as soft mismatches are")
    print(format_summary(plan_summary(plan, 128, 128)))
    print(_module_table(manifest))
    print(f"\nmodule: {out}  (load with sparvar_compiler.runtime.load('{out}'); "
          f"check with: sparvar-compile verify {out})")
    return 0


def _module_table(manifest: dict) -> str:
    lines = ["", f"{'scale':>5} {'kernel':<32} {'sparsity':>8} {'tuned':>5} {'expected ms':>11}  config"]
    for name, k in sorted(manifest["kernels"].items(), key=lambda kv: kv[1]["scale"]):
        exp = f"{k['expected_ms']:.4f}" if k["expected_ms"] else "-"
        lines.append(f"{k['scale']:>5} {name:<32} {100 * k['sparsity']:7.1f}% {str(k['tuned']).lower():>5} "
                     f"{exp:>11}  {k['config']}")
    cs4a = manifest.get("cs4a")
    if cs4a:
        for scale, k in sorted(cs4a["scales"].items(), key=lambda kv: int(kv[0])):
            exp = f"{k['expected_ms']:.4f}" if k["expected_ms"] else "-"
            what = f"cs4a {cs4a['mode']}, capacity {k['spec']['capacity']}"
            lines.append(f"{scale:>5} {k['name']:<32} {'dynamic':>8} {str(k['tuned']).lower():>5} {exp:>11}  "
                         f"{k['config']}  ({what})")
        lines.append(f"cs4a: decision scale {cs4a['decision_scale']}, layers below {cs4a['bound_layer']}, "
                     f"{cs4a['mapping']} key mapping, residual {'on' if cs4a['residual'] else 'off'}; statistics "
                     f"and selection kernels {cs4a['stats']['name']}" + (f", {cs4a['topk']['name']}"
                                                                         if "topk" in cs4a else ""))
    modes: dict[str, int] = {}
    for row in manifest["dispatch"]:
        modes[row["op"]] = modes.get(row["op"], 0) + 1
    tuned = manifest["tuned"] and manifest.get("cs4a_tuned") is not False
    lines.append(f"dispatch: {', '.join(f'{v} {k}' for k, v in sorted(modes.items()))} calls per image"
                 + ("" if tuned else "; UNTUNED kernels use documented default configs"))
    return "\n".join(lines)


def _cmd_verify(args: argparse.Namespace) -> int:
    from .emit.manifest import verify_module

    m = verify_module(args.directory, gpu=args.gpu)
    print(f"ok: {args.directory}: {m['model']['name']} for {m['target']['name']}, {len(m['kernels'])} kernels, "
          f"{len(m['files'])} files verified")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .emit.manifest import verify_module

    m = verify_module(args.directory)
    p = m["plan"]
    print(f"{m['model']['name']} {p['resolution']} px {p['aspect']} for {m['target']['name']} "
          f"({m['target']['arch']}, {m['target']['sm_count']} SMs); batch {m['batch']}, {m['dtype']}, softmax "
          f"scale {m['softmax_scale']}; built with sparvar {m['sparvar_version']}")
    print(_module_table(m))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    gpu = get_gpu(args.gpu)
    plan = _plan_from_args(args)
    backends = tuple(args.backend.split(","))
    blocks = tuple(check_block_size(int(b), "--block-sizes") for b in args.block_sizes.split(","))
    if args.runner == "bundle":
        from .emit.emitter import plan_workloads
        from .tuner.bundle import build_bundle

        if not args.bundle:
            raise PlanConfigError("--runner bundle needs --bundle DIR")
        tasks = [(spec, layout) for _, spec, layout in plan_workloads(plan, backends, blocks)]
        path = build_bundle(tasks, gpu, args.bundle, max_candidates=args.trials)
        print(f"wrote {path}; on the GPU host run:\n  python -m sparvar_compiler.tuner.bundle measure {args.bundle} "
              f"--out results.json\nthen ingest here with:\n  sparvar-compile tune --model {args.model} --gpu "
              f"{gpu.name} --runner replay --replay results.json")
        return 0
    from .db import TuningDatabase, user_database_path

    if args.workers < 1:
        raise PlanConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.workers > 1:
        code = _run_tune_workers(args)
        if code:
            return code
        # Every trial is in the database now: the parent's pass below measures nothing (a replay runner with no
        # records) and prints the winners table from what the workers recorded.
        from .tuner.runners import ReplayRunner

        db = TuningDatabase.open(args.db)
        _print_tune_table(_tune_plan(plan, gpu, db, backends, blocks, args.trials, args.budget_s, "parent",
                                     ReplayRunner({}), mode="exhaustive", slot=(0, 1)))
        return 0
    db = TuningDatabase.open(args.db or user_database_path())
    if args.runner == "replay":
        from .tuner.runners import ReplayRunner

        if not args.replay:
            raise PlanConfigError("--runner replay needs --replay FILE (results of a measured bundle)")
        data = json.loads(Path(args.replay).read_text())
        if data.get("target", {}).get("name", gpu.name) != gpu.name:
            raise PlanConfigError(f"{args.replay} was measured on {data['target']['name']}, not {gpu.name}")
        runner = ReplayRunner.from_records(data["records"])
        results = _tune_plan(plan, gpu, db, backends, blocks, args.trials, args.budget_s, args.worker, runner,
                             mode="exhaustive", slot=args.worker_slot)
    else:
        if not _local_gpu_matches(gpu):
            print(f"sparvar-compile: error: tuning needs a local {gpu.name} ({gpu.arch}, {gpu.sm_count} SMs); "
                  "use --runner bundle to build here and measure there", file=sys.stderr)
            return 2
        results = _tune_plan(plan, gpu, db, backends, blocks, args.trials, args.budget_s, args.worker,
                             slot=args.worker_slot)
    _print_tune_table(results)
    return 0


def _run_tune_workers(args: argparse.Namespace) -> int:
    """Run ``args.workers`` copies of this tune command as processes sharing ``--db`` (and so its Optuna
    studies: the budget counts every worker's trials, and no config is measured twice). With the local runner
    worker ``i`` sees GPU ``i`` (modulo the GPUs visible here). Their output is streamed with a ``[wI]`` prefix.
    Returns the first non-zero exit status, else 0."""
    import os
    import subprocess
    import threading

    if not args.db:
        raise PlanConfigError("--workers needs --db: a database every worker opens (a SQLite file on one host, "
                              "PostgreSQL for several)")
    gpus = 1
    if args.runner == "local":
        try:
            import torch

            gpus = max(1, torch.cuda.device_count())
        except ImportError:
            pass
        if args.workers > gpus:
            print(f"warning: {args.workers} workers share {gpus} GPU(s): their timings disturb each other",
                  file=sys.stderr)
    base = list(args.argv)
    if "--workers" in base:  # "--workers K" as two tokens
        i = base.index("--workers")
        del base[i:i + 2]
    base = [a for a in base if not a.startswith("--workers=")]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(g) for g in range(gpus)]
    root = str(Path(__file__).resolve().parents[1])
    procs = []
    for i in range(args.workers):
        env = dict(os.environ)
        if args.runner == "local":
            env["CUDA_VISIBLE_DEVICES"] = ids[i % len(ids)]
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        cmd = [sys.executable, "-m", "sparvar_compiler", *base, "--worker", f"w{i}",
               "--worker-slot", f"{i}/{args.workers}"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    def stream(i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            print(f"[w{i}] {line}", end="", flush=True)

    threads = [threading.Thread(target=stream, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    codes = [p.wait() for p in procs]
    for t in threads:
        t.join()
    bad = [(i, c) for i, c in enumerate(codes) if c]
    if bad:
        print(f"sparvar-compile: error: worker(s) {', '.join(f'w{i} (exit {c})' for i, c in bad)} failed",
              file=sys.stderr)
        return bad[0][1]
    return 0


def _cmd_db(args: argparse.Namespace) -> int:
    from .db import TuningDatabase, export_json, import_json, user_database_path

    db = TuningDatabase.open(args.db or user_database_path(), readonly=args.action != "import")
    if args.action == "stats":
        print(json.dumps(db.stats(), indent=1, default=str))
    elif args.action == "export":
        if not args.file:
            raise PlanConfigError("db export needs a FILE")
        export_json(db, args.file)
        print(f"exported winners to {args.file}")
    else:
        if not args.file:
            raise PlanConfigError("db import needs a FILE")
        print(json.dumps(import_json(db, args.file)))
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


def _add_kernel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="triton", help="comma-separated kernel backends (triton, tvm)")
    p.add_argument("--block-sizes", default="64,128", help="layout block sizes the tuner may choose from")
    p.add_argument("--trials", type=int, default=24, help="configs measured per workload")
    p.add_argument("--budget-s", type=float, help="time budget per workload, seconds")


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
    p.add_argument("--db", help="tuning database URL or path (default: your cache database over the shipped one)")
    p.add_argument("--tune", choices=("auto", "never", "always"), default="auto",
                   help="tune what the database lacks: auto = when the target GPU is present here")
    _add_kernel_args(p)
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("tune", help="tune the plan's kernels on the local GPU into the tuning database")
    _add_plan_args(p)
    p.add_argument("--gpu", required=True)
    p.add_argument("--db", help="database URL or path (default: ~/.cache/sparvar/tuning.sqlite); a PostgreSQL URL "
                                "lets several workers share one study")
    p.add_argument("--worker", help="a name for this worker in the records")
    p.add_argument("--worker-slot", type=_worker_slot, metavar="I/K",
                   help="this worker is number I of K sharing --db: it starts on workload I*n/K (--workers sets "
                        "it; without it a named worker starts at a hash of its name)")
    p.add_argument("--workers", type=int, default=1,
                   help="run K worker processes sharing --db and its studies (local runner: worker i on GPU i)")
    p.add_argument("--runner", choices=("local", "bundle", "replay"), default="local",
                   help="local: measure on this GPU; bundle: compile candidates into --bundle DIR for a GPU host "
                        "without compilers; replay: ingest that host's --replay results into the database")
    p.add_argument("--bundle", type=Path, help="bundle directory (--runner bundle)")
    p.add_argument("--replay", type=Path, help="measured results file (--runner replay)")
    _add_kernel_args(p)
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("verify", help="check a runtime module (hashes, manifest, files) without a GPU")
    p.add_argument("directory", type=Path)
    p.add_argument("--gpu", help="also require that the module targets this GPU")
    p.set_defaults(func=_cmd_verify)
    p = sub.add_parser("inspect", help="print a runtime module's summary")
    p.add_argument("directory", type=Path)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("db", help="tuning database: stats, export winners to JSON, import them")
    p.add_argument("action", choices=("stats", "export", "import"))
    p.add_argument("file", nargs="?", type=Path)
    p.add_argument("--db", help="database URL or path (default: ~/.cache/sparvar/tuning.sqlite)")
    p.set_defaults(func=_cmd_db)

    p = sub.add_parser("plan", help="print the plan: per scale grid, lengths, modes and block sparsity")
    _add_plan_args(p)
    p.add_argument("--block-m", type=int, default=128, help="query block (16..256, power of two)")
    p.add_argument("--block-n", type=int, default=128, help="key block (16..256, power of two)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--export-layouts", type=Path, metavar="DIR",
                   help="write scale<index>.npy boolean [q_blocks, kv_blocks] active-block arrays")
    p.add_argument("--plot", type=Path, metavar="DIR", help="write scale<index>.png pictures of the layouts")
    p.set_defaults(func=_cmd_plan)

    from .fidelity.cli import add_commands as add_fidelity_commands

    add_fidelity_commands(sub)  # fidelity, calibrate
    sub.add_parser("models", help="list registered models").set_defaults(func=_cmd_models)
    sub.add_parser("gpus", help="list registered GPUs").set_defaults(func=_cmd_gpus)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv = ["compile", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # what a parent process re-runs in its workers (tune --workers)
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
