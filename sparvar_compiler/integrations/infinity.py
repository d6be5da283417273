"""Run FoundationVision/Infinity's self-attention through a sparvar module: one call patches a loaded model.

    import sparvar_compiler.runtime as rt
    from sparvar_compiler.integrations import infinity as sv

    modules = rt.load("out/infinity-8b-all-h100")     # a module, or a module set (every aspect ratio)
    sv.apply(infinity, modules)                       # infinity: infinity.models.infinity.Infinity, loaded
    infinity.autoregressive_infer_cfg(...)            # unchanged call; self-attention now runs the plan
    sv.remove(infinity)                               # exactly the model it was

What it hooks, in Infinity's own names (``infinity/models/basic.py`` and ``infinity.py``):

* ``Infinity.unregistered_blocks`` lists the blocks in layer order (``block_chunks`` hold the same objects), so
  block ``i`` is layer ``i``. Each ``CrossAttnBlock`` (or ``SelfAttnBlock``) has its self-attention at ``.sa``
  (``.attn``), a ``SelfAttention``; cross-attention (``.ca``) is left alone.
* ``SelfAttention.forward`` calls ``attn_fn(q, k, v, scale=self.scale)`` instead of SDPA when
  ``self.use_flex_attn`` is set and an ``attn_fn`` is passed, after its cosine normalisation, RoPE and KV-cache
  append; the block passes its ``attn_fn`` argument through. ``apply`` sets ``use_flex_attn`` on each
  self-attention and wraps each block's ``forward`` so that its ``attn_fn`` is this layer's sparvar call. That
  is the model's own extension point: nothing of Infinity's code is replaced.
* The block receives ``scale_schedule`` (the image's ``(t, h, w)`` per scale): a module set picks its member by
  it. The scale of a call comes from the lengths: the queries are the current scale's tokens and the keys the
  KV cache so far, and ``(tokens, kv_len)`` names one scale of a schedule. The batch (CFG doubles it) is the
  tensors' batch.
* Under bf16 autocast Infinity hands float32 q, k (L2-normalised, RoPE applied) and a bf16 v, with
  ``scale=1``, no mask. SDPA under autocast would compute in bf16; so does the module: q and k are cast to the
  module's dtype (bf16), and the output is cast back to v's dtype if it differs.
* ``customized_flash_attn=True`` blocks call ``flash_attn_func`` on a different layout before this hook: they
  are refused with a message (Infinity's inference scripts build the model with ``customized_flash_attn=False``).

Calls go through ``torch.ops.sparvar.attention`` (:mod:`sparvar_compiler.runtime.op`), so a patched model
compiles with ``torch.compile(fullgraph=True)``. ``graphs=True`` (CUDA only) also captures each block's forward
per (schedule, scale, layer, shapes) in a CUDA graph: the first image runs eagerly (warm-up), the second
captures, later ones replay - the eager Infinity image spends most of its non-attention time launching kernels.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from ..errors import SparvarError

_PATCH_ATTR = "_sparvar_patch"


class IntegrationError(SparvarError):
    """A model that does not have the structure this integration hooks, or a module that does not fit it."""


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks in layer order."""
    blocks = getattr(model, "unregistered_blocks", None)
    if blocks is None and hasattr(model, "block_chunks"):
        blocks = [b for chunk in model.block_chunks for b in chunk.module]
    if blocks is None and hasattr(model, "blocks"):
        blocks = list(model.blocks)
    if not blocks:
        raise IntegrationError(f"{type(model).__name__} has no 'unregistered_blocks', 'block_chunks' or 'blocks': "
                               f"not an Infinity model")
    return list(blocks)


def _self_attention(block: torch.nn.Module, layer: int) -> torch.nn.Module:
    sa = getattr(block, "sa", None) or getattr(block, "attn", None)
    if sa is None:
        raise IntegrationError(f"block {layer} ({type(block).__name__}) has no self-attention at .sa or .attn")
    for name in ("use_flex_attn", "num_heads", "head_dim", "scale"):
        if not hasattr(sa, name):
            raise IntegrationError(f"block {layer}'s self-attention ({type(sa).__name__}) has no '{name}': not "
                                   f"Infinity's SelfAttention")
    if getattr(sa, "using_flash", False):
        raise IntegrationError(f"block {layer}'s self-attention uses flash_attn_func (the model was built with "
                               f"customized_flash_attn=True); build it with customized_flash_attn=False, as "
                               f"Infinity's inference scripts do, so that attention goes through attn_fn")
    return sa


