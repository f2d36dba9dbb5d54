"""`graphcost roofline MODEL --device GPU`: the time of a training step, MFU, HFU, tokens/s;
with --inference, a prefill, a decode step and where decoding turns memory-bound."""

from __future__ import annotations

import argparse

from graphcost.api.options import check_context, roofline_device
from graphcost.cli.common import (
    device_from_args,
    efficiency_options,
    load_analysis,
    print_json,
    setting,
    training_options,
)
from graphcost.cli.options import Parents, non_negative, positive
from graphcost.load.model import CliError, parse_overrides
from graphcost.passes.checkpoint.policy import parse_policy
from graphcost.report.analysis import unsupported_line
from graphcost.report.roofline import (
    COMPILED_NOTE,
    ROOFLINE_SORTS,
    roofline_inference_report,
    roofline_report,
)

TRAINING = ("optimizer", "optimizer_impl", "grad_accumulation", "checkpoint", "compile")


def add_parser(verbs, parents: Parents) -> None:
    r = verbs.add_parser(
        "roofline", help="time of a training step of MODEL on a device: MFU, HFU, tokens/s",
        parents=[*parents.loading(), parents.training, parents.grad_accumulation,
                 parents.checkpoint, parents.efficiency, parents.json],
        description="Roofline time of one training step of MODEL on --device: every op takes "
        "max(FLOPs / peak, bytes moved / bandwidth), the step is its forward, backward, the "
        "recomputation of --checkpoint and the optimizer update. Prints the split, MFU and "
        "HFU, tokens/s, the share of time in compute- and memory-bound ops and the slowest "
        "ops. With --inference: a prefill, a decode step and where decoding turns "
        "memory-bound.",
        epilog="Needs a device with a bandwidth and peaks: a GPU preset, a device file, or "
        "this machine as 'graphcost calibrate' measures it (the default cpu has no figures). "
        "Efficiencies default to 1, the physical limit no kernel reaches. The JSON lists "
        "every op. Exit status 2 on a user error.")
    r.add_argument("--sort", default="time", choices=ROOFLINE_SORTS,
                   help="order of the per-op table, largest first (default time)")
    r.add_argument("--top", type=non_negative, default=20,
                   help="rows of the per-op table (default 20; 0: all)")
    r.add_argument("--compute-bound-batch", action="store_true",
                   help="also the smallest batch at which the step spends more time in "
                   "compute- than in memory-bound ops, at --seq (two more traces)")
    r.add_argument("--inference", action="store_true",
                   help="inference instead: a prefill of --seq tokens per sequence, a decode "
                   "step attending to --context cached tokens, and the context beyond which "
                   "decoding is memory-bound at any batch")
    r.add_argument("--context", type=positive, default=None,
                   help="with --inference: tokens in the KV cache at the decode step (default "
                   "--seq)")
    r.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.inference:
        return run_inference(args)
    if args.context is not None:
        raise CliError("--context is the cached context of --inference; for training use --seq")
    training = training_options(args, *TRAINING)
    roofline_device(device_from_args(args))  # its own message first, before the trace
    analysis = load_analysis(args)
    result = analysis.roofline(compute_bound_batch=args.compute_bound_batch,
                               **efficiency_options(args), **training)
    if args.json:
        return print_json(result)
    extra = [COMPILED_NOTE] if result.config.compile else []
    if args.compute_bound_batch:
        cbb, seq = result.compute_bound_batch, result.shape.seq
        extra.append("  compute-bound   " + (
            f"from batch {format(cbb, ',')} at seq {seq} (more op time compute- than "
            "memory-bound)" if cbb is not None else "not up to batch 1,048,576"))
    print(roofline_report(
        result.step, title=f"graphcost roofline: {result.shape.name} on {result.step.device}, "
        f"{setting(result.shape, result.config)}", sort=args.sort, top=args.top, extra=extra,
        unsupported=unsupported_line(analysis)), end="")
    return 0


def run_inference(args: argparse.Namespace) -> int:
    """--inference: a prefill at (batch, seq), a decode step at --context, the context where
    decoding turns memory-bound."""
    if args.compile:
        raise CliError("--compile with --inference is not modelled yet: drop one of them")
    if parse_policy(args.checkpoint).kind != "none":
        raise CliError("--checkpoint applies to training (inference keeps nothing for a "
                       "backward); drop --checkpoint or --inference")
    if args.grad_accumulation != 1 or args.compute_bound_batch:
        option = "--grad-accumulation" if args.grad_accumulation != 1 else \
            "--compute-bound-batch"
        raise CliError(f"{option} applies to training; drop it or --inference")
    roofline_device(device_from_args(args))
    check_context(args.model, args.context, parse_overrides(args.set))
    analysis = load_analysis(args, no_targets=True)
    result = analysis.roofline(inference=True, context=args.context,
                               **efficiency_options(args))
    if args.json:
        return print_json(result)
    print(roofline_inference_report(
        result.prefill, result.decode, result.memory_bound_context,
        title=f"graphcost roofline --inference: {result.shape.name} on {result.device}, "
        f"{setting(result.shape)}", sort=args.sort, top=args.top,
        unsupported=unsupported_line(analysis)), end="")
    return 0
