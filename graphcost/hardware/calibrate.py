"""`graphcost calibrate`: measure this machine's device and describe it as a device file.

What a roofline needs of a device, measured with PyTorch's own kernels at this torch version and
thread count (both are recorded: the figures depend on them):
- matmul FLOP/s per dtype: `torch.mm` of two n x n matrices, 2 n^3 FLOP (one FMA = 2 FLOP). n
  starts small and doubles while a run stays short next to the time budget (so a dtype with a
  slow CPU kernel, fp16 on most CPUs, is measured at a size it finishes), then the best of
  several timed runs after a warm-up;
- vector FLOP/s: the float32 matmul figure, for every float dtype. With TF32 off (PyTorch's
  default) an fp32 matmul runs on the same FMA units as pointwise work (SIMD lanes on a CPU,
  CUDA cores on a GPU); the presets use the same rule (the table's FP32 non-tensor column).
  NB: it is a ceiling; pointwise kernels are usually held back by memory bandwidth first;
- memory bandwidth: `dst.copy_(src)` on buffers well beyond the last-level cache, counted as
  bytes read plus bytes written (2 x the buffer) over the best time, as STREAM's copy counts it.
  NB: write-allocate caches also read the destination; that traffic is not counted.

The CUDA path (cuda events, synchronize) cannot be exercised on the CPU-only machines this was
written on; it is kept small and mirrors the CPU path.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from graphcost.errors import ConfigError
from graphcost.hardware.devices import Device, dtype_key, dtype_label
from graphcost.rules.registry import FLOPS_PER_FMA

DEFAULT_DTYPES = (torch.float32, torch.bfloat16)
MEASURABLE = (torch.float32, torch.bfloat16, torch.float16)
MIN_RUNS = 3
MAX_RUNS = 50
# torch.mm sizes searched: n doubles from the first to the last.
MATMUL_SIZES = {"cpu": (256, 4096), "cuda": (1024, 8192)}
MIN_COPY_BYTES = {"cpu": 256 * 2**20, "cuda": 2**30}


@dataclass(frozen=True)
class Timing:
    """One measured figure: what ran, how often, the best time and the rate it gives."""

    what: str  # e.g. "torch.mm 2048x2048 @ 2048x2048"
    size: int  # the matrix side n, or the buffer bytes of a copy
    runs: int
    best_s: float
    rate: float  # FLOP/s or bytes/s

    def as_dict(self) -> dict:
        return {"what": self.what, "size": self.size, "runs": self.runs,
                "best_s": self.best_s, "rate": self.rate}


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` measured, and the device those figures make."""

    device: Device
    matmul: dict[torch.dtype, Timing]
    bandwidth: Timing
    threads: int
    seconds: float


def calibrate(kind: str = "cpu", *, seconds: float = 3.0,
              dtypes: Sequence[torch.dtype | str] = DEFAULT_DTYPES,
              matmul_size: int | None = None, copy_bytes: int | None = None,
              threads: int | None = None, name: str | None = None) -> Calibration:
    """Measure the local `kind` device ("cpu" or "cuda") within about `seconds`.

    `matmul_size` fixes n instead of searching it; `copy_bytes` fixes the copy buffer (default:
    well beyond the last-level cache); `threads` sets torch's CPU threads for the measurement
    only. float32 is always measured: it gives the vector figure.
    """
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"calibrate measures 'cpu' or 'cuda', not {kind!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; calibrate the CPU "
                          "with --device cpu")
    if not seconds > 0:
        raise ConfigError(f"--seconds must be more than 0, got {seconds}")
    wanted = list(dict.fromkeys([torch.float32, *(dtype_key(d) for d in dtypes)]))
    for dtype in wanted:
        if dtype not in MEASURABLE:
            raise ConfigError(f"calibrate measures {', '.join(map(dtype_label, MEASURABLE))}, "
                              f"not {dtype_label(dtype)}; add its figure to the device file by "
                              "hand (docs/devices.md)")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        threads = torch.get_num_threads()
        # a fifth of the time for the copy, the rest shared by the matmul dtypes
        share = 0.8 * seconds / len(wanted)
        matmul = {dtype: _matmul(kind, dtype, share, matmul_size) for dtype in wanted}
        bandwidth = _copy(kind, 0.2 * seconds, copy_bytes)
    finally:
        torch.set_num_threads(before)
    fp32 = matmul[torch.float32].rate
    vector = dict.fromkeys((torch.float32, torch.bfloat16, torch.float16), fp32)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    how = {
        "tool": "graphcost calibrate", "date": stamp, "host": platform.node(),
        "torch": torch.__version__, "threads": threads, "seconds": seconds,
        "matmul": {dtype_label(d): t.as_dict() for d, t in matmul.items()},
        "vector": "the float32 matmul figure (same FMA units, TF32 off), for every float dtype",
        "bandwidth": {**bandwidth.as_dict(), "counted": "bytes read + bytes written"},
    }
    device = Device(
        name=name or f"{kind}-calibrated", kind=kind, memory_bytes=float(_memory_bytes(kind)),
        bandwidth_bytes_per_s=bandwidth.rate,
        peak_flops_per_s={d: t.rate for d, t in matmul.items()},
        description=f"{_processor(kind)}, measured by graphcost calibrate on {stamp[:10]}"
        + (f" with {threads} thread(s)" if kind == "cpu" else ""),
        vector_peak_flops_per_s=vector, calibration=how, source="calibrate")
    return Calibration(device, matmul, bandwidth, threads, seconds)