def _arg_index(fn: Callable, name: str) -> int | None:
    """Position of parameter ``name`` in ``fn``'s positional parameters (None if it has none)."""
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    return names.index(name) if name in names else None


@dataclass
class InfinityPatch:
    """What :func:`apply` did to one model (kept on it, used by :func:`remove`).

    Attributes
    ----------
    modules:
        The runtime module, or module set, that self-attention runs through.
    graphs:
        Whether block forwards are captured in CUDA graphs.
    use_op:
        Whether calls go through ``torch.ops.sparvar.attention`` (else the module's Python method).
    calls:
        ``{(member, scale, layer): count}`` of attention calls so far (eager calls; replays are not counted).
    attention:
        Each layer's ``attn_fn`` object (:class:`LayerAttention`), in layer order.
    """

    modules: Any
    graphs: bool
    use_op: bool
    blocks: list[torch.nn.Module]
    saved: list[tuple[torch.nn.Module, torch.nn.Module, bool, bool]] = field(default_factory=list)
    calls: dict[tuple[str, int, int], int] = field(default_factory=dict)
    schedule: tuple[tuple[int, int], ...] | None = None
    block_graphs: "BlockGraphs | None" = None
    attention: list[Any] = field(default_factory=list)

    def member(self):
        """The module the current image runs through."""
        from ..runtime.moduleset import ModuleSet

        if not isinstance(self.modules, ModuleSet):
            return self.modules
        if self.schedule is None:
            raise IntegrationError("a module set needs the image's scale_schedule to pick its member, and no block "
                                   "call passed one")
        return self.modules.member_for(self.schedule)


class LayerAttention:
    """Infinity's ``attn_fn`` for one layer: ``(q, k, v, scale=...) -> out`` through the module.

    While ``appending`` (the block wrapper turned Infinity's own cache off for the call), k and v are this
    scale's tokens only and the layer's KV cache is kept here, in the module's dtype: each scale casts and
    appends its own tokens once, where Infinity would grow a float32 cache and attention would cast all of it
    again (at 1024 px that is most of the memory traffic outside the matmuls). ``reset`` starts an image.
    """

    def __init__(self, patch: InfinityPatch, layer: int):
        self._patch = patch
        self.layer = layer
        self.appending = False
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset(self) -> None:
        self.kv = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                 **unused: Any) -> torch.Tensor:
        patch = self._patch
        module = patch.member()
        dtype = module.dtype
        # What SDPA does under autocast (Infinity passes float32 q/k and a bf16 v): compute in the module's dtype.
        q = q if q.dtype == dtype and q.is_contiguous() else q.to(dtype).contiguous()
        v_out = v.dtype
        if self.appending:
            k_new, v_new = k.to(dtype), v.to(dtype)
            if self.kv is None:
                k, v = k_new.contiguous(), v_new.contiguous()
            else:
                k, v = torch.cat((self.kv[0], k_new), dim=2), torch.cat((self.kv[1], v_new), dim=2)
            self.kv = (k, v)
        scale_index = module.scale_of(q.shape[2], k.shape[2])
        k, v_in = (t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous() for t in (k, v))
        if patch.use_op:
            out = module.attention_op(q, k, v_in, scale_index, self.layer, scale)
        else:
            out = module.attention(q, k, v_in, scale_index, self.layer, scale=scale)
        if not torch.compiler.is_compiling():
            key = (module.manifest["plan"]["aspect"], scale_index, self.layer)
            patch.calls[key] = patch.calls.get(key, 0) + 1
        return out if out.dtype == v_out else out.to(v_out)


def _load(modules: Any, device: Any) -> Any:
    from ..runtime import load
    from ..runtime.module import SparvarModule
    from ..runtime.moduleset import ModuleSet

    if isinstance(modules, (str, Path)):
        return load(modules, device)
    if not isinstance(modules, (SparvarModule, ModuleSet)):
        raise IntegrationError(f"modules must be a loaded module, a module set or a path, got "
                               f"{type(modules).__name__}")
    return modules


