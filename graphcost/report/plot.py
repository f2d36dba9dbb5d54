"""Plots (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path

from graphcost.optional import require
from graphcost.passes.memory.training import CATEGORIES, MemoryTimeline

GIB = 2**30


def _figure(size: tuple[float, float]):
    """A matplotlib (figure, axes) drawn off-screen (Agg), imported only now."""
    matplotlib = require("matplotlib", "plot", "drawing a plot (--plot)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def _save(fig, ax, path: str | Path, *, xlabel: str, ylabel: str, title: str) -> Path:
    """Labels, grid and legend as every graphcost plot has them; written as PNG."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, color="0.9")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def memory_timeline_png(timeline: MemoryTimeline, path: str | Path, *, title: str = "") -> Path:
    """Stacked bytes alive per event by category, phases shaded, the peak marked."""
    events = timeline.events
    x = list(range(len(events)))
    stacks = [[getattr(e, c) / GIB for e in events] for c in CATEGORIES]
    fig, ax = _figure((11, 4.5))
    ax.stackplot(x, stacks, labels=[c.replace("_", " ") for c in CATEGORIES], step="post")
    start = 0
    for i in range(1, len(events) + 1):  # shade each (step, phase) run
        if i == len(events) or (events[i].step, events[i].phase) != (events[start].step,
                                                                       events[start].phase):
            if events[start].phase == "backward":
                ax.axvspan(start, i, color="0.9", zorder=0)
            ax.text((start + i) / 2, 0, f"{events[start].phase[:3]}{events[start].step}",
                    ha="center", va="bottom", fontsize=7, color="0.3")
            start = i
    peak = timeline.peak
    ax.axvline(peak.index, color="red", lw=1)
    ax.annotate(f"peak {peak.total_bytes / GIB:.2f} GiB\n{peak.phase} step {peak.step}: "
                f"{peak.op}\n{peak.module_path or '<root>'}",
                xy=(peak.index, peak.total_bytes / GIB), xytext=(0.02, 0.97),
                textcoords="axes fraction", va="top", fontsize=8,
                arrowprops=dict(arrowstyle="->", color="red"))
    ax.set_xlim(0, max(len(events) - 1, 1))
    return _save(fig, ax, path, xlabel="event (forward op, backward op, parameter update)",
                 ylabel="GiB alive", title=title or "memory timeline")


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both coordinates (lower is better), by x.

    >>> pareto_front([(0, 5), (1, 3), (2, 4), (3, 1), (3, 2)])
    [(0, 5), (1, 3), (3, 1)]
    """
    front: list[tuple[float, float]] = []
    for x, y in sorted(set(points)):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def checkpoint_pareto_png(rows, path: str | Path, *, budget_bytes: float | None = None,
                          optimum=None, title: str = "") -> Path:
    """Peak memory against recompute FLOPs, one labelled point per policy
    (checkpoint_search.PolicyRow), the Pareto front as a step line, the budget as a line."""
    everything = list(rows) + ([optimum] if optimum is not None else [])
    top = max((r.recompute_flops for r in everything), default=0)
    scale, unit = 1, "FLOP"
    for s, u in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if top >= s:
            scale, unit = s, u
            break
    labels: dict[tuple[float, float], list[str]] = {}  # policies at the same point share it
    for r in everything:
        name = "optimum" if r is optimum else r.policy
        name = name if len(name) <= 28 else name[:27] + "…"  # long per-block specs
        labels.setdefault((r.recompute_flops / scale, r.peak_bytes / GIB), []).append(name)
    fig, ax = _figure((8, 5))
    xs, ys = zip(*[(r.recompute_flops / scale, r.peak_bytes / GIB) for r in rows])
    ax.scatter(xs, ys, color="tab:blue", zorder=3, label="policies")
    if optimum is not None:
        spec = optimum.policy if len(optimum.policy) <= 40 else optimum.policy[:39] + "…"
        ax.scatter([optimum.recompute_flops / scale], [optimum.peak_bytes / GIB], marker="*",
                   s=180, color="tab:green", zorder=4, label=f"optimum: {spec}")
    front = pareto_front(list(labels))
    if len(front) > 1:
        fx, fy = zip(*front)
        ax.step(fx, fy, where="post", color="tab:orange", lw=1.2, zorder=2,
                label="Pareto front")
    for (x, y), names in labels.items():
        ax.annotate(", ".join(names), (x, y), xytext=(5, 4), textcoords="offset points",
                    fontsize=8)
    if budget_bytes is not None:
        ax.axhline(budget_bytes / GIB, color="red", ls="--", lw=1,
                   label=f"budget {budget_bytes / GIB:.3g} GiB")
    return _save(fig, ax, path, xlabel=f"recompute per step ({unit})",
                 ylabel="peak memory (GiB)", title=title or "checkpoint policies")


def sweep_mfu_png(rows, path: str | Path, *, title: str = "") -> Path:
    """MFU against batch size, one line per sequence length, log2 batch axis; the points whose
    peak memory does not fit are hollow and crossed. `rows`: dicts with batch, seq, mfu, fits
    (True, False, or None where the device has no memory size)."""
    fig, ax = _figure((8, 5))
    by_seq: dict = {}
    for r in rows:
        by_seq.setdefault(r["seq"], []).append(r)
    hollow_shown = False
    for i, (seq, points) in enumerate(by_seq.items()):
        points = sorted(points, key=lambda r: r["batch"])
        color = f"C{i % 10}"
        xs, ys = [r["batch"] for r in points], [100 * r["mfu"] for r in points]
        ax.plot(xs, ys, color=color, lw=1.2, label=f"seq {seq}" if seq is not None else "MFU")
        fits = [r["fits"] is not False for r in points]
        ax.scatter([x for x, f in zip(xs, fits) if f], [y for y, f in zip(ys, fits) if f],
                   color=color, zorder=3)
        out_x = [x for x, f in zip(xs, fits) if not f]
        out_y = [y for y, f in zip(ys, fits) if not f]
        if out_x:
            ax.scatter(out_x, out_y, facecolors="white", edgecolors=color, s=60, zorder=3)
            ax.scatter(out_x, out_y, marker="x", color=color, s=25, zorder=4)
            hollow_shown = True
    if hollow_shown:  # one gray legend entry for every line's hollow points
        ax.scatter([], [], facecolors="white", edgecolors="0.4", s=60,
                   label="does not fit (hollow, x)")
    batches = sorted({r["batch"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_ylim(bottom=0)
    return _save(fig, ax, path, xlabel="batch size (log2)", ylabel="MFU (%)",
                 title=title or "MFU by batch size")
