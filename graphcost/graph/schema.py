"""The node and graph attributes of graphcost's graph, declared once (docs/graph.md).

`build_graph` writes the structure and what the trace knows (one node per op, parameter, buffer,
input and constant); `annotate` writes the costs on every op node of a copy and freezes it (a
`CostedGraph`). Each pass module lists the attributes it reads in a module-level `READS`, and
tests/test_schema.py checks those lists against this schema and against the pass's source.

`WRITTEN_BY` names the stage that writes each attribute:

    >>> WRITTEN_BY["forward_flops"], WRITTEN_BY["module_path"], WRITTEN_BY["storage_alias"]
    ('annotate', 'build_graph', 'annotate')
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

from graphcost.rules.registry import OpCost, TensorSpec, Value


class Retraced(TypedDict, total=False):
    """On a graph sizing.retrace built at another shape, every node also holds:"""

    retrace_template: str  # the two-block graph's node it copies


class PlaceholderNode(Retraced):
    """What every parameter, buffer, input and constant node holds (build_graph)."""

    kind: Literal["param", "buffer", "input", "constant"]
    order: int  # position in execution order (placeholders first)
    outputs: tuple[TensorSpec]  # its one tensor
    storages: tuple[int]  # the storage that tensor lives in
    requires_grad: bool  # a trainable parameter, or an input that needs a gradient
    names: list[str]  # every fully qualified name (tied parameters: one node, several names)
    # a constant torch.export lifted from a tensor the forward builds from Python data
    # (`torch.tensor(indices)`): eager makes it at its first use, not before the step
    made_in_forward: bool


class ParamNode(PlaceholderNode):
    """kind == "param": a unique Parameter (tied ones are one node)."""


class BufferNode(PlaceholderNode):
    """kind == "buffer": a registered buffer."""


class InputNode(PlaceholderNode):
    """kind == "input" (a tensor argument of forward) or "constant" (a tensor constant)."""


class OpNode(Retraced):
    """An ATen op of the forward. build_graph writes the first block, annotate the second."""

    # -- build_graph
    kind: Literal["op"]
    order: int
    outputs: tuple[TensorSpec | None, ...]  # one per output (None: not a tensor)
    storages: tuple[int | None, ...]  # the storage each output lives in; a view: its base's
    requires_grad: bool  # does the (first) output need a gradient
    target: Any  # the ATen OpOverload
    op: str  # its name: "aten.linear.default"
    args: tuple[Any, ...]  # the op's arguments, tensors replaced by Values
    kwargs: dict[str, Any]
    module_path: str  # the module that ran it: "layers.3.attention.wq" ("" for the root)
    module_type: str  # that module's class name: "Linear"
    module_calls: tuple[str, ...]  # the module calls it runs inside, outermost first
    module_call_types: tuple[str, ...]  # the class name of each of module_calls
    source: str  # the model's source line that produced it
    checkpoint: Any  # trace.checkpoints.CheckpointTag: the model's own checkpoint region, or None
    # {output index: the op until which eager Python keeps that output} (trace/lifetimes.py)
    held_until: dict[int, str]
    # -- annotate
    cost: OpCost | None  # the rule's OpCost; None when the op has no rule
    runs_backward: bool  # autograd runs its backward (it needs a gradient and feeds the loss)
    forward_flops: int
    backward_flops: int  # for the gradients actually required; 0 when backward does not reach it
    saved: frozenset[int]  # storages autograd keeps for its backward
    weight_bytes: int  # bytes of the parameters it reads
    bytes_read: int
    bytes_written: int


class Expanded(TypedDict, total=False):
    """On a graph analyze() expanded from a two-block trace (written before annotate):"""

    block_template: Any  # analysis.template.BlockTemplate: the trace, to cost shortened stacks


class GraphAttributes(Expanded):
    """`g.graph`."""

    # -- build_graph
    model_name: str
    autocast: Any  # the torch.autocast dtype the op dtypes were taken under, or None
    outputs: list[Value]  # what the model returns; backward starts from those needing a gradient
    storage_bytes: dict[int, int]  # storage id -> bytes (annotate adds the storages it creates)
    storage_owner: dict[int, str]  # storage id -> the node that created it
    # -- annotate
    device: Any  # hardware.Device: the kernels, and so what is saved
    unsupported_ops: dict[str, int]  # a Counter of the op names without a rule
    saved_storages: dict[int, int]  # storage -> bytes of every saved activation
    storage_alias: dict[int, int]  # storage -> the storage it really is (a free copy)


NODE_TYPES = (ParamNode, BufferNode, InputNode, OpNode)
NODE_ATTRIBUTES = frozenset(k for t in NODE_TYPES for k in t.__required_keys__ | t.__optional_keys__)
GRAPH_ATTRIBUTES = GraphAttributes.__required_keys__ | GraphAttributes.__optional_keys__
ANNOTATE_WRITES = ("cost", "runs_backward", "forward_flops", "backward_flops", "saved",
                   "weight_bytes", "bytes_read", "bytes_written", "device", "unsupported_ops",
                   "saved_storages", "storage_alias")
WRITTEN_BY: dict[str, str] = {
    **{k: "build_graph" for k in NODE_ATTRIBUTES | GRAPH_ATTRIBUTES},
    **{k: "annotate" for k in ANNOTATE_WRITES},
    "block_template": "analyze",
    "retrace_template": "sizing.retrace.graph_at",
}


__all__ = ["ANNOTATE_WRITES", "BufferNode", "Expanded", "GRAPH_ATTRIBUTES", "GraphAttributes",
           "InputNode", "NODE_ATTRIBUTES", "NODE_TYPES", "OpNode", "ParamNode", "PlaceholderNode",
           "Retraced", "WRITTEN_BY"]