def _check_fit(modules: Any, blocks: list[torch.nn.Module], sas: list[torch.nn.Module]) -> None:
    from ..runtime.moduleset import ModuleSet

    members = list(modules) if isinstance(modules, ModuleSet) else [modules]
    for m in members:
        model = m.manifest["model"]
        name = f"{model['name']} ({m.manifest['plan']['aspect']})"
        if model["depth"] != len(blocks):
            raise IntegrationError(f"module {name} plans {model['depth']} layers, the model has {len(blocks)} blocks")
        sa = sas[0]
        if model["heads"] != sa.num_heads or model["head_dim"] != sa.head_dim:
            raise IntegrationError(f"module {name} is for {model['heads']} heads of {model['head_dim']}, the model "
                                   f"has {sa.num_heads} heads of {sa.head_dim}")
        if model.get("family") == "infinity" and float(m.default_scale) != float(sa.scale):
            raise IntegrationError(f"module {name}'s softmax scale is {m.default_scale}, the model's "
                                   f"self-attention uses {sa.scale}")


def apply(model: torch.nn.Module, modules: Any, *, graphs: bool = False, use_op: bool = True,
          own_kv_cache: bool = True, device: Any = None) -> InfinityPatch:
    """Patch a loaded Infinity model in place so that every self-attention call runs through ``modules``.

    Parameters
    ----------
    model:
        An ``infinity.models.infinity.Infinity`` (or anything with its block structure; see the module
        docstring), built with ``customized_flash_attn=False``.
    modules:
        A loaded runtime module (:func:`sparvar_compiler.runtime.load`), a module set (every aspect ratio the
        model serves; the member is picked by the image's ``scale_schedule``), or a path to either.
    graphs:
        Also capture each block's forward in a CUDA graph per (schedule, scale, layer, input shapes): first
        image eager, second captured, later ones replayed. CUDA only.
    use_op:
        Call through ``torch.ops.sparvar.attention`` (default; needed for ``torch.compile``) or the module's
        Python method directly.
    own_kv_cache:
        Keep each layer's KV cache in the module's dtype here, appending each scale's tokens once, instead of
        Infinity's float32 cache that attention casts whole at every scale (default; the numbers are the same,
        since casting a concatenation is concatenating the casts). Infinity's ``kv_caching`` resets it.
    device:
        Where to load ``modules`` when it is a path (default: CUDA if available).

    Returns
    -------
    InfinityPatch
        Kept on the model as ``model._sparvar_patch``; :func:`remove` undoes it.

    Raises
    ------
    IntegrationError
        The model is already patched, lacks Infinity's structure, uses flash_attn blocks, or does not fit the
        module (depth, heads, head dim, softmax scale).
    """
    if getattr(model, _PATCH_ATTR, None) is not None:
        raise IntegrationError("this model is already patched; call remove(model) first")
    blocks = _blocks(model)
    sas = [_self_attention(b, i) for i, b in enumerate(blocks)]
    modules = _load(modules, device)
    _check_fit(modules, blocks, sas)
    if graphs and not torch.cuda.is_available():
        raise IntegrationError("graphs=True needs CUDA (CUDA graphs); leave it off on the CPU")
    patch = InfinityPatch(modules, graphs, use_op, blocks)
    if graphs:
        patch.block_graphs = BlockGraphs()
    _install(model, patch, sas, lambda layer: LayerAttention(patch, layer), own_cache=own_kv_cache)
    return patch


def _install(model: torch.nn.Module, patch: InfinityPatch, sas: list[torch.nn.Module],
             attention: Callable[[int], Callable], own_cache: bool = False) -> None:
    """Wrap every block's forward to pass ``attention(layer)`` as its ``attn_fn`` and switch the hook on; with
    ``own_cache`` the attention keeps the KV cache (see :class:`LayerAttention`), reset by ``kv_caching``."""
    for layer, (block, sa) in enumerate(zip(patch.blocks, sas)):
        attn_fn = attention(layer)
        patch.attention.append(attn_fn)
        own = own_cache and hasattr(sa, "caching") and callable(getattr(sa, "kv_caching", None))
        patch.saved.append((block, sa, bool(sa.use_flex_attn), "forward" in vars(block),
                            "kv_caching" in vars(sa) if own else None))
        block.forward = _wrap_forward(patch, layer, block.forward, attn_fn, sa if own else None)
        if own:
            sa.kv_caching = _wrap_kv_caching(sa.kv_caching, attn_fn)
        sa.use_flex_attn = True
    setattr(model, _PATCH_ATTR, patch)


