"""One image through FoundationVision/Infinity's own model code, unpatched and patched by our integration.

A user's Infinity checkout runs with and without ``sparvar_compiler.integrations.infinity``, several variants
interleaved in one run.

    python bench/real_infinity.py --infinity DIR --module MODULE_DIR [--model infinity-8b] [--images 5]
        [--warmup 1] [--variants default,patched,patched+graphs,bound] [--compile] [--no-check] [--out FILE]
        [--tiny] [--device cuda|cpu] [--seed 0] [--text-tokens 64] [--h-div-w 1.0] [--bf16 0|1] [--fused-norm 0|1]

``DIR`` is a work tree of https://github.com/FoundationVision/Infinity (never committed here; only its
``infinity/`` package is imported). The model is built as ``tools/run_infinity.py``'s ``load_infinity`` builds it
(``shared_aln``, ``fused_norm``, ``pad_to_multiplier=128``, bit labels, ``rope2d_normalized_by_hw=2``,
``inference_mode``, blocks cast to bf16 with ``--bf16 1``) with the real shapes (Infinity-8B: depth 40, width
3584, 28 heads, 8 block chunks, 14-bit tokenizer with spatial patchify; Infinity-2B: 32 / 2048 / 16 / 8, 32 bits),
but random weights (no checkpoint: seeded, std 0.02, see :func:`randomize`) and random T5-shaped text (Flan-T5-XL:
2048 channels, ``--text-tokens`` tokens). One image = ``autoregressive_infer_cfg`` at 1M pixels with ``h_div_w``
from Infinity's own ``dynamic_resolution_h_w`` table (1.0: 13 scales up to 64x64), CFG 3 (batch 2), top-k 900,
top-p 0.97, CFG on the logits (``cfg_insertion_layer=[0]``), under ``torch.autocast(dtype=bfloat16)``; the image
is not decoded (``ret_img=False``: the tokenizer is a stand-in).

Stand-ins, each recorded in the JSON (``standins``): ``flash_attn`` where it is not installed (SDPA under its
names: Infinity's cross-attention calls ``flash_attn_varlen_kvpacked_func``), ``timm`` and ``pytz`` where missing,
and always the tokenizer (``bench/infinity_stubs.py``).

Variants (``--variants``; ``--compile`` adds ``patched+compile``):

* ``default``: Infinity's own path, unpatched (self-attention through ``slow_attn`` = SDPA).
* ``patched``: ``sv.apply(model, module)``; ``patched+graphs``: ``sv.apply(model, module, graphs=True)``.
* ``patched+compile``: ``sv.apply(model, module)`` then ``block.compile(mode="reduce-overhead")`` on every block.
* ``bound``: self-attention free: every block's ``sa`` gets ``use_flex_attn = True`` and an ``attn_fn`` that
  returns a preallocated tensor of the output's shape (the hook the integration uses), so the rest of the model
  (projections, RoPE, KV-cache appends, cross-attention, MLPs, sampling) is identical.

Timing: ``--images`` rounds; in each round every variant (order rotated per round) is set up, runs ``--warmup``
untimed images (graph capture, compilation), then one timed image (wall clock between device syncs), then is
removed. ``patched+graphs`` warms up until an image captures nothing new (its first image runs eagerly, the
second captures), so its timed image is all replays. Reported: every image's ms, the median per variant, its
ratio to ``default`` and the share of the attention-free saving it reaches (``of_bound``); setup + warm-up
seconds and the integration's graph counters are kept apart.

Check (unless ``--no-check``): can the patched model's outputs be told apart from the unpatched model's where the
module's plan keeps attention dense? One seeded ``default`` image records the bit labels of every scale; then
each variant, plus ``fp32`` (self-attention in float32 through the same hook: the golden), generates the same
image teacher-forced on those labels (Infinity's ``gt_leak``), so every scale sees the same input in every
variant (``patched+graphs`` / ``patched+compile`` warmed up first, so the checked image replays graphs / runs
compiled code). Per scale: the logits' relative L2 error against ``fp32`` and the share of sampled bits equal to
``default``'s (same seed). A variant passes where, at every dense scale (every layer ``dense`` or ``decision`` in
the plan), its error is at most ``CHECK_FACTOR`` x the unpatched model's own error against ``fp32`` (floor
``CHECK_FLOOR``). ``bound`` (zeros for attention) runs through the same check as the negative control: the check
is reported ``sensitive`` only if ``bound`` fails it. Exit status 1 if a variant failed to run or a patched
variant failed the check.

JSON: ``{"benchmark": "real-infinity", "card", "card_slug", "versions", "environment", "infinity": {"dir",
"commit", "sha256_16"}, "standins": {name: what}, "models": {name: {"shape", "settings", "module": {"path",
"load_error", "plan" (per scale: grid, tokens, kv_len, count of layers per mode), "dense_scales", "mismatch"},
"variants", "skipped", "images_ms": {variant: [ms, ...]}, "setup_plus_warmup_s", "graph_counts", "errors",
"summary": {variant: {"median_ms", "min_ms", "max_ms", "images", "x_default", "of_bound"}}, "check": {"variants":
{variant: {"logits_rel_l2_vs_fp32": [per scale], "bits_equal_to_default": [...], "worst_dense_ratio", "pass"}},
"dense_scales", "sensitive", ...}, "target_ms"}}}``.

Writes ``bench/results/real-infinity-<card>.json`` (``--tiny``: the temp directory), merging other models'
entries of the same card, and prints a short table. ``--tiny`` builds a 4-layer model (width 256, 2 heads of 128,
2 block chunks, 16-bit tokenizer, 0.06M schedule: 7 scales up to 16x16, 16 text tokens) that runs on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import infinity_stubs  # noqa: E402

BENCHMARK = "real-infinity"
RESULTS = ROOT / "bench" / "results"
VARIANTS = ("default", "patched", "patched+graphs", "bound")
ALL_VARIANTS = VARIANTS + ("patched+compile", "bound+graphs")
MODULE_VARIANTS = ("patched", "patched+graphs", "patched+compile")
CHECK_FACTOR = 4.0
CHECK_FLOOR = 1e-3
DENSE_MODES = {"dense", "decision"}


@dataclass(frozen=True)
class Preset:
    """A model as ``tools/run_infinity.py`` builds it (``kwargs_model``) plus its tokenizer and sampling."""

    name: str
    depth: int
    embed_dim: int
    num_heads: int
    block_chunks: int
    vae_type: int               # bits per tokenizer token
    apply_spatial_patchify: int  # 1: a transformer token is 2x2 tokenizer tokens (8B)
    tau: float                  # the public notebooks' temperature
    pn: str = "1M"
    text_tokens: int = 64
    target_ms: float | None = None


PRESETS = {
    "infinity-8b": Preset("infinity-8b", 40, 3584, 28, 8, 14, 1, 1.0, target_ms=900.0),
    "infinity-2b": Preset("infinity-2b", 32, 2048, 16, 8, 32, 0, 0.5),
    "tiny": Preset("tiny", 4, 256, 2, 2, 16, 0, 1.0, pn="0.06M", text_tokens=16),
}
TEXT_CHANNELS = 2048  # Flan-T5-XL
CFG, TOP_K, TOP_P = 3.0, 900, 0.97


def say(msg: str) -> None:
    print(msg, flush=True)


def short(e: BaseException, limit: int = 400) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " | ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- Infinity
def import_infinity(infinity_dir: Path) -> tuple[dict[str, str], Any, Any]:
    """Install the stand-ins Infinity's imports need, then import its model module and resolution table."""
    if not (infinity_dir / "infinity" / "models" / "infinity.py").is_file():
        raise SystemExit(f"{infinity_dir}: not an Infinity work tree (no infinity/models/infinity.py)")
    standins = infinity_stubs.install()
    if str(infinity_dir) not in sys.path:
        sys.path.insert(0, str(infinity_dir))
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.cuda.amp.autocast in every block call
    import infinity.models.infinity as inf_model
    from infinity.utils.dynamic_resolution import dynamic_resolution_h_w

    return standins, inf_model, dynamic_resolution_h_w


