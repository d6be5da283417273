"""GPU kernel benchmark: our block-sparse kernels against cuDNN, FlashAttention-2 and FlexAttention.

Run on a GPU host from the repository root::

    python bench/kernels.py [--models infinity-8b,infinity-2b] [--scales 10,11,12] [--blocks 64,128]
                            [--tvm-bundle DIR] [--quick] [--out FILE]

Cases are data (bench/cases.py): Infinity-8B (28 heads) and Infinity-2B (16 heads), B=2, D=128, bf16, query
scales 10-12 at 1024x1024 with the CSLA layouts at 64x64 and 128x128 blocks. For every case, on one card in one
run:

1. Baselines: cuDNN SDPA and FlashAttention-2 SDPA on the dense problem, and ``torch.compile``'d FlexAttention
   with the same layout (block level: every active block full; its compile time is reported apart).
2. Ours: for each backend, a mini sweep over a spread of its search space (always including its default
   config). Triton candidates are compiled to cubins in parallel processes
   (``triton_backend.compile_for_target``) and launched through ``sparvar_compiler.runtime.cubin`` (the
   compiler-free path); the winner is also built in-process (Triton JIT) and timed. A Triton row's ``ms`` is
   the cubin launch (``launch: "cubin"``, with ``jit_ms`` beside it); if the cubin path is not available the
   sweep uses the JIT kernels (``launch: "jit"``). TVM kernels come prebuilt from a bundle (below).
3. Every kernel's output (poisoned with NaN first) is checked against a float64 golden computed on the GPU from
   the dense-expanded mask of what that kernel computes (block level for block kernels and flex, the per-block
   key union for the key-gather kernel); its relative error must be within 3x of a bf16 SDPA-with-mask
   reference's. Only a correct candidate's time counts.
4. Times are medians of ``triton.testing.do_bench`` (which clears L2 before every run, so inputs are never
   cache-resident), short for the sweep and longer for the reported numbers.

Writes ``bench/results/kernels-<card>.json`` (card, SM count, versions, clocks, every row and every sweep trial)
and a PNG of the speedups over cuDNN beside it, and prints a table. Anything missing (a backend module, a
bundle, a baseline the card lacks) is skipped with its reason printed and recorded, never fatal.

TVM bundles: the GPU host has no TVM, so TVM kernels are compiled elsewhere with::

    python bench/kernels.py --make-tvm-bundle DIR [--gpu h100] [--quick] [case filters]

(needs TVM and nvcc, no GPU). A bundle is a directory of JSON files, each ``CompiledKernel.to_json_dict()``
(``spec`` identifies the case: shapes, blocks and ``layout_hash``) plus an optional ``"arg_binding"``:
``{kernel parameter name: source name}``. Arguments are bound by :func:`tvm_args` from these sources: tensors
``q k v out lse``; ``scale`` (float); ``q_len kv_len batch heads head_dim q_blocks kv_blocks`` (ints); layout
tables ``kv_num kv_idx`` (active blocks), ``full_num full_idx``, ``partial_num partial_idx`` (index tables int32
``[q_blocks, kv_blocks]``, padding repeats a row's last index), ``partial_offsets``, ``partial_masks``.
A parameter binds to the source of its own name unless ``arg_binding`` says otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.cases import KernelCase, select  # noqa: E402
from sparvar_compiler.codegen.artifact import CompiledKernel  # noqa: E402
from sparvar_compiler.codegen.reference import reference_attention, relative_error  # noqa: E402
from sparvar_compiler.codegen.spec import (DTYPES, KernelConfig, KernelConfigError, KernelSpec,  # noqa: E402
                                           default_scale)
from sparvar_compiler.planner import BlockLayout, csla_layout, get_gpu, make_plan  # noqa: E402
from sparvar_compiler.planner.gpus import GpuSpec, gpu_from_device_name  # noqa: E402

ERROR_FACTOR = 3.0
COMPILE_TIMEOUT_S = 300  # one candidate; a hung compiler must not hang the run
RESULTS = ROOT / "bench" / "results"


@dataclass
class Settings:
    max_configs: int = 8
    sweep_rep_ms: int = 25
    final_rep_ms: int = 100
    jobs: int = 8
    budget_s: float = 420.0
    backends: tuple[str, ...] = ("sdpa-cudnn", "sdpa-flash", "flex", "triton-block", "triton-gather", "tvm")
    device: str = "cuda"
    db: str | None = None  # tuning database whose winners join each sweep
    wide_from: Path | None = None  # earlier results whose winners join each sweep with 8-warp variants
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s


def say(msg: str) -> None:
    print(msg, flush=True)


def short(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " | ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- environment
def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Card, versions and clocks recorded beside every number."""
    props = torch.cuda.get_device_properties(device)
    name = torch.cuda.get_device_name(device)
    gpu = gpu_from_device_name(name, props.multi_processor_count)
    versions: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    try:
        from sparvar_compiler.runtime.cuda_driver import driver
        versions["cuda_driver_api"] = driver().driver_version()
    except Exception as e:  # noqa: BLE001 - informational only
        versions["cuda_driver_api"] = f"unavailable ({short(e)})"
    smi = _run(["nvidia-smi", f"--id={device.index or 0}", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,"
                "clocks.mem,power.limit,temperature.gpu,persistence_mode", "--format=csv,noheader,nounits"])
    clocks = None
    if smi:
        fields = [f.strip() for f in smi.splitlines()[0].split(",")]
        keys = ["driver_version", "sm_mhz", "max_sm_mhz", "mem_mhz", "power_limit_w", "temperature_c",
                "persistence_mode"]
        rec = dict(zip(keys, fields))
        versions["driver"] = rec.pop("driver_version", None)
        clocks = rec
    else:
        with contextlib.suppress(OSError):
            m = re.search(r"Kernel Module\s+([\d.]+)", Path("/proc/driver/nvidia/version").read_text())
            versions["driver"] = m.group(1) if m else None
    return {"card": name, "card_slug": gpu.name if gpu else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"),
            "registry_gpu": gpu.name if gpu else None, "sm_count": props.multi_processor_count,
            "capability": f"sm_{props.major}{props.minor}", "memory_gb": round(props.total_memory / 2 ** 30, 1),
            "versions": versions, "clocks_at_start": clocks, "host": platform.node(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# ---------------------------------------------------------------------------------------------- timing
def bench_ms(fn: Callable[[], Any], rep_ms: int) -> float:
    """Median milliseconds of ``fn`` on the GPU, L2 cleared before every run."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median"))
    # Same method without Triton: CUDA events around each run, a 256 MB write before each to evict L2.
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    n = max(5, min(1000, int(rep_ms / max(1e-3, (time.perf_counter() - t0) * 1e3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return float(np.median([s.elapsed_time(e) for s, e in zip(starts, ends)]))


# ---------------------------------------------------------------------------------------------- correctness
def union_mask(layout: BlockLayout) -> np.ndarray:
    """What a key-gather kernel computes: each query attends to the union of the keys its query block keeps."""
    tok = layout.to_token_mask(exact=True)
    qb, bm = layout.q_blocks, layout.block_m
    padded = np.zeros((qb * bm, layout.kv_len), dtype=bool)
    padded[: layout.q_len] = tok
    union = padded.reshape(qb, bm, layout.kv_len).any(axis=1)
    return np.ascontiguousarray(np.repeat(union, bm, axis=0)[: layout.q_len])


def semantic_mask(layout: BlockLayout, semantics: str) -> np.ndarray:
    return layout.to_token_mask(exact=False) if semantics == "block" else union_mask(layout)


def computed_pairs(layout: BlockLayout, semantics: str) -> int:
    """(query, key) pairs a kernel of these semantics computes (the FLOP basis of its TFLOP/s)."""
    return layout.computed_pairs() if semantics == "block" else int(union_mask(layout).sum())


class Checker:
    """Float64 golden and a bf16 SDPA-with-mask reference per semantics, computed once per case on the GPU."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, layout: BlockLayout,
                 head_chunk: int = 4) -> None:
        self.q, self.k, self.v, self.scale, self.layout = q, k, v, scale, layout
        self.head_chunk = head_chunk
        self._cache: dict[str, tuple[torch.Tensor, float, str]] = {}

    def _golden(self, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q, self.k, self.v
        out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
        for b in range(q.shape[0]):
            for h in range(0, q.shape[1], self.head_chunk):
                sl = (slice(b, b + 1), slice(h, h + self.head_chunk))
                out[sl] = reference_attention(q[sl], k[sl], v[sl], mask, self.scale, dtype=torch.float64)
        return out

    def _sdpa_reference(self, mask: torch.Tensor) -> tuple[torch.Tensor, str]:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # The memory-efficient kernel keeps scores in fp32 and feeds bf16 probabilities to P.V, as flash-style
        # kernels do; a reference computed in higher precision would make the 3x bound unfairly tight.
        errors = []
        for name, ctx in (("efficient", lambda: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)),
                          ("default", contextlib.nullcontext)):
            try:
                with ctx():
                    out = F.scaled_dot_product_attention(self.q, self.k, self.v, attn_mask=mask, scale=self.scale)
                out[:, :, ~mask.any(dim=1)] = 0  # our convention for rows with nothing kept
                return out, name
            except RuntimeError as e:
                errors.append(f"{name}: {short(e)}")
        raise RuntimeError("no SDPA backend ran the masked reference: " + "; ".join(errors))

    def reference(self, semantics: str) -> tuple[torch.Tensor, float, str]:
        if semantics not in self._cache:
            mask = torch.from_numpy(semantic_mask(self.layout, semantics)).to(self.q.device)
            golden = self._golden(mask)
            ref, backend = self._sdpa_reference(mask)
            self._cache[semantics] = (golden, relative_error(ref, golden), backend)
            del ref, mask
        return self._cache[semantics]

    def check(self, out: torch.Tensor, semantics: str) -> tuple[bool, float, float]:
        golden, ref_err, _ = self.reference(semantics)
        err = relative_error(out, golden)
        return err <= ERROR_FACTOR * ref_err, err, ref_err


def checked_run(launch: Callable[[], Any], out: torch.Tensor, checker: Checker, semantics: str
                ) -> tuple[bool, float, float, Any]:
    """Poison ``out``, run once, synchronise and check; returns (ok, error, reference error, result)."""
    out.fill_(float("nan"))
    res = launch()
    torch.cuda.synchronize()
    got = res if isinstance(res, torch.Tensor) else out
    ok, err, ref = checker.check(got, semantics)
    return ok, err, ref, res


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Row:
    case: KernelCase
    backend: str
    ms: float
    semantics: str
    rel_err: float | None = None
    ref_err: float | None = None
    config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)


