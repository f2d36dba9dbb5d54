"""The corpus (tests/corpus) against PyTorch's own ground truth, as a markdown table.

    python bench/corpus.py [NAME ...]

One row per model (all of them, or those whose name contains one of NAME): parameters, forward
and backward FLOPs and saved activation bytes, each "exact" or graphcost's relative error; the
training peak and the worst forward-phase peak, graphcost's error in % (or "exact") against the
live-tensor tracker's real CPU steps (AdamW, two steps); the unsupported ops; the time the row took. A stage
that raised shows as "error" and is listed under the table. See validation/corpus.py.
"""

from __future__ import annotations

import sys
import time

import _root  # noqa: F401 - the repository root on sys.path, for validation/ and tests/

from tests.corpus import CORPUS, KNOWN_FAILURES
from validation.corpus import Record, check, relative


def exact(pair) -> str:
    if pair is None:
        return "error"
    return "exact" if pair[0] == pair[1] else f"{relative(pair):+.2%}"


def percent(pair) -> str:
    if pair is None:
        return "error"
    return "exact" if pair[0] == pair[1] else f"{100 * relative(pair):+.2f}"


def worst_forward(record: Record):
    if not record.forward_peaks:
        return None
    return max(record.forward_peaks.values(), key=lambda p: abs(relative(p)))


def row(record: Record) -> str:
    unsupported = ", ".join(f"{op} ×{n}" for op, n in record.unsupported_ops.items()) or "—"
    params = exact(record.params)
    return (f"| {record.name} | {record.kind} | {params} | {exact(record.forward_flops)} | "
            f"{exact(record.backward_flops)} | {exact(record.saved_bytes)} | "
            f"{percent(record.peak_bytes)} | {percent(worst_forward(record))} | {unsupported} | "
            f"{record.seconds:.2f} s |")


def main(argv: list[str]) -> None:
    entries = [e for e in CORPUS if not argv or any(n in e.name for n in argv)]
    start = time.perf_counter()
    print("| model | kind | params | fwd FLOPs | bwd FLOPs | saved bytes | training peak % | "
          "forward peak % | unsupported ops | time |")
    print("|---|---|---|---|---|---|---:|---:|---|---:|")
    records = []
    for entry in entries:
        record = check(entry)
        records.append(record)
        print(row(record), flush=True)
    total = time.perf_counter() - start
    matching = sum(not r.problems() for r in records)
    known = sum(r.name in KNOWN_FAILURES for r in records)
    print(f"\n{matching} of {len(records)} models match everywhere; "
          f"{known} known failure{'s' if known != 1 else ''}; total time {total:.1f} s.")
    errors = [(r.name, stage, text) for r in records for stage, text in r.errors.items()]
    if errors:
        print("\nErrors:\n")
        for name, stage, text in errors:
            print(f"- {name} ({stage}): {text[:300]}")


if __name__ == "__main__":
    main(sys.argv[1:])
