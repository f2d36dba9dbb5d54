"""Checkpoint regions the model's own forward makes: `torch.utils.checkpoint.checkpoint` called
inside it, directly, through `checkpoint_sequential`, transformers' `gradient_checkpointing_enable`
or FSDP's `checkpoint_wrapper`.

torch.export (non-strict) runs the checkpointed function like any other code and records its ops
with no trace of the checkpoint. While a model is exported, `recording_checkpoints` watches the
two ways a checkpoint starts, whatever name the model imported it under:

- non-reentrant (`use_reentrant=False`): `checkpoint` drives the generator that enters the
  saved-tensor hooks around the function; its arguments say whether the recomputation stops
  early and whether a selective-checkpoint context was given;
- reentrant (`use_reentrant=True`): `CheckpointFunction.apply`, which exports badly (a no-grad
  region the trace cannot differentiate); while recording, the function runs as it is, and the
  region is marked as recomputing everything (reentrant checkpoints have no early stop).

It notes the last graph node before each region and the region's last node; `tag_regions` then
writes `node.meta["custom"]["graphcost_checkpoint"]` (a region number) on the ops of each
outermost region, which torch.export's later passes (run_decompositions) keep. A checkpoint
nested in another is part of the outer one. A selective checkpoint context (`context_fn`) is
noted: its policy runs on ATen ops graphcost does not see, so the region is costed as a full
checkpoint and `CheckpointCall.selective` says so.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.utils.checkpoint as torch_checkpoint

from graphcost.trace.lifetimes import last_traced_node

META_KEY = "graphcost_checkpoint"


@dataclass(frozen=True)
class CheckpointTag:
    """On each op of a checkpoint region of the model's own forward (graph attribute
    `checkpoint`): which region, and how torch.utils.checkpoint runs it."""

    region: str  # unique per region in the graph
    early_stop: bool
    reentrant: bool
    selective: bool
    # the nodes of the tensors passed to checkpoint as positional arguments: what its frame
    # saves through autograd (keyword arguments and closures are held, not saved); None: unknown
    inputs: tuple[str, ...] | None = None


@dataclass(frozen=True)
class CheckpointCall:
    """One checkpoint call the forward made: its ops are those after node `after` up to and
    including node `last` of the traced graph."""

    after: str | None  # the last node before the region (None: it starts the graph)
    last: str | None  # the region's last node (None or == after: it made no node)
    early_stop: bool  # the recomputation stops once every saved tensor is back
    reentrant: bool
    selective: bool  # a context_fn (selective checkpoint policy) was given
    depth: int  # 0 for an outermost region
    inputs: tuple[str, ...] | None = None  # nodes of its positional tensor arguments


def _nodes_of(values) -> tuple[str, ...] | None:
    """The traced nodes of the tensors among `values` (None: one cannot be found)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot

    mode = get_proxy_mode()
    if mode is None:
        return None
    names = []
    for v in values:
        if isinstance(v, torch.Tensor):
            proxy = get_proxy_slot(v, mode.tracer, None)
            node = getattr(getattr(proxy, "proxy", None), "node", None)
            if node is None:
                return None
            names.append(node.name)
    return tuple(names)


@contextlib.contextmanager
def recording_checkpoints() -> Iterator[list[CheckpointCall]]:
    """Record the checkpoint calls of the forward exported inside the block."""
    calls: list[CheckpointCall] = []
    depth = [0]
    generator = torch_checkpoint._checkpoint_without_reentrant_generator
    function = torch_checkpoint.CheckpointFunction
    own_apply = function.__dict__.get("apply")  # None: inherited from autograd.Function

    def without_reentrant(fn, preserve_rng_state, context_fn, *args, **kwargs):
        if not torch.is_grad_enabled():  # checkpoint does nothing then: no region
            yield from generator(fn, preserve_rng_state, context_fn, *args, **kwargs)
            return
        early_stop = torch_checkpoint._enable_checkpoint_early_stop
        if early_stop is None:
            early_stop = args[2] if len(args) > 2 and isinstance(args[2], bool) else True
        selective = context_fn is not torch_checkpoint.noop_context_fn
        inputs = _nodes_of(args[3:])  # after determinism_check, debug, early_stop
        after = last_traced_node()
        depth[0] += 1
        try:
            yield from generator(fn, preserve_rng_state, context_fn, *args, **kwargs)
        finally:
            depth[0] -= 1
            calls.append(CheckpointCall(after, last_traced_node(), early_stop, False, selective,
                                        depth[0], inputs))

    def apply(run_function, preserve_rng_state, *args):
        inputs = _nodes_of(args)
        after = last_traced_node()
        depth[0] += 1
        try:
            return run_function(*args)
        finally:
            depth[0] -= 1
            calls.append(CheckpointCall(after, last_traced_node(), False, True, False, depth[0],
                                        inputs))

    torch_checkpoint._checkpoint_without_reentrant_generator = without_reentrant
    function.apply = staticmethod(apply)
    try:
        yield calls
    finally:
        torch_checkpoint._checkpoint_without_reentrant_generator = generator
        if own_apply is None:
            del function.apply
        else:
            function.apply = own_apply


def tag_regions(graph: torch.fx.Graph, calls: list[CheckpointCall]) -> dict[int, CheckpointCall]:
    """Write the region number on the ops of each outermost checkpoint region of `graph` (see
    the module docstring); {region number: its call}. Regions that made no op are dropped."""
    position = {node.name: i for i, node in enumerate(graph.nodes)}
    nodes = list(graph.nodes)
    regions: dict[int, CheckpointCall] = {}
    outermost = sorted((c for c in calls if c.depth == 0 and c.last is not None
                        and c.last != c.after),
                       key=lambda c: position.get(c.last, -1))
    for call in outermost:
        if call.last not in position or (call.after is not None and call.after not in position):
            warnings.warn("graphcost: a checkpoint region of the model's own forward could not "
                          f"be located in the exported graph (it ends at node {call.last}); it "
                          "is costed as if not checkpointed", stacklevel=2)
            continue
        start = position[call.after] + 1 if call.after is not None else 0
        number = len(regions)
        tagged = False
        info = {"region": number, "early_stop": call.early_stop, "reentrant": call.reentrant,
                "selective": call.selective, "inputs": call.inputs}
        for node in nodes[start:position[call.last] + 1]:
            if node.op == "call_function":
                node.meta.setdefault("custom", {})[META_KEY] = dict(info)
                tagged = True
        if tagged:
            regions[number] = call
    selective = [c for c in regions.values() if c.selective]
    if selective:
        warnings.warn(f"graphcost: {len(selective)} checkpoint region(s) of the model's own "
                      "forward use a selective checkpoint context (context_fn); graphcost costs "
                      "them as full checkpoints (everything in the region recomputed), so its "
                      "saved bytes can be lower and its recomputation higher than the real run's",
                      stacklevel=2)
    return regions


def region_of(node: torch.fx.Node) -> CheckpointTag | None:
    """The checkpoint region `tag_regions` marked `node` with, or None outside any."""
    info = (node.meta.get("custom") or {}).get(META_KEY)
    if info is None:
        return None
    inputs = info.get("inputs")
    return CheckpointTag(str(info["region"]), bool(info["early_stop"]), bool(info["reentrant"]),
                         bool(info["selective"]), tuple(inputs) if inputs is not None else None)


def has_regions(graph: torch.fx.Graph) -> bool:
    """Does `graph` have an op `tag_regions` marked?"""
    return any(region_of(node) is not None for node in graph.nodes)
