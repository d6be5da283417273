"""``torch.ops.sparvar.attention``: a loaded module's attention as a PyTorch custom operator.

A module's :meth:`~sparvar_compiler.runtime.SparvarModule.attention` launches cubins through ctypes, which
``torch.compile`` cannot trace: every self-attention call would break the graph, and ``fullgraph=True`` would
fail. Registered as an operator, the call is one opaque node with a fake (meta) implementation, so a model
using it compiles whole, and the eager path costs one dispatcher hop::

    sparvar::attention(Tensor q, Tensor k, Tensor v, str module, int scale_index, int layer_index,
                       float scale) -> Tensor
    sparvar::attention.out(Tensor q, Tensor k, Tensor v, str module, int scale_index, int layer_index,
                           float scale, *, Tensor(a!) out) -> ()

``module`` is the key a module gets when it is registered (:func:`register`, done by ``load``): operators take
tensors, numbers and strings, not Python objects. The registry holds modules weakly, so registering keeps
nothing alive; calling with the key of a module that is gone raises. The GPU path stays CUDA-graph capturable
(the operator adds no allocation beyond the output, and none with ``.out``).

A module's CS4A layers keep per-layer state between scales (the decision scale's selection), so calls must come
in generation order, as they do in a model's forward.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import TYPE_CHECKING

import torch

from ..codegen.spec import KernelInputError

if TYPE_CHECKING:  # pragma: no cover
    from .module import SparvarModule

_MODULES: "weakref.WeakValueDictionary[str, SparvarModule]" = weakref.WeakValueDictionary()
_COUNTER = itertools.count()
_LOCK = threading.Lock()

_LIB = torch.library.Library("sparvar", "DEF")
_LIB.define("attention(Tensor q, Tensor k, Tensor v, str module, int scale_index, int layer_index, "
            "float scale) -> Tensor")
_LIB.define("attention.out(Tensor q, Tensor k, Tensor v, str module, int scale_index, int layer_index, "
            "float scale, *, Tensor(a!) out) -> ()")


def register(module: "SparvarModule") -> str:
    """Give ``module`` a key for the operator (held weakly) and return it."""
    with _LOCK:
        key = f"{module.manifest['model']['name']}#{next(_COUNTER)}"
        _MODULES[key] = module
    return key


def lookup(key: str) -> "SparvarModule":
    """The module registered under ``key``."""
    module = _MODULES.get(key)
    if module is None:
        raise KernelInputError(f"sparvar::attention: no loaded module has the key {key!r} (it was never "
                               f"registered, or it was garbage-collected; keep the module object alive)")
    return module


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, module: str, scale_index: int,
               layer_index: int, scale: float) -> torch.Tensor:
    return lookup(module).attention(q, k, v, scale_index, layer_index, scale=scale)


def _attention_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, module: str, scale_index: int,
                   layer_index: int, scale: float, *, out: torch.Tensor) -> None:
    lookup(module).attention(q, k, v, scale_index, layer_index, scale=scale, out=out)


def _attention_fake(q, k, v, module, scale_index, layer_index, scale):
    # The output is q's shape and dtype (the module checks the rest when it runs).
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _attention_out_fake(q, k, v, module, scale_index, layer_index, scale, *, out):
    return None


# One implementation for every device: the module itself dispatches (cubins on CUDA, references on the CPU).
_LIB.impl("attention", _attention, "CompositeExplicitAutograd")
_LIB.impl("attention.out", _attention_out, "CompositeExplicitAutograd")
torch.library.register_fake("sparvar::attention", _attention_fake, lib=_LIB)
torch.library.register_fake("sparvar::attention.out", _attention_out_fake, lib=_LIB)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, module: str, scale_index: int, layer_index: int,
              scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Call the operator (``out=`` uses the ``.out`` overload and returns ``out``)."""
    if out is None:
        return torch.ops.sparvar.attention(q, k, v, module, scale_index, layer_index, scale)
    torch.ops.sparvar.attention.out(q, k, v, module, scale_index, layer_index, scale, out=out)
    return out
