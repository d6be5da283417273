"""A small, pure-torch stand-in of FoundationVision/Infinity's text-to-image transformer, for CPU tests of
``sparvar_compiler.integrations.infinity``. Our own code: it copies no line of Infinity, it only keeps the class
names, attribute names, call signatures, control flow and dtypes that the integration touches.

What it mirrors (Infinity at commit 4c27bbb, https://github.com/FoundationVision/Infinity):

``infinity/models/basic.py``
    * ``slow_attn``: module-level name of ``torch.nn.functional.scaled_dot_product_attention`` (looked up at call
      time, so a test can patch it).
    * ``SelfAttention``: ``num_heads``, ``head_dim``, ``cos_attn`` (True), ``scale`` (1), ``scale_mul_1H11``
      (per-head log query scale, shape ``(1, H, 1, 1)``, clamped at ``max_scale_mul = log(100)``), ``mat_qkv``
      (no bias), ``q_bias``, ``v_bias``, the ``zero_k_bias`` buffer, ``proj``, ``using_flash`` (False),
      ``use_flex_attn``, ``pad_to_multiplier``, ``rope2d_normalized_by_hw``, the KV cache ``caching`` /
      ``cached_k`` / ``cached_v`` and ``kv_caching(enable)``. ``forward(x, attn_bias_or_two_vector, attn_fn=None,
      scale_schedule=None, rope2d_freqs_grid=None, scale_ind=0)``: fused q/k/v projection, L2-normalised q and k
      in float32, q times the per-head scale, 2-D RoPE (float32, autocast off), the scale's k/v appended to the
      cache with ``torch.cat`` on dim 2, then ``attn_fn(q, k, v, scale=self.scale)`` when ``self.use_flex_attn
      and attn_fn is not None``, else ``slow_attn(query=q, key=k, value=v, scale=self.scale,
      attn_mask=attn_bias_or_two_vector, dropout_p=0)``; the ``[B, H, L, c]`` result is transposed back to
      ``[B, L, C]`` and projected.
    * ``CrossAttention``: ``mat_q``, ``mat_kv`` (no bias), ``v_bias``, ``zero_k_bias``, ``proj``;
      ``forward(q, ca_kv)`` with ``ca_kv = (kv_compact, cu_seqlens_k, max_seqlen_k)`` (packed text tokens).
      Infinity runs ``flash_attn_varlen_kvpacked_func``; this runs SDPA with a per-sample mask.
    * ``CrossAttnBlock``: ``sa``, ``ca``, ``ffn`` (``fc1``, ``act``, ``fc2``), ``ln_wo_grad``, ``ca_norm``,
      ``shared_aln`` (True) with ``ada_gss`` (``(1, 1, 6, C)``, gates/scales/shifts), ``ca_gamma``,
      ``fused_norm_func``, ``drop_path`` (identity). ``forward(x, cond_BD, ca_kv, attn_bias_or_two_vector,
      attn_fn=None, scale_schedule=None, rope2d_freqs_grid=None, scale_ind=0)`` with both of Infinity's branches:
      without a fused norm it calls ``self.sa(x_sa, attn_bias_or_two_vector, attn_fn, scale_schedule,
      rope2d_freqs_grid)`` (``scale_ind`` is NOT passed, so RoPE starts at position 0 at every scale, as in
      Infinity); with one (``fused_norm=True``, what ``tools/run_infinity.py`` builds) it passes
      ``scale_ind=scale_ind``.
    * ``rope2d_freqs_grid``: a dict keyed by ``str(tuple(scale_schedule))`` holding ``(2, 1, 1, 1, L, c/2)``
      cos/sin tables over the concatenated scales, positions normalised to the last grid (Infinity's
      ``rope2d_normalized_by_hw=2``); missing schedules are filled on first use.

``infinity/models/infinity.py``
    * ``MultipleLayers`` (``.module``: a ``ModuleList`` of blocks) and ``Infinity``: ``C``, ``D``, ``depth``,
      ``num_heads``, ``unregistered_blocks`` (a plain list), ``block_chunks`` (``ModuleList`` of
      ``MultipleLayers``), ``num_block_chunks``, ``num_blocks_in_a_chunk``, ``use_flex_attn`` and
      ``attn_fn_compile_dict`` (per-prefix ``attn_fn``), ``rope2d_freqs_grid``, ``cfg_uncond``, ``pos_start``,
      ``lvl_embed``, ``word_embed``, ``shared_ada_lin``, ``head_nm`` / ``head`` (``get_logits``),
      ``add_lvl_embeding``.
    * ``autoregressive_infer_cfg(vae=None, scale_schedule=..., label_B_or_BLT=..., B=1, cfg_list=..., tau_list=...,
      cfg_insertion_layer=[0], inference_mode=True, ...)``: CFG doubles the batch to ``2B`` (text ``+`` the
      unconditional ``cfg_uncond``), every block's ``.sa.kv_caching(True)`` at the start and ``(False)`` at the end,
      and per scale the block loop ``m(x=..., cond_BD=..., ca_kv=..., attn_bias_or_two_vector=None,
      attn_fn=attn_fn, scale_schedule=scale_schedule, rope2d_freqs_grid=self.rope2d_freqs_grid, scale_ind=si)``
      over ``block_chunks[*].module``; CFG is applied on the logits (``cfg_insertion_layer=[0]``, as the public
      notebooks run it).

What it leaves out: sampling (no top-k/top-p, no ``rng``: the next scale's input is a deterministic function of
the CFG-combined logits, see :meth:`Infinity.autoregressive_infer_cfg`), the BSQ VAE and image decoding, the
text encoder (callers pass T5-shaped features, :func:`make_text`), FlashAttention and FlexAttention,
``SelfAttnBlock`` (class-conditional), training (masks, checkpointing, dropout, drop-path), spatial patchify,
video frames, CFG inserted at a layer, and Infinity's weight init (weights are a seeded draw, see
:class:`Infinity`). Sizes are free (tests use depth 4, width 128, 2 heads of 64).

Dtypes under ``torch.autocast(device, dtype=torch.bfloat16)``: on the GPU, Infinity's ``F.normalize`` autocasts
to float32 (``norm`` is on CUDA autocast's float32 list), so the q and k reaching attention are float32 and v is
bf16. CPU autocast keeps ``F.normalize`` in bf16 (checked with torch 2.13), so this stand-in normalises
``q.float()`` / ``k.float()`` explicitly: q and k are float32 and v bf16 on every device, as on the GPU.
"""

