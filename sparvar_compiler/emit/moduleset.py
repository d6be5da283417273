"""Emit one artifact for every aspect ratio a model serves: a module set.

Infinity serves 15 aspect ratios (and lower resolutions); each has its own scale schedule, so its own plan, KV
lengths and layouts. A module set holds one ordinary runtime module per (resolution, aspect ratio) - its
*members* - and stores every kernel binary and layout file once, by content, in a shared pool::

    moduleset.json        format, model, target, the members (resolution, aspect, grids, their manifests'
                          sha256) and the sha256 of every pooled file
    shared/<sha256>.cubin kernels and layout tables, one file per distinct content
    1024-1x1/             a member: manifest.json (with ``shared_files``: path -> sha256), README.txt
    1024-4x3/ ...

A member is loaded like any module (its manifest resolves pooled files, see
:func:`~sparvar_compiler.emit.manifest.module_file`); :class:`sparvar_compiler.runtime.ModuleSet` loads all of
them and picks a member by a scale's grid. The set is written to a staging directory and swapped into place
(:mod:`.output`: an existing module or module set is replaced, any other directory only when forced).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import __version__
from ..planner import PlanConfig, make_plan
from ..planner.gpus import GpuSpec
from ..planner.models import ModelSpec
from .emitter import DEFAULT_BATCH, write_module
from .manifest import (MANIFEST, SHARED_DIR, ModuleError, read_set_manifest_checked, sha256_file, verify_set,
                       write_manifest, write_set_manifest)
from .output import staged_output

SET_FORMAT = "sparvar-module-set"
SET_FORMAT_VERSION = 1
_POOLED = ("kernels/", "layouts/")  # what members share by content


def member_name(resolution: int, aspect: str) -> str:
    """The directory of a member: ``1024-4x3`` for 1024 px at aspect ``4:3``."""
    return f"{resolution}-{aspect.replace(':', 'x')}"


def emit_module_set(model: ModelSpec | str, resolution: int | str | None, aspects: Sequence[str], gpu: GpuSpec,
                    output: str | Path, config: PlanConfig | None = None, db: Any | None = None,
                    backends: tuple[str, ...] = ("triton",), block_sizes: tuple[int, ...] = (64, 128),
                    batch: int = DEFAULT_BATCH, environment: dict | None = None,
                    progress: Callable[[str], None] = print, jobs: int | None = None,
                    force: bool = False) -> dict[str, Any]:
    """Emit a module for each of ``aspects`` (at ``resolution``) into one set directory ``output``; returns the
    set manifest. ``jobs`` members are emitted at a time (default: 1 where Triton compiles in this process,
    i.e. on a GPU host, else up to 2: each compile is its own process). ``output`` is checked as
    :func:`~.emitter.emit_module` checks it (``force`` replaces a directory that is not a module)."""
    if not aspects:
        raise ModuleError("a module set needs at least one aspect ratio")
    t0 = time.perf_counter()
    plans = [make_plan(model, resolution, a, config) for a in aspects]
    names = [member_name(p.resolution, p.aspect) for p in plans]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ModuleError(f"aspect ratios name the same schedule twice: {dup}")
    if jobs is None:
        import torch

        jobs = 1 if torch.cuda.is_available() else min(2, os.cpu_count() or 1)
    with staged_output(output, force=force) as staging:
        tmp = staging.path

        def one(i: int) -> dict[str, Any]:
            plan = plans[i]
            tag = f"[{names[i]} {i + 1}/{len(plans)}] "
            return write_module(plan, gpu, tmp / names[i], db=db, backends=backends, block_sizes=block_sizes,
                                batch=batch, environment=environment, progress=lambda line: progress(tag + line))

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            manifests = list(pool.map(one, range(len(plans))))
        pool_files, stats = _pool_files(tmp, names, manifests)
        members = []
        for name, plan, manifest in zip(names, plans, manifests):
            members.append({"name": name, "resolution": plan.resolution, "aspect": plan.aspect,
                            "grids": [list(g) for g in plan.grids],
                            "manifest_sha256": sha256_file(tmp / name / MANIFEST)})
        first = manifests[0]
        set_manifest = {
            "format": SET_FORMAT, "format_version": SET_FORMAT_VERSION, "sparvar_version": __version__,
            "created_unix": int(time.time()), "model": first["model"], "target": first["target"],
            "batch": batch, "members": members, "shared": pool_files, "stats": stats,
        }
        write_set_manifest(tmp, set_manifest)
    if staging.replaced is not None:
        progress(f"replaced the {staging.replaced} that was at {staging.target}")
    progress(f"emitted module set {output}: {len(members)} members, {stats['kernels']} kernels "
             f"({stats['distinct_kernels']} distinct), {stats['bytes'] / 1e6:.1f} MB, "
             f"in {time.perf_counter() - t0:.1f} s")
    return set_manifest


def _pool_files(root: Path, names: list[str], manifests: list[dict[str, Any]]) -> tuple[dict[str, str], dict]:
    """Move every member's kernels and layouts into ``root/shared`` by content (one copy of each) and rewrite
    the members' manifests to refer to the pool. Returns the pool's ``{file name: sha256}`` and size figures."""
    shared = root / SHARED_DIR
    shared.mkdir()
    pool: dict[str, str] = {}
    kernels = distinct = 0
    for name, manifest in zip(names, manifests):
        member = root / name
        files: dict[str, str] = dict(manifest["files"])
        moved: dict[str, str] = {}
        for rel, digest in sorted(files.items()):
            if not rel.startswith(_POOLED):
                continue
            target = shared / f"{digest}{Path(rel).suffix}"
            if rel.startswith("kernels/"):
                kernels += 1
                distinct += target.name not in pool
            if target.name in pool:
                (member / rel).unlink()
            else:
                os.replace(member / rel, target)
                pool[target.name] = digest
            moved[rel] = digest
            del files[rel]
        for sub in _POOLED:  # now empty
            d = member / sub.rstrip("/")
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        manifest["files"] = files
        manifest["shared_files"] = moved
        write_manifest(member, manifest)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())  # members and pool
    return pool, {"kernels": kernels, "distinct_kernels": distinct, "bytes": size}


def read_set_manifest(directory: str | Path) -> dict[str, Any]:
    """The set manifest of ``directory`` after its digest and schema checks (files are checked by
    :func:`verify_module_set`); :func:`~.manifest.read_set_manifest_checked`."""
    return read_set_manifest_checked(directory)


def verify_module_set(directory: str | Path, gpu: str | None = None) -> dict[str, Any]:
    """Check a module set without a GPU: its manifest, every member (as :func:`verify_module`, pooled files
    included) and that each member's manifest is the one the set recorded. Returns the set manifest;
    :func:`~.manifest.verify_set`."""
    return verify_set(directory, gpu=gpu)
