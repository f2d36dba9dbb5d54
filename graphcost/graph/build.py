"""Stage 2: the exported fx graph as a networkx.DiGraph of ops, parameters, buffers and inputs.

`build_graph` writes the structure and the attributes graphcost/graph/schema.py marks
"build_graph" (kind, order, outputs, storages, requires_grad; names on parameters, buffers and
inputs; target, op, args, kwargs, module_path, module_type, module_calls, module_call_types,
source, checkpoint and held_until on ops; the graph's model_name, autocast, outputs,
storage_bytes and storage_owner). The graph it returns is plain and mutable; `annotate` costs a
copy of it (a frozen CostedGraph).
"""

from __future__ import annotations

import operator
from typing import Any

import networkx as nx
import torch
from torch.export.graph_signature import InputKind
from torch.multiprocessing.reductions import StorageWeakRef

from graphcost.graph.costed import CostedGraph, op_order_of
from graphcost.rules.registry import TensorSpec, Value, op_name, values_in
from graphcost.trace.checkpoints import region_of
from graphcost.trace.decompose import STORAGE_ALIASES
from graphcost.trace.export import Trace
from graphcost.trace.grads import INPUT_GRAD_KEY, requires_grad_of
from graphcost.trace.lifetimes import held_until_ids
from graphcost.trace.node_meta import module_call_types_of, module_calls_of, module_of, source_of

aten = torch.ops.aten


# torch.export's name for a tensor constant it lifts out of the traced forward (a
# `torch.tensor(list)` the forward calls), as opposed to a module's tensor attribute
LIFTED_PREFIX = "lifted_tensor_"

_INPUT_KIND = {
    InputKind.PARAMETER: "param",
    InputKind.BUFFER: "buffer",
    InputKind.USER_INPUT: "input",
    InputKind.CONSTANT_TENSOR: "constant",
}


def _tensors(val: Any) -> list[torch.Tensor | None]:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [v if isinstance(v, torch.Tensor) else None for v in val]
    return []


