"""End-to-end benchmark: one Infinity-shaped image (all scales, all layers, CFG batch 2, bf16) per backend.

    PYTHONPATH=. python3 bench/run.py [--models infinity-2b,infinity-8b] [--backends flash,cudnn,flex,module,none]
                                      [--plans sparvar,static] [--skip-last 0,2] [--reps 5] [--db tuning.sqlite]
                                      [--out FILE.json] [--merge] [--quick] [--plot-from FILE.json]

The model is :mod:`bench.infinity_model` (real Infinity-2B/8B shapes, random weights built on the GPU). Its
self-attention goes through a switch, one backend per run:

* ``flash``: SDPA restricted to FlashAttention-2 (the paper's baseline);
* ``cudnn``: SDPA with cuDNN first and FlashAttention as fallback (cuDNN refuses the key length 1 of scale 0);
* ``flex``: ``torch.compile``'d FlexAttention with the CSLA BlockMask (``csla_layout(plan, s, 128, 128)``) in the
  plan's CSLA layers, cuDNN SDPA in the others (flex has no CS4A); compile time is reported, not timed;
* ``module``: a runtime module emitted for the plan (``emit_module``), called as ``m.attention(q, k, v, s, l)``;
  its load + first call is measured in a fresh process (no compiler involved);
* ``none``: self-attention returns its queries without computing anything: the *bound* (the same model with
  self-attention taking no time; projections, KV cache appends, cross-attention and MLPs still run).

``flex`` and ``module`` run once per plan: ``sparvar`` (the default plan) and ``static`` (``bound_layer: 0``).
Every backend runs once per ``--skip-last`` value (``PlanConfig(skip_last=N)``: the last N scales' transformer
passes are skipped). Cross-attention always runs through FlashAttention-2 SDPA, so totals differ by
self-attention only.

Timing (GPU): the image is warmed up eagerly, then each scale's forward is captured in a CUDA graph (one memory
pool, replayed in order); the per-image total is the median over ``--reps`` images of CUDA-event time from the
first replay to the last, with per-scale totals beside it. Where capture fails (recorded as ``timing: eager``)
the eager forward is timed with events instead. Per-scale attention time: one CUDA graph per scale of that
scale's attention calls over all layers on random inputs of the real shapes (normalised q/k as the model makes
them), median of replays; per-image attention is their sum.

Writes ``bench/results/e2e-<card>.json`` (top-level ``"benchmark": "infinity-e2e"``; the attention-only
``module_e2e.py`` writes ``module-e2e-<card>.json``) and a PNG bar chart beside it. ``--quick`` runs a tiny
model (on the CPU too: ``flash``/``cudnn`` become plain SDPA, flex runs eagerly, the module in its CPU fallback)
and writes to the temp directory unless ``--out`` is given. ``--plot-from`` redraws the chart from a JSON file
(no GPU needed).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.infinity_model import Attention, InfinityConfig, InfinityGenerator, make_text  # noqa: E402
from sparvar_compiler.planner import PlanConfig, csla_layout, make_plan  # noqa: E402
from sparvar_compiler.planner.models import ModelSpec  # noqa: E402
from sparvar_compiler.planner.plan import Mode, Plan  # noqa: E402
from sparvar_compiler.planner.schedules import Schedule, parse_schedule  # noqa: E402

BENCHMARK = "infinity-e2e"
RESULTS = ROOT / "bench" / "results"
BACKENDS = ("flash", "cudnn", "flex", "module", "none")
PLAN_BACKENDS = ("flex", "module")  # one run per plan; the others do not depend on the plan
PLANS = {"sparvar": {}, "static": {"bound_layer": 0}}
PAPER = {"speedup_vs_flash": 1.57, "speedup_vs_flash_skip2": 2.28,
         "source": "SparVAR, Infinity-8B 1024^2: FA2 1.65 s -> 1.05 s; + skip 2: 0.72 s"}
TARGET_BOUND_FRACTION = 0.85
QUICK_GRIDS = "1,2,4,6,8,12,16"

COLD = r"""
import sys, time, json
t0 = time.perf_counter()
import torch
torch.cuda.init(); torch.zeros(1, device="cuda"); torch.cuda.synchronize()
t1 = time.perf_counter()
sys.path.insert(0, sys.argv[2])
import sparvar_compiler.runtime as rt
m = rt.load(sys.argv[1])
t2 = time.perf_counter()
rows = m.manifest["dispatch"]
kern = [r for r in rows if r["op"] == "kernel"]
r = max(kern, key=lambda r: r["scale"]) if kern else max((r for r in rows if r["op"] != "skip"),
                                                         key=lambda r: r["scale"])