def _wrap_kv_caching(original: Callable, attn_fn: LayerAttention) -> Callable:
    """Infinity's ``kv_caching(enable)`` (called at the start and end of every image) also resets our cache."""

    def kv_caching(enable: bool) -> Any:
        attn_fn.reset()
        return original(enable)

    kv_caching.__wrapped__ = original  # type: ignore[attr-defined]
    return kv_caching


def _wrap_forward(patch: InfinityPatch, layer: int, original: Callable, attn_fn: Callable,
                  sa: torch.nn.Module | None = None) -> Callable:
    """The block's forward with this layer's ``attn_fn`` (and the image's schedule recorded); with ``sa`` (the
    block's self-attention, when the attention owns the KV cache) Infinity's own caching is off for the call."""
    i_attn = _arg_index(original, "attn_fn")
    i_sched = _arg_index(original, "scale_schedule")
    if i_attn is None:
        raise IntegrationError(f"block {layer}'s forward takes no attn_fn: not Infinity's block")
    patch_ref = patch

    def call(*args: Any, **kwargs: Any) -> Any:
        if sa is None or not sa.caching:
            return original(*args, **kwargs)
        sa.caching = False
        attn_fn.appending = True
        try:
            return original(*args, **kwargs)
        finally:
            sa.caching = True
            attn_fn.appending = False

    def forward(*args: Any, **kwargs: Any) -> Any:
        schedule = kwargs.get("scale_schedule") if i_sched is None or len(args) <= i_sched else args[i_sched]
        if schedule is not None:
            patch_ref.schedule = tuple((int(g[-2]), int(g[-1])) for g in schedule)
        if len(args) > i_attn:
            args = (*args[:i_attn], attn_fn, *args[i_attn + 1:])
        else:
            kwargs["attn_fn"] = attn_fn
        if patch_ref.block_graphs is not None and not torch.compiler.is_compiling():
            return patch_ref.block_graphs.run(layer, call, args, kwargs)
        return call(*args, **kwargs)

    forward.__wrapped__ = original  # type: ignore[attr-defined]
    forward._sparvar_layer = layer  # type: ignore[attr-defined]
    return forward


def remove(model: torch.nn.Module) -> None:
    """Undo :func:`apply`: every block's forward and ``use_flex_attn`` as they were."""
    patch: InfinityPatch | None = getattr(model, _PATCH_ATTR, None)
    if patch is None:
        raise IntegrationError("this model is not patched by sparvar")
    for block, sa, use_flex, had_forward, had_kv_caching in patch.saved:
        if had_forward:
            block.forward = block.forward.__wrapped__
        else:
            del block.forward
        if had_kv_caching is not None:
            if had_kv_caching:
                sa.kv_caching = sa.kv_caching.__wrapped__
            else:
                del sa.kv_caching
        sa.use_flex_attn = use_flex
    if patch.block_graphs is not None:
        patch.block_graphs.clear()
    delattr(model, _PATCH_ATTR)


def patched(model: torch.nn.Module) -> InfinityPatch | None:
    """The model's :class:`InfinityPatch`, or None."""
    return getattr(model, _PATCH_ATTR, None)


class _CaptureStats:
    """What the capture hooks saw, for the message when nothing was recorded."""

    def __init__(self) -> None:
        self.calls = 0
        self.matched = 0
        self.first: tuple[int, int] | None = None


