"""`analyze()`: trace → graph → annotate, and the Analysis object the report and later passes use."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import nn

from graphcost.analysis.annotate import annotate
from graphcost.analysis.template import BlockTemplate
from graphcost.collector import collector_paused
from graphcost.graph.build import build_graph
from graphcost.graph.expand import expand_blocks
from graphcost.hardware.devices import DEFAULT_DEVICE, Device, get_device
from graphcost.rules.registry import RuleRegistry
from graphcost.trace.export import trace

# the graph attributes it reads (graphcost/graph/schema.py)
READS = ("backward_flops", "bytes_read", "bytes_written", "cost", "device", "forward_flops",
         "kind", "model_name", "module_path", "module_type", "names", "op", "outputs",
         "requires_grad", "saved_storages", "source", "storage_owner", "unsupported_ops",
         "weight_bytes")


@dataclass(frozen=True)
class OpRow:
    """One op of the traced model. saved_bytes: bytes of the activations this op produces (or its
    kernel creates) that autograd keeps for backward, so the rows add up to the total."""

    name: str
    op: str
    module_path: str
    module_type: str
    forward_flops: int
    backward_flops: int
    saved_bytes: int
    output_bytes: int
    weight_bytes: int
    bytes_read: int
    bytes_written: int
    supported: bool
    source: str = ""  # the model's source line that produced the op


@dataclass(frozen=True)
class GroupRow:
    """Ops aggregated by module path or by op name."""

    key: str
    count: int
    params: int
    forward_flops: int
    backward_flops: int
    saved_bytes: int
    output_bytes: int


@dataclass(frozen=True)
class Analysis:
    model_name: str
    device: Device
    graph: nx.DiGraph = field(repr=False, compare=False)
    params: int
    trainable_params: int
    weight_bytes: int
    forward_flops: int
    backward_flops: int
    saved_activation_bytes: int
    unsupported_ops: dict[str, int]
    ops: tuple[OpRow, ...] = field(repr=False)

    @property
    def total_flops(self) -> int:
        return self.forward_flops + self.backward_flops

    def by_op(self) -> list[GroupRow]:
        """Rows per ATen op, most forward+backward FLOPs first."""
        return _group(self.ops, lambda r: r.op, {})

    def by_module(self, depth: int | None = 1) -> list[GroupRow]:
        """Rows per module path cut to `depth` components ("layers.3" at depth 2), in order of
        first appearance. depth=None keeps full paths."""
        def key(path: str) -> str:
            parts = path.split(".") if path else []
            return ".".join(parts[:depth] if depth is not None else parts) or "<root>"

        with_ops = {key(r.module_path) for r in self.ops}

        def owner(name: str) -> str:
            """The row of a parameter: its module's, else its nearest ancestor's that runs ops
            (a module stood in for as one op, graphcost.opaque, holds its children's)."""
            path = name.rsplit(".", 1)[0] if "." in name else ""
            while key(path) not in with_ops and path:
                path = path.rpartition(".")[0]
            return key(path)

        params: dict[str, int] = defaultdict(int)
        for _, data in self.graph.nodes(data=True):
            if data["kind"] == "param":
                params[owner(data["names"][0])] += data["outputs"][0].numel
        return _group(self.ops, lambda r: key(r.module_path), params, sort=False)

    def totals(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "device": self.device.name,
            "params": self.params,
            "trainable_params": self.trainable_params,
            "weight_bytes": self.weight_bytes,
            "forward_flops": self.forward_flops,
            "backward_flops": self.backward_flops,
            "total_flops": self.total_flops,
            "saved_activation_bytes": self.saved_activation_bytes,
            "unsupported_ops": dict(self.unsupported_ops),
        }

    def to_dict(self, module_depth: int | None = 2) -> dict[str, Any]:
        return {
            **self.totals(),
            "modules": [asdict(r) for r in self.by_module(module_depth)],
            "ops": [asdict(r) for r in self.ops],
        }


def _group(rows, key, params, sort=True) -> list[GroupRow]:
    acc: dict[str, list[int]] = {}
    for r in rows:
        a = acc.setdefault(key(r), [0, 0, 0, 0, 0])
        a[0] += 1
        a[1] += r.forward_flops
        a[2] += r.backward_flops
        a[3] += r.saved_bytes
        a[4] += r.output_bytes
    out = [GroupRow(k, a[0], params.get(k, 0), a[1], a[2], a[3], a[4]) for k, a in acc.items()]
    if sort:
        out.sort(key=lambda r: -(r.forward_flops + r.backward_flops))
    return out


@collector_paused()
def analyze(module: nn.Module, example_inputs: Any, *, kwargs: dict | None = None,
            device: str | Device = DEFAULT_DEVICE, rules: RuleRegistry | None = None,
            strict: bool = False, model_name: str | None = None,
            reuse_blocks: bool = True, autocast: torch.dtype | None = None) -> Analysis:
    """Trace `module` on `example_inputs` and cost every op.

    `reuse_blocks` exports a stack of identical blocks once and copies it (graphcost.blocks);
    pass False to export every block. `autocast=torch.bfloat16` costs the model as it runs
    under torch.autocast (graphcost.autocast): fp32 weights, ops in bf16, autocast's copies.
    A submodule torch.export cannot capture is one opaque op, listed under unsupported_ops
    (graphcost.opaque); with `strict` it is a TraceError instead.

    >>> from graphcost.models import load
    >>> a = analyze(*load("gpt2", seq=128, n_layer=2))
    >>> a.params
    53561088
    """
    device = get_device(device)
    tr = trace(module, example_inputs, kwargs=kwargs, model_name=model_name,
               reuse_blocks=reuse_blocks, autocast=autocast, opaque_submodules=not strict,
               rules=rules, kernels=device.kind)
    g = build_graph(tr)
    if tr.blocks is not None:
        two = g
        g = expand_blocks(two, tr.blocks)
        if g is not None:  # kept for the walk of a deep stack (passes/memory/stack.py)
            g.graph["block_template"] = BlockTemplate(two, tr.blocks, device, rules)
        else:  # the two-block trace did not repeat cleanly: export the whole model
            g = build_graph(trace(module, example_inputs, kwargs=kwargs, model_name=model_name,
                                  reuse_blocks=False, autocast=autocast,
                                  opaque_submodules=not strict, rules=rules,
                                  kernels=device.kind))
    return summarize(annotate(g, device=device, rules=rules, strict=strict))


def summarize(g: nx.DiGraph) -> Analysis:
    """Totals and rows of a costed graph."""
    produced: dict[str, int] = defaultdict(int)  # saved bytes by the op that made the storage
    for sid, nbytes in g.graph["saved_storages"].items():
        produced[g.graph["storage_owner"][sid]] += nbytes
    rows = []
    for name in g.op_order:
        d = g.nodes[name]
        rows.append(OpRow(
            name=name, op=d["op"], module_path=d["module_path"], module_type=d["module_type"],
            forward_flops=d["forward_flops"], backward_flops=d["backward_flops"],
            saved_bytes=produced.get(name, 0),
            output_bytes=sum(s.nbytes for s in d["outputs"] if s is not None),
            weight_bytes=d["weight_bytes"], bytes_read=d["bytes_read"],
            bytes_written=d["bytes_written"], supported=d["cost"] is not None,
            source=d.get("source", "")))
    params = [d for _, d in g.nodes(data=True) if d["kind"] == "param"]
    return Analysis(
        model_name=g.graph["model_name"],
        device=g.graph["device"],
        graph=g,
        params=sum(d["outputs"][0].numel for d in params),
        trainable_params=sum(d["outputs"][0].numel for d in params if d["requires_grad"]),
        weight_bytes=sum(d["outputs"][0].nbytes for d in params),
        forward_flops=sum(r.forward_flops for r in rows),
        backward_flops=sum(r.backward_flops for r in rows),
        saved_activation_bytes=sum(g.graph["saved_storages"].values()),
        unsupported_ops=dict(g.graph["unsupported_ops"]),
        ops=tuple(rows),
    )


__all__ = ["Analysis", "GroupRow", "OpRow", "analyze", "summarize"]
