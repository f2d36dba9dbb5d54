"""Checkpoint policies side by side, and the optimal mix under a budget, as text and JSON."""

from __future__ import annotations

import re

from graphcost.report.units import (
    UNITS_NOTE,
    format_bytes,
    format_count,
    format_flops,
    format_share,
    table,
)


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
