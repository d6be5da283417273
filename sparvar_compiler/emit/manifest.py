"""The runtime module's manifest: what it holds, and the checks that refuse a damaged or mismatched module.

A module is a directory::

    manifest.json        model, schedule, plan, target GPU, environment, per (scale, layer) dispatch,
                         kernels (launch metadata, config, tuned flag) and a sha256 of every other file
    layouts/*.npz        BlockLayouts and kernel tables (numpy npz, no pickle)
    kernels/*.cubin      compiled kernels for the target GPU
    README.txt           how to load it

``verify_module`` re-hashes every file and checks the manifest's structure without a GPU.

A module can be a member of a module set (one directory per aspect ratio beside a ``moduleset.json``, see
:mod:`sparvar_compiler.emit.moduleset`): its manifest's ``shared_files`` then maps some of its relative paths
(kernels and layouts that several members use) to a sha256, and the file lives once in the set's pool,
``../shared/<sha256><suffix>``. :func:`module_file` resolves a path either way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import SparvarError

MANIFEST = "manifest.json"
SET_MANIFEST = "moduleset.json"
SHARED_DIR = "shared"
FORMAT = "sparvar-module"
FORMAT_VERSION = 3  # 2: the cs4a section and its dispatch ops; 3: batch-generic kernels (meta batch, batch_grid)


class ModuleError(SparvarError):
    """A runtime module that is incomplete, tampered with, or built for something else."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shared_path(directory: Path, rel: str, digest: str) -> Path:
    """Where a member's shared file ``rel`` with ``digest`` lives: the set's pool, named by content."""
    return directory.parent / SHARED_DIR / f"{digest}{Path(rel).suffix}"


def module_file(directory: str | Path, manifest: dict[str, Any], rel: str) -> Path:
    """The path of a module's file ``rel``: in the module directory, or in its set's pool when shared."""
    d = Path(directory)
    digest = (manifest.get("shared_files") or {}).get(rel)
    return d / rel if digest is None else shared_path(d, rel, str(digest))


def read_manifest(directory: str | Path) -> dict[str, Any]:
    d = Path(directory)
    path = d / MANIFEST
    if not d.is_dir():
        raise ModuleError(f"{d}: not a directory")
    if not path.is_file():
        raise ModuleError(f"{d}: missing {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModuleError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModuleError(f"{path}: not a sparvar runtime module manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModuleError(f"{path}: module format version {manifest.get('format_version')!r}, this sparvar "
                          f"reads version {FORMAT_VERSION}; emit the module again with this sparvar-compile")
    for key in ("model", "plan", "target", "environment", "files", "dispatch", "kernels"):
        if key not in manifest:
            raise ModuleError(f"{path}: manifest has no '{key}'")
    return manifest


def verify_module(directory: str | Path, gpu: str | None = None) -> dict[str, Any]:
    """Check a module without a GPU: manifest structure, every file present with its recorded sha256, no file
    outside the manifest's list, dispatch entries pointing at existing kernels, and (if ``gpu`` is given) that
    the module was built for that GPU. Returns the manifest; raises :class:`ModuleError` with the reason."""
    d = Path(directory)
    manifest = read_manifest(d)
    files = manifest["files"]
    if not isinstance(files, dict):
        raise ModuleError("manifest 'files' must map relative paths to sha256")
    for rel, digest in sorted(files.items()):
        p = d / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ModuleError(f"manifest lists a path outside the module: {rel}")
        if not p.is_file():
            raise ModuleError(f"missing file {rel}")
        actual = sha256_file(p)
        if actual != digest:
            raise ModuleError(f"file {rel} was modified: sha256 {actual[:16]}... does not match the manifest's "
                              f"{str(digest)[:16]}...")
    shared = manifest.get("shared_files") or {}
    if not isinstance(shared, dict):
        raise ModuleError("manifest 'shared_files' must map relative paths to sha256")
    if shared and not (d.parent / SET_MANIFEST).is_file():
        raise ModuleError(f"{d} is a member of a module set (it shares {len(shared)} files with other members) "
                          f"but {d.parent} has no {SET_MANIFEST}: load or verify the whole set")
    for rel, digest in sorted(shared.items()):
        if Path(rel).is_absolute() or ".." in Path(rel).parts or rel in files:
            raise ModuleError(f"manifest shares a path it must not: {rel}")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ModuleError(f"shared file {rel}: {digest!r} is not a sha256")
        p = shared_path(d, rel, digest)
        if not p.is_file():
            raise ModuleError(f"missing shared file {rel} ({p.relative_to(d.parent)})")
        actual = sha256_file(p)
        if actual != digest:
            raise ModuleError(f"shared file {p.relative_to(d.parent)} was modified: sha256 {actual[:16]}... does "
                              f"not match {digest[:16]}...")
    present = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()} - {MANIFEST}
    extra = sorted(present - set(files))
    if extra:
        raise ModuleError(f"file {extra[0]} is not listed in the manifest")
    files = {**files, **shared}  # what kernels may refer to
    kernels = manifest["kernels"]
    for entry in manifest["dispatch"]:
        kname = entry.get("kernel")
        if kname is not None and kname not in kernels:
            raise ModuleError(f"dispatch of scale {entry.get('scale')} layer {entry.get('layer')} names unknown "
                              f"kernel {kname}")
    for kname, k in kernels.items():
        for key in ("binary", "layout", "meta", "tuned"):
            if key not in k:
                raise ModuleError(f"kernel {kname} has no '{key}'")
        if k["binary"] not in files or k["layout"] not in files:
            raise ModuleError(f"kernel {kname} refers to a file that is not in the manifest")
    cs4a = manifest.get("cs4a")
    ops = {entry.get("op") for entry in manifest["dispatch"]}
    if ops & {"cs4a", "cs4a_decision"}:
        if not isinstance(cs4a, dict) or not isinstance(cs4a.get("scales"), dict) or "stats" not in cs4a:
            raise ModuleError("dispatch runs CS4A but the manifest has no valid 'cs4a' section")
        for entry in manifest["dispatch"]:
            if entry.get("op") == "cs4a" and str(entry.get("scale")) not in cs4a["scales"]:
                raise ModuleError(f"dispatch runs CS4A at scale {entry.get('scale')} but the cs4a section has no "
                                  "kernel for it")
        if cs4a.get("mode") == "token" and "topk" not in cs4a:
            raise ModuleError("the cs4a section runs token top-k but has no 'topk' kernel")
        helpers = [(n, cs4a[n]) for n in ("stats", "topk") if n in cs4a]
        for kname, k in [*helpers, *cs4a["scales"].items()]:
            with_tables = kname not in ("stats", "topk")
            for key in ("binary", "meta", "spec", "config") + (("tables_file", "tables") if with_tables else ()):
                if key not in k:
                    raise ModuleError(f"cs4a kernel {kname} has no '{key}'")
            if k["binary"] not in files or (with_tables and k["tables_file"] not in files):
                raise ModuleError(f"cs4a kernel {kname} refers to a file that is not in the manifest")
    if gpu is not None and manifest["target"].get("name") != gpu:
        raise ModuleError(f"module was built for {manifest['target'].get('name')}, not {gpu}")
    return manifest
