"""Which ops of a traced model graphcost has a rule for: `graphcost coverage MODEL`, and the
loading of a user's rule file (`--rules FILE.py`)."""

from __future__ import annotations

import runpy
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from graphcost.analysis.analyze import Analysis
from graphcost.errors import ConfigError
from graphcost.rules import REGISTRY
from graphcost.trace.opaque import unsupported_name

# the graph attributes it reads (graphcost/graph/schema.py)
READS = ("backward_flops", "forward_flops", "target")


@dataclass(frozen=True)
class CoverageRow:
    op: str  # "aten.linear.default"; "opaque module PATH (TYPE)" for graphcost.opaque
    count: int  # nodes of the graph running it
    rule: str  # "graphcost.rules.matmul.linear_cost", or "" when unsupported
    forward_flops: int
    backward_flops: int

    @property
    def supported(self) -> bool:
        return bool(self.rule)


def coverage(analysis: Analysis) -> list[CoverageRow]:
    """One row per ATen op in the trace, most frequent first; unsupported ones first of all."""
    g = analysis.graph
    counts: Counter[str] = Counter()
    flops: dict[str, list[int]] = {}
    targets = {}
    for n in g.op_order:
        d = g.nodes[n]
        op = unsupported_name(d)  # a module stood in for (graphcost.opaque) is one row each
        counts[op] += 1
        targets[op] = d["target"]
        f = flops.setdefault(op, [0, 0])
        f[0] += d["forward_flops"]
        f[1] += d["backward_flops"]
    rows = []
    for op, count in counts.items():
        rule = REGISTRY.lookup(targets[op])
        name = f"{rule.__module__}.{rule.__qualname__}" if rule is not None else ""
        rows.append(CoverageRow(op, count, name, *flops[op]))
    return sorted(rows, key=lambda r: (r.supported, -r.count, r.op))


def load_rule_file(path: str) -> None:
    """Run a user's Python file that registers rules (graphcost.register_rule)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--rules {path!r}: no such file; give a Python file that registers "
                          "rules with graphcost.register_rule (docs/rules.md)")
    try:
        runpy.run_path(str(file), run_name=f"graphcost_rules_{file.stem}")
    except Exception as exc:  # re-raised with the file and what to do
        raise ConfigError(f"--rules {path!r} failed: {type(exc).__name__}: {exc}. A rule file "
                          "registers rules with @graphcost.register_rule(op); pass "
                          "override=True to replace a shipped one") from exc
