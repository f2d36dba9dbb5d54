"""When eager PyTorch can free a forward value: after its last reader in the graph, or later if
a Python frame still holds it.

- A local variable (of the model's code or of a library function it calls) lives until it is
  rebound or its function returns: observed while exporting (trace/lifetimes.py), the op
  attribute `held_until`.
- A module's forward binds its arguments to parameters, so a value passed into a module call
  stays alive until that call returns (`h = self.norm(h)` keeps the old `h` until norm is done).
  Module calls come from torch.export's nn_module_stack: a container that is iterated but never
  called (a ModuleList) is not one. (The observation covers this too; it is kept for graphs
  without it.)
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import networkx as nx

from graphcost.rules.registry import values_in

# the graph attributes it reads (graphcost/graph/schema.py)
READS = ("args", "held_until", "kwargs", "module_calls", "order", "storages")


def last_reads(g: nx.DiGraph, ops: list[str], find: Callable[[int], int]) -> dict[int, int]:
    """{storage: index in `ops` of the op after which it can be freed} for every storage read or
    held by Python past its op."""
    runs_of: list[list[list[int]]] = []  # per op: its enclosing module calls [start, end], outer first
    open_runs: dict[str, list[int]] = {}
    for i, n in enumerate(ops):
        prefixes = g.nodes[n].get("module_calls", ())
        for q in [q for q in open_runs if q not in prefixes]:
            del open_runs[q]
        for q in prefixes:
            if q not in open_runs:
                open_runs[q] = [i, i]
            open_runs[q][1] = i
        runs_of.append([open_runs[q] for q in prefixes])

    made_at = {}
    for i, n in enumerate(ops):
        for s in g.nodes[n]["storages"]:
            if s is not None:
                made_at.setdefault(find(s), i)
    last: dict[int, int] = {}
    for i, n in enumerate(ops):
        d = g.nodes[n]
        for v in values_in((d["args"], list(d["kwargs"].values()))):
            sid = find(v.storage)
            j = made_at.get(sid, -1)
            end = i
            for start, run_end in runs_of[i]:  # outermost call the value was passed into
                if start > j:
                    end = max(end, run_end)
                    break
            last[sid] = max(last.get(sid, -1), end)
    orders = [g.nodes[n]["order"] for n in ops]
    for i, n in enumerate(ops):
        storages = g.nodes[n]["storages"]
        for index, held in (g.nodes[n].get("held_until") or {}).items():
            if held not in g or index >= len(storages) or storages[index] is None:
                continue
            # a recomputation (ops: its region) returns at its last op, and its locals with it
            j = bisect.bisect_right(orders, g.nodes[held]["order"]) - 1
            if j > i:
                sid = find(storages[index])
                last[sid] = max(last.get(sid, -1), j)
    return last
