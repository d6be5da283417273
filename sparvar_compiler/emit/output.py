"""Put a finished directory at an output path, without ever losing what was there.

Every artifact the compiler writes (a runtime module, a module set) is built in a hidden staging directory beside
its output path and then put in place by :func:`staged_output`. The rules, in the order they are checked:

* The output path must name a directory entry of its own: not ``.``, ``..``, ``/``, the current directory or
  one of its parents, and its parent must be a directory this process can write.
* Nothing there: the staging directory is renamed into place.
* A sparvar module or module set there (its ``manifest.json`` / ``moduleset.json`` says
  ``format: sparvar-module`` / ``sparvar-module-set``, and it holds nothing the module does not account for):
  it is replaced.
* Any other directory: refused, unless ``force=True``, which replaces it.
* A file (of any kind but a directory) or a symbolic link: refused, even with ``force``.

The swap is atomic where the kernel allows it: on Linux ``renameat2(RENAME_EXCHANGE)`` exchanges the staging
directory and the old output in one step, so at every instant the path holds either the old or the new module;
the old one, now at the staging name, is deleted afterwards. Elsewhere (or on a filesystem without the flag)
the old output is renamed aside first, which leaves a short window with nothing at the path.

Sibling names (``NAME`` is the output's name; ``PID`` the emitting process)::

    .NAME.lock              held (flock) while the path is inspected and swapped; two emits to one path
                            take turns, and the second replaces the first's module
    .NAME.tmp-PID-HOST-XXXXXXXX  the staging directory; after an exchange, the old output on its way out
    .NAME.old-PID-HOST-XXXXXXXX  the old output, only in the two-rename fallback

(``HOST``: 8 hex digits of the host name's sha256.) Each emit keeps at most one of these at a time. One left by
a process of this host that no longer exists (a killed emit) is removed by the next emit to that path; nothing
else beside the output is ever touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import OutputPathError
from ..limits import MAX_MANIFEST_BYTES
from .manifest import FORMAT, MANIFEST, SET_MANIFEST, SHARED_DIR

LOCK_TIMEOUT_S = 120.0             # an emit holds the lock for milliseconds; this is a stuck or very slow disk
MAX_OUTPUT_NAME_BYTES = 200        # NAME_MAX is 255 and the siblings add ".tmp-PID-HOST-XXXXXXXX" around it

# After ".NAME.": the staging directory (tmp-PID-HOST-random) or an old output (old-PID-HOST-random, or old-PID as
# earlier versions named it). HOST tells this host's siblings from those of another host writing the same shared
# directory (or another container's): a PID means nothing there.
_SIBLING = re.compile(r"(?P<kind>tmp|old)-(?P<pid>[0-9]{1,12})(?:-(?P<host>[0-9a-f]{8})-[a-z0-9_]+)?")
_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


__all__ = ["OutputPathError", "Staging", "staged_output", "check_output", "existing_output", "install",
           "output_lock", "clean_stale_siblings", "fix_modes", "module_kind", "pid_alive"]


@dataclass
class Staging:
    """Where an artifact is being built (``path``) and where it will go (``target``). After the ``with`` block of
    :func:`staged_output`, ``replaced`` says what was at ``target`` before: None (nothing), ``"module"``,
    ``"module set"`` or ``"directory"`` (a directory that was not a module, replaced under ``force``)."""

    path: Path
    target: Path
    replaced: str | None = None


@contextlib.contextmanager
def staged_output(output: str | os.PathLike, force: bool = False,
                  lock_timeout: float = LOCK_TIMEOUT_S) -> Iterator[Staging]:
    """Build a directory for ``output`` and put it there when the block ends without an exception.

    The path is checked first (:func:`check_output`), so a refused output fails before anything is compiled, and
    again under the lock at the end, where the swap happens (:func:`install`). The block writes into
    ``staging.path`` (a new, empty directory beside ``output``); if it raises, the staging directory is removed
    and nothing at ``output`` changes.

    Raises
    ------
    OutputPathError
        The output path is refused; the message names it and what to do.
    """
    target = check_output(output, force)
    path = make_staging_dir(target)
    staging = Staging(path, target)
    try:
        yield staging
        staging.replaced = install(path, target, force, lock_timeout)
    except BaseException:
        _remove_tree(path)
        raise


def check_output(output: str | os.PathLike, force: bool = False) -> Path:
    """The absolute output path (its parent resolved), after every check that can be made before building.

    Creates the parent directory if it is missing. Raises :class:`OutputPathError` for ``.``, ``..``, ``/``, the
    current directory or one of its parents, a parent that cannot be created or written, and whatever
    :func:`existing_output` refuses.
    """
    text = os.fspath(output)
    if not text:
        raise OutputPathError("the output path is empty: name the module directory, e.g. -o out/NAME")
    norm = os.path.normpath(text)
    name = os.path.basename(norm)
    if name in ("", ".", ".."):
        raise OutputPathError(f"output path {text!r} names no directory of its own (it is '.', '..' or '/'): "
                              "name the module directory itself, e.g. -o out/NAME")
    if len(os.fsencode(name)) > MAX_OUTPUT_NAME_BYTES:
        raise OutputPathError(f"output name {name[:40]!r}... is longer than {MAX_OUTPUT_NAME_BYTES} bytes: "
                              "choose a shorter -o")
    parent = Path(os.path.realpath(os.path.dirname(os.path.abspath(norm))))
    target = parent / name
    cwd = Path(os.path.realpath(os.getcwd()))
    if target == cwd or target in cwd.parents:
        raise OutputPathError(f"output path {text!r} is the current directory or one of its parents: choose "
                              "another -o, e.g. -o out/NAME")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot create the output's parent directory {parent}: "
                              f"{e.strerror or e}; choose another -o") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write in {parent} (permission denied): choose an -o in a directory you "
                              "can write")
    existing_output(target, force)
    return target


def existing_output(target: Path, force: bool = False) -> str | None:
    """What is at ``target`` and may be replaced: None (nothing), ``"module"``, ``"module set"``, or
    ``"directory"`` (only with ``force``). Raises :class:`OutputPathError` for anything that must not be."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OutputPathError(f"cannot inspect the output path {target}: {e.strerror or e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise OutputPathError(f"output path {target} is a symbolic link; sparvar-compile does not write through "
                              "links (not even with --force): remove the link or choose another -o")
    if not stat.S_ISDIR(st.st_mode):
        raise OutputPathError(f"output path {target} exists and is not a directory; it is never replaced (not "
                              "even with --force): remove it or choose another -o")
    kind = module_kind(target)
    foreign = None if kind is None else foreign_entry(target, kind)
    if kind is not None and foreign is None:
        return kind
    if force:
        if not os.access(target, os.W_OK | os.X_OK):
            raise OutputPathError(f"output path {target} is a read-only directory and cannot be emptied, even with "
                                  "--force: make it writable or choose another -o")
        return "directory"
    if kind is None:
        raise OutputPathError(f"output path {target} exists and is not a sparvar module (no {MANIFEST} or "
                              f"{SET_MANIFEST} naming its format); it is left as it is: choose another -o, or "
                              "pass --force to replace it and delete everything in it")
    raise OutputPathError(f"output path {target} is a sparvar {kind} but also holds {foreign}, which sparvar did "
                          "not write; it is left as it is: move that out, choose another -o, or pass --force to "
                          "replace it all")


def module_kind(directory: Path) -> str | None:
    """``"module"`` or ``"module set"`` if ``directory``'s manifest says it is one, else None."""
    from .moduleset import SET_FORMAT

    if _manifest_format(directory / MANIFEST) == FORMAT:
        return "module"
    if _manifest_format(directory / SET_MANIFEST) == SET_FORMAT:
        return "module set"
    return None


def _read_manifest(path: Path) -> dict | None:
    """The parsed manifest at ``path`` if it is a regular file of at most MAX_MANIFEST_BYTES holding a JSON
    object, else None (a module directory is recognised, never trusted)."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MANIFEST_BYTES:
            return None
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_MANIFEST_BYTES + 1))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _manifest_format(path: Path) -> str | None:
    data = _read_manifest(path)
    fmt = None if data is None else data.get("format")
    return fmt if isinstance(fmt, str) else None


def foreign_entry(directory: Path, kind: str) -> str | None:
    """The first entry of a module (``kind`` ``"module"``) or module set that its manifest does not account for
    (a user's file beside the module's own, a symbolic link, a FIFO), as a path relative to ``directory``; None if
    everything in it is the module's. Contents are not hashed: this decides whether sparvar wrote the directory,
    not whether it is intact."""
    if kind == "module":
        return _foreign_in_module(directory, directory)
    data = _read_manifest(directory / SET_MANIFEST) or {}
    members = {m.get("name") for m in data.get("members") or [] if isinstance(m, dict)}
    shared = data.get("shared") if isinstance(data.get("shared"), dict) else {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name == SHARED_DIR and entry.is_dir(follow_symlinks=False):
            for f in sorted(os.scandir(entry.path), key=lambda e: e.name):
                if f.name not in shared or not f.is_file(follow_symlinks=False):
                    return f"{SHARED_DIR}/{f.name}"
        elif entry.name in members and entry.is_dir(follow_symlinks=False):
            if module_kind(Path(entry.path)) != "module":
                return entry.name
            found = _foreign_in_module(Path(entry.path), directory)
            if found is not None:
                return found
        elif not (_is_sidecar(entry.name, SET_MANIFEST) and entry.is_file(follow_symlinks=False)):
            return entry.name
    return None


def _is_sidecar(name: str, manifest: str) -> bool:
    """The manifest itself, or a file beside it named after it (its digest sidecar, e.g. ``manifest.sha256``)."""
    stem = manifest.removesuffix(".json")
    return name == manifest or name.startswith(stem + ".")


def _foreign_in_module(directory: Path, root: Path) -> str | None:
    data = _read_manifest(directory / MANIFEST) or {}
    listed = set(data.get("files") or {}) if isinstance(data.get("files"), dict) else set()
    for dirpath, dirnames, filenames in os.walk(directory):
        here = Path(dirpath)
        for name in sorted(filenames) + sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d))):
            p = here / name
            rel = p.relative_to(directory).as_posix()
            top_sidecar = here == directory and _is_sidecar(name, MANIFEST)
            if not (rel in listed or top_sidecar) or not stat.S_ISREG(os.lstat(p).st_mode):
                return p.relative_to(root).as_posix()
    return None


def make_staging_dir(target: Path) -> Path:
    """A new private directory ``.NAME.tmp-PID-HOST-XXXXXXXX`` beside ``target`` (same filesystem, so it can be
    renamed into place)."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-{_HOST_TAG}-", dir=target.parent))
    except OSError as e:
        raise OutputPathError(f"cannot write in {target.parent}: {e.strerror or e}; choose another -o") from None


