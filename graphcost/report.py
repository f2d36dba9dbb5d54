"""Stage 5: an Analysis as plain text. The only place in graphcost where units are formatted.

Bytes are binary (1 KiB = 1024 B, 1 GiB = 2**30 B); FLOPs are decimal (1 TFLOP = 10**12 FLOP);
counts carry thousands separators and a short form (6.74 B = 6.74 * 10**9).

    >>> format_bytes(26_953_662_464), format_flops(29_261_612_187_648), format_count(6_738_415_616)
    ('25.10 GiB', '29.26 TFLOP', '6,738,415,616')
    >>> format_count_short(6_738_415_616)
    '6.74 B'
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence


from graphcost.analysis import Analysis, GroupRow
from graphcost.opaque import OPAQUE_PREFIX

BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
FLOP_UNITS = ("FLOP", "KFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP", "EFLOP", "ZFLOP", "YFLOP")
COUNT_UNITS = ("", "K", "M", "B", "T")
UNITS_NOTE = ("units: bytes binary (1 GiB = 2^30 B); FLOPs decimal (1 TFLOP = 10^12), 2 per "
              "multiply-add")


def _scaled(value: float, units: Sequence[str], base: int) -> tuple[float, str]:
    i = 0
    while abs(value) >= base and i < len(units) - 1:
        value /= base
        i += 1
    return value, units[i]


def format_bytes(n: float) -> str:
    """Binary units: '512 B', '1.50 KiB', '25.10 GiB'."""
    value, unit = _scaled(n, BYTE_UNITS, 1024)
    return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"


def format_flops(n: float) -> str:
    """Decimal units: '0 FLOP', '98.30 MFLOP', '29.26 TFLOP'."""
    value, unit = _scaled(n, FLOP_UNITS, 1000)
    return f"{int(value)} FLOP" if unit == "FLOP" else f"{value:.2f} {unit}"


def format_count(n: int) -> str:
    """Exact, with thousands separators: '6,738,415,616'."""
    return f"{n:,}"


def format_count_short(n: float) -> str:
    """'6.74 B', '124.44 M', '512'."""
    value, unit = _scaled(n, COUNT_UNITS, 1000)
    return f"{int(value)}" if not unit else f"{value:.2f} {unit}"


def format_flops_per_s(x: float) -> str:
    """Peak throughput: '989.40 TFLOP/s'."""
    value, unit = _scaled(x, FLOP_UNITS, 1000)
    return f"{value:.2f} {unit}/s"


def format_bandwidth(x: float) -> str:
    """Memory bandwidth in decimal units, as vendors quote it: '3.35 TB/s' (1 TB = 10^12 B)."""
    value, unit = _scaled(x, ("B", "KB", "MB", "GB", "TB", "PB"), 1000)
    return f"{value:.2f} {unit}/s"


def format_seconds(s: float) -> str:
    """Time, from nanoseconds to days: '850.00 ns', '412.30 ms', '1.23 s', '5.50 min', '1.48 days'.

    >>> format_seconds(0.3835), format_seconds(128_008.1), format_seconds(0)
    ('383.50 ms', '1.48 days', '0 s')
    """
    for limit, unit in ((86400, "days"), (3600, "h"), (60, "min"), (1, "s"), (1e-3, "ms"),
                        (1e-6, "µs"), (1e-9, "ns")):
        if abs(s) >= limit:
            return f"{s / limit:.2f} {unit}"
    return "0 s" if s == 0 else f"{s * 1e9:.2f} ns"


def format_share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, align: str = "") -> str:
    """Plain aligned columns. `align` has one letter per column, "l" or "r"; by default the first
    column is flush left and the others flush right.

    >>> print(table(["op", "calls"], [["mm", "12"]]))
    op  calls
    --  -----
    mm     12
    """
    rows = [list(map(str, r)) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


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


__all__ = ["format_bandwidth", "format_bytes", "format_count", "format_count_short",
           "format_flops", "format_flops_per_s", "format_seconds", "format_share", "module_table",
           "op_table", "render", "summary", "table", "unsupported_line"]


def memory_report(timeline, *, model: str, device: str) -> str:
    """The peak of a training step, when it happens, and what is alive then."""
    from graphcost.passes.schedule import CATEGORIES

    peak, config = timeline.peak, timeline.config
    lines = [
        f"graphcost memory: {model} on {device}, optimizer {config.optimizer} "
        f"({timeline.optimizer_impl}), "
        f"{config.steps} steps x {config.grad_accumulation} micro-batch(es)",
        "",
        f"  peak        {format_bytes(peak.total_bytes)}  ({format_count(peak.total_bytes)} bytes)",
        f"  when        step {peak.step}, {peak.phase}, {peak.op}"
        f"{' in ' + peak.module_path if peak.module_path else ''}",
    ]
    if str(config.checkpoint) != "none":
        recompute = timeline.recompute_flops * config.grad_accumulation
        lines += [f"  checkpoint  {config.checkpoint}: {len(timeline.plan.regions)} regions, "
                  f"recompute {format_flops(recompute)} per step, saved activations "
                  f"{format_bytes(timeline.saved_activation_bytes)}"]
    lines += [
        "",
        "alive at the peak:",
    ]
    rows = [[c.replace("_", " "), format_bytes(getattr(peak, c)),
             format_share(getattr(peak, c), peak.total_bytes)] for c in CATEGORIES]
    lines.append(table(["category", "bytes", "share"], rows, align="lrr"))
    lines += ["", "peak per phase:"]
    rows = [[str(step), phase, format_bytes(b)]
            for (step, phase), b in timeline.phase_peaks().items()]
    lines.append(table(["step", "phase", "peak"], rows, align="llr"))
    return "\n".join(lines) + "\n"


def fit_report(result, *, model: str, dtype: str | None, optimizer: str,
               checkpoint: str = "none") -> str:
    """What fits on the device: largest batch at the context, largest context at batch 1."""
    def ctx(n):
        if n is None:
            return "-"
        if n == 0:
            return "does not fit"
        limit = " (the model's limit)" if n == result.model_max_seq else ""
        return f"{format_count(n)} tokens{limit}"

    def batch(n):
        return format_count(n) if n else "does not fit"

    at = f"max batch @ {result.seq}" if result.seq else "max batch"
    setting = f"{optimizer}, {dtype or 'model dtype'}"
    if checkpoint != "none":
        setting += f", checkpoint {checkpoint}"
    rows = [["training", setting, batch(result.train_max_batch),
             ctx(result.train_max_seq)],
            ["inference", "prefill + KV cache", batch(result.infer_max_batch),
             ctx(result.infer_max_seq)]]
    lines = [
        f"graphcost fit: {model} on {result.device}",
        f"  memory {format_bytes(result.memory_bytes)} - reserve "
        f"{format_bytes(result.reserve_bytes)} = budget {format_bytes(result.budget_bytes)}",
        "",
        table(["", "setting", at, "max context @ batch 1"], rows,
              align="llrr"),
    ]
    return "\n".join(lines) + "\n"


def inference_report(mem, *, model: str, device: str, batch: int | None,
                     context: int | None) -> str:
    """Peak of a prefill with the KV cache, and what is alive then."""
    rows = [["params", format_bytes(mem.weight_bytes), format_share(mem.weight_bytes,
                                                                     mem.peak_bytes)],
            ["kv cache", format_bytes(mem.kv_cache_bytes), format_share(mem.kv_cache_bytes,
                                                                         mem.peak_bytes)],
            ["activations", format_bytes(mem.activation_peak_bytes),
             format_share(mem.activation_peak_bytes, mem.peak_bytes)]]
    lines = [
        f"graphcost memory --inference: {model} on {device}"
        + (f", batch {batch} x context {context}" if context else ""),
        "",
        f"  peak        {format_bytes(mem.peak_bytes)}  ({format_count(mem.peak_bytes)} bytes)",
        f"  when        prefill, {mem.peak_op}"
        f"{' in ' + mem.peak_module if mem.peak_module else ''}",
        f"  KV cache    {format_bytes(mem.kv_cache_bytes_per_token)} per token (K and V, all "
        "layers)",
        "",
        table(["category", "bytes", "share"], rows, align="lrr"),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- checkpoint policies


def checkpoint_table(rows) -> str:
    """One line per policy (checkpoint_search.PolicyRow), in the order given."""
    def fits(r) -> str:
        return "-" if r.fits is None else ("yes" if r.fits else "NO")

    body = [[r.policy, format_bytes(r.peak_bytes), format_bytes(r.saved_activation_bytes),
             format_flops(r.recompute_flops), format_flops(r.hardware_flops), fits(r)]
            for r in rows]
    return table(["policy", "peak", "saved act.", "recompute", "hardware FLOPs", "fits?"], body)


def _vs_best(optimum) -> tuple[int, float | None] | None:
    """How much more the best fitting built-in recomputes than the optimum: (FLOPs >= 0,
    ratio); the ratio is None when the optimum recomputes nothing."""
    best, row = optimum.best_builtin, optimum.row
    if best is None or row is None:
        return None
    extra = best.recompute_flops - row.recompute_flops
    return extra, (best.recompute_flops / row.recompute_flops if row.recompute_flops else None)


def checkpoint_optimum_dict(optimum) -> dict:
    """The --json keys of a budget search (checkpoint_search.Optimum). `fits`: whether anything
    fits; `optimum`: the fitting policy with the least recompute (per_block: [] when it is one
    of the compared policies)."""
    row = optimum.row
    vs = _vs_best(optimum)
    return {
        "fits": row is not None,
        "optimum": None if row is None else {**row.as_dict(), "per_block": list(optimum.per_block)},
        "best_builtin": optimum.best_builtin.as_dict() if optimum.best_builtin else None,
        "best_builtin_extra_recompute_flops": vs[0] if vs else None,
        "best_builtin_recompute_ratio": vs[1] if vs else None,
        "smallest": optimum.smallest.as_dict(),
        "search_seconds": optimum.search_seconds,  # the integer program and the final walk
        "total_seconds": optimum.total_seconds,  # with the walks of every option and policy
    }


def checkpoint_report(rows, *, model: str, device: str, budget_line: str,
                      skipped=(), optimum=None, unsupported: str = "") -> str:
    """The policy table, and with a budget search its optimum (or, loudly, that nothing fits)."""
    lines = [f"graphcost checkpoint: {model} on {device}", f"  {budget_line}", "",
             checkpoint_table(rows)]
    lines += _skipped_lines(skipped)
    if optimum is not None:
        lines += [""] + _optimum_lines(optimum)
    lines += ["", "peak: the highest point of the training steps walked; saved act.: what is "
              "kept for backward after the forward;",
              "recompute and hardware FLOPs (forward + backward + recompute) per optimizer step.",
              UNITS_NOTE]
    if unsupported:
        lines += ["", unsupported]
    return "\n".join(lines) + "\n"


def _skipped_lines(skipped) -> list[str]:
    """Built-in policies that do not apply, grouped by reason; the reason without the policy
    name it starts with ("checkpoint policy 'full' checkpoints blocks, but ...")."""
    by_reason: dict[str, list[str]] = {}
    for policy, why in skipped:
        why = re.sub(rf"^checkpoint policy {re.escape(repr(policy))}(: | checkpoints blocks, "
                     r"but )", "", why)
        by_reason.setdefault(why, []).append(policy)
    return [f"  skipped {', '.join(ps)}: {why}" for why, ps in by_reason.items()]


def _optimum_lines(optimum) -> list[str]:
    budget, row, best = optimum.budget_bytes, optimum.row, optimum.best_builtin
    search = (f"  search      {optimum.search_seconds:.2f} s (integer program and its walk), "
              f"{optimum.total_seconds:.2f} s with every walk")
    if row is None:
        small = optimum.smallest
        return [f"!! NOTHING FITS in {format_bytes(budget)}: the smallest peak found is "
                f"{format_bytes(small.peak_bytes)} ({small.policy}), "
                f"{format_bytes(small.peak_bytes - budget)} over the budget.",
                "   Its peak is in the optimizer step, where no activations are alive: no "
                "checkpoint policy lowers it;\n   try a lighter optimizer or precision, or a "
                "larger budget." if small.peak_phase == "optimizer" else
                "   Try a smaller --batch or --seq, a lower precision, or a larger budget.",
                search]
    uniform = set(optimum.per_block)
    note = f"  (= {next(iter(uniform))} on every block)" if len(uniform) == 1 else ""
    where = "per-block search" if optimum.per_block else \
        "a compared policy: no per-block mix does better"
    lines = [f"least recompute within {format_bytes(budget)} ({where}):",
             f"  policy      {row.policy}{note}",
             f"  peak        {format_bytes(row.peak_bytes)}  ({format_count(row.peak_bytes)} "
             f"bytes, {row.peak_phase} in {row.peak_module or '<root>'})",
             f"  recompute   {format_flops(row.recompute_flops)} per step  "
             f"({format_share(row.recompute_flops, row.model_flops)} of the model FLOPs)"]
    vs = _vs_best(optimum)
    if best is None:
        lines.append("  built-in    none of the compared policies fits")
    elif best is not row:
        ratio = f", {vs[1]:.2f}x the optimum's" if vs[1] is not None else ""
        lines.append(f"  built-in    {best.policy}, the best that fits: recompute "
                     f"{format_flops(best.recompute_flops)} (+{format_flops(vs[0])}"
                     f"{ratio}), peak {format_bytes(best.peak_bytes)}")
    lines.append(search)
    return lines


# ---------------------------------------------------------------- roofline, cost, sweep

ROOFLINE_NOTE = ("roofline: an op takes max(FLOPs / (peak x efficiency), bytes / (bandwidth x "
                 "efficiency)); matmul-class ops\nat the dense matmul peak of their dtype, the "
                 "others at the vector peak; MFU = model FLOPs / (step time x peak).")
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
    from graphcost.passes.checkpoint import short_op

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


def parallel_memory_report(stages, busiest, *, model: str, device) -> str:
    """Per-device memory of a parallel plan (parallel.DeviceMemory per pipeline stage)."""
    plan = busiest.plan
    shard = "FSDP" if plan.fsdp else (f"ZeRO-{plan.zero}" if plan.zero else "no sharding")
    extras = [x for x, on in (("sequence parallel", plan.sequence_parallel),
                              ("partitioned activations", plan.partition_activations)) if on]
    lines = [f"graphcost memory: {model} on {plan.gpus} x {device.name}: dp {plan.dp} x tp "
             f"{plan.tp} x pp {plan.pp}, {shard}" + (", " + ", ".join(extras) if extras else ""),
             "",
             f"  peak        {format_bytes(busiest.peak_bytes)} per device (estimate; stage "
             f"{busiest.stage}, {busiest.peak_phase})"]
    if device.memory_bytes:
        fits = "fits" if busiest.peak_bytes <= device.memory_bytes else "does NOT fit"
        lines.append(f"  device      {format_bytes(device.memory_bytes)}: {fits}")
    rows = [[str(d.stage), str(d.in_flight), format_bytes(d.states.params_bytes),
             format_bytes(d.states.grads_bytes), format_bytes(d.states.optimizer_state_bytes),
             format_bytes(d.activation_bytes), format_bytes(d.gather_bytes),
             format_bytes(d.training_peak_bytes), format_bytes(d.optimizer_peak_bytes),
             format_bytes(d.peak_bytes)] for d in stages]
    lines += ["", table(["stage", "in flight", "params", "grads", "optimizer", "activations",
                         "FSDP buffers", "backward peak", "optimizer peak", "peak"], rows,
                        align="r" * 10), "",
              "per device (rank 0 of its tensor- and data-parallel groups); activations: what "
              "the in-flight micro-batches keep for backward,",
              "divided by tensor/sequence parallelism; the peaks add the one-device walk's "
              "transients, scaled. See docs/parallel.md.", UNITS_NOTE]
    return "\n".join(lines) + "\n"


def plan_report(plans, *, model: str, device, gpus: int, global_batch: int, seq, network,
                top: int = 10) -> str:
    """Parallel plans ranked by step time (plan_search.Candidate), and the rejected ones by
    reason."""
    feasible = [c for c in plans if not c.rejected]
    rows = []
    for c in feasible[:top]:
        p, st = c.plan, c.step
        rows.append([str(p.dp), str(p.tp), str(p.pp), c.sharding, c.checkpoint,
                     str(c.micro_batch), format_count(p.in_flight),
                     format_seconds(st.step_time_s), f"{100 * st.mfu:.1f}%",
                     f"{st.tokens_per_s:,.0f}", format_bytes(c.memory.peak_bytes),
                     format_seconds(st.bubble_s), format_seconds(st.dp_exposed_s)])
    lines = [f"graphcost plan: {model} on {gpus} x {device.name}, global batch {global_batch}"
             + (f" x {seq} tokens" if seq else ""),
             f"  network     {network.intra.name} inside a node of {network.gpus_per_node}, "
             f"{network.inter.name} between nodes", ""]
    if rows:
        lines += [table(["dp", "tp", "pp", "sharding", "ckpt", "mb", "micro-batches",
                         "step time", "MFU", "tokens/s", "memory/device", "bubble",
                         "exposed DP comm"], rows, align="rrrllrrrrrrrr")]
        if len(feasible) > top:
            lines.append(f"... {len(feasible) - top} more plans fit")
    else:
        lines.append("!! NO PLAN FITS: see the reasons below; try more GPUs, a smaller "
                     "--global-batch or --seq, or checkpointing (--checkpoint full)")
    reasons: dict[str, int] = {}
    for c in plans:
        if c.rejected:
            key = "needs more memory than the device has" if c.rejected.startswith("needs") \
                else c.rejected
            reasons[key] = reasons.get(key, 0) + 1
    if reasons:
        lines += ["", f"rejected {sum(reasons.values())} plans:"]
        lines += [f"  {n:4d}  {why}" for why, n in sorted(reasons.items(), key=lambda x: -x[1])]
    lines += ["", "memory/device: the busiest device's estimated peak; step time: roofline "
              "compute per stage, TP all-reduces and pipeline",
              "sends on the critical path, the 1F1B bubble, data-parallel collectives beyond "
              "the compute they overlap. See docs/parallel.md.", UNITS_NOTE]
    return "\n".join(lines) + "\n"
