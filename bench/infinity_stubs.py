"""Clearly labelled stand-ins for what FoundationVision/Infinity's model code imports but a host may lack, and a
cheap stand-in of its BSQ tokenizer, so that ``bench/real_infinity.py`` runs Infinity's own transformer code on a
bare GPU host (no network, no ``flash_attn`` wheel) and on a CPU.

Nothing here is Infinity's code. :func:`install` puts a stand-in into ``sys.modules`` only where ``import NAME``
fails, and returns what it installed, so that every result records which parts of the run were not the real thing:

``flash_attn`` (STAND-IN: SDPA)
    ``flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, ...)`` on ``[B, L, H, D]`` and
    ``flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)`` on
    packed ``q [total_q, H, D]`` / ``kv [total_k, 2, H_kv, D]``, both through
    ``torch.nn.functional.scaled_dot_product_attention``. Infinity imports both; at inference it only calls the
    varlen one (cross-attention to the text). ``flash_attn.ops.*`` stay missing, so Infinity takes its own
    ImportError path (no fused ops), as it does without FlashAttention's extensions. Neither function syncs with
    the host, so CUDA-graph capture of a block still works.
``timm`` (STAND-IN: the three names Infinity imports)
    ``timm.models.register_model`` (returns the function), ``timm.models.layers.DropPath`` / ``drop_path``
    (identity at inference, stochastic depth in training) and ``timm.loss.SoftTargetCrossEntropy``.
``pytz`` (STAND-IN: fixed offsets)
    ``pytz.timezone(name)``: Infinity only formats log time stamps with it ('Asia/Shanghai' -> UTC+8).

:class:`StandInBSQVAE` (STAND-IN for ``infinity.models.bsq_vae``)
    What ``Infinity.__init__`` and ``autoregressive_infer_cfg(vae_type != 0)`` read: ``embed_dim``,
    ``vocab_size``, ``quantizer.lfq.mask``, ``quantizer.lfq.indices_to_codes(idx, label_type='bit_label')`` (bits
    -> BSQ codes ``(2 bits - 1) / sqrt(d)``, channel first) and ``quantizer.z_interplote_up``. No encoder and no
    decoder: images are not decoded (``ret_img=False``). It can record the bit labels of every scale, which is how
    the benchmark teacher-forces a run (``gt_leak``).
"""

from __future__ import annotations

import datetime
import importlib
import math
import sys
import types
from typing import Any

import torch
import torch.nn.functional as F

LABEL = "STAND-IN (bench/infinity_stubs.py, not the real package)"


