"""A training step under torch.compile (Inductor): what its partitioner keeps for backward, and
what the backward computes again.

Eager autograd keeps what each op's backward formula needs. Compiled, Inductor's partitioner
splits the joint forward-backward graph by a min-cut: it keeps fewer tensors and recomputes
cheap ops (pointwise chains, views) in the backward. graphcost does not model that: it asks
PyTorch. `compiled_step` runs aot_autograd on the module called on fake CPU tensors, with
Inductor's decompositions and Inductor's own `partition_fn` (its joint-graph passes, then
`min_cut_rematerialization_partition(compiler="inductor")`): the graphs a real
`torch.compile(model)` hands Inductor's code generator, without generating code.

- saved: the forward graph's outputs beyond the model's, one per storage, less those that are
  the graph's inputs or views of them (parameters, the model's inputs);
- recomputed: the backward graph's ops that read no incoming gradient (forward ops run again);
  their FLOPs are counted with FlopCounterMode's formulas (pointwise chains have none: Inductor
  fuses them into the backward's kernels, so they make no tensors either).

A stack of identical blocks (graphcost/trace/blocks.py) is partitioned with its first one, two
and three blocks; when the second and third add the same, the rest add it too (the partition of
one block does not depend on the others'), else the whole model is partitioned.

NB: the backward is that of the sum of the model's floating outputs (the loss taken outside the
compiled module), as graphcost's eager walk and the measurements take it. Only the CPU's
kernels are partitioned (fake CPU tensors); graph breaks are not modelled: a model torch.compile
would split is traced whole here (an error if it cannot be).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from graphcost.errors import TraceError
from graphcost.rules.registry import TensorSpec
from graphcost.trace.blocks import find_repeated_blocks, first_blocks

# the graph attributes it reads (graphcost/graph/schema.py): none, it partitions the module
READS: tuple[str, ...] = ()

TANGENT_PREFIX = "tangents_"  # aot_autograd's name for the backward's incoming gradients


@dataclass(frozen=True)
class CompiledStep:
    """One compiled training step's forward and backward graphs, as Inductor partitions them."""

    saved: tuple[TensorSpec, ...]  # the activations the forward keeps for backward
    saved_activation_bytes: int
    recompute_flops: int  # the forward ops the backward runs again: their FLOPs
    recomputed_ops: int  # how many (Inductor fuses them into its backward kernels)
    blocks: int | None = None  # a stack's length when derived from its first blocks

    def totals(self) -> tuple[int, int, int]:
        return self.saved_activation_bytes, self.recompute_flops, self.recomputed_ops

    def plus(self, other: CompiledStep, times: int = 1) -> CompiledStep:
        return CompiledStep(self.saved + other.saved * times,
                            *(a + b * times for a, b in zip(self.totals(), other.totals())))

    def minus(self, other: CompiledStep) -> CompiledStep:
        """What `self` has beyond `other` (a stack one block longer; saved: by shape and
        dtype, the forward graph orders them its own way). ValueError: `other` keeps a tensor
        `self` does not."""
        extra = list(self.saved)
        for spec in other.saved:
            extra.remove(spec)
        return CompiledStep(tuple(extra),
                            *(a - b for a, b in zip(self.totals(), other.totals())))


def compiled_step(module: nn.Module, example_inputs: tuple, *,
                  kwargs: dict | None = None) -> CompiledStep:
    """The compiled training step of `module(*example_inputs, **kwargs)` (see the module
    docstring). The module may live on the meta device; nothing is allocated."""
    blocks = find_repeated_blocks(module)
    if blocks is not None and blocks.count > 3:
        steps = []
        for count in (1, 2, 3):
            with first_blocks(module, blocks, count):
                steps.append(_partition(module, example_inputs, kwargs or {}))
        try:
            first, second = steps[1].minus(steps[0]), steps[2].minus(steps[1])
        except ValueError:  # a longer stack does not keep what a shorter one does
            first = second = None
        if first is not None and first.totals() == second.totals() and \
                _kinds(first) == _kinds(second):
            whole = steps[2].plus(second, blocks.count - 3)
            return CompiledStep(whole.saved, *whole.totals(), blocks=blocks.count)
    return _partition(module, example_inputs, kwargs or {})


def _kinds(step: CompiledStep) -> list[tuple]:
    return sorted((s.shape, str(s.dtype)) for s in step.saved)


