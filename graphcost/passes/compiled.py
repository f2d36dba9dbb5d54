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
- memory and kernels (asked for, `peak=True`): what the forward and backward hold above the
  step's start, by category, and their kernels, from the code Inductor generates for each graph
  (graphcost.passes.inductor_code);
- recomputed: the backward graph's ops that read no incoming gradient (forward ops run again);
  their FLOPs are counted with FlopCounterMode's formulas (pointwise chains have none: Inductor
  fuses them into the backward's kernels, so they make no tensors either).

A stack of identical blocks (graphcost/trace/blocks.py) is partitioned with its first blocks:
when the third adds what the second adds, the rest add it too; where alternate blocks differ
(Inductor fuses and reuses buffers by parity), up to six are partitioned and the stack derived
two blocks at a time (`_derived`); else the whole model is partitioned.

NB: the backward is that of the sum of the model's floating outputs (the loss taken outside the
compiled module), as graphcost's eager walk and the measurements take it. Only the CPU's
kernels are partitioned (fake CPU tensors). A model torch.compile would split is traced whole
here (an error if it cannot be); its graph breaks are named (graphcost/passes/graph_breaks.py).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from graphcost.errors import TraceError
from graphcost.passes.checkpoint.apply import checkpointed
from graphcost.passes.checkpoint.policy import Plan, parse_policy
from graphcost.passes.checkpoint_tags import checkpoints_as_tags
from graphcost.passes.graph_breaks import UnknownBreaks, graph_breaks
from graphcost.passes.inductor_code import (
    HELD,
    TANGENT_PREFIX,
    Held,
    Kernels,
    kept_for_backward,
    node_flops,
    step_held,
)
from graphcost.rules.registry import TensorSpec
from graphcost.trace.blocks import find_repeated_blocks, first_blocks
from graphcost.trace.fake_kernels import shape_only_kernels
from graphcost.trace.masks import eager_mask_branches
from graphcost.trace.outputs import output_tensors

# the graph attributes it reads (graphcost/graph/schema.py): none, it partitions the module
READS: tuple[str, ...] = ()

# a stack is derived from its first 3 blocks, or up to this many where the first add other
# bytes than the next (a short stack's peak sits elsewhere, or alternates between odd and
# even lengths)
MAX_SAMPLE_BLOCKS = 6


@dataclass(frozen=True)
class KernelSample:
    """The kernels of the code Inductor generates for a program with `blocks` blocks of the
    model's stack (None: the whole model)."""

    blocks: int | None
    forward: Kernels
    backward: Kernels