def hbm_bytes(case: KernelCase, layout: BlockLayout, semantics: str) -> int:
    """Bytes a kernel must move at least once between HBM and the SMs: Q and O, and every key/value row that
    some query keeps (all of them for dense). The benchmark clears L2 before each run, so this is the floor
    that bounds the small scales, where the compute is short."""
    if semantics == "dense":
        keys = layout.kv_len
    else:
        cols = layout.active().any(axis=0)
        keys = int(np.minimum(layout.block_n, layout.kv_len - np.arange(layout.kv_blocks) * layout.block_n)[cols].sum())
    elem = DTYPES[case.dtype].itemsize
    return elem * case.batch * case.heads * case.head_dim * (2 * layout.q_len + 2 * keys)


def tflops(case: KernelCase, pairs: int, ms: float) -> float:
    return 4.0 * case.batch * case.heads * case.head_dim * pairs / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------------- baselines
def run_dense(backend: str, q, k, v, scale: float, settings: Settings) -> float:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION}[backend]
    with sdpa_kernel(which):
        F.scaled_dot_product_attention(q, k, v, scale=scale)  # raises here if the backend cannot run it
        torch.cuda.synchronize()
        return bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), settings.final_rep_ms)


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # One compiled graph per case shape; the default limit (8) would silently fall back to eager flex.
        for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(256, getattr(torch._dynamo.config, knob)))
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def run_flex(case: KernelCase, layout: BlockLayout, q, k, v, scale: float, checker: Checker,
             settings: Settings) -> Row:
    from sparvar_compiler.codegen.interop import to_block_mask

    block_mask = to_block_mask(layout, token_exact=False, device=q.device)
    flex = _compiled_flex()
    # Flex's kernel tile must divide the sparse block; its Hopper default is 128 queries.
    small = {"BLOCK_M": min(64, layout.block_m), "BLOCK_N": min(64, layout.block_n)}
    option_sets = [None, small] if min(layout.block_m, layout.block_n) >= 128 else [small]
    checker.reference("block")  # before the clock starts: the golden is not part of flex's compile time
    failures = []
    for opts in option_sets:
        def call():
            return flex(q, k, v, block_mask=block_mask, scale=scale, kernel_options=opts)
        try:
            t0 = time.perf_counter()
            out = call()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a compile failure: try the next options
            failures.append(f"{opts}: {short(e)}")
            continue
        ok, err, ref = checker.check(out, "block")
        del out
        if not ok:
            raise RuntimeError(f"flex gave a wrong result: error {err:.2e} > {ERROR_FACTOR} x {ref:.2e}")
        ms = bench_ms(call, settings.final_rep_ms)
        return Row(case, "flex", ms, "block", err, ref, {"kernel_options": opts},
                   {"compile_s": round(compile_s, 2)})
    raise RuntimeError("flex did not compile: " + "; ".join(failures))