def infinity_source(infinity_dir: Path) -> dict[str, Any]:
    """Which Infinity code ran: the work tree's commit (if it is a git work tree) and the model files' hashes."""
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "-C", str(infinity_dir), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        commit = out.stdout.strip() or None if out.returncode == 0 else None
    files = {}
    for rel in ("infinity/models/infinity.py", "infinity/models/basic.py", "infinity/utils/dynamic_resolution.py"):
        p = infinity_dir / rel
        if p.is_file():
            files[rel] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return {"dir": str(infinity_dir), "commit": commit, "sha256_16": files}


@contextlib.contextmanager
def _generator_safe_trunc_normal() -> Iterator[None]:
    """Built on the GPU, Infinity's one CPU-generator draw (``cfg_uncond``) would fail; :func:`randomize`
    redraws every parameter anyway, so that draw drops its generator."""
    orig = torch.nn.init.trunc_normal_

    def trunc_normal_(tensor, *args, generator=None, **kw):
        if generator is not None and generator.device != tensor.device:
            generator = None
        return orig(tensor, *args, generator=generator, **kw)

    torch.nn.init.trunc_normal_ = trunc_normal_
    try:
        yield
    finally:
        torch.nn.init.trunc_normal_ = orig


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int, depth: int) -> None:
    """Seeded random weights on the model's device, in ``named_parameters`` order: std 0.02 (the output
    projections ``proj``/``fc2`` of each block std 0.02/sqrt(2 depth), so 2 x depth residual branches keep the
    stream O(1)), norms' weights 1 and biases 0, per-head query scales ``exp(scale_mul_1H11)`` in 5..20 (Infinity
    initialises 4 and clamps at 100)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out_std = 0.02 / math.sqrt(2 * depth)
    norms = (torch.nn.LayerNorm,)
    norm_params = {f"{n}.{p}" for n, m in model.named_modules() for p, _ in m.named_parameters(recurse=False)
                   if isinstance(m, norms) or type(m).__name__ == "FastRMSNorm"}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        draw = torch.empty(p.shape, device=device, dtype=torch.float32)
        if leaf == "scale_mul_1H11":
            draw.uniform_(math.log(5.0), math.log(20.0), generator=gen)
        elif name in norm_params:
            draw.fill_(1.0 if leaf == "weight" else 0.0)
        else:
            std = out_std if name.endswith(("sa.proj.weight", "ca.proj.weight", "ffn.fc2.weight")) else 0.02
            draw.normal_(0.0, std, generator=gen)
        p.copy_(draw.to(p.dtype))


def build_model(inf_model, preset: Preset, vae, device: torch.device, seed: int, bf16: bool, fused_norm: bool):
    """``tools/run_infinity.py``'s ``load_infinity`` without the checkpoint, built directly on ``device``."""
    kwargs_model = dict(depth=preset.depth, embed_dim=preset.embed_dim, num_heads=preset.num_heads,
                        drop_path_rate=0.1, mlp_ratio=4, block_chunks=preset.block_chunks)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast, torch.no_grad(), torch.device(device), _generator_safe_trunc_normal():
        model = inf_model.Infinity(
            vae_local=vae, text_channels=TEXT_CHANNELS, text_maxlen=512, shared_aln=True, raw_scale_schedule=None,
            checkpointing="full-block", customized_flash_attn=False, fused_norm=fused_norm, pad_to_multiplier=128,
            use_flex_attn=False, add_lvl_embeding_only_first_block=1, use_bit_label=1, rope2d_each_sa_layer=1,
            rope2d_normalized_by_hw=2, pn=preset.pn, apply_spatial_patchify=preset.apply_spatial_patchify,
            inference_mode=True, train_h_div_w_list=[1.0], **kwargs_model)
    model = model.to(device)
    randomize(model, seed, preset.depth)
    if bf16:
        for block in model.unregistered_blocks:
            block.bfloat16()
    model.eval()
    model.requires_grad_(False)
    model.rng = torch.Generator(device=device)
    return model


