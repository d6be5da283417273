"""A portable PostgreSQL server for hosts that have none (the lent GPU hosts: no PostgreSQL, no network).

    python3 bench/pg_bundle.py pack [--out .pg/postgres-bundle.tar.xz] [--pg-config PATH]
    python3 bench/pg_bundle.py selftest BUNDLE [--dir D] [--run-as USER]
    python3 bench/pg_bundle.py serve BUNDLE [--dir D] [--run-as USER]

``pack`` (run where PostgreSQL is installed, e.g. Debian 12's ``postgresql-15``) copies ``postgres``, ``initdb``
and ``pg_ctl``, the server modules initdb and the server load (``plpgsql.so``, ``dict_snowball.so`` and the
encoding conversions), the share tree less its manual pages and other extensions, and every shared library
those need per ``ldd`` except glibc's own into ``syslib/``, then writes one ``.tar.xz``. The tree mirrors the
compiled-in absolute paths (``usr/lib/postgresql/15/bin``, ``.../lib``, ``usr/share/postgresql/15``) under the
bundle root, because PostgreSQL finds its share and lib directories relative to the running executable by the
common prefix of the compiled-in paths: the same relative layout anywhere works, any other does not.

glibc itself is never packed (it must be the host's: the loader, libc and libm are one unit, and libresolv
uses ``GLIBC_PRIVATE`` symbols), so the bundle needs a host glibc at least as new as the newest ``GLIBC_x.y``
symbol version the packed files require; ``pack`` prints it and stores it in ``BUNDLE.json``. The GCC runtime
(``libstdc++``, ``libgcc_s``, needed by ICU) goes to ``syslib/fallback/``: the host's copy is preferred
(backward compatible, and it matches the host's glibc) and ours is used only when the host has none or one too
old to load ICU, since ours needs a newer glibc than everything else.

:class:`PortableServer` extracts a bundle to a temporary directory, runs ``initdb`` and ``postgres`` on
127.0.0.1 at a free port (as ``postgres`` or ``nobody`` when run as root, since PostgreSQL refuses root), hands
out fresh databases as SQLAlchemy URLs and removes everything on exit. ``selftest`` checks a bundle on a new
host: it starts a server, opens a :class:`sparvar_compiler.db.TuningDatabase` on it (creating the schema) and an
Optuna study when Optuna is importable, and prints what it found. ``serve`` keeps a server up until Ctrl-C.

This module needs only the standard library to pack; serving needs psycopg (3), and ``selftest`` the project's
own dependencies (SQLAlchemy).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = ROOT / ".pg" / "postgres-bundle.tar.xz"
TOP = "pgbundle"  # the single top-level folder inside the archive
MANIFEST = "BUNDLE.json"

BINARIES = ("postgres", "initdb", "pg_ctl")
# initdb runs "CREATE EXTENSION plpgsql" and snowball_create.sql (whose dictionaries load dict_snowball.so when
# created); nothing else is loaded by initdb or a default server. The encoding conversions (*_and_*.so, ~350 KB
# compressed, no dependencies beyond libc) load only when a client asks for an encoding other than the
# database's UTF8: cheap insurance. llvmjit.so is left out on purpose (it pulls in libLLVM, ~100 MB); the server
# runs with jit=off.
REQUIRED_MODULES = ("plpgsql.so", "dict_snowball.so")
OPTIONAL_MODULE_GLOBS = ("*_and_*.so",)
# Share-tree entries nothing in initdb or the server reads: manual pages, and the other extensions' scripts
# (their .so files are not packed, so their control files would only advertise extensions that cannot load).
SHARE_DROP = ("man", "contrib", "psqlrc.sample", "pg_service.conf.sample")
SHARE_EXTENSION_KEEP = re.compile(r"^plpgsql[.-]")

# glibc's own libraries: they must come from the host (see the module docstring).
_GLIBC = re.compile(r"^(libc|libm|libdl|libpthread|librt|libresolv|libutil|libanl|libnsl|libBrokenLocale|"
                    r"libmvec|libcrypt)\.so|^ld-linux")
# Backward-compatible runtimes that are almost always on the host; packed as a fallback only.
_PREFER_HOST = re.compile(r"^(libstdc\+\+|libgcc_s)\.so")

_START_TIMEOUT_S = 60.0


# ------------------------------------------------------------------------------------------------------ ELF

def elf_version_needs(path: Path) -> dict[str, set[str]]:
    """The symbol versions an ELF file requires, per library, from its ``.gnu.version_r`` section.

    Returns ``{needed_library: {"GLIBC_2.34", ...}}``; empty for non-ELF files or files without version needs.
    Only 64-bit little-endian ELF (x86-64, aarch64) is understood, which is all this tool packs.
    """
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    out: dict[str, set[str]] = {}
    for _name, sh_type, _flags, _addr, offset, _size, link, info, _align, _entsize in sections:
        if sh_type != 0x6FFFFFFE:  # SHT_GNU_verneed
            continue
        strtab = sections[link][4]

        def string(off: int) -> str:
            end = data.index(b"\0", strtab + off)
            return data[strtab + off:end].decode()

        pos = offset
        for _ in range(info):
            _ver, cnt, vn_file, vn_aux, vn_next = struct.unpack_from("<HHIII", data, pos)
            names = out.setdefault(string(vn_file), set())
            aux = pos + vn_aux
            for _ in range(cnt):
                _hash, _flags2, _other, vna_name, vna_next = struct.unpack_from("<IHHII", data, aux)
                names.add(string(vna_name))
                aux += vna_next
            if not vn_next:
                break
            pos += vn_next
    return out


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def max_glibc(paths: list[Path]) -> tuple[str | None, str | None, list[str]]:
    """The newest ``GLIBC_x.y`` any of ``paths`` requires, which file requires it, and the files that require
    ``GLIBC_PRIVATE`` (tied to one glibc build: a problem if any)."""
    best, who, private = None, None, []
    for p in paths:
        for lib, names in elf_version_needs(p).items():
            for n in names:
                if n == "GLIBC_PRIVATE":
                    private.append(f"{p.name} ({lib})")
                elif n.startswith("GLIBC_") and (best is None or _version_key(n) > _version_key(best)):
                    best, who = n, p.name
    return (best[len("GLIBC_"):] if best else None), who, private


# ----------------------------------------------------------------------------------------------------- pack

def _find_pg_config() -> Path:
    found = shutil.which("pg_config")
    candidates = [Path(found)] if found else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_config"),
                         key=lambda p: _version_key(p.parent.parent.name), reverse=True)
    for c in candidates:
        # Debian's /usr/bin/pg_config reports the client library's paths; the server's own one is under
        # /usr/lib/postgresql/N/bin and is the one whose bindir holds postgres.
        bindir = subprocess.run([str(c), "--bindir"], capture_output=True, text=True).stdout.strip()
        if bindir and (Path(bindir) / "postgres").exists():
            return c
    raise SystemExit("pack: no pg_config whose --bindir holds a postgres server (install postgresql-NN, or pass "
                     "--pg-config /usr/lib/postgresql/NN/bin/pg_config)")


def _ldd(path: Path) -> dict[str, Path]:
    """soname -> resolved file for every library ``path`` loads (the transitive closure, as ldd prints it)."""
    proc = subprocess.run(["ldd", str(path)], capture_output=True, text=True)
    if proc.returncode and "not a dynamic executable" not in proc.stdout + proc.stderr:
        raise SystemExit(f"pack: ldd {path} failed: {proc.stderr.strip()}")
    out = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*(\S+)\s+=>\s+(.*?)\s+\(0x", line)
        if m:
            out[m.group(1)] = Path(m.group(2))
        elif "=> not found" in line:
            raise SystemExit(f"pack: {path} needs {line.split()[0]}, which ldd cannot find here")
    return out


def _share_ignore(share_root: Path):
    def ignore(directory: str, names: list[str]) -> set[str]:
        d = Path(directory)
        if d == share_root:
            return {n for n in names if n in SHARE_DROP}
        if d == share_root / "extension":
            return {n for n in names if not SHARE_EXTENSION_KEEP.match(n)}
        return set()
    return ignore


def pack(out: Path, pg_config: Path | None = None) -> Path:
    """Write a relocatable PostgreSQL server bundle (``.tar.xz``) to ``out``; returns ``out``.

    Prints the archive's size and the newest glibc symbol version the packed files require.
    """
    pg_config = pg_config or _find_pg_config()
    cfg = {k: subprocess.run([str(pg_config), f"--{k}"], capture_output=True, text=True, check=True).stdout.strip()
           for k in ("bindir", "pkglibdir", "sharedir", "version")}
    bindir, pkglibdir, sharedir = (Path(cfg[k]) for k in ("bindir", "pkglibdir", "sharedir"))
    with tempfile.TemporaryDirectory(prefix="pg-pack-") as work:
        stage = Path(work) / TOP
        rel = {k: Path(cfg[k]).relative_to("/") for k in ("bindir", "pkglibdir", "sharedir")}
        (stage / rel["bindir"]).mkdir(parents=True)
        (stage / rel["pkglibdir"]).mkdir(parents=True)
        # Real files, not links: PostgreSQL resolves its own executable's links before computing the relative
        # share and lib paths, and a link would point back into this machine's /usr.
        elfs = []
        for b in BINARIES:
            elfs.append(Path(shutil.copy2(bindir / b, stage / rel["bindir"] / b)))
        modules = [pkglibdir / m for m in REQUIRED_MODULES]
        for g in OPTIONAL_MODULE_GLOBS:
            modules += sorted(p for p in pkglibdir.glob(g) if p.name not in REQUIRED_MODULES)
        for m in modules:
            elfs.append(Path(shutil.copy2(m, stage / rel["pkglibdir"] / m.name)))
        shutil.copytree(sharedir, stage / rel["sharedir"], ignore=_share_ignore(sharedir), symlinks=False)

        deps: dict[str, Path] = {}
        for e in elfs:
            deps.update(_ldd(e))
        syslib, fallback = stage / "syslib", stage / "syslib" / "fallback"
        fallback.mkdir(parents=True)
        packed_libs, fallback_libs, host_libs = [], [], []
        for soname, path in sorted(deps.items()):
            if _GLIBC.match(soname):
                host_libs.append(soname)
                continue
            dest = fallback if _PREFER_HOST.match(soname) else syslib
            # Saved under the soname the loader asks for, from the file the link resolves to.
            shutil.copy2(path.resolve(), dest / soname)
            (fallback_libs if dest is fallback else packed_libs).append(soname)

        core = [p for p in stage.rglob("*") if p.is_file() and p.parent != fallback]
        glibc, glibc_who, private = max_glibc(core)
        glibc_fb, glibc_fb_who, private_fb = max_glibc(sorted(fallback.iterdir()))
        if private or private_fb:
            print(f"warning: GLIBC_PRIVATE needed by {', '.join(private + private_fb)}: that file works only "
                  f"with this exact glibc build", file=sys.stderr)
        manifest = {
            "format": 1, "postgres": cfg["version"], "pg_config": str(pg_config),
            "bindir": str(rel["bindir"]), "pkglibdir": str(rel["pkglibdir"]), "sharedir": str(rel["sharedir"]),
            "syslib": "syslib", "fallback": "syslib/fallback",
            "glibc_required": glibc, "glibc_required_by": glibc_who,
            "glibc_required_with_fallback": max([v for v in (glibc, glibc_fb) if v], key=_version_key),
            "fallback_glibc_required_by": glibc_fb_who,
            "syslib_libs": packed_libs, "fallback_libs": fallback_libs, "host_libs": host_libs,
            "modules": [m.name for m in modules],
            "built_on": {"machine": platform.machine(), "glibc": os.confstr("CS_GNU_LIBC_VERSION"),
                         "os": _os_release()},
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")

        def normalise(ti: tarfile.TarInfo) -> tarfile.TarInfo:
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = "root"
            return ti

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(out.name + ".part")
        with tarfile.open(tmp_out, "w:xz", preset=9) as tar:
            tar.add(stage, arcname=TOP, filter=normalise)
        tmp_out.replace(out)
        raw = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
    size = out.stat().st_size
    print(f"wrote {out}: {size / 1e6:.1f} MB ({raw / 1e6:.1f} MB unpacked), {cfg['version']}")
    print(f"  syslib: {len(packed_libs)} libraries; fallback (used only if the host's fail): "
          f"{', '.join(fallback_libs) or 'none'}; left to the host (glibc): {', '.join(host_libs)}")
    print(f"  needs host glibc >= {glibc} (newest need: {glibc_who}); with the fallback GCC runtime in use, "
          f">= {manifest['glibc_required_with_fallback']} (from {glibc_fb_who})")
    print("  a host with an older glibc cannot run it: the loader refuses with "
          "'version `GLIBC_x.y' not found'")
    return out


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


# ---------------------------------------------------------------------------------------------------- serve

def free_port() -> int:
    """A loopback TCP port free at the time of asking (a server may still lose it to a race: retry)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_postmaster(proc: subprocess.Popen | None) -> None:
    """Stop a postmaster we started, if it still runs: SIGINT is PostgreSQL's "fast" shutdown (roll back
    sessions, exit cleanly); after 15 s it is killed."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _import_psycopg():
    try:
        import psycopg
    except ImportError as e:
        raise RuntimeError(
            f"psycopg (3) is not importable ({e}); on a host without network install the carried wheels: "
            "python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl and put /tmp/site on "
            "PYTHONPATH") from e
    return psycopg


def _conninfo(url: str) -> tuple[dict, object]:
    """psycopg keyword arguments for a SQLAlchemy PostgreSQL URL, and the parsed URL."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() != "postgresql":
        raise ValueError(f"not a PostgreSQL URL: {u.render_as_string(hide_password=True)}")
    kw = {k: v for k, v in u.translate_connect_args(username="user", database="dbname").items() if v is not None}
    kw.update({k: v for k, v in u.query.items() if isinstance(v, str)})
    kw.setdefault("dbname", "postgres")
    return kw, u


