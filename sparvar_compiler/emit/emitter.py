"""Stage 5: emit a self-contained runtime module for one (model, schedule, plan, GPU).

For every scale whose plan has CSLA layers the emitter picks a kernel: among the allowed layout block sizes,
the one whose database winner is fastest on the target (or, with no evidence, the documented default config at
the default block size, marked ``tuned: false``), compiles it for the target GPU without needing that GPU, and
writes its cubin, its layout and launch tables (npz) and a manifest. Dense layers dispatch to SDPA (cuDNN /
FlashAttention) at run time; layers below the bound layer run CS4A (:mod:`.cs4a`): dense plus statistics and
selection at the decision scale, dynamic kernels at the later scales. The module is written to a staging
directory beside the output and swapped into place (:mod:`.output`), so an interrupted emit never leaves a
half-written module, and an output path holding anything but a sparvar module is refused unless forced.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import __version__
from ..codegen.spec import KernelConfig, KernelSpec
from ..planner.csla import csla_layout
from ..planner.gpus import GpuSpec
from ..planner.layout import BlockLayout
from ..planner.plan import Mode, Plan
from ..tuner.validate import SkippedRecordWarning, usable_winner  # noqa: F401 - SkippedRecordWarning: re-exported
from .cs4a import choose_cs4a_kernels, cs4a_scales, cs4a_workloads, emit_cs4a
from .manifest import FORMAT, FORMAT_VERSION, sha256_file, write_manifest
from .output import staged_output

DEFAULT_BLOCK = 64          # the default layout block when nothing is tuned (fewest wasted FLOPs of CSLA)
DEFAULT_BATCH = 2           # classifier-free guidance: one image is a batch of 2
DTYPE = "bf16"


@dataclass(frozen=True)
class KernelChoice:
    """The kernel chosen for one scale: spec, config, layout, and the evidence behind the choice."""

    scale: int
    spec: KernelSpec
    config: KernelConfig
    layout: BlockLayout
    tuned: bool
    expected_ms: float | None
    source: str


def softmax_scale(plan: Plan) -> tuple[float, str]:
    """Infinity multiplies L2-normalised q by a learned per-head scale and uses softmax scale 1.0."""
    if plan.family == "infinity":
        return 1.0, "explicit"
    return 1.0 / math.sqrt(plan.head_dim), "default"


def kernel_spec(plan: Plan, scale_index: int, layout: BlockLayout, backend: str = "triton", kind: str = "block",
                batch: int = DEFAULT_BATCH) -> KernelSpec:
    s = plan.scale(scale_index)
    return KernelSpec(backend, kind, batch, plan.heads, s.tokens, s.kv_len, plan.head_dim, DTYPE, layout.block_m,
                      layout.block_n, layout.content_hash(), token_exact=plan.config.token_exact,
                      return_lse=False, scale_kind=softmax_scale(plan)[1])


def _backend(name: str):
    from ..tuner.runners import backend_module

    return backend_module(name)


def host_tables(spec: KernelSpec, layout: BlockLayout) -> dict[str, np.ndarray]:
    """The launch tables a backend's kernel reads, by parameter name."""
    mod = _backend(spec.backend)
    if spec.backend == "triton":
        return mod._host_tables(spec, layout)  # noqa: SLF001 - the backend's own table builder
    return mod.layout_tables(layout)


def plan_workloads(plan: Plan, backends: tuple[str, ...] = ("triton",), block_sizes: tuple[int, ...] = (64, 128),
                   batch: int = DEFAULT_BATCH, cs4a: bool = True):
    """``(scale, spec, layout)`` of every kernel workload of the plan: per CSLA scale one per backend and layout
    block size, then (Triton, ``cs4a``) the dynamic CS4A kernels, whose third item is their static
    :class:`~sparvar_compiler.cs4a.TokenTables` / ``BlockTables`` instead of a layout. The tuner measures these
    and the emitter picks among their winners."""
    from ..planner.config import check_runtime_support

    check_runtime_support(plan.config)
    for s in plan.scales:
        if not s.has_csla:
            continue
        for bs in block_sizes:
            layout = csla_layout(plan, s.index, bs, bs)
            for backend in backends:
                yield s.index, kernel_spec(plan, s.index, layout, backend, batch=batch), layout
    if cs4a and "triton" in backends:
        yield from cs4a_workloads(plan, batch, DTYPE, softmax_scale(plan)[1])