tokens, kv = m._shape[r["scale"]]
q = torch.nn.functional.normalize(torch.randn(m.batch, m.heads, tokens, m.head_dim, device="cuda"), dim=-1) * 15
k = torch.nn.functional.normalize(torch.randn(m.batch, m.heads, kv, m.head_dim, device="cuda"), dim=-1)
q, k = q.to(m.dtype), k.to(m.dtype)
torch.cuda.synchronize()
t3 = time.perf_counter()
o = m.attention(q, k, k, r["scale"], r["layer"])
torch.cuda.synchronize()
t4 = time.perf_counter()
print(json.dumps({"torch_cuda_init_s": t1 - t0, "load_s": t2 - t1, "first_call_s": t4 - t3,
                  "load_plus_first_call_s": (t2 - t1) + (t4 - t3), "first_call_scale": r["scale"],
                  "first_call_op": r["op"], "finite": bool(torch.isfinite(o).all())}))
"""


def say(msg: str) -> None:
    print(msg, flush=True)


def short(e: BaseException, limit: int = 400) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " | ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One measured configuration: a backend, its plan (flex and module only) and the scales skipped."""

    backend: str
    plan: str | None
    skip: int

    @property
    def key(self) -> str:
        """Backend name as reported: ``flash``, ``module:sparvar``, ..."""
        return self.backend if self.plan is None else f"{self.backend}:{self.plan}"


def cases(backends: list[str], plans: list[str], skips: list[int]) -> list[Case]:
    """Baselines first (the flash run gives the reference image), then the bound, then ours and flex per plan."""
    order = [b for b in ("flash", "cudnn", "none") if b in backends]
    out = []
    for skip in skips:
        out += [Case(b, None, skip) for b in order]
        for p in plans:
            out += [Case(b, p, skip) for b in ("module", "flex") if b in backends]
    return out


def quick_model() -> ModelSpec:
    """A tiny Infinity-like model for smoke tests: 2 layers, 2 heads of 64, 7 scales (up to 16x16)."""
    grids = parse_schedule(QUICK_GRIDS, "quick schedule")
    return ModelSpec("tiny-infinity-e2e", "infinity", 2, 128, 2, 64, (Schedule(256, "1:1", grids),), 256)


def plan_for(model: str | ModelSpec, plan_name: str, skip: int) -> Plan:
    return make_plan(model, config=PlanConfig(skip_last=skip, **PLANS[plan_name]))


def model_config(model: str | ModelSpec, quick: bool) -> InfinityConfig:
    plan = make_plan(model)
    if quick:  # small text too: the quick model must run in seconds on a CPU
        return InfinityConfig.from_plan(plan, width=plan.heads * plan.head_dim, text_dim=64, text_len=16)
    return InfinityConfig.from_plan(plan)


# ---------------------------------------------------------------------------------------------- backends
def sdpa_attention(kind: str, device: torch.device) -> Attention:
    """Dense self-attention through SDPA: ``flash`` (FlashAttention-2 only) or ``cudnn`` (cuDNN, then flash).
    On a CPU (``--quick``) both are plain SDPA."""
    if device.type != "cuda":
        return lambda q, k, v, s, layer: F.scaled_dot_product_attention(q, k, v, scale=1.0)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {"flash": [SDPBackend.FLASH_ATTENTION],
             "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]}[kind]

    def attend(q, k, v, s, layer):
        with sdpa_kernel(order, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, scale=1.0)

    return attend


def cross_attention(device: torch.device) -> Callable[..., torch.Tensor]:
    """Cross-attention to the text, the same kernel for every backend (FlashAttention-2 on the GPU)."""
    if device.type != "cuda":
        return F.scaled_dot_product_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attend(q, k, v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION], set_priority=True):
            return F.scaled_dot_product_attention(q, k, v)

    return attend


def no_attention(q, k, v, scale_index, layer_index):
    """The bound: self-attention that takes no time (its output is its input queries)."""
    return q


_FLEX: dict[str, Any] = {}


