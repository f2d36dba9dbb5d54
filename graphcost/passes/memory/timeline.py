"""`training_timeline`: the memory timeline of training steps, derived along a deep stack
(passes/memory/stack.py) where it can be, walked in full (passes/memory/walk.py) otherwise."""

from __future__ import annotations

from graphcost.analysis.analyze import Analysis
from graphcost.passes.memory.training import MemoryTimeline, TrainingConfig
from graphcost.passes.memory.walk import Walk

READS: tuple[str, ...] = ()  # graph attributes it reads itself: none (graph/schema.py)


def training_timeline(analysis: Analysis, config: TrainingConfig | None = None, *,
                      derive: bool = True) -> MemoryTimeline:
    """Walk `config.steps` training steps over `analysis.graph`; return every event and the peak.

    A deep stack of identical blocks is walked as a few short stacks and the rest derived
    (passes/memory/stack.py: the same events, faster); `derive=False` walks every block.

    >>> from graphcost import analyze
    >>> from graphcost.models import load
    >>> t = training_timeline(analyze(*load("gpt2", seq=64, n_layer=2, with_targets=True)))
    >>> t.peak.step, t.peak.phase, t.peak.module_path  # the tied embedding's gradients summed
    (1, 'backward', 'wte')
    """
    config = config or TrainingConfig()
    if derive:
        from graphcost.passes.memory.stack import derived_timeline

        timeline = derived_timeline(analysis.graph, config)
        if timeline is not None:
            return timeline
    return Walk(analysis.graph, config).run()