def choose_kernels(plan: Plan, gpu: GpuSpec, db: Any | None, backends: tuple[str, ...] = ("triton",),
                   block_sizes: tuple[int, ...] = (64, 128), batch: int = DEFAULT_BATCH,
                   environment: dict | None = None) -> list[KernelChoice]:
    """Per CSLA scale, the fastest valid recorded winner over backends and block sizes, else the default config.

    A record that fails :func:`~sparvar_compiler.tuner.validate.validate_record` (a config the backend cannot
    build or launch, a time no GPU could measure) is skipped with a :class:`SkippedRecordWarning`, and the next
    record of that workload competes in its place (:func:`~sparvar_compiler.tuner.validate.usable_winner`)."""
    best: dict[int, KernelChoice] = {}
    for scale, spec, layout in plan_workloads(plan, backends, block_sizes, batch, cs4a=False):
        found = None if db is None else usable_winner(db, spec, gpu, environment, layout=layout)
        if found is None:
            continue
        win, config = found
        if scale not in best or win.median_ms < best[scale].expected_ms:
            best[scale] = KernelChoice(scale, spec, config, layout, True, float(win.median_ms),
                                       f"database trial {win.id}")
    out = []
    for s in plan.scales:
        if not s.has_csla:
            continue
        if s.index not in best:
            bs = DEFAULT_BLOCK if DEFAULT_BLOCK in block_sizes else block_sizes[0]
            layout = csla_layout(plan, s.index, bs, bs)
            spec = kernel_spec(plan, s.index, layout, backends[0], batch=batch)
            best[s.index] = KernelChoice(s.index, spec, _backend(spec.backend).default_config(spec, gpu), layout,
                                         False, None, "default config (untuned)")
        out.append(best[s.index])
    return out


def _dispatch(plan: Plan, kernels: dict[int, str]) -> list[dict[str, Any]]:
    rows = []
    for s in plan.scales:
        for layer, mode in enumerate(s.modes):
            if mode == Mode.SKIPPED:
                op, kernel, note = "skip", None, "scale skipped by the plan"
            elif mode == Mode.CSLA:
                op, kernel, note = "kernel", kernels[s.index], "csla"
            elif mode == Mode.CS4A:
                op, kernel, note = "cs4a", None, f"cs4a {plan.config.cs4a}: tables from the decision scale"
            elif mode == Mode.DECISION and cs4a_scales(plan):
                op, kernel, note = "cs4a_decision", None, "dense (cuDNN) + CS4A statistics and selection"
            else:
                op, kernel, note = "sdpa", None, mode.value
            rows.append({"scale": s.index, "layer": layer, "mode": mode.value, "op": op, "kernel": kernel,
                         "note": note})
    return rows


def emit_module(plan: Plan, gpu: GpuSpec, output: str | Path, db: Any | None = None,
                backends: tuple[str, ...] = ("triton",), block_sizes: tuple[int, ...] = (64, 128),
                batch: int = DEFAULT_BATCH, environment: dict | None = None,
                progress: Callable[[str], None] = print, force: bool = False) -> dict[str, Any]:
    """Write the runtime module for ``plan`` on ``gpu`` into ``output`` (atomically); returns the manifest.

    ``output`` may be new, or hold a sparvar module or module set, which is replaced; any other directory is
    replaced only with ``force``, and a file or a symbolic link never (:mod:`.output` has the rules). A refused
    path raises :class:`~.output.OutputPathError` before anything is compiled."""
    t0 = time.perf_counter()
    with staged_output(output, force=force) as staging:
        manifest = write_module(plan, gpu, staging.path, db, backends, block_sizes, batch, environment, progress)
    if staging.replaced is not None:
        progress(f"replaced the {staging.replaced} that was at {staging.target}")
    progress(f"emitted {output} in {time.perf_counter() - t0:.1f} s")
    return manifest


