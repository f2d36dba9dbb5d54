"""The vocabulary the Python API and the command line share: precision, sizes, budgets, the
training options, efficiencies and the device checks, each with the one message a user sees
(the CLI's flags and the API's keyword arguments have the same names, docs/cli.md)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from graphcost.errors import ConfigError
from graphcost.hardware.devices import Device, get_device, parse_size
from graphcost.load.model import DTYPE_ALIASES, CliError
from graphcost.models import list_models, max_context
from graphcost.passes.memory.training import TrainingConfig
from graphcost.passes.roofline import Efficiency
from graphcost.report.units import format_bytes
from graphcost.sizing.fit import DEFAULT_RESERVE_BYTES

PRECISIONS = ("fp32", "bf16", "fp16", "bf16-mixed")  # bf16-mixed: fp32 weights, bf16 autocast
TRAINING_OPTIONS = ("optimizer", "steps", "grad_accumulation", "optimizer_impl", "checkpoint",
                    "compile")
CHECKPOINT_IS_TRAINING = ("--checkpoint applies to training (inference keeps nothing for a "
                          "backward); drop --checkpoint or --inference")


# ---------------------------------------------------------------- options


def parse_precision(text: str) -> str:
    """'bf16', 'bfloat16', 'bf16-mixed', ... -> one of PRECISIONS (--precision, alias --dtype)."""
    key = text.strip().lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise ConfigError(f"unknown precision {text!r}, in --precision/--dtype; use one of "
                          "fp32, bf16, fp16 or bf16-mixed")
    return key


def precision_dtypes(precision: str | None) -> tuple[str | None, torch.dtype | None]:
    """A precision as (the dtype the model is cast to, the torch.autocast dtype)."""
    if precision is None:
        return None, None
    precision = parse_precision(precision)
    if precision == "bf16-mixed":  # fp32 weights, ops under torch.autocast(bfloat16)
        return "fp32", torch.bfloat16
    return precision, None


def parse_bytes(value: int | float | str, option: str = "--reserve") -> int:
    """'2GiB', '1.5 GB', '512MiB', '40e9', 1073741824 -> bytes; `option` names the flag in the
    error."""
    try:
        number = parse_size(value)
    except ValueError:
        number = -1.0
    if not 0 <= number < math.inf:
        raise CliError(f"bad size {value!r} in {option}; write e.g. 2GiB, 1.5GB, 512MiB or 40e9")
    return int(number)


def training_config(**training: Any) -> TrainingConfig:
    """The training options (optimizer, steps, grad_accumulation, optimizer_impl, checkpoint,
    compile) as a TrainingConfig; an unknown one is an error."""
    unknown = sorted(set(training) - set(TRAINING_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown training option {unknown[0]!r}; use "
                          f"{', '.join(TRAINING_OPTIONS)}")
    return TrainingConfig(**training)


def efficiency_of(matmul_efficiency: float = 1.0, vector_efficiency: float = 1.0,
                  bandwidth_efficiency: float = 1.0) -> Efficiency:
    return Efficiency(matmul=matmul_efficiency, vector=vector_efficiency,
                      bandwidth=bandwidth_efficiency)


def roofline_device(device: str | Device) -> Device:
    """A device for a roofline: it needs a bandwidth and peaks, which the uncalibrated CPU lacks
    (the device's own message says how to get the figure)."""
    device = get_device(device)
    device.memory_bandwidth_bytes_per_s()
    return device


def sized_device(device: str | Device, hint: str = "") -> Device:
    """A device with a memory size (fit, plan)."""
    device = get_device(device)
    if not device.memory_bytes:
        raise ConfigError(f"device {device.name!r} has no memory size; pick a GPU preset{hint}")
    return device


class Budget(NamedTuple):
    """What 'fits?' is judged against: bytes (None: nothing to judge), where they come from
    ("--budget", "device" or None) and a line saying which."""

    bytes: int | None
    source: str | None
    line: str


def resolve_budget(device: Device, budget: int | str | None = None,
                   reserve: int | str | None = None) -> Budget:
    """`budget`, else the device's memory less `reserve` (default 2 GiB)."""
    if budget is not None:
        if reserve is not None:
            raise CliError("--reserve sizes the budget from --device's memory; with --budget, "
                           "give the budget itself")
        size = parse_bytes(budget, "--budget")
        if size <= 0:
            raise CliError(f"--budget {budget!r} must be more than 0 bytes")
        return Budget(size, "--budget", f"budget {format_bytes(size)} (--budget)")
    if not device.memory_bytes:
        return Budget(None, None, f"budget: none ({device.name} has no memory size; give "
                      "--budget SIZE or a GPU --device such as a100-80gb)")
    reserve_bytes = parse_bytes(DEFAULT_RESERVE_BYTES if reserve is None else reserve)
    size = int(device.memory_bytes - reserve_bytes)
    if size <= 0:
        raise CliError(f"--reserve {format_bytes(reserve_bytes)} leaves nothing of "
                       f"{device.name}'s {format_bytes(device.memory_bytes)}")
    return Budget(size, "device", f"budget {format_bytes(size)} = {device.name}'s "
                  f"{format_bytes(device.memory_bytes)} - reserve {format_bytes(reserve_bytes)}")


def check_context(model: str, context: int | None, overrides: dict | None = None) -> None:
    """A decode context beyond a zoo model's context length is an error."""
    limit = max_context(model, **(overrides or {})) if model in list_models() else None
    if limit is not None and context is not None and context > limit:
        raise CliError(f"--context {context} is beyond {model}'s context length {limit}; give "
                       "a shorter --context or --set the context length")
