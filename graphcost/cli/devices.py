"""`graphcost devices [DEVICE ...]`: the device presets, or the devices named (files, presets
with --device-* flags over them)."""

from __future__ import annotations

import argparse
import json

import torch

from graphcost.cli.common import device_flags_given, device_from_args, ridge
from graphcost.cli.options import Parents
from graphcost.hardware.devices import PRESETS, Device
from graphcost.load.model import CliError, dtype_name
from graphcost.report.units import format_bandwidth, format_bytes, format_flops_per_s, table

DEVICES_NOTE = (
    "units: memory binary (1 GiB = 2^30 B); bandwidth decimal as vendors quote it (1 TB/s = "
    "10^12 B/s);\npeaks are dense matmul peaks (no 2:4 sparsity); ridge = bf16 peak / bandwidth, "
    "in FLOP per byte.\n\nAnother device, wherever --device goes:\n"
    "  a device file        --device my-gpu.json (schema: docs/devices.md)\n"
    "  flags over a preset  --device a100-80gb --device-memory 48GiB --device-bandwidth 1500 "
    "--device-flops 250\n"
    "  this machine         graphcost calibrate --out cpu.json, then --device cpu.json\n")


def add_parser(verbs, parents: Parents) -> None:
    d = verbs.add_parser("devices", help="list device presets (or the devices named)",
                         parents=[parents.device_figures, parents.json],
                         description="Device presets: memory, bandwidth, dense fp32 and bf16 "
                         "matmul peaks and the ridge point (bf16 FLOP per byte). With DEVICE "
                         "names or device files, just those, with any --device-* flags "
                         "applied: a way to check a file or a set of flags.",
                         epilog="A device is a preset, a device file (docs/devices.md), a "
                         "preset or file with --device-* flags over it, or this machine as "
                         "'graphcost calibrate' measures it.")
    d.add_argument("names", nargs="*", metavar="DEVICE", help="preset name or FILE.json")
    d.set_defaults(run=run)


def device_dict(d: Device) -> dict:
    """One device as `graphcost devices --json` lists it."""
    return {"name": d.name, "kind": d.kind, "memory_bytes": d.memory_bytes,
            "bandwidth_bytes_per_s": d.bandwidth_bytes_per_s,
            "peak_flops_per_s": {dtype_name(k): v for k, v in d.peak_flops_per_s.items()},
            "vector_flops_per_s": {dtype_name(k): v
                                   for k, v in d.vector_peak_flops_per_s.items()},
            "ridge_flops_per_byte": ridge(d), "source": d.source,
            "description": d.description}


def run(args: argparse.Namespace) -> int:
    if args.names:
        devices = [device_from_args(args, name) for name in args.names]
    elif device_flags_given(args):
        raise CliError("name the device the --device-* flags change, e.g. 'graphcost devices "
                       "a100-80gb --device-memory 48GiB'")
    else:
        devices = list(PRESETS.values())
    if args.json:
        print(json.dumps({"devices": [device_dict(d) for d in devices]}))
        return 0

    def peak(d: Device, dtype: torch.dtype) -> str:
        x = d.peak_flops_per_s.get(dtype)
        return format_flops_per_s(x) if x else "-"

    rows = [[d.name, d.kind, format_bytes(d.memory_bytes) if d.memory_bytes else "-",
             format_bandwidth(d.bandwidth_bytes_per_s) if d.bandwidth_bytes_per_s
             else "-", peak(d, torch.float32), peak(d, torch.bfloat16),
             f"{ridge(d):.0f}" if ridge(d) else "-", d.description] for d in devices]
    print(table(["device", "kind", "memory", "bandwidth", "fp32 peak", "bf16 peak",
                 "ridge", "description"], rows, align="llrrrrrl"))
    print("\n" + DEVICES_NOTE, end="")
    return 0