def write_module(plan: Plan, gpu: GpuSpec, directory: Path, db: Any | None = None,
                 backends: tuple[str, ...] = ("triton",), block_sizes: tuple[int, ...] = (64, 128),
                 batch: int = DEFAULT_BATCH, environment: dict | None = None,
                 progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the module's files into ``directory`` (created if missing; it must hold nothing else): what
    :func:`emit_module` does in its staging directory, and a module set for each member."""
    from ..db.environment import collect_environment
    from ..planner.config import check_runtime_support

    check_runtime_support(plan.config)  # before any compile: the module must run the plan its manifest names
    choices = choose_kernels(plan, gpu, db, backends, block_sizes, batch, environment)
    tmp = Path(directory)
    tmp.mkdir(exist_ok=True)
    (tmp / "kernels").mkdir()
    (tmp / "layouts").mkdir()
    kernels: dict[str, Any] = {}
    by_scale: dict[int, str] = {}
    for i, c in enumerate(choices, start=1):
        name = f"scale{c.scale}_{c.spec.backend}_{c.spec.kind}_{c.spec.block_m}x{c.spec.block_n}"
        progress(f"[{i}/{len(choices)}] compiling {name} for {gpu.name} ({gpu.arch}) "
                 f"{'tuned' if c.tuned else 'untuned'} config {c.config.to_dict()}")
        compiled = _backend(c.spec.backend).compile_for_target(c.spec, c.config, c.layout, gpu)
        binary = f"kernels/{name}.{compiled.binary_format}"
        (tmp / binary).write_bytes(compiled.binary)
        tables = f"layouts/{name}.npz"
        arrays = {f"table_{k}": np.ascontiguousarray(v) for k, v in host_tables(c.spec, c.layout).items()}
        arrays["layout_active"] = c.layout.active()
        np.savez_compressed(tmp / tables, **arrays)
        c.layout.to_npz(tmp / f"layouts/{name}.layout.npz")
        kernels[name] = {
            "scale": c.scale, "binary": binary, "layout": tables, "layout_file": f"layouts/{name}.layout.npz",
            "meta": compiled.meta(), "config": c.config.to_dict(), "spec": c.spec.to_dict(),
            "tuned": c.tuned, "source": c.source, "expected_ms": c.expected_ms,
            "sparsity": c.layout.sparsity(), "layout_hash": c.layout.content_hash(),
            "tables": sorted(k.removeprefix("table_") for k in arrays if k.startswith("table_")),
        }
        by_scale[c.scale] = name
    scale_value, scale_kind = softmax_scale(plan)
    cs4a_choices = choose_cs4a_kernels(plan, gpu, db, batch, DTYPE, scale_kind, environment)
    cs4a = emit_cs4a(plan, gpu, tmp, cs4a_choices, progress)
    (tmp / "README.txt").write_text(
        f"sparvar runtime module: {plan.model} {plan.resolution}px {plan.aspect} for {gpu.name} ({gpu.arch}).\n"
        "Load it with:  import sparvar_compiler.runtime as rt; m = rt.load(THIS_DIRECTORY)\n"
        "then call m.attention(q, k, v, scale_index, layer_index) in place of self-attention.\n"
        "Check it without a GPU with:  sparvar-compile verify THIS_DIRECTORY\n")
    files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "sparvar_version": __version__,
        "created_unix": int(time.time()),
        "model": {"name": plan.model, "family": plan.family, "depth": plan.depth, "heads": plan.heads,
                  "head_dim": plan.head_dim},
        "schedule": {"resolution": plan.resolution, "aspect": plan.aspect, "grids": [list(g) for g in plan.grids]},
        "plan": plan.to_dict(), "target": gpu.to_dict(),
        "environment": environment if environment is not None else collect_environment(probe_gpu=False),
        "batch": batch, "dtype": DTYPE, "softmax_scale": scale_value, "softmax_scale_kind": scale_kind,
        "kernels": kernels, "dispatch": _dispatch(plan, by_scale), "files": files, "cs4a": cs4a,
        "tuned": all(k["tuned"] for k in kernels.values()),
        "cs4a_tuned": None if cs4a is None else all(v["tuned"] for v in cs4a["scales"].values()),
    }
    write_manifest(tmp, manifest)
    return manifest
