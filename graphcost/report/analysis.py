"""An Analysis as text: the summary, the per-module and per-op tables, and the list of ops with
no cost rule."""

from __future__ import annotations

import re

from graphcost.analysis.analyze import Analysis, GroupRow
from graphcost.report.units import (
    UNITS_NOTE,
    format_bytes,
    format_count,
    format_count_short,
    format_flops,
    format_share,
    table,
)
from graphcost.trace.opaque import OPAQUE_PREFIX

# the graph attributes it reads (graphcost/graph/schema.py)
READS = ("kind", "order", "outputs")


def unsupported_line(analysis: Analysis) -> str:
    """The loud line naming every op without a cost rule ('' when there are none)."""
    if not analysis.unsupported_ops:
        return ""
    grouped: dict[str, int] = {}  # opaque modules of a stack as one entry: layers.*.router
    for op, n in sorted(analysis.unsupported_ops.items()):
        key = re.sub(r"(?<=\.)\d+(?=\.| )", "*", op) if op.startswith(OPAQUE_PREFIX) else op
        grouped[key] = grouped.get(key, 0) + n
    listing = ", ".join(f"{op} (x{n})" for op, n in grouped.items())
    fixes = []
    if any(not op.startswith(OPAQUE_PREFIX) for op in analysis.unsupported_ops):
        fixes.append("add a rule with graphcost.register_rule (docs/rules.md)")
    if any(op.startswith(OPAQUE_PREFIX) for op in analysis.unsupported_ops):
        fixes.append("make an opaque module's forward traceable (docs/graph.md)")
    return (f"!! UNSUPPORTED OPS, their costs are NOT included: {listing}. "
            f"{'; '.join(fixes).capitalize()}.")


def _inputs(analysis: Analysis) -> str:
    nodes = sorted((d for _, d in analysis.graph.nodes(data=True) if d["kind"] == "input"),
                   key=lambda d: d["order"])
    return ", ".join(f"{tuple(s.shape)} {str(s.dtype).removeprefix('torch.')}"
                     for d in nodes for s in d["outputs"]) or "none"


def summary(analysis: Analysis, *, tokens: int | None = None, dtype: str | None = None) -> str:
    """Totals of one training step: parameters, weights, FLOPs, saved activations.
    `tokens` (batch * seq for a language model) adds FLOPs per token."""
    a = analysis

    def count(n: int) -> str:
        return format_count(n) + (f"  ({format_count_short(n)})" if n >= 1000 else "")

    rows = [("parameters", count(a.params)), ("trainable", count(a.trainable_params)),
            ("weights", format_bytes(a.weight_bytes))]
    from graphcost.passes.experts import moe_summary

    moe = moe_summary(a)
    if moe is not None:
        x = moe.layers[0]
        rows.insert(1, ("active", f"{count(moe.active_params)} per token: {x.top_k} of "
                                  f"{x.n_experts} experts in {len(moe.layers)} layers "
                                  "(balanced routing)"))
    for label, flops in (("forward", a.forward_flops), ("backward", a.backward_flops),
                         ("total", a.total_flops)):
        text = f"{format_flops(flops):>12} per step  ({format_count(flops)})"
        if tokens:
            text += f"   {format_flops(flops / tokens)} per token"
        rows.append((f"{label} FLOPs", text))
    rows.append(("saved activations", f"{format_bytes(a.saved_activation_bytes)}  "
                 f"(kept by autograd for backward, {a.device.name} kernels)"))
    width = max(len(label) for label, _ in rows)
    head = f"graphcost: {a.model_name} on {a.device.name}"
    if dtype:
        head += f", {dtype}"
    lines = [head, f"  inputs: {_inputs(a)}" + (f" = {format_count(tokens)} tokens" if tokens
                                                  else ""), ""]
    lines += [f"  {label.ljust(width)}  {text}" for label, text in rows]
    if a.unsupported_ops:
        lines += ["", unsupported_line(a)]
    return "\n".join(lines)


def _cost_cells(r: GroupRow, total_flops: int) -> list[str]:
    def nonzero(n: int, fmt) -> str:
        return fmt(n) if n else "0"

    return [nonzero(r.forward_flops, format_flops), nonzero(r.backward_flops, format_flops),
            nonzero(r.saved_bytes, format_bytes),
            format_share(r.forward_flops + r.backward_flops, total_flops)]


COST_HEADERS = ["fwd FLOPs", "bwd FLOPs", "saved act.", "% FLOPs"]


def module_table(analysis: Analysis, depth: int | None = 2) -> str:
    """Per module, cut to `depth` path components, in order of first appearance."""
    total = analysis.total_flops
    rows = [[r.key, format_count_short(r.params)] + _cost_cells(r, total)
            for r in analysis.by_module(depth)]
    return table(["module", "params"] + COST_HEADERS, rows)


def op_table(analysis: Analysis, top: int = 10) -> str:
    """The `top` ATen ops by forward+backward FLOPs, then by saved and output bytes."""
    total = analysis.total_flops
    ops = sorted(analysis.by_op(), key=lambda r: (-(r.forward_flops + r.backward_flops),
                                                   -r.saved_bytes, -r.output_bytes))
    rows = [[r.key, format_count(r.count)] + _cost_cells(r, total) for r in ops[:top]]
    return table(["op", "calls"] + COST_HEADERS, rows)


def render(analysis: Analysis, *, depth: int | None = 2, top: int = 10, tokens: int | None = None,
           dtype: str | None = None) -> str:
    """The whole text report: summary, per-module table, top-N op table, units note."""
    n_ops = len(analysis.by_op())
    parts = [
        summary(analysis, tokens=tokens, dtype=dtype),
        f"per module (depth {depth if depth is not None else 'full'}):\n"
        + module_table(analysis, depth),
        f"top {min(top, n_ops)} of {n_ops} ops (by FLOPs, then saved bytes):\n"
        + op_table(analysis, top),
        UNITS_NOTE + "\nsaved activations are what autograd keeps with the kernels of "
        f"--device {analysis.device.name}.",
    ]
    return "\n\n".join(parts) + "\n"