def _partition(module: nn.Module, example_inputs: tuple, kwargs: dict) -> CompiledStep:
    import torch._inductor.compile_fx as inductor
    from torch._functorch.aot_autograd import aot_function
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    graphs: dict[str, tuple[torch.fx.GraphModule, list]] = {}

    def keep(kind: str):
        def compiler(gm: torch.fx.GraphModule, inputs: list):
            graphs[kind] = (gm, list(inputs))
            return gm.forward
        return compiler

    def fake(t: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
        with mode:
            x = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
        return x.requires_grad_() if requires_grad else x

    params = {n: fake(p, p.requires_grad) for n, p in module.named_parameters()}
    buffers = {n: fake(b) for n, b in module.named_buffers()}
    leaves, spec = torch.utils._pytree.tree_flatten((tuple(example_inputs), kwargs))
    leaves = [fake(x, x.requires_grad) if isinstance(x, torch.Tensor) else x for x in leaves]

    def run(params, buffers, *flat):
        args, kw = torch.utils._pytree.tree_unflatten(list(flat), spec)
        out = torch.func.functional_call(module, {**params, **buffers}, args, kw)
        return tuple(t for t in torch.utils._pytree.tree_leaves(out)
                     if isinstance(t, torch.Tensor) and t.requires_grad)

    traced = aot_function(run, fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                          partition_fn=inductor.partition_fn,
                          decompositions=select_decomp_table())
    try:
        with mode, warnings.catch_warnings():  # torch's, about its own tracing
            warnings.simplefilter("ignore")
            outs = traced(params, buffers, *leaves)
            if not outs:
                raise TraceError("nothing to train: no output of the model needs a gradient")
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    except TraceError:
        raise
    except Exception as exc:  # re-raised with what to do
        raise TraceError(f"cannot partition the model as torch.compile would: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    forward, _ = graphs["forward"]
    backward, _ = graphs["backward"]
    saved = _saved(forward, len(outs))
    recomputed = _recomputed(backward)
    return CompiledStep(
        saved=tuple(TensorSpec(tuple(t.shape), t.dtype) for t in saved),
        saved_activation_bytes=sum(t.untyped_storage().nbytes() for t in saved),
        recompute_flops=sum(_node_flops(n) for n in recomputed),
        recomputed_ops=len(recomputed))


def _saved(forward: torch.fx.GraphModule, user_outputs: int) -> list[torch.Tensor]:
    """The tensors the forward graph returns for backward, one per storage, less the graph's
    inputs and views of them."""
    inputs = {StorageWeakRef(n.meta["val"].untyped_storage())
              for n in forward.graph.nodes
              if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)}
    [output] = [n for n in forward.graph.nodes if n.op == "output"]
    seen, saved = set(inputs), []
    for node in output.args[0][user_outputs:]:
        value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if not isinstance(value, torch.Tensor):
            continue  # a SymInt the backward needs
        ref = StorageWeakRef(value.untyped_storage())
        if ref not in seen:
            seen.add(ref)
            saved.append(value)
    return saved


def _recomputed(backward: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The backward's ops computed from what the forward saved alone: none of their inputs is
    an incoming gradient or a tensor the backward makes from nothing (the zeros an embedding's
    gradient is scattered into), directly or through other ops."""
    backward_only: set[torch.fx.Node] = set()
    recomputed = []
    for node in backward.graph.nodes:
        if node.op == "placeholder":
            if node.name.startswith(TANGENT_PREFIX):
                backward_only.add(node)
        elif node.op == "call_function":
            inputs = node.all_input_nodes
            if not inputs or any(a in backward_only for a in inputs):
                backward_only.add(node)
            else:
                recomputed.append(node)
    return recomputed


def _node_flops(node: torch.fx.Node) -> int:
    """FlopCounterMode's formula for one traced op, on its recorded fake values."""
    from torch.utils.flop_counter import flop_registry

    packet = getattr(node.target, "overloadpacket", None)
    if packet not in flop_registry:
        return 0

    def value(x):
        return x.meta.get("val") if isinstance(x, torch.fx.Node) else x

    args = torch.fx.node.map_aggregate(node.args, value)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, value)
    return int(flop_registry[packet](*args, **kwargs, out_val=node.meta.get("val")))


__all__ = ["CompiledStep", "compiled_step"]
