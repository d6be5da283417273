"""Optional dependencies, each installed by an extra of the package (pyproject.toml):

=========  ===========================  ==============================================
extra      modules                      what needs it
=========  ===========================  ==============================================
tvm        ``tvm`` (apache-tvm)         the TVM kernel backend (``--backend tvm``)
postgres   ``psycopg``                  a PostgreSQL tuning database
plot       ``matplotlib``               ``--plot`` pictures, the fidelity heat map
=========  ===========================  ==============================================

Code that needs one imports it lazily through :func:`require`, so a missing one reads as one line naming the
extra to install instead of a ``ModuleNotFoundError`` traceback::

    plt = require("matplotlib.pyplot", "plot", "--plot")
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import SparvarError


class MissingDependencyError(SparvarError):
    """An optional dependency is not installed, or is installed but does not import."""


def install_hint(extra: str) -> str:
    """The command that installs ``extra``."""
    return f"pip install 'sparvar-compiler[{extra}]'"


def available(module: str) -> bool:
    """Whether ``module``'s top-level package is installed (found, not imported)."""
    return importlib.util.find_spec(module.partition(".")[0]) is not None


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.pyplot"``) for ``what`` (e.g. ``"--plot"``).

    Raises
    ------
    MissingDependencyError
        ``"matplotlib is needed for --plot: pip install 'sparvar-compiler[plot]'"`` when it is not installed;
        when it is installed but its import fails (a broken or mismatched install), the message carries that
        import error.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.partition(".")[0]
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").partition(".")[0] == top
        if missing:
            message = f"{top} is needed for {what}: {install_hint(extra)}"
        else:
            message = f"{top} is installed but does not import ({e}); {what} needs it: {install_hint(extra)}"
        raise MissingDependencyError(message) from e
