"""Stage 6: load an emitted runtime module and run its kernels (CUDA driver API only; no compiler).

    import sparvar_compiler.runtime as rt
    module = rt.load("out/infinity-8b-h100")
    o = module.attention(q, k, v, scale_index, layer_index)
"""

from .module import SparvarModule, load

__all__ = ["SparvarModule", "load"]