class _CaptureAttention:
    """Dense attention (what SDPA under autocast computes) that first hands q/k/v to a capture writer.

    Stored is what attention computes on: q and k in v's dtype (Infinity under bf16 autocast hands float32 q/k
    and a bf16 v; SDPA under autocast computes in bf16), unless the writer asks for a dtype of its own. With
    ``kv="scale"`` only this scale's keys/values are stored (the last ``tokens`` of the cache; the loader
    concatenates scales 0..s), which halves the bytes of a generation; each scale checks that the cache it sees
    starts with the keys the previous scale stored (Infinity's cache is a concatenation), else it refuses.
    """

    def __init__(self, writer: Any, layer: int, layers: frozenset[int] | None, patch: InfinityPatch,
                 stats: _CaptureStats, kv: str):
        self.writer, self.layer, self.layers, self.patch, self.stats, self.kv = writer, layer, layers, patch, stats, kv
        self._last: tuple[int, int, torch.Tensor] | None = None  # (scale, kv_len, last key row) stored before

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                 **unused: Any) -> torch.Tensor:
        stats = self.stats
        stats.calls += 1
        if stats.first is None:
            stats.first = (int(q.shape[2]), int(k.shape[2]))
        scale_index = self.writer.match_scale(q.shape[2], k.shape[2])
        if scale_index is not None:
            stats.matched += 1
            if self.layers is None or self.layer in self.layers:
                self._save(scale_index, q, k, v)
                key = ("capture", scale_index, self.layer)
                self.patch.calls[key] = self.patch.calls.get(key, 0) + 1
        dtype = v.dtype
        return torch.nn.functional.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v, scale=scale)

    def _save(self, scale_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kv_len, tokens = int(k.shape[2]), int(q.shape[2])
        k_s, v_s = k, v
        if self.kv == "scale" and kv_len != tokens:
            last = self._last
            if last is None or last[0] != scale_index - 1 or last[1] != kv_len - tokens or \
                    not torch.equal(k[:, :, last[1] - 1:last[1]], last[2]):
                raise IntegrationError(
                    f"layer {self.layer}, scale {scale_index}: the KV cache does not start with the keys captured at "
                    f"scale {scale_index - 1} (or that scale was not captured), so storing this scale's keys alone "
                    f"would rebuild a wrong cache; capture with kv='cache' to store the whole cache of every scale")
            k_s, v_s = k[:, :, -tokens:], v[:, :, -tokens:]
        if self.writer.dtype is None and q.dtype != v.dtype:
            q, k_s = q.to(v.dtype), k_s.to(v.dtype)
        self.writer.save(scale_index, self.layer, q, k_s, v_s)
        self._last = (scale_index, kv_len, k[:, :, -1:].clone())


@contextlib.contextmanager
def capture(model: torch.nn.Module, writer: Any, layers: Iterable[int] | None = None,
            heads: Iterable[int] | None = None, kv: str = "scale") -> Iterator[InfinityPatch]:
    """Record the q/k/v every self-attention call hands to attention (after Infinity's normalisation, RoPE and
    KV-cache append) into ``writer``, through the same hook as :func:`apply`; attention itself stays dense.
    Unlike patching SDPA, this sees Infinity's calls whatever name its code imported SDPA under::

        writer = CaptureWriter("caps", "infinity-8b", resolution=1024, aspect="1:1")
        with sv.capture(infinity, writer, layers=range(0, 40, 4), heads=[0, 7, 14, 21]):
            infinity.autoregressive_infer_cfg(...)          # one image

    Parameters
    ----------
    model:
        A loaded Infinity model (``customized_flash_attn=False``), not patched by :func:`apply`.
    writer:
        A :class:`sparvar_compiler.fidelity.hooks.CaptureWriter` of the model and the schedule generated. Its
        softmax scale (by default the family's, 1.0) must be the model's ``sa.scale``; a writer without one (a
        custom model) takes the model's.
    layers:
        Layers to record (default all).
    heads:
        Heads to store, in order (default: the writer's, else all); the index lists them.
    kv:
        ``"scale"`` (default): store each scale's own keys/values, the loader rebuilds the cache; ``"cache"``: store
        the whole cache at every scale (about twice the bytes).

    Stored dtype: what attention computes on (bf16 under Infinity's bf16 autocast), unless the writer has a
    ``dtype``. Wrap exactly one generation: a second one would capture each (scale, layer) again, which the
    writer refuses.

    Raises
    ------
    IntegrationError
        Before anything runs: the model is patched or not Infinity-shaped, it does not fit the writer's model
        (depth, heads, head dim), its ``sa.scale`` disagrees with the writer's softmax scale, or ``layers`` /
        ``heads`` / ``kv`` are out of range. At exit (when the block itself did not raise): nothing was recorded,
        with the likely cause (no call reached the hook, the writer's schedule is not the one generated, or
        ``layers`` filtered out every call), or a chosen layer lacks some scale of the writer's schedule (another
        schedule was generated: Infinity's schedules share their first scales).
    """
    from ..fidelity.captures import CaptureError, ranges_text
    from ..fidelity.hooks import nothing_recorded

    if getattr(model, _PATCH_ATTR, None) is not None:
        raise IntegrationError("this model is already patched; call remove(model) first")
    if kv not in ("scale", "cache"):
        raise IntegrationError(f"kv must be 'scale' or 'cache', not {kv!r}")
    blocks = _blocks(model)
    sas = [_self_attention(b, i) for i, b in enumerate(blocks)]
    spec = writer.model
    if spec.depth != len(blocks) or spec.heads != sas[0].num_heads or spec.head_dim != sas[0].head_dim:
        raise IntegrationError(f"the writer is for {spec.name} ({spec.depth} layers of {spec.heads} heads of "
                               f"{spec.head_dim}), the model has {len(blocks)} blocks of {sas[0].num_heads} heads of "
                               f"{sas[0].head_dim}")
    scales = sorted({float(sa.scale) for sa in sas})
    if len(scales) != 1:
        raise IntegrationError(f"the model's self-attention layers use different softmax scales {scales}")
    wanted = None if layers is None else frozenset(int(x) for x in layers)
    if wanted is not None:
        bad = sorted(x for x in wanted if not 0 <= x < len(blocks))
        if bad:
            raise IntegrationError(f"layer {bad[0]} is not in 0..{len(blocks) - 1}")
    try:
        writer.use_model_scale(scales[0], f"{type(model).__name__}'s self-attention (sa.scale)")
        if heads is not None:
            ids = [int(h) for h in heads]
            if writer.heads is not None and ids != writer.heads:
                raise IntegrationError(f"heads={ids}, but the writer was made for heads {writer.heads}; give them "
                                       "once")
            writer.select_heads(ids)
    except CaptureError as e:
        raise IntegrationError(str(e)) from None
    patch = InfinityPatch(writer, False, False, blocks)
    stats = _CaptureStats()
    _install(model, patch, sas, lambda layer: _CaptureAttention(writer, layer, wanted, patch, stats, kv))
    try:
        yield patch
    finally:
        remove(model)
        writer.close()
    recorded = {(s, layer) for kind, s, layer in patch.calls if kind == "capture"}
    if not recorded:
        raise IntegrationError(nothing_recorded(
            writer, stats.calls, stats.matched, stats.first, None if wanted is None else sorted(wanted),
            "sv.capture",
            "no self-attention call reached the hook. Run the generation inside the with block, on this model "
            "object; build it with customized_flash_attn=False (flash_attn_func blocks bypass attn_fn), and call it "
            "through the blocks' forward (autoregressive_infer_cfg does)"))
    n = writer.schedule.num_scales
    for layer in sorted(wanted) if wanted is not None else range(len(blocks)):
        have = sorted(s for s, l in recorded if l == layer)
        if have != list(range(n)):
            raise IntegrationError(
                f"sv.capture recorded scales {ranges_text(have) or 'none'} of layer {layer}, but "
                f"{writer.schedule_text()} has scales 0-{n - 1} ({stats.calls - stats.matched} of {stats.calls} "
                f"self-attention calls matched none of its scales): the image generated does not have the writer's "
                f"schedule, or the generation stopped early; pass CaptureWriter(resolution=..., aspect=...) of the "
                f"schedule generated and capture again (the files written so far are incomplete)")


# ---------------------------------------------------------------------------------------------- CUDA graphs
@dataclass(frozen=True)
class _Slot:
    i: int


def _split(value: Any, out: list[torch.Tensor]) -> Any:
    """A tensor, or a tuple holding tensors (Infinity's ``ca_kv``), with each tensor replaced by a placeholder
    index into ``out``. Anything else (the schedule, a dict of RoPE tables, a callable) passes through by
    reference: a graph reads the tensors it holds where they are."""
    if isinstance(value, torch.Tensor):
        out.append(value)
        return _Slot(len(out) - 1)
    if isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(_split(v, out) for v in value)
    return value


def _fill(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, _Slot):
        return tensors[value.i]
    if isinstance(value, tuple):
        return tuple(_fill(v, tensors) for v in value)
    return value


def _frozen(value: Any) -> Any:
    """A hashable description of a non-tensor argument: numbers, strings and nests of them by content, other
    objects by identity."""
    if isinstance(value, _Slot) or isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    return ("obj", id(value))


def _version(t: torch.Tensor) -> int | None:
    """A tensor's in-place version counter (None for inference tensors, which have none: always copied)."""
    try:
        return t._version
    except RuntimeError:
        return None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static: list[torch.Tensor]      # what the graph reads, per input position
    out: Any                        # what it writes (returned as is)
    copy: list[bool]                # per input: copied in before a replay (False: it is an earlier graph's output)


class BlockGraphs:
    """Per (layer, call signature) CUDA graphs of block forwards, sharing one memory pool.

    The first time a signature is seen the block runs eagerly (warm-up: lazy allocations, library handles); the
    second time it is captured (and run by one replay); later it is replayed. Tensors a block reads from its own
    attributes (Infinity's KV cache) live in the pool at the addresses they had when captured, so graphs replay
    in the order they were captured, as generation does.

    Inputs cost as little as possible, since the small scales' blocks take microseconds: a block's hidden state
    that is the previous graph's output is read in place (the graphs chain); inputs shared by every block (the
    conditioning, the text keys) go through one static buffer per (position, shape), copied only when the caller
    passes another tensor or changed it.
    """

    def __init__(self) -> None:
        self.pool = None
        self._graphs: dict[Any, _Graph] = {}
        self._warm: set[Any] = set()
        self._shared: dict[Any, torch.Tensor] = {}
        self._filled: dict[int, tuple[int, int]] = {}  # id(static buffer) -> (id(source), source._version)
        self._sources: dict[int, torch.Tensor] = {}    # keeps each recorded source alive (ids stay unique)
        self._outputs: set[int] = set()                # ids of graph outputs (read in place by later graphs)
        self._frozen_cache: dict[int, tuple[Any, Any]] = {}
        self.captures = 0
        self.replays = 0

    def clear(self) -> None:
        self._graphs.clear()
        self._warm.clear()
        self._shared.clear()
        self._filled.clear()
        self._sources.clear()
        self._outputs.clear()
        self._frozen_cache.clear()

    def _freeze(self, value: Any) -> Any:
        if isinstance(value, list):  # the schedule: the same list object every call of an image
            hit = self._frozen_cache.get(id(value))
            if hit is None or hit[0] is not value:
                hit = (value, _frozen(value))
                self._frozen_cache[id(value)] = hit
            return hit[1]
        return _frozen(value)

    def run(self, layer: int, fn: Callable, args: tuple, kwargs: dict) -> Any:
        tensors: list[torch.Tensor] = []
        a_tree = tuple(_split(v, tensors) for v in args)
        k_tree = {k: _split(v, tensors) for k, v in kwargs.items()}
        if not tensors or any(t.device.type != "cuda" for t in tensors):
            return fn(*args, **kwargs)
        key = (layer, tuple(self._freeze(v) for v in a_tree),
               tuple((k, self._freeze(v)) for k, v in sorted(k_tree.items())),
               tuple((tuple(t.shape), t.dtype, t.device) for t in tensors))
        hit = self._graphs.get(key)
        if hit is not None:
            for dst, src, copy in zip(hit.static, tensors, hit.copy):
                if copy:
                    self._copy_in(dst, src)
                elif dst is not src:  # the caller changed the chained hidden state (e.g. CFG at a layer)
                    dst.copy_(src)
            hit.graph.replay()
            self.replays += 1
            return hit.out
        if key not in self._warm:
            self._warm.add(key)
            return fn(*args, **kwargs)
        return self._capture(key, fn, a_tree, k_tree, tensors)

    def _copy_in(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy into a shared static buffer, unless it already holds this very tensor, unchanged since."""
        if dst is src:
            return
        stamp = (id(src), _version(src))
        if stamp[1] is not None and self._filled.get(id(dst)) == stamp:
            return
        dst.copy_(src)
        self._filled[id(dst)] = stamp
        self._sources[id(dst)] = src

    def _capture(self, key: Any, fn: Callable, a_tree: tuple, k_tree: dict, tensors: list[torch.Tensor]) -> Any:
        static, copy = [], []
        for pos, t in enumerate(tensors):
            if id(t) in self._outputs:  # an earlier graph's output: the graphs chain, no copy
                static.append(t)
                copy.append(False)
                continue
            buf_key = (pos, tuple(t.shape), t.dtype, t.device)
            buf = self._shared.get(buf_key)
            if buf is None:
                buf = self._shared[buf_key] = torch.empty_like(t)
            self._filled.pop(id(buf), None)
            self._copy_in(buf, t)
            static.append(buf)
            copy.append(True)
        versions = [_version(t) for t in static]
        a, kw = tuple(_fill(v, static) for v in a_tree), {k: _fill(v, static) for k, v in k_tree.items()}
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn(*a, **kw)
        if [_version(t) for t in static] != versions:
            raise IntegrationError("a captured block changed its inputs in place; graphs=True cannot share them")
        self._graphs[key] = _Graph(graph, static, out, copy)
        if isinstance(out, torch.Tensor):
            self._outputs.add(id(out))
        self.captures += 1
        graph.replay()  # capturing records the work; this runs it
        self.replays += 1
        return out