def install(new: Path, target: Path, force: bool = False, lock_timeout: float = LOCK_TIMEOUT_S) -> str | None:
    """Put the finished directory ``new`` (a sibling of ``target``) at ``target``; returns what it replaced
    (as :func:`existing_output`). Under the output's lock: stale siblings of dead emits are removed, ``target`` is
    checked again (another emit may have put a module there meanwhile, which is then replaced) and swapped. The
    old output is deleted after the lock is released. On an error ``target`` is unchanged."""
    old: Path | None = None
    try:
        fix_modes(new)
        with output_lock(target, lock_timeout):
            clean_stale_siblings(target)
            replaced = existing_output(target, force)
            if replaced is None:
                _rename_new(new, target)
            else:
                old = _swap(new, target)
    except OSError as e:  # a mount point (EBUSY), a read-only file system, a full disk, ...
        raise OutputPathError(f"cannot put the new module at {target}: {e.strerror or e}; it is left as it "
                              "was: choose another -o") from None
    if old is not None:
        _remove_tree(old)
    return replaced


def _rename_new(new: Path, target: Path) -> None:
    if _renameat2(new, target, _RENAME_NOREPLACE):
        return
    # No renameat2 here: a plain rename, which would also replace an empty directory created since the check.
    if os.path.lexists(target):
        raise OutputPathError(f"output path {target} appeared while the module was being written: emit again")
    os.rename(new, target)


