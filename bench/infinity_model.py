"""An Infinity-shaped image generator with random weights, for end-to-end timing of self-attention backends.

This is our own code, not Infinity's: no checkpoint is read. It has the shapes and the per-scale dataflow of
Infinity-2B/8B at 1024^2 so that every matmul, norm, KV-cache append and attention call of one image costs what it
costs in the real model; the numbers it produces are noise.

One transformer block (as ``AdaLNSelfCrossAttn`` with a shared AdaLN in Infinity):

* AdaLN: one linear layer shared by all blocks maps the conditioning vector to 6 x width values; each block adds
  its own learned ``[6, width]`` offset and splits them into (gate, gate, scale, scale, shift, shift) for the
  self-attention and MLP branches.
* Self-attention: fused q/k/v projection (q and v biases, no k bias); *cosine attention*: q and k L2-normalised per
  head, q multiplied by a per-head scale (Infinity learns ``exp(log_scale)`` clamped at 100; here a fixed value in
  10..20 per head), softmax scale 1.0; then 2-D RoPE on q and k over the scale's ``(h, w)`` grid (positions in
  units of the last scale's grid, so a coarse token sits where the area it covers sits). The scale's new k/v are
  appended to the layer's KV cache and the scale's queries attend to the whole cache (no mask inside a scale).
  This call goes through the *attention switch* ``attn(q, k, v, scale_index, layer_index) -> out``.
* Cross-attention to the text tokens (``text_len`` x ``text_dim``, Flan-T5-XL's 512 x 2048); its keys/values are
  projected once per image (``begin_image``). It runs through ``cross_attn`` (the same for every backend).
* MLP: width -> mlp_ratio x width -> width with tanh-GELU.

Between scales (the tokenizer, deliberately cheap: we benchmark the transformer): an AdaLN head projects each
token to a ``code_dim`` latent, the two halves of the CFG batch are combined
(``(1 + g) * cond - g * uncond``, no sampling, so outputs are deterministic and comparable between backends),
the scale's latent is bilinearly upsampled to the last grid and added to the accumulated latent ``f_hat``, and the
next scale's input is ``f_hat`` area-downsampled to the next grid, embedded by a linear layer, plus a per-scale
level embedding. Scale 0's input is a start token projected from the pooled text. Scale skipping stops after the
last computed scale: ``f_hat`` already lives on the last grid, so it *is* the upsampled output.

Weights are drawn from one seeded ``torch.Generator`` on the target device in a fixed order, so a model is the
same every time on the same device (8B in bf16 is ~16 GB: build it on the GPU). Small init (std 0.02, output
projections scaled by 1/sqrt(2 depth), gates 1) keeps activations finite over 40 layers while every branch still
changes the output. Nothing here touches a GPU at import time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]
"""``attn(q, k, v, scale_index, layer_index) -> out``: q ``[B, H, Nq, D]``, k/v ``[B, H, Nkv, D]`` contiguous;
``out`` like q. Softmax scale 1.0 (Infinity's cosine attention)."""

CrossAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

ROPE_BASE = 10000.0


@dataclass(frozen=True)
class InfinityConfig:
    """Shape of the generator.

    Attributes
    ----------
    name:
        Model name (``infinity-2b``, ``infinity-8b`` or a test name).
    depth, width, heads, head_dim, mlp_ratio:
        Transformer shape; ``width`` need not equal ``heads * head_dim`` (it does for Infinity).
    grids:
        ``(h, w)`` of every scale, coarsest first (the plan's ``grids``).
    text_dim, text_len:
        Text encoder channels and tokens (Flan-T5-XL: 2048, up to 512).
    code_dim:
        Latent channels per token between scales (Infinity's tokenizer has 32).
    cfg_scale:
        Classifier-free guidance weight used to combine the two halves of the batch.
    batch:
        2: the conditional and the unconditional half of one image (CFG); ``2 n`` is ``n`` images (rows
        ``0..n-1`` conditional, ``n..2n-1`` their unconditional halves, as Infinity orders them); 1 is one
        image without CFG.
    q_scale_range:
        Per-head query scales are drawn uniformly from this range (Infinity's learned values are <= 100).
    init_std:
        Standard deviation of the weights.
    """

    name: str
    depth: int
    width: int
    heads: int
    head_dim: int
    grids: tuple[tuple[int, int], ...]
    mlp_ratio: float = 4.0
    text_dim: int = 2048
    text_len: int = 512
    code_dim: int = 32
    cfg_scale: float = 3.0
    batch: int = 2
    q_scale_range: tuple[float, float] = (10.0, 20.0)
    init_std: float = 0.02

    @property
    def num_scales(self) -> int:
        return len(self.grids)

    @property
    def hidden(self) -> int:
        return int(round(self.mlp_ratio * self.width))

    @property
    def _schedule(self):
        from sparvar_compiler.planner.schedules import Schedule

        # The planner's schedule owns the cache arithmetic (row-major tokens, scales appended in order).
        return Schedule(0, "1:1", tuple(tuple(g) for g in self.grids))

    @property
    def tokens(self) -> tuple[int, ...]:
        return self._schedule.tokens

    @property
    def kv_offsets(self) -> tuple[int, ...]:
        """First cache position of each scale's tokens."""
        return self._schedule.kv_offsets

    @property
    def kv_lens(self) -> tuple[int, ...]:
        """KV cache length the queries of each scale attend to (all tokens up to and including the scale)."""
        return self._schedule.kv_lens

    @classmethod
    def from_plan(cls, plan, width: int | None = None, **overrides) -> "InfinityConfig":
        """The generator of a planned model (depth, heads, head_dim, grids from the plan; width and MLP ratio
        from the model registry when the plan names a registered model, else ``heads * head_dim``)."""
        from sparvar_compiler.planner.models import REGISTRY

        spec = REGISTRY.get(plan.model)
        if width is None:
            width = spec.width if spec is not None else plan.heads * plan.head_dim
        kw = {"mlp_ratio": spec.mlp_ratio} if spec is not None else {}
        kw.update(overrides)
        return cls(plan.model, plan.depth, width, plan.heads, plan.head_dim,
                   tuple((int(h), int(w)) for h, w in plan.grids), **kw)


@dataclass
class ImageState:
    """Everything one image carries from scale to scale (created by :meth:`InfinityGenerator.begin_image`).

    ``x`` is the next scale's input tokens ``[B, tokens, width]``; ``k_cache[l]``/``v_cache[l]`` the layer's KV
    cache ``[B, H, kv_len, D]`` (contiguous, grown by one scale per step); ``f_hat`` the accumulated latent
    ``[1, code_dim, H_last, W_last]`` in float32 (the image output); ``next_scale`` the scale ``x`` belongs to.
    """

    ada: torch.Tensor
    head_ada: torch.Tensor
    text_k: list[torch.Tensor]
    text_v: list[torch.Tensor]
    x: torch.Tensor
    f_hat: torch.Tensor
    k_cache: list[torch.Tensor | None] = field(default_factory=list)
    v_cache: list[torch.Tensor | None] = field(default_factory=list)
    next_scale: int = 0


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_index: int,
                    layer_index: int) -> torch.Tensor:
    """Self-attention through SDPA with whatever backend PyTorch picks (softmax scale 1.0)."""
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