from __future__ import annotations

import ast
import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.functional import scaled_dot_product_attention as slow_attn  # q, k, v: BHLc (as Infinity names it)

Schedule = Sequence[tuple[int, int, int]]


# ---------------------------------------------------------------------------------------------- RoPE
class RopeGrid(dict):
    """``str(tuple(scale_schedule)) -> (2, 1, 1, 1, L, head_dim // 2)`` cos/sin table (L = all tokens of the
    schedule, scales concatenated in order). Keys are filled on first use; positions of a scale's ``(h, w)`` grid
    are stretched onto the last scale's grid, so a coarse token sits where the area it covers sits."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
        self.head_dim, self.base = head_dim, base

    def __missing__(self, key: str) -> torch.Tensor:
        schedule = [tuple(int(v) for v in s) for s in ast.literal_eval(key)]
        _, last_h, last_w = schedule[-1]
        quarter = self.head_dim // 4  # half the pairs rotate with y, half with x
        inv_freq = 1.0 / (self.base ** (torch.arange(quarter, dtype=torch.float64) / quarter))
        rows = []
        for _, h, w in schedule:
            y = (torch.arange(h, dtype=torch.float64) * (last_h / h)).round()
            x = (torch.arange(w, dtype=torch.float64) * (last_w / w)).round()
            yy, xx = torch.meshgrid(y, x, indexing="ij")
            rows.append(torch.cat([yy.reshape(-1, 1) * inv_freq, xx.reshape(-1, 1) * inv_freq], dim=1))
        angles = torch.cat(rows, dim=0)  # (L, head_dim // 2)
        table = torch.stack([angles.cos(), angles.sin()]).float()[:, None, None, None]
        self[key] = table
        return table


def apply_rotary_emb(q: torch.Tensor, k: torch.Tensor, scale_schedule: Schedule, rope2d_freqs_grid: dict,
                     scale_ind: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k ``[B, H, L, c]`` (the tokens of scale ``scale_ind``) in float32, autocast off; adjacent
    channel pairs ``(2i, 2i+1)`` rotate by the i-th angle, as Infinity pairs them."""
    key = str(tuple(tuple(s) for s in scale_schedule))
    with torch.autocast(device_type=q.device.type if q.device.type in ("cuda", "cpu") else "cpu", enabled=False):
        start = sum(t * h * w for t, h, w in scale_schedule[:scale_ind]) if scale_ind >= 1 else 0
        table = rope2d_freqs_grid[key] = rope2d_freqs_grid[key].to(q.device)
        seq_len = q.shape[2]
        if start + seq_len > table.shape[4]:
            raise ValueError(f"RoPE table of {table.shape[4]} positions is too short for {start}+{seq_len}")
        cos, sin = table[0, 0, :, :, start:start + seq_len], table[1, 0, :, :, start:start + seq_len]  # 1,1,L,c/2

        def rotate(t: torch.Tensor) -> torch.Tensor:
            pairs = t.float().reshape(*t.shape[:-1], -1, 2)
            a, b = pairs[..., 0], pairs[..., 1]
            return torch.stack([cos * a - sin * b, sin * a + cos * b], dim=-1).reshape(t.shape)

        return rotate(q), rotate(k)


