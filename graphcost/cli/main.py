"""The command line: `graphcost <verb> MODEL [options]`, one module per verb in this package.

    graphcost analyze llama-7b --batch 1 --seq 2048
    graphcost analyze gpt2 --seq 128 --json
    graphcost analyze path/to/model.py:factory --device h100-sxm
    graphcost memory gpt2 --checkpoint full --json
    graphcost checkpoint llama-7b --device a100-80gb --budget 40GiB --plot pareto.png
    graphcost roofline llama-7b --device a100-80gb --precision bf16 --top 5
    graphcost cost llama-7b --tokens 1.4e12 --device a100-80gb --gpus 2048 --usd-per-hour 2
    graphcost sweep gpt2 --device h100-sxm --batch 1,2,4,8 --seq 512,1024 --csv sweep.csv
    graphcost devices

MODEL is a zoo name (`graphcost models` lists them), `path/to/file.py:factory`, where
`factory()` returns `(module, example_inputs)` and runs under `torch.device("meta")`, or
`hf:path/to/config.json` (a Hugging Face config, docs/huggingface.md). The options mean the
same on every verb (options.py, docs/cli.md); each verb computes through the Python API
(graphcost.api.analyze) and `--json` prints its result's `to_dict()`.
Errors a user can cause print one line-led message, `graphcost: error: ...`, and exit with 2.
"""

from __future__ import annotations

import argparse
import sys

from graphcost.analysis.coverage import load_rule_file
from graphcost.cli import (
    analyze,
    calibrate,
    checkpoint,
    cost,
    coverage,
    devices,
    fit,
    memory,
    models,
    plan,
    roofline,
    sweep,
)
from graphcost.cli.options import build_parents
from graphcost.errors import GraphcostError
from graphcost.load.model import CliError
from graphcost.version import __version__

EXIT_USAGE = 2
VERBS = (analyze, memory, fit, checkpoint, roofline, cost, sweep, coverage, plan, devices,
         calibrate, models)  # in the order `graphcost --help` lists them


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one message, exit status 2 (argparse would print usage)
        raise CliError(f"{message}; see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="graphcost", description=(
        "A graph-based cost model for PyTorch: parameters, FLOPs per step and per token, what "
        "autograd saves for backward, per module and per op, from one trace of the model."))
    parser.add_argument("--version", action="version", version=f"graphcost {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    parents = build_parents()
    for verb in VERBS:
        verb.add_parser(verbs, parents)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.verb is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        for path in getattr(args, "rules", None) or []:
            load_rule_file(path)
        return args.run(args)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except GraphcostError as exc:
        print(f"graphcost: error: {str(exc).strip()}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
