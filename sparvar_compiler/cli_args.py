"""Arguments shared by the verbs of ``sparvar-compile``: the plan arguments of ``compile``, ``plan``, ``tune``,
``fidelity`` and ``calibrate`` (model, schedule, plan options, and the :class:`~sparvar_compiler.planner.Plan`
they make), and database URLs (``--db``, ``$SPARVAR_DB``, printed with the password masked).

Also the ``type=`` functions of every flag that has a range, a list form or a path kind, so that a bad flag is
refused while parsing (exit 2, one line) rather than after minutes of work, and :class:`OneLineParser`, whose
errors are that one line.

Its own module so that :mod:`sparvar_compiler.cli` and :mod:`sparvar_compiler.fidelity.cli` both import it
without importing each other.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Callable

from .errors import PlanConfigError
from .planner import PlanConfig, get_model, list_models, load_config_file, make_plan

DB_ENV = "SPARVAR_DB"  # database URL of every verb taking --db (the flag wins)
DB_BACKENDS = ("sqlite", "postgresql")  # SQLAlchemy dialects a tuning database (or an Optuna storage) may use


def parse_windows(text: str) -> tuple[int, ...]:
    """``"-1x8,1,1,3,5,7"``: comma-separated windows per key scale, ``VxN`` repeats ``V`` ``N`` times.

    The number of windows (every repeat count summed) is checked against
    :data:`~sparvar_compiler.limits.MAX_WINDOW_COUNT` before the list is built, so ``-1x100000000`` fails at once;
    the values themselves are checked with the other plan options.
    """
    from .limits import MAX_WINDOW_COUNT, shown

    # ArgumentTypeError: argparse prints its message (a ValueError would become "invalid value").
    pairs: list[tuple[int, int]] = []
    total = 0
    for part in text.replace(" ", "").split(","):  # argv is short: splitting it costs nothing
        if not part:
            continue
        value, _, count = part.partition("x")
        if len(count) > 12:  # a count of 13 digits is over any limit; int() of 5000 digits raises
            raise argparse.ArgumentTypeError(f"the repeat count of {shown(part, 24)} ({len(count)} digits) "
                                             f"is over the limit of {MAX_WINDOW_COUNT} windows "
                                             "(sparvar_compiler.limits.MAX_WINDOW_COUNT)")
        if len(value) > 12:
            raise argparse.ArgumentTypeError(f"{shown(part, 24)} is not a window (an integer, or VALUExCOUNT)")
        try:
            v, n = int(value), (int(count) if count else 1)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{shown(part, 24)} is not a window (an integer, or VALUExCOUNT)"
                                             ) from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"{part!r}: the repeat count must be at least 1, got {n}")
        total += n
        if total > MAX_WINDOW_COUNT:
            raise argparse.ArgumentTypeError(f"{total} windows (at {part!r}) is over the limit of "
                                             f"{MAX_WINDOW_COUNT} (sparvar_compiler.limits.MAX_WINDOW_COUNT)")
        pairs.append((v, n))
    return tuple(v for v, n in pairs for _ in range(n))


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


def mask_urls(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it replaced by ``***``."""
    return re.sub(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def database_url(args: argparse.Namespace) -> str | None:
    """``--db``, else ``$SPARVAR_DB``, else None (the verb's default database)."""
    return getattr(args, "db", None) or os.environ.get(DB_ENV) or None


def check_database_env() -> None:
    """Refuse a ``$SPARVAR_DB`` naming a database kind we cannot use (one line, before anything opens it)."""
    text = os.environ.get(DB_ENV)
    problem = database_problem(text) if text else None
    if problem:
        raise PlanConfigError(f"${DB_ENV}={mask_url(text)}: {problem}")


# ---------------------------------------------------------------------------------------------- parsing
# Every flag with a range, a list form or a path kind is checked by its ``type=`` function, while parsing: a bad
# flag is one line and exit 2 before any work starts. The libraries check again (they have other callers).

KERNEL_BACKENDS = ("triton", "tvm")  # codegen.spec.BACKENDS, without importing torch to parse a command line


def one_line(text: object, limit: int = 600) -> str:
    """``text`` on one line (every run of whitespace, newlines included, becomes one space), cut to ``limit``
    characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


class OneLineParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose usage errors are one line on stderr and exit 2:
    ``PROG: error: MESSAGE ('PROG --help' shows the usage)``. Its sub-command parsers are of this class too."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {one_line(message)} ('{self.prog} --help' shows the usage)\n")


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``low..high`` (no upper bound when ``high`` is None)."""

    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{one_line(text, 40)!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            want = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {value}")
        return value

    return integer


def float_range(low: float, high: float | None = None, low_inclusive: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number above ``low`` (or at it, ``low_inclusive``) and at most ``high``."""

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{one_line(text, 40)!r} is not a number") from None
        above = value >= low if low_inclusive else value > low
        if not math.isfinite(value) or not above or (high is not None and value > high):
            want = f"{'>=' if low_inclusive else '>'} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be a finite number {want}, got {text}")
        return value

    return number


def block_sizes(text: str) -> tuple[int, ...]:
    """An argparse type: ``64,128``, layout block sides (powers of two, 16..256), repeats dropped."""
    from .planner.layout import BLOCK_SIZES

    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            value = None
        if value not in BLOCK_SIZES:
            raise argparse.ArgumentTypeError(f"{one_line(part, 40)!r} is not a block size (a power of two "
                                             f"between {BLOCK_SIZES[0]} and {BLOCK_SIZES[-1]})")
        if value not in out:
            out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("names no block size")
    return tuple(out)


def kernel_backends(text: str) -> tuple[str, ...]:
    """An argparse type: ``triton`` or ``triton,tvm``, kernel backends (known ones), repeats dropped."""
    out: list[str] = []
    for name in text.replace(" ", "").split(","):
        if not name:
            continue
        if name not in KERNEL_BACKENDS:
            raise argparse.ArgumentTypeError(f"unknown backend {one_line(name, 40)!r}; known: "
                                             f"{', '.join(KERNEL_BACKENDS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise argparse.ArgumentTypeError("names no backend")
    return tuple(out)


def database_problem(text: str) -> str | None:
    """Why ``text`` (a ``--db``/``--storage`` value) cannot be a tuning database or study storage, or None: a
    file path is a SQLite file; a URL must be SQLite or PostgreSQL and parse."""
    if "://" not in text:
        return None if text.strip() else "is empty"
    dialect = text.split("://", 1)[0].split("+", 1)[0].lower()
    if dialect not in DB_BACKENDS:
        return (f"{dialect!r} databases are not supported: give a SQLite file path (or sqlite:///PATH) or a "
                "PostgreSQL URL (postgresql+psycopg://USER@HOST/DB)")
    try:
        from sqlalchemy.engine import make_url
    except ImportError:  # the verb that opens it says which package is missing
        return None
    try:
        make_url(text)
    except Exception as e:  # noqa: BLE001 - ArgumentError, ValueError (a bad port): all mean "not a URL"
        message = one_line(e, 200).replace(text, mask_url(text) or "")
        return f"not a database URL ({message})"
    return None


def database_location(text: str) -> str:
    """An argparse type for ``--db`` and ``--storage``: see :func:`database_problem`."""
    problem = database_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{mask_url(text)}: {problem}")
    return text


def input_file(text: str) -> Path:
    """An argparse type: an existing file (not a directory)."""
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{path} does not exist")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a directory, not a file")
    return path


def output_path_problem(path: Path, directory: bool, replaced: bool = False) -> str | None:
    """Why ``path`` cannot be written as a directory (``directory``) or as a file, or None.

    Refused: an existing file where a directory goes and the reverse; a path under a file; a folder that cannot
    be written; for a directory that is ``replaced`` whole (a module), the current directory or one holding it.
    Checked before the work starts; the writer checks again when it writes.
    """
    try:
        resolved, cwd = path.resolve(), Path.cwd().resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop; a deleted working directory
        return f"{path}: {e}"
    if replaced and (resolved == cwd or resolved in cwd.parents):
        return f"{path} is the current directory or holds it: name the directory to write, e.g. {path / 'out'}"
    if path.is_dir() and not directory:
        return f"{path} is a directory: name a file"
    if path.exists() and directory and not path.is_dir():
        return f"{path} is a file, not a directory"
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, so {path} cannot be made under it"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{path}: the folder {folder} is not writable (permission denied or a read-only file system)"
    return None


def _output_type(directory: bool, replaced: bool = False) -> Callable[[str], Path]:
    def output(text: str) -> Path:
        if not text.strip():
            raise argparse.ArgumentTypeError("is empty")
        path = Path(text).expanduser()
        problem = output_path_problem(path, directory, replaced)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return path

    return output


output_directory = _output_type(directory=True)
output_directory.__doc__ = "An argparse type: a directory to write into (see :func:`output_path_problem`)."
module_directory = _output_type(directory=True, replaced=True)
module_directory.__doc__ = "An argparse type: a directory written whole, replacing what is there (a module)."
output_file = _output_type(directory=False)
output_file.__doc__ = "An argparse type: a file to write (see :func:`output_path_problem`)."