# ---------------------------------------------------------------- timing


def _timer(kind: str) -> Callable[[Callable[[], object]], float]:
    """Seconds one call of fn takes: perf_counter on the CPU, cuda events on a GPU."""
    if kind == "cpu":
        def cpu(fn):
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        return cpu

    def cuda(fn):  # not run on CPU-only machines: see the module docstring
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    return cuda


def _best(kind: str, fn: Callable[[], object], budget_s: float, *,
          warm_up: bool = True) -> tuple[float, int]:
    """Warm up once, then the best of timed runs within `budget_s` (at least MIN_RUNS)."""
    timer = _timer(kind)
    if warm_up:
        timer(fn)
    best, runs, deadline = float("inf"), 0, time.perf_counter() + budget_s
    while runs < MIN_RUNS or (runs < MAX_RUNS and time.perf_counter() < deadline):
        best = min(best, timer(fn))
        runs += 1
    return best, runs


def _matmul(kind: str, dtype: torch.dtype, budget_s: float, size: int | None) -> Timing:
    device = torch.device(kind)
    first, last = MATMUL_SIZES[kind]
    timer, start = _timer(kind), time.perf_counter()

    def operands(n):
        a = torch.randn(n, n, device=device).to(dtype)
        return a, torch.randn(n, n, device=device).to(dtype)

    with _no_tf32(kind):
        n = size or first
        a, b = operands(n)
        timer(lambda: torch.mm(a, b))  # warm-up
        # grow n while MIN_RUNS of the next size (8x the work) fit in a third of the budget
        while size is None and n < last and 8 * MIN_RUNS * timer(lambda: torch.mm(a, b)) \
                <= budget_s / 3:
            n *= 2
            a, b = operands(n)
            timer(lambda: torch.mm(a, b))  # warm-up
        left = budget_s - (time.perf_counter() - start)
        best, runs = _best(kind, lambda: torch.mm(a, b), left, warm_up=False)
    return Timing(f"torch.mm {n}x{n} @ {n}x{n} {dtype_label(dtype)}", n, runs, best,
                  FLOPS_PER_FMA * n**3 / best)


class _no_tf32:
    """fp32 matmuls in full fp32 (PyTorch's default; set explicitly for the measurement)."""

    def __init__(self, kind: str):
        self.cuda = kind == "cuda"

    def __enter__(self):
        if self.cuda:
            self.saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = self.saved


def _copy(kind: str, budget_s: float, nbytes: int | None) -> Timing:
    if nbytes is None:
        nbytes = max(MIN_COPY_BYTES[kind], 8 * _last_level_cache_bytes(kind))
        nbytes = min(nbytes, int(_memory_bytes(kind) // 8))  # two buffers, a quarter of memory
    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=kind)
    dst = torch.empty_like(src)
    best, runs = _best(kind, lambda: dst.copy_(src), budget_s)
    moved = 2 * src.nbytes  # read src, write dst
    return Timing(f"copy_ of {src.nbytes} bytes", src.nbytes, runs, best, moved / best)


# ---------------------------------------------------------------- what the machine is


def _memory_bytes(kind: str) -> int:
    """Device memory: CUDA's total, or physical RAM (bounded by a cgroup v2 limit if any)."""
    if kind == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            ram = min(ram, int(limit))
    except OSError:
        pass
    return ram


def _last_level_cache_bytes(kind: str) -> int:
    """The GPU's L2, or the CPU's largest cache from sysfs (0 where unknown)."""
    if kind == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    sizes = [0]
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip().upper()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            pass
    return max(sizes)


def _processor(kind: str) -> str:
    if kind == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"
