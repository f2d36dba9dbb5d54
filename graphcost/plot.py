"""Plots (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path

from graphcost.passes.schedule import CATEGORIES, MemoryTimeline

GIB = 2**30


def memory_timeline_png(timeline: MemoryTimeline, path: str | Path, *, title: str = "") -> Path:
    """Stacked bytes alive per event by category, phases shaded, the peak marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = timeline.events
    x = list(range(len(events)))
    stacks = [[getattr(e, c) / GIB for e in events] for c in CATEGORIES]
    fig, ax = plt.subplots(figsize=(11, 4.5))
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
    ax.set_xlabel("event (forward op, backward op, parameter update)")
    ax.set_ylabel("GiB alive")
    ax.set_title(title or "memory timeline")
    ax.set_xlim(0, max(len(events) - 1, 1))
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