# ---------------------------------------------------------------------------------------------- compile pool
def compile_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker: compile one candidate to a CompiledKernel (JSON-ready). Runs in a spawned process."""
    t0 = time.perf_counter()
    try:
        if job["backend"] == "triton":
            from sparvar_compiler.codegen import triton_backend as backend
        else:
            from sparvar_compiler.codegen import tvm_backend as backend
        layout = csla_layout(make_plan(job["model"]), job["query_scale"], job["block_m"], job["block_n"],
                             token_masks=True)
        kernel = backend.compile_for_target(KernelSpec(**job["spec"]), KernelConfig.from_dict(job["config"]),
                                            layout, get_gpu(job["gpu"]))
        return {"ok": True, "kernel": kernel.to_json_dict(), "seconds": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - reported per candidate
        # Backends raise KernelConfigError for resources; a compiler failure may subclass it, so names decide.
        resources = isinstance(e, KernelConfigError) and "compile" not in type(e).__name__.lower()
        reason = "out_of_resources" if resources else "compile_error"
        return {"ok": False, "reason": reason, "error": short(e, 600), "seconds": time.perf_counter() - t0}


class CompilePool:
    """Candidates compile in spawned processes (Triton's and TVM's compilers hold the GIL for long stretches);
    falls back to compiling in this process when a pool cannot start."""

    def __init__(self, jobs: int) -> None:
        self.pool: cf.ProcessPoolExecutor | None = None
        if jobs > 1:
            try:
                self.pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
            except (OSError, ValueError) as e:
                say(f"  compile pool unavailable ({short(e)}); compiling in this process")

    def submit(self, job: dict[str, Any]) -> cf.Future:
        if self.pool is not None:
            try:
                return self.pool.submit(compile_job, job)
            except RuntimeError as e:  # broken pool: carry on serially
                say(f"  compile pool broke ({short(e)}); compiling in this process")
                self.pool = None
        fut: cf.Future = cf.Future()
        fut.set_result(compile_job(job))
        return fut

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def spread(items: list, k: int) -> list:
    """``k`` items evenly spread over ``items`` (all when k >= len): a sweep that samples every knob."""
    if k >= len(items):
        return list(items)
    if k <= 1:
        return items[:1]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def candidates(backend_module, spec: KernelSpec, gpu: GpuSpec, k: int,
               tuned: KernelConfig | None = None, also: list[KernelConfig] = ()) -> list[KernelConfig]:
    """The default config, the tuned winner (if any), ``also``, and a spread of the rest of the search space."""
    default = backend_module.default_config(spec, gpu)
    space = backend_module.search_space(spec, gpu)
    first = [default] + ([tuned] if tuned is not None and tuned != default else [])
    first += [c for c in dict.fromkeys(also) if c not in first]
    # The persistent launches of the best known config, so that knob is compared on its own (it is not in
    # the tuner's search space).
    if hasattr(backend_module, "persistent_variants"):
        first += backend_module.persistent_variants(spec, first[-1], gpu)
    rest = [c for c in space if c not in first]
    return first + spread(rest, k - len(first))


def wide_variants(results: Path | None, tag: str, backend: str) -> list[KernelConfig]:
    """Experiment (``--wide-from FILE``): the winner of ``tag``/``backend`` in an earlier results file, and
    the same config with 8 warps over its 64-row tile (two warpgroups split the key columns; outside the
    search space, which asks 16 query rows per warp), for the latency-bound small scales."""
    if results is None:
        return []
    row = next((c for c in json.loads(results.read_text())["cases"]
                if c["tag"] == tag and c["backend"] == backend), None)
    if row is None or not row.get("config"):
        return []
    base = KernelConfig.from_dict({k: v for k, v in row["config"].items() if k != "programs"})
    if base.num_warps != 4 or base.get("block_m") != 64:
        return [base]
    return [base] + [KernelConfig(8, stages, base.extra) for stages in sorted({base.num_stages, 3})]


TUNED: dict[tuple[str, str], dict] = {}  # (case tag, kind) -> the database's winner, recorded beside each row


def open_tuning_db(db_url: str | None):
    """The tuning database behind ``--db`` (a shipped-style SQLite file read-only), or None."""
    if not db_url:
        return None
    from sparvar_compiler.db import TuningDatabase

    return TuningDatabase.open_shipped(db_url) if db_url.endswith(".sqlite") else TuningDatabase.open(db_url)


@lru_cache(maxsize=None)
def _plan_layout_hash(case: KernelCase) -> str:
    """Hash of the case's layout as the plan tunes it: without token masks (block kernels do not read them)."""
    return csla_layout(make_plan(case.model), case.query_scale, case.block_m, case.block_n,
                       token_masks=False).content_hash()


