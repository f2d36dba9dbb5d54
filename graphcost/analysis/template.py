"""The two-block trace a deep model's graph was expanded from, kept with how it was costed, so
that the model can be rebuilt and costed with any number of blocks (passes/memory/stack.py)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx

from graphcost.graph.costed import CostedGraph
from graphcost.graph.expand import expand_blocks
from graphcost.trace.blocks import RepeatedBlocks


@dataclass(frozen=True, eq=False)
class BlockTemplate:
    """What analyze() built a full graph from: the two-block graph and how it was costed. The
    walk of a deep stack derives the full timeline from shortened ones (passes/memory/stack.py)."""

    graph: nx.DiGraph  # the two-block graph, before expand_blocks and annotate
    blocks: RepeatedBlocks
    device: Any  # hardware.Device
    rules: Any = None  # rules.registry.RuleRegistry
    _short: dict = field(default_factory=dict, repr=False)

    def shortened(self, n_blocks: int) -> CostedGraph | None:
        """The costed graph of the model with `n_blocks` blocks: a new CostedGraph, built once
        per `n_blocks` and kept here (None: the trace does not expand to that many)."""
        from graphcost.analysis.annotate import annotate

        if n_blocks not in self._short:
            g = expand_blocks(self.graph, replace(self.blocks, count=n_blocks))
            if g is not None:
                with warnings.catch_warnings():  # the full graph's annotate has warned
                    warnings.simplefilter("ignore")
                    g = annotate(g, device=self.device, rules=self.rules)
            self._short[n_blocks] = g
        return self._short[n_blocks]
