"""Stages 4 and 5: annotate (every op costed by its rule, the graph frozen into a CostedGraph)
and the Analysis (`analyze`: trace → graph → annotate; totals, per-op and per-module rows)."""
