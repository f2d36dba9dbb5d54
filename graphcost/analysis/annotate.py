"""Stage 3: cost every op node with its rule from the registry.

Writes, on a copy of the graph, for each op node:
    cost            the rule's OpCost (None when the op has no rule)
    forward_flops   FLOPs of the forward op
    runs_backward   does autograd run this op's backward (it needs a gradient and feeds the loss)
    backward_flops  FLOPs of its backward, for the gradients actually required (0 when autograd
                    does not reach it)
    saved           frozenset of storage ids autograd keeps for this op's backward
    bytes_read, bytes_written, weight_bytes (bytes of parameters it reads)
and on the graph: `unsupported_ops` (Counter of op names; a submodule graphcost could not trace
is 'opaque module PATH (TYPE)', graphcost.opaque), `device`, and `saved_storages`
({storage id: bytes} of every storage saved for backward that is not a parameter, buffer,
constant or model input), `storage_alias` (storages that are free copies of another), and
returns the copy as a frozen CostedGraph (graphcost/graph/costed.py; the attributes are declared in
graphcost/graph/schema.py).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter

import networkx as nx
import torch

from graphcost.errors import GraphcostError, UnsupportedOpError
from graphcost.graph.costed import CostedGraph, op_order_of
from graphcost.hardware.devices import Device, get_device
from graphcost.rules import REGISTRY
from graphcost.rules.registry import (
    OpCost,
    Out,
    RuleContext,
    RuleRegistry,
    TensorSpec,
    Value,
    values_in,
)
from graphcost.trace.autocast import as_cast, cast_dtype, cast_inputs
from graphcost.trace.opaque import OPAQUE, unsupported_name
from graphcost.trace.opaque import warning as opaque_warning

# the graph attributes it reads (graphcost/graph/schema.py)
READS = ("args", "autocast", "checkpoint", "cost", "kind", "kwargs", "module_path", "op",
         "outputs", "requires_grad", "runs_backward", "storage_bytes", "storage_owner",
         "storages", "target")

aten = torch.ops.aten
NOT_ACTIVATIONS = ("param", "buffer", "input", "constant")
COPY_IF_NEEDED = {aten.contiguous.default, aten.reshape.default, aten.flatten.using_ints}
SAME_SHAPE_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                    aten.alias.default}


def annotate(graph: nx.DiGraph, *, device: str | Device = "cpu", rules: RuleRegistry | None = None,
             strict: bool = False) -> CostedGraph:
    """Return a costed, frozen copy of `graph` (see module docstring for what is written)."""
    device = get_device(device)
    rules = rules or REGISTRY
    g = CostedGraph.of(graph)
    g.graph["device"] = device
    unsupported: Counter[str] = Counter()
    next_storage = max(g.graph["storage_bytes"], default=-1) + 1

    # Backward reaches an op only if a gradient flows from the loss to its output: through
    # values that require a gradient, not through integer indices (a cdist whose distances only
    # pick neighbours by topk's indices never runs its backward, and eager frees what it saved
    # as soon as the unused branch's Python references die).
    reached = _reached(g, [v.node for v in g.graph.get("outputs", []) if v.requires_grad])

    saved_storages: dict[int, int] = {}
    layouts = _Layouts()
    autocast_copies: dict[tuple[int, torch.dtype], int] = {}  # autocast's cache of leaf casts
    ops = op_order_of(g)
    for name in ops:
        data = g.nodes[name]
        rule = rules.lookup(data["target"])
        inputs = tuple(values_in(data["args"]) + values_in(list(data["kwargs"].values())))
        layouts.follow(name, data, inputs)
        args, kwargs, copied = data["args"], data["kwargs"], {}
        run_dtype = cast_dtype(data["target"], g.graph.get("autocast"))
        for v in cast_inputs(inputs, run_dtype):
            key = (v.storage, run_dtype)
            cached = v.kind == "param" and v.requires_grad  # autocast caches these casts
            if key not in autocast_copies or not cached:
                autocast_copies[key] = next_storage
                g.graph["storage_bytes"][next_storage] = v.spec.numel * run_dtype.itemsize
                g.graph["storage_owner"][next_storage] = name
                next_storage += 1
            copied[v] = as_cast(v, run_dtype, autocast_copies[key])
        if copied:
            args = _replace_values(args, copied)
            kwargs = {k: _replace_values(x, copied) for k, x in kwargs.items()}
            inputs = tuple(copied.get(v, v) for v in inputs)
        if rule is None:
            unsupported[unsupported_name(data)] += 1
            cost = None
        else:
            ctx = RuleContext(name=name, op=data["target"], args=args,
                              kwargs=kwargs, inputs=inputs, outputs=data["outputs"],
                              requires_grad=data["requires_grad"], device=device)
            try:
                cost = rule(ctx)
            except Exception as exc:  # re-raised naming the node
                raise GraphcostError(
                    f"rule for {data['op']} failed at node %{name} (module "
                    f"{data['module_path'] or '<root>'}): {type(exc).__name__}: {exc}") from exc
        cost = _clone_overwritten(data["target"], inputs, cost or OpCost())
        unsaved_copies = sum(g.graph["storage_bytes"][c.storage] for c in copied.values()
                             if c not in cost.saved and g.graph["storage_owner"][c.storage] == name)
        if unsaved_copies:  # autocast's copies nobody keeps live and die inside the op
            cost = dataclasses.replace(
                cost, forward_workspace_bytes=cost.forward_workspace_bytes + unsaved_copies)
        if cost.output_dim_order is not None:
            layouts.set(name, cost.output_dim_order)
        if cost.output_is_input is not None:
            layouts.same_as(name, data, inputs[cost.output_is_input])
        for index, nbytes in (cost.output_storage_bytes or {}).items():
            own = data["storages"][index]
            if own is not None and g.graph["storage_owner"].get(own) == name:
                g.graph["storage_bytes"][own] = max(g.graph["storage_bytes"][own], nbytes)
        saved = set()
        for s in cost.saved:
            if isinstance(s, Value):
                saved.add(layouts.find(s.storage))
            elif isinstance(s, Out):
                saved.add(layouts.find(data["storages"][s.index]))
            elif isinstance(s, TensorSpec):
                g.graph["storage_bytes"][next_storage] = s.nbytes
                g.graph["storage_owner"][next_storage] = name
                saved.add(next_storage)
                next_storage += 1
        for sid in saved:
            owner = g.graph["storage_owner"][sid]
            if g.nodes[owner]["kind"] not in NOT_ACTIVATIONS and data.get("checkpoint") is None:
                saved_storages[sid] = g.graph["storage_bytes"][sid]
        new_outputs = {sid for sid in data["storages"] if sid is not None
                       and g.graph["storage_owner"][sid] == name and sid not in layouts.alias}
        params = {v.storage: v.spec.nbytes for v in inputs if v.kind == "param"}
        runs_backward = name in reached and data["requires_grad"]
        data.update(
            cost=cost if rule else None,
            runs_backward=runs_backward,
            forward_flops=cost.forward_flops,
            backward_flops=cost.backward_flops if runs_backward else 0,
            saved=frozenset(saved),
            weight_bytes=sum(params.values()),
            bytes_read=(cost.bytes_read if cost.bytes_read is not None
                        else sum({v.storage: v.spec.nbytes for v in inputs}.values())),
            bytes_written=(cost.bytes_written if cost.bytes_written is not None
                           else sum(s.nbytes for s, sid in zip(data["outputs"], data["storages"])
                                    if s is not None and sid in new_outputs)),
        )
    saved_storages.update(_checkpoint_inputs(g, ops, layouts.find))
    g.graph["saved_storages"] = saved_storages
    g.graph["storage_alias"] = layouts.alias
    g.graph["unsupported_ops"] = unsupported
    g.freeze(op_order=ops)
    if unsupported:
        _warn_unsupported(g, unsupported, strict)
    return g


def _warn_unsupported(g: CostedGraph, unsupported: Counter[str], strict: bool) -> None:
    """One warning for the ops without a rule and one for the opaque stand-ins of submodules
    graphcost could not trace (graphcost.opaque); with `strict`, an UnsupportedOpError."""
    listing = ", ".join(f"{op} (x{n})" for op, n in sorted(unsupported.items()))
    if strict:
        raise UnsupportedOpError(
            f"no cost rule for: {listing}. Add one with graphcost.register_rule "
            "(see docs/rules.md), or drop --strict to list them as unsupported.")
    opaque = [n for n in g.op_order
              if g.nodes[n]["target"] is OPAQUE and g.nodes[n]["cost"] is None]
    opaque_names = {unsupported_name(g.nodes[n]) for n in opaque}
    plain = ", ".join(f"{op} (x{n})" for op, n in sorted(unsupported.items())
                      if op not in opaque_names)
    if plain:
        warnings.warn(f"graphcost: no cost rule for {plain}; their costs are NOT included "
                      "(listed under unsupported_ops)", stacklevel=3)
    if opaque:
        warnings.warn(opaque_warning(g, opaque), stacklevel=3)


def _clone_overwritten(op: object, inputs: tuple[Value, ...], cost: OpCost) -> OpCost:
    """An in-place op overwrites its first argument: where its gradient needs that argument's
    value before the op (x.mul_(y) for y's gradient), autograd saves `self.clone()`, a new
    tensor, not the storage the op writes to."""
    schema = getattr(op, "_schema", None)
    if schema is None or not schema.arguments or not inputs:
        return cost
    alias = schema.arguments[0].alias_info
    if alias is None or not alias.is_write:
        return cost
    self_ = inputs[0]
    saved = tuple(TensorSpec(s.spec.shape, s.spec.dtype) if isinstance(s, Value) and s == self_ else s
                  for s in cost.saved)
    return dataclasses.replace(cost, saved=saved) if saved != cost.saved else cost


def _reached(g: nx.DiGraph, outputs: list[str]) -> set[str]:
    """The nodes a gradient reaches from `outputs`, following only inputs that need one."""
    seen, todo = set(outputs), list(outputs)
    while todo:
        d = g.nodes[todo.pop()]
        if d["kind"] != "op":
            continue
        for v in values_in((d["args"], list(d["kwargs"].values()))):
            if v.requires_grad and v.node not in seen:
                seen.add(v.node)
                todo.append(v.node)
    return seen


def _checkpoint_inputs(g: nx.DiGraph, ops: list[str], find) -> dict[int, int]:
    """{storage: bytes} of the activations the model's own checkpoint regions (graph attribute
    `checkpoint`) keep for their recomputation: what their ops read that was made before them.
    Inside a region autograd saves nothing else (trace/checkpoints.py)."""
    made: dict[int, str] = {}  # storage -> region of the op that made it (None: outside)
    kept: dict[int, int] = {}
    for name in ops:
        data = g.nodes[name]
        tag = data.get("checkpoint")
        region = tag.region if tag is not None else None
        if region is not None and data["runs_backward"]:
            # autograd saves the checkpoint's positional tensor arguments; what else the region
            # reads (a closure's, a keyword argument's) is held by its frame, not saved
            args = None if tag.inputs is None or any(n not in g for n in tag.inputs) else \
                {find(s) for n in tag.inputs for s in g.nodes[n]["storages"] if s is not None}
            for v in values_in((data["args"], list(data["kwargs"].values()))):
                sid = find(v.storage)
                owner = g.graph["storage_owner"][sid]
                if g.nodes[owner]["kind"] not in NOT_ACTIVATIONS and made.get(sid) != region \
                        and (args is None or sid in args):
                    kept[sid] = g.graph["storage_bytes"][sid]
        for sid in data["storages"]:
            if sid is not None:
                made.setdefault(find(sid), region)
    return kept


def _replace_values(x, mapping: dict):
    if isinstance(x, Value):
        return mapping.get(x, x)
    if isinstance(x, (list, tuple)):
        return type(x)(_replace_values(v, mapping) for v in x)
    return x


def _row_major(order: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Is a tensor of `shape` whose dims lie in memory in `order` contiguous? Dims of size 1
    have no stride that matters (is_contiguous() skips them)."""
    dims = [d for d in order if shape[d] != 1]
    return dims == sorted(dims)