# ---------------------------------------------------------------------------------------------- flash_attn
def _expand_kv_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[..., H_kv, L, D]`` -> ``[..., heads, L, D]`` (grouped-query attention as flash does it)."""
    hk = t.shape[-3]
    return t if hk == heads else t.repeat_interleave(heads // hk, dim=-3)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """STAND-IN of ``flash_attn.flash_attn_func`` through SDPA: q ``[B, Lq, H, D]``, k/v ``[B, Lk, H_kv, D]`` ->
    ``[B, Lq, H, D]``. ``causal`` is aligned to the bottom right, as flash aligns it when Lq != Lk."""
    if window_size != (-1, -1) or softcap or alibi_slopes is not None or return_attn_probs:
        raise NotImplementedError("flash_attn stand-in: window_size, softcap, alibi_slopes and return_attn_probs "
                                  "are not supported")
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kh, vh = _expand_kv_heads(kh, qh.shape[1]), _expand_kv_heads(vh, qh.shape[1])
    mask = None
    if causal:
        lq, lk = qh.shape[2], kh.shape[2]
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        mask = j <= i + (lk - lq)
    out = F.scaled_dot_product_attention(qh, kh, vh.to(qh.dtype), attn_mask=mask, dropout_p=dropout_p,
                                         scale=softmax_scale)
    return out.transpose(1, 2)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """STAND-IN of ``flash_attn.flash_attn_varlen_kvpacked_func`` through SDPA: packed q ``[total_q, H, D]``,
    kv ``[total_k, 2, H_kv, D]``, int32 ``cu_seqlens_*`` ``[batch + 1]`` -> ``[total_q, H, D]``; sample b's
    queries attend to sample b's keys only.

    Where every sample has ``max_seqlen_q`` queries (Infinity's cross-attention: ``Lq`` image tokens per sample),
    the keys are gathered into a padded ``[batch, H, max_seqlen_k, D]`` with a length mask; otherwise one
    block-diagonal mask over all tokens. Both read the lengths on the device only (no host sync)."""
    if causal or window_size != (-1, -1) or softcap or alibi_slopes is not None or return_attn_probs:
        raise NotImplementedError("flash_attn stand-in: only non-causal varlen attention is supported")
    total_q, heads, dim = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    k, v = kv.unbind(dim=1)  # total_k, H_kv, D
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.long)
    if total_q == batch * max_seqlen_q:
        lens = cu_k[1:] - cu_k[:-1]
        pos = torch.arange(max_seqlen_k, device=q.device)
        idx = (cu_k[:-1, None] + pos[None]).clamp_max(k.shape[0] - 1)  # batch, max_k
        kp = k[idx].permute(0, 2, 1, 3)  # batch, H_kv, max_k, D
        vp = v[idx].permute(0, 2, 1, 3)
        mask = (pos[None] < lens[:, None])[:, None, None, :]  # batch, 1, 1, max_k
        qp = q.view(batch, max_seqlen_q, heads, dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(qp, _expand_kv_heads(kp, heads).to(qp.dtype),
                                             _expand_kv_heads(vp, heads).to(qp.dtype), attn_mask=mask,
                                             dropout_p=dropout_p, scale=softmax_scale)
        return out.transpose(1, 2).reshape(total_q, heads, dim)
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.long)
    seg_q = torch.searchsorted(cu_q[1:], torch.arange(total_q, device=q.device), right=True)
    seg_k = torch.searchsorted(cu_k[1:], torch.arange(k.shape[0], device=q.device), right=True)
    mask = (seg_q[:, None] == seg_k[None, :])[None, None]
    qh = q.transpose(0, 1)[None]
    kh = _expand_kv_heads(k.transpose(0, 1)[None], heads).to(qh.dtype)
    vh = _expand_kv_heads(v.transpose(0, 1)[None], heads).to(qh.dtype)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale)
    return out[0].transpose(0, 1)


def _flash_attn_module() -> types.ModuleType:
    mod = types.ModuleType("flash_attn", doc=f"flash_attn {LABEL}: SDPA under FlashAttention's names.")
    mod.__version__ = "0.0.0+sparvar-standin"
    mod.flash_attn_func = flash_attn_func
    mod.flash_attn_varlen_kvpacked_func = flash_attn_varlen_kvpacked_func
    mod.SPARVAR_STANDIN = True
    return mod


# ---------------------------------------------------------------------------------------------- timm
def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    """Stochastic depth (per sample); the identity at inference."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep) if scale_by_keep else x * mask


class DropPath(torch.nn.Module):
    """STAND-IN of ``timm.models.layers.DropPath``."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)


class SoftTargetCrossEntropy(torch.nn.Module):
    """STAND-IN of ``timm.loss.SoftTargetCrossEntropy``."""

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sum(-target * F.log_softmax(x, dim=-1), dim=-1).mean()


def register_model(fn):
    """STAND-IN of ``timm.models.register_model``: registers nothing, returns ``fn``."""
    return fn


def _timm_modules() -> dict[str, types.ModuleType]:
    timm = types.ModuleType("timm", doc=f"timm {LABEL}.")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    loss = types.ModuleType("timm.loss")
    timm.__path__, models.__path__ = [], []  # packages, so `import timm.models.layers` resolves from sys.modules
    timm.__version__ = "0.0.0+sparvar-standin"
    models.register_model = register_model
    layers.DropPath, layers.drop_path = DropPath, drop_path
    loss.SoftTargetCrossEntropy = SoftTargetCrossEntropy
    timm.models, timm.loss, models.layers = models, loss, layers
    for m in (timm, models, layers, loss):
        m.SPARVAR_STANDIN = True
    return {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.loss": loss}


# ---------------------------------------------------------------------------------------------- pytz
def _pytz_module() -> types.ModuleType:
    mod = types.ModuleType("pytz", doc=f"pytz {LABEL}: fixed UTC offsets.")
    offsets = {"Asia/Shanghai": 8, "UTC": 0}

    def timezone(name: str) -> datetime.tzinfo:
        return datetime.timezone(datetime.timedelta(hours=offsets.get(name, 0)), name)

    mod.timezone, mod.utc, mod.SPARVAR_STANDIN = timezone, datetime.timezone.utc, True
    return mod


# ---------------------------------------------------------------------------------------------- install
STANDINS = {
    "flash_attn": (_flash_attn_module, "flash_attn_func / flash_attn_varlen_kvpacked_func through SDPA"),
    "timm": (_timm_modules, "register_model, DropPath (identity at inference), SoftTargetCrossEntropy"),
    "pytz": (_pytz_module, "timezone() with fixed offsets (log time stamps only)"),
}


def install(names=tuple(STANDINS), force: tuple[str, ...] = ()) -> dict[str, str]:
    """Install a stand-in for every package of ``names`` that cannot be imported (or is in ``force``).

    Returns ``{package: what the stand-in provides}`` for the stand-ins now in ``sys.modules`` (including ones
    installed earlier in this process)."""
    used: dict[str, str] = {}
    for name in names:
        make, what = STANDINS[name]
        present = sys.modules.get(name)
        if present is not None and getattr(present, "SPARVAR_STANDIN", False):
            used[name] = what
            continue
        if name not in force:
            try:
                importlib.import_module(name)
                continue
            except ImportError:
                pass
        made = make()
        for mod_name, mod in (made.items() if isinstance(made, dict) else [(name, made)]):
            sys.modules[mod_name] = mod
        used[name] = what
    return used


# ---------------------------------------------------------------------------------------------- VAE
class _LFQ(torch.nn.Module):
    def __init__(self, codebook_dim: int, owner: "StandInBSQVAE"):
        super().__init__()
        self.codebook_dim = codebook_dim
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1), persistent=False)
        self._owner = [owner]  # a list: not a submodule

    def indices_to_codes(self, indices: torch.Tensor, label_type: str = "int_label", project_out: bool = True):
        """Bit labels ``[B, 1, h, w, d]`` (0/1) -> BSQ codes ``[B, d, 1, h, w]`` of norm 1 per token."""
        if label_type != "bit_label":
            raise NotImplementedError("the VAE stand-in decodes bit labels only (Infinity-2B/8B use them)")
        owner = self._owner[0]
        if owner.recording is not None:
            owner.recording.append(indices.detach().clone())
        codes = (indices.float() * 2 - 1) / math.sqrt(indices.shape[-1])
        return codes.movedim(-1, 1)


class _Quantizer(torch.nn.Module):
    def __init__(self, codebook_dim: int, owner: "StandInBSQVAE"):
        super().__init__()
        self.lfq = _LFQ(codebook_dim, owner)
        self.z_interplote_up = "trilinear"


class StandInBSQVAE(torch.nn.Module):
    """STAND-IN of Infinity's BSQ-VAE, inference side only (see the module docstring).

    Parameters
    ----------
    codebook_dim:
        Bits per token (Infinity-2B: 32; Infinity-8B: 14, with ``apply_spatial_patchify`` turning a transformer
        token into 2x2 VAE tokens).
    """

    SPARVAR_STANDIN = True

    def __init__(self, codebook_dim: int):
        super().__init__()
        self.embed_dim = self.codebook_dim = codebook_dim
        self.vocab_size = 2 ** codebook_dim
        self.quantizer = _Quantizer(codebook_dim, self)
        self.recording: list[torch.Tensor] | None = None

    def start_recording(self) -> None:
        """Keep every scale's bit labels (a fresh list per image)."""
        self.recording = []

    def stop_recording(self) -> list[torch.Tensor]:
        got, self.recording = self.recording or [], None
        return got

    def decode(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("the VAE stand-in has no decoder: run autoregressive_infer_cfg(ret_img=False)")
