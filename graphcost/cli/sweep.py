"""`graphcost sweep MODEL --device GPU --batch 1,2,4 --seq 512,1024`: roofline MFU, tokens/s and
peak memory over batch sizes and lengths, as a table, a CSV and a plot."""

from __future__ import annotations

import argparse
import csv
import os

from graphcost.api.options import resolve_budget, roofline_device
from graphcost.api.shapes import sweep
from graphcost.cli.common import (
    device_from_args,
    efficiency_options,
    model_options,
    print_json,
    setting,
    tracing,
    training_options,
    write_plot,
)
from graphcost.cli.options import Parents, int_list
from graphcost.load.model import CliError
from graphcost.report.analysis import unsupported_line
from graphcost.report.plot import sweep_mfu_png
from graphcost.report.roofline import SWEEP_COLUMNS, sweep_table
from graphcost.report.units import UNITS_NOTE


def add_parser(verbs, parents: Parents) -> None:
    s = verbs.add_parser(
        "sweep", help="roofline MFU, tokens/s and peak memory over batch sizes and lengths",
        parents=[parents.model, parents.precision, parents.device, parents.training,
                 parents.grad_accumulation, parents.checkpoint, parents.efficiency,
                 parents.budget, parents.reserve, parents.set, parents.rules, parents.json],
        description="For every --batch x --seq combination: the roofline step time, MFU, "
        "HFU, tokens/s, the training peak memory and whether it fits the device. A table, "
        "and optionally a CSV and a plot of MFU against batch size.",
        epilog="One trace per combination. 'fits?' is judged against --budget, else the "
        "device's memory less --reserve. Exit status 2 on a user error.")
    s.add_argument("--batch", default="1", metavar="B1,B2,...",
                   help="batch sizes, comma-separated (default 1)")
    s.add_argument("--seq", default=None, metavar="T1,T2,...",
                   help="sequence lengths, comma-separated (default: the model's own)")
    s.add_argument("--csv", metavar="FILE.csv", default=None, help="write the table as CSV")
    s.add_argument("--plot", metavar="FILE.png", default=None,
                   help="save MFU against batch size, one line per --seq (needs the plot extra: matplotlib)")
    s.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    batches = int_list(args.batch, "--batch")
    seqs = int_list(args.seq, "--seq")
    training = training_options(args, "optimizer", "optimizer_impl", "grad_accumulation",
                                "checkpoint", "compile")
    device = roofline_device(device_from_args(args))
    budget = resolve_budget(device, args.budget, args.reserve)
    if args.plot and not args.plot.lower().endswith(".png"):
        raise CliError(f"--plot {args.plot!r} must end in .png")
    for option, path in (("--csv", args.csv), ("--plot", args.plot)):
        folder = os.path.dirname(os.path.abspath(os.path.expanduser(path))) if path else None
        if folder and not os.path.isdir(folder):  # before the traces, not after
            raise CliError(f"{option} {path!r}: folder {folder!r} does not exist; create it first")
    options = model_options(args, batch=None, seq=None)
    with tracing(args):
        result = sweep(args.model, device=device, batch=batches, seq=seqs,
                           precision=options["precision"], budget=args.budget,
                           reserve=args.reserve, overrides=options["overrides"],
                           strict=options["strict"], **efficiency_options(args), **training)
    title = f"{result.name} on {result.device}, {setting(result, result.config, False)}"
    rows = [dict(r) for r in result.rows]
    if args.csv:
        try:
            with open(args.csv, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS)
                writer.writeheader()
                for r in rows:
                    writer.writerow({**r, "fits": "" if r["fits"] is None else
                                     str(r["fits"]).lower()})
        except OSError as exc:
            raise CliError(f"cannot write --csv {args.csv!r}: {exc.strerror}") from None
    if args.plot:
        write_plot(args.plot, lambda path: sweep_mfu_png(rows, path,
                                                        title=f"{title}: MFU by batch"))
    if args.json:
        return print_json(result)
    unsupported = unsupported_line(result)
    lines = [f"graphcost sweep: {title}", f"  {budget.line}", "", sweep_table(rows), "",
             "step time, MFU, HFU and tokens/s per optimizer step from the roofline; peak: the "
             "training steps' memory peak.", UNITS_NOTE]
    lines += [f"csv: {args.csv}"] if args.csv else []
    lines += [f"plot: {args.plot}"] if args.plot else []
    lines += ["", unsupported] if unsupported else []
    print("\n".join(lines))
    return 0
