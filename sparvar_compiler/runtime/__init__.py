"""Stage 6: load an emitted runtime module and run its kernels (CUDA driver API only; no compiler)."""
