"""Step time, inference time, run cost and sweeps as text: the op table sorted by time, FLOPs,
bytes or intensity, the step split into phases, MFU/HFU, and the cost next to 6ND and 8ND."""

from __future__ import annotations

import math
from collections.abc import Sequence

from graphcost.report.units import (
    UNITS_NOTE,
    format_bytes,
    format_count,
    format_count_short,
    format_flops,
    format_flops_per_s,
    format_seconds,
    format_share,
    table,
)

ROOFLINE_NOTE = ("roofline: an op takes max(FLOPs / (peak x efficiency), bytes / (bandwidth x "
                 "efficiency)); matmul-class ops\nat the dense matmul peak of their dtype, the "
                 "others at the vector peak; MFU = model FLOPs / (step time x peak).")


COMPILED_NOTE = (
    "  compiled        the forward and backward are the kernels Inductor generates (for the "
    "CPU, standing in for the device's): a fused chain reads its inputs and writes its outputs "
    "once; the partitioner's recomputation runs inside the backward's kernels (docs/compile.md)")
ROOFLINE_SORTS = ("time", "flops", "bytes", "intensity")


def sort_ops(ops, by: str = "time") -> list:
    """Roofline ops (roofline.OpTime) by `by`, largest first, ties in execution order. By
    intensity, ops that neither compute nor move anything come last."""
    key = {"time": lambda o: o.seconds, "flops": lambda o: o.flops,
           "bytes": lambda o: o.bytes,
           "intensity": lambda o: (bool(o.flops or o.bytes), o.intensity)}[by]
    return sorted(ops, key=key, reverse=True)


def roofline_op_table(ops, *, sort: str = "time", top: int = 20) -> str:
    """The `top` ops (0: all) by `sort`, and a line counting the ones left out."""
    from graphcost.passes.checkpoint.policy import short_op

    ranked = sort_ops(ops, sort)
    shown = ranked[:top] if top else ranked
    rows = [[o.name, short_op(o.op), o.module_path or "<root>", o.phase,
             format_flops(o.flops) if o.flops else "0", format_bytes(o.bytes),
             f"{o.intensity:,.1f}" if o.bytes else "-", format_seconds(o.seconds), o.bound]
            for o in shown]
    lines = [(f"top {len(shown)} of {format_count(len(ranked))}" if len(shown) < len(ranked)
              else f"all {format_count(len(ranked))}") + f" ops by {sort} (per micro-batch):",
             table(["name", "op", "module", "phase", "FLOPs", "bytes", "FLOP/B", "time",
                    "bound"], rows, align="llllrrrrl")]
    if len(ranked) > len(shown):
        lines.append(f"... {format_count(len(ranked) - len(shown))} more ops")
    return "\n".join(lines)


def _efficiency_line(step) -> str:
    e = step.efficiency
    return (f"  efficiency  matmul {e.matmul:g}, vector {e.vector:g}, bandwidth {e.bandwidth:g} "
            "(fractions of the device's peaks; 1 is the physical limit)")


def roofline_report(step, *, title: str, sort: str = "time", top: int = 20,
                    extra: Sequence[str] = (), unsupported: str = "") -> str:
    """Step time and its split, MFU / HFU, tokens/s, FLOPs, compute- vs memory-bound time,
    then the per-op table (roofline.StepTime)."""
    m, total = step.micro_batches, step.step_time_s
    split = [("forward", step.forward_s * m), ("backward", step.backward_s * m),
             ("recompute", step.recompute_s * m), ("optimizer", step.optimizer_s)]
    bound = step.seconds_by_bound()
    op_s = bound["compute"] + bound["memory"]
    lines = [title, _efficiency_line(step), "",
             f"  step time       {format_seconds(total)} per optimizer step"
             + (f" ({m} micro-batches)" if m > 1 else "")]
    lines += [f"    {name:<13} {format_seconds(s):>10}  {format_share(s, total):>6}"
              for name, s in split]
    lines += [
        f"  MFU             {100 * step.mfu:.1f}%  of the {step.mfu_dtype} dense matmul peak, "
        f"{format_flops_per_s(step.peak_flops_per_s)}",
        f"  HFU             {100 * step.hfu:.1f}%  (recomputed FLOPs counted too)",
        f"  tokens/s        {step.tokens_per_s:,.0f}  ({format_count(step.tokens)} per step)",
        f"  model FLOPs     {format_flops(step.model_flops)} per step (forward + backward)",
        f"  hardware FLOPs  {format_flops(step.hardware_flops)} per step (model + recompute)",
        f"  bound           compute {format_share(bound['compute'], op_s)}, memory "
        f"{format_share(bound['memory'], op_s)} of the op time (optimizer step aside)",
        *extra, "", roofline_op_table(step.ops, sort=sort, top=top), "", ROOFLINE_NOTE,
        UNITS_NOTE]
    if unsupported:
        lines += ["", unsupported]
    return "\n".join(lines) + "\n"


