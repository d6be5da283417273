"""GPU registry: what the code generator and tuner need to know about a target card.

Targets are keyed by name, arch and SM count together: an H100 SXM and an H100 PCIe are both sm_90 but do not
share tuning results.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GpuError


@dataclass(frozen=True)
class GpuSpec:
    """A target GPU.

    Attributes
    ----------
    name:
        Registry name (``"h100"``).
    arch:
        CUDA architecture (``"sm_90"``); ``capability`` is the same as a tuple.
    sm_count:
        Streaming multiprocessors.
    smem_per_block:
        Largest dynamic shared memory one thread block may opt in to, in bytes.
    smem_per_sm:
        Shared memory per multiprocessor, in bytes.
    regs_per_sm:
        32-bit registers per multiprocessor.
    l2_bytes:
        L2 cache size.
    device_names:
        Substrings of ``torch.cuda.get_device_name()`` that identify the card.
    peak_bf16_flops:
        Dense bf16 tensor-core peak, FLOP/s (the vendor's datasheet figure, without structured sparsity).
    peak_dram_bytes_per_s:
        Peak memory (HBM/GDDR) bandwidth, bytes/s, from the datasheet.

    The two peaks bound how fast any kernel can be (the roofline): a tuning record that claims to be faster
    is refused (:func:`sparvar_compiler.tuner.validate.validate_record`). 0 means unknown (no bound).
    """

    name: str
    arch: str
    sm_count: int
    smem_per_block: int
    smem_per_sm: int
    l2_bytes: int
    device_names: tuple[str, ...]
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    peak_bf16_flops: float = 0.0
    peak_dram_bytes_per_s: float = 0.0

    @property
    def capability(self) -> tuple[int, int]:
        digits = self.arch.removeprefix("sm_").rstrip("a")
        return int(digits[:-1]), int(digits[-1])

    def to_dict(self) -> dict:
        return {"name": self.name, "arch": self.arch, "sm_count": self.sm_count,
                "smem_per_block": self.smem_per_block, "smem_per_sm": self.smem_per_sm,
                "l2_bytes": self.l2_bytes, "regs_per_sm": self.regs_per_sm}


_KB = 1024
_MB = 1024 * 1024

_T = 1e12

# Peaks from NVIDIA's datasheets (dense bf16 tensor-core FLOP/s, i.e. half the "with sparsity" figure; memory
# bandwidth): H100 SXM5 989 TFLOP/s, 3.35 TB/s; H100 PCIe 756 TFLOP/s, 2.0 TB/s; H200 SXM 989 TFLOP/s, 4.8 TB/s;
# A100 SXM4 80GB 312 TFLOP/s, 2.039 TB/s (the fastest A100 memory; the 40 GB card has 1.555 TB/s); L40S 362
# TFLOP/s, 864 GB/s; B200 (HGX) 2.25 PFLOP/s, 8 TB/s. Where a name covers several variants the fastest is
# given, as the figures only bound timings from below.
GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec("h100", "sm_90", 132, 227 * _KB, 228 * _KB, 50 * _MB, ("H100 80GB HBM3", "H100 SXM"),
                peak_bf16_flops=989 * _T, peak_dram_bytes_per_s=3.35 * _T),
        GpuSpec("h100-pcie", "sm_90", 114, 227 * _KB, 228 * _KB, 50 * _MB, ("H100 PCIe",),
                peak_bf16_flops=756 * _T, peak_dram_bytes_per_s=2.0 * _T),
        GpuSpec("h200", "sm_90", 132, 227 * _KB, 228 * _KB, 60 * _MB, ("H200",),
                peak_bf16_flops=989 * _T, peak_dram_bytes_per_s=4.8 * _T),
        GpuSpec("a100", "sm_80", 108, 163 * _KB, 164 * _KB, 40 * _MB, ("A100",),
                peak_bf16_flops=312 * _T, peak_dram_bytes_per_s=2.039 * _T),
        GpuSpec("l40s", "sm_89", 142, 99 * _KB, 100 * _KB, 96 * _MB, ("L40S",),
                peak_bf16_flops=362 * _T, peak_dram_bytes_per_s=0.864 * _T),
        GpuSpec("b200", "sm_100", 148, 227 * _KB, 228 * _KB, 126 * _MB, ("B200",),
                peak_bf16_flops=2250 * _T, peak_dram_bytes_per_s=8.0 * _T),
    )
}


def list_gpus() -> tuple[str, ...]:
    return tuple(GPUS)


def get_gpu(name: str) -> GpuSpec:
    key = name.strip().lower()
    if key not in GPUS:
        raise GpuError(f"unknown GPU {name!r}; known GPUs: {', '.join(GPUS)}")
    return GPUS[key]


def gpu_from_device_name(device_name: str, sm_count: int | None = None) -> GpuSpec | None:
    """Match a CUDA device name (``torch.cuda.get_device_name()``) to a registry entry, or None."""
    for g in GPUS.values():
        if any(s.lower() in device_name.lower() for s in g.device_names):
            if sm_count is None or sm_count == g.sm_count:
                return g
    return None