# ---------------------------------------------------------------------------------------------- layers
class FFN(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``: Infinity's unfused FFN."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.fused_mlp_func = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def fused_ada_layer_norm(C: int, eps: float, x: torch.Tensor, scale: torch.Tensor,
                         shift: torch.Tensor) -> torch.Tensor:
    """Infinity's ``fused_op.fused_ada_layer_norm`` (there under ``torch.compile``; plain here)."""
    x = F.layer_norm(x.float(), normalized_shape=(C,), weight=None, bias=None, eps=eps)
    return x.mul(scale.add(1)).add_(shift)


class SelfAttention(nn.Module):
    """Cosine self-attention with a KV cache (see the module docstring for what it mirrors)."""

    def __init__(self, embed_dim: int = 768, num_heads: int = 12, cos_attn: bool = True, use_flex_attn: bool = False,
                 batch_size: int = 2, pad_to_multiplier: int = 1, rope2d_normalized_by_hw: int = 2):
        super().__init__()
        assert embed_dim % num_heads == 0
        self.using_flash = False
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.tau, self.cos_attn = 1, cos_attn
        if self.cos_attn:
            self.scale = 1
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 1 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, embed_dim * 3, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(embed_dim)), nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Identity()
        self.caching = False
        self.cached_k: torch.Tensor | None = None
        self.cached_v: torch.Tensor | None = None
        self.batch_size = batch_size
        self.use_flex_attn = use_flex_attn
        self.pad_to_multiplier = pad_to_multiplier
        self.rope2d_normalized_by_hw = rope2d_normalized_by_hw

    def kv_caching(self, enable: bool) -> None:
        self.caching = enable
        self.cached_k = None
        self.cached_v = None

    def forward(self, x: torch.Tensor, attn_bias_or_two_vector: Any, attn_fn=None, scale_schedule=None,
                rope2d_freqs_grid=None, scale_ind: int = 0) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(input=x, weight=self.mat_qkv.weight, bias=bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)  # B H L c
        if self.cos_attn:
            scale_mul = self.scale_mul_1H11.float().clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q.float(), dim=-1, eps=1e-12).mul(scale_mul).contiguous()  # float32
            k = F.normalize(k.float(), dim=-1, eps=1e-12).contiguous()                  # float32
            v = v.contiguous()                                                          # bf16 under autocast
        else:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if rope2d_freqs_grid is not None:
            q, k = apply_rotary_emb(q, k, scale_schedule, rope2d_freqs_grid, scale_ind)
        if self.caching:
            if self.cached_k is None:
                self.cached_k, self.cached_v = k, v
            else:
                k = self.cached_k = torch.cat((self.cached_k, k), dim=2)
                v = self.cached_v = torch.cat((self.cached_v, v), dim=2)
        if self.use_flex_attn and attn_fn is not None:
            oup = attn_fn(q, k, v, scale=self.scale).transpose(1, 2).reshape(B, L, C)
        else:
            oup = slow_attn(query=q, key=k, value=v, scale=self.scale, attn_mask=attn_bias_or_two_vector,
                            dropout_p=0).transpose(1, 2).reshape(B, L, C)
        return self.proj_drop(self.proj(oup))

    def extra_repr(self) -> str:
        return f"using_flash={self.using_flash}, tau={self.tau}, cos_attn={self.cos_attn}"