def compiled_flex(compile: bool) -> Callable[..., torch.Tensor]:
    """``flex_attention``, compiled once per process (eager on a CPU: compiling there is a different product)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compile:
        return flex_attention
    if "fn" not in _FLEX:
        import torch._dynamo

        # One compiled graph per (shape, mask); the default limit (8) would silently fall back to eager flex.
        for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(256, getattr(torch._dynamo.config, knob)))
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


class FlexBackend:
    """FlexAttention with one BlockMask per CSLA scale in the plan's CSLA layers, dense SDPA elsewhere.

    Parameters
    ----------
    plan:
        The plan (which (scale, layer) pairs are CSLA).
    layouts:
        Block layout per CSLA scale (block level: every active block computed whole, as SparVAR does).
    device:
        Where the inputs live.
    dense:
        Self-attention for the other layers.
    compile:
        ``torch.compile`` flex (the GPU); eager flex otherwise.
    masks:
        BlockMasks to reuse, keyed by layout hash (one compile per mask: reuse keeps recompiles out).
    """

    def __init__(self, plan: Plan, layouts: dict[int, Any], device: torch.device, dense: Attention,
                 compile: bool, masks: dict[str, Any] | None = None):
        from sparvar_compiler.codegen.interop import to_block_mask

        self.plan, self.dense, self.compile = plan, dense, compile
        self.flex = compiled_flex(compile)
        masks = {} if masks is None else masks
        self.masks: dict[int, Any] = {}
        self.options: dict[int, dict[str, int] | None] = {}
        for s, layout in layouts.items():
            key = f"{layout.content_hash()}:{device}"
            if key not in masks:
                masks[key] = to_block_mask(layout, token_exact=False, device=device)
            self.masks[s] = masks[key]
            # Flex's kernel tile must divide the sparse block; its Hopper default is 128 queries.
            small = min(layout.block_m, layout.block_n) < 128
            self.options[s] = {"BLOCK_M": layout.block_m, "BLOCK_N": layout.block_n} if small else None
        self.csla = {(s.index, layer) for s in plan.scales for layer, m in enumerate(s.modes) if m == Mode.CSLA}

    def __call__(self, q, k, v, scale_index, layer_index):
        if (scale_index, layer_index) not in self.csla:
            return self.dense(q, k, v, scale_index, layer_index)
        return self.flex(q, k, v, block_mask=self.masks[scale_index], scale=1.0,
                         kernel_options=self.options[scale_index])

    def warm(self, config: InfinityConfig, device: torch.device, dtype: torch.dtype) -> float:
        """Call flex once per CSLA scale (compiling it); returns the seconds that took."""
        t0 = time.perf_counter()
        for s, (q, k, v) in attention_inputs(config, sorted(self.masks), device, dtype).items():
            self.flex(q, k, v, block_mask=self.masks[s], scale=1.0, kernel_options=self.options[s])
        sync(device)
        return time.perf_counter() - t0


def module_attention(module) -> Attention:
    def attend(q, k, v, scale_index, layer_index):
        return module.attention(q, k, v, scale_index, layer_index)

    return attend


# ---------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_inputs(config: InfinityConfig, scales, device, dtype, seed: int = 0):
    """Random (q, k, v) per scale with the model's shapes: q and k L2-normalised, q times 15 (a typical learned
    per-head scale), as the model makes them."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    out = {}
    B, H, D = config.batch, config.heads, config.head_dim
    for s in scales:
        n, kv = config.tokens[s], config.kv_lens[s]
        q = F.normalize(torch.randn(B, H, n, D, generator=gen, device=device), dim=-1) * 15.0
        k = F.normalize(torch.randn(B, H, kv, D, generator=gen, device=device), dim=-1)
        v = torch.randn(B, H, kv, D, generator=gen, device=device)
        out[s] = tuple(t.to(dtype).contiguous() for t in (q, k, v))
    return out


def _events(n: int):
    return [torch.cuda.Event(enable_timing=True) for _ in range(n)]