@dataclass(frozen=True)
class CompiledStep:
    """One compiled training step's forward and backward graphs, as Inductor partitions them."""

    # the activations the forward keeps for backward: as the code Inductor generates keeps them
    # (with the memory: its layouts, a convolution's inputs and weights made channels-last), or
    # as the partitioned graph says
    saved: tuple[TensorSpec, ...]
    saved_activation_bytes: int
    recompute_flops: int  # the forward ops the backward runs again: their FLOPs
    recomputed_ops: int  # how many (Inductor fuses them into its backward kernels)
    # what the forward and the backward hold above the step's start (its parameters, inputs,
    # gradients and optimizer state) at their fullest and at their end, from the buffers
    # Inductor's generated code allocates and frees (None: not asked for, or Inductor's code
    # generation failed here); the backward's include what the forward left
    forward_peak: Held | None = None
    forward_end: Held | None = None
    backward_peak: Held | None = None
    backward_end: Held | None = None
    blocks: int | None = None  # a stack's length when derived from its first blocks
    # where torch.compile would split the model (passes/graph_breaks.py; it is partitioned as
    # one graph all the same); None: not known, dynamo could not run it on fake tensors
    graph_breaks: tuple[str, ...] | None = ()
    # the kernels of the generated code of the forward and the backward (with the peak): of
    # the whole model, or of its first blocks (`kernel_seconds` extrapolates them)
    kernels: tuple[KernelSample, ...] = ()

    @property
    def peak_bytes(self) -> int | None:
        """The most the forward and backward hold above the step's start."""
        if self.forward_peak is None or self.backward_peak is None:
            return None
        return max(self.forward_peak.total_bytes, self.backward_peak.total_bytes)

    def to_dict(self) -> dict:
        held = {name: None if h is None else {**{c: getattr(h, c) for c in HELD}, "op": h.op}
                for name, h in (("forward_peak", self.forward_peak),
                                ("forward_end", self.forward_end),
                                ("backward_peak", self.backward_peak),
                                ("backward_end", self.backward_end))}
        return {"saved_activation_bytes": self.saved_activation_bytes,
                "saved_tensors": len(self.saved), "recompute_flops": self.recompute_flops,
                "recomputed_ops": self.recomputed_ops,
                "forward_backward_peak_bytes": self.peak_bytes,
                "graph_breaks": None if self.graph_breaks is None else list(self.graph_breaks),
                **held}

    def totals(self) -> tuple:
        held = (self.forward_peak, self.forward_end, self.backward_peak, self.backward_end)
        return (self.saved_activation_bytes, self.recompute_flops, self.recomputed_ops,
                *(x for h in held for x in (h.numbers() if h is not None else (None,) * 3)))

    def _with(self, saved: tuple, numbers: list) -> CompiledStep:
        held = []
        for i, h in enumerate((self.forward_peak, self.forward_end, self.backward_peak,
                               self.backward_end)):
            part = numbers[3 + 3 * i: 6 + 3 * i]
            held.append(None if h is None or None in part else Held(*part, op=h.op))
        return CompiledStep(saved, *numbers[:3], *held, blocks=self.blocks)

    def plus(self, other: CompiledStep, times: int = 1) -> CompiledStep:
        return self._with(self.saved + other.saved * times,
                          [None if a is None or b is None else a + b * times
                           for a, b in zip(self.totals(), other.totals())])

    def minus(self, other: CompiledStep) -> CompiledStep:
        """What `self` has beyond `other` (a stack one block longer; saved: by shape and
        dtype, the forward graph orders them its own way). ValueError: `other` keeps a tensor
        `self` does not."""
        extra = list(self.saved)
        for spec in other.saved:
            extra.remove(spec)
        return self._with(tuple(extra), [None if a is None or b is None else a - b
                                         for a, b in zip(self.totals(), other.totals())])


def compiled_step(module: nn.Module, example_inputs: tuple, *, kwargs: dict | None = None,
                  peak: bool = False, autocast: torch.dtype | None = None,
                  checkpoint: Plan | None = None) -> CompiledStep:
    """The compiled training step of `module(*example_inputs, **kwargs)` (see the module
    docstring); with `peak`, also its forward and backward peak (Inductor generates the code of
    each graph, without compiling it: seconds a graph). The module may live on the meta device;
    nothing is allocated. The inputs may be tensors or TensorSpecs, one or a tuple. With
    `autocast`, the forward runs under torch.autocast(dtype=autocast), as the compiled model
    called in that context does (dynamo traces the autocast region into the graph). With
    `checkpoint` (a plan of graphcost.passes.checkpoint.policy), its regions are checkpointed
    as torch.utils.checkpoint would run them under torch.compile (passes/checkpoint_tags.py):
    the partitioner recomputes them. The model's own checkpoint calls are traced so always."""
    if isinstance(example_inputs, (torch.Tensor, TensorSpec)):
        example_inputs = (example_inputs,)
    example_inputs = tuple(torch.empty(x.shape, dtype=x.dtype, device="meta")
                           if isinstance(x, TensorSpec) else x for x in example_inputs)
    breaks = _breaks(module, example_inputs, kwargs)
    applied = checkpoint is not None and parse_policy(checkpoint.policy).kind not in \
        ("none", "model")  # "model": the model's own calls, traced as they are
    # a region over several blocks (sqrt's segments) runs blocks a shortened stack lacks
    derive = not applied or all(len(r.modules) <= 1 for r in checkpoint.regions)
    with checkpointed(module, checkpoint) if applied else contextlib.nullcontext():
        step = _step(module, example_inputs, kwargs, peak, autocast, derive)
    return replace(step, graph_breaks=breaks)


