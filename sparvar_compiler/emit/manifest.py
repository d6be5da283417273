"""The runtime module's format: what a module holds, the schema every reader checks, and the digests.

A module is a directory::

    manifest.json        model, schedule, plan, target GPU, environment, per (scale, layer) dispatch,
                         kernels (launch metadata, config, tuned flag) and a sha256 of every other file
    manifest.sha256      the sha256 of manifest.json's bytes, one line as ``sha256sum`` writes it
                         (``<hex>  manifest.json``: ``sha256sum -c manifest.sha256`` checks it too)
    layouts/*.npz        BlockLayouts and kernel tables (numpy npz, no pickle)
    kernels/*.cubin      compiled kernels for the target GPU
    README.txt           how to load it

A module can be a member of a module set (one directory per aspect ratio beside a ``moduleset.json`` and its
``moduleset.sha256``, see :mod:`sparvar_compiler.emit.moduleset`): its manifest's ``shared_files`` then maps some
of its relative paths (kernels and layouts that several members use) to a sha256, and the file lives once in the
set's pool, ``../shared/<sha256><suffix>``. :func:`module_file` resolves a path either way.

Nothing in a module is trusted. :func:`verify_module` (which :func:`sparvar_compiler.runtime.load` runs first)
checks, in this order, and stops at the first problem with a :class:`ModuleError` naming it:

1. the directory, ``manifest.json`` and ``manifest.sha256`` are what they claim (no symlinks, regular files,
   bounded sizes), and the manifest's sha256 is the sidecar's;
2. the manifest parses as bounded JSON (depth, number digits, no NaN) and passes :func:`check_manifest`, the
   schema: every key, type and range, every cross-reference (see its docstring);
3. the tree holds regular files and folders only (no symlinks, FIFOs, sockets or devices), every file is
   listed, every listed file is there with its sha256; a member's pooled files are regular files in the pool
   with theirs;
4. with ``gpu``: the module was built for that GPU.

What the digest protects, and what it cannot
--------------------------------------------
``manifest.sha256`` detects accidental and careless edits: a hand-edited target, a truncated copy, a manifest
from another module. It is not a signature: whoever can write the directory can rewrite the manifest and
recompute its digest. Such a deliberate rewrite can only produce a module whose every field is within the
schema - indices in range, every dispatch row on a kernel of its own scale, every referenced file inside the
module and listed with its hash, kernels whose binaries are the listed ones, built for the target's arch and
launched with the grid and block their spec and config give, tables within their layout's bounds (checked at
load) - and the loader checks the target against the device it runs on (arch, SM count, card) while the
driver refuses a cubin of another arch. What it can still do: relabel a module between cards of one arch and
SM count (h100 and h200: the kernels run correctly, tuned for the other card), state a dynamic shared memory
size the binary does not match (the record's, not the binary's), or ship cubins of its own making, which are
code. Trusting a module is trusting whoever wrote its directory: keep modules where only you write, or sign
the directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from ..errors import SparvarError
from ..limits import (MAX_BATCH, MAX_DEPTH, MAX_DIGEST_FILE_BYTES, MAX_GRID_SIDE, MAX_GROUP_SIZE, MAX_HEAD_DIM,
                      MAX_HEADS, MAX_JSON_DEPTH, MAX_JSON_NUMBER_DIGITS, MAX_KV_LEN, MAX_MANIFEST_BYTES,
                      MAX_MODULE_FILE_BYTES, MAX_MODULE_FILES, MAX_MODULE_TREE_DEPTH, MAX_NAME_LENGTH, MAX_SCALES,
                      MAX_SET_MEMBERS, MAX_TOKENS_PER_SCALE, NAME_PATTERN)

MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"
SET_MANIFEST = "moduleset.json"
SET_MANIFEST_DIGEST = "moduleset.sha256"
SHARED_DIR = "shared"
FORMAT = "sparvar-module"
# 2: the cs4a section and its dispatch ops; 3: batch-generic kernels (meta batch, batch_grid);
# 4: manifest.sha256 beside the manifest, and every field checked by check_manifest.
FORMAT_VERSION = 4

DTYPE_NAMES = ("bf16", "fp16", "fp32")      # codegen.spec.DTYPES (kept here so verify needs no torch)
DISPATCH_OPS = ("sdpa", "kernel", "cs4a", "cs4a_decision", "skip")
MODES = ("dense", "decision", "cs4a", "csla", "skipped")  # planner.plan.Mode values
FAMILIES = ("infinity", "var", "custom")
_OP_OF_MODE = {"dense": "sdpa", "csla": "kernel", "cs4a": "cs4a", "skipped": "skip"}  # decision: see _dispatch
_REL_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9_][A-Za-z0-9._-]{0,127}){0,7}")
_NAME = re.compile(NAME_PATTERN)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_POOL_NAME = re.compile(r"[0-9a-f]{64}(\.[A-Za-z0-9_-]{1,16})?")
_KEY = re.compile(r"[A-Za-z0-9_.-]{1,128}")
MAX_STRING = 4_096                           # any free-text field (notes, sources, versions)


class ModuleError(SparvarError):
    """A runtime module that is incomplete, tampered with, or built for something else."""


# ---------------------------------------------------------------------------------------------- files
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _show(rel: str) -> str:
    """A path for a message: as is when it is plain, else quoted (control characters, odd bytes)."""
    return rel if re.fullmatch(r"[A-Za-z0-9._/-]{1,300}", rel) else repr(rel)[:300]


def _open_regular(path: Path, what: str, limit: int) -> tuple[int, int]:
    """``(fd, size)`` of ``path`` opened for reading without following a symlink or blocking on a FIFO; refuses
    anything but a regular file of at most ``limit`` bytes."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ModuleError(f"missing {what}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ModuleError(f"{what} is a symlink: a module holds regular files only") from None
        raise ModuleError(f"cannot read {what}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModuleError(f"{what} is not a regular file (a folder, FIFO, socket or device)")
        if st.st_size > limit:
            raise ModuleError(f"{what} is {st.st_size} bytes, more than the limit of {limit}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _read_regular(path: Path, what: str, limit: int) -> bytes:
    fd, _ = _open_regular(path, what, limit)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ModuleError(f"{what} is more than the limit of {limit} bytes")
    return data


def _hash_regular(path: Path, what: str) -> str:
    fd, _ = _open_regular(path, what, MAX_MODULE_FILE_BYTES)
    h = hashlib.sha256()
    read = 0
    with os.fdopen(fd, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            read += len(chunk)
            if read > MAX_MODULE_FILE_BYTES:
                raise ModuleError(f"{what} is more than the limit of {MAX_MODULE_FILE_BYTES} bytes")
            h.update(chunk)
    return h.hexdigest()


def _real_dir(path: Path, what: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ModuleError(f"{path}: no such directory") from None
    except OSError as e:
        raise ModuleError(f"{path}: cannot read {what}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ModuleError(f"{path}: {what} is a symlink: a module is a real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise ModuleError(f"{path}: not a directory")


def _walk(root: Path, what: str) -> set[str]:
    """Relative paths of the regular files under ``root`` (``os.scandir``, nothing followed); raises on a
    symlink, on anything that is neither a regular file nor a folder, and past the size bounds."""
    found: set[str] = set()
    stack: list[tuple[Path, str, int]] = [(root, "", 0)]
    while stack:
        folder, prefix, depth = stack.pop()
        try:
            with os.scandir(folder) as entries:
                listing = list(entries)
        except OSError as e:
            raise ModuleError(f"cannot list {what} {prefix or '.'}: {e.strerror}") from None
        for entry in listing:
            rel = prefix + entry.name
            if entry.is_symlink():
                raise ModuleError(f"{_show(rel)} in {what} is a symlink: a module holds regular files and folders "
                                  "only")
            if entry.is_dir(follow_symlinks=False):
                if depth + 1 > MAX_MODULE_TREE_DEPTH:
                    raise ModuleError(f"{what} nests folders deeper than {MAX_MODULE_TREE_DEPTH} at {_show(rel)}")
                stack.append((Path(entry.path), rel + "/", depth + 1))
            elif entry.is_file(follow_symlinks=False):
                found.add(rel)
                if len(found) > MAX_MODULE_FILES + 2:
                    raise ModuleError(f"{what} holds more than {MAX_MODULE_FILES} files")
            else:
                raise ModuleError(f"{_show(rel)} in {what} is not a regular file (a FIFO, socket or device)")
    return found


def shared_path(directory: Path, rel: str, digest: str) -> Path:
    """Where a member's shared file ``rel`` with ``digest`` lives: the set's pool, named by content."""
    return directory.parent / SHARED_DIR / f"{digest}{PurePosixPath(rel).suffix}"


def module_file(directory: str | Path, manifest: dict[str, Any], rel: str) -> Path:
    """The path of a module's file ``rel``: in the module directory, or in its set's pool when shared."""
    d = Path(directory)
    digest = (manifest.get("shared_files") or {}).get(rel)
    return d / rel if digest is None else shared_path(d, rel, str(digest))


def read_module_file(directory: str | Path, manifest: dict[str, Any], rel: str) -> bytes:
    """The bytes of a checked manifest's file ``rel`` (in the module or its set's pool), read without following
    symlinks and re-hashed: what a loader uses is exactly what the manifest lists, whatever changed on disk
    after :func:`verify_module`."""
    digest = manifest["files"].get(rel) or (manifest.get("shared_files") or {}).get(rel)
    if digest is None:
        raise ModuleError(f"{_show(rel)} is not a file of the module")
    data = _read_regular(module_file(directory, manifest, rel), f"file {_show(rel)}", MAX_MODULE_FILE_BYTES)
    if hashlib.sha256(data).hexdigest() != digest:
        raise ModuleError(f"file {_show(rel)} was modified: its sha256 does not match the manifest's")
    return data


# ---------------------------------------------------------------------------------------------- JSON and digests
def _number(text: str, kind: type) -> Any:
    if len(text) > MAX_JSON_NUMBER_DIGITS:
        raise ValueError(f"a number of {len(text)} characters (the limit is {MAX_JSON_NUMBER_DIGITS})")
    return kind(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _json_depth(value: Any) -> int:
    depth, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            depth = max(depth, d)
            if depth > MAX_JSON_DEPTH:
                return depth
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return depth


def load_json_bounded(data: bytes, what: str) -> Any:
    """Parse JSON ``data`` within the limits (:mod:`sparvar_compiler.limits`): nesting depth, digits of a
    number, no NaN or Infinity, UTF-8. Raises :class:`ModuleError` naming ``what``."""
    try:
        value = json.loads(data.decode("utf-8"), parse_int=lambda t: _number(t, int),
                           parse_float=lambda t: _number(t, float), parse_constant=_no_constant)
    except RecursionError:
        raise ModuleError(f"{what}: nested deeper than {MAX_JSON_DEPTH}") from None
    except UnicodeDecodeError as e:
        raise ModuleError(f"{what}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # JSONDecodeError is one
        raise ModuleError(f"{what}: not valid JSON ({e})") from None
    if _json_depth(value) > MAX_JSON_DEPTH:
        raise ModuleError(f"{what}: nested deeper than {MAX_JSON_DEPTH}")
    return value


def _digest_line(digest: str, name: str) -> bytes:
    return f"{digest}  {name}\n".encode()


def _read_digest(directory: Path, sidecar: str, name: str) -> str:
    """The digest recorded in ``directory/sidecar`` for ``name`` (one ``sha256sum`` line)."""
    data = _read_regular(directory / sidecar, sidecar, MAX_DIGEST_FILE_BYTES)
    m = re.fullmatch(rb"([0-9a-f]{64}) [ *]" + re.escape(name.encode()) + rb"\n?", data)
    if m is None:
        raise ModuleError(f"{sidecar}: must be one line '<sha256>  {name}'")
    return m.group(1).decode()


def _checked_bytes(directory: Path, name: str, sidecar: str, limit: int) -> bytes:
    """``directory/name``'s bytes after its sidecar's digest matched them."""
    data = _read_regular(directory / name, name, limit)
    recorded = _read_digest(directory, sidecar, name)
    actual = hashlib.sha256(data).hexdigest()
    if actual != recorded:
        raise ModuleError(f"{name} was modified: its sha256 {actual[:16]}... is not the {recorded[:16]}... recorded "
                          f"in {sidecar} (an edited manifest is refused; emit the module again)")
    return data


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_with_digest(directory: Path, name: str, sidecar: str, doc: dict[str, Any]) -> None:
    data = (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
    # The manifest first, then its digest: a crash in between leaves a mismatch, which verify refuses.
    _write_atomic(directory / name, data)
    _write_atomic(directory / sidecar, _digest_line(hashlib.sha256(data).hexdigest(), name))


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` and ``manifest.sha256`` into the module ``directory`` (each by an atomic rename,
    the digest last). The manifest is checked against the schema first: the emitter never writes a module its
    loader would refuse.

    Raises
    ------
    ModuleError
        The manifest breaks the schema (:func:`check_manifest`); nothing is written.
    """
    check_manifest(manifest)
    _write_with_digest(Path(directory), MANIFEST, MANIFEST_DIGEST, manifest)


def write_set_manifest(directory: str | Path, data: dict[str, Any]) -> None:
    """Write ``moduleset.json`` and ``moduleset.sha256`` into the set ``directory``, checked first
    (:func:`check_set_manifest`), as :func:`write_manifest` does for a module."""
    check_set_manifest(data)
    _write_with_digest(Path(directory), SET_MANIFEST, SET_MANIFEST_DIGEST, data)


# ---------------------------------------------------------------------------------------------- schema helpers
def _fail(path: str, problem: str) -> ModuleError:
    return ModuleError(f"manifest {path}: {problem}")


def _describe(value: Any) -> str:
    """A value for a message: itself when short, else its kind and size (or its start)."""
    text = repr(value)
    if len(text) <= 60:
        return text
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    if isinstance(value, list):
        return f"a list of {len(value)} entries"
    return text[:57] + "..."


def _at(path: str, key: Any) -> str:
    return f"{path}.{key}" if isinstance(key, str) and _KEY.fullmatch(key) else f"{path}[{_describe(key)}]"


def _obj(value: Any, path: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """``value`` as an object with exactly the ``required`` keys and any of ``optional``."""
    if not isinstance(value, dict):
        raise _fail(path, f"must be an object, got {_describe(value)}")
    for key in required:
        if key not in value:
            raise _fail(path, f"has no '{key}'")
    unknown = sorted(str(k) for k in value if k not in required and k not in optional)
    if unknown:
        raise _fail(path, f"unknown key {_describe(unknown[0])}")
    return value


def _int(value: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"must be an integer, got {_describe(value)}")
    if not lo <= value <= hi:
        raise _fail(path, f"{value} is out of range {lo}..{hi}")
    return value


def _real(value: Any, path: str, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(path, f"must be a finite number, got {_describe(value)}")
    if value < lo or value > hi or (lo_open and value == lo):
        raise _fail(path, f"{value} is out of range {'(' if lo_open else '['}{lo}, {hi}]")
    return float(value)


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, f"must be true or false, got {_describe(value)}")
    return value


def _str(value: Any, path: str, pattern: re.Pattern | None = None, max_len: int = MAX_STRING) -> str:
    if not isinstance(value, str) or len(value) > max_len or (pattern is not None and not pattern.fullmatch(value)):
        raise _fail(path, f"must be {'a name' if pattern is not None else 'text'} of at most {max_len} characters"
                          f"{f' matching {pattern.pattern}' if pattern is not None else ''}, got {_describe(value)}")
    return value


def _choice(value: Any, path: str, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise _fail(path, f"{_describe(value)} is not one of {', '.join(options)}")
    return value


def _same(a: Any, b: Any) -> bool:
    """Equal, and of the same JSON types all the way down (``True`` is not ``1``, ``1.0`` is not ``1``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _equal(value: Any, path: str, expected: Any, why: str) -> None:
    """``value`` is ``expected`` (:func:`_same`); objects that differ are reported by their first differing key."""
    if _same(value, expected):
        return
    if isinstance(value, dict) and isinstance(expected, dict):
        for key in sorted(set(value) | set(expected), key=str):
            if key not in value:
                raise _fail(path, f"has no '{key}' ({why})")
            if key not in expected:
                raise _fail(path, f"unknown key {_describe(key)} ({why})")
            _equal(value[key], _at(path, key), expected[key], why)
    raise _fail(path, f"{_describe(value)} does not match {why} ({_describe(expected)})")


def _list(value: Any, path: str, max_len: int, length: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(path, f"must be a list, got {_describe(value)}")
    if len(value) > max_len or (length is not None and len(value) != length):
        raise _fail(path, f"has {len(value)} entries, " + (f"expected {length}" if length is not None
                                                            else f"more than the limit of {max_len}"))
    return value


def _sha(value: Any, path: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise _fail(path, f"must be a sha256 (64 lower-case hex digits), got {_describe(value)}")
    return value


def check_rel_path(value: Any, path: str) -> str:
    """``value`` as a module-relative file path: normalised (no ``.``, ``..``, empty or absolute parts), of
    plain characters, and not one of the manifest's own files."""
    if (not isinstance(value, str) or not _REL_PATH.fullmatch(value) or value in (MANIFEST, MANIFEST_DIGEST)
            or any(part in (".", "..") for part in value.split("/"))):
        raise _fail(path, f"{_describe(value)} is not a normalised relative path inside the module")
    return value


def _scalars(value: Any, path: str, max_keys: int = 64) -> dict[str, Any]:
    """An informational object of scalar values (a config, an environment)."""
    if not isinstance(value, dict) or len(value) > max_keys:
        raise _fail(path, f"must be an object of at most {max_keys} entries, got {_describe(value)}")
    for key, v in value.items():
        _str(key, f"{path} key", _KEY)
        items = v if isinstance(v, list) and len(v) <= 64 else [v]
        for x in items:
            if isinstance(x, str):
                _str(x, _at(path, key))
            elif isinstance(x, float) and not math.isfinite(x):
                raise _fail(_at(path, key), f"must be finite, got {x}")
            elif x is not None and not isinstance(x, (bool, int, float)):
                raise _fail(_at(path, key), f"must be a scalar, got {_describe(v)}")
    return value


# ---------------------------------------------------------------------------------------------- schema sections
def _check_model(model: Any, path: str = "model") -> dict[str, Any]:
    _obj(model, path, ("name", "family", "depth", "heads", "head_dim"))
    _str(model["name"], f"{path}.name", _NAME, MAX_NAME_LENGTH)
    _choice(model["family"], f"{path}.family", FAMILIES)
    _int(model["depth"], f"{path}.depth", 1, MAX_DEPTH)
    _int(model["heads"], f"{path}.heads", 1, MAX_HEADS)
    _int(model["head_dim"], f"{path}.head_dim", 1, MAX_HEAD_DIM)
    return model


def _check_grids(grids: Any, path: str) -> list[tuple[int, int]]:
    out = []
    for i, g in enumerate(_list(grids, path, MAX_SCALES)):
        _list(g, f"{path}[{i}]", 2, 2)
        h = _int(g[0], f"{path}[{i}][0]", 1, MAX_GRID_SIDE)
        w = _int(g[1], f"{path}[{i}][1]", 1, MAX_GRID_SIDE)
        if h * w > MAX_TOKENS_PER_SCALE:
            raise _fail(f"{path}[{i}]", f"{h}x{w} is more than {MAX_TOKENS_PER_SCALE} tokens")
        out.append((h, w))
    if not out:
        raise _fail(path, "must list at least one scale")
    return out


def _check_plan(plan: Any, model: dict[str, Any]) -> Any:
    """The plan section; returns its parsed config (:class:`~sparvar_compiler.planner.PlanConfig`)."""
    from ..planner.config import PlanConfig, config_from_mapping, resolve_config

    _obj(plan, "plan", ("model", "family", "depth", "heads", "head_dim", "resolution", "aspect", "grids", "config",
                        "scales"))
    for key, mkey in (("model", "name"), ("family", "family"), ("depth", "depth"), ("heads", "heads"),
                      ("head_dim", "head_dim")):
        _equal(plan[key], f"plan.{key}", model[mkey], f"model.{mkey}")
    _int(plan["resolution"], "plan.resolution", 1, 1 << 20)
    _str(plan["aspect"], "plan.aspect", re.compile(r"[0-9.:x]{1,32}"), 32)
    grids = _check_grids(plan["grids"], "plan.grids")
    # The plan's config as the planner resolved it for this schedule and model: every field present, and a
    # fixed point of resolve_config (windows per scale, decision scale and bound layer in range, ...).
    _obj(plan["config"], "plan.config", tuple(PlanConfig().to_dict()))
    try:
        config = config_from_mapping(plan["config"], "plan.config")
        resolved = resolve_config(config, len(grids), model["depth"])
    except SparvarError as e:
        raise ModuleError(f"manifest {e}") from None
    if resolved != config:
        changed = next(k for k, v in resolved.to_dict().items() if not _same(v, config.to_dict()[k]))
        raise _fail(f"plan.config.{changed}", f"{_describe(plan['config'][changed])} is not what the planner "
                                              f"resolves for this schedule ({_describe(resolved.to_dict()[changed])})")
    scales = _list(plan["scales"], "plan.scales", MAX_SCALES, len(grids))
    kv = 0
    for i, s in enumerate(scales):
        at = f"plan.scales[{i}]"
        _obj(s, at, ("index", "h", "w", "tokens", "kv_offset", "kv_len", "modes"))
        _equal(s["index"], f"{at}.index", i, "its position")
        _equal(s["h"], f"{at}.h", grids[i][0], f"plan.grids[{i}][0]")
        _equal(s["w"], f"{at}.w", grids[i][1], f"plan.grids[{i}][1]")
        _equal(s["tokens"], f"{at}.tokens", grids[i][0] * grids[i][1], "h * w")
        _equal(s["kv_offset"], f"{at}.kv_offset", kv, "the tokens of the scales before it")
        kv += s["tokens"]
        if kv > MAX_KV_LEN:
            raise _fail(f"{at}.kv_len", f"{kv} is more than {MAX_KV_LEN} tokens of KV cache")
        _equal(s["kv_len"], f"{at}.kv_len", kv, "kv_offset + tokens")
        modes = _list(s["modes"], f"{at}.modes", MAX_DEPTH, model["depth"])
        for layer, mode in enumerate(modes):
            _choice(mode, f"{at}.modes[{layer}]", MODES)
    return config


def _check_target(target: Any, path: str = "target") -> dict[str, Any]:
    from ..planner.gpus import GPUS

    _obj(target, path, ("name", "arch", "sm_count", "smem_per_block", "smem_per_sm", "l2_bytes", "regs_per_sm"))
    name = _choice(target["name"], f"{path}.name", tuple(GPUS))
    known = GPUS[name]
    _equal(target["arch"], f"{path}.arch", known.arch, f"{name}'s arch")
    _equal(target["sm_count"], f"{path}.sm_count", known.sm_count, f"{name}'s SM count")
    for key in ("smem_per_block", "smem_per_sm", "regs_per_sm"):
        _int(target[key], f"{path}.{key}", 1, 1 << 24)
    _int(target["l2_bytes"], f"{path}.l2_bytes", 1, 1 << 34)
    return target


def _arch_number(arch: str) -> str:
    return arch.removeprefix("sm_").rstrip("af")


def _check_meta(meta: Any, path: str, ctx: "_Context", binary: str, spec: Any, config: Any) -> dict[str, Any]:
    """A kernel's launch record: its own checks (:func:`~sparvar_compiler.codegen.artifact.check_meta`), then
    against the module: arch of the target, batch, shared memory of the target, the binary's listed sha256, and
    the spec and config recorded beside it."""
    from ..codegen.artifact import BACKENDS, KernelMetaError, check_meta

    try:
        check_meta(meta, path)
    except KernelMetaError as e:
        raise ModuleError(f"manifest {e}") from None
    _choice(meta["backend"], f"{path}.backend", BACKENDS)
    for key in ("sha256", "batch", "batch_grid", "batch_scalars"):
        if key not in meta:
            raise _fail(path, f"has no '{key}'")
    _obj(meta, path, ("backend", "arch", "entry", "binary_format", "params", "grid", "block", "shared_bytes",
                      "resources", "spec", "config", "sha256", "batch", "batch_grid", "batch_scalars"))
    if not isinstance(meta["batch_scalars"], dict):
        raise _fail(f"{path}.batch_scalars", f"must be an object, got {_describe(meta['batch_scalars'])}")
    target = ctx.manifest["target"]
    if _arch_number(meta["arch"]) != _arch_number(target["arch"]):
        raise _fail(f"{path}.arch", f"{meta['arch']} is not the target's arch ({target['arch']})")
    _equal(meta["batch"], f"{path}.batch", ctx.manifest["batch"], "the module's batch")
    if meta["shared_bytes"] > target["smem_per_block"]:
        raise _fail(f"{path}.shared_bytes", f"{meta['shared_bytes']} is more than {target['name']}'s "
                                            f"{target['smem_per_block']} bytes per block")
    _equal(meta["sha256"], f"{path}.sha256", ctx.digest_of(binary, path), f"the listed sha256 of {binary}")
    if not binary.endswith("." + meta["binary_format"]):
        raise _fail(f"{path}.binary_format", f"{meta['binary_format']} does not match the file name {binary}")
    _equal(meta["spec"], f"{path}.spec", spec, "the kernel's spec")
    _equal(meta["config"], f"{path}.config", config, "the kernel's config")
    # A program reads the tables at its own index, so the launch must be the one its spec and config give.
    warps = _int(config.get("num_warps"), f"{path}.config.num_warps", 1, 32)
    _equal(meta["block"], f"{path}.block", [32 * warps, 1, 1], "32 threads per warp of its config")
    _equal(meta["grid"], f"{path}.grid", _launch_grid(meta, spec, config, path), "the grid of its spec and config")
    return meta


def _launch_grid(meta: dict[str, Any], spec: dict[str, Any], config: dict[str, Any], path: str) -> list[int]:
    """The grid a kernel of this spec and config is launched with at the module's batch, by its backend's rule."""
    from ..codegen import cs4a_stats, triton_backend, tvm_backend
    from ..codegen.spec import KernelConfig, KernelSpec

    try:
        cfg = KernelConfig.from_dict(config)
        if spec.get("kind") == "cs4a_stats":
            return list(cs4a_stats.grid(cs4a_stats.StatsSpec(**spec), cfg))
        if spec.get("kind") == "cs4a_topk":
            return [spec["rows"], 1, 1]
        kernel_spec = KernelSpec(**spec)
        backend = triton_backend if meta["backend"] == "triton" else tvm_backend
        return list(backend.grid(kernel_spec, cfg))
    except (SparvarError, ValueError, TypeError, KeyError) as e:
        raise _fail(f"{path}.config", f"does not give a launch grid for its spec ({e})") from None


def _launch_args(meta: dict[str, Any]) -> set[str]:
    """The names a launch binds (every parameter but scratch buffers and batch-derived scalars)."""
    return {p["name"] for p in meta["params"] if p["kind"] != "scratch"} - set(meta["batch_scalars"])


class _Context:
    """What the sections check against: the manifest so far, its files, and its plan."""

    def __init__(self, manifest: dict[str, Any]):
        self.manifest = manifest
        self.referenced: set[str] = set()

    def digest_of(self, rel: str, path: str) -> str:
        files, shared = self.manifest["files"], self.manifest.get("shared_files") or {}
        digest = files.get(rel, shared.get(rel))
        if digest is None:
            raise _fail(path, f"refers to {_show(rel)}, which is not listed in files")
        return digest

    def file(self, value: Any, path: str, suffix: str) -> str:
        rel = check_rel_path(value, path)
        if not rel.endswith(suffix):
            raise _fail(path, f"{rel} must be a {suffix} file")
        self.digest_of(rel, path)
        self.referenced.add(rel)
        return rel

    def scale(self, index: int) -> dict[str, Any]:
        return self.manifest["plan"]["scales"][index]


def _check_spec(spec: Any, path: str, ctx: _Context, scale: dict[str, Any], dynamic: bool) -> dict[str, Any]:
    m = ctx.manifest
    _obj(spec, path, ("backend", "kind", "batch", "heads", "q_len", "kv_len", "head_dim", "dtype", "block_m",
                      "block_n", "layout_hash", "token_exact", "return_lse", "scale_kind"),
         ("dynamic", "capacity") if dynamic else ())
    _choice(spec["backend"], f"{path}.backend", ("triton",) if dynamic else ("triton", "tvm"))
    _choice(spec["kind"], f"{path}.kind", ("block", "gather"))
    _equal(spec["batch"], f"{path}.batch", m["batch"], "the module's batch")
    _equal(spec["heads"], f"{path}.heads", m["model"]["heads"], "model.heads")
    _equal(spec["head_dim"], f"{path}.head_dim", m["model"]["head_dim"], "model.head_dim")
    _equal(spec["q_len"], f"{path}.q_len", scale["tokens"], f"the tokens of scale {scale['index']}")
    _equal(spec["kv_len"], f"{path}.kv_len", scale["kv_len"], f"the kv_len of scale {scale['index']}")
    _equal(spec["dtype"], f"{path}.dtype", m["dtype"], "the module's dtype")
    _int(spec["block_m"], f"{path}.block_m", 1, MAX_GROUP_SIZE)
    _int(spec["block_n"], f"{path}.block_n", 1, 1024)
    _sha(spec["layout_hash"], f"{path}.layout_hash")
    _bool(spec["token_exact"], f"{path}.token_exact")
    _equal(spec["return_lse"], f"{path}.return_lse", False, "what the runtime calls")
    _equal(spec["scale_kind"], f"{path}.scale_kind", m["softmax_scale_kind"], "softmax_scale_kind")
    if dynamic:
        _equal(spec.get("dynamic"), f"{path}.dynamic", True, "a dynamic CS4A kernel")
        _int(spec.get("capacity"), f"{path}.capacity", 1, MAX_KV_LEN)
    return spec


def _check_kernels(ctx: _Context) -> None:
    m = ctx.manifest
    kernels = m["kernels"]
    if not isinstance(kernels, dict) or len(kernels) > MAX_SCALES:
        raise _fail("kernels", f"must be an object of at most {MAX_SCALES} kernels, got {_describe(kernels)}")
    n = len(m["plan"]["scales"])
    for name, k in kernels.items():
        at = _at("kernels", name)
        _str(name, f"{at} (its name)", _NAME, MAX_NAME_LENGTH)
        _obj(k, at, ("scale", "binary", "layout", "layout_file", "meta", "config", "spec", "tuned", "source",
                     "expected_ms", "sparsity", "layout_hash", "tables"))
        scale = _int(k["scale"], f"{at}.scale", 0, n - 1)
        if "csla" not in ctx.scale(scale)["modes"]:
            raise _fail(f"{at}.scale", f"scale {scale} has no CSLA layer to run a kernel")
        binary = ctx.file(k["binary"], f"{at}.binary", "")
        ctx.file(k["layout"], f"{at}.layout", ".npz")
        ctx.file(k["layout_file"], f"{at}.layout_file", ".npz")
        _sha(k["layout_hash"], f"{at}.layout_hash")
        spec = _check_spec(k["spec"], f"{at}.spec", ctx, ctx.scale(scale), dynamic=False)
        _equal(spec["layout_hash"], f"{at}.spec.layout_hash", k["layout_hash"], f"{at}.layout_hash")
        _scalars(k["config"], f"{at}.config")
        meta = _check_meta(k["meta"], f"{at}.meta", ctx, binary, spec, k["config"])
        tables = _list(k["tables"], f"{at}.tables", 16)
        for i, t in enumerate(tables):
            _str(t, f"{at}.tables[{i}]", re.compile(r"[a-z][a-z0-9_]{0,63}"), 64)
        if len(set(tables)) != len(tables):
            raise _fail(f"{at}.tables", "lists a table twice")
        _equal(sorted(_launch_args(meta)), f"{at}.meta.params", sorted({"q", "k", "v", "out", "scale", *tables}),
               "q, k, v, out, scale and the kernel's tables")
        _bool(k["tuned"], f"{at}.tuned")
        _str(k["source"], f"{at}.source")
        if k["expected_ms"] is not None:
            _real(k["expected_ms"], f"{at}.expected_ms", 0.0, 1e9, lo_open=True)
        _real(k["sparsity"], f"{at}.sparsity", 0.0, 1.0)


def _check_dispatch(ctx: _Context) -> None:
    """Exactly one row per (scale, layer), each running what the plan's mode says, on a kernel of its scale."""
    m = ctx.manifest
    scales, depth = m["plan"]["scales"], m["model"]["depth"]
    has_cs4a = m["cs4a"] is not None
    rows = _list(m["dispatch"], "dispatch", MAX_SCALES * MAX_DEPTH)
    seen: dict[tuple[int, int], int] = {}
    used: set[str] = set()
    for i, row in enumerate(rows):
        at = f"dispatch[{i}]"
        _obj(row, at, ("scale", "layer", "mode", "op", "kernel", "note"))
        scale = _int(row["scale"], f"{at}.scale", 0, len(scales) - 1)
        layer = _int(row["layer"], f"{at}.layer", 0, depth - 1)
        if (scale, layer) in seen:
            raise _fail(at, f"scale {scale} layer {layer} is listed twice (first at dispatch[{seen[scale, layer]}])")
        seen[scale, layer] = i
        mode = scales[scale]["modes"][layer]
        _equal(row["mode"], f"{at}.mode", mode, f"plan.scales[{scale}].modes[{layer}]")
        op = _choice(row["op"], f"{at}.op", DISPATCH_OPS)
        want = ("cs4a_decision" if has_cs4a else "sdpa") if mode == "decision" else _OP_OF_MODE[mode]
        if op != want:
            raise _fail(f"{at}.op", f"{op} where the plan's mode {mode} runs {want}")
        if op == "kernel":
            kname = row["kernel"]
            if not isinstance(kname, str) or kname not in m["kernels"]:
                raise _fail(f"{at}.kernel", f"{_describe(kname)} is not a kernel of the module")
            if m["kernels"][kname]["scale"] != scale:
                raise _fail(f"{at}.kernel", f"{kname} is the kernel of scale {m['kernels'][kname]['scale']}, not "
                                            f"of scale {scale}")
            used.add(kname)
        elif row["kernel"] is not None:
            raise _fail(f"{at}.kernel", f"must be null for op {op}, got {_describe(row['kernel'])}")
        _str(row["note"], f"{at}.note", max_len=256)
    if len(seen) != len(scales) * depth:
        missing = next((s, layer) for s in range(len(scales)) for layer in range(depth) if (s, layer) not in seen)
        raise _fail("dispatch", f"has no row for scale {missing[0]} layer {missing[1]}")
    unused = sorted(set(m["kernels"]) - used)
    if unused:
        raise _fail(_at("kernels", unused[0]), "no dispatch row runs it")


def _check_cs4a_kernel(entry: Any, path: str, ctx: _Context, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """A CS4A kernel's entry but its spec's contents and its launch record (the caller checks those, in that
    order, with :func:`_check_meta`)."""
    _obj(entry, path, ("name", "binary", "meta", "spec", "config", "tuned") + extra)
    _str(entry["name"], f"{path}.name", _NAME, MAX_NAME_LENGTH)
    ctx.file(entry["binary"], f"{path}.binary", "")
    _scalars(entry["config"], f"{path}.config")
    _bool(entry["tuned"], f"{path}.tuned")
    if not isinstance(entry["spec"], dict):
        raise _fail(f"{path}.spec", f"must be an object, got {_describe(entry['spec'])}")
    return entry


def _check_cs4a_meta(entry: dict[str, Any], path: str, ctx: _Context, args: set[str]) -> None:
    _check_meta(entry["meta"], f"{path}.meta", ctx, entry["binary"], entry["spec"], entry["config"])
    _equal(sorted(_launch_args(entry["meta"])), f"{path}.meta.params", sorted(args), "what the runtime passes")


def _check_cs4a(ctx: _Context, config: Any) -> None:
    """The CS4A section: present exactly when the plan has CS4A layers, its settings those of the plan's
    config, its helper kernels on the decision scale, one dynamic kernel per scale that runs CS4A (and the
    decision scale with the residual on), and tables consistent with the plan."""
    m = ctx.manifest
    scales, model = m["plan"]["scales"], m["model"]
    cs4a_rows = sorted({s["index"] for s in scales if "cs4a" in s["modes"]})
    section = m["cs4a"]
    if section is None:
        if cs4a_rows:
            raise _fail("cs4a", f"is null but the plan runs CS4A at scale {cs4a_rows[0]}")
        if m["cs4a_tuned"] is not None:
            raise _fail("cs4a_tuned", "must be null without a cs4a section")
        return
    if not cs4a_rows:
        raise _fail("cs4a", "the plan has no CS4A layer, so the manifest has no cs4a section")
    mode = config.cs4a
    if mode not in ("token", "block"):
        raise _fail("cs4a", f"plan.config.cs4a is {mode!r}, so the manifest has no cs4a section")
    _obj(section, "cs4a", ("mode", "mapping", "residual", "decision_scale", "bound_layer", "coverage",
                           "min_blocks", "group", "stats", "scales") + (("topk",) if mode == "token" else ()))
    dec = config.decision_scale
    group = config.group_size if mode == "token" else config.dcsla_block
    for key, expected, what in (("mode", mode, "cs4a"), ("mapping", config.key_mapping, "key_mapping"),
                                ("residual", config.residual, "residual"),
                                ("decision_scale", dec, "decision_scale"), ("bound_layer", config.bound_layer,
                                                                            "bound_layer"),
                                ("coverage", config.dcsla_coverage, "dcsla_coverage"),
                                ("min_blocks", config.dcsla_min_blocks, "dcsla_min_blocks"),
                                ("group", group, "group_size" if mode == "token" else "dcsla_block")):
        _equal(section[key], f"cs4a.{key}", expected, f"plan.config.{what}")
    if not isinstance(dec, int) or not 0 <= dec < min(cs4a_rows):
        raise _fail("cs4a.decision_scale", f"{_describe(dec)} must be a scale before the CS4A scales "
                                           f"({cs4a_rows})")
    _int(group, "cs4a.group", 1, MAX_GROUP_SIZE)
    for s in scales:
        for layer, mode_of in enumerate(s["modes"]):
            if mode_of == "decision" and s["index"] != dec:
                raise _fail(f"plan.scales[{s['index']}].modes[{layer}]", f"decision at a scale other than "
                                                                          f"cs4a.decision_scale {dec}")
    d = ctx.scale(dec)
    groups = -(-d["tokens"] // group)
    batch, heads, head_dim = m["batch"], model["heads"], model["head_dim"]
    stats = _check_cs4a_kernel(section["stats"], "cs4a.stats", ctx)
    _equal(stats["spec"], "cs4a.stats.spec", {"backend": "triton", "batch": batch, "dtype": m["dtype"],
                                              "group": group, "head_dim": head_dim, "heads": heads,
                                              "kind": "cs4a_stats", "kv_len": d["kv_len"], "q_len": d["tokens"],
                                              "stride": 1}, "the decision scale's statistics")
    _check_cs4a_meta(stats, "cs4a.stats", ctx, {"q", "k", "lse", "mass", "scale"})
    keyed = section["scales"]
    if not isinstance(keyed, dict) or not all(isinstance(k, str) for k in keyed):
        raise _fail("cs4a.scales", f"must be an object keyed by scale, got {_describe(keyed)}")
    want = sorted(set(cs4a_rows) | ({dec} if config.residual else set()))
    _equal(sorted(keyed), "cs4a.scales", sorted(str(s) for s in want), "the scales that run CS4A kernels")
    topks, caps = set(), set()
    for key, entry in keyed.items():
        at = f"cs4a.scales.{key}"
        scale = int(key)
        _check_cs4a_kernel(entry, at, ctx, ("tables_file", "tables", "source", "expected_ms"))
        ctx.file(entry["tables_file"], f"{at}.tables_file", ".npz")
        _str(entry["source"], f"{at}.source")
        if entry["expected_ms"] is not None:
            _real(entry["expected_ms"], f"{at}.expected_ms", 0.0, 1e9, lo_open=True)
        s = ctx.scale(scale)
        spec = _check_spec(entry["spec"], f"{at}.spec", ctx, s, dynamic=True)
        _equal(spec["kind"], f"{at}.spec.kind", "gather" if mode == "token" else "block", f"cs4a mode {mode}")
        _equal(spec["block_m"], f"{at}.spec.block_m", group, "cs4a.group")
        t = entry["tables"]
        common = ("kind", "scale", "q_len", "kv_len", "decision_kv_len")
        if mode == "token":
            _obj(t, f"{at}.tables", common + ("group_size", "topk", "capacity", "dedup"))
            _equal(t["group_size"], f"{at}.tables.group_size", group, "cs4a.group")
            topks.add(_int(t["topk"], f"{at}.tables.topk", 1, d["kv_len"]))
            _int(t["capacity"], f"{at}.tables.capacity", t["topk"], MAX_KV_LEN)
            _equal(spec["capacity"], f"{at}.spec.capacity", t["capacity"], f"{at}.tables.capacity")
            _bool(t["dedup"], f"{at}.tables.dedup")
        else:
            _obj(t, f"{at}.tables", common + ("block", "select_capacity"))
            _equal(t["block"], f"{at}.tables.block", group, "cs4a.group")
            caps.add(_int(t["select_capacity"], f"{at}.tables.select_capacity", 1, -(-d["kv_len"] // group)))
        _equal(t["kind"], f"{at}.tables.kind", mode, "cs4a.mode")
        _equal(t["scale"], f"{at}.tables.scale", scale, "its key")
        _equal(t["q_len"], f"{at}.tables.q_len", s["tokens"], f"the tokens of scale {scale}")
        _equal(t["kv_len"], f"{at}.tables.kv_len", s["kv_len"], f"the kv_len of scale {scale}")
        _equal(t["decision_kv_len"], f"{at}.tables.decision_kv_len", d["kv_len"], "the decision scale's kv_len")
        _check_cs4a_meta(entry, at, ctx, {"q", "k", "v", "out", "scale"} | (
            {"key_num", "key_idx"} if mode == "token" else {"kv_num", "kv_idx"}))
    if len(topks) > 1 or len(caps) > 1:
        raise _fail("cs4a.scales", "the tables of the scales disagree on the decision scale's selection size")
    if mode == "token":
        topk = _check_cs4a_kernel(section["topk"], "cs4a.topk", ctx)
        _equal(topk["spec"], "cs4a.topk.spec", {"backend": "triton", "k": next(iter(topks)), "kind": "cs4a_topk",
                                                "row_len": d["kv_len"], "rows": batch * heads * groups},
               "the decision scale's selection")
        _check_cs4a_meta(topk, "cs4a.topk", ctx, {"mass", "out"})


def _check_files(m: dict[str, Any]) -> None:
    files = m["files"]
    if not isinstance(files, dict) or len(files) > MAX_MODULE_FILES:
        raise _fail("files", f"must map at most {MAX_MODULE_FILES} relative paths to their sha256")
    for rel, digest in files.items():
        check_rel_path(rel, f"files[{_describe(rel)}]")
        _sha(digest, f"files[{_describe(rel)}]")
    if "shared_files" in m:
        shared = m["shared_files"]
        if not isinstance(shared, dict) or len(shared) > MAX_MODULE_FILES:
            raise _fail("shared_files", f"must map at most {MAX_MODULE_FILES} relative paths to their sha256")
        for rel, digest in shared.items():
            check_rel_path(rel, f"shared_files[{_describe(rel)}]")
            _sha(digest, f"shared_files[{_describe(rel)}]")
            if rel in files:
                raise _fail(f"shared_files[{_describe(rel)}]", "is also listed in files")


_TOP = ("format", "format_version", "sparvar_version", "created_unix", "model", "schedule", "plan", "target",
        "environment", "batch", "dtype", "softmax_scale", "softmax_scale_kind", "kernels", "dispatch", "files",
        "cs4a", "tuned", "cs4a_tuned")


def _check_header(manifest: Any, what: str = "manifest.json") -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModuleError(f"{what}: not a sparvar runtime module manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModuleError(f"{what}: module format version {_describe(manifest.get('format_version'))}, this "
                          f"sparvar reads version {FORMAT_VERSION}; emit the module again with this sparvar-compile")


def check_manifest(manifest: Any) -> None:
    """Check a module manifest against the format's schema, without touching a file.

    Checks every key (no unknown ones), type and range, and every cross-reference:

    * ``format``/``format_version``; ``model`` (name, family, depth, heads, head_dim within the limits);
      ``schedule`` and ``plan`` (its model fields those of ``model``; grids; a config the planner accepts;
      scales with ``index``, ``h``/``w`` of the grid, ``tokens = h * w``, ``kv_offset``/``kv_len`` the running
      sums, one known mode per layer); ``target`` (a known GPU, its arch and SM count); ``batch``; ``dtype``;
      ``softmax_scale`` (positive, finite) and its kind; ``environment``, ``tuned``, versions;
    * ``kernels``: per kernel a scale with CSLA layers, ``binary``/``layout``/``layout_file`` listed files, a spec
      of that scale's shapes and the model's, a launch record (:func:`~sparvar_compiler.codegen.artifact.
      check_meta`: params, grid and block within CUDA's limits, a batch grid consistent with the batch) for the
      target's arch, within its shared memory, naming the listed sha256 of its binary, taking exactly the
      arguments the runtime passes (q, k, v, out, scale and its tables), with ``32 * num_warps`` threads and the
      grid its backend derives from its spec and config (a program indexes the tables by its grid position);
    * ``cs4a``: present exactly when the plan has CS4A layers, with the plan config's settings, statistics and
      top-k kernels of the decision scale's shapes, one dynamic kernel per CS4A scale (and the decision scale
      with the residual) whose ``tables_file`` is listed and whose tables fit the scale;
    * ``dispatch``: exactly one row per (scale, layer), indices in range, ``mode`` the plan's, ``op`` known
      (``sdpa``, ``kernel``, ``cs4a``, ``cs4a_decision``, ``skip``) and the one that mode runs, ``kernel`` rows on
      a kernel of the same scale, and every kernel used;
    * ``files``/``shared_files``: normalised relative paths (nothing absolute, no ``..``) with sha256 digests,
      disjoint; every referenced path is listed.

    Raises
    ------
    ModuleError
        Naming the field: ``manifest dispatch[57].layer: -1 is out of range 0..39``.
    """
    _check_header(manifest)
    m = _obj(manifest, "(top level)", _TOP, ("shared_files",))
    _str(m["sparvar_version"], "sparvar_version", max_len=64)
    _int(m["created_unix"], "created_unix", 0, 1 << 40)
    model = _check_model(m["model"])
    config = _check_plan(m["plan"], model)
    _obj(m["schedule"], "schedule", ("resolution", "aspect", "grids"))
    for key in ("resolution", "aspect", "grids"):
        _equal(m["schedule"][key], f"schedule.{key}", m["plan"][key], f"plan.{key}")
    _check_target(m["target"])
    _scalars(m["environment"], "environment")
    _int(m["batch"], "batch", 1, MAX_BATCH)
    _choice(m["dtype"], "dtype", DTYPE_NAMES)
    _real(m["softmax_scale"], "softmax_scale", 0.0, 1e6, lo_open=True)
    _choice(m["softmax_scale_kind"], "softmax_scale_kind", ("explicit", "default"))
    _check_files(m)
    ctx = _Context(m)
    _check_kernels(ctx)
    _check_cs4a(ctx, config)
    _check_dispatch(ctx)
    _bool(m["tuned"], "tuned")
    if m["cs4a"] is not None:
        _bool(m["cs4a_tuned"], "cs4a_tuned")


# ---------------------------------------------------------------------------------------------- modules
def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of the module ``directory`` after its digest and schema checks (files are checked by
    :func:`verify_module`)."""
    d = Path(directory)
    _real_dir(d, "the module directory")
    try:
        data = _checked_bytes(d, MANIFEST, MANIFEST_DIGEST, MAX_MANIFEST_BYTES)
    except ModuleError as e:
        _explain_old_module(d, e)
        raise
    manifest = load_json_bounded(data, f"{d / MANIFEST}")
    _check_header(manifest, str(d / MANIFEST))
    check_manifest(manifest)
    return manifest


def _explain_old_module(d: Path, error: ModuleError) -> None:
    """A module without a digest from an older sparvar says so by its format version."""
    if not str(error).startswith(f"missing {MANIFEST_DIGEST}"):
        return
    try:
        old = load_json_bounded(_read_regular(d / MANIFEST, MANIFEST, MAX_MANIFEST_BYTES), MANIFEST)
    except ModuleError:
        return
    if isinstance(old, dict) and old.get("format") == FORMAT and old.get("format_version") != FORMAT_VERSION:
        _check_header(old, str(d / MANIFEST))


def verify_module(directory: str | Path, gpu: str | None = None) -> dict[str, Any]:
    """Check a module without a GPU (see the module docstring for the order): the manifest's digest and schema,
    the tree (no symlinks, regular files only, nothing unlisted), every file's sha256 (pooled ones too) and, with
    ``gpu``, that the module was built for that GPU.

    Returns
    -------
    dict
        The checked manifest; ``manifest["target"]`` is the GPU it was built for (``name``, ``arch``,
        ``sm_count``).

    Raises
    ------
    ModuleError
        The first problem found, naming the file or field.
    """
    d = Path(directory)
    manifest = read_manifest(d)
    files = manifest["files"]
    present = _walk(d, "the module")
    extra = sorted(present - set(files) - {MANIFEST, MANIFEST_DIGEST})
    if extra:
        raise ModuleError(f"file {_show(extra[0])} is not listed in the manifest")
    for rel, digest in sorted(files.items()):
        if rel not in present:
            raise ModuleError(f"missing file {rel}")
        actual = _hash_regular(d / rel, f"file {rel}")
        if actual != digest:
            raise ModuleError(f"file {rel} was modified: sha256 {actual[:16]}... does not match the manifest's "
                              f"{digest[:16]}...")
    shared = manifest.get("shared_files") or {}
    if shared:
        if not (d.parent / SET_MANIFEST).is_file():
            raise ModuleError(f"{d} is a member of a module set (it shares {len(shared)} files with other members) "
                              f"but {d.parent} has no {SET_MANIFEST}: load or verify the whole set")
        _real_dir(d.parent / SHARED_DIR, "the module set's pool")
    for rel, digest in sorted(shared.items()):
        p = shared_path(d, rel, digest)
        where = f"shared file {rel} ({SHARED_DIR}/{p.name})"
        actual = _hash_regular(p, where)
        if actual != digest:
            raise ModuleError(f"{where} was modified: sha256 {actual[:16]}... does not match {digest[:16]}...")
    check_built_for(manifest["target"], gpu)
    return manifest


def check_built_for(target: dict[str, Any], gpu: str | None) -> None:
    """Refuse a module (or set) built for another GPU than ``gpu`` (a registry name; None: any)."""
    if gpu is None:
        return
    if target["name"] != gpu.strip().lower():
        raise ModuleError(f"module was built for {target['name']}, not {gpu} ({target['name']}: {target['arch']}, "
                          f"{target['sm_count']} SMs)")


# ---------------------------------------------------------------------------------------------- module sets
def _set_format() -> tuple[str, int]:
    from .moduleset import SET_FORMAT, SET_FORMAT_VERSION

    return SET_FORMAT, SET_FORMAT_VERSION


def check_set_manifest(data: Any) -> None:
    """Check a set manifest (``moduleset.json``) against its schema: format and version, ``model`` and
    ``target`` as in a module, ``batch``, ``members`` (1 to the limit, each a plain unique directory name, its
    resolution, aspect, grids and the sha256 of its manifest), ``shared`` (pool file names ``<sha256><suffix>``
    to that sha256), ``stats`` counts. Raises :class:`ModuleError` naming the field."""
    set_format, set_version = _set_format()
    if not isinstance(data, dict) or data.get("format") != set_format:
        raise ModuleError(f"{SET_MANIFEST}: not a sparvar module set")
    if data.get("format_version") != set_version:
        raise ModuleError(f"{SET_MANIFEST}: module set format version {_describe(data.get('format_version'))}, "
                          f"this sparvar reads version {set_version}; emit it again with this sparvar-compile")
    _obj(data, "(top level)", ("format", "format_version", "sparvar_version", "created_unix", "model", "target",
                               "batch", "members", "shared", "stats"))
    _str(data["sparvar_version"], "sparvar_version", max_len=64)
    _int(data["created_unix"], "created_unix", 0, 1 << 40)
    _check_model(data["model"])
    _check_target(data["target"])
    _int(data["batch"], "batch", 1, MAX_BATCH)
    members = _list(data["members"], "members", MAX_SET_MEMBERS)
    if not members:
        raise _fail("members", "must list at least one member")
    names: set[str] = set()
    for i, member in enumerate(members):
        at = f"members[{i}]"
        _obj(member, at, ("name", "resolution", "aspect", "grids", "manifest_sha256"))
        name = _str(member["name"], f"{at}.name", _NAME, MAX_NAME_LENGTH)
        if name in (".", "..", SHARED_DIR) or name.startswith("."):
            raise _fail(f"{at}.name", f"{name!r} cannot name a member")
        if name in names:
            raise _fail(f"{at}.name", f"member {name} is listed twice")
        names.add(name)
        _int(member["resolution"], f"{at}.resolution", 1, 1 << 20)
        _str(member["aspect"], f"{at}.aspect", re.compile(r"[0-9.:x]{1,32}"), 32)
        _check_grids(member["grids"], f"{at}.grids")
        _sha(member["manifest_sha256"], f"{at}.manifest_sha256")
    shared = data["shared"]
    if not isinstance(shared, dict) or len(shared) > MAX_MODULE_FILES:
        raise _fail("shared", f"must map at most {MAX_MODULE_FILES} pool file names to their sha256")
    for name, digest in shared.items():
        at = f"shared[{_describe(name)}]"
        if not isinstance(name, str) or not _POOL_NAME.fullmatch(name):
            raise _fail(at, "is not a pool file name (<sha256><suffix>)")
        _equal(_sha(digest, at), at, name[:64], "the sha256 its name starts with")
    _obj(data["stats"], "stats", ("kernels", "distinct_kernels", "bytes"))
    for key in ("kernels", "distinct_kernels", "bytes"):
        _int(data["stats"][key], f"stats.{key}", 0, 1 << 50)


def read_set_manifest_checked(directory: str | Path) -> dict[str, Any]:
    """The set manifest of ``directory`` after its digest (``moduleset.sha256``) and schema checks."""
    d = Path(directory)
    _real_dir(d, "the module set directory")
    data = load_json_bounded(_checked_bytes(d, SET_MANIFEST, SET_MANIFEST_DIGEST, MAX_MANIFEST_BYTES),
                             str(d / SET_MANIFEST))
    check_set_manifest(data)
    return data


def verify_set(directory: str | Path, gpu: str | None = None,
               on_member: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Check a module set without a GPU: its manifest (digest and schema), its tree (members, the pool and the
    two manifest files only; no symlinks; pool files regular and listed), every member as :func:`verify_module`
    with its manifest the one the set recorded and the set's model, target and batch, and every pooled file
    used by a member. ``on_member(name, manifest)`` sees each member's checked manifest. Returns the set
    manifest."""
    d = Path(directory)
    data = read_set_manifest_checked(d)
    members = {m["name"]: m for m in data["members"]}
    try:
        with os.scandir(d) as entries:
            top = {e.name: e for e in entries}
    except OSError as e:
        raise ModuleError(f"cannot list {d}: {e.strerror}") from None
    for name, entry in sorted(top.items()):
        if name in (SET_MANIFEST, SET_MANIFEST_DIGEST):
            continue
        if name not in members and name != SHARED_DIR:
            raise ModuleError(f"{d}: {_show(name)} is not part of the module set")
        if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
            raise ModuleError(f"{d}: {_show(name)} must be a real directory (not a symlink or a file)")
    missing = sorted(set(members) - set(top))
    if missing:
        raise ModuleError(f"{d}: member {missing[0]} is missing")
    listed = set(data["shared"])
    present = _walk(d / SHARED_DIR, "the pool") if SHARED_DIR in top else set()
    if present - listed:
        raise ModuleError(f"shared file {_show(sorted(present - listed)[0])} is not listed in {SET_MANIFEST}")
    used: set[str] = set()
    for name, entry in members.items():
        manifest = verify_module(d / name, gpu=gpu)
        recorded = hashlib.sha256(_read_regular(d / name / MANIFEST, MANIFEST, MAX_MANIFEST_BYTES)).hexdigest()
        if recorded != entry["manifest_sha256"]:
            raise ModuleError(f"member {name}: its manifest.json is not the one the set recorded")
        for key in ("model", "target", "batch"):
            if manifest[key] != data[key]:
                raise ModuleError(f"member {name}: its {key} is not the set's")
        plan = manifest["plan"]
        if ([list(g) for g in entry["grids"]], entry["resolution"], entry["aspect"]) != (
                plan["grids"], plan["resolution"], plan["aspect"]):
            raise ModuleError(f"member {name}: its plan's schedule is not the one the set lists for it")
        for rel, digest in (manifest.get("shared_files") or {}).items():
            pool_name = shared_path(d / name, rel, digest).name
            if pool_name not in listed:
                raise ModuleError(f"member {name}: shared file {rel} ({pool_name}) is not listed in {SET_MANIFEST}")
            used.add(pool_name)
        if on_member is not None:
            on_member(name, manifest)
    if listed - used:
        raise ModuleError(f"{SET_MANIFEST} lists shared files no member uses: {sorted(listed - used)[:3]}")
    check_built_for(data["target"], gpu)
    return data