def time_steps(steps: list[Callable[[], None]], device: torch.device, reps: int, warmup: int = 2,
               graph: bool = True) -> dict[str, Any]:
    """Median ms of running ``steps`` in order (one image or one scale's attention calls), and per step.

    On the GPU, with ``graph``: warm up eagerly on a side stream, capture every step in its own CUDA graph (one
    shared memory pool, so tensors a step leaves behind are the next step's inputs) and time replays with CUDA
    events; if capture fails, time the eager steps with events. On a CPU: wall clock, eager.
    """
    rec: dict[str, Any] = {}
    if device.type != "cuda":
        for _ in range(min(warmup, 1)):  # no graphs or autotuning to settle on a CPU
            for st in steps:
                st()
        totals, per = [], [[] for _ in steps]
        for _ in range(reps):
            t0 = time.perf_counter()
            for i, st in enumerate(steps):
                a = time.perf_counter()
                st()
                per[i].append((time.perf_counter() - a) * 1e3)
            totals.append((time.perf_counter() - t0) * 1e3)
        rec.update(timing="wall-clock (cpu)", total_ms=statistics.median(totals),
                   step_ms=[statistics.median(p) for p in per])
        return rec
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            for st in steps:
                st()
    torch.cuda.current_stream(device).wait_stream(side)
    sync(device)
    runners: list[Callable[[], Any]] = steps
    rec["timing"] = "eager"
    graphs: list[torch.cuda.CUDAGraph] = []
    if graph:
        try:
            pool = torch.cuda.graph_pool_handle()
            for st in steps:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    st()
                graphs.append(g)
            runners = [g.replay for g in graphs]
            rec["timing"] = "cuda-graph"
        except Exception as e:  # noqa: BLE001 - some backends cannot be captured: time them eagerly
            rec["graph_error"] = short(e)
            graphs.clear()
            sync(device)
            say(f"    CUDA graph capture failed ({short(e, 160)}); timing eagerly")
    for r in runners:  # one untimed pass through the path that is timed
        r()
    sync(device)
    totals, per = [], [[] for _ in runners]
    for _ in range(reps):
        ev = _events(len(runners) + 1)
        ev[0].record()
        for i, r in enumerate(runners):
            r()
            ev[i + 1].record()
        torch.cuda.synchronize(device)
        totals.append(ev[0].elapsed_time(ev[-1]))
        for i in range(len(runners)):
            per[i].append(ev[i].elapsed_time(ev[i + 1]))
    rec.update(total_ms=statistics.median(totals), step_ms=[statistics.median(p) for p in per])
    rec["_graphs"] = graphs  # the caller drops them once it has read the outputs
    return rec


