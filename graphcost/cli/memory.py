"""`graphcost memory MODEL`: the peak of training steps (or of inference with a KV cache), when
it happens and what is alive then; per device under a parallel plan."""

from __future__ import annotations

import argparse

from graphcost.cli.common import (
    load_analysis,
    parallel_plan,
    print_json,
    training_options,
    write_plot,
)
from graphcost.cli.options import Parents, positive
from graphcost.load.model import CliError
from graphcost.passes.checkpoint.policy import parse_policy
from graphcost.report.memory import (
    compiled_report,
    inference_report,
    memory_report,
)
from graphcost.report.parallel import parallel_memory_report
from graphcost.report.plot import memory_timeline_png


def add_parser(verbs, parents: Parents) -> None:
    mem = verbs.add_parser(
        "memory", help="peak memory of training steps of MODEL, when it happens, what is alive",
        parents=[*parents.loading(), parents.training, parents.grad_accumulation,
                 parents.checkpoint, parents.parallel, parents.json],
        description="Walk two training steps of MODEL over its costed graph (forward, backward, "
        "optimizer step; the optimizer state appears in the first step) and report the peak "
        "bytes, the event at which it happens, and what is alive then by category.",
        epilog="--precision fp32/bf16/fp16 casts the model, bf16-mixed keeps fp32 weights and "
        "runs the ops under torch.autocast (default: the model's own parameter dtypes). "
        "Memory a kernel allocates and frees inside one op and allocator rounding are not "
        "modelled. Exit status 2 on a user error.")
    mem.add_argument("--steps", type=positive, default=2,
                     help="training steps to walk (default 2: the state appears in step 1)")
    mem.add_argument("--inference", action="store_true",
                     help="inference instead: a prefill of --context tokens per sequence with "
                     "a KV cache holding them (no gradients, no optimizer)")
    mem.add_argument("--context", type=positive, default=None,
                     help="with --inference: tokens per sequence in the KV cache (default --seq)")
    mem.add_argument("--plot", metavar="FILE.png", default=None,
                     help="save the memory timeline with the peak marked (needs the plot extra: matplotlib)")
    mem.set_defaults(run=run)


TRAINING = ("optimizer", "steps", "grad_accumulation", "optimizer_impl", "checkpoint",
            "compile")


def run(args: argparse.Namespace) -> int:
    if args.inference:
        return run_inference(args)
    if args.context is not None:
        raise CliError("--context is the cached context of --inference; for training use --seq")
    training = training_options(args, *TRAINING)
    plan = parallel_plan(args)
    if plan is not None and args.compile:  # before the trace
        raise CliError("--compile with a parallel plan is not modelled yet: drop one of them")
    if plan is not None and args.plot:
        raise CliError("--plot draws one device's timeline; drop --plot or the parallel plan")
    analysis = load_analysis(args)
    result = analysis.memory(plan=plan, **training)
    if args.plot:
        write_plot(args.plot, lambda path: memory_timeline_png(
            result.timeline, path, title=f"{result.shape.name}: training memory"))
    if args.json:
        return print_json(result)
    if plan is not None:
        print(parallel_memory_report(list(result.stages), result.busiest,
                                     model=result.shape.name, device=analysis.device), end="")
        return 0
    print(memory_report(result.timeline, model=result.shape.name, device=result.device,
                        approximate=result.approximate_ops), end="")
    if result.compiled is not None:
        print("\n" + compiled_report(analysis, result.compiled), end="")
    if args.plot:
        print(f"\nplot: {args.plot}")
    return 0


def run_inference(args: argparse.Namespace) -> int:
    if args.plot:
        raise CliError("--plot draws the training timeline; drop --plot or --inference")
    if args.compile:
        raise CliError("--compile models a training step; drop --compile or --inference")
    if parse_policy(args.checkpoint).kind != "none":
        raise CliError("--checkpoint applies to training (inference keeps nothing for a "
                       "backward); drop --checkpoint or --inference")
    analysis = load_analysis(args, seq=args.context or args.seq, no_targets=True)
    result = analysis.memory(inference=True)
    if args.json:
        return print_json(result)
    print(inference_report(result.memory, model=result.shape.name, device=result.device,
                           batch=result.shape.batch, context=result.shape.seq), end="")
    return 0
