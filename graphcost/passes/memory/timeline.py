"""`training_timeline`: the memory timeline of training steps, derived along a deep stack
(passes/memory/stack.py) where it can be, walked in full (passes/memory/walk.py) otherwise."""

from __future__ import annotations

from graphcost.analysis.analyze import Analysis
from graphcost.errors import ConfigError
from graphcost.passes.memory.training import MemoryTimeline, TrainingConfig
from graphcost.passes.memory.walk import Walk

# the graph attributes it reads (graphcost/graph/schema.py)
READS = ("cost", "op", "runs_backward")


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
    if config.compile:  # the compiled graphs come from the module, not from the graph
        raise ConfigError("a compiled step's timeline needs its compiled graphs: "
                          "graphcost.analyze(...).memory(compile=True), or "
                          "passes.memory.compiled.compiled_timeline")
    if derive:
        from graphcost.passes.memory.stack import derived_timeline

        timeline = derived_timeline(analysis.graph, config)
        if timeline is not None:
            return timeline
    return Walk(analysis.graph, config).run()


def approximate_ops(g) -> dict[str, int]:
    """{op name: count} of the ops whose backward's memory their rule does not model exactly
    (OpCost.backward_memory_exact is False: torch.cdist's temporaries): the training peak
    around their backward is approximate, and reports say so."""
    counts: dict[str, int] = {}
    for n in g.op_order:
        d = g.nodes[n]
        cost = d["cost"]
        if cost is not None and d["runs_backward"] and not cost.backward_memory_exact:
            counts[d["op"]] = counts.get(d["op"], 0) + 1
    return counts