def _breaks(module: nn.Module, example_inputs: tuple, kwargs: dict | None
            ) -> tuple[str, ...] | None:
    """The model's graph breaks, and a warning that names them (or says none are known)."""
    name = type(module).__name__
    try:
        breaks = graph_breaks(module, example_inputs, kwargs)
    except UnknownBreaks as exc:
        warnings.warn(f"graphcost: cannot tell where torch.compile would break {name} into "
                      f"several graphs (dynamo cannot run it on fake tensors: {exc}); it is "
                      "partitioned as one graph", stacklevel=3)
        return None
    if breaks:
        warnings.warn(f"graphcost: torch.compile would break {name} into several graphs "
                      f"({len(breaks)} graph break(s): {'; '.join(breaks)}); it is partitioned "
                      "as one graph, so what is kept and held around the breaks is "
                      "approximate (docs/compile.md)", stacklevel=3)
    return breaks


def _step(module: nn.Module, example_inputs: tuple, kwargs: dict | None, peak: bool,
          autocast: torch.dtype | None, derive: bool = True) -> CompiledStep:
    blocks = find_repeated_blocks(module) if derive else None
    if blocks is not None and blocks.count > 3:
        samples: dict[int, CompiledStep] = {}
        for count in range(1, min(blocks.count - 1, MAX_SAMPLE_BLOCKS) + 1):
            if sum(samples) + count > blocks.count and count > 3:
                break  # the whole stack costs less than more samples
            with first_blocks(module, blocks, count):
                samples[count] = _partition(module, example_inputs, kwargs or {}, peak,
                                            autocast)
            derived = _derived(samples, count, blocks.count)
            if derived is not None:
                return derived
    return _partition(module, example_inputs, kwargs or {}, peak, autocast)


