import os

import numpy as np
import pytest

# Matplotlib must never try a display in CI.
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def rng():
    """A fresh generator per test, seeded from the OS: inputs are new every run."""
    return np.random.default_rng()


# The private PostgreSQL server (tests/pg_server.py), shared by every test module that asks for it.
from pg_server import postgres_server, postgres_url  # noqa: E402,F401
