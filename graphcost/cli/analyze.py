"""`graphcost analyze MODEL`: parameters, FLOPs and saved activations of one training step, per
module and per op."""

from __future__ import annotations

import argparse
import json

from graphcost.cli.common import load_analysis
from graphcost.cli.options import Parents, non_negative, positive
from graphcost.report.analysis import render


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
    a.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    analysis = load_analysis(args)
    if args.json:
        print(json.dumps(analysis.to_dict(module_depth=args.depth)))
        return 0
    print(render(analysis, depth=args.depth, top=args.top or len(analysis.ops),
                 tokens=analysis.tokens,
                 dtype=analysis.dtype), end="")
    return 0