def tuned_config(db, case: KernelCase, spec: KernelSpec, gpu: GpuSpec) -> KernelConfig | None:
    """The tuning database's winner for this case's kernel on ``gpu`` (``db`` from :func:`open_tuning_db`),
    or None.

    The plan tunes its kernels with an explicit softmax scale and the layout without token masks; both are
    runtime inputs or ignored by block kernels, so the winner of that workload is this case's tuned config.
    """
    if db is None:
        return None
    for h, scale_kind in itertools.product((_plan_layout_hash(case), case.layout().content_hash()),
                                           ("explicit", "default")):
        rec = db.winner(dataclasses.replace(spec, layout_hash=h, scale_kind=scale_kind).to_dict(), gpu.to_dict())
        if rec is not None:
            return KernelConfig.from_dict(rec.config)
    return None


def job_for(backend: str, case: KernelCase, spec: KernelSpec, config: KernelConfig, gpu: GpuSpec) -> dict:
    return {"backend": backend, "model": case.model, "query_scale": case.query_scale, "block_m": case.block_m,
            "block_n": case.block_n, "spec": spec.to_dict(), "config": config.to_dict(), "gpu": gpu.name}


# ---------------------------------------------------------------------------------------------- our kernels
def triton_spec(case: KernelCase, layout: BlockLayout, kind: str) -> KernelSpec:
    return KernelSpec("triton", kind, case.batch, case.heads, layout.q_len, layout.kv_len, case.head_dim,
                      case.dtype, case.block_m, case.block_n, layout.content_hash())


def sweep_cubins(name: str, semantics: str, items: list[tuple[dict, Callable[[], dict]]], bind: Callable,
                 q: torch.Tensor, checker: Checker, settings: Settings):
    """Load, check and time compiled candidates; returns (best (ms, config, loaded, args, err, ref), trials)."""
    from sparvar_compiler.runtime.cubin import LoadedKernel

    best, trials = None, []
    out = torch.empty_like(q)
    for config, result in items:
        if best is not None and settings.over_budget():
            trials.append({"config": config, "valid": False, "reason": "skipped", "detail": "over time budget"})
            continue
        try:
            res = result()
        except Exception as e:  # noqa: BLE001 - a dead worker or a timeout: this candidate only
            res = {"ok": False, "reason": "compile_error", "error": short(e), "seconds": 0.0}
        trial: dict[str, Any] = {"config": config, "compile_s": round(res.get("seconds", 0.0), 2)}
        trials.append(trial)
        if not res["ok"]:
            trial.update(valid=False, reason=res["reason"], detail=res["error"])
            continue
        try:
            loaded = LoadedKernel.load(CompiledKernel.from_json_dict(res["kernel"]))
            args = bind(loaded, out)
            ok, err, ref, _ = checked_run(lambda: loaded.launch(args), out, checker, semantics)
        except Exception as e:  # noqa: BLE001 - recorded as an invalid trial
            reason = "out_of_resources" if isinstance(e, KernelConfigError) else "launch_error"
            trial.update(valid=False, reason=reason, detail=short(e))
            continue
        trial.update(rel_err=err, registers=loaded.resources.get("registers"))
        if not ok:
            trial.update(valid=False, reason="wrong_result", detail=f"error {err:.2e} > {ERROR_FACTOR} x {ref:.2e}")
            continue
        ms = bench_ms(lambda: loaded.launch(args), settings.sweep_rep_ms)
        trial.update(valid=True, ms=ms)
        if best is None or ms < best[0]:
            best = (ms, config, loaded, args, err, ref)
    say(f"    {name}: {sum(t.get('valid', False) for t in trials)}/{len(trials)} candidates valid")
    return best, trials


def run_triton(case: KernelCase, layout: BlockLayout, kind: str, q, k, v, scale: float, checker: Checker,
               gpu: GpuSpec, futures: list | None, settings: Settings) -> Row:
    from sparvar_compiler.codegen import triton_backend as tb

    backend, semantics = f"triton-{kind}", ("block" if kind == "block" else "union")
    spec = triton_spec(case, layout, kind)
    best, trials, launch = None, [], "cubin"
    if futures:
        def bind(loaded, out):
            return tb.launch_args(layout, q, k, v, out, None, scale, q.device, spec=spec)
        best, trials = sweep_cubins(backend, semantics, futures, bind, q, checker, settings)
    if best is None:  # no cubin path: sweep the in-process kernels (JIT compiles one by one, so fewer)
        if futures:
            say(f"    {backend}: no compiled candidate ran; sweeping in-process (JIT) kernels instead")
        launch = "jit"
        configs = candidates(tb, spec, gpu, min(settings.max_configs, 4))
        best, trials = sweep_jit(tb, spec, layout, configs, q, k, v, scale, checker, semantics, settings, trials)
    if best is None:
        reasons = sorted({t.get("reason", "?") for t in trials})
        raise RuntimeError(f"no valid {backend} candidate ({', '.join(reasons)}): "
                           + "; ".join(t.get("detail", "")[:200] for t in trials[:2]))
    ms_sweep, config, runner, args, err, ref = best
    out = torch.empty_like(q)
    extra: dict[str, Any] = {"launch": launch, "candidates": len(trials),
                             "valid": sum(t.get("valid", False) for t in trials)}
    if (case.tag, kind) in TUNED:
        extra["db_winner"] = TUNED[(case.tag, kind)]
        extra["db_winner_won"] = TUNED[(case.tag, kind)] == config
    if launch == "cubin":
        ms = bench_ms(lambda: runner.launch(args), settings.final_rep_ms)
        extra["cubin_ms"] = ms
        extra["registers"] = runner.resources.get("registers")
        try:  # the same config through Triton's own launcher, in-process
            t0 = time.perf_counter()
            kernel = tb.build(spec, KernelConfig.from_dict(config), layout)
            ok, jerr, _, _ = checked_run(lambda: kernel(q, k, v, scale=scale, out=out), out, checker, semantics)
            extra["jit_first_call_s"] = round(time.perf_counter() - t0, 2)
            if ok:
                extra["jit_ms"] = bench_ms(lambda: kernel(q, k, v, scale=scale, out=out), settings.final_rep_ms)
            else:
                extra["jit_error"] = f"wrong result: error {jerr:.2e}"
        except Exception as e:  # noqa: BLE001 - informational
            extra["jit_error"] = short(e)
    else:
        ms = bench_ms(lambda: runner(q, k, v, scale=scale, out=out), settings.final_rep_ms)
        extra["jit_ms"] = ms
    return Row(case, backend, ms, semantics, err, ref, config, extra, trials)


