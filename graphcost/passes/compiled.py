"""A training step under torch.compile (Inductor): what its partitioner keeps for backward, what
the backward computes again, and the most its forward and backward hold.

Eager autograd keeps what each op's backward formula needs. Compiled, Inductor's partitioner
splits the joint forward-backward graph by a min-cut: it keeps fewer tensors and recomputes
cheap ops (pointwise chains, views) in the backward. graphcost does not model that: it asks
PyTorch. `compiled_step` runs aot_autograd on the module called on fake CPU tensors, with
Inductor's decompositions and Inductor's own `partition_fn` (its joint-graph passes, then
`min_cut_rematerialization_partition(compiler="inductor")`): the graphs a real
`torch.compile(model)` hands Inductor's code generator.

- saved: the forward graph's outputs beyond the model's, one per storage, less those that are
  the graph's inputs or views of them (parameters, the model's inputs);
- peak (asked for): the most the forward and backward hold above the step's start, replayed
  from the memory lines of the code Inductor generates for each graph (its lowering, scheduler
  and wrapper, run on the fake inputs; no kernel is compiled): buffers allocated, reused and
  deleted as the generated code does. NB: a fallback kernel's own temporaries (the CPU flash
  attention backward's) are not seen;
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

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from graphcost.errors import TraceError
from graphcost.rules.registry import TensorSpec
from graphcost.trace.blocks import find_repeated_blocks, first_blocks
from graphcost.trace.fake_kernels import shape_only_kernels
from graphcost.trace.masks import eager_mask_branches
from graphcost.trace.outputs import output_tensors

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
    # the most the forward and backward hold above the step's start (its parameters, inputs
    # and optimizer state), from the buffers Inductor's generated code allocates and frees
    # (None: not asked for, or Inductor's code generation failed here)
    peak_bytes: int | None = None
    blocks: int | None = None  # a stack's length when derived from its first blocks

    def totals(self) -> tuple:
        return (self.saved_activation_bytes, self.recompute_flops, self.recomputed_ops,
                self.peak_bytes)

    def plus(self, other: CompiledStep, times: int = 1) -> CompiledStep:
        return CompiledStep(self.saved + other.saved * times,
                            *(None if a is None or b is None else a + b * times
                              for a, b in zip(self.totals(), other.totals())))

    def minus(self, other: CompiledStep) -> CompiledStep:
        """What `self` has beyond `other` (a stack one block longer; saved: by shape and
        dtype, the forward graph orders them its own way). ValueError: `other` keeps a tensor
        `self` does not."""
        extra = list(self.saved)
        for spec in other.saved:
            extra.remove(spec)
        return CompiledStep(tuple(extra),
                            *(None if a is None or b is None else a - b
                              for a, b in zip(self.totals(), other.totals())))


def compiled_step(module: nn.Module, example_inputs: tuple, *, kwargs: dict | None = None,
                  peak: bool = False) -> CompiledStep:
    """The compiled training step of `module(*example_inputs, **kwargs)` (see the module
    docstring); with `peak`, also its forward and backward peak (Inductor generates the code of
    each graph, without compiling it: seconds a graph). The module may live on the meta device;
    nothing is allocated."""
    blocks = find_repeated_blocks(module)
    if blocks is not None and blocks.count > 3:
        steps = []
        for count in (1, 2, 3):
            with first_blocks(module, blocks, count):
                steps.append(_partition(module, example_inputs, kwargs or {}, peak))
        try:
            first, second = steps[1].minus(steps[0]), steps[2].minus(steps[1])
        except ValueError:  # a longer stack does not keep what a shorter one does
            first = second = None
        if first is not None and first.totals() == second.totals() and \
                _kinds(first) == _kinds(second):
            whole = steps[2].plus(second, blocks.count - 3)
            return CompiledStep(whole.saved, *whole.totals(), blocks=blocks.count)
    return _partition(module, example_inputs, kwargs or {}, peak)


@contextlib.contextmanager
def _compiling() -> Iterator[None]:
    """`torch.compiler.is_compiling()` is True inside the block, as it is while dynamo traces:
    libraries take their compile branches (transformers' masks and caches)."""
    original = torch.compiler.is_compiling
    torch.compiler.is_compiling = lambda: True
    try:
        yield
    finally:
        torch.compiler.is_compiling = original


def _kinds(step: CompiledStep) -> list[tuple]:
    return sorted((s.shape, str(s.dtype)) for s in step.saved)


def _partition(module: nn.Module, example_inputs: tuple, kwargs: dict,
               peak: bool = False) -> CompiledStep:
    import torch._inductor.compile_fx as inductor
    from torch._functorch.aot_autograd import aot_function
    from torch._inductor.debug import DebugContext
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.virtualized import V
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
        return tuple(t for t in output_tensors(out) if t.requires_grad)

    traced = aot_function(run, fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                          partition_fn=inductor.partition_fn,
                          decompositions=select_decomp_table())
    try:
        # as graphcost's export runs the model: transformers' mask code takes eager's branches,
        # ctc_loss runs a shape-only kernel (graphcost/trace/masks.py, fake_kernels.py)
        with mode, V.set_fake_mode(mode), warnings.catch_warnings(), DebugContext(), \
                eager_mask_branches(), shape_only_kernels(), _compiling():
            warnings.simplefilter("ignore")  # torch's, about its own tracing
            outs = traced(params, buffers, *leaves)
            if not outs:
                raise TraceError(
                    "no output of the model needs a gradient as traced for torch.compile: "
                    "nothing to train. A loss torch.compile would leave out of its graph (a "
                    "graph break: F.ctc_loss, which cannot run on fake tensors) ends the "
                    "traced graph before it; graph breaks are not modelled yet")
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    except TraceError:
        raise
    except Exception as exc:  # re-raised with what to do
        raise TraceError(f"cannot partition the model as torch.compile would: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    forward, forward_inputs = graphs["forward"]
    backward, backward_inputs = graphs["backward"]
    saved = _saved(forward, len(outs))
    recomputed = _recomputed(backward)
    return CompiledStep(
        saved=tuple(TensorSpec(tuple(t.shape), t.dtype) for t in saved.values()),
        saved_activation_bytes=sum(t.untyped_storage().nbytes() for t in saved.values()),
        recompute_flops=sum(_node_flops(n) for n in recomputed),
        recomputed_ops=len(recomputed),
        peak_bytes=_step_peak(forward, forward_inputs, backward, backward_inputs, outs, mode)
        if peak else None)


def _saved(forward: torch.fx.GraphModule, user_outputs: int) -> dict[str, torch.Tensor]:
    """{node name: tensor} of what the forward graph returns for backward, one per storage,
    less the graph's inputs and views of them."""
    inputs = {StorageWeakRef(n.meta["val"].untyped_storage())
              for n in forward.graph.nodes
              if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)}
    [output] = [n for n in forward.graph.nodes if n.op == "output"]
    seen, saved = set(inputs), {}
    for node in output.args[0][user_outputs:]:
        value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if not isinstance(value, torch.Tensor):
            continue  # a SymInt the backward needs
        ref = StorageWeakRef(value.untyped_storage())
        if ref not in seen:
            seen.add(ref)
            saved[node.name] = value
    return saved


def _step_peak(forward: torch.fx.GraphModule, forward_inputs: list,
               backward: torch.fx.GraphModule, backward_inputs: list, outputs: tuple,
               mode) -> int | None:
    """The most a compiled forward and backward hold above the step's start: the forward
    graph's buffers at their fullest, or, in the backward, what the forward left (the model's
    outputs and the saved activations), the loss and its gradient (a scalar each), the incoming
    gradients made contiguous, beside the backward graph's own buffers, which free the saved
    activations and the incoming gradients where its code deletes them (not the parameters and
    their views: the module holds them)."""
    # the backward's inputs it may free, by storage: the forward's saved outputs that are not
    # its inputs' (several names can be views of one), and the incoming gradients
    inputs = {StorageWeakRef(n.meta["val"].untyped_storage())
              for n in forward.graph.nodes
              if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)}
    [output] = [n for n in forward.graph.nodes if n.op == "output"]
    storages: dict[str, tuple[object, int]] = {}
    for node in output.args[0][len(outputs):]:
        value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if isinstance(value, torch.Tensor):
            ref = StorageWeakRef(value.untyped_storage())
            if ref not in inputs:
                storages[node.name] = (ref, value.untyped_storage().nbytes())
    tangents = [n for n in backward.graph.nodes
                if n.op == "placeholder" and n.name.startswith(TANGENT_PREFIX)]
    for n in tangents:
        storages[n.name] = (n.name, n.meta["val"].untyped_storage().nbytes())
    try:
        forward_peak, forward_end = _code_peak(forward, forward_inputs, {}, mode,
                                               backward=False)
        backward_peak, _ = _code_peak(backward, backward_inputs, storages, mode,
                                      backward=True)
    except Exception:  # torch's internal code generator: no figure rather than a wrong one
        return None
    start = forward_end + sum(2 * o.dtype.itemsize for o in outputs) + sum(
        n.meta["val"].untyped_storage().nbytes() for n in tangents)
    return max(forward_peak, start + backward_peak)


