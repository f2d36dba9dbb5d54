"""Facts of a costed graph that the memory passes share, computed once per graph: they are the
cached properties `walk_facts` and `block_stack` of graphcost.graph.costed.CostedGraph, built
from its other cached properties (op_order, op_inputs, storage_root, new_storages, last_reads,
module_calls).
"""

from __future__ import annotations

from collections import defaultdict
from functools import cached_property

import networkx as nx

# the graph attributes it reads (graphcost/graph/schema.py)
READS = ("cost", "kind", "made_in_forward", "module_path", "names", "op", "order", "outputs",
         "requires_grad", "runs_backward", "storage_bytes", "storage_owner", "storages")


class WalkFacts:
    """What every training-step walk of one costed graph needs, whatever the checkpoint policy
    (graphcost/passes/memory/walk.py). Read-only, except `recompute_frees`: a cache of the
    last reads of each recomputation, by its ops."""

    def __init__(self, g: nx.DiGraph) -> None:
        self.nd: dict[str, dict] = dict(g.nodes(data=True))  # node -> its attributes
        self.owner, self.nbytes = g.graph["storage_owner"], g.graph["storage_bytes"]
        self.find = find = g.storage_root
        self.ops: list[str] = list(g.op_order)
        self.persistent: dict[int, str] = {}  # storage -> category: params, buffers; inputs
        self.params: list[tuple[int, int]] = []  # trainable parameter storages and bytes, in order
        for n in sorted(g.nodes, key=lambda n: self.nd[n]["order"]):
            d = self.nd[n]
            if d["kind"] == "op" or d.get("made_in_forward"):
                continue  # (a constant the forward builds is made by its first reader)
            sid = d["storages"][0]
            self.persistent[sid] = "params" if d["kind"] in ("param", "buffer") else "transient"
            if d["kind"] == "param" and d["requires_grad"]:
                self.params.append((sid, self.nbytes[sid]))
        self.inputs_of: dict[str, tuple] = g.op_inputs
        self.new: dict[str, tuple[int, ...]] = g.new_storages
        self.reads: dict[str, set[int]] = {n: {find(v.storage) for v in self.inputs_of[n]}
                                           for n in self.ops}
        self.frees_after: dict[str, list[int]] = defaultdict(list)
        for sid, i in g.last_reads.items():
            self.frees_after[self.ops[i]].append(sid)
        self.graph_outputs = list(g.graph.get("outputs", []))
        self.outputs = {find(v.storage) for v in self.graph_outputs}
        self.backward_ops = [n for n in reversed(self.ops) if self.nd[n]["runs_backward"]]
        self.labels: dict[str, tuple[str, str]] = {}  # op -> (op name, module path): its events'
        self.workspace: dict[str, tuple[int, int]] = {}  # op -> its kernels' forward, backward
        for n in self.ops:  # workspace bytes (an op without a rule: none)
            d = self.nd[n]
            self.labels[n] = (d["op"], d["module_path"])
            cost = d["cost"]
            self.workspace[n] = (cost.forward_workspace_bytes, cost.backward_workspace_bytes) \
                if cost is not None else (0, 0)
        self.recompute_frees: dict[tuple, tuple] = {}  # a recomputation's last reads, by ops
        self.value_bytes: dict[tuple[str, int], int] = {}
        self.param_consumers: dict[str, int] = defaultdict(int)
        for n in self.backward_ops:
            keys = set()
            for v in self.inputs_of[n]:
                self.value_bytes[(v.node, v.index)] = v.spec.nbytes
                # a parameter, or an input that requires grad: both leaves keep a .grad (an
                # input's is never cleared by zero_grad, and accumulates across steps)
                if v.requires_grad and v.kind in ("param", "input"):
                    keys.add(v.node)
            for node in keys:
                self.param_consumers[node] += 1
        # the trainable parameters the backward reaches: the optimizer skips one whose .grad
        # stays None (a layer whose output the loss does not use): no state, no update
        self.updated: list[tuple[int, int]] = [(sid, nbytes) for sid, nbytes in self.params
                                               if self.owner[sid] in self.param_consumers]


class BlockStack:
    """Where the blocks `path.0` ... `path.{count-1}` of a stack are in a costed graph: each
    block's ops (a contiguous span of the op order: `lo`, `hi`) and its trainable parameters
    (the optimizer's events), by position. `ok`: the blocks are all there, back to back."""

    def __init__(self, g: nx.DiGraph, path: str, count: int) -> None:
        self.path, self.count = path, count  # (no reference to g: it caches its block_stack)
        self.ops: list[str] = list(g.op_order)
        calls = g.module_calls
        spans = [calls.get(f"{path}.{i}") for i in range(count)]
        self.ok = all(spans) and all(b[0] == a[1] + 1 for a, b in zip(spans, spans[1:]))
        self.lo = [s[0] for s in spans] if self.ok else []
        self.hi = [s[1] for s in spans] if self.ok else []
        self.params: list[list[str]] = [[] for _ in range(count)]
        prefix = path + "."
        for n, d in sorted(((n, d) for n, d in g.nodes(data=True) if d["kind"] == "param"),
                           key=lambda nd: nd[1]["order"]):
            name = d["names"][0]
            if name.startswith(prefix):
                head = name[len(prefix):].split(".", 1)[0]
                if head.isdigit() and int(head) < count:
                    self.params[int(head)].append(n)

    @cached_property
    def index(self) -> dict[str, int]:
        return {n: k for k, n in enumerate(self.ops)}

    def node(self, block: int, offset: int) -> str:
        """The op at `offset` in `block` (a parameter: offset -1 - its position)."""
        return self.ops[self.lo[block] + offset] if offset >= 0 else self.params[block][-1 - offset]

    def positions(self) -> dict[str, tuple[int, int]]:
        """node -> (block, offset) for every op and trainable parameter of the stack."""
        where = {}
        for b in range(self.count):
            for k in range(self.lo[b], self.hi[b] + 1):
                where[self.ops[k]] = (b, k - self.lo[b])
            for j, n in enumerate(self.params[b]):
                where[n] = (b, -1 - j)
        return where


__all__ = ["BlockStack", "WalkFacts"]