class _Layouts:
    """Tracks outputs whose kernel writes them in a non-contiguous memory order (see
    OpCost.output_dim_order) through transposes and permutes. A traced copy (`contiguous`,
    `reshape`) of such a tensor that is contiguous in memory is free: its storage is an alias."""

    def __init__(self) -> None:
        self.order: dict[str, tuple[int, ...]] = {}
        self.alias: dict[int, int] = {}  # storage -> the storage it really is

    def set(self, node: str, order: tuple[int, ...]) -> None:
        self.order[node] = tuple(order)

    def same_as(self, node: str, data: dict, x: Value) -> None:
        """The op's output is `x` itself (see OpCost.output_is_input)."""
        own = data["storages"][0]
        if own is not None and own != x.storage:
            self.alias[own] = self.find(x.storage)
        if x.node in self.order:
            self.order[node] = self.order[x.node]

    def find(self, sid: int) -> int:
        while sid in self.alias:
            sid = self.alias[sid]
        return sid

    def follow(self, name: str, data: dict, inputs: tuple[Value, ...]) -> None:
        if not inputs or inputs[0].node not in self.order:
            return
        x, order, target = inputs[0], self.order[inputs[0].node], data["target"]
        rank = len(order)
        if target is aten.transpose.int:
            i, j = (d % rank for d in data["args"][1:3])
            self.order[name] = tuple(j if d == i else i if d == j else d for d in order)
        elif target is aten.permute.default:
            where = {old: new for new, old in enumerate(data["args"][1])}
            self.order[name] = tuple(where[d % rank] for d in order)
        elif target in COPY_IF_NEEDED and _row_major(order, x.spec.shape):
            own = data["storages"][0]
            if own is not None and own != x.storage:
                self.alias[own] = self.find(x.storage)
        elif target in SAME_SHAPE_VIEWS and data["outputs"] and data["outputs"][0] is not None \
                and tuple(data["outputs"][0].shape) == tuple(x.spec.shape):
            self.order[name] = order  # a reshape to the same shape changes no memory order

