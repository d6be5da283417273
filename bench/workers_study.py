"""Tuning wall time with one worker vs K workers sharing one database (issue 4's fleet study), on one host.

    PYTHONPATH=. python3 bench/workers_study.py [--model infinity-8b] [--trials 8] [--workers 2]
                                                [--postgres BUNDLE | --db-url URL] [--dry-run]

Runs ``sparvar-compile tune`` from an empty database once with one worker (GPU 0) and once with ``--workers K``
(worker i on GPU i), both with the same budget, then compares wall times and the winners' measured times per
workload. Each run gets its own fresh database:

* default: two SQLite files (WAL) beside the output;
* ``--postgres BUNDLE``: a private PostgreSQL server started for the study from a bundle made by
  ``bench/pg_bundle.py pack`` (for hosts without PostgreSQL; it runs on 127.0.0.1, as ``postgres``/``nobody``
  when root) with two new databases on it; the server and its data are deleted at the end;
* ``--db-url URL``: an existing PostgreSQL server, e.g. ``postgresql+psycopg://user@host:5432/postgres``. The
  URL's database (``postgres`` if none) must exist: the study connects to it and creates two new databases,
  ``<that name>_workers<pid>_one`` and ``..._many`` (the user needs CREATEDB), which it leaves on the server.

``--dry-run`` sets the databases up, opens them (creating the schema), prints the database description and
server version and stops: no GPU or tuning needed. Writes ``bench/results/tune-workers-<card>x<K>.json``, whose
``"database"`` and ``"server_version"`` say which database served the study.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(cmd: list[str], env: dict) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, proc.returncode, proc.stdout[-4000:] + proc.stderr[-2000:]


def winners(url: str, gpu: dict) -> dict[str, float]:
    from sparvar_compiler.db import TuningDatabase

    db = TuningDatabase.open(url)
    out = {}
    for wkey, tkey in db.winner_keys():
        w = db.winner(wkey, tkey)
        out[wkey] = float(w.median_ms)
    db.close()
    return out


def _pg_description(num: int, where: str) -> str:
    """"PostgreSQL <major> <where>" from ``server_version_num`` (150004 is 15.4; before 10, 90603 was 9.6.3)."""
    major = str(num // 10000) if num >= 100000 else f"{num // 10000}.{num // 100 % 100}"
    return f"PostgreSQL {major} {where}"


def prepare_databases(args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack) -> tuple[str, str, dict]:
    """The two runs' fresh databases (one worker, K workers) as URLs or paths, and what to record about them:
    ``{"database": description, "server_version": text}``. A server started here stops when ``stack`` closes."""
    if args.postgres:
        from bench.pg_bundle import PortableServer, server_version

        pg = stack.enter_context(PortableServer(args.postgres))
        text, num = server_version(pg.url("postgres"))
        urls = pg.create_database("workers_one"), pg.create_database("workers_many")
        return (*urls, {"database": _pg_description(num, "(portable bundle) on loopback, one host"),
                        "server_version": text})
    if args.db_url:
        from sqlalchemy.engine import make_url

        from bench.pg_bundle import create_database_at, server_version

        u = make_url(args.db_url)
        if u.get_backend_name() != "postgresql":
            raise SystemExit(f"--db-url must be a PostgreSQL server URL, got {u.render_as_string()}")
        if u.drivername == "postgresql":  # SQLAlchemy's default driver is psycopg2; ours is psycopg (3)
            u = u.set(drivername="postgresql+psycopg")
        server = u.render_as_string(hide_password=False)
        text, num = server_version(server)
        base = f"{(u.database or 'postgres')[:40]}_workers{os.getpid()}"
        urls = create_database_at(server, f"{base}_one"), create_database_at(server, f"{base}_many")
        host = u.host or ""
        local = host in ("", "localhost", "127.0.0.1", "::1") or host.startswith("/")
        where = (f"(existing server{'' if local else ' at ' + host}) "
                 f"{'on loopback, one host' if local else 'over the network'}")
        print(f"databases: {', '.join(make_url(x).render_as_string() for x in urls)} (left on the server)")
        return (*urls, {"database": _pg_description(num, where), "server_version": text})
    return (str(tmp / "one.sqlite"), str(tmp / "many.sqlite"),
            {"database": "SQLite (WAL), one host", "server_version": f"SQLite {sqlite3.sqlite_version}"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="infinity-8b")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path)
    db = ap.add_mutually_exclusive_group()
    db.add_argument("--postgres", type=Path, metavar="BUNDLE",
                    help="start a private PostgreSQL server from this bundle (bench/pg_bundle.py pack)")
    db.add_argument("--db-url", metavar="URL",
                    help="an existing PostgreSQL server (SQLAlchemy URL of a database to connect to, e.g. "
                         "postgres); two new databases are created on it")
    ap.add_argument("--dry-run", action="store_true",
                    help="set up and open the databases, print what would be recorded, run no tuning")
    args = ap.parse_args()

    if args.dry_run:
        from sparvar_compiler.db import TuningDatabase

        tmp = Path(tempfile.mkdtemp(prefix="workers-study-dry-"))
        try:
            with contextlib.ExitStack() as stack:
                one_url, many_url, info = prepare_databases(args, tmp, stack)
                for url in (one_url, many_url):
                    with TuningDatabase.open(url) as tdb:
                        print(f"{tdb.url} ({tdb.dialect}): {json.dumps(tdb.stats())}")
                print(json.dumps(info, indent=1))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return

    import torch

    from sparvar_compiler.planner.gpus import gpu_from_device_name

    props = torch.cuda.get_device_properties(0)
    gpu = gpu_from_device_name(props.name, props.multi_processor_count)
    gpus = torch.cuda.device_count()
    out = args.out or ROOT / "bench" / "results" / f"tune-workers-{gpu.name}x{gpus}.json"
    tmp = out.parent / f".workers-study-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    base = [sys.executable, "-m", "sparvar_compiler", "tune", "--model", args.model, "--gpu", gpu.name,
            "--trials", str(args.trials)]
    with contextlib.ExitStack() as stack:  # a server started for the study stops when this block ends
        one_url, many_url, info = prepare_databases(args, tmp, stack)
        print(f"database: {info['database']}; {info['server_version']}", flush=True)
        # Each run compiles from a fresh Triton cache: otherwise the second run reuses the first one's kernels.
        t_one, rc1, log1 = run(base + ["--db", one_url], dict(env, CUDA_VISIBLE_DEVICES="0",
                                                             TRITON_CACHE_DIR=str(tmp / "triton-one")))
        print(f"1 worker: {t_one:.1f} s (exit {rc1})\n{log1[-1500:]}", flush=True)
        # The same command on the now-full database measures nothing: its wall time is the fixed cost of one
        # tune process (start-up, imports, CUDA context, database, plan), which K workers cannot divide.
        t_warm, _, _ = run(base + ["--db", one_url], dict(env, CUDA_VISIBLE_DEVICES="0",
                                                          TRITON_CACHE_DIR=str(tmp / "triton-one")))
        print(f"1 worker again, warm database: {t_warm:.1f} s", flush=True)
        t_many, rc2, log2 = run(base + ["--db", many_url, "--workers", str(args.workers)],
                                dict(env, TRITON_CACHE_DIR=str(tmp / "triton-many")))
        print(f"{args.workers} workers: {t_many:.1f} s (exit {rc2})\n{log2[-1500:]}", flush=True)
        w1, w2 = winners(one_url, gpu.to_dict()), winners(many_url, gpu.to_dict())
    ratios = {k: w2[k] / w1[k] for k in w1 if k in w2}
    res = {"benchmark": "tune-workers", "card": props.name, "gpus": gpus, "model": args.model,
           "trials_per_workload": args.trials, "workers": args.workers, "database": info["database"],
           "server_version": info["server_version"],
           "triton_cache": "fresh per run", "one_worker_s": t_one, "many_workers_s": t_many,
           "warm_rerun_s": t_warm, "wall_ratio": t_many / t_one,
           "winner_ms_ratio_many_over_one": ratios, "exit_codes": [rc1, rc2]}
    print(json.dumps({k: v for k, v in res.items() if k != "winner_ms_ratio_many_over_one"}, indent=1))
    print("winner ms ratio (K workers / 1 worker) per workload:", {k[:8]: round(v, 3) for k, v in ratios.items()})
    out.write_text(json.dumps(res, indent=1) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)  # the runs' databases and Triton caches
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