class CrossAttention(nn.Module):
    """Attention of the image tokens to the packed text tokens of their own sample (softmax scale 1/sqrt(c))."""

    def __init__(self, embed_dim: int = 768, kv_dim: int = 4096, num_heads: int = 12):
        super().__init__()
        assert embed_dim % num_heads == 0
        self.embed_dim, self.kv_dim = embed_dim, kv_dim
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.cos_attn = False
        self.scale = 1 / math.sqrt(self.head_dim)
        self.mat_q = nn.Linear(embed_dim, embed_dim, bias=True)
        self.mat_kv = nn.Linear(kv_dim, embed_dim * 2, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Identity()

    def forward(self, q: torch.Tensor, ca_kv) -> torch.Tensor:
        kv_compact, cu_seqlens_k, max_seqlen_k = ca_kv
        N = kv_compact.shape[0]
        kv = F.linear(kv_compact, weight=self.mat_kv.weight, bias=torch.cat((self.zero_k_bias, self.v_bias)))
        k, v = kv.view(N, 2, self.num_heads, self.head_dim).unbind(dim=1)  # N H c
        B, Lq = q.shape[:2]
        qh = self.mat_q(q).view(B, Lq, self.num_heads, self.head_dim).transpose(1, 2)  # B H Lq c
        # Each sample sees its own segment of the packed text: a [B, 1, 1, N] mask replaces flash's cu_seqlens.
        pos = torch.arange(N, device=kv_compact.device)
        cu = cu_seqlens_k.to(kv_compact.device).long()
        mask = (pos[None] >= cu[:-1, None]) & (pos[None] < cu[1:, None])
        kh, vh = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # 1 H N c
        dtype = torch.promote_types(qh.dtype, kh.dtype)
        oup = F.scaled_dot_product_attention(qh.to(dtype), kh.to(dtype).expand(B, -1, -1, -1),
                                             vh.to(dtype).expand(B, -1, -1, -1), attn_mask=mask[:, None, None, :],
                                             scale=self.scale)
        return self.proj_drop(self.proj(oup.transpose(1, 2).reshape(B, Lq, -1)))


class CrossAttnBlock(nn.Module):
    """Self-attention, cross-attention to the text and an FFN, with Infinity's shared AdaLN gates."""

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 fused_norm_func=None, use_flex_attn: bool = False, cross_attn_layer_scale: float = -1.0):
        super().__init__()
        self.C, self.D = embed_dim, kv_dim
        self.drop_path = nn.Identity()
        self.sa = SelfAttention(embed_dim=embed_dim, num_heads=num_heads, cos_attn=True, use_flex_attn=use_flex_attn)
        self.ca = CrossAttention(embed_dim=embed_dim, kv_dim=kv_dim, num_heads=num_heads)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.fused_norm_func = fused_norm_func
        self.norm_eps = norm_eps
        self.ca_norm = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=True)
        self.shared_aln = True
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim ** 0.5)
        if cross_attn_layer_scale >= 0:
            self.ca_gamma = nn.Parameter(cross_attn_layer_scale * torch.ones(embed_dim))
        else:
            self.ca_gamma = 1
        self.checkpointing_sa_only = False

    def forward(self, x, cond_BD, ca_kv, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None,
                rope2d_freqs_grid=None, scale_ind=0):
        with torch.autocast(device_type=x.device.type, enabled=False):
            gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)
        if self.fused_norm_func is None:
            x_sa = self.ln_wo_grad(x.float()).mul(scale1.add(1)).add_(shift1)
            x_sa = self.sa(x_sa, attn_bias_or_two_vector, attn_fn, scale_schedule, rope2d_freqs_grid)
            x = x + self.drop_path(x_sa.mul_(gamma1))
            x = x + self.ca(self.ca_norm(x), ca_kv).float().mul_(self.ca_gamma)
            x = x + self.drop_path(self.ffn(self.ln_wo_grad(x.float()).mul(scale2.add(1)).add_(shift2)).mul(gamma2))
        else:
            x_sa = self.fused_norm_func(C=self.C, eps=self.norm_eps, x=x, scale=scale1, shift=shift1)
            x_sa = self.sa(x_sa, attn_bias_or_two_vector, attn_fn, scale_schedule, rope2d_freqs_grid,
                           scale_ind=scale_ind)
            x = x + self.drop_path(x_sa.mul_(gamma1))
            x = x + self.ca(self.ca_norm(x), ca_kv).float().mul_(self.ca_gamma)
            x = x + self.drop_path(self.ffn(self.fused_norm_func(C=self.C, eps=self.norm_eps, x=x, scale=scale2,
                                                                 shift=shift2)).mul(gamma2))
        return x


