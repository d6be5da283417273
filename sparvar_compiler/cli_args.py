"""Arguments shared by the verbs of ``sparvar-compile``: the plan arguments of ``compile``, ``plan``, ``tune``,
``fidelity`` and ``calibrate`` (model, schedule, plan options, and the :class:`~sparvar_compiler.planner.Plan`
they make), and database URLs (``--db``, ``$SPARVAR_DB``, printed with the password masked).

Its own module so that :mod:`sparvar_compiler.cli` and :mod:`sparvar_compiler.fidelity.cli` both import it
without importing each other.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from .errors import PlanConfigError
from .planner import PlanConfig, get_model, list_models, load_config_file, make_plan

DB_ENV = "SPARVAR_DB"  # database URL of every verb taking --db (the flag wins)


def parse_windows(text: str) -> tuple[int, ...]:
    """``"-1x8,1,1,3,5,7"``: comma-separated windows per key scale, ``VxN`` repeats ``V`` ``N`` times."""
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        value, _, count = part.partition("x")
        try:
            out += [int(value)] * (int(count) if count else 1)
        except ValueError:
            # ArgumentTypeError: argparse prints this message (a ValueError would become "invalid value").
            raise argparse.ArgumentTypeError(f"{part!r} is not a window (an integer, or VALUExCOUNT)") from None
    return tuple(out)


def add_plan_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--resolution``, ``--aspect``, ``--plan-config`` and the plan options (README's table)."""
    p.add_argument("--model", required=True, help=f"registry name ({', '.join(list_models())}) or a model .yaml")
    p.add_argument("--resolution", help="image side in pixels (1024, 768, 512, 256) or 1M/0.60M/0.25M/0.06M")
    p.add_argument("--aspect", help="height:width ratio, e.g. 1:1, 4:3, 3:4 or 1.333 (default 1:1); compile "
                                    "also takes 'all' or a comma-separated list (a module set)")
    p.add_argument("--plan-config", type=Path, help="YAML file of plan options (flags below override it)")
    g = p.add_argument_group("plan options (defaults: see README)")
    g.add_argument("--decision-scale", type=int)
    g.add_argument("--bound-layer", type=int)
    g.add_argument("--sink-scales", type=int, help="number of leading scales kept whole")
    g.add_argument("--windows", type=parse_windows, help="per key scale, e.g. --windows=-1x8,1,1,3,5,7")
    g.add_argument("--skip-last", type=int, help="skip the last N scales")
    g.add_argument("--cs4a", choices=("token", "block", "off"))
    g.add_argument("--key-mapping", choices=("identity", "flat", "dap"))
    g.add_argument("--token-exact", action="store_true", default=None,
                   help="mask partial blocks to the exact CSLA token mask")


def plan_from_args(args: argparse.Namespace):
    """The plan of :func:`add_plan_args`' arguments: the ``--plan-config`` file's options, then the flags."""
    model = get_model(args.model)
    if args.aspect is not None and (args.aspect == "all" or "," in args.aspect):
        raise PlanConfigError(f"--aspect {args.aspect}: several aspect ratios make a module set, which only "
                              f"'compile' emits; name one aspect ratio here")
    config = load_config_file(args.plan_config) if args.plan_config else PlanConfig()
    config = config.replace(decision_scale=args.decision_scale, bound_layer=args.bound_layer,
                            sink_scales=args.sink_scales, windows=args.windows, skip_last=args.skip_last,
                            cs4a=args.cs4a, key_mapping=args.key_mapping, token_exact=args.token_exact)
    return make_plan(model, args.resolution, args.aspect, config)


def mask_url(url: str | os.PathLike | None) -> str | None:
    """A database URL with its password replaced by ``***`` (paths unchanged), fit to print."""
    if url is None:
        return None
    text = str(url)
    if "://" not in text:
        return text
    try:
        from sqlalchemy.engine import make_url

        return make_url(text).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - unparsable: mask by hand rather than print a secret
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", text)


def database_url(args: argparse.Namespace) -> str | None:
    """``--db``, else ``$SPARVAR_DB``, else None (the verb's default database)."""
    return getattr(args, "db", None) or os.environ.get(DB_ENV) or None
