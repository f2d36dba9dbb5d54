"""What the verbs share when they run: the command line's options turned into the API's keyword
arguments, MODEL traced quietly, one way to draw a plot and to print a result's JSON."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import sys
import warnings
from typing import Any

import torch

from graphcost.api.analyze import ModelAnalysis
from graphcost.api.analyze import analyze as api_analyze
from graphcost.api.options import parse_bytes, training_config
from graphcost.errors import GraphcostError
from graphcost.hardware.devices import Device, dtype_key, get_device
from graphcost.load.model import CliError, parse_overrides
from graphcost.passes.checkpoint.policy import parse_policy
from graphcost.passes.memory.training import TrainingConfig
from graphcost.passes.parallel.plan import ParallelPlan


def print_json(result) -> int:
    """A result's `to_dict()` as one line of JSON on stdout: what --json prints."""
    print(json.dumps(result.to_dict()))
    return 0


@contextlib.contextmanager
def quiet_torch():
    """Hold back what torch.export prints while it works (a partial graph on stderr, internal
    log lines): on success it is passed on, on failure graphcost's own message replaces it.
    Warnings are collected and printed once each afterwards."""
    captured = io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    ok = False
    try:
        with contextlib.redirect_stderr(captured), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            yield
        ok = True
    finally:
        logging.disable(previous)
        if ok:
            sys.stderr.write(captured.getvalue())
            shown = set()
            for w in seen:
                text = str(w.message)
                if not text.startswith("graphcost:"):
                    text = f"graphcost: warning: {w.category.__name__}: {text}"
                if text not in shown:
                    shown.add(text)
                    print(text, file=sys.stderr)


@contextlib.contextmanager
def tracing(args: argparse.Namespace):
    """Around a trace: torch quiet, and with --json whatever the model file prints kept off
    stdout."""
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        with quiet_torch():
            yield


def model_options(args: argparse.Namespace, **changes: Any) -> dict[str, Any]:
    """MODEL's options as graphcost.api.analyze.analyze's keyword arguments (`changes` replace some)."""
    get = {**vars(args), **changes}.get
    return dict(batch=get("batch"), seq=get("seq"), precision=get("precision"),
                device=device_from_args(args), targets=not get("no_targets", False),
                overrides=parse_overrides(get("set") or []), strict=get("strict", False))


def load_analysis(args: argparse.Namespace, **changes: Any) -> ModelAnalysis:
    """MODEL from the options, traced and costed (graphcost.api.analyze.analyze); with
    --compile, its compiled step too, in the same quiet context (its warnings, its prints)."""
    options = model_options(args, **changes)
    with tracing(args):
        analysis = api_analyze(args.model, **options)
        if getattr(args, "compile", False) and not getattr(args, "inference", False):
            analysis.compiled(getattr(args, "checkpoint", "none"))
        return analysis


