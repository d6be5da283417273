"""Maintenance of tuning databases.

    python -m sparvar_compiler.db build-shipped [--out PATH] [EXPORT.json ...]
        Rebuild the shipped database (default: tuning_db/sparvar.sqlite from tuning_db/winners-*.json) with one
        Optuna study per workload and target.
    python -m sparvar_compiler.db studies [URL]
        Give every (workload, target) with trials in a database (default: $SPARVAR_DB or the user database)
        its Optuna study, for records written before studies were kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparvar_compiler.db", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-shipped", help="rebuild the shipped database from JSON exports")
    b.add_argument("exports", nargs="*", type=Path, help="default: tuning_db/winners-*.json")
    b.add_argument("--out", type=Path, help="default: tuning_db/sparvar.sqlite")
    s = sub.add_parser("studies", help="create the Optuna studies of a database's records")
    s.add_argument("url", nargs="?", help="database URL or path (default: $SPARVAR_DB, else the user database)")
    args = ap.parse_args(argv)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.cmd == "build-shipped":
        from .exchange import build_shipped_database
        from .store import TuningDatabase, shipped_database_path

        out = args.out or shipped_database_path()
        exports = args.exports or sorted(shipped_database_path().parent.glob("winners-*.json"))
        if not exports:
            print("no exports to build from", file=sys.stderr)
            return 2
        before = out.stat().st_size if out.is_file() else None
        build_shipped_database(out, exports, progress=progress)
        with TuningDatabase.open_shipped(out) as db:
            st = db.stats()
        print(f"{out}: {st['trials']['total']} trials, {st['winners']} winners, {st['studies']} studies from "
              f"{len(exports)} exports; {out.stat().st_size} bytes"
              + (f" (was {before})" if before is not None else ""))
        return 0
    from .store import TuningDatabase, default_database_url
    from .studies import release_storage

    from ..tuner.plan import record_studies

    with TuningDatabase.open(args.url or default_database_url()) as db:
        try:
            made = record_studies(db, progress=progress)
        finally:
            release_storage(db.storage_url)
    print(f"{db.url}: {len(made)} studies, {sum(made.values())} trials")
    return 0


if __name__ == "__main__":
    sys.exit(main())
