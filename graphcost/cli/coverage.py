"""`graphcost coverage MODEL`: every op of the trace with the rule that costs it, or UNSUPPORTED."""

from __future__ import annotations

import argparse
import warnings

from graphcost.cli.common import load_analysis, print_json
from graphcost.cli.options import Parents
from graphcost.report.units import format_flops, table


def add_parser(verbs, parents: Parents) -> None:
    cov = verbs.add_parser(
        "coverage", help="every op in MODEL's trace with the rule that costs it, or UNSUPPORTED",
        parents=[*parents.loading(), parents.json],
        description="List each ATen op of the traced model: how many nodes run it and which "
        "rule costs it; ops without a rule are listed first and are not counted anywhere.",
        epilog="Exit status 1 with --strict when an op is unsupported; 2 on a user error.")
    cov.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unsupported ops are the report itself
        analysis = load_analysis(args, strict=False)  # list, then --strict
    result = analysis.coverage()
    rows, missing = result.rows, result.missing
    if args.json:
        print_json(result)
    else:
        body = [[r.op, format(r.count, ","), r.rule or "UNSUPPORTED",
                 format_flops(r.forward_flops) if r.forward_flops else "0"]
                for r in rows]
        print(f"graphcost coverage: {analysis.model_name}: {len(rows)} distinct ops, "
              f"{sum(r.count for r in rows):,} nodes, "
              + (f"{len(missing)} UNSUPPORTED (not counted: add rules, docs/rules.md)"
                 if missing else "every op has a rule") + "\n")
        print(table(["op", "nodes", "rule", "fwd FLOPs"], body, align="lrll"))
    return 1 if missing and args.strict else 0