def build_graph(tr: Trace) -> nx.DiGraph:
    """One networkx node per op, unique parameter, buffer and input; edges are data flow."""
    program = tr.program
    sig = program.graph_signature
    kinds = {spec.arg.name: (_INPUT_KIND.get(spec.kind, "constant"), spec.target)
             for spec in sig.input_specs}
    params = dict(tr.module.named_parameters(remove_duplicate=False))

    g = nx.DiGraph(model_name=tr.model_name, storage_bytes={}, storage_owner={},
                   autocast=tr.autocast)
    storage_ids: dict[int, int] = {}
    values: dict[tuple[str, int], Value] = {}  # (fx node, output index) -> Value
    canonical: dict[str, str] = {}  # placeholder name -> graph node (tied params merge)
    storage_node: dict[int, str] = {}  # placeholder storage -> graph node
    needs_grad = requires_grad_of(program.graph)  # the op values eager autograd records

    # an op trace replaced by its decomposition: its old outputs' storages are the new ones'
    same = {StorageWeakRef(old.untyped_storage()).cdata: StorageWeakRef(new.untyped_storage()).cdata
            for old, new in program.graph_module.meta.get(STORAGE_ALIASES, [])}

    def storage_of(t: torch.Tensor, owner: str) -> int:
        ref = StorageWeakRef(t.untyped_storage()).cdata
        while ref in same:
            ref = same[ref]
        if ref not in storage_ids:
            sid = storage_ids[ref] = len(storage_ids)
            g.graph["storage_bytes"][sid] = t.untyped_storage().nbytes()
            g.graph["storage_owner"][sid] = owner
        return storage_ids[ref]

    def to_value(x: Any) -> Any:
        if isinstance(x, torch.fx.Node):
            if x.target is operator.getitem and (x.args[0].name, x.args[1]) in values:
                return values[(x.args[0].name, x.args[1])]
            return values.get((x.name, 0), None)
        if isinstance(x, (list, tuple)):
            return type(x)(to_value(v) for v in x)
        return x

    # trace/lifetimes.py: the last op node of each id, for what Python holds values until
    last_of_id = {held_until_ids(node)[0]: node.name for node in program.graph.nodes
                  if node.op == "call_function" and node.target is not operator.getitem
                  and node.target is not torch._C._set_grad_enabled}
    last_of_id.pop(None, None)

    def held_until_of(node: torch.fx.Node) -> dict[int, str]:
        own, held = held_until_ids(node)
        if last_of_id.get(own) != node.name:  # one of the ops a decomposition made of it: the
            return {}  # last one returns what the model held
        return {i: last_of_id[h] for i, h in held.items() if h in last_of_id}

    for order, node in enumerate(program.graph.nodes):
        val = node.meta.get("val")
        if node.op == "placeholder":
            kind, target = kinds.get(node.name, ("input", None))
            t = val if isinstance(val, torch.Tensor) else None
            if t is None:
                continue  # a non-tensor input (an int, a flag): nothing to cost
            sid = storage_of(t, node.name)
            name = storage_node.get(sid) if kind == "param" else None
            if name is None:
                name = node.name
                rg = bool(params[target].requires_grad) if kind == "param" else \
                    bool(node.meta.get(INPUT_GRAD_KEY, t.requires_grad))
                g.add_node(name, kind=kind, order=order, outputs=(TensorSpec.of(t),),
                           storages=(sid,), requires_grad=rg and kind in ("param", "input"),
                           names=[target] if target else [],
                           made_in_forward=kind == "constant" and str(target).startswith(
                               LIFTED_PREFIX))
                storage_node[sid] = name
            else:
                g.nodes[name]["names"].append(target)  # a tied parameter: one node, two names
            canonical[node.name] = name
            node_data = g.nodes[name]
            values[(node.name, 0)] = Value(name, 0, node_data["outputs"][0],
                                           node_data["requires_grad"], kind, sid,
                                           t.is_contiguous(), tuple(map(int, t.stride())))
        elif node.op == "call_function":
            if node.target is torch._C._set_grad_enabled:
                continue  # (trace/grads.py follows grad mode)
            if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
                # Multi-output ops keep all outputs on one node; getitem just names one of them.
                src = values.get((node.args[0].name, node.args[1]))
                if src is not None:
                    values[(node.name, 0)] = src
                continue
            args = to_value(node.args)
            kwargs = {k: to_value(v) for k, v in node.kwargs.items()}
            inputs = [v for v in values_in(args) + values_in(list(kwargs.values()))]
            tensors = _tensors(val)
            specs = tuple(TensorSpec.of(t) if t is not None else None for t in tensors)
            sids = tuple(storage_of(t, node.name) if t is not None else None for t in tensors)
            rg = needs_grad.get(node, False)
            path, mtype = module_of(node)
            g.add_node(node.name, kind="op", order=order, target=node.target,
                       op=op_name(node.target), args=args, kwargs=kwargs, outputs=specs,
                       storages=sids, requires_grad=rg, module_path=path, module_type=mtype,
                       module_calls=module_calls_of(node), module_call_types=module_call_types_of(node),
                       source=source_of(node), checkpoint=region_of(node),
                       held_until=held_until_of(node))
            for v in inputs:
                g.add_edge(v.node, node.name)
            for i, (s, sid) in enumerate(zip(specs, sids)):
                if s is not None:
                    out_rg = rg and s.is_floating
                    values[(node.name, i)] = Value(node.name, i, s, out_rg, "op", sid,
                                                   tensors[i].is_contiguous(),
                                                   tuple(map(int, tensors[i].stride())))
        elif node.op == "output":
            g.graph["outputs"] = [v for v in values_in(to_value(node.args[0]))]
    return g


def op_nodes(g: nx.DiGraph) -> list[str]:
    """Op nodes in execution order (a new list): a costed graph's `op_order`, or the same
    order computed for a graph that is not costed yet."""
    return list(g.op_order if isinstance(g, CostedGraph) else op_order_of(g))
