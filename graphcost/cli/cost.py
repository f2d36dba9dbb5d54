"""`graphcost cost MODEL --tokens N --device GPU`: time and money of a training run (or of the
forward over N tokens), next to the 6ND / 8ND (2ND) rules of thumb."""

from __future__ import annotations

import argparse

from graphcost.api.options import roofline_device
from graphcost.cli.common import (
    device_from_args,
    efficiency_options,
    load_analysis,
    print_json,
    setting,
    training_options,
)
from graphcost.cli.options import Parents, fraction, parse_count, positive, positive_number
from graphcost.load.model import CliError
from graphcost.passes.checkpoint.policy import parse_policy
from graphcost.report.analysis import unsupported_line
from graphcost.report.roofline import cost_report
from graphcost.report.units import format_count_short


def add_parser(verbs, parents: Parents) -> None:
    co = verbs.add_parser(
        "cost", help="time and money to train MODEL on N tokens, next to 6ND and 8ND",
        parents=[*parents.loading(), parents.training, parents.grad_accumulation,
                 parents.checkpoint, parents.efficiency, parents.json],
        description="Time, GPU-hours and dollars of training MODEL on --tokens with --gpus "
        "devices: FLOPs per token from the graph (forward + backward), at the MFU the "
        "roofline predicts for a step at --batch/--seq (or --mfu), side by side with the "
        "6ND and 8ND rules of thumb at the same MFU.",
        epilog="Data parallel with no communication cost. Exit status 2 on a user error.")
    co.add_argument("--tokens", type=parse_count, required=True, metavar="N",
                    help="training tokens, e.g. 1.4e12, 1.4T or 300B")
    co.add_argument("--inference", action="store_true",
                    help="the forward only over --tokens (evaluation, prefill), next to 2ND")
    co.add_argument("--gpus", type=positive, default=1, help="devices (default 1)")
    co.add_argument("--usd-per-hour", type=positive_number, default=None, metavar="USD",
                    help="price of one device per hour (default: no dollar figure)")
    co.add_argument("--mfu", type=fraction, default=None,
                    help="assume this MFU, in (0, 1], instead of the roofline's prediction")
    co.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    training = training_options(args, "optimizer", "optimizer_impl", "grad_accumulation",
                                "checkpoint", "compile")
    device = roofline_device(device_from_args(args))
    if args.inference and parse_policy(args.checkpoint).kind != "none":
        raise CliError("--checkpoint applies to training; drop --checkpoint or --inference")
    analysis = load_analysis(args, no_targets=args.no_targets or args.inference)
    result = analysis.cost(args.tokens, gpus=args.gpus, usd_per_hour=args.usd_per_hour,
                           mfu=args.mfu, inference=args.inference, **efficiency_options(args),
                           **training)
    if args.json:
        return print_json(result)
    cost, step = result.cost, result.step
    text = setting(result.shape, None if args.inference else result.config)
    if args.inference:
        text += ", forward only"
    if args.mfu is None:
        mfu_line = f"{100 * cost.mfu:.1f}% predicted by the roofline ({text}; --mfu assumes one)"
    else:
        mfu_line = (f"{100 * cost.mfu:.1f}% assumed (--mfu); the roofline predicts "
                    f"{100 * step.mfu:.1f}% ({text})")
    title = (f"graphcost cost: {result.shape.name}, "
             f"{'inference over ' if args.inference else ''}"
             f"{format_count_short(args.tokens)} tokens on "
             f"{format(args.gpus, ',')} x {device.name}")
    report = cost_report(cost, title=title, mfu_line=mfu_line, mfu_dtype=step.mfu_dtype)
    unsupported = unsupported_line(result)
    print(report + (f"\n{unsupported}\n" if unsupported else ""), end="")
    return 0
