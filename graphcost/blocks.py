"""Trace a stack of identical blocks once: the speed path for deep models.

A transformer is mostly one block repeated L times. Exporting all L copies costs L times as
much as exporting one, so `trace` exports the model with its main stack cut to its first two
blocks, and `expand_blocks` rebuilds the full graph by copying block 1 L - 2 times, wiring each
copy's inputs to the previous copy's outputs and the ops after the stack to the last copy.
Blocks are "identical" when every submodule has the same type, configuration (`extra_repr`),
training flag, and parameters/buffers of the same shapes, dtypes and requires_grad; anything
else (or a block whose trace differs from the first one's, or ops the parent runs between
blocks) falls back to exporting the whole model.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx
from torch import nn

from graphcost.rules.registry import Value, values_in

MIN_BLOCKS = 4  # below this, copying saves too little to be worth it


@dataclass(frozen=True)
class RepeatedBlocks:
    path: str  # module path of the ModuleList / Sequential: "layers", "h", "encoder.layers"
    count: int  # how many blocks the real model has


@dataclass(frozen=True, eq=False)
class BlockTemplate:
    """What analyze() built a full graph from: the two-block graph and how it was costed. The
    walk of a deep stack derives the full timeline from shortened ones (passes/stack.py)."""

    graph: nx.DiGraph  # the two-block graph, before expand_blocks and annotate
    blocks: RepeatedBlocks
    device: Any  # hardware.Device
    rules: Any = None  # rules.registry.RuleRegistry
    _short: dict = field(default_factory=dict, repr=False)

    def shortened(self, n_blocks: int) -> nx.DiGraph | None:
        """The costed graph of the model with `n_blocks` blocks (cached)."""
        from graphcost.annotate import annotate

        if n_blocks not in self._short:
            g = expand_blocks(self.graph, replace(self.blocks, count=n_blocks))
            if g is not None:
                with warnings.catch_warnings():  # the full graph's annotate has warned
                    warnings.simplefilter("ignore")
                    g = annotate(g, device=self.device, rules=self.rules)
            self._short[n_blocks] = g
        return self._short[n_blocks]


def _signature(block: nn.Module) -> tuple:
    modules = tuple((type(m), m.extra_repr(), m.training) for m in block.modules())
    tensors = tuple((n, tuple(p.shape), p.dtype, p.requires_grad)
                    for n, p in block.named_parameters(remove_duplicate=False))
    buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in block.named_buffers())
    return modules, tensors, buffers


def find_repeated_blocks(module: nn.Module) -> RepeatedBlocks | None:
    """The longest ModuleList/Sequential of identical blocks with no parameter shared outside."""
    best = None
    for path, child in module.named_modules():
        if not isinstance(child, (nn.ModuleList, nn.Sequential)) or len(child) < MIN_BLOCKS:
            continue
        blocks = list(child)
        first = _signature(blocks[0])
        if any(_signature(b) != first for b in blocks[1:]):
            continue
        if best is None or len(blocks) > best.count:
            best = RepeatedBlocks(path, len(blocks))
    if best is None:
        return None
    # A parameter used both inside a block and elsewhere (or in two blocks) cannot be copied.
    inside = {id(p) for p in module.get_submodule(best.path).parameters()}
    outside = [p for n, p in module.named_parameters(remove_duplicate=False)
               if not n.startswith(best.path + ".")]
    per_block = [id(p) for b in module.get_submodule(best.path) for p in b.parameters()]
    if any(id(p) in inside for p in outside) or len(per_block) != len(set(per_block)):
        return None
    return best


@contextlib.contextmanager
def first_two_blocks(module: nn.Module, blocks: RepeatedBlocks) -> Iterator[None]:
    """Temporarily replace the stack with one holding only its first two blocks."""
    parent_path, _, attr = blocks.path.rpartition(".")
    parent = module.get_submodule(parent_path)
    stack = getattr(parent, attr)
    short = type(stack)(list(stack)[:2]) if isinstance(stack, nn.Sequential) \
        else nn.ModuleList(list(stack)[:2])
    parent._modules[attr] = short
    try:
        yield
    finally:
        parent._modules[attr] = stack


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
                copies.append(nodes[n])
            out.add_node(nodes[n], **data)
            for v in values_in((data.get("args", ()), list(data.get("kwargs", {}).values()))):
                out.add_edge(v.node, nodes[n])
        prev_nodes, prev_storages = nodes, storages

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