def time_image(model: InfinityGenerator, text: torch.Tensor, attn: Attention, cross, computed: int,
               device: torch.device, reps: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Per-image total (ms) and per-scale totals of ``computed`` scales; returns the record and the image."""
    holder: dict[str, Any] = {}

    def step(i: int) -> None:
        if i == 0:  # the text's keys/values are projected once per image, inside scale 0's step
            holder["state"] = model.begin_image(text)
        model.run_scale(holder["state"], attn, cross)

    steps = [lambda i=i: step(i) for i in range(computed)]
    with torch.no_grad():
        rec = time_steps(steps, device, reps)
    image = holder["state"].f_hat.detach().clone()
    rec.pop("_graphs", None)
    holder.clear()
    return {"total_ms_per_image": rec["total_ms"], "per_scale_total_ms": rec["step_ms"], "timing": rec["timing"],
            **({"graph_error": rec["graph_error"]} if "graph_error" in rec else {})}, image


def time_attention(attn: Attention, config: InfinityConfig, computed: int, device: torch.device,
                   dtype: torch.dtype, reps: int) -> dict[str, Any]:
    """Per-scale attention time (ms, all layers of the scale; one CUDA graph per scale) and their sum."""
    per, modes = [], set()
    with torch.no_grad():
        for s in range(computed):
            (q, k, v), = attention_inputs(config, [s], device, dtype, seed=s).values()

            def calls(q=q, k=k, v=v, s=s):
                for layer in range(config.depth):
                    attn(q, k, v, s, layer)

            rec = time_steps([calls], device, reps, warmup=1)
            per.append(rec["total_ms"])
            modes.add(rec["timing"])
            rec.pop("_graphs", None)
    return {"attention_ms_per_image": sum(per), "per_scale_attention_ms": per, "attention_timing": sorted(modes)}


def cold_start(module_dir: Path) -> dict[str, Any]:
    """Module load + first call in a fresh process (what a deployment pays at start-up)."""
    res = subprocess.run([sys.executable, "-c", COLD, str(module_dir), str(ROOT)], capture_output=True, text=True,
                         timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"cold start failed: {res.stderr.strip()[-800:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- one model
class ModelRun:
    """Every case of one model on one device: builds the weights once, emits modules, times each backend."""

    def __init__(self, args: argparse.Namespace, name: str, device: torch.device, target):
        self.args, self.device, self.target = args, device, target
        self.spec: str | ModelSpec = quick_model() if args.quick else name
        self.name = self.spec.name if isinstance(self.spec, ModelSpec) else name
        self.config = model_config(self.spec, args.quick)
        self.dtype = torch.bfloat16
        t0 = time.perf_counter()
        self.model = InfinityGenerator(self.config, device, self.dtype, seed=args.seed)
        self.text = make_text(self.config, device, self.dtype, seed=args.seed + 1)
        sync(device)
        self.build_s = time.perf_counter() - t0
        self.params = sum(p.numel() for p in self.model.parameters())
        self.cross = cross_attention(device)
        self.flex_masks: dict[str, Any] = {}
        self.images: dict[int, torch.Tensor] = {}
        self.db = None
        if args.db:
            from sparvar_compiler.db import TuningDatabase

            self.db = TuningDatabase.open(args.db, readonly=True)

    def info(self) -> dict[str, Any]:
        c = self.config
        return {"depth": c.depth, "width": c.width, "heads": c.heads, "head_dim": c.head_dim,
                "mlp_ratio": c.mlp_ratio, "text_len": c.text_len, "text_dim": c.text_dim, "batch": c.batch,
                "grids": [list(g) for g in c.grids], "kv_lens": list(c.kv_lens), "dtype": "bf16",
                "params": self.params, "weights_gb": round(self.params * 2 / 1e9, 2),
                "build_s": round(self.build_s, 2)}

    def attention_for(self, case: Case, plan: Plan, row: dict[str, Any]) -> tuple[Attention, Any]:
        """The attention switch of a case (and anything that must stay alive while it runs)."""
        dense = sdpa_attention("cudnn", self.device)
        if case.backend in ("flash", "cudnn"):
            row["kernel"] = f"sdpa-{case.backend}" if self.device.type == "cuda" else "sdpa (cpu stand-in)"
            return sdpa_attention(case.backend, self.device), None
        if case.backend == "none":
            return no_attention, None
        if case.backend == "flex":
            block = self.args.flex_block
            layouts = {s.index: csla_layout(plan, s.index, block, block) for s in plan.scales if s.has_csla}
            compile = self.device.type == "cuda"
            flex = FlexBackend(plan, layouts, self.device, dense, compile, self.flex_masks)
            row["flex_block"] = block
            row["flex_compiled"] = compile
            row["compile_s"] = round(flex.warm(self.config, self.device, self.dtype), 3)
            row["layout_sparsity"] = {str(s): round(lay.sparsity(), 4) for s, lay in layouts.items()}
            return flex, flex
        if case.backend == "module":
            return self._module(plan, row)
        raise ValueError(f"unknown backend {case.backend!r}")

    def _module(self, plan: Plan, row: dict[str, Any]):
        from sparvar_compiler.emit.emitter import emit_module
        import sparvar_compiler.runtime as rt

        out_dir = Path(tempfile.mkdtemp(prefix="sparvar-e2e-")) / f"{plan.model}-{self.target.name}"
        t0 = time.perf_counter()
        manifest = emit_module(plan, self.target, out_dir, db=self.db, progress=lambda s: None)
        row["emit_s"] = round(time.perf_counter() - t0, 2)
        row["module_dir"] = str(out_dir)
        row["tuned"] = manifest["tuned"]
        row["kernels"] = {n: {"scale": k["scale"], "block": [k["spec"]["block_m"], k["spec"]["block_n"]],
                              "kind": k["spec"].get("kind"), "tuned": k["tuned"],
                              "sparsity": round(k["sparsity"], 4)} for n, k in manifest["kernels"].items()}
        ops: dict[str, int] = {}
        for r in manifest["dispatch"]:
            ops[r["op"]] = ops.get(r["op"], 0) + 1
        row["dispatch_ops"] = ops
        if self.device.type == "cuda":
            row["cold"] = cold_start(out_dir)
            say(f"    module cold start: load + first call {row['cold']['load_plus_first_call_s']:.3f} s")
        t0 = time.perf_counter()
        module = rt.load(out_dir, device=self.device)
        row["load_in_process_s"] = round(time.perf_counter() - t0, 3)
        return module_attention(module), module

    def run_case(self, case: Case) -> dict[str, Any]:
        """Build the case's attention switch, time its attention alone and the whole image; one result row."""
        with torch.no_grad():  # flex compiles under the grad mode it later runs in: one compile, not two
            return self._run_case(case)

    def _run_case(self, case: Case) -> dict[str, Any]:
        plan = plan_for(self.spec, case.plan or "sparvar", case.skip)
        computed = plan.num_scales - case.skip
        row: dict[str, Any] = {"backend": case.backend, "plan": case.plan, "key": case.key,
                               "skip_scales": case.skip,
                               "skipped_scale_indices": list(range(computed, plan.num_scales))}
        if case.plan is not None:
            row["plan_modes"] = {str(s.index): s.modes_text() for s in plan.scales
                                 if s.index >= plan.config.decision_scale}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        attn, keep = self.attention_for(case, plan, row)
        reps = self.args.reps
        if case.backend == "none":
            row.update(attention_ms_per_image=0.0, per_scale_attention_ms=[0.0] * computed,
                       attention_timing=["not run: the bound"])
        else:
            row.update(time_attention(attn, self.config, computed, self.device, self.dtype, 2 * reps))
        rec, image = time_image(self.model, self.text, attn, self.cross, computed, self.device, reps)
        row.update(rec)
        row["image_finite"] = bool(torch.isfinite(image).all())
        if case.backend == "flash":
            self.images[case.skip] = image
        ref = self.images.get(case.skip)
        if ref is not None:
            row["image_rel_diff_vs_flash"] = float((image - ref).norm() / ref.norm().clamp_min(1e-30))
        if self.device.type == "cuda":
            row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 2)
        del attn, keep
        free_memory(self.device)
        return row


