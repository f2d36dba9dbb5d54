"""`graphcost fit MODEL --device GPU`: the largest batch and context that fit, training and
inference; the largest micro-batch per device under a parallel plan."""

from __future__ import annotations

import argparse

from graphcost.api.results import policy_name
from graphcost.api.shapes import fit
from graphcost.cli.common import (
    device_from_args,
    parallel_plan,
    print_json,
    tracing,
    training_options,
)
from graphcost.cli.options import RESERVE_GIB, Parents, positive
from graphcost.load.model import parse_overrides
from graphcost.report.memory import fit_report
from graphcost.report.units import format_bytes
from graphcost.sizing.fit import DEFAULT_RESERVE_BYTES


def add_parser(verbs, parents: Parents) -> None:
    f = verbs.add_parser(
        "fit", help="largest batch and context of MODEL that fit on a device",
        parents=[parents.model, parents.gpu, parents.precision, parents.training,
                 parents.checkpoint, parents.reserve, parents.set, parents.parallel,
                 parents.json],
        description="The largest micro-batch at --seq and the largest context at batch 1 that "
        "fit in the device's memory less a reserve, for training (two steps with the "
        "optimizer) and for inference (prefill with a KV cache). Exact for the model: the "
        "per-event memory polynomials in batch (linear) and length (quadratic) are recovered "
        "from a few traces, not extrapolated from one.",
        epilog=f"The reserve (default {RESERVE_GIB}GiB) stands for the CUDA context "
        "(0.3-1.5 GiB) and allocator slack. File models need a factory with a batch "
        "parameter, and a seq parameter for the context search. --checkpoint applies to the "
        "training answers (inference has no backward). Exit status 2 on a user error.")
    f.add_argument("--seq", type=positive, default=None,
                   help="context for the batch search (default: the model's default)")
    f.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    training = training_options(args, "optimizer", "optimizer_impl", "checkpoint", "compile")
    overrides = parse_overrides(args.set)
    plan = parallel_plan(args)
    device = device_from_args(args)
    with tracing(args):
        result = fit(args.model, device=device, seq=args.seq, precision=args.precision,
                         reserve=DEFAULT_RESERVE_BYTES if args.reserve is None else args.reserve,
                         overrides=overrides, plan=plan, **training)
    if args.json:
        return print_json(result)
    if plan is not None:
        shard = "FSDP" if plan.fsdp else (f"ZeRO-{plan.zero}" if plan.zero else "no sharding")
        best = result.max_batch
        print(f"graphcost fit: {result.name} on {plan.gpus} x {result.device}: dp {plan.dp} x "
              f"tp {plan.tp} x pp {plan.pp}, {shard}\n"
              f"  budget      {format_bytes(result.budget_bytes)} per device (memory less the "
              "reserve)\n"
              f"  training    largest micro-batch per data-parallel rank at {result.seq}: "
              + (f"{best}" if best else "does not fit") + "\n"
              "  (the per-device estimate of docs/parallel.md; the context search is for one "
              "device)")
        return 0
    print(fit_report(result.sizes, model=result.name, dtype=result.precision,
                     optimizer=result.config.optimizer,
                     checkpoint=policy_name(result.config),
                     compile=result.config.compile), end="")
    return 0
