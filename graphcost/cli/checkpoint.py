"""`graphcost checkpoint MODEL`: activation-checkpointing policies side by side; with --budget,
the per-block mix with the least recompute that fits."""

from __future__ import annotations

import argparse

from graphcost.api.options import resolve_budget
from graphcost.cli.common import (
    device_from_args,
    load_analysis,
    print_json,
    training_options,
    write_plot,
)
from graphcost.cli.options import POLICY_HELP, Parents
from graphcost.load.model import CliError
from graphcost.passes.checkpoint.policy import BUILTIN_POLICIES
from graphcost.report.analysis import unsupported_line
from graphcost.report.checkpoint import checkpoint_report
from graphcost.report.plot import checkpoint_pareto_png


def add_parser(verbs, parents: Parents) -> None:
    c = verbs.add_parser(
        "checkpoint", help="compare activation-checkpointing policies; the best under a budget",
        parents=[*parents.loading(), parents.training, parents.grad_accumulation,
                 parents.budget, parents.reserve, parents.json],
        description="Walk a training step of MODEL once per checkpoint policy and compare "
        "them side by side: peak memory, activations kept for backward, FLOPs recomputed in "
        "the backward and FLOPs the device runs per step, and whether each fits. With "
        "--budget, also find the per-block mix (none / selective / save-matmuls / full for "
        "each block of the main stack) with the least recomputation whose peak is within "
        "the budget, exactly (an integer program over the walks).",
        epilog=f"Policies: {POLICY_HELP}. Without --policies the built-ins "
        f"({', '.join(BUILTIN_POLICIES)}) are compared and those that do not apply to the "
        "model (selective without attention, block policies without a stack of blocks) are "
        "skipped with a note; a policy named in --policies that does not apply is an error. "
        "'fits?' is judged against --budget, else the --device's memory less --reserve. "
        "Exit status 2 on a user error; a budget nothing fits in is an answer (status 0).")
    c.add_argument("--policies", default=None, metavar="P1,P2,...",
                   help="comma-separated policies to compare, in this order (default: the "
                   "built-ins)")
    c.add_argument("--plot", metavar="FILE.png", default=None,
                   help="save peak memory vs recompute FLOPs per policy, with the Pareto front "
                   "and the budget (needs the plot extra: matplotlib)")
    c.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    training = training_options(args, "optimizer", "optimizer_impl", "grad_accumulation",
                                "compile")
    if args.compile and args.budget is not None:  # before the trace
        raise CliError("the budget search (per-block mixes) under --compile is not modelled "
                       "yet: drop --budget to compare the policies compiled")
    device = device_from_args(args)
    budget = resolve_budget(device, args.budget, args.reserve)  # fails before the trace
    analysis = load_analysis(args)
    result = analysis.checkpoints(args.policies, args.budget, reserve=args.reserve, **training)
    optimum = result.optimum
    if args.plot:
        write_plot(args.plot, lambda path: checkpoint_pareto_png(
            list(result.rows), path, budget_bytes=result.budget_bytes,
            optimum=optimum.row if optimum else None,
            title=f"{result.shape.name}: checkpoint policies"))
    if args.json:
        return print_json(result)
    model = result.shape.name + (", torch.compile" if result.config.compile else "")
    print(checkpoint_report(list(result.rows), model=model, device=result.device,
                            budget_line=budget.line, skipped=list(result.skipped),
                            optimum=optimum, unsupported=unsupported_line(analysis)), end="")
    if args.plot:
        print(f"\nplot: {args.plot}")
    return 0