def make_text(tokens: int, device: torch.device, seed: int):
    """Random T5-shaped text as ``encode_prompt`` packs it: ``(kv_compact [tokens, 2048] float32, lens,
    cu_seqlens_k int32, max_len)``."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 7)
    kv_compact = torch.randn(tokens, TEXT_CHANNELS, generator=gen).mul_(0.2).to(device)
    cu = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    return kv_compact, [tokens], cu, tokens


# ---------------------------------------------------------------------------------------------- hooks
@contextlib.contextmanager
def attn_fn_hook(model, attn_fn: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Route every block's self-attention through ``attn_fn(q, k, v, scale=...)`` via Infinity's own
    ``use_flex_attn`` branch of ``SelfAttention.forward``: each block's forward gets ``attn_fn`` in place of the
    ``None`` the generation loop passes. Undone on exit."""
    saved = []
    for blk in model.unregistered_blocks:
        prev = blk.__dict__.get("forward")
        orig = blk.forward

        def forward(*args, _orig=orig, **kw):
            if len(args) > 4:  # MultipleLayers.forward passes attn_fn positionally
                args = args[:4] + (attn_fn,) + args[5:]
            else:
                kw["attn_fn"] = attn_fn
            return _orig(*args, **kw)

        saved.append((blk, prev, blk.sa.use_flex_attn))
        blk.forward = forward
        blk.sa.use_flex_attn = True
    try:
        yield
    finally:
        for blk, prev, flex in saved:
            if prev is None:
                del blk.forward
            else:
                blk.forward = prev
            blk.sa.use_flex_attn = flex


