"""Device presets: dense peaks per dtype, memory and bandwidth (../shared/reference/hardware.md).

`kind` decides which kernels PyTorch picks on that device (and therefore what autograd saves):
"cpu" for the CPU build, "cuda" for NVIDIA and ROCm GPUs. Peaks are dense figures; the sparse
figures vendors print first are never used.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch

from graphcost.errors import ConfigError

TERA = 1e12
GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    kind: str  # "cpu" or "cuda": selects the kernels whose saved tensors the rules reproduce
    memory_bytes: float = 0.0
    bandwidth_bytes_per_s: float = 0.0
    # Dense peak FLOP/s per dtype for matrix multiplies (tensor cores where they exist).
    peak_flops_per_s: dict[torch.dtype, float] = field(default_factory=dict)
    description: str = ""


def _gpu(name, memory_gib, bandwidth_gb_s, fp32_tflops, tf32_tflops, bf16_tflops, fp8_tflops, description):
    peaks = {
        torch.float32: fp32_tflops * TERA,
        torch.bfloat16: bf16_tflops * TERA,
        torch.float16: bf16_tflops * TERA,
    }
    if fp8_tflops:
        peaks[torch.float8_e4m3fn] = fp8_tflops * TERA
    # NB: TF32 is kept in the description only; fp32 matmuls default to full fp32 in PyTorch.
    # Datasheet capacities ("80 GB") are binary: the card holds about 80 GiB (nvidia-smi: 81,920
    # MiB on an A100 80GB); bandwidths are decimal GB/s.
    return Device(name, "cuda", memory_gib * GIB, bandwidth_gb_s * GB, peaks,
                  f"{description}; TF32 {tf32_tflops} TFLOP/s")


PRESETS: dict[str, Device] = {
    d.name: d
    for d in [
        Device("cpu", "cpu", description="this machine's CPU kernels (uncalibrated)"),
        _gpu("a100-40gb", 40, 1555, 19.5, 156, 312, 0, "NVIDIA A100 40GB SXM"),
        _gpu("a100-80gb", 80, 2039, 19.5, 156, 312, 0, "NVIDIA A100 80GB SXM"),
        _gpu("a100-80gb-pcie", 80, 1935, 19.5, 156, 312, 0, "NVIDIA A100 80GB PCIe"),
        _gpu("h100-sxm", 80, 3350, 67, 494.7, 989.4, 1979, "NVIDIA H100 SXM5"),
        _gpu("h100-pcie", 80, 2000, 51, 378, 756, 1513, "NVIDIA H100 PCIe"),
        _gpu("h200", 141, 4800, 67, 494.5, 989, 1979, "NVIDIA H200 SXM"),
        _gpu("b200", 180, 8000, 80, 1100, 2250, 4500, "NVIDIA B200"),
        _gpu("rtx3090", 24, 936, 35.6, 35.6, 71, 0, "NVIDIA RTX 3090 (bf16 with fp32 accumulate)"),
        _gpu("rtx4090", 24, 1008, 82.6, 82.6, 165.2, 330.3, "NVIDIA RTX 4090 (bf16 with fp32 accumulate)"),
        _gpu("l4", 24, 300, 30.3, 60, 121, 242.5, "NVIDIA L4"),
        _gpu("l40s", 48, 864, 91.6, 183, 362, 733, "NVIDIA L40S"),
        _gpu("mi300x", 192, 5300, 163.4, 653.7, 1307.4, 2614.9, "AMD MI300X"),
    ]
}

DEFAULT_DEVICE = "cpu"


def get_device(name: str | Device) -> Device:
    """Look a preset up by name (case-insensitive); a Device passes through."""
    if isinstance(name, Device):
        return name
    key = name.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    close = difflib.get_close_matches(key, PRESETS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown device {name!r}.{hint} Known devices: {', '.join(PRESETS)}.")