def training_options(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The training options the verb takes, as keyword arguments (TRAINING_OPTIONS),
    checked before any trace."""
    options = {name: getattr(args, name) for name in names}
    training_config(**options)
    return options


def efficiency_options(args: argparse.Namespace) -> dict[str, float]:
    return {"matmul_efficiency": args.matmul_efficiency,
            "vector_efficiency": args.vector_efficiency,
            "bandwidth_efficiency": args.bandwidth_efficiency}


def parallel_plan(args: argparse.Namespace) -> ParallelPlan | None:
    """The ParallelPlan of the options, or None for one device without sharding."""
    if (args.gpus, args.tp, args.pp, args.ep, args.zero, args.dp) == (1, 1, 1, 1, 0, None) \
            and not (args.fsdp or args.sequence_parallel or args.partition_activations):
        return None
    return ParallelPlan(gpus=args.gpus, dp=args.dp, tp=args.tp, pp=args.pp, ep=args.ep,
                        zero=args.zero, fsdp=args.fsdp,
                        sequence_parallel=args.sequence_parallel,
                        partition_activations=args.partition_activations,
                        micro_batches=args.micro_batches)


def write_plot(path: str, draw) -> None:
    """`draw(path)` with a plotting function of graphcost.report.plot, a file that cannot be
    written as one message (matplotlib missing is report.plot's ConfigError, graphcost.optional)."""
    try:
        draw(path)
    except OSError as exc:
        raise CliError(f"cannot write --plot {path!r}: {exc.strerror}") from None


def setting(shape, config: TrainingConfig | None = None, with_shape: bool = True) -> str:
    """'bf16, adamw, checkpoint full, batch 4, seq 2048' for a report's title line."""
    parts = [shape.precision or "model dtype"]
    if config is not None:
        parts.append(config.optimizer)
        if parse_policy(config.checkpoint).kind != "none":
            parts.append(f"checkpoint {parse_policy(config.checkpoint)}")
        if config.compile:
            parts.append("torch.compile")
    if with_shape and shape.batch is not None:
        parts.append(f"batch {shape.batch}")
    if with_shape and shape.seq is not None:
        parts.append(f"seq {shape.seq}")
    return ", ".join(parts)


# ---------------------------------------------------------------- --device and its figures


def _tflops(items: list[str], option: str, bare: tuple[torch.dtype, ...]) -> dict:
    """['250', 'fp32=60'] (TFLOP/s) -> {bf16: 2.5e14, fp16: 2.5e14, fp32: 6e13}: a bare number
    stands for the dtypes in `bare`."""
    out = {}
    for item in items:
        name, sep, number = item.rpartition("=")
        try:
            dtypes = (dtype_key(name),) if sep else bare
            value = float(number)
        except (GraphcostError, ValueError):
            raise CliError(f"bad {option} {item!r}; write TFLOPS or DTYPE=TFLOPS, e.g. "
                           f"{option} 312 or {option} float32=19.5") from None
        if not 0 < value < math.inf:
            raise CliError(f"{option} {item!r} must be a positive number of TFLOP/s")
        out.update(dict.fromkeys(dtypes, value * 1e12))
    return out


def device_from_args(args: argparse.Namespace, name: str | None = None) -> Device:
    """--device (a preset name or a device file), with the --device-* flags laid over it: the
    one place the command line becomes a Device. `name` replaces args.device."""
    device = get_device(args.device if name is None else name)
    memory = bandwidth = None
    if args.device_memory is not None:
        memory = parse_bytes(args.device_memory, "--device-memory")
        if memory <= 0:
            raise CliError(f"--device-memory {args.device_memory!r} must be more than 0 bytes")
    if args.device_bandwidth is not None:
        try:
            bandwidth = float(args.device_bandwidth) * 1e9
        except ValueError:
            bandwidth = -1.0
        if not 0 < bandwidth < math.inf:
            raise CliError(f"bad --device-bandwidth {args.device_bandwidth!r}; give GB/s "
                           "(10^9 bytes/s) as a positive number, e.g. 2039")
    matmul = _tflops(args.device_flops, "--device-flops", (torch.bfloat16, torch.float16))
    vector = _tflops(args.device_vector_flops, "--device-vector-flops",
                     (torch.float32, torch.bfloat16, torch.float16))
    if memory is None and bandwidth is None and not matmul and not vector:
        return device
    return device.with_figures(memory_bytes=memory, bandwidth_bytes_per_s=bandwidth,
                               matmul_flops_per_s=matmul, vector_flops_per_s=vector)


def device_flags_given(args: argparse.Namespace) -> bool:
    return (args.device_memory is not None or args.device_bandwidth is not None
            or bool(args.device_flops) or bool(args.device_vector_flops))


def ridge(d: Device) -> float | None:
    """bf16 matmul FLOP per byte of memory traffic, where the device has both figures."""
    try:
        return d.ridge_point(torch.bfloat16)
    except GraphcostError:
        return None