def _derived(samples: dict[int, CompiledStep], last: int, blocks: int) -> CompiledStep | None:
    """The whole stack of `blocks` blocks from the programs of its first blocks, where they
    show what each block adds: the same as the one before (period 1), or the same as two
    blocks before (period 2: Inductor may fuse and reuse alternate blocks' buffers
    differently, so a stack's peak alternates between odd and even lengths)."""
    for period in (1, 2):
        low = last - 2 * period
        if low < 1 or (period == 2 and (blocks - last) % 2):
            continue
        one, two, three = samples[low], samples[last - period], samples[last]
        if not _adds_the_same(one, two, three):
            continue
        whole = three.plus(three.minus(two), (blocks - last) // period)
        kernels = tuple(KernelSample(n, samples[n].kernels[0].forward,
                                     samples[n].kernels[0].backward)
                        for n in (low, last) if samples[n].kernels)
        return replace(whole, blocks=blocks, kernels=kernels)
    return None


def _adds_the_same(one: CompiledStep, two: CompiledStep, three: CompiledStep) -> bool:
    """Whether the third of three stacks, each longer by as many blocks, adds what the second
    adds: the same tensors saved, the same bytes held at the peaks and ends."""
    try:
        first, second = two.minus(one), three.minus(two)
    except ValueError:  # a longer stack does not keep what a shorter one does
        return False
    return first.totals() == second.totals() and _kinds(first) == _kinds(second)


def kernel_seconds(step: CompiledStep, seconds) -> tuple[float, float]:
    """(forward, backward) seconds of the compiled step's kernels, `seconds(kernel)` each. A
    stack derived from its first blocks is extrapolated from two of its samples, by what the
    blocks between them add (two or four blocks apart, the longer of the stack's parity)."""
    def total(kernels: Kernels) -> float:
        return sum(seconds(k) * n for k, n in kernels)

    if not step.kernels:
        raise ValueError("the compiled step has no kernels: compiled_step(..., peak=True)")
    times = [(s.blocks, total(s.forward), total(s.backward)) for s in step.kernels]
    if len(times) == 1:
        return times[0][1], times[0][2]
    (low, f1, b1), (high, f3, b3) = times
    more = (step.blocks - high) / (high - low)
    return f3 + (f3 - f1) * more, b3 + (b3 - b1) * more


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
               peak: bool = False, autocast: torch.dtype | None = None) -> CompiledStep:
    with warnings.catch_warnings():  # Inductor's imports warn about torch.jit's deprecations
        warnings.simplefilter("ignore")
        import torch._inductor.compile_fx as inductor
    from torch._functorch.aot_autograd import aot_function
    from torch._inductor.debug import DebugContext
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.virtualized import V
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)  # RNG states a recomputed op replays
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
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            out = torch.func.functional_call(module, {**params, **buffers}, args, kw)
        return tuple(t for t in output_tensors(out) if t.requires_grad)

    traced = aot_function(run, fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                          partition_fn=inductor.partition_fn,
                          decompositions=select_decomp_table())
    try:
        # as graphcost's export runs the model: transformers' mask code takes eager's branches,
        # ctc_loss runs a shape-only kernel (graphcost/trace/masks.py, fake_kernels.py); a
        # checkpoint's ops are tagged for the partitioner, as dynamo tags them
        with mode, V.set_fake_mode(mode), warnings.catch_warnings(), DebugContext(), \
                eager_mask_branches(), shape_only_kernels(), _compiling(), \
                checkpoints_as_tags():
            warnings.simplefilter("ignore")  # torch's, about its own tracing
            outs = traced(params, buffers, *leaves)
            if not outs:
                raise TraceError(
                    "no output of the model needs a gradient as traced for torch.compile: "
                    "nothing to train. A loss torch.compile would leave out of its graph (a "
                    "graph break: F.ctc_loss, which cannot run on fake tensors) ends the "
                    "traced graph before it; a model is partitioned as one graph, whatever "
                    "its breaks")
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    except TraceError:
        raise
    except Exception as exc:  # re-raised with what to do
        raise TraceError(f"cannot partition the model as torch.compile would: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    forward, forward_inputs = graphs["forward"]
    backward, backward_inputs = graphs["backward"]
    saved = _saved(forward, backward)
    recomputed = _recomputed(backward)
    fields = dict(saved=tuple(TensorSpec(tuple(t.shape), t.dtype) for t in saved.values()),
                  saved_activation_bytes=sum(t.untyped_storage().nbytes()
                                             for t in saved.values()),
                  recompute_flops=sum(node_flops(n) for n in recomputed),
                  recomputed_ops=len(recomputed))
    if peak:  # what the code keeps, in its layouts, replaces what the graph says it keeps
        fields.update(_held(forward, forward_inputs, backward, backward_inputs, outs,
                            len(params), mode))
    return CompiledStep(**fields)


def _held(*graphs_and_outputs) -> dict:
    """CompiledStep's memory and kernels fields, from the code Inductor generates
    (graphcost.passes.inductor_code.step_held); {} where that fails."""
    held = step_held(*graphs_and_outputs)
    if held:
        held["kernels"] = (KernelSample(None, *held["kernels"]),)
    return held


def _saved(forward: torch.fx.GraphModule, backward: torch.fx.GraphModule
           ) -> dict[str, torch.Tensor]:
    """{node name: tensor} of what the forward graph returns for backward (its last outputs,
    as many as the backward's inputs that are not incoming gradients: before them come the
    model's outputs and the buffers it updates), one per storage, less the graph's inputs and
    views of them."""
    kept = kept_for_backward(backward)
    inputs = {StorageWeakRef(n.meta["val"].untyped_storage())
              for n in forward.graph.nodes
              if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)}
    [output] = [n for n in forward.graph.nodes if n.op == "output"]
    seen, saved = set(inputs), {}
    for node in output.args[0][len(output.args[0]) - kept:]:
        value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if not isinstance(value, torch.Tensor):
            continue  # a SymInt the backward needs
        ref = StorageWeakRef(value.untyped_storage())
        if ref not in seen:
            seen.add(ref)
            saved[node.name] = value
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


__all__ = ["CompiledStep", "Held", "KernelSample", "compiled_step", "kernel_seconds"]
