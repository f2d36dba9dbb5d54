"""`graphcost calibrate`: measure this machine's CPU or GPU with PyTorch's own kernels and write
a device file that --device takes."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from graphcost.api.options import parse_bytes
from graphcost.cli.common import ridge
from graphcost.cli.options import Parents, positive
from graphcost.errors import GraphcostError
from graphcost.hardware.calibrate import calibrate
from graphcost.hardware.devices import dtype_key, dtype_label, save_device_file
from graphcost.load.model import CliError
from graphcost.report.units import format_bandwidth, format_bytes, format_flops_per_s, table


def add_parser(verbs, parents: Parents) -> None:
    cal = verbs.add_parser(
        "calibrate", help="measure this machine's CPU or GPU and write a device file",
        parents=[parents.json],
        description="Measure the local device with PyTorch's own kernels: dense matmul FLOP/s "
        "per dtype (torch.mm, n doubling to fit the time budget, best of several runs after "
        "a warm-up), and memory bandwidth (a copy well beyond the last-level cache, bytes "
        "read + written). The vector (non-matmul) figure is the float32 matmul one. Writes a "
        "device file that --device takes wherever a preset name goes.",
        epilog="Timings depend on the thread count (torch.get_num_threads(), recorded in the "
        "file) and on what else runs on the machine. Exit status 2 on a user error.")
    cal.add_argument("--out", default=None, metavar="FILE.json",
                     help="device file to write (default: cpu.json or cuda.json)")
    cal.add_argument("--device", default=None, choices=["cpu", "cuda"],
                     help="what to measure (default: cuda when available, else cpu)")
    cal.add_argument("--seconds", type=float, default=3.0,
                     help="time budget, about (default 3); more gives steadier figures")
    cal.add_argument("--dtypes", default="float32,bfloat16", metavar="D1,D2",
                     help="matmul dtypes: float32, bfloat16, float16 (default "
                     "float32,bfloat16; float32 is always measured)")
    cal.add_argument("--threads", type=positive, default=None,
                     help="CPU threads for the measurement (default: torch's, "
                     f"{torch.get_num_threads()} here)")
    cal.add_argument("--name", default=None, help="device name (default cpu-calibrated or "
                     "cuda-calibrated)")
    cal.add_argument("--matmul-size", type=positive, default=None, metavar="N",
                     help="fix the matmul side n instead of searching it (small n: quick, "
                     "low figures)")
    cal.add_argument("--copy-bytes", default=None, metavar="SIZE",
                     help="fix the copy buffer, e.g. 64MiB (default: 8x the last-level "
                     "cache, at least 256 MiB on a CPU)")
    cal.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    if not all(dtypes):
        raise CliError(f"--dtypes {args.dtypes!r} has an empty name; write e.g. "
                       "--dtypes float32,bfloat16")
    try:
        dtypes = [dtype_key(d) for d in dtypes]
    except GraphcostError as exc:
        raise CliError(f"{exc}, in --dtypes") from None
    copy_bytes = None
    if args.copy_bytes is not None:
        copy_bytes = parse_bytes(args.copy_bytes, "--copy-bytes")
        if copy_bytes < 4:
            raise CliError(f"--copy-bytes {args.copy_bytes!r} must be at least 4 bytes")
    out = args.out or f"{kind}.json"
    if not out.lower().endswith(".json"):
        raise CliError(f"--out {out!r} must end in .json (so that --device reads it as a file)")
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(out)))
    if not os.path.isdir(folder):
        raise CliError(f"--out {out!r}: folder {folder!r} does not exist; create it first")
    start = time.perf_counter()
    result = calibrate(kind, seconds=args.seconds, dtypes=dtypes, matmul_size=args.matmul_size,
                       copy_bytes=copy_bytes, threads=args.threads, name=args.name)
    elapsed = time.perf_counter() - start
    device = result.device
    save_device_file(device, out)
    if args.json:
        print(json.dumps({
            "out": out, "name": device.name, "kind": device.kind,
            "memory_bytes": device.memory_bytes,
            "bandwidth_bytes_per_s": device.bandwidth_bytes_per_s,
            "matmul_flops_per_s": {dtype_label(k): v for k, v in device.peak_flops_per_s.items()},
            "vector_flops_per_s": {dtype_label(k): v
                                   for k, v in device.vector_peak_flops_per_s.items()},
            "matmul_size": {dtype_label(k): t.size for k, t in result.matmul.items()},
            "copy_bytes": result.bandwidth.size, "threads": result.threads,
            "elapsed_s": elapsed}))
        return 0
    rows = [[f"matmul {dtype_label(d)}", t.what.split(" ", 1)[1].rsplit(" ", 1)[0], str(t.runs),
             f"{t.best_s * 1e3:.2f} ms", format_flops_per_s(t.rate)]
            for d, t in result.matmul.items()]
    b = result.bandwidth
    rows += [["vector (non-matmul)", "= float32 matmul", "", "",
              format_flops_per_s(device.vector_flops_per_s(torch.float32))],
             ["memory bandwidth", f"copy_ {format_bytes(b.size)}", str(b.runs),
              f"{b.best_s * 1e3:.2f} ms", format_bandwidth(b.rate)]]
    print(f"calibrated {device.name}: {device.description}; torch {torch.__version__}, "
          f"{elapsed:.1f} s")
    print(table(["measured", "size", "runs", "best", "achieved"], rows,
                       align="llrrr"))
    point = ridge(device)
    print(f"\nmemory {format_bytes(device.memory_bytes)}"
          + (f"; ridge point {point:.1f} bf16 FLOP/byte" if point else ""))
    print("bandwidth counts bytes read + written; FLOPs are 2 per multiply-add.")
    print(f"wrote {out}: pass --device {out} wherever a preset name goes")
    return 0