class MultipleLayers(nn.Module):
    """A chunk of consecutive blocks (``.module``), as Infinity groups them for FSDP."""

    def __init__(self, ls, num_blocks_in_a_chunk: int, index: int):
        super().__init__()
        self.module = nn.ModuleList(ls[i] for i in range(index, index + num_blocks_in_a_chunk))

    def forward(self, x, cond_BD, ca_kv, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None,
                checkpointing_full_block=False, rope2d_freqs_grid=None):
        h = x
        for m in self.module:
            h = m(h, cond_BD, ca_kv, attn_bias_or_two_vector, attn_fn, scale_schedule, rope2d_freqs_grid)
        return h


class TextAttentivePool(nn.Module):
    """Pooled text -> conditioning vector (Infinity pools with a learned-query cross-attention; a masked mean
    and a linear layer here)."""

    def __init__(self, Ct5: int, D: int):
        super().__init__()
        self.proj = nn.Linear(Ct5, D)

    def forward(self, ca_kv) -> torch.Tensor:
        kv_compact, cu_seqlens_k, _ = ca_kv
        cu = cu_seqlens_k.tolist()
        pooled = torch.stack([kv_compact[a:b].mean(0) for a, b in zip(cu[:-1], cu[1:])])
        return self.proj(pooled)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, D: int, norm_eps: float = 1e-6):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).reshape(-1, 1, 6, C)


