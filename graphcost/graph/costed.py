"""The costed graph: what `annotate` returns and every pass reads.

A `CostedGraph` is a `networkx.DiGraph` (every networkx algorithm and every `g.nodes[n][...]`
lookup works on it) with the facts the passes derive from it as cached properties: each is
computed once, on first use, and kept with the graph. That is sound because a costed graph never
changes: `annotate` writes it and then freezes it (`freeze`), after which adding or removing a
node or an edge, or setting a node or graph attribute, raises `FrozenGraphError`. A pass that
needs another graph (a re-trace at another shape, a shortened stack) builds a new one.

    >>> from graphcost import analyze
    >>> from graphcost.models import load
    >>> g = analyze(*load("gpt2", seq=16, n_layer=2)).graph
    >>> g.op_order[:2], g.main_blocks
    (('arange', 'embedding'), ('h.0', 'h.1'))
    >>> g.nodes["embedding"]["forward_flops"] = 0  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    graphcost.graph.costed.FrozenGraphError: a costed graph is frozen: build a new one ...

The node and graph attributes are declared in graphcost/graph/schema.py (docs/graph.md).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable
from functools import cached_property
from typing import TypeVar

import networkx as nx

from graphcost.graph.facts import BlockStack, WalkFacts
from graphcost.graph.liveness import last_reads
from graphcost.rules.registry import Value, values_in

T = TypeVar("T")

# the graph attributes it reads (graphcost/graph/schema.py)
READS = ("args", "block_template", "kind", "kwargs", "made_in_forward", "module_call_types",
         "module_calls", "op", "order", "saved", "storage_alias", "storage_owner", "storages")


class FrozenGraphError(TypeError):
    """A costed graph (or one of its attribute dicts) was changed after annotate."""


def _refuse(*_args, **_kwargs):
    raise FrozenGraphError("a costed graph is frozen: build a new one (annotate a copy, "
                           "CostedGraph.of(graph)) instead of changing it")


class FrozenDict(dict):
    """A dict that refuses every change: a frozen graph's node and graph attributes. Reads are
    a plain dict's (it is one)."""

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):
        return FrozenDict, (dict(self),)


def op_order_of(g: nx.DiGraph) -> tuple[str, ...]:
    """The op nodes of any graph (costed or not), in execution order."""
    return tuple(sorted((n for n, d in g.nodes(data=True) if d["kind"] == "op"),
                        key=lambda n: g.nodes[n]["order"]))