def default_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Cross-attention to the text (softmax scale 1/sqrt(D), as Infinity's cross-attention)."""
    return F.scaled_dot_product_attention(q, k, v)


class InfinityGenerator(torch.nn.Module):
    """The generator (see the module docstring). Inference only: parameters do not require grad.

    Parameters
    ----------
    config:
        Shape and schedule.
    device, dtype:
        Where the weights are built and in which dtype (bf16 for benchmarks).
    seed:
        Seed of the weight generator; the same seed on the same device gives the same weights.
    """

    def __init__(self, config: InfinityConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.bfloat16, seed: int = 0):
        super().__init__()
        self.config = c = config
        self.dtype = dtype
        device = torch.device(device)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        W, qk, std = c.width, c.heads * c.head_dim, c.init_std
        out_std = std / math.sqrt(2 * c.depth)  # residual branches sum over 2 x depth: keep the stream O(1)

        def weight(*shape: int, s: float = std) -> torch.nn.Parameter:
            # float32 draw then cast: the same numbers for every dtype, and bf16 normal_ is not on every device.
            t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).mul_(s)
            return torch.nn.Parameter(t.to(dtype), requires_grad=False)

        def const(value: float, *shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.full(shape, value, device=device, dtype=dtype), requires_grad=False)

        self.cond_w, self.cond_b = weight(W, c.text_dim), const(0.0, W)
        self.sos_w, self.sos_b = weight(W, c.text_dim), const(0.0, W)
        self.ada_w, self.ada_b = weight(6 * W, W), const(0.0, 6 * W)
        self.lvl_embed = weight(c.num_scales, W)
        self.word_w, self.word_b = weight(W, c.code_dim, s=1.0 / math.sqrt(c.code_dim)), const(0.0, W)
        self.head_ada_w, self.head_ada_b = weight(2 * W, W), const(0.0, 2 * W)
        self.head_w, self.head_b = weight(c.code_dim, W), const(0.0, c.code_dim)
        self.blocks = torch.nn.ModuleList()
        lo, hi = c.q_scale_range
        for _ in range(c.depth):
            b = torch.nn.Module()
            gss = torch.zeros(6, W, device=device, dtype=torch.float32)
            gss[:2] = 1.0  # gates of the attention and MLP branches start open (Infinity learns them)
            b.ada_gss = torch.nn.Parameter(gss.to(dtype), requires_grad=False)
            b.qkv_w = weight(3 * qk, W)
            qkv_b = weight(3 * qk)
            qkv_b.data[qk: 2 * qk] = 0  # Infinity has q and v biases, no k bias
            b.qkv_b = qkv_b
            qs = torch.rand(c.heads, generator=gen, device=device, dtype=torch.float32) * (hi - lo) + lo
            b.q_scale = torch.nn.Parameter(qs.view(1, c.heads, 1, 1), requires_grad=False)  # kept float32
            b.proj_w, b.proj_b = weight(W, qk, s=out_std), const(0.0, W)
            b.ca_norm_w, b.ca_norm_b = const(1.0, W), const(0.0, W)
            b.ca_q_w, b.ca_q_b = weight(qk, W), const(0.0, qk)
            b.ca_kv_w, b.ca_kv_b = weight(2 * qk, c.text_dim), const(0.0, 2 * qk)
            b.ca_proj_w, b.ca_proj_b = weight(W, qk, s=out_std), const(0.0, W)
            b.fc1_w, b.fc1_b = weight(c.hidden, W), const(0.0, c.hidden)
            b.fc2_w, b.fc2_b = weight(W, c.hidden, s=out_std), const(0.0, W)
            self.blocks.append(b)
        self._rope = [self._rope_tables(h, w, device) for h, w in c.grids]

    # ------------------------------------------------------------------------------------------ RoPE
    def _rope_tables(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[h*w, D]`` (float32) of 2-D RoPE: the first half of the head dim rotates with the row, the
        second with the column, each as rotate-half pairs; positions are token centres on the last scale's grid."""
        c = self.config
        H_last, W_last = c.grids[-1]
        quarter = c.head_dim // 4
        freqs = ROPE_BASE ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
        ys = (torch.arange(h, dtype=torch.float64, device=device) + 0.5) * (H_last / h) - 0.5
        xs = (torch.arange(w, dtype=torch.float64, device=device) + 0.5) * (W_last / w) - 0.5
        ang_y = (ys[:, None] * freqs[None]).repeat_interleave(w, 0)  # token t = y * w + x
        ang_x = (xs[:, None] * freqs[None]).repeat(h, 1)
        ang = torch.cat([ang_y, ang_y, ang_x, ang_x], dim=1)  # [tokens, D]: quarters (y1, y2, x1, x2)
        return ang.cos().float(), ang.sin().float()

    @staticmethod
    def _rotate(t: torch.Tensor) -> torch.Tensor:
        """Rotate-half within each half of the head dim: quarters (a1, a2, b1, b2) -> (-a2, a1, -b2, b1)."""
        a1, a2, b1, b2 = t.chunk(4, dim=-1)
        return torch.cat([-a2, a1, -b2, b1], dim=-1)

    # ------------------------------------------------------------------------------------------ image
    def begin_image(self, text: torch.Tensor) -> ImageState:
        """Start one image from the text tokens ``[B, text_len, text_dim]`` (row 0 conditional, row 1
        unconditional): conditioning, the start token, and every layer's text keys/values (once per image)."""
        c = self.config
        B = text.shape[0]
        pooled = text.float().mean(dim=1).to(self.dtype)
        cond = F.linear(pooled, self.cond_w, self.cond_b)
        cond_act = F.silu(cond)
        ada = F.linear(cond_act, self.ada_w, self.ada_b).view(B, 1, 6, c.width)
        head_ada = F.linear(cond_act, self.head_ada_w, self.head_ada_b).view(B, 1, 2, c.width)
        text_k, text_v = [], []
        for b in self.blocks:
            kv = F.linear(text, b.ca_kv_w, b.ca_kv_b).view(B, text.shape[1], 2, c.heads, c.head_dim)
            text_k.append(kv[:, :, 0].transpose(1, 2).contiguous())
            text_v.append(kv[:, :, 1].transpose(1, 2).contiguous())
        x = (F.linear(pooled, self.sos_w, self.sos_b) + self.lvl_embed[0]).unsqueeze(1)  # [B, 1, W]
        H_last, W_last = c.grids[-1]
        images = B // 2 if B > 1 else 1
        if B > 1 and B % 2:
            raise ValueError(f"a CFG batch must be even (conditional + unconditional halves), got {B}")
        f_hat = torch.zeros(images, c.code_dim, H_last, W_last, device=text.device, dtype=torch.float32)
        return ImageState(ada, head_ada, text_k, text_v, x, f_hat, [None] * c.depth, [None] * c.depth, 0)

    def _block(self, layer: int, x: torch.Tensor, state: ImageState, scale_index: int, attn: Attention,
               cross_attn: CrossAttention) -> torch.Tensor:
        c = self.config
        b = self.blocks[layer]
        B, N, W = x.shape
        gate1, gate2, scale1, scale2, shift1, shift2 = (b.ada_gss + state.ada).unbind(2)  # each [B, 1, W]

        # Self-attention (cosine attention + 2-D RoPE) against the growing KV cache.
        h = F.layer_norm(x, (W,)) * (scale1 + 1) + shift1
        qkv = F.linear(h, b.qkv_w, b.qkv_b).view(B, N, 3, c.heads, c.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = self._rope[scale_index]
        q = F.normalize(qkv[0].float(), dim=-1) * b.q_scale
        k = F.normalize(qkv[1].float(), dim=-1)
        q = (q * cos + self._rotate(q) * sin).to(self.dtype).contiguous()
        k = (k * cos + self._rotate(k) * sin).to(self.dtype)
        v = qkv[2]
        if state.k_cache[layer] is None:
            kc, vc = k.contiguous(), v.contiguous()
        else:
            kc = torch.cat([state.k_cache[layer], k], dim=2)
            vc = torch.cat([state.v_cache[layer], v], dim=2)
        state.k_cache[layer], state.v_cache[layer] = kc, vc
        o = attn(q, kc, vc, scale_index, layer)
        x = x + F.linear(o.transpose(1, 2).reshape(B, N, -1), b.proj_w, b.proj_b) * gate1

        # Cross-attention to the text (no AdaLN, as in Infinity).
        h = F.layer_norm(x, (W,), b.ca_norm_w, b.ca_norm_b)
        cq = F.linear(h, b.ca_q_w, b.ca_q_b).view(B, N, c.heads, c.head_dim).transpose(1, 2)
        co = cross_attn(cq, state.text_k[layer], state.text_v[layer])
        x = x + F.linear(co.transpose(1, 2).reshape(B, N, -1), b.ca_proj_w, b.ca_proj_b)

        # MLP.
        h = F.layer_norm(x, (W,)) * (scale2 + 1) + shift2
        h = F.gelu(F.linear(h, b.fc1_w, b.fc1_b), approximate="tanh")
        return x + F.linear(h, b.fc2_w, b.fc2_b) * gate2

    def run_scale(self, state: ImageState, attn: Attention, cross_attn: CrossAttention | None = None) -> None:
        """One scale's transformer pass over ``state.x`` (every layer), then the head: updates ``f_hat`` and
        prepares the next scale's input. Scales run in order; the scale is ``state.next_scale``."""
        c = self.config
        s = state.next_scale
        if not 0 <= s < c.num_scales:
            raise IndexError(f"scale {s} is out of range 0..{c.num_scales - 1}")
        cross_attn = cross_attn or default_cross_attention
        x = state.x
        for layer in range(c.depth):
            x = self._block(layer, x, state, s, attn, cross_attn)
        # Head: AdaLN, linear to the latent, CFG combine (row 0 conditional, row 1 unconditional).
        shift, scale = state.head_ada.unbind(2)
        h = F.layer_norm(x, (c.width,)) * (scale + 1) + shift
        codes = F.linear(h, self.head_w, self.head_b).float()  # [B, N, code_dim]
        n = state.f_hat.shape[0]  # images: B // 2 with CFG, 1 without
        guided = codes if x.shape[0] == 1 else (1 + c.cfg_scale) * codes[:n] - c.cfg_scale * codes[n:]
        hs, ws = c.grids[s]
        latent = guided.transpose(1, 2).reshape(n, c.code_dim, hs, ws)
        H_last, W_last = c.grids[-1]
        if (hs, ws) != (H_last, W_last):
            latent = F.interpolate(latent, size=(H_last, W_last), mode="bilinear", align_corners=False)
        state.f_hat = state.f_hat + latent
        state.next_scale = s + 1
        if s + 1 < c.num_scales:
            hn, wn = c.grids[s + 1]
            down = F.interpolate(state.f_hat, size=(hn, wn), mode="area") if (hn, wn) != (H_last, W_last) \
                else state.f_hat
            tokens = down.reshape(n, c.code_dim, hn * wn).transpose(1, 2).to(self.dtype)
            nxt = F.linear(tokens, self.word_w, self.word_b) + self.lvl_embed[s + 1]  # [n, tokens, W]
            state.x = nxt.repeat(x.shape[0] // n, 1, 1).contiguous()  # the same input for both CFG halves

    def generate(self, text: torch.Tensor, attn: Attention = dense_attention, skip_last: int = 0,
                 cross_attn: CrossAttention | None = None) -> torch.Tensor:
        """One image: every scale but the last ``skip_last`` (whose transformer passes are skipped; the
        accumulated latent already lives on the last grid). Returns ``f_hat [images, code_dim, H_last, W_last]``."""
        if not 0 <= skip_last < self.config.num_scales:
            raise ValueError(f"skip_last must be in 0..{self.config.num_scales - 1}, got {skip_last}")
        state = self.begin_image(text)
        for _ in range(self.config.num_scales - skip_last):
            self.run_scale(state, attn, cross_attn)
        return state.f_hat


def make_text(config: InfinityConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
              seed: int = 1) -> torch.Tensor:
    """Deterministic stand-in text encoder output ``[batch, text_len, text_dim]`` (row 0 the prompt, row 1 the
    unconditional text), unit variance like a normalised T5 embedding."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(seed)
    t = torch.randn(config.batch, config.text_len, config.text_dim, generator=gen, device=device,
                    dtype=torch.float32)
    return t.to(dtype)