# ---------------------------------------------------------------------------------------------- summary
def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Speedups against both dense baselines and the bound arithmetic, per skip setting (adds fields to the
    rows in place). Bound: the FA2 image minus the same image with self-attention taking no time is the most any
    attention kernel can save; ``bound_fraction`` is the part of that saving a backend achieves."""
    ok = [r for r in runs if "total_ms_per_image" in r]
    base = {(r["skip_scales"], r["key"]): r for r in ok}
    flash0 = base.get((0, "flash"))
    out: dict[str, Any] = {}
    for skip in sorted({r["skip_scales"] for r in ok}):
        flash, cudnn, none = (base.get((skip, k)) for k in ("flash", "cudnn", "none"))
        s: dict[str, Any] = {}
        for r in (r for r in ok if r["skip_scales"] == skip):
            t, a = r["total_ms_per_image"], r["attention_ms_per_image"]
            if flash:
                r["speedup_vs_flash"] = flash["total_ms_per_image"] / t
                if a > 0:
                    r["attention_speedup_vs_flash"] = flash["attention_ms_per_image"] / a
            if cudnn:
                r["speedup_vs_cudnn"] = cudnn["total_ms_per_image"] / t
                if a > 0:
                    r["attention_speedup_vs_cudnn"] = cudnn["attention_ms_per_image"] / a
            if flash0 and skip:
                r["speedup_vs_flash_no_skip"] = flash0["total_ms_per_image"] / t
            if flash and none and flash["total_ms_per_image"] > none["total_ms_per_image"]:
                allowed = flash["total_ms_per_image"] - none["total_ms_per_image"]
                r["bound_fraction"] = (flash["total_ms_per_image"] - t) / allowed
        if flash and none:
            f, n = flash["total_ms_per_image"], none["total_ms_per_image"]
            share = (f - n) / f
            paper = PAPER["speedup_vs_flash"] if skip == 0 else None
            s.update(flash_total_ms=f, bound_total_ms=n, self_attention_share_of_flash_total=share,
                     max_speedup_vs_flash=f / n, saving_allowed_ms=f - n)
            need = 1 - 1 / PAPER["speedup_vs_flash"]
            s["arithmetic"] = (
                f"FA2 image {f:.1f} ms, same image with free self-attention {n:.1f} ms: self-attention is "
                f"{100 * share:.1f}% of the FA2 image, so no attention kernel can beat {f / n:.2f}x end to end "
                f"(the paper's {PAPER['speedup_vs_flash']}x needs a share >= {100 * need:.1f}%, if sparse "
                f"attention were free).")
            if paper is not None:
                s["paper_speedup_vs_flash"] = paper
                s["paper_speedup_within_bound"] = f / n >= paper
            if skip and flash0:
                s["max_speedup_vs_flash_no_skip"] = flash0["total_ms_per_image"] / n
                s["paper_speedup_vs_flash_no_skip"] = PAPER["speedup_vs_flash_skip2"] if skip == 2 else None
        if cudnn:
            s["cudnn_total_ms"] = cudnn["total_ms_per_image"]
        ours = {}
        for r in (r for r in ok if r["skip_scales"] == skip and r["backend"] == "module"):
            flex = base.get((skip, f"flex:{r['plan']}"))
            ours[r["key"]] = {k: r.get(k) for k in ("total_ms_per_image", "attention_ms_per_image",
                                                     "speedup_vs_flash", "speedup_vs_cudnn", "bound_fraction",
                                                     "speedup_vs_flash_no_skip")}
            if "bound_fraction" in r:
                ours[r["key"]]["meets_bound_target"] = r["bound_fraction"] >= TARGET_BOUND_FRACTION
            if flex:
                ours[r["key"]]["speedup_vs_flex_same_plan"] = flex["total_ms_per_image"] / r["total_ms_per_image"]
        s["module"] = ours
        out[f"skip{skip}"] = s
    return out


def print_table(name: str, runs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    say("")
    say(f"{name}: per image (ms)")
    say(f"{'backend':<16} {'skip':>4} {'attention':>10} {'total':>9} {'x FA2':>6} {'x cuDNN':>7} {'of bound':>8} "
        f"{'timing':<11} note")

    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    for r in runs:
        if "total_ms_per_image" not in r:
            say(f"{r['key']:<16} {r['skip_scales']:>4}  error: {r.get('error', '?')[:80]}")
            continue
        note = ""
        if "compile_s" in r:
            note = f"compile {r['compile_s']:.1f} s"
        if "cold" in r:
            note = f"cold load+first call {r['cold']['load_plus_first_call_s']:.3f} s"
        frac = r.get("bound_fraction")
        say(f"{r['key']:<16} {r['skip_scales']:>4} {fmt(r['attention_ms_per_image'], '10.2f')} "
            f"{fmt(r['total_ms_per_image'], '9.1f')} {fmt(r.get('speedup_vs_flash'), '6.2f')} "
            f"{fmt(r.get('speedup_vs_cudnn'), '7.2f')} {fmt(None if frac is None else 100 * frac, '7.0f')}"
            f"{'%' if frac is not None else ' '} {r['timing']:<11} {note}")
    for k, s in summary.items():
        if "arithmetic" in s:
            say(f"[{k}] {s['arithmetic']}")


# ---------------------------------------------------------------------------------------------- chart
def write_chart(result: dict[str, Any], path: Path) -> Path | None:
    """Bars: per-image total per backend (attention part darker), one panel per model, one group per skip
    setting; the bound (free self-attention) as a dashed line; speedup over FA2 above each bar."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        say(f"chart skipped ({short(e)}); redraw later with: python bench/run.py --plot-from JSON")
        return None
    models = [(n, m) for n, m in result.get("models", {}).items() if m.get("runs")]
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(7.5 * len(models), 4.8), dpi=110, squeeze=False)
    colors = {"flash": "#7f7f7f", "cudnn": "#bcbd22", "flex": "#1f77b4", "module": "#d62728", "none": "#2ca02c"}
    for ax, (name, m) in zip(axes[0], models):
        runs = [r for r in m["runs"] if "total_ms_per_image" in r and r["backend"] != "none"]
        keys = list(dict.fromkeys(r["key"] for r in runs))
        skips = sorted({r["skip_scales"] for r in runs})
        width = 0.8 / max(1, len(keys))
        for gi, skip in enumerate(skips):
            for ki, key in enumerate(keys):
                r = next((r for r in runs if r["key"] == key and r["skip_scales"] == skip), None)
                if r is None:
                    continue
                x = gi + (ki - (len(keys) - 1) / 2) * width
                ax.bar(x, r["total_ms_per_image"], width * 0.92, color=colors.get(r["backend"], "#999999"),
                       alpha=0.45 if r["plan"] == "static" else 0.75, label=key if gi == 0 else None)
                ax.bar(x, r["attention_ms_per_image"], width * 0.92, color="black", alpha=0.25)
                sp = r.get("speedup_vs_flash")
                if sp:
                    ax.text(x, r["total_ms_per_image"], f"{sp:.2f}x", ha="center", va="bottom", fontsize=7)
            bound = m.get("summary", {}).get(f"skip{skip}", {}).get("bound_total_ms")
            if bound:
                ax.hlines(bound, gi - 0.45, gi + 0.45, colors="#2ca02c", linestyles="dashed",
                          label="bound (free self-attention)" if gi == 0 else None)
        ax.set_xticks(range(len(skips)))
        ax.set_xticklabels([f"skip last {s}" if s else "all scales" for s in skips])
        ax.set_ylabel("ms per image (dark: self-attention alone)")
        last = "x".join(str(g) for g in m["grids"][-1]) if m.get("grids") else "?"
        ax.set_title(f"{name}: one image ({len(m.get('grids', []))} scales up to {last}), CFG batch 2, bf16",
                     fontsize=10)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"End-to-end per image on {result.get('card', '?')} (x = speedup over FlashAttention-2)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- main