class FreeAttention:
    """The bound's ``attn_fn``: returns a preallocated zero tensor of the output's shape ``[B, H, Lq, D]`` (one per
    shape, shared by all layers); computes nothing."""

    def __init__(self):
        self.out: dict[tuple, torch.Tensor] = {}

    def __call__(self, q, k, v, scale=None):
        key = (tuple(q.shape), v.dtype, q.device)
        out = self.out.get(key)
        if out is None:
            out = self.out[key] = torch.zeros(q.shape, dtype=v.dtype, device=q.device)
        return out


def fp32_attention(q, k, v, scale=None):
    """The check's golden: the same attention in float32 (autocast off), returned in v's dtype."""
    with torch.autocast(q.device.type, enabled=False):
        out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    return out.to(v.dtype)


# ---------------------------------------------------------------------------------------------- module plan
def read_manifests(module_path: Path | None, loaded: Any = None) -> list[dict[str, Any]]:
    """The manifests of a module or module set: from the loaded object (a set iterates over its members), else
    every ``manifest.json`` under the directory."""
    if loaded is not None and not isinstance(loaded, (str, Path)):
        members = list(loaded) if hasattr(loaded, "member_for") else [loaded]
        return [m.manifest for m in members]
    if module_path is None or not module_path.exists():
        return []
    found = []
    for mf in sorted(module_path.rglob("manifest.json")):
        with contextlib.suppress(OSError, ValueError):
            found.append(json.loads(mf.read_text()))
    return found


