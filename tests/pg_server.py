"""A private, throwaway PostgreSQL server for tests.

``initdb`` into a fresh directory under /tmp, ``postgres`` on 127.0.0.1 at a free port with its socket in that
directory and ``fsync=off`` (nothing here needs to survive a power cut), stopped and deleted at the end of the
session. PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` system user (or
``nobody``), which owns the directory.

Binaries are taken from PATH, else the newest ``/usr/lib/postgresql/*/bin``. Without them (or without psycopg)
the tests skip with the reason, unless ``SPARVAR_REQUIRE_POSTGRES=1`` (CI), where they fail.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import sys
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repository root, for bench/ (not an installed package)
    sys.path.insert(0, str(ROOT))

from bench.pg_bundle import free_port, stop_postmaster  # noqa: E402  (one postmaster start/stop for both)

_START_TIMEOUT_S = 30.0


def find_postgres_bin() -> Path | None:
    """Directory holding ``initdb`` and ``postgres``, or None."""
    found = shutil.which("initdb"), shutil.which("postgres")
    if all(found):
        return Path(os.path.realpath(found[0])).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0])
    for directory in reversed(candidates):
        if (directory / "initdb").exists() and (directory / "postgres").exists():
            return directory
    return None


def _unavailable(reason: str) -> None:
    if os.environ.get("SPARVAR_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL tests are required (SPARVAR_REQUIRE_POSTGRES=1) but {reason}")
    pytest.skip(reason)


class PostgresServer:
    """One postmaster we started; :meth:`stop` ends it by its pid and removes its directory."""

    user = "sparvar"

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="sparvar-pg-"))
        self.data = self.root / "data"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._run_as: dict = {}
        self._log = None
        if os.geteuid() == 0:
            account = next((a for a in ("postgres", "nobody") if _user_exists(a)), None)
            if account is None:
                raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists")
            pw = pwd.getpwnam(account)
            self._run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    def _env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(self.root)}

    def start(self) -> None:
        subprocess.run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust",
                        "-E", "UTF8", "--no-sync", "--no-instructions"],
                       check=True, capture_output=True, env=self._env(), cwd=self.root, **self._run_as)
        self._log = log = open(self.root / "server.log", "wb")
        for _attempt in range(3):  # the free port can be taken between probing and binding
            self.port = free_port()
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-k", str(self.root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=50"],
                stdout=log, stderr=subprocess.STDOUT, env=self._env(), cwd=self.root, **self._run_as)
            if self._wait_ready():
                return
            stop_postmaster(self.proc)
        raise RuntimeError(f"postgres did not start; log:\n{(self.root / 'server.log').read_text()[-3000:]}")

    def _wait_ready(self) -> bool:
        import psycopg

        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        return False

    def dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={database}"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg
        from psycopg import sql

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def stop(self) -> None:
        stop_postmaster(self.proc)
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="session")
def postgres_server():
    """A running private :class:`PostgresServer` for the whole session (skip/fail when unavailable)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed (pip install 'psycopg[binary]')")
    bindir = find_postgres_bin()
    if bindir is None:
        _unavailable("no PostgreSQL server binaries (initdb, postgres) on PATH or under /usr/lib/postgresql")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """SQLAlchemy URL of a fresh, empty database on the private server."""
    return postgres_server.create_database()