def sweep_jit(tb, spec, layout, configs, q, k, v, scale, checker, semantics, settings, trials):
    best = None
    out = torch.empty_like(q)
    for cfg in configs:
        if best is not None and settings.over_budget():
            break
        trial: dict[str, Any] = {"config": cfg.to_dict(), "launch": "jit"}
        trials.append(trial)
        try:
            t0 = time.perf_counter()
            kernel = tb.build(spec, cfg, layout)
            ok, err, ref, _ = checked_run(lambda: kernel(q, k, v, scale=scale, out=out), out, checker, semantics)
            trial["first_call_s"] = round(time.perf_counter() - t0, 2)
        except Exception as e:  # noqa: BLE001
            trial.update(valid=False, reason="compile_error", detail=short(e))
            continue
        trial["rel_err"] = err
        if not ok:
            trial.update(valid=False, reason="wrong_result", detail=f"error {err:.2e} > {ERROR_FACTOR} x {ref:.2e}")
            continue
        ms = bench_ms(lambda: kernel(q, k, v, scale=scale, out=out), settings.sweep_rep_ms)
        trial.update(valid=True, ms=ms)
        if best is None or ms < best[0]:
            best = (ms, cfg.to_dict(), kernel, None, err, ref)
    return best, trials


# ---------------------------------------------------------------------------------------------- TVM bundles
_TABLE_CACHE: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
ARG_ALIASES = {"o": "out", "output": "out", "sm_scale": "scale", "softmax_scale": "scale"}


def _padded_table(layout: BlockLayout, which: str) -> tuple[np.ndarray, np.ndarray]:
    num, idx = layout.tables(which)
    full = np.empty((layout.q_blocks, layout.kv_blocks), dtype=np.int32)
    full[:, : idx.shape[1]] = idx
    full[:, idx.shape[1]:] = idx[:, -1:]
    return num.astype(np.int32), full


def layout_sources(layout: BlockLayout, device: torch.device) -> dict[str, torch.Tensor]:
    """Device copies of every layout table a kernel may take (cached per layout and device)."""
    key = (layout.content_hash(), str(device))
    if key not in _TABLE_CACHE:
        host: dict[str, np.ndarray] = {}
        for which, prefix in (("active", "kv"), ("full", "full"), ("partial", "partial")):
            host[f"{prefix}_num"], host[f"{prefix}_idx"] = _padded_table(layout, which)
        host["partial_offsets"] = layout.partial_offsets.astype(np.int32)
        if layout.has_token_masks and layout.partial_masks.size:
            host["partial_masks"] = layout.partial_masks.view(np.int32)
        else:
            host["partial_masks"] = np.zeros((1, layout.block_m, layout.mask_words), dtype=np.int32)
        _TABLE_CACHE[key] = {n: torch.from_numpy(np.array(a, copy=True)).to(device) for n, a in host.items()}
    return _TABLE_CACHE[key]


def tvm_args(meta: dict[str, Any], layout: BlockLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor | None, scale: float | None) -> dict[str, object]:
    """Launch arguments for a bundled kernel, bound from its parameter names (see the module docstring).

    ``meta`` is the kernel's JSON (``params``, optional ``arg_binding``). Raises KeyError naming a parameter
    that no source matches.
    """
    B, H, Nq, D = q.shape
    sources: dict[str, object] = {"q": q, "k": k, "v": v, "out": out,
                                  "scale": default_scale(D) if scale is None else float(scale),
                                  "q_len": Nq, "kv_len": k.shape[2], "batch": B, "heads": H, "head_dim": D,
                                  "q_blocks": layout.q_blocks, "kv_blocks": layout.kv_blocks}
    sources.update(layout_sources(layout, q.device))
    binding = meta.get("arg_binding") or {}
    args: dict[str, object] = {}
    for p in meta["params"]:
        if p["kind"] == "scratch":
            continue
        name = p["name"]
        src = binding.get(name) or ARG_ALIASES.get(name.lower(), name.lower())
        if src == "lse":
            if lse is None:
                lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
            args[name] = lse
        elif src in sources:
            args[name] = sources[src]
        else:
            raise KeyError(f"kernel parameter {name!r} matches no source; give it an arg_binding (sources: "
                           f"{sorted(sources) + ['lse']})")
    return args


def load_bundle(path: Path) -> list[dict[str, Any]]:
    kernels = []
    for f in sorted(path.rglob("*.json")):
        try:
            d = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            say(f"  tvm bundle: skipping {f.name} ({short(e)})")
            continue
        if isinstance(d, dict) and "binary_b64" in d and "spec" in d:
            d["_file"] = f.name
            kernels.append(d)
    return kernels


