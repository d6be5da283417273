"""Where the shipped data directories are: installed as package data, or the repository's top level when the
source tree is used directly (``PYTHONPATH=.`` on a GPU host without an install)."""

from __future__ import annotations

import importlib
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def data_dir(name: str) -> Path:
    """``templates`` or ``tuning_db``: the package-data directory, else the checkout's top-level one."""
    try:
        mod = importlib.import_module(f"sparvar_compiler.{name}")
        if mod.__file__:
            return Path(mod.__file__).resolve().parent
    except ImportError:
        pass
    path = _REPO / name
    if not path.is_dir():
        raise FileNotFoundError(f"sparvar_compiler data directory '{name}' not found (looked in the package and "
                                f"{path})")
    return path
