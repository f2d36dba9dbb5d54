"""`graphcost analyze MODEL`: parameters, FLOPs and saved activations of one training step, per
module and per op."""

from __future__ import annotations

import argparse
import json

from graphcost.cli.common import load_analysis
from graphcost.cli.options import Parents, non_negative, positive
from graphcost.report.analysis import render
from graphcost.report.memory import compiled_dict, compiled_report


def add_parser(verbs, parents: Parents) -> None:
    a = verbs.add_parser(
        "analyze", help="costs of one training step of MODEL", parents=[
            *parents.loading(), parents.json],
        description="Trace MODEL once on the meta device and cost one training step: "
        "parameters, forward/backward FLOPs per step (and per token), activations saved for "
        "backward, per module and per op.",
        epilog="MODEL is a zoo name (see 'graphcost models') or path/to/file.py:factory, where "
        "factory() returns (module, example_inputs) and is called under "
        "torch.device('meta') so nothing is allocated; a factory with batch/seq parameters "
        "receives --batch/--seq; or hf:path/to/config.json, a Hugging Face config built by "
        "transformers on the meta device. Exit status 2 on a user error (bad option, unknown "
        "model or device, untraceable model, --strict with an unsupported op).")
    a.add_argument("--depth", type=positive, default=2,
                   help="module path depth of the per-module table/JSON (default 2)")
    a.add_argument("--top", type=non_negative, default=10,
                   help="rows of the per-op table (default 10; 0: all)")
    a.add_argument("--compile", action="store_true",
                   help="also the step under torch.compile (Inductor): the activations its "
                   "partitioner keeps, what the backward recomputes, the forward and "
                   "backward's peak (CPU; docs/compile.md)")
    a.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    analysis = load_analysis(args)
    step = analysis.compiled() if args.compile else None
    if args.json:
        result = analysis.to_dict(module_depth=args.depth)
        if step is not None:
            result["compiled"] = compiled_dict(analysis, step)
        print(json.dumps(result))
        return 0
    print(render(analysis, depth=args.depth, top=args.top or len(analysis.ops),
                 tokens=analysis.tokens,
                 dtype=analysis.dtype), end="")
    if step is not None:
        print("\n" + compiled_report(analysis, step), end="")
    return 0