def bundle_for_case(bundle: list[dict], case: KernelCase, layout: BlockLayout) -> list[dict]:
    """Kernels built for this case: same shapes and blocks, and the case's layout (with or without its token
    masks, which block-level kernels do not read)."""
    hashes = {layout.content_hash(),
              csla_layout(make_plan(case.model), case.query_scale, case.block_m, case.block_n,
                          token_masks=False).content_hash()}
    want = {"batch": case.batch, "heads": case.heads, "q_len": layout.q_len, "kv_len": layout.kv_len,
            "head_dim": case.head_dim, "dtype": case.dtype, "block_m": case.block_m, "block_n": case.block_n}
    return [d for d in bundle if all(d["spec"].get(key) == val for key, val in want.items())
            and d["spec"].get("layout_hash") in hashes and not d["spec"].get("token_exact", False)]


def _tvm_binder():
    """The TVM backend's own ``launch_args`` when it imports without TVM, else the generic :func:`tvm_args`."""
    try:
        from sparvar_compiler.codegen.tvm_backend import launch_args
        return launch_args
    except ImportError:
        return None


def run_tvm(case: KernelCase, layout: BlockLayout, kernels: list[dict], q, k, v, scale: float,
            checker: Checker, settings: Settings) -> Row:
    own = _tvm_binder()
    metas = {m["sha256"]: m for m in kernels if "sha256" in m}

    def bind(loaded, out):
        meta = metas.get(loaded.compiled.sha256) or {"params": loaded.compiled.meta()["params"]}
        if own is not None and not meta.get("arg_binding"):
            args = own(layout, q, k, v, out, None, scale)
            if set(args) == set(loaded.arg_names):
                return args
        return tvm_args(meta, layout, q, k, v, out, None, scale)

    chosen = spread(kernels, max(settings.max_configs, 1))
    items = [(m.get("config"), (lambda m=m: {"ok": True, "kernel": m, "seconds": 0.0})) for m in chosen]
    best, trials = sweep_cubins("tvm", "block", items, bind, q, checker, settings)
    for meta, trial in zip(chosen, trials):
        trial["file"] = meta.get("_file")
    if best is None:
        raise RuntimeError("no valid TVM kernel in the bundle: " + "; ".join(
            f"{t.get('file')}: {t.get('reason')} {t.get('detail', '')[:160]}" for t in trials[:3]))
    _, config, loaded, args, err, ref = best
    ms = bench_ms(lambda: loaded.launch(args), settings.final_rep_ms)
    return Row(case, "tvm", ms, "block", err, ref, config,
               {"launch": "cubin", "candidates": len(trials), "registers": loaded.resources.get("registers")},
               trials)


