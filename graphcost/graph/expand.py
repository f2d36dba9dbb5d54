"""The full graph of a deep stack from the two-block trace (trace/blocks.py): block 1 copied
L - 2 times, each copy's inputs wired to the previous copy's outputs and the ops after the stack
to the last copy. Parameters and buffers of the copies keep the module's order."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import networkx as nx

from graphcost.rules.registry import Value, values_in
from graphcost.trace.blocks import RepeatedBlocks


def _in_block(path: str, prefix: str, index: int) -> bool:
    head = f"{prefix}.{index}"
    return path == head or path.startswith(head + ".")


def expand_blocks(g: nx.DiGraph, blocks: RepeatedBlocks) -> nx.DiGraph | None:
    """The graph of the full model from the graph of its two-block version (None: cannot)."""
    order = sorted(g.nodes, key=lambda n: g.nodes[n]["order"])
    ops = [n for n in order if g.nodes[n]["kind"] == "op"]
    b0 = [n for n in ops if _in_block(g.nodes[n]["module_path"], blocks.path, 0)]
    b1 = [n for n in ops if _in_block(g.nodes[n]["module_path"], blocks.path, 1)]
    if not b0 or len(b0) != len(b1):
        return None
    if any(g.nodes[a]["target"] != g.nodes[b]["target"] for a, b in zip(b0, b1)):
        return None
    span = ops[ops.index(b0[0]): ops.index(b1[-1]) + 1]
    if len(span) != len(b0) + len(b1):
        return None  # the parent runs ops between blocks: copying blocks would miss them
    if not _chained(g, b0, b1):
        return None  # parallel blocks (experts, heads) are not a stack: copies would chain them
    p0 = _block_params(g, blocks.path, 0)
    p1 = _block_params(g, blocks.path, 1)
    if sorted(_local(n, blocks.path) for n in p0.values()) != \
            sorted(_local(n, blocks.path) for n in p1.values()):
        return None

    # Block 0 -> block 1 correspondences, for the values a block reads from the one before.
    node_prev = dict(zip(b0, b1))
    by_local = {_local(name, blocks.path): n for n, name in p1.items()}
    node_prev.update({n: by_local[_local(name, blocks.path)] for n, name in p0.items()})
    storage_prev = {}
    for a, b in node_prev.items():
        for sa, sb in zip(g.nodes[a]["storages"], g.nodes[b]["storages"]):
            if sa is not None and g.graph["storage_owner"].get(sa) == a:
                storage_prev[sa] = sb

    held = _HeldPattern(g, b0, b1, blocks.path)
    out = g.copy()
    out.graph["storage_bytes"] = dict(g.graph["storage_bytes"])
    out.graph["storage_owner"] = dict(g.graph["storage_owner"])
    template = list(p1.keys()) + b1
    owned = {s for n in template for s in g.nodes[n]["storages"]
             if s is not None and g.graph["storage_owner"].get(s) == n}
    next_storage = max(out.graph["storage_bytes"], default=-1) + 1
    prev_nodes = {n: n for n in template}
    prev_storages = {s: s for s in owned}
    copies: list[str] = []
    new_params: list[str] = []
    for i in range(2, blocks.count):
        nodes = {n: f"{n}_{blocks.path.replace('.', '_')}{i}" for n in template}
        storages = {}
        for s in sorted(owned):
            storages[s] = next_storage
            out.graph["storage_bytes"][next_storage] = g.graph["storage_bytes"][s]
            out.graph["storage_owner"][next_storage] = nodes[g.graph["storage_owner"][s]]
            next_storage += 1

        def storage(s, storages=storages, prev_storages=prev_storages):
            if s in storages:  # made inside this block
                return storages[s]
            if s in storage_prev:  # made by the block before
                return prev_storages[storage_prev[s]]
            return s  # shared with the whole model (rotary tables, masks)

        def remap(v: Value, nodes=nodes, prev_nodes=prev_nodes, storage=storage) -> Value:
            node = nodes.get(v.node) or (prev_nodes[node_prev[v.node]] if v.node in node_prev
                                          else v.node)
            return replace(v, node=node, storage=storage(v.storage))

        for n in template:
            data = dict(g.nodes[n])
            data["storages"] = tuple(storage(s) if s is not None else None
                                     for s in data["storages"])
            if data["kind"] in ("param", "buffer"):
                data["names"] = [_rename(name, blocks.path, 1, i) for name in data["names"]]
                new_params.append(nodes[n])
            else:
                data["args"] = _map_values(data["args"], remap)
                data["kwargs"] = {k: _map_values(v, remap) for k, v in data["kwargs"].items()}
                data["module_path"] = _rename(data["module_path"], blocks.path, 1, i)
                data["module_calls"] = tuple(_rename(c, blocks.path, 1, i)
                                             for c in data["module_calls"])
                data["held_until"] = held(i, b1.index(n), blocks.count)
                copies.append(nodes[n])
            out.add_node(nodes[n], **data)
            for v in values_in((data.get("args", ()), list(data.get("kwargs", {}).values()))):
                out.add_edge(v.node, nodes[n])
        prev_nodes, prev_storages = nodes, storages

    for j, n in enumerate(b1):  # block 1 is no longer the last block
        out.nodes[n]["held_until"] = held(1, j, blocks.count)
    inside, last_block = set(b0) | set(b1), {n: j for j, n in enumerate(b1)}
    for n in ops:  # a value from outside the stack held through its last block
        until = g.nodes[n].get("held_until") or {}
        if n not in inside and blocks.count > 2 and any(h in last_block for h in until.values()):
            out.nodes[n]["held_until"] = {
                i: held.name(blocks.count - 1, last_block[h]) if h in last_block else h
                for i, h in until.items()}

    # What came after the stack now reads the last copy.
    last_nodes, last_storages = prev_nodes, prev_storages

    def last_storage(s):
        return last_storages.get(s, s)

    def to_last(v: Value) -> Value:
        return replace(v, node=last_nodes.get(v.node, v.node), storage=last_storage(v.storage))

    after = ops[ops.index(b1[-1]) + 1:]
    for n in after:
        data = out.nodes[n]
        data["storages"] = tuple(last_storage(s) if s is not None else None
                                 for s in data["storages"])
        for u in [u for u in out.predecessors(n) if u in last_nodes]:
            out.remove_edge(u, n)
        data["args"] = _map_values(data["args"], to_last)
        data["kwargs"] = {k: _map_values(v, to_last) for k, v in data["kwargs"].items()}
        for v in values_in(data["args"]) + values_in(list(data["kwargs"].values())):
            out.add_edge(v.node, n)
    out.graph["outputs"] = [to_last(v) for v in g.graph.get("outputs", [])]

    # Parameters stay in the module's order (the optimizer walks them in it): the copies' right
    # after block 1's; so do buffers (torch.export lists them after all parameters).
    placeholders = [n for n in order if g.nodes[n]["kind"] != "op"]
    for kind in ("param", "buffer"):
        mine = [n for n in p1 if g.nodes[n]["kind"] == kind]
        if mine:
            cut = max(placeholders.index(n) for n in mine) + 1
            placeholders[cut:cut] = [n for n in new_params if out.nodes[n]["kind"] == kind]
    before = ops[: ops.index(b1[-1]) + 1]
    for k, n in enumerate(placeholders + before + copies + after):
        out.nodes[n]["order"] = k
    return out


class _HeldPattern:
    """How long Python holds each value of block k (trace/lifetimes.py, op attribute
    `held_until`) in the full stack: a block followed by another one holds like block 0 of the
    two-block trace (its output lives until the next block returns), the last block like
    block 1; until an op of its own block, of the next one at the same offset, or outside."""

    def __init__(self, g: nx.DiGraph, b0: list[str], b1: list[str], path: str) -> None:
        self.b1, self.path = b1, path
        at = {n: ("b0", j) for j, n in enumerate(b0)} | {n: ("b1", j) for j, n in enumerate(b1)}
        self.patterns = []
        for own, block in (("b0", b0), ("b1", b1)):
            pattern = []
            for n in block:
                entries = {}
                for i, h in (g.nodes[n].get("held_until") or {}).items():
                    if h in at:
                        where, j = at[h]
                        entries[i] = ("same" if where == own else "next", j)
                    else:
                        entries[i] = ("fixed", h)
                pattern.append(entries)
            self.patterns.append(pattern)

    def name(self, k: int, j: int) -> str:
        """Op j of block k in the full graph (block 1's ops keep their names)."""
        return self.b1[j] if k == 1 else f"{self.b1[j]}_{self.path.replace('.', '_')}{k}"

    def __call__(self, k: int, j: int, count: int) -> dict[int, str]:
        entries = self.patterns[1 if k == count - 1 else 0][j]
        return {i: where if kind == "fixed" else self.name(k if kind == "same" else k + 1, where)
                for i, (kind, where) in entries.items()}


def _chained(g: nx.DiGraph, b0: list[str], b1: list[str]) -> bool:
    """Does block 1 read an activation block 0 made (x = block(x)), as the blocks of a stack
    do? A ModuleList run in parallel (experts on the same input, stacked) does not."""
    made = set(b0)
    return any(v.node in made for n in b1
               for v in values_in((g.nodes[n]["args"], list(g.nodes[n]["kwargs"].values()))))


def _block_params(g: nx.DiGraph, prefix: str, index: int) -> dict[str, str]:
    return {n: d["names"][0] for n, d in g.nodes(data=True)
            if d["kind"] in ("param", "buffer") and d["names"]
            and d["names"][0].startswith(f"{prefix}.{index}.")}


def _local(name: str, prefix: str) -> str:
    """'layers.1.attention.wq.weight' -> 'attention.wq.weight'."""
    return name[len(prefix) + 1:].split(".", 1)[1]


def _rename(path: str, prefix: str, old: int, new: int) -> str:
    head = f"{prefix}.{old}"
    if path == head or path.startswith(head + "."):
        return f"{prefix}.{new}" + path[len(head):]
    return path


def _map_values(x: Any, fn) -> Any:
    if isinstance(x, Value):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_map_values(v, fn) for v in x)
    return x