class CostedGraph(nx.DiGraph):
    """A costed graph: nodes and attributes as in graphcost/graph/schema.py, the derived facts
    as cached properties. Build one with `CostedGraph.of(graph)` (a mutable copy), write it, then
    `freeze()` it; read its properties only once it is frozen."""

    @classmethod
    def of(cls, graph: nx.DiGraph) -> CostedGraph:
        """A mutable copy of `graph` (its node attribute dicts and storage maps copied)."""
        g = cls()
        g.graph.update(graph.graph)
        for key in ("storage_bytes", "storage_owner"):
            if key in graph.graph:
                g.graph[key] = dict(graph.graph[key])
        g.add_nodes_from(graph.nodes(data=True))  # each node's attributes into a new dict
        # through the adjacency dicts, as DiGraph.copy does (graph.edges would tie the source
        # graph into a cycle with its view, alive until the paused cyclic collector runs)
        g.add_edges_from((u, v) for u, successors in graph._adj.items() for v in successors)
        return g

    def with_attributes(self, nodes: dict[str, dict], graph: dict) -> CostedGraph:
        """A new frozen costed graph with this frozen graph's nodes and edges and other
        attributes (`nodes`: node -> its attributes; `graph`: the graph's). The two share their
        adjacency, which neither can change: nothing is copied but the attributes."""
        self._facts_need_frozen()
        g = type(self)()
        g._adj, g._pred = self._adj, self._pred
        g._node = {n: FrozenDict(nodes[n]) for n in self._node}
        g.graph.update(graph)
        return g.freeze()

    def freeze(self, *, op_order: tuple[str, ...] | None = None) -> CostedGraph:
        """No more changes: the structure (nx.freeze), every node's attributes, the graph's
        attributes and its storage maps become read-only. `op_order`: the op order, when the
        writer already walked it (annotate): it is the `op_order` property, not sorted again."""
        for n, d in self._node.items():
            if type(d) is not FrozenDict:
                self._node[n] = FrozenDict(d)
        graph = dict(self.graph)
        for key in ("storage_bytes", "storage_owner", "saved_storages", "storage_alias"):
            if key in graph and type(graph[key]) is not FrozenDict:
                graph[key] = FrozenDict(graph[key])
        self.graph = FrozenDict(graph)
        nx.freeze(self)
        if op_order is not None:
            self.__dict__["op_order"] = tuple(op_order)
        return self

    @property
    def is_frozen(self) -> bool:
        return nx.is_frozen(self)

    def _facts_need_frozen(self) -> None:
        if not nx.is_frozen(self):
            raise FrozenGraphError("a costed graph's derived facts are read once it is frozen "
                                   "(annotate freezes the graph it returns)")

    def derived(self, compute: Callable[..., T], *args: Hashable) -> T:
        """`compute(self, *args)`, once per graph and arguments: a fact a pass derives from the
        graph that graph/ cannot name without importing the pass (the parallel pass's tensor
        split, a pipeline's stages). Kept on this object, dropped with it."""
        self._facts_need_frozen()
        found = self.__dict__.setdefault("_derived", {})
        key = (compute, args)
        if key not in found:
            found[key] = compute(self, *args)
        return found[key]

    # -- the ops --------------------------------------------------------------------------------

    @cached_property
    def op_order(self) -> tuple[str, ...]:
        """The op nodes in execution order."""
        self._facts_need_frozen()
        return op_order_of(self)

    @cached_property
    def op_index(self) -> dict[str, int]:
        """op node -> its position in `op_order`."""
        return {n: i for i, n in enumerate(self.op_order)}

    @cached_property
    def op_inputs(self) -> dict[str, tuple[Value, ...]]:
        """op node -> the tensor values it reads, args then kwargs."""
        self._facts_need_frozen()
        return {n: tuple(values_in((d["args"], list(d["kwargs"].values()))))
                for n, d in self.nodes(data=True) if d["kind"] == "op"}

    # -- storages -------------------------------------------------------------------------------

    @cached_property
    def storage_root(self) -> Callable[[int], int]:
        """A function: storage id -> the storage it really is on the target device (a traced
        copy the device's kernel layout makes free is an alias, graph attribute
        `storage_alias`). `g.storage_root(sid)`."""
        self._facts_need_frozen()
        alias = self.graph.get("storage_alias", {})
        roots = {}
        for sid in alias:
            root = sid
            while root in alias:
                root = alias[root]
            roots[sid] = root
        get = roots.get

        def find(sid: int) -> int:
            return get(sid, sid)

        return find

    @cached_property
    def new_storages(self) -> dict[str, tuple[int, ...]]:
        """op node -> the storages it creates: its outputs that are neither views nor free on
        the device (see storage_root), then the tensors its kernel makes to save."""
        return self._made(with_saved=True)

    @cached_property
    def new_outputs(self) -> dict[str, tuple[int, ...]]:
        """op node -> its new output storages (new_storages without what its kernel saves)."""
        return self._made(with_saved=False)

    def _made(self, with_saved: bool) -> dict[str, tuple[int, ...]]:
        self._facts_need_frozen()
        owner, alias = self.graph["storage_owner"], self.graph.get("storage_alias", {})
        # a constant the forward builds (made_in_forward) is made at its first reader
        built = {d["storages"][0] for _, d in self.nodes(data=True)
                 if d["kind"] != "op" and d.get("made_in_forward")}
        out = {}
        for n in self.op_order:
            d = self.nodes[n]
            made = [s for s in d["storages"]
                    if s is not None and owner.get(s) == n and s not in alias]
            if built:
                made += [v.storage for v in self.op_inputs[n] if v.storage in built]
                built -= set(made)
            if with_saved:
                made += [s for s in d["saved"] if owner.get(s) == n and s not in d["storages"]]
            out[n] = tuple(dict.fromkeys(made))
        return out

    @cached_property
    def last_reads(self) -> dict[int, int]:
        """storage -> index in `op_order` of the op after which eager PyTorch can free it
        (graphcost/graph/liveness.py)."""
        return last_reads(self, list(self.op_order), self.storage_root)

    # -- modules --------------------------------------------------------------------------------

    @cached_property
    def module_calls(self) -> dict[str, tuple[int, int]]:
        """module call path -> (first, last) index in `op_order` of the ops it runs, in order
        of first op."""
        spans: dict[str, list[int]] = {}
        for i, n in enumerate(self.op_order):
            for c in self.nodes[n].get("module_calls", ()):
                span = spans.setdefault(c, [i, i])
                span[1] = i
        return {c: (a, b) for c, (a, b) in spans.items()}

    @cached_property
    def main_blocks(self) -> tuple[str, ...]:
        """Paths of the blocks of the model's main stack: the children "P.0", "P.1", ... of the
        container P with the most children that are all of one module class and run the same
        ops (ties: the outermost). Empty when no container has two such children."""
        return tuple(main_blocks_of(self, self.op_order))

    # -- what the passes share ------------------------------------------------------------------

    @cached_property
    def walk_facts(self) -> WalkFacts:
        """What every training-step walk of this graph needs, whatever the policy (the
        checkpoint search and fit walk one graph many times)."""
        return WalkFacts(self)

    @cached_property
    def block_stack(self) -> BlockStack | None:
        """Where the blocks of the stack analyze() expanded are (graph attribute
        `block_template`); None without a template, or when the stack's blocks are not
        contiguous or are not the main blocks."""
        template = self.graph.get("block_template")
        if template is None:
            return None
        path, count = template.blocks.path, template.blocks.count
        stack = BlockStack(self, path, count)
        blocks = tuple(f"{path}.{i}" for i in range(count))
        return stack if stack.ok and self.main_blocks == blocks else None


def main_blocks_of(g: nx.DiGraph, ops) -> list[str]:
    """CostedGraph.main_blocks of the ops `ops` of `g`."""
    types: dict[str, str] = {}
    signature: dict[str, list[str]] = defaultdict(list)
    for n in ops:
        d = g.nodes[n]
        calls, call_types = d.get("module_calls", ()), d.get("module_call_types", ())
        for c, t in zip(calls, call_types):
            types[c] = t
        for c in calls:
            signature[c].append(d["op"])
    children: dict[str, list[str]] = defaultdict(list)
    for c in types:
        parent, _, last = c.rpartition(".")
        if last.isdigit():
            children[parent].append(c)
    best: list[str] = []
    for parent, kids in children.items():
        kids.sort(key=lambda c: int(c.rpartition(".")[2]))
        if len(kids) < 2 or len({types[k] for k in kids}) != 1 or \
                len({tuple(signature[k]) for k in kids}) != 1:
            continue
        if len(kids) > len(best) or (len(kids) == len(best) and
                                     parent.count(".") < best[0].count(".") - 1):
            best = kids
    return best


__all__ = ["CostedGraph", "FrozenDict", "FrozenGraphError", "main_blocks_of", "op_order_of"]
