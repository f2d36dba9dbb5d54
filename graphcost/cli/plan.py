"""`graphcost plan MODEL --gpus N --global-batch B --device GPU`: parallel plans (dp x tp x pp,
sharding, checkpointing) ranked by step time, and why the others were rejected."""

from __future__ import annotations

import argparse

from graphcost.api.options import roofline_device, sized_device
from graphcost.api.shapes import plan
from graphcost.cli.common import (
    device_from_args,
    efficiency_options,
    print_json,
    tracing,
    training_options,
)
from graphcost.cli.options import Parents, int_list, link, non_negative, positive
from graphcost.load.model import CliError, parse_overrides
from graphcost.passes.checkpoint.policy import parse_policy
from graphcost.report.parallel import plan_report
from graphcost.sizing.fit import DEFAULT_RESERVE_BYTES
from graphcost.sizing.plans import SHARDINGS


def add_parser(verbs, parents: Parents) -> None:
    pl = verbs.add_parser(
        "plan", help="rank parallel plans (dp x tp x pp, sharding, checkpointing) by step time",
        parents=[parents.model, parents.precision, parents.device, parents.training,
                 parents.efficiency, parents.reserve, parents.set, parents.rules, parents.json],
        description="Every dp x tp x pp that multiplies to --gpus, with each --micro-batch, "
        "--sharding and --checkpoint policy: per-device memory (estimate) and roofline step "
        "time with the plan's collectives and pipeline bubble; the plans that fit ranked by "
        "step time, and why the others were rejected.",
        epilog="Tensor parallelism stays inside a node with sequence parallelism on; see "
        "docs/parallel.md for the model. Exit status 2 on a user error.")
    pl.add_argument("--gpus", type=positive, required=True, help="devices in all")
    pl.add_argument("--global-batch", type=positive, required=True,
                    help="sequences per optimizer step, all data-parallel ranks")
    pl.add_argument("--seq", type=positive, default=None,
                    help="sequence length (default: the model's own)")
    pl.add_argument("--micro-batch", default="1,2,4", metavar="B1,B2,...",
                    help="micro-batch sizes to try (default 1,2,4)")
    pl.add_argument("--checkpoint", default="none,full", metavar="P1,P2,...",
                    help="checkpoint policies to try (default none,full)")
    pl.add_argument("--sharding", default="zero-1,fsdp", metavar="S1,S2,...",
                    help="data-parallel sharding to try: none, zero-1, zero-2, zero-3, fsdp "
                    "(default zero-1,fsdp)")
    pl.add_argument("--intra-node", default=None, metavar="LINK|GB/s",
                    help="link inside a node (default: the device's, e.g. nvlink4)")
    pl.add_argument("--inter-node", default=None, metavar="LINK|GB/s",
                    help="link between nodes (default: the device's, e.g. ib-ndr)")
    pl.add_argument("--gpus-per-node", type=positive, default=None,
                    help="GPUs per node (default 8)")
    pl.add_argument("--top", type=non_negative, default=10,
                    help="plans to list (default 10; 0: all)")
    pl.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    training = training_options(args, "optimizer", "optimizer_impl", "compile")
    device = sized_device(roofline_device(device_from_args(args)),
                              " such as h100-sxm ('graphcost devices')")
    micro = int_list(args.micro_batch, "--micro-batch")
    policies = [p.strip() for p in args.checkpoint.split(",") if p.strip()]
    for p in policies:
        parse_policy(p)
    shardings = [x.strip() for x in args.sharding.split(",") if x.strip()]
    for x in shardings:
        if x not in SHARDINGS:
            raise CliError(f"unknown --sharding {x!r}; use {', '.join(SHARDINGS)}")
    overrides = parse_overrides(args.set)
    with tracing(args):
        result = plan(args.model, gpus=args.gpus, global_batch=args.global_batch,
                          device=device, seq=args.seq, precision=args.precision,
                          micro_batch=micro, checkpoint=policies, sharding=shardings,
                          intra_node=link(args.intra_node), inter_node=link(args.inter_node),
                          gpus_per_node=args.gpus_per_node,
                          reserve=DEFAULT_RESERVE_BYTES if args.reserve is None
                          else args.reserve, overrides=overrides, strict=args.strict,
                          **efficiency_options(args), **training)
    if args.json:
        return print_json(result)
    print(plan_report(list(result.plans), model=result.name, device=device, gpus=args.gpus,
                      global_batch=args.global_batch, seq=args.seq, network=result.network,
                      top=args.top or len(result.plans)), end="")
    return 0