def _swap(new: Path, target: Path) -> Path:
    """Exchange ``new`` and ``target``; returns where the old output now is (to be deleted)."""
    if _renameat2(new, target, _RENAME_EXCHANGE):
        return new  # the old output now has the staging name
    # Fallback where renameat2 or RENAME_EXCHANGE is unavailable (not Linux, glibc < 2.28, a filesystem such as
    # NFS without the flag): two renames, with a short window in which nothing is at the path. A crash inside it
    # leaves the old output at .NAME.old-PID-*, which the next emit to this path removes.
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{_HOST_TAG}-{secrets.token_hex(4)}")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


# ------------------------------------------------------------------------------------------------ renameat2
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


@functools.lru_cache(maxsize=None)
def _renameat2_function():
    """libc's ``renameat2`` (glibc >= 2.28, musl >= 1.2.1), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``: True when done, False where the call or the flag is unsupported (the
    caller falls back); any other failure raises :class:`OSError`."""
    fn = _renameat2_function()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    if err == errno.EEXIST:
        raise OutputPathError(f"output path {dst} appeared while the module was being written: emit again")
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


# ------------------------------------------------------------------------------------------------ the lock
@contextlib.contextmanager
def output_lock(target: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[Path]:
    """Hold ``.NAME.lock`` beside ``target`` (an exclusive ``flock``); waits up to ``timeout`` seconds.

    The lock file is removed on release (while still locked); a waiter that then finds its file gone or replaced
    locks the new one, so the file never outlives the emits using it and never needs cleaning up. A process
    killed while holding it releases it (the kernel drops its flocks).
    """
    path = target.with_name(f".{target.name}.lock")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputPathError(f"cannot create the lock file {path}: {e.strerror or e}; choose another "
                                  "-o") from None
        locked = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise OutputPathError(f"waited {timeout:.0f} s for {path}: another sparvar-compile is "
                                              f"writing {target}; let it finish, or choose another -o") from None
                    time.sleep(0.02)
            mine = os.fstat(fd)
            try:
                now = os.stat(path, follow_symlinks=False)
                locked = (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                pass
        except BaseException:
            os.close(fd)
            raise
        if locked:
            break
        os.close(fd)  # the previous holder removed this file on release: lock the current one
    try:
        yield path
    finally:
        try:
            if os.fstat(fd).st_size == 0:  # ours is always empty; a non-empty one is someone else's file
                os.unlink(path)
        except OSError:
            pass
        os.close(fd)


# ------------------------------------------------------------------------------------------------ cleanup
def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this host). Unknown counts as alive: never delete what may be in use."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):
        return False  # larger than any PID: no process has it
    except OSError:
        return True  # EPERM: another user's process
    return True


def clean_stale_siblings(target: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID-HOST-*`` / ``.NAME.old-PID*`` directories beside ``target`` whose process on this
    host is gone (a killed emit's); returns what was removed. Anything else - a sibling of a live process, of
    another host, a file, a name sparvar does not make - is left alone."""
    prefix = f".{target.name}."
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        m = _SIBLING.fullmatch(entry.name[len(prefix):])
        if m is None or m["host"] not in (_HOST_TAG, None) or (m["host"] is None and m["kind"] == "tmp"):
            continue
        if not entry.is_dir(follow_symlinks=False) or pid_alive(int(m["pid"])):
            continue
        _remove_tree(Path(entry.path))
        removed.append(Path(entry.path))
    return removed


def _remove_tree(path: Path) -> None:
    """Delete ``path`` (never following links); a failure is a warning naming what is left, not an error: the
    new output is already in place, and the next emit to the path retries."""
    if not os.path.lexists(path):
        return
    failed: list[str] = []
    shutil.rmtree(path, onerror=lambda fn, p, exc: failed.append(f"{p}: {exc[1]}"))
    if failed:
        warnings.warn(f"could not remove {path} completely ({failed[0]}); remove it by hand", stacklevel=3)


# ------------------------------------------------------------------------------------------------ permissions
def current_umask() -> int:
    """This process's umask, read without changing it (``os.umask`` would, for every thread, for a moment)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    probe = tempfile.mkdtemp(prefix=".sparvar-umask-")  # mkdtemp's 0o700 is not the umask: mkdir again
    try:
        inner = os.path.join(probe, "d")
        os.mkdir(inner, 0o777)
        return 0o777 & ~stat.S_IMODE(os.stat(inner).st_mode)
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def fix_modes(root: Path) -> None:
    """Give the tree at ``root`` ordinary permissions under the umask: directories 0o777, files 0o666, less the
    umask (``tempfile.mkdtemp`` makes its directory 0o700, which would leave the module private)."""
    mask = current_umask()
    dmode, fmode = 0o777 & ~mask, 0o666 & ~mask
    os.chmod(root, dmode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, dmode)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, fmode)