# ---------------------------------------------------------------------------------------------- model
class Infinity(nn.Module):
    """The stand-in model.

    Parameters
    ----------
    depth, embed_dim, num_heads, block_chunks:
        Transformer shape (``depth`` divisible by ``block_chunks``); head_dim = embed_dim / num_heads.
    seed:
        Every parameter is redrawn from one ``torch.Generator(seed)`` in ``named_parameters`` order on the CPU,
        so a seed gives the same model everywhere. Weights std 0.02 (output projections / sqrt(2 depth)),
        per-head query scales ``exp(scale_mul_1H11)`` in 8..24 (sharp enough for the attention to be local).
    text_channels, d_vae:
        Text feature width (Flan-T5-XL: 2048) and latent channels per token (bit labels: logits are 2 x d_vae).
    fused_norm:
        True: blocks use a fused AdaLN (the branch ``tools/run_infinity.py`` runs, which passes ``scale_ind`` to
        the self-attention); False: the unfused branch (no ``scale_ind``).
    bf16_blocks:
        Cast the blocks to bf16 as ``tools/run_infinity.py --bf16 1`` does, then run under CUDA bf16 autocast
        (CPU autocast leaves LayerNorm parameters alone, so bf16 blocks fail on the CPU, as Infinity's do).
    device:
        Where the model lives.
    """

    def __init__(self, depth: int = 4, embed_dim: int = 128, num_heads: int = 2, block_chunks: int = 2,
                 seed: int = 0, text_channels: int = 64, d_vae: int = 16, mlp_ratio: float = 4.0,
                 text_maxlen: int = 16, fused_norm: bool = True, bf16_blocks: bool = False,
                 device: str | torch.device = "cpu"):
        super().__init__()
        if depth % block_chunks:
            raise ValueError(f"depth {depth} is not a multiple of block_chunks {block_chunks}")
        self.C = self.D = embed_dim
        self.depth, self.num_heads, self.Ct5, self.d_vae = depth, num_heads, text_channels, d_vae
        self.codebook_dim = d_vae
        self.V = 2 * d_vae
        self.use_bit_label = 1
        self.text_maxlen = text_maxlen
        self.norm_eps = 1e-6
        self.add_lvl_embeding_only_first_block = 1
        self.use_flex_attn = False
        self.attn_fn_compile_dict: dict[tuple, Any] = {}
        self.cfg_uncond = nn.Parameter(torch.zeros(text_maxlen, text_channels))
        self.text_norm = nn.LayerNorm(text_channels, eps=self.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(text_channels, self.D)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(text_channels, self.D), nn.GELU(approximate="tanh"),
                                              nn.Linear(self.D, self.D))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, self.C))
        self.rope2d_freqs_grid = RopeGrid(embed_dim // num_heads)
        self.lvl_embed = nn.Embedding(15, self.C)
        self.norm0_ve = nn.Identity()
        self.word_embed = nn.Linear(d_vae, self.C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(self.D, 6 * self.C))
        fused = fused_ada_layer_norm if fused_norm else None
        self.unregistered_blocks = [
            CrossAttnBlock(self.C, self.D, num_heads, mlp_ratio, self.norm_eps, fused_norm_func=fused)
            for _ in range(depth)]
        self.head_nm = AdaLNBeforeHead(self.C, self.D, self.norm_eps)
        self.head = nn.Linear(self.C, self.V)
        self.num_block_chunks = block_chunks
        self.num_blocks_in_a_chunk = depth // block_chunks
        self.block_chunks = nn.ModuleList(
            MultipleLayers(self.unregistered_blocks, self.num_blocks_in_a_chunk, i * self.num_blocks_in_a_chunk)
            for i in range(block_chunks))
        self._init_weights(seed)
        if bf16_blocks:
            for b in self.unregistered_blocks:
                b.bfloat16()
        self.eval().requires_grad_(False)
        self.to(device)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.depth)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "scale_mul_1H11":
                p.copy_(torch.empty(p.shape).uniform_(math.log(8), math.log(24), generator=gen))
            elif name.startswith("text_norm") or name.endswith("ca_norm.weight"):
                p.fill_(1.0) if leaf == "weight" else p.zero_()
            elif leaf == "ada_gss":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif leaf == "cfg_uncond":
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(self.Ct5))
            else:
                s = out_std if name.endswith(("proj.weight", "fc2.weight")) else std
                p.copy_(torch.randn(p.shape, generator=gen) * s)

    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.head(self.head_nm(h.float(), cond_BD.float()))

    def add_lvl_embeding(self, feature: torch.Tensor, scale_ind: int, scale_schedule: Schedule,
                         need_to_pad: int = 0) -> torch.Tensor:
        bs, seq_len, _ = feature.shape
        t, h, w = scale_schedule[scale_ind]
        assert t * h * w + need_to_pad == seq_len
        feature[:, :t * h * w] += self.lvl_embed(
            torch.full((bs, t * h * w), scale_ind, dtype=torch.long, device=feature.device))
        return feature

    @torch.no_grad()
    def autoregressive_infer_cfg(self, vae=None, scale_schedule=None, label_B_or_BLT=None, B=1,
                                 negative_label_B_or_BLT=None, g_seed=None, cfg_list=(), tau_list=(),
                                 cfg_insertion_layer=(0,), inference_mode=False, ret_img=False, **ignored):
        """Generate one batch scale by scale. Returns ``(ret, idx_Bl_list, img)`` like Infinity, where ``ret`` is
        the per-scale latent ``[B, d_vae, h, w]`` (float32), ``idx_Bl_list`` the per-scale CFG-combined logits
        ``[B, h*w, 2*d_vae]`` and ``img`` the accumulated latent on the last grid ``[B, d_vae, H, W]``.

        In place of sampling bits, a token's latent is ``p(bit=1) - p(bit=0)`` of each of its ``d_vae`` bit
        logit pairs, divided by ``sqrt(d_vae)`` (the BSQ code of the expected bits); as in Infinity, each scale's
        latent is upsampled (bilinear) to the last grid and summed, and the next scale's input is that sum
        resized (area) to the next grid, embedded by ``word_embed`` and repeated over the CFG halves."""
        assert len(cfg_list) >= len(scale_schedule)
        if list(cfg_insertion_layer) != [0]:
            raise NotImplementedError("the stand-in applies CFG on the logits only (cfg_insertion_layer=[0])")
        kv_compact, lens, cu_seqlens_k, max_seqlen_k = label_B_or_BLT
        cfg_on = any(c != 1 for c in cfg_list)
        if cfg_on:
            bs = 2 * B
            kv_un = kv_compact.clone()
            total = 0
            for le in lens:
                kv_un[total:total + le] = self.cfg_uncond[:le]
                total += le
            kv_compact = torch.cat((kv_compact, kv_un), dim=0)
            cu_seqlens_k = torch.cat((cu_seqlens_k, cu_seqlens_k[1:] + cu_seqlens_k[-1]), dim=0)
        else:
            bs = B
        kv_compact = self.text_norm(kv_compact)
        sos = cond_BD = self.text_proj_for_sos((kv_compact, cu_seqlens_k, max_seqlen_k))
        kv_compact = self.text_proj_for_ca(kv_compact)
        ca_kv = kv_compact, cu_seqlens_k, max_seqlen_k
        last_stage = sos.unsqueeze(1).expand(bs, 1, -1) + self.pos_start.expand(bs, 1, -1)
        with torch.autocast(device_type=last_stage.device.type, enabled=False):
            cond_BD_or_gss = self.shared_ada_lin(cond_BD.float()).float().contiguous()

        if inference_mode:
            for b in self.unregistered_blocks:
                b.sa.kv_caching(True)
        else:  # Infinity walks block_chunks here (its `.module.module` would fail; the intent is kept)
            for chunk in self.block_chunks:
                for module in chunk.module:
                    module.sa.kv_caching(True)

        ret, logits_list = [], []
        _, last_h, last_w = scale_schedule[-1]
        summed = torch.zeros(B, self.d_vae, last_h, last_w, device=last_stage.device)
        for si, pn in enumerate(scale_schedule):
            cfg = cfg_list[si]
            attn_fn = None
            if self.use_flex_attn:
                attn_fn = self.attn_fn_compile_dict.get(tuple(scale_schedule[:si + 1]), None)
            for block_idx, b in enumerate(self.block_chunks):
                if self.add_lvl_embeding_only_first_block and block_idx == 0:
                    last_stage = self.add_lvl_embeding(last_stage, si, scale_schedule)
                for m in b.module:
                    last_stage = m(x=last_stage, cond_BD=cond_BD_or_gss, ca_kv=ca_kv, attn_bias_or_two_vector=None,
                                   attn_fn=attn_fn, scale_schedule=scale_schedule,
                                   rope2d_freqs_grid=self.rope2d_freqs_grid, scale_ind=si)
            if cfg_on:
                logits = self.get_logits(last_stage, cond_BD)
                logits = cfg * logits[:B] + (1 - cfg) * logits[B:]
            else:
                logits = self.get_logits(last_stage[:B], cond_BD[:B])
            logits_list.append(logits)
            _, h, w = pn
            probs = logits.reshape(B, h * w, self.d_vae, 2).softmax(dim=-1)
            code = (probs[..., 1] - probs[..., 0]).div(math.sqrt(self.d_vae))  # B, hw, d
            code = code.transpose(1, 2).reshape(B, self.d_vae, h, w)
            ret.append(code)
            summed = summed + F.interpolate(code, size=(last_h, last_w), mode="bilinear", align_corners=False)
            if si != len(scale_schedule) - 1:
                _, nh, nw = scale_schedule[si + 1]
                nxt = F.interpolate(summed, size=(nh, nw), mode="area")
                last_stage = self.word_embed(self.norm0_ve(nxt.reshape(B, self.d_vae, -1).transpose(1, 2)))
                last_stage = last_stage.repeat(bs // B, 1, 1)

        for b in self.unregistered_blocks:
            b.sa.kv_caching(False)
        return ret, logits_list, summed


def make_text(B: int = 1, text_len: int = 8, text_channels: int = 64, seed: int = 0,
              device: str | torch.device = "cpu", lens: Sequence[int] | None = None):
    """Random T5-shaped text features packed as Infinity's ``label_B_or_BLT``:
    ``(kv_compact [sum(lens), C], lens, cu_seqlens_k int32 [B+1], max_seqlen_k)``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    lens = list(lens) if lens is not None else [text_len] * B
    kv_compact = torch.randn(sum(lens), text_channels, generator=gen).to(device)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    return kv_compact, lens, cu, max(lens)


def schedule_of(grids: Sequence[tuple[int, int] | int]) -> list[tuple[int, int, int]]:
    """``[1, 2, (4, 3)]`` -> ``[(1, 1, 1), (1, 2, 2), (1, 4, 3)]`` (Infinity's ``(t, h, w)`` at t=1)."""
    out = []
    for g in grids:
        h, w = (g, g) if isinstance(g, int) else g
        out.append((1, int(h), int(w)))
    return out