def roofline_inference_report(prefill, decode, memory_bound_context: float | None, *,
                              title: str, sort: str = "time", top: int = 20,
                              unsupported: str = "") -> str:
    """A prefill (roofline.forward_time), a decode step (roofline.DecodeTime) and the context
    beyond which decoding is memory-bound at any batch, then the prefill's per-op table."""
    if memory_bound_context is None:
        turn = "never, at any batch (compute grows faster with the context than cache reads)"
    else:
        turn = (f"at any batch beyond a context of {format_count(math.ceil(memory_bound_context))}"
                " tokens")
    lines = [
        title, _efficiency_line(prefill), "",
        f"  prefill       {format_seconds(prefill.step_time_s)} for "
        f"{format_count(prefill.tokens)} tokens  ({prefill.tokens_per_s:,.0f} tokens/s, "
        f"MFU {100 * prefill.mfu:.1f}%)",
        f"  decode        {format_seconds(decode.seconds_per_token)} per token at a context of "
        f"{format_count(decode.context)}  ({decode.tokens_per_s:,.1f} tokens/s over the batch "
        f"of {decode.batch})",
        f"  memory-bound  decode is memory-bound {turn}",
        "", "prefill " + roofline_op_table(prefill.ops, sort=sort, top=top).replace(
            " (per micro-batch)", ""), "", ROOFLINE_NOTE, UNITS_NOTE]
    if unsupported:
        lines += ["", unsupported]
    return "\n".join(lines) + "\n"


def _usd(x: float | None) -> str:
    return "-" if x is None else (f"${x:,.0f}" if x >= 100 else f"${x:,.2f}")


def _hours(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}"


def cost_report(cost, *, title: str, mfu_line: str, mfu_dtype: str = "") -> str:
    """A run's FLOPs, wall clock, GPU-hours and dollars (roofline.TrainingCost), as the graph
    counts them and as the k N D rules of thumb would (training: 6ND, 8ND; inference: 2ND)."""
    graph = {"flops": cost.total_flops, "seconds": cost.seconds, "gpu_hours": cost.gpu_hours,
             "usd": cost.usd}
    cols = [graph] + [cost.rule_of_thumb(k) for k in cost.rules]
    per_token = [cost.model_flops_per_token] + [k * cost.params for k in cost.rules]
    rows = [["FLOPs per token"] + [format_flops(x) for x in per_token],
            ["total FLOPs"] + [f"{format_flops(c['flops'])} ({c['flops']:.2e})" for c in cols],
            ["wall clock"] + [format_seconds(c["seconds"]) for c in cols],
            ["GPU-hours"] + [_hours(c["gpu_hours"]) for c in cols],
            ["cost"] + [_usd(c["usd"]) for c in cols]]
    k = cost.rules[0]
    ratio = cost.model_flops_per_token / (k * cost.params) if cost.params else float("nan")
    what = "forward + backward" if cost.kind == "training" else "forward"
    price = (f"${cost.usd_per_gpu_hour:g} per GPU-hour" if cost.usd_per_gpu_hour is not None
             else "no price (--usd-per-hour)")
    lines = [
        title,
        f"  parameters      {format_count(cost.params)}  ({format_count_short(cost.params)})",
        f"  FLOPs/token     {format_flops(cost.model_flops_per_token)} from the graph ({what}) "
        f"= {ratio:.3f} x {k}N",
        f"  MFU             {mfu_line}",
        f"  peak            {format_flops_per_s(cost.peak_flops_per_s)} per device ({mfu_dtype} "
        "dense matmul)",
        f"  price           {price}",
        "",
        table(["", "graph"] + [f"{k}ND" for k in cost.rules], rows, align="l" + "r" * (
            1 + len(cost.rules))),
        "",
        ("data parallel, no communication cost; 6ND: 6 FLOPs per parameter and token (forward "
         "2, backward 4),\n8ND: with the forward recomputed (full checkpointing); all three at "
         "the same MFU." if cost.kind == "training" else
         "data parallel, no communication cost; 2ND: 2 FLOPs per parameter and token (the "
         "forward); both at the same MFU."),
        UNITS_NOTE]
    return "\n".join(lines) + "\n"


SWEEP_COLUMNS = ("batch", "seq", "tokens", "step_time_s", "mfu", "hfu", "tokens_per_s",
                 "peak_bytes", "fits")


def sweep_table(rows: Sequence[dict]) -> str:
    """One line per (batch, seq) of a sweep (dicts with SWEEP_COLUMNS)."""
    def fits(x) -> str:
        return "-" if x is None else ("yes" if x else "NO")

    body = [[format_count(r["batch"]), "-" if r["seq"] is None else format_count(r["seq"]),
             format_count(r["tokens"]), format_seconds(r["step_time_s"]),
             f"{100 * r['mfu']:.1f}%", f"{100 * r['hfu']:.1f}%", f"{r['tokens_per_s']:,.0f}",
             format_bytes(r["peak_bytes"]), fits(r["fits"])] for r in rows]
    return table(["batch", "seq", "tokens", "step time", "MFU", "HFU", "tokens/s", "peak",
                  "fits?"], body, align="r" * 9)
