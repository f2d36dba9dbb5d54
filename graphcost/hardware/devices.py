"""Devices: dense peaks per dtype, memory and bandwidth (../shared/reference/hardware.md).

A device is a preset (`PRESETS`, `graphcost devices`), a JSON device file (docs/devices.md;
`graphcost calibrate` writes one for this machine), or either with figures overridden
(`Device.with_figures`, the CLI's --device-* flags). `get_device` takes a preset name, a file
path or a Device, so a file works everywhere a preset name does.

`kind` decides which kernels PyTorch picks on that device (and therefore what autograd saves):
"cpu" for the CPU build, "cuda" for NVIDIA and ROCm GPUs. Peaks are dense figures; the sparse
figures vendors print first are never used.

    >>> h100 = get_device("h100-sxm")
    >>> h100.matmul_flops_per_s(torch.bfloat16) / 1e12, h100.vector_flops_per_s("float32") / 1e12
    (989.4, 67.0)
    >>> round(h100.ridge_point())  # bf16 FLOP per byte of HBM traffic
    295
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphcost.errors import ConfigError

TERA = 1e12
GB = 1e9
GIB = 2**30

KINDS = ("cpu", "cuda")
# The dtype keys of a device file, as torch names them; the short names are accepted too.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16,
                                  "float8_e4m3fn": torch.float8_e4m3fn}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                 "float": "float32"}
FILE_FIELDS = ("name", "kind", "memory", "bandwidth_bytes_per_s", "matmul_flops_per_s",
               "vector_flops_per_s", "description", "calibration")
REQUIRED_FIELDS = ("name", "kind", "memory", "bandwidth_bytes_per_s", "matmul_flops_per_s")
CALIBRATE_HINT = "run `graphcost calibrate` and pass --device cpu.json"


def dtype_key(dtype: torch.dtype | str) -> torch.dtype:
    """torch.bfloat16, "bfloat16" or "bf16" -> torch.bfloat16; ConfigError for others."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = dtype.strip().lower().removeprefix("torch.")
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_label(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16", the key a device file uses."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Device:
    """A device's figures. Zero or a missing dtype means "no figure": the accessor methods
    (`matmul_flops_per_s`, `vector_flops_per_s`, `memory_bandwidth_bytes_per_s`) raise a
    ConfigError saying how to supply one, so no figure is ever used as zero."""

    name: str
    kind: str  # "cpu" or "cuda": selects the kernels whose saved tensors the rules reproduce
    memory_bytes: float = 0.0
    bandwidth_bytes_per_s: float = 0.0
    # Dense peak FLOP/s per dtype for matrix multiplies (tensor cores where they exist).
    peak_flops_per_s: dict[torch.dtype, float] = field(default_factory=dict)
    description: str = ""
    # Peak FLOP/s per dtype for everything else (pointwise, reductions: the vector units).
    vector_peak_flops_per_s: dict[torch.dtype, float] = field(default_factory=dict)
    # How and when a calibrated device was measured (`graphcost calibrate`); None otherwise.
    calibration: dict[str, Any] | None = field(default=None, compare=False)
    source: str = field(default="preset", compare=False)  # "preset", a file path, or "flags"

    # ------------------------------------------------------------ the figures a roofline reads

    def matmul_flops_per_s(self, dtype: torch.dtype | str) -> float:
        """Dense peak FLOP/s of matrix multiplies in `dtype` (mm, bmm, linear, conv, SDPA)."""
        return self._figure(self.peak_flops_per_s, dtype, "matmul")

    def vector_flops_per_s(self, dtype: torch.dtype | str) -> float:
        """Peak FLOP/s of non-matmul work in `dtype` (pointwise ops, norms, softmax).

        NB: integer and bool work (masks, comparisons, index arithmetic) has no figure of its
        own; it is given the float32 vector figure."""
        dtype = dtype_key(dtype)
        if not (dtype.is_floating_point or dtype.is_complex):
            dtype = torch.float32
        return self._figure(self.vector_peak_flops_per_s, dtype, "vector (non-matmul)")

    def memory_bandwidth_bytes_per_s(self) -> float:
        """Memory bandwidth, bytes read plus written per second."""
        if self.bandwidth_bytes_per_s > 0:
            return self.bandwidth_bytes_per_s
        raise ConfigError(f"device {self.name!r} has no memory bandwidth; {self._fix()}")

    def ridge_point(self, dtype: torch.dtype | str = torch.bfloat16) -> float:
        """Matmul FLOP per byte at which a kernel turns from memory- to compute-bound."""
        return self.matmul_flops_per_s(dtype) / self.memory_bandwidth_bytes_per_s()

    def _figure(self, table: dict[torch.dtype, float], dtype, what: str) -> float:
        dtype = dtype_key(dtype)
        if table.get(dtype, 0) > 0:
            return table[dtype]
        has = ", ".join(dtype_label(d) for d in table) or "none"
        raise ConfigError(f"device {self.name!r} has no {what} FLOP/s for {dtype_label(dtype)} "
                          f"(it has: {has}); {self._fix()}")

    def _fix(self) -> str:
        if self.kind == "cpu" and not self.peak_flops_per_s:
            return CALIBRATE_HINT
        return ("pick a device with that figure ('graphcost devices'), give it with the "
                "--device-* flags, or write a device file (docs/devices.md)")

    # ------------------------------------------------------------ overrides and files

    def with_figures(self, *, name: str | None = None, memory_bytes: float | None = None,
                     bandwidth_bytes_per_s: float | None = None,
                     matmul_flops_per_s: dict | None = None,
                     vector_flops_per_s: dict | None = None) -> Device:
        """A copy with the given figures replaced (per-dtype dicts are merged on top of the
        device's own); every figure must be a positive number.

        >>> d = get_device("a100-80gb").with_figures(memory_bytes=48 * GIB)
        >>> d.name, d.memory_bytes / GIB, d.matmul_flops_per_s("bf16") / 1e12
        ('a100-80gb+custom', 48.0, 312.0)
        """
        changed = {"memory": memory_bytes, "bandwidth": bandwidth_bytes_per_s}
        for what, value in changed.items():
            if value is not None:
                _positive(value, what)
        matmul = {dtype_key(k): _positive(v, f"matmul FLOP/s for {k}")
                  for k, v in (matmul_flops_per_s or {}).items()}
        vector = {dtype_key(k): _positive(v, f"vector FLOP/s for {k}")
                  for k, v in (vector_flops_per_s or {}).items()}
        return dataclasses.replace(
            self, name=name or f"{self.name}+custom",
            memory_bytes=self.memory_bytes if memory_bytes is None else float(memory_bytes),
            bandwidth_bytes_per_s=(self.bandwidth_bytes_per_s if bandwidth_bytes_per_s is None
                                   else float(bandwidth_bytes_per_s)),
            peak_flops_per_s={**self.peak_flops_per_s, **matmul},
            vector_peak_flops_per_s={**self.vector_peak_flops_per_s, **vector},
            source="flags" if self.source == "preset" else self.source)

    def to_file_dict(self) -> dict[str, Any]:
        """The device file's JSON object (docs/devices.md); `load_device_file` reads it back."""
        out: dict[str, Any] = {
            "name": self.name, "kind": self.kind,
            "memory": int(self.memory_bytes) if float(self.memory_bytes).is_integer() else
            self.memory_bytes,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "matmul_flops_per_s": {dtype_label(k): v for k, v in self.peak_flops_per_s.items()},
            "vector_flops_per_s": {dtype_label(k): v
                                   for k, v in self.vector_peak_flops_per_s.items()},
            "description": self.description}
        if self.calibration is not None:
            out["calibration"] = self.calibration
        return out


def _positive(value: Any, what: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0 < value < math.inf:
        raise ConfigError(f"{what} must be a positive number, got {value!r}")
    return float(value)


def _gpu(name, memory_gib, bandwidth_gb_s, fp32_tflops, tf32_tflops, bf16_tflops, fp8_tflops, description):
    peaks = {
        torch.float32: fp32_tflops * TERA,
        torch.bfloat16: bf16_tflops * TERA,
        torch.float16: bf16_tflops * TERA,
    }
    if fp8_tflops:
        peaks[torch.float8_e4m3fn] = fp8_tflops * TERA
    # NB: the vector units: the table's "FP32 (non-tensor)" figure, for fp32 and for bf16/fp16
    # pointwise work alike (hardware.md gives no separate half-precision vector figure; PyTorch's
    # pointwise kernels compute in fp32 for bf16/fp16 anyway). fp8 has no vector figure.
    vector = dict.fromkeys((torch.float32, torch.bfloat16, torch.float16), fp32_tflops * TERA)
    # NB: TF32 is kept in the description only; fp32 matmuls default to full fp32 in PyTorch.
    # Datasheet capacities ("80 GB") are binary: the card holds about 80 GiB (nvidia-smi: 81,920
    # MiB on an A100 80GB); bandwidths are decimal GB/s.
    return Device(name, "cuda", memory_gib * GIB, bandwidth_gb_s * GB, peaks,
                  f"{description}; TF32 {tf32_tflops} TFLOP/s", vector)


PRESETS: dict[str, Device] = {
    d.name: d
    for d in [
        Device("cpu", "cpu", description="this machine's CPU kernels (uncalibrated: "
               "`graphcost calibrate` measures it)"),
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


def is_device_file(name: str) -> bool:
    """A --device value names a file when it ends in .json or contains a path separator."""
    return name.strip().lower().endswith(".json") or "/" in name or os.sep in name


def get_device(name: str | Path | Device) -> Device:
    """A preset by name (case-insensitive), a device file by path (docs/devices.md), or a Device
    (passed through)."""
    if isinstance(name, Device):
        return name
    if isinstance(name, Path) or is_device_file(name):
        return load_device_file(name)
    key = name.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    close = difflib.get_close_matches(key, PRESETS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown device {name!r}.{hint} Known devices: {', '.join(PRESETS)}; "
                      "or a device file such as cpu.json (docs/devices.md)")


# ---------------------------------------------------------------- device files

SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: Any) -> float:
    """A byte count: a number, or text such as "80GiB", "1.5 GB", "40e9"; ValueError if not.

    >>> parse_size("80GiB") == 80 * 2**30, parse_size(2e9)
    (True, 2000000000.0)
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(value)
    match = re.fullmatch(r"([0-9.eE+-]+)\s*([a-zA-Z]*)", value.strip())
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise ValueError(value)
    return float(match.group(1)) * SIZE_UNITS[match.group(2).lower()]


def load_device_file(path: str | Path) -> Device:
    """Read a device file (docs/devices.md). Every problem is a ConfigError naming the file and
    the field."""
    path = Path(path).expanduser()
    where = f"device file {str(path)!r}"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{where} not found; write one (docs/devices.md) or measure this "
                          f"machine with `graphcost calibrate --out {path}`") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column "
                          f"{exc.colno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold one JSON object, got {type(data).__name__}")
    return _device_from_dict(data, where, str(path))


def _device_from_dict(data: dict, where: str, source: str) -> Device:
    for key in data:
        if key not in FILE_FIELDS:
            close = difflib.get_close_matches(key, FILE_FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown field {key!r}{hint}; fields are "
                              f"{', '.join(FILE_FIELDS)}")
    missing = [k for k in REQUIRED_FIELDS if k not in data]
    if missing:
        raise ConfigError(f"{where}: missing field {missing[0]!r}; required fields are "
                          f"{', '.join(REQUIRED_FIELDS)} (docs/devices.md)")

    def text(key: str) -> str:
        value = data.get(key, "")
        if not isinstance(value, str):
            raise ConfigError(f"{where}: field {key!r} must be a string, got {value!r}")
        return value

    def positive(value: Any, key: str) -> float:
        try:
            return _positive(value, f"field {key!r}")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def per_dtype(key: str) -> dict[torch.dtype, float]:
        table = data.get(key, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: field {key!r} must be an object of dtype: FLOP/s, e.g. "
                              '{"bfloat16": 3.12e14}')
        out = {}
        for name, value in table.items():
            try:
                dtype = dtype_key(name)
            except ConfigError:
                raise ConfigError(f"{where}: field {key!r} has unknown dtype {name!r}; use "
                                  f"{', '.join(DTYPES)}") from None
            out[dtype] = positive(value, f"{key}.{name}")
        return out

    name, kind = text("name"), text("kind")
    if not name.strip():
        raise ConfigError(f"{where}: field 'name' is empty")
    if kind not in KINDS:
        raise ConfigError(f"{where}: field 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    try:
        memory = parse_size(data["memory"])
    except ValueError:
        raise ConfigError(f"{where}: field 'memory' must be bytes or a size such as \"80GiB\", "
                          f"got {data['memory']!r}") from None
    matmul = per_dtype("matmul_flops_per_s")
    if not matmul:
        raise ConfigError(f"{where}: field 'matmul_flops_per_s' is empty; give at least one "
                          'dtype, e.g. {"bfloat16": 3.12e14}')
    calibration = data.get("calibration")
    if calibration is not None and not isinstance(calibration, dict):
        raise ConfigError(f"{where}: field 'calibration' must be an object")
    return Device(name=name, kind=kind, memory_bytes=positive(memory, "memory"),
                  bandwidth_bytes_per_s=positive(data["bandwidth_bytes_per_s"],
                                                 "bandwidth_bytes_per_s"),
                  peak_flops_per_s=matmul, description=text("description"),
                  vector_peak_flops_per_s=per_dtype("vector_flops_per_s"),
                  calibration=calibration, source=source)


def save_device_file(device: Device, path: str | Path) -> Path:
    """Write `device` as a device file; `get_device(path)` reads it back equal."""
    path = Path(path).expanduser()
    try:
        path.write_text(json.dumps(device.to_file_dict(), indent=2) + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write device file {str(path)!r}: {exc.strerror}") from None
    return path