def create_database_at(server_url: str, name: str) -> str:
    """CREATE DATABASE ``name`` on the server of ``server_url`` (connecting to that URL's database, default
    ``postgres``); returns the SQLAlchemy URL of the new database (same user, host, port and options)."""
    psycopg = _import_psycopg()
    from psycopg import sql

    kw, u = _conninfo(server_url)
    with psycopg.connect(**kw, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return u.set(database=name).render_as_string(hide_password=False)


def server_version(url: str) -> tuple[str, int]:
    """``SELECT version()`` and ``server_version_num`` of the server behind a SQLAlchemy PostgreSQL URL."""
    psycopg = _import_psycopg()
    kw, _ = _conninfo(url)
    with psycopg.connect(**kw, connect_timeout=10) as conn:
        text = conn.execute("SELECT version()").fetchone()[0]
        num = int(conn.execute("SHOW server_version_num").fetchone()[0])
    return text, num


class PortableServer:
    """A private PostgreSQL server run from a bundle made by :func:`pack`; use as a context manager.

    ``with PortableServer(bundle) as pg: url = pg.create_database()``. The bundle is extracted into a fresh
    directory under ``workdir`` (default: the system temp directory), which also holds the data directory, the
    Unix socket and ``server.log``; all of it is deleted by :meth:`stop`. The server listens on 127.0.0.1 only,
    trusts every local connection (user :attr:`user`), and trades durability for speed (``fsync=off``,
    ``synchronous_commit=off``): it exists for one study and is thrown away.
    """

    user = "sparvar"

    def __init__(self, bundle: str | os.PathLike, workdir: str | os.PathLike | None = None,
                 run_as: str | None = None, max_connections: int = 100) -> None:
        self.bundle = Path(bundle)
        self.workdir = Path(workdir) if workdir else None
        self.run_as = run_as
        self.max_connections = max_connections
        self.root: Path | None = None
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.manifest: dict = {}
        self.gcc_runtime = ""  # "host" or "bundled fallback": which libstdc++/libgcc_s the server loads
        self.account = pwd.getpwuid(os.geteuid()).pw_name  # who runs the server
        self._run_as: dict = {}
        self._env: dict[str, str] = {}
        self._log = None

    # -- paths
    @property
    def bindir(self) -> Path:
        return self.root / TOP / self.manifest["bindir"]

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def __enter__(self) -> "PortableServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Extract the bundle, initdb, start postgres and wait until it accepts connections.

        Raises FileNotFoundError for a missing bundle, RuntimeError (with the reason, and the server log's tail
        where there is one) for anything else.
        """
        if not self.bundle.is_file():
            raise FileNotFoundError(f"PostgreSQL bundle not found: {self.bundle} (make it where PostgreSQL is "
                                    f"installed with: python3 bench/pg_bundle.py pack --out {self.bundle})")
        _import_psycopg()  # fail before the slow part
        self.root = Path(tempfile.mkdtemp(prefix="sparvar-pgb-", dir=self.workdir))
        atexit.register(self.stop)
        try:
            self._extract()
            self._choose_user()
            self._choose_libraries()
            self._initdb()
            self._start_postmaster()
        except BaseException:
            self.stop()
            raise

    def _extract(self) -> None:
        with tarfile.open(self.bundle, "r:*") as tar:
            # The "data" filter refuses absolute paths and links out of the tree; our archives have neither.
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(self.root, **kwargs)
        try:
            self.manifest = json.loads((self.root / TOP / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise RuntimeError(f"{self.bundle} is not a bundle made by pg_bundle.py pack: {e}") from e
        syslib = self.root / TOP / self.manifest["syslib"]
        self._env = {"PATH": f"{self.bindir}{os.pathsep}/usr/bin:/bin", "LC_ALL": "C", "LANG": "C",
                     "HOME": str(self.root), "LD_LIBRARY_PATH": str(syslib),
                     # GMT is the one zone PostgreSQL knows without zoneinfo files: Debian's build reads the
                     # system's /usr/share/zoneinfo (a compiled-in absolute path the bundle cannot relocate), which
                     # a slim host may lack. initdb writes timezone = 'GMT' into postgresql.conf.
                     "TZ": "GMT"}

    def _choose_user(self) -> None:
        if os.geteuid() != 0:
            return
        names = [self.run_as] if self.run_as else ["postgres", "nobody"]
        for name in names:
            try:
                pw = pwd.getpwnam(name)
                break
            except KeyError:
                continue
        else:
            raise RuntimeError(f"running as root, and PostgreSQL refuses root, but no user {' or '.join(names)} "
                               f"exists to run it as (pass run_as= / --run-as with an existing user)")
        self._run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        self.account = pw.pw_name
        for directory, dirs, files in os.walk(self.root):
            for n in [directory] + [os.path.join(directory, x) for x in dirs + files]:
                os.lchown(n, pw.pw_uid, pw.pw_gid)
        # The account must reach self.root through every parent directory.
        for parent in self.root.parents:
            st = parent.stat()
            if not (st.st_mode & 0o001 or (st.st_uid == pw.pw_uid and st.st_mode & 0o100)
                    or (st.st_gid == pw.pw_gid and st.st_mode & 0o010)):
                raise RuntimeError(f"the server runs as {pw.pw_name!r}, which cannot enter {parent} (mode "
                                   f"{st.st_mode & 0o777:o}); pass a workdir it can traverse (e.g. --dir /tmp)")

    def _probe(self, extra: Path | None) -> subprocess.CompletedProcess:
        env = dict(self._env)
        if extra is not None:
            env["LD_LIBRARY_PATH"] += os.pathsep + str(extra)
        return subprocess.run([str(self.bindir / "postgres"), "-V"], capture_output=True, text=True, env=env,
                              cwd=self.root, **self._run_as)

    def _choose_libraries(self) -> None:
        # The host's libstdc++/libgcc_s first (they match its glibc); ours only if those are missing or too old.
        first = self._probe(None)
        if first.returncode == 0:
            self.gcc_runtime = "host"
            return
        fallback = self.root / TOP / self.manifest["fallback"]
        second = self._probe(fallback) if any(fallback.iterdir()) else first
        if second.returncode == 0:
            self.gcc_runtime = "bundled fallback"
            self._env["LD_LIBRARY_PATH"] += os.pathsep + str(fallback)
            return
        raise RuntimeError(
            f"the bundled postgres does not run here.\n with the host's GCC runtime: {first.stderr.strip()}\n"
            f" with the bundled one: {second.stderr.strip()}\n"
            f"The bundle needs glibc >= {self.manifest.get('glibc_required')} "
            f"(>= {self.manifest.get('glibc_required_with_fallback')} with its own GCC runtime); this host has "
            f"{os.confstr('CS_GNU_LIBC_VERSION')}, machine {platform.machine()} (bundle built on "
            f"{self.manifest.get('built_on')})")

    def _initdb(self) -> None:
        proc = subprocess.run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust",
                               "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
                              capture_output=True, text=True, env=self._env, cwd=self.root, **self._run_as)
        if proc.returncode:
            raise RuntimeError(f"initdb failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")

    def _start_postmaster(self) -> None:
        psycopg = _import_psycopg()
        self._log = open(self.log_path, "ab")
        for _attempt in range(3):  # the free port can be taken between probing and binding
            self.port = free_port()
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"max_connections={self.max_connections}",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "jit=off", "-c", "huge_pages=off"],
                stdout=self._log, stderr=subprocess.STDOUT, env=self._env, cwd=self.root, **self._run_as)
            deadline = time.monotonic() + _START_TIMEOUT_S
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                    return
                except psycopg.OperationalError:
                    time.sleep(0.1)
            stop_postmaster(self.proc)
            if "could not bind" not in self.log_tail():
                break
        raise RuntimeError(f"postgres did not start (exit {self.proc.returncode}); the end of its log:\n"
                           f"{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        """The last ``chars`` characters of the server's log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def dsn(self, database: str) -> str:
        """A libpq connection string for ``database`` on this server."""
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={database}"

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` on this server."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database (``name`` or a random one); returns its SQLAlchemy URL."""
        return create_database_at(self.url("postgres"), name or f"t_{uuid.uuid4().hex[:16]}")

    def server_version(self) -> str:
        """``SELECT version()`` of this server."""
        return server_version(self.url("postgres"))[0]

    def library_report(self) -> dict[str, list[str]]:
        """Where the loader finds each library of ``postgres`` under the server's environment (via ``ldd``):
        ``{"syslib": [...], "host": ["soname => path", ...], "missing": [...]}``; empty if ldd is absent."""
        if not shutil.which("ldd"):
            return {}
        proc = subprocess.run(["ldd", str(self.bindir / "postgres")], capture_output=True, text=True,
                              env=dict(self._env, PATH=os.environ.get("PATH", "/usr/bin:/bin")))
        syslib = str(self.root / TOP / self.manifest["syslib"])
        report: dict[str, list[str]] = {"syslib": [], "host": [], "missing": []}
        for line in proc.stdout.splitlines():
            m = re.match(r"\s*(\S+)\s+=>\s+(.*?)\s+\(0x", line)
            if m:
                report["syslib" if m.group(2).startswith(syslib) else "host"].append(
                    m.group(1) if m.group(2).startswith(syslib) else f"{m.group(1)} => {m.group(2)}")
            elif "not found" in line:
                report["missing"].append(line.strip())
        return report

    def stop(self) -> None:
        """Stop the server (if running) and delete the extracted tree and data. Safe to call twice."""
        atexit.unregister(self.stop)
        stop_postmaster(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


# ------------------------------------------------------------------------------------------------- commands

def selftest(bundle: Path, workdir: Path | None = None, run_as: str | None = None) -> int:
    """Start a server from ``bundle``, create the tuning schema (and an Optuna study) in a fresh database,
    print what happened, stop. Returns 0 when all of it worked."""
    t0 = time.perf_counter()
    print(f"host: {_os_release()}, {os.confstr('CS_GNU_LIBC_VERSION')}, {platform.machine()}, "
          f"python {platform.python_version()}")
    psycopg = _import_psycopg()
    print(f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__}, libpq {psycopg.pq.version()})")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        from sparvar_compiler.db import TuningDatabase
    except ImportError as e:
        raise RuntimeError(f"the project's database layer does not import ({e}); install the carried wheels "
                           f"(.whl/) and put the repository root on PYTHONPATH") from e
    with PortableServer(bundle, workdir, run_as) as pg:
        m = pg.manifest
        print(f"bundle: {bundle} ({m['postgres']}, built on {m['built_on']['os']}; needs glibc >= "
              f"{m['glibc_required']})")
        print(f"server: pid {pg.proc.pid} as {pg.account!r} on 127.0.0.1:{pg.port}, root {pg.root}, "
              f"GCC runtime: {pg.gcc_runtime}, up in {time.perf_counter() - t0:.1f} s")
        print(f"version: {pg.server_version()}")
        libs = pg.library_report()
        if libs:
            print(f"libraries: {len(libs['syslib'])} from the bundle's syslib; from the host: "
                  f"{'; '.join(libs['host'])}")
            if libs["missing"]:
                print(f"MISSING: {libs['missing']}")
                return 1
        url = pg.create_database("selftest")
        print(f"database: {url}")
        with TuningDatabase.open(url) as db:
            print(f"tuning database ({db.dialect}) stats: {json.dumps(db.stats(), default=str)}")
            storage = db.storage_url
        try:
            import optuna
        except ImportError as e:
            print(f"optuna: not importable ({e}), study storage not checked")
        else:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.create_study(storage=storage, study_name="selftest")
            study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0) ** 2, n_trials=5)
            again = optuna.load_study(storage=storage, study_name="selftest")
            print(f"optuna {optuna.__version__}: study on the server holds {len(again.trials)} trials")
    print(f"selftest OK in {time.perf_counter() - t0:.1f} s (server stopped, tree removed)")
    return 0


def serve(bundle: Path, workdir: Path | None = None, run_as: str | None = None) -> int:
    """Run a server from ``bundle`` until Ctrl-C or SIGTERM, printing a fresh database's URL."""
    def interrupt(*_):
        raise KeyboardInterrupt

    # Both set explicitly: a shell starting us in the background leaves SIGINT ignored, and Python then keeps it so.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    with PortableServer(bundle, workdir, run_as) as pg:
        print(f"{pg.server_version()}\nserver URL: {pg.url('postgres')}\nfresh database: {pg.create_database()}\n"
              f"(Ctrl-C stops it and deletes {pg.root})", flush=True)
        try:
            while pg.proc.poll() is None:
                time.sleep(1)
            print(f"postgres exited ({pg.proc.returncode}):\n{pg.log_tail()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="pack this machine's PostgreSQL server into a relocatable .tar.xz")
    p.add_argument("--out", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--pg-config", type=Path, help="the server's pg_config (default: newest with a postgres)")
    for name, text in (("selftest", "start a server from BUNDLE, create the tuning schema, stop"),
                       ("serve", "run a server from BUNDLE until Ctrl-C")):
        p = sub.add_parser(name, help=text)
        p.add_argument("bundle", type=Path, nargs="?", default=DEFAULT_BUNDLE)
        p.add_argument("--dir", type=Path, help="where to extract it (default: the temp directory)")
        p.add_argument("--run-as", help="user to run the server as when root (default: postgres, else nobody)")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        pack(args.out, args.pg_config)
        return 0
    try:
        return (selftest if args.cmd == "selftest" else serve)(args.bundle, args.dir, args.run_as)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"pg_bundle {args.cmd}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