def _code_peak(gm: torch.fx.GraphModule, inputs: list, freeable: dict[str, tuple[object, int]],
               mode, *, backward: bool) -> tuple[int, int]:
    """(most, last) bytes the code Inductor generates for `gm` holds beyond its inputs: it
    lowers and schedules the graph on the fake inputs and writes its wrapper, without compiling
    a kernel, and the wrapper's memory lines are replayed: each buffer from its allocation (or
    a fallback kernel's outputs from its call) to its deletion, a reused one passed on. The
    inputs in `freeable` ({name: (storage, bytes)}) are freed where the code deletes the last
    name of their storage."""
    from torch._inductor import ir
    from torch._inductor.codegen import wrapper
    from torch._inductor.debug import DebugContext
    from torch._inductor.graph import GraphLowering
    from torch._inductor.virtualized import V

    def nbytes(node) -> int:
        layout = getattr(node, "layout", None)
        if layout is None or isinstance(layout, ir.MultiOutputLayout):
            return 0  # a fallback kernel's tuple: its outputs are counted
        return int(layout.storage_size()) * layout.dtype.itemsize

    with V.set_fake_mode(mode), DebugContext(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = GraphLowering(gm, example_inputs=inputs, is_inference=False,
                              is_backward=backward)
        with V.set_graph_handler(graph):
            graph.run(*inputs)
            graph.codegen()
            names: dict[object, int] = {}  # freeable input storage -> its names not deleted
            for storage, _ in freeable.values():
                names[storage] = names.get(storage, 0) + 1
            alive: dict[str, int] = {}
            live = peak = 0
            for line in graph.wrapper_code.lines:
                if isinstance(line, (wrapper.AllocateLine, wrapper.ExternKernelAllocLine)):
                    name = line.node.get_name()
                    alive[name] = nbytes(line.node)
                    live += alive[name]
                elif isinstance(line, wrapper.MultiOutputLine):
                    buffer = graph.try_get_buffer(line.result_name)
                    if buffer is not None and line.result_name not in alive:
                        alive[line.result_name] = nbytes(buffer)
                        live += alive[line.result_name]
                elif isinstance(line, wrapper.ReuseLine):
                    old, new = line.node.get_name(), line.reused_as.get_name()
                    alive[new] = alive.pop(old, 0) if line.delete_old else alive.get(old, 0)
                elif isinstance(line, (wrapper.FreeLine, wrapper.FreeIfNotReusedLine)):
                    if getattr(line, "is_reused", False):
                        continue
                    name = line.node.get_name()
                    live -= alive.pop(name, 0)
                    if name in freeable:
                        storage, size = freeable.pop(name)
                        names[storage] -= 1
                        live -= size if names[storage] == 0 else 0
                peak = max(peak, live)
    return peak, live


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
