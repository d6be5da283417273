import os

import numpy as np
import pytest

# Matplotlib must never try a display in CI.
os.environ.setdefault("MPLBACKEND", "Agg")


def _cap_memory() -> None:
    """Cap this process's (and its children's) data segment, so that an input whose size bound is missing fails
    its test with MemoryError instead of exhausting the machine. RLIMIT_DATA counts what is allocated (heap and
    private mappings) but not the large address-space reservations of torch/LLVM, which RLIMIT_AS would.
    SPARVAR_TEST_MEMORY_GB sets the cap (default 12; 0 turns it off)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    gb = float(os.environ.get("SPARVAR_TEST_MEMORY_GB", "12"))
    if gb <= 0:
        return
    cap = int(gb * (1 << 30))
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft == resource.RLIM_INFINITY or soft > cap:
        resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))


_cap_memory()


@pytest.fixture
def rng():
    """A fresh generator per test, seeded from the OS: inputs are new every run."""
    return np.random.default_rng()


# The private PostgreSQL server (tests/pg_server.py), shared by every test module that asks for it.
from pg_server import postgres_server, postgres_url  # noqa: E402,F401