def plan_for(manifests: list[dict[str, Any]], grids: list[tuple[int, int]], preset: Preset) -> dict[str, Any]:
    """The plan (of the member) for this schedule: its summary, the dense scales, and why it does not fit."""
    info: dict[str, Any] = {"plan": None, "dense_scales": None, "mismatch": None, "members": len(manifests)}
    if not manifests:
        info["mismatch"] = "no module manifest found"
        return info
    want = [list(g) for g in grids]
    for man in manifests:
        plan = man.get("plan", {})
        if [list(g) for g in plan.get("grids", [])] != want:
            continue
        model = man.get("model", {})
        shape = (model.get("depth"), model.get("heads"), model.get("head_dim"))
        have = (preset.depth, preset.num_heads, preset.embed_dim // preset.num_heads)
        scales = plan.get("scales", [])
        info.update({
            "model": model.get("name"), "batch": man.get("batch"), "dtype": man.get("dtype"),
            "target": (man.get("target") or {}).get("name"), "tuned": man.get("tuned"),
            "plan": {"model": plan.get("model"), "resolution": plan.get("resolution"), "aspect": plan.get("aspect"),
                     "grids": plan.get("grids"), "config": plan.get("config"),
                     "scales": [{"index": s["index"], "h": s["h"], "w": s["w"], "tokens": s["tokens"],
                                 "kv_len": s["kv_len"],
                                 "modes": {m: s["modes"].count(m) for m in sorted(set(s["modes"]))}}
                                for s in scales]},
            "dense_scales": [s["index"] for s in scales if set(s["modes"]) <= DENSE_MODES]})
        if shape != have:
            info["mismatch"] = f"module is for depth/heads/head_dim {shape}, the model has {have}"
        return info
    info["mismatch"] = (f"no member plans this schedule's grids {grids} (found: "
                        f"{[m.get('plan', {}).get('grids') for m in manifests]})")
    return info


# ---------------------------------------------------------------------------------------------- runs
class Bench:
    """One model, its text, its variants and their image runs."""

    def __init__(self, args: argparse.Namespace, preset: Preset, inf_model, table, device: torch.device):
        self.args, self.preset, self.inf_model, self.device = args, preset, inf_model, device
        self.vae = infinity_stubs.StandInBSQVAE(preset.vae_type).to(device)
        t0 = time.perf_counter()
        self.model = build_model(inf_model, preset, self.vae, device, args.seed, args.bf16, args.fused_norm)
        sync(device)
        self.build_s = time.perf_counter() - t0
        self.params = sum(p.numel() for p in self.model.parameters())
        h_div_w = float(args.h_div_w)
        templates = sorted(table)
        self.h_div_w = min(templates, key=lambda t: abs(t - h_div_w))
        self.schedule = [(1, h, w) for _, h, w in table[self.h_div_w][preset.pn]["scales"]]
        self.grids = [(h, w) for _, h, w in self.schedule]
        self.text = make_text(args.text_tokens or preset.text_tokens, device, args.seed)
        self.module_path = Path(args.module).resolve() if args.module else None
        self._module = None
        self._sv = None
        self.handle = None
        self.graph_stats: dict[str, list[dict[str, int]]] = {}
        load_error = None
        if self.module_path is not None:
            try:
                self.module()
            except Exception as e:  # noqa: BLE001 - reported; the variants without a module still run
                load_error = short(e, 2000)
        self.module_info = {"path": str(self.module_path) if self.module_path else None, "load_error": load_error,
                            **plan_for(read_manifests(self.module_path, self._module), self.grids, preset)}

    # -- variants
    def sv(self):
        if self._sv is None:
            from sparvar_compiler.integrations import infinity as sv

            self._sv = sv
        return self._sv

    def module(self):
        """The module (or module set), loaded once (``sparvar_compiler.runtime.load``) on the model's device."""
        if self._module is None:
            if self.module_path is None:
                raise RuntimeError("no --module given: the patched variants need one")
            from sparvar_compiler import runtime

            self._module = runtime.load(self.module_path, device=self.device)
        return self._module

    @contextlib.contextmanager
    def variant(self, name: str) -> Iterator[None]:
        """Set the model up as variant ``name`` for the duration (and undo it exactly)."""
        if name == "default":
            yield
        elif name == "bound":
            with attn_fn_hook(self.model, FreeAttention()):
                yield
        elif name == "fp32":
            with attn_fn_hook(self.model, fp32_attention):
                yield
        elif name == "bound+graphs":
            # The graphs of patched+graphs with attention taking no time: the floor that variant can reach.
            sv, module = self.sv(), self.module()
            self.handle = sv.apply(self.model, module, graphs=True)
            free = FreeAttention()

            class FreeLayer(sv.LayerAttention):
                def __call__(self, q, k, v, scale=None, **unused):
                    return free(q, k, v, scale)

            for a in self.handle.attention:
                a.__class__ = FreeLayer
            try:
                yield
            finally:
                sv.remove(self.model)
                self.handle = None
        elif name in MODULE_VARIANTS:
            sv, module = self.sv(), self.module()
            self.handle = sv.apply(self.model, module, graphs=name == "patched+graphs")
            compiled = []
            try:
                if name == "patched+compile":
                    for blk in self.model.unregistered_blocks:
                        blk.compile(mode="reduce-overhead")
                        compiled.append(blk)
                yield
            finally:
                for blk in compiled:
                    blk._compiled_call_impl = None
                sv.remove(self.model)
                self.handle = None
        else:
            raise ValueError(f"unknown variant {name!r}")

    def generate(self, seed: int, teacher: list[torch.Tensor] | None = None) -> None:
        """One image: ``autoregressive_infer_cfg`` as ``tools/run_infinity.py``'s ``gen_one_img`` calls it (B=1,
        CFG 3 on the logits, top-k 900, top-p 0.97), not decoded; ``teacher``: force every scale's bit labels."""
        n = len(self.schedule)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=True):
            self.model.autoregressive_infer_cfg(
                vae=self.vae, scale_schedule=self.schedule, label_B_or_BLT=self.text, g_seed=seed, B=1,
                negative_label_B_or_BLT=None, force_gt_Bhw=None, cfg_sc=3, cfg_list=[CFG] * n,
                tau_list=[self.preset.tau] * n, top_k=TOP_K, top_p=TOP_P, returns_vemb=1, ratio_Bl1=None, gumbel=0,
                norm_cfg=False, cfg_exp_k=0.0, cfg_insertion_layer=[0], vae_type=self.preset.vae_type,
                softmax_merge_topk=-1, ret_img=False, trunk_scale=1000,
                gt_leak=n if teacher is not None else -1, gt_ls_Bl=teacher, inference_mode=True,
                sampling_per_bits=1)

    def timed_image(self, seed: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        self.generate(seed)
        sync(self.device)
        return (time.perf_counter() - t0) * 1e3

    # -- timing
    def time_variants(self, variants: list[str]) -> dict[str, Any]:
        images: dict[str, list[float]] = {v: [] for v in variants}
        setup: dict[str, list[float]] = {v: [] for v in variants}
        errors: dict[str, str] = {}
        for r in range(self.args.images):
            live = [v for v in variants if v not in errors]
            order = live[r % len(live):] + live[:r % len(live)] if live else []
            for v in order:
                seed = self.args.seed + 1000 + r
                try:
                    t0 = time.perf_counter()
                    with self.variant(v):
                        self.warm_up(v, seed)
                        setup[v].append(time.perf_counter() - t0)
                        ms = self.timed_image(seed)
                        stats = self.graph_counts()
                    images[v].append(ms)
                    if stats is not None:
                        self.graph_stats.setdefault(v, []).append(stats)
                    say(f"    round {r + 1}/{self.args.images} {v:<16} {ms:9.1f} ms  (setup + warm-up "
                        f"{setup[v][-1]:.1f} s)")
                except Exception as e:  # noqa: BLE001 - one broken variant must not lose the others' numbers
                    errors[v] = short(e, 2000)
                    say(f"    {v}: FAILED: {short(e)}")
                    traceback.print_exc()
                free_memory(self.device)
        return {"images_ms": images, "setup_plus_warmup_s": setup, "graph_counts": self.graph_stats,
                "errors": errors}

    def graph_counts(self) -> dict[str, int] | None:
        """The integration's CUDA-graph counters (captures, replays) so far, where it keeps them."""
        graphs = getattr(getattr(self, "handle", None), "block_graphs", None)
        if graphs is None:
            return None
        return {"captures": int(getattr(graphs, "captures", -1)), "replays": int(getattr(graphs, "replays", -1))}

    def warm_up(self, variant: str, seed: int) -> None:
        """``--warmup`` untimed images; with ``graphs=True`` (first image eager, second captured, then replays)
        at least two, and more until an image captures nothing new (at most 6), so the timed one replays."""
        n = 0
        for _ in range(self.args.warmup):
            self.generate(seed + 100 * (n + 1))
            n += 1
        if self.graph_counts() is not None:
            new = None
            while n < 6 and not (n >= 2 and new == 0):
                before = self.graph_counts()["captures"]
                self.generate(seed + 100 * (n + 1))
                n += 1
                new = self.graph_counts()["captures"] - before
        sync(self.device)

    # -- check
    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, list[torch.Tensor]]]:
        """Record every scale's logits (``get_logits``) and sampled bits (the module-level sampler)."""
        got: dict[str, list[torch.Tensor]] = {"logits": [], "bits": []}
        model, mod = self.model, self.inf_model
        get_logits = model.get_logits
        sampler = mod.sample_with_top_k_top_p_also_inplace_modifying_logits_

        def logits_spy(*a, **kw):
            out = get_logits(*a, **kw)
            got["logits"].append(out.detach().float().clone())
            return out

        def sampler_spy(*a, **kw):
            out = sampler(*a, **kw)
            got["bits"].append(out.detach().clone())
            return out

        model.get_logits = logits_spy
        mod.sample_with_top_k_top_p_also_inplace_modifying_logits_ = sampler_spy
        try:
            yield got
        finally:
            del model.get_logits
            mod.sample_with_top_k_top_p_also_inplace_modifying_logits_ = sampler

    def check(self, variants: list[str]) -> dict[str, Any]:
        seed = self.args.seed + 17
        self.vae.start_recording()
        try:
            self.generate(seed)
        finally:
            teacher = self.vae.stop_recording()
        if len(teacher) != len(self.schedule):
            raise RuntimeError(f"recorded {len(teacher)} scales of bit labels, expected {len(self.schedule)}")
        runs: dict[str, dict[str, list[torch.Tensor]]] = {}
        errors: dict[str, str] = {}
        for v in ["fp32", "default"] + [x for x in variants if x != "default"]:
            try:
                with self.variant(v):
                    if v in ("patched+graphs", "patched+compile"):
                        self.warm_up(v, seed + 1)  # so the checked image replays graphs / runs compiled code
                    with self.recording() as got:
                        self.generate(seed, teacher=teacher)
                runs[v] = got
            except Exception as e:  # noqa: BLE001
                errors[v] = short(e, 2000)
                say(f"    check {v}: FAILED: {short(e)}")
                traceback.print_exc()
            free_memory(self.device)
        if "fp32" not in runs or "default" not in runs:
            return {"errors": errors}
        dense = self.module_info.get("dense_scales")
        golden, base = runs["fp32"], runs["default"]

        def rel(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

        out: dict[str, Any] = {
            "method": "teacher-forced on one seeded default image's bit labels (gt_leak); logits' relative L2 "
                      "error vs self-attention in float32 (fp32); a variant passes if at every dense scale its "
                      f"error <= {CHECK_FACTOR} x max(default's error, {CHECK_FLOOR})",
            "seed": seed, "dense_scales": dense, "factor": CHECK_FACTOR, "floor": CHECK_FLOOR, "variants": {},
            "errors": errors}
        base_err = [rel(a, g) for a, g in zip(base["logits"], golden["logits"])]
        for v, got in runs.items():
            errs = [rel(a, g) for a, g in zip(got["logits"], golden["logits"])]
            bits = [float((a == b).float().mean()) for a, b in zip(got["bits"], base["bits"])]
            row: dict[str, Any] = {"logits_rel_l2_vs_fp32": errs, "bits_equal_to_default": bits}
            if v not in ("fp32", "default") and dense is not None:
                ratios = [errs[s] / max(base_err[s], CHECK_FLOOR) for s in dense]
                row["worst_dense_ratio"] = max(ratios) if ratios else None
                row["pass"] = all(r <= CHECK_FACTOR for r in ratios)
            out["variants"][v] = row
        if dense is not None and "bound" in out["variants"]:
            out["sensitive"] = not out["variants"]["bound"]["pass"]
        return out


# ---------------------------------------------------------------------------------------------- report
def summarize(images: dict[str, list[float]]) -> dict[str, Any]:
    med = {v: statistics.median(xs) for v, xs in images.items() if xs}
    base, bound = med.get("default"), med.get("bound")
    rows = {}
    for v, m in med.items():
        xs = images[v]
        row = {"median_ms": m, "min_ms": min(xs), "max_ms": max(xs), "images": len(xs)}
        if base:
            row["x_default"] = base / m
        if base and bound is not None and base > bound:
            row["of_bound"] = (base - m) / (base - bound)
        rows[v] = row
    return rows


def print_table(name: str, summary: dict[str, Any], check: dict[str, Any] | None, target_ms: float | None) -> None:
    say(f"\n{name}: image ms (median), interleaved")
    say(f"  {'variant':<16} {'median':>9} {'min':>9} {'max':>9} {'x default':>10} {'of bound':>9} {'check':>7}")
    for v, r in summary.items():
        ck = "-"
        if check and v in check.get("variants", {}) and "pass" in check["variants"][v]:
            ck = "pass" if check["variants"][v]["pass"] else "FAIL"
        xd = f"{r['x_default']:.3f}" if "x_default" in r else "-"
        ob = f"{100 * r['of_bound']:.0f}%" if "of_bound" in r else "-"
        say(f"  {v:<16} {r['median_ms']:9.1f} {r['min_ms']:9.1f} {r['max_ms']:9.1f} {xd:>10} {ob:>9} {ck:>7}")
    if check and "sensitive" in check:
        say(f"  check sensitive (bound fails it): {check['sensitive']}")
    if target_ms:
        best = min((r["median_ms"] for v, r in summary.items() if v.startswith("patched")), default=None)
        if best is not None:
            say(f"  target <= {target_ms:.0f} ms: best patched {best:.1f} ms -> "
                f"{'met' if best <= target_ms else 'not met'}")


def environment(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        from bench.kernels import environment as gpu_environment

        return gpu_environment(device)
    versions: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    return {"card": "cpu", "card_slug": "cpu", "host": platform.node(), "versions": versions,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--infinity", type=Path, required=True, help="an Infinity work tree (holds infinity/models/)")
    p.add_argument("--module", help="runtime module (or module set) directory for the patched variants")
    p.add_argument("--model", default="infinity-8b", choices=[k for k in PRESETS if k != "tiny"])
    p.add_argument("--tiny", action="store_true", help="a 4-layer model on the 0.06M schedule (runs on a CPU)")
    p.add_argument("--images", type=int, default=None, help="timed images per variant (default 5; --tiny 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed images after each variant's setup (default 1)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(ALL_VARIANTS)}")
    p.add_argument("--compile", action="store_true", help="add patched+compile (torch.compile reduce-overhead)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the dense-scale output check")
    p.add_argument("--h-div-w", default="1.0", help="aspect ratio h/w, snapped to Infinity's templates")
    p.add_argument("--text-tokens", type=int, default=None, help="prompt tokens (default 64; --tiny 16)")
    p.add_argument("--bf16", type=int, choices=[0, 1], default=None,
                   help="cast blocks to bf16 as run_infinity.py --bf16 1 (default 1 on a GPU, 0 on a CPU)")
    p.add_argument("--fused-norm", type=int, choices=[0, 1], default=1,
                   help="Infinity's torch.compile'd fused AdaLN, as run_infinity.py builds it (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/real-infinity-<card>.json)")
    p.add_argument("--no-merge", dest="merge", action="store_false",
                   help="do not keep other models' entries of an existing results file of the same card")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.compile and "patched+compile" not in args.variants:
        args.variants.append("patched+compile")
    bad = sorted(set(args.variants) - set(ALL_VARIANTS))
    if bad:
        p.error(f"unknown variant {bad[0]!r} (known: {', '.join(ALL_VARIANTS)})")
    if args.images is None:
        args.images = 2 if args.tiny else 5
    if args.images < 1 or args.warmup < 0:
        p.error("--images must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda" and not args.tiny:
        say("no GPU: the full-size benchmark needs one (use --tiny for a CPU run)")
        return 2
    if args.bf16 is None:
        args.bf16 = int(device.type == "cuda")  # CPU autocast leaves LayerNorm weights alone: bf16 blocks fail
    args.bf16, args.fused_norm = bool(args.bf16), bool(args.fused_norm)
    preset = PRESETS["tiny" if args.tiny else args.model]
    name = preset.name
    skipped: dict[str, str] = {}
    for v in list(args.variants):
        if v in MODULE_VARIANTS and not args.module:
            skipped[v] = "no --module given"
        elif v in ("patched+graphs", "bound+graphs") and device.type != "cuda":
            skipped[v] = "CUDA graphs need a GPU"
    if skipped:
        say(f"skipping: {', '.join(f'{v} ({why})' for v, why in skipped.items())}")
        args.variants = [v for v in args.variants if v not in skipped]
    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = 64  # as tools/run_infinity.py sets it (its fused norm recompiles)

    standins, inf_model, table = import_infinity(args.infinity.resolve())
    env = environment(device)
    card = env["card_slug"]
    out = args.out or (Path(tempfile.gettempdir()) / f"real-infinity-{card}-tiny.json" if args.tiny
                       else RESULTS / f"real-infinity-{card}.json")
    standins = {**{k: f"STAND-IN: {v}" for k, v in standins.items()},
                "tokenizer": "STAND-IN: bench/infinity_stubs.StandInBSQVAE (bit labels -> BSQ codes; no decoder)"}

    say(f"== {name} on {env['card']} (Infinity from {args.infinity})")
    for k, v in standins.items():
        say(f"  {k}: {v}")
    bench = Bench(args, preset, inf_model, table, device)
    mi = bench.module_info
    say(f"  model: {bench.params / 1e9:.3f} B parameters, built in {bench.build_s:.1f} s; h_div_w {bench.h_div_w}, "
        f"{len(bench.schedule)} scales up to {bench.grids[-1]}")
    if args.module:
        say(f"  module: {args.module}; dense scales {mi.get('dense_scales')}"
            + (f"; MISMATCH: {mi['mismatch']}" if mi.get("mismatch") else ""))

    timing = bench.time_variants(args.variants)
    summary = summarize(timing["images_ms"])
    check = None
    if args.check:
        say("  check: teacher-forced outputs at the plan's dense scales")
        try:
            check = bench.check([v for v in args.variants if v not in timing["errors"]])
        except Exception as e:  # noqa: BLE001
            check = {"errors": {"check": short(e, 2000)}}
            traceback.print_exc()

    entry = {
        "model": preset.name, "tiny": args.tiny,
        "shape": {"depth": preset.depth, "embed_dim": preset.embed_dim, "num_heads": preset.num_heads,
                  "head_dim": preset.embed_dim // preset.num_heads, "block_chunks": preset.block_chunks,
                  "vae_type": preset.vae_type, "apply_spatial_patchify": preset.apply_spatial_patchify,
                  "parameters": bench.params},
        "settings": {"pn": preset.pn, "h_div_w": bench.h_div_w, "schedule": bench.grids,
                     "text_tokens": bench.text[3], "text_channels": TEXT_CHANNELS, "batch": 1, "cfg_batch": 2,
                     "cfg": CFG, "cfg_insertion_layer": [0], "tau": preset.tau, "top_k": TOP_K, "top_p": TOP_P,
                     "autocast": "bfloat16", "bf16_blocks": args.bf16, "fused_norm": args.fused_norm,
                     "images": args.images, "warmup": args.warmup, "seed": args.seed, "ret_img": False,
                     "weights": "random (seeded), no checkpoint", "build_s": bench.build_s,
                     "timing": "wall clock between device syncs, one timed image per variant per round, "
                               "variants interleaved (order rotated per round)"},
        "module": mi, "variants": args.variants, "skipped": skipped, **timing, "summary": summary, "check": check,
        "target_ms": preset.target_ms,
    }
    result: dict[str, Any] = {"benchmark": BENCHMARK, "card": env["card"], "card_slug": card,
                              "versions": env.get("versions"), "environment": env,
                              "infinity": infinity_source(args.infinity.resolve()), "standins": standins,
                              "models": {}}
    if args.merge and out.is_file():
        with contextlib.suppress(OSError, ValueError):
            old = json.loads(out.read_text())
            if old.get("benchmark") == BENCHMARK and old.get("card") == env["card"]:
                result["models"].update(old.get("models", {}))
    result["models"][name] = entry
    print_table(name, summary, check, preset.target_ms)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    say(f"wrote {out}")
    failed = bool(timing["errors"]) or bool(check and check.get("errors"))
    failed = failed or bool(check and any(r.get("pass") is False for v, r in check.get("variants", {}).items()
                                          if v != "bound"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