def make_tvm_bundle(cases: list[KernelCase], out_dir: Path, gpu: GpuSpec, settings: Settings) -> int:
    """Compile TVM kernels for ``cases`` (needs TVM and nvcc, no GPU) into a bundle directory."""
    from sparvar_compiler.codegen import tvm_backend

    out_dir.mkdir(parents=True, exist_ok=True)
    pool = CompilePool(settings.jobs)
    pending = []
    for case in cases:
        layout = case.layout()
        spec = KernelSpec("tvm", "block", case.batch, case.heads, layout.q_len, layout.kv_len, case.head_dim,
                          case.dtype, case.block_m, case.block_n, layout.content_hash())
        for cfg in candidates(tvm_backend, spec, gpu, settings.max_configs):
            pending.append((case, cfg, pool.submit(job_for("tvm", case, spec, cfg, gpu))))
    written = 0
    for case, cfg, fut in pending:
        try:
            res = fut.result(timeout=COMPILE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - this candidate only
            res = {"ok": False, "reason": "compile_error", "error": short(e), "seconds": 0.0}
        name = f"{case.model}-s{case.query_scale}-{case.block_m}x{case.block_n}-" + "-".join(
            f"{k}{v}" for k, v in sorted(cfg.to_dict().items()))
        if not res["ok"]:
            say(f"  {case.tag} {cfg.to_dict()}: {res['reason']}: {res['error'][:300]}")
            continue
        (out_dir / f"{name}.json").write_text(json.dumps({**res["kernel"], "case": case.tag}) + "\n")
        written += 1
        say(f"  {case.tag} {cfg.to_dict()}: compiled in {res['seconds']:.1f} s")
    pool.close()
    say(f"wrote {written} kernels to {out_dir}")
    return 0 if written else 1


# ---------------------------------------------------------------------------------------------- one case
def run_case(case: KernelCase, settings: Settings, gpu: GpuSpec, futures: dict, bundle: list[dict] | None,
             skipped: list[dict]) -> list[Row]:
    """Measure every backend on one case; failures become entries of ``skipped``."""
    try:
        return _measure_case(case, settings, gpu, futures, bundle, skipped)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the case's inputs and goldens are gone by now


def _measure_case(case: KernelCase, settings: Settings, gpu: GpuSpec, futures: dict, bundle: list[dict] | None,
                  skipped: list[dict]) -> list[Row]:
    layout = case.layout()
    say(f"[{settings.elapsed():6.1f} s] {case.tag}: {layout.q_len} x {layout.kv_len}, B={case.batch} H={case.heads} "
        f"D={case.head_dim}, sparsity {100 * layout.sparsity():.1f}%")
    gen = torch.Generator(device=settings.device).manual_seed(int.from_bytes(os.urandom(4), "little"))
    shape_q = (case.batch, case.heads, layout.q_len, case.head_dim)
    shape_kv = (case.batch, case.heads, layout.kv_len, case.head_dim)
    dtype = DTYPES[case.dtype]
    q, k, v = (torch.randn(s, device=settings.device, generator=gen, dtype=dtype)
               for s in (shape_q, shape_kv, shape_kv))
    scale = default_scale(case.head_dim)
    checker = Checker(q, k, v, scale, layout)
    rows: list[Row] = []

    def attempt(backend: str, fn: Callable[[], Row | float]) -> None:
        if backend not in settings.backends:
            return
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - every failure is a recorded skip, never fatal
            skipped.append({"case": case.tag, "backend": backend, "reason": short(e, 600)})
            say(f"    {backend}: skipped ({short(e, 200)})")
            if os.environ.get("SPARVAR_BENCH_TRACE"):
                traceback.print_exc()
            return
        row = res if isinstance(res, Row) else Row(case, backend, res, "dense")
        rows.append(row)
        say(f"    {backend}: {row.ms:.3f} ms" + (f", error {row.rel_err:.2e} (ref {row.ref_err:.2e})"
                                                  if row.rel_err is not None else ""))

    attempt("sdpa-cudnn", lambda: run_dense("sdpa-cudnn", q, k, v, scale, settings))
    attempt("sdpa-flash", lambda: run_dense("sdpa-flash", q, k, v, scale, settings))
    if settings.over_budget() and "flex" in settings.backends:
        skipped.append({"case": case.tag, "backend": "flex", "reason": "over time budget (compile skipped)"})
    else:
        attempt("flex", lambda: run_flex(case, layout, q, k, v, scale, checker, settings))
    for kind in ("block", "gather"):
        attempt(f"triton-{kind}", lambda kind=kind: run_triton(case, layout, kind, q, k, v, scale, checker, gpu,
                                                               futures.get((case.tag, kind)), settings))
    if bundle is None:
        if "tvm" in settings.backends:
            skipped.append({"case": case.tag, "backend": "tvm", "reason": "no --tvm-bundle given"})
    else:
        matching = bundle_for_case(bundle, case, layout)

        def tvm_row() -> Row:
            if not matching:
                raise RuntimeError("the bundle has no kernel for this case (shapes, blocks and layout hash)")
            return run_tvm(case, layout, matching, q, k, v, scale, checker, settings)
        attempt("tvm", tvm_row)
    for semantics in ("block", "union"):
        if semantics in checker._cache:
            for row in rows:
                if row.semantics == semantics:
                    row.extra["ref_backend"] = checker._cache[semantics][2]
    return rows


# ---------------------------------------------------------------------------------------------- reporting
def result_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    by_case: dict[str, dict[str, float]] = {}
    for r in rows:
        by_case.setdefault(r.case.tag, {})[r.backend] = r.ms
    out = []
    for r in rows:
        base = by_case[r.case.tag]
        layout = r.case.layout()
        pairs = layout.q_len * layout.kv_len if r.semantics == "dense" else computed_pairs(layout, r.semantics)
        cudnn = base.get("sdpa-cudnn")
        out.append({
            **r.case.to_dict(), "tag": r.case.tag, "backend": r.backend, "ms": r.ms,
            "cudnn_ms": cudnn, "flash_ms": base.get("sdpa-flash"), "flex_ms": base.get("flex"),
            "speedup_vs_cudnn": (cudnn / r.ms) if cudnn else None,
            "tflops_on_computed_blocks": tflops(r.case, pairs, r.ms),
            "flop_basis": {"dense": "all pairs", "block": "active blocks clipped to bounds",
                           "union": "gathered key union per query block"}[r.semantics],
            "computed_pairs": pairs, "hbm_bytes": (nbytes := hbm_bytes(r.case, layout, r.semantics)),
            "hbm_tb_per_s": nbytes / (r.ms * 1e-3) / 1e12, "q_len": layout.q_len, "kv_len": layout.kv_len,
            "sparsity": layout.sparsity(), "config": r.config, "rel_err": r.rel_err, "ref_err": r.ref_err,
            "error_factor": ERROR_FACTOR, **r.extra, "trials": r.trials,
        })
    return out


def print_table(results: list[dict[str, Any]]) -> None:
    say("")
    say(f"{'case':<26} {'backend':<14} {'ms':>8} {'x cuDNN':>8} {'TFLOP/s':>8} {'TB/s':>6} {'rel err':>9}  config")
    last = None
    for r in results:
        if r["tag"] != last and last is not None:
            say("")
        last = r["tag"]
        sp = f"{r['speedup_vs_cudnn']:.2f}" if r["speedup_vs_cudnn"] else "-"
        err = f"{r['rel_err']:.2e}" if r["rel_err"] is not None else "-"
        cfg = json.dumps(r["config"], sort_keys=True) if r["config"] else ""
        say(f"{r['tag']:<26} {r['backend']:<14} {r['ms']:8.3f} {sp:>8} {r['tflops_on_computed_blocks']:8.0f} "
            f"{r['hbm_tb_per_s']:6.2f} {err:>9}  {cfg[:60]}")


def write_chart(results: list[dict[str, Any]], path: Path, card: str) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        say(f"chart skipped: {short(e)}")
        return None
    tags = list(dict.fromkeys(r["tag"] for r in results))
    backends = [b for b in ("sdpa-flash", "flex", "triton-block", "triton-gather", "tvm")
                if any(r["backend"] == b for r in results)]
    if not tags or not backends:
        return None
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(tags) + 3), 4.8), dpi=110)
    for i, b in enumerate(backends):
        vals = [next((r["speedup_vs_cudnn"] or 0.0 for r in results if r["tag"] == t and r["backend"] == b), 0.0)
                for t in tags]
        ax.bar(np.arange(len(tags)) + (i - (len(backends) - 1) / 2) * width, vals, width, label=b)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(tags)))
    ax.set_xticklabels([t.replace("infinity-", "inf-") for t in tags], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speedup over cuDNN dense (x)")
    ax.set_title(f"Block-sparse attention on {card} (bf16, B=2, D=128, CSLA layouts)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="infinity-8b,infinity-2b")
    p.add_argument("--scales", default="10,11,12")
    p.add_argument("--blocks", default="64,128")
    p.add_argument("--tvm-bundle", type=Path, help="directory of prebuilt TVM kernels (CompiledKernel JSON)")
    p.add_argument("--quick", action="store_true", help="3 configs per backend and shorter timings")
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/kernels-<card>.json)")
    p.add_argument("--backends", help="comma-separated subset of " + ",".join(Settings().backends))
    p.add_argument("--max-configs", type=int, help="candidates per backend and case (default 8, quick 3)")
    p.add_argument("--jobs", type=int, help="compile processes (default: CPU cores - 2, at most 16)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="after this many seconds, sweeps stop at their first valid candidate and flex is skipped")
    p.add_argument("--make-tvm-bundle", type=Path, metavar="DIR",
                   help="compile TVM kernels for the cases into DIR (needs TVM + nvcc, no GPU) and exit")
    p.add_argument("--db", help="tuning database (file or URL): its winner for each case joins the sweep")
    p.add_argument("--wide-from", type=Path, metavar="FILE",
                   help="experiment: an earlier results file whose winners join each sweep, with 8-warp variants")
    p.add_argument("--gpu", default="h100", help="target GPU registry name for --make-tvm-bundle")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings(budget_s=args.budget_s, db=args.db, wide_from=args.wide_from)
    if args.quick:
        s.max_configs, s.sweep_rep_ms, s.final_rep_ms = 3, 10, 40
    if args.max_configs:
        s.max_configs = max(1, args.max_configs)
    s.jobs = args.jobs or max(1, min(16, (os.cpu_count() or 2) - 2))
    if args.backends:
        wanted = tuple(b.strip() for b in args.backends.split(",") if b.strip())
        unknown = set(wanted) - set(s.backends)
        if unknown:
            raise SystemExit(f"unknown backends {sorted(unknown)}; known: {', '.join(s.backends)}")
        s.backends = wanted
    return s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    cases = select([m.strip() for m in args.models.split(",") if m.strip()],
                   [int(x) for x in args.scales.split(",") if x.strip()],
                   [int(x) for x in args.blocks.split(",") if x.strip()])
    if args.make_tvm_bundle:
        return make_tvm_bundle(cases, args.make_tvm_bundle, get_gpu(args.gpu), settings)
    if not torch.cuda.is_available():
        say("no CUDA device: this benchmark runs on a GPU host (use --make-tvm-bundle to prepare TVM kernels)")
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    env = environment(device)
    gpu = get_gpu(env["registry_gpu"]) if env["registry_gpu"] else get_gpu("h100")
    if not env["registry_gpu"]:
        say(f"warning: {env['card']} is not in the GPU registry; search spaces use h100's limits")
    say(f"{env['card']} ({env['capability']}, {env['sm_count']} SMs), torch {env['versions']['torch']}, "
        f"triton {env['versions']['triton']}, CUDA {env['versions']['cuda']}; {len(cases)} cases, "
        f"{settings.max_configs} configs per backend, {settings.jobs} compile processes")
    skipped: list[dict] = []
    bundle = None
    if "tvm" in settings.backends and args.tvm_bundle is not None:
        if args.tvm_bundle.is_dir():
            bundle = load_bundle(args.tvm_bundle)
            say(f"tvm bundle: {len(bundle)} kernels from {args.tvm_bundle}")
        else:
            say(f"tvm bundle {args.tvm_bundle} is not a directory: tvm skipped")
    futures = submit_triton(cases, gpu, settings, skipped)
    rows: list[Row] = []
    try:
        for case in cases:
            rows += run_case(case, settings, gpu, futures, bundle, skipped)
    finally:
        pool = futures.pop("_pool", None)
        if pool is not None:
            pool.close()
    results = result_dicts(rows)
    print_table(results)
    out = args.out or RESULTS / f"kernels-{env['card_slug']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {**env, "settings": {"max_configs": settings.max_configs, "sweep_rep_ms": settings.sweep_rep_ms,
                               "final_rep_ms": settings.final_rep_ms, "budget_s": settings.budget_s,
                               "timing": "triton.testing.do_bench median, L2 cleared before every run",
                               "correctness": f"rel. error vs float64 golden <= {ERROR_FACTOR} x bf16 "
                                              f"SDPA-with-mask reference's", "argv": sys.argv[1:]},
           "wall_s": round(settings.elapsed(), 1), "cases": results, "skipped": skipped}
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    chart = write_chart(results, out.with_suffix(".png"), env["card"])
    say(f"\nwrote {out}" + (f" and {chart}" if chart else "") + f" in {settings.elapsed():.0f} s; "
        f"{len(skipped)} skipped (see 'skipped' in the JSON)")
    return 0