def environment(device: torch.device) -> dict[str, Any]:
    """Card, versions and clocks (the GPU part is bench/kernels.py's, so both benchmarks record the same)."""
    if device.type == "cuda":
        from bench.kernels import environment as gpu_environment

        return gpu_environment(device)
    return {"card": "cpu", "card_slug": "cpu", "registry_gpu": None, "host": platform.node(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="infinity-2b,infinity-8b")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--plans", default=",".join(PLANS))
    p.add_argument("--skip-last", default="0,2", help="comma-separated numbers of last scales to skip")
    p.add_argument("--reps", type=int, default=None, help="timed images per case (default 5; --quick 2)")
    p.add_argument("--db", help="tuning database for the emitted modules (default: untuned configs)")
    p.add_argument("--flex-block", type=int, default=128, help="FlexAttention layout block (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/e2e-<card>.json)")
    p.add_argument("--merge", action="store_true",
                   help="add this run's models to an existing infinity-e2e JSON of the same card")
    p.add_argument("--quick", action="store_true", help="a tiny model (runs on a CPU too): a smoke test")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--keep-compile-caches", action="store_true",
                   help="use the usual Inductor/Triton caches (default: fresh ones, so flex's compile is cold)")
    p.add_argument("--plot-from", type=Path, metavar="JSON", help="only redraw the chart of a results file")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.plans = [x.strip() for x in args.plans.split(",") if x.strip()]
    args.skip_last = [int(x) for x in args.skip_last.split(",") if x.strip()]
    for what, got, known in (("backend", args.backends, BACKENDS), ("plan", args.plans, tuple(PLANS))):
        bad = sorted(set(got) - set(known))
        if bad:
            p.error(f"unknown {what} {bad[0]!r} (known: {', '.join(known)})")
    if args.reps is None:
        args.reps = 2 if args.quick else 5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_from:
        result = json.loads(args.plot_from.read_text())
        png = args.out or args.plot_from.with_suffix(".png")
        made = write_chart(result, png)
        say(f"wrote {made}" if made else "no chart written")
        return 0 if made else 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.quick:
        say("no GPU: the full-size benchmark needs one (use --quick for a CPU smoke test)")
        return 2
    if not args.keep_compile_caches:
        # Fresh compile caches: flex's reported compile time is a cold start, as a new deployment sees it.
        cache = Path(tempfile.mkdtemp(prefix="sparvar-e2e-cache-"))
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
        os.environ["TRITON_CACHE_DIR"] = str(cache / "triton")
    from sparvar_compiler.planner.gpus import get_gpu, gpu_from_device_name

    env = environment(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        target = gpu_from_device_name(props.name, props.multi_processor_count)
        if target is None and "module" in args.backends:
            say(f"{props.name} is not in the GPU registry: the module backend cannot be emitted for it")
            return 2
        card = env["card_slug"]
    else:
        target, card = get_gpu("h100"), "cpu"  # the CPU fallback ignores the cubins' target
    out = args.out or (Path(tempfile.gettempdir()) / f"e2e-{card}-quick.json" if args.quick
                       else RESULTS / f"e2e-{card}.json")
    result: dict[str, Any] = {
        "benchmark": BENCHMARK, "card": env["card"], "card_slug": card, "versions": env["versions"],
        "environment": env,
        "settings": {"reps": args.reps, "flex_block": args.flex_block, "seed": args.seed, "quick": args.quick,
                     "db": args.db, "compile_caches": "kept" if args.keep_compile_caches else "fresh",
                     "cross_attention": "FlashAttention-2 SDPA for every backend"},
        "paper": PAPER, "target_bound_fraction": TARGET_BOUND_FRACTION, "models": {}}
    if args.merge and out.is_file():
        old = json.loads(out.read_text())
        if old.get("benchmark") == BENCHMARK and old.get("card") == env["card"]:
            result["models"].update(old.get("models", {}))
    failures = 0
    models = args.models[:1] if args.quick else args.models
    for name in models:
        run = ModelRun(args, name, device, target)
        say(f"== {run.name} on {env['card']}")
        say(f"  weights: {run.params / 1e9:.2f} B parameters built in {run.build_s:.1f} s")
        runs = []
        for case in cases(args.backends, args.plans, args.skip_last):
            say(f"  {case.key} skip {case.skip}")
            try:
                row = run.run_case(case)
                say(f"    attention {row['attention_ms_per_image']:.2f} ms, total {row['total_ms_per_image']:.1f} "
                    f"ms per image ({row['timing']})")
            except Exception as e:  # noqa: BLE001 - one broken backend must not lose the others' numbers
                failures += 1
                say(f"    FAILED: {short(e)}")
                traceback.print_exc()
                row = {"backend": case.backend, "plan": case.plan, "key": case.key, "skip_scales": case.skip,
                       "error": short(e, 2000)}
                free_memory(device)
            runs.append(row)
        summary = summarize(runs)
        result["models"][run.name] = {**run.info(), "runs": runs, "summary": summary}
        print_table(run.name, runs, summary)
        del run
        free_memory(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    say(f"wrote {out}")
    png = write_chart(result, out.with_suffix(".png"))
    if png:
        say(f"wrote {png}")
    return 1 if failures else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