def _waiter(future: cf.Future) -> Callable[[], dict]:
    return lambda: future.result(timeout=COMPILE_TIMEOUT_S)


def submit_triton(cases: list[KernelCase], gpu: GpuSpec, settings: Settings, skipped: list[dict]) -> dict:
    """Queue every case's Triton candidates for compilation up front, so compiling overlaps measuring."""
    kinds = [k for k in ("block", "gather") if f"triton-{k}" in settings.backends]
    if not kinds:
        return {}
    try:
        from sparvar_compiler.codegen import triton_backend as tb
        if not hasattr(tb, "compile_for_target"):
            raise ImportError("triton_backend has no compile_for_target")
    except ImportError as e:
        say(f"triton cubin path unavailable ({short(e)}); sweeping in-process kernels instead")
        return {}
    pool = CompilePool(settings.jobs)
    futures: dict[Any, Any] = {"_pool": pool}
    db = open_tuning_db(settings.db)
    for case in cases:
        layout = case.layout()
        for kind in kinds:
            spec = triton_spec(case, layout, kind)
            try:
                tuned = tuned_config(db, case, spec, gpu)
                if tuned is not None:
                    TUNED[(case.tag, kind)] = tuned.to_dict()
                configs = candidates(tb, spec, gpu, settings.max_configs, tuned,
                                     wide_variants(settings.wide_from, case.tag, f"triton-{kind}"))
            except Exception as e:  # noqa: BLE001 - the in-process sweep will report it again if it persists
                say(f"  {case.tag} triton-{kind}: no candidates ({short(e)})")
                continue
            futures[(case.tag, kind)] = [
                (c.to_dict(), _waiter(pool.submit(job_for("triton", case, spec, c, gpu)))) for c in configs]
    if db is not None:
        db.close()
    n = sum(len(v) for key, v in futures.items() if key != "_pool")
    say(f"queued {n} Triton candidates for compilation")
    return futures


if __name__ == "__main__":
    sys.exit(main())
