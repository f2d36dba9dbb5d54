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
from dataclasses import dataclass, replace

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
# a stack is derived from its first 3 blocks, or up to this many where the first add other
# bytes than the next (a short stack's peak sits elsewhere, or alternates between odd and
# even lengths)
MAX_SAMPLE_BLOCKS = 6


HELD = ("activations", "transient", "grads")  # the memory timeline's categories (training.py)


@dataclass(frozen=True)
class Held:
    """Bytes a compiled step holds above its start at one point, by the memory timeline's
    categories, and the op whose buffer was allocated or freed there (Inductor's origin)."""

    activations: int = 0  # the saved tensors
    transient: int = 0  # other buffers, the model's outputs, the incoming gradients
    grads: int = 0  # parameter gradients the backward has returned so far
    op: str = ""

    @property
    def total_bytes(self) -> int:
        return self.activations + self.transient + self.grads

    def numbers(self) -> tuple[int, ...]:
        return tuple(getattr(self, c) for c in HELD)


@dataclass(frozen=True, order=True)
class Kernel:
    """One kernel of the code Inductor generates for a graph, as its scheduler counts it: a
    fused chain of pointwise ops and reductions reads its inputs and writes its outputs once."""

    op: str  # the last op of the graph it computes
    matmul: bool  # an extern kernel with FLOPs (mm, convolution, attention)
    flops: int  # Inductor's estimate_flops (FlopCounterMode's formulas); 0 for pointwise
    bytes: int  # read + written (Inductor's get_read_write_buffers_sizes)
    dtype: str


Kernels = tuple[tuple[Kernel, int], ...]  # (kernel, how many), sorted


def _count(kernels) -> Kernels:
    counts: dict[Kernel, int] = {}
    for k in kernels:
        counts[k] = counts.get(k, 0) + 1
    return tuple(sorted(counts.items()))


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

    saved: tuple[TensorSpec, ...]  # the activations the forward keeps for backward
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
                "forward_backward_peak_bytes": self.peak_bytes, **held}

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
                  peak: bool = False, autocast: torch.dtype | None = None) -> CompiledStep:
    """The compiled training step of `module(*example_inputs, **kwargs)` (see the module
    docstring); with `peak`, also its forward and backward peak (Inductor generates the code of
    each graph, without compiling it: seconds a graph). The module may live on the meta device;
    nothing is allocated. The inputs may be tensors or TensorSpecs, one or a tuple. With
    `autocast`, the forward runs under torch.autocast(dtype=autocast), as the compiled model
    called in that context does (dynamo traces the autocast region into the graph)."""
    if isinstance(example_inputs, (torch.Tensor, TensorSpec)):
        example_inputs = (example_inputs,)
    example_inputs = tuple(torch.empty(x.shape, dtype=x.dtype, device="meta")
                           if isinstance(x, TensorSpec) else x for x in example_inputs)
    blocks = find_repeated_blocks(module)
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
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
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
        **(_step_held(forward, forward_inputs, backward, backward_inputs, outs, len(params),
                      mode) if peak else {}))


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


def _storage_ref(value: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(value.untyped_storage())


def _step_held(forward: torch.fx.GraphModule, forward_inputs: list,
               backward: torch.fx.GraphModule, backward_inputs: list, outputs: tuple,
               params: int, mode) -> dict[str, Held]:
    """What a compiled forward and backward hold above the step's start, at their fullest and
    at their end ({} where Inductor's code generation fails: no figure rather than a wrong
    one). The forward's buffers it returns for backward are activations, the rest transient.
    The backward starts from what the forward left (the model's outputs and the saved
    activations), the loss and its gradient (a scalar each) and the incoming gradients made
    contiguous; it frees the saved activations and the incoming gradients where its code
    deletes the last name of their storage (not the parameters and their views: the module
    holds them), and the gradients it returns for the first `params` inputs (the parameters)
    are gradients."""
    inputs = {_storage_ref(n.meta["val"]) for n in forward.graph.nodes
              if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)}
    [output] = [n for n in forward.graph.nodes if n.op == "output"]
    # the backward's inputs it may free, by storage: the forward's saved outputs that are not
    # its inputs' (several names can be views of one), and the incoming gradients
    freeable: dict[str, tuple[object, int, str]] = {}
    for node in output.args[0][len(outputs):]:
        value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if isinstance(value, torch.Tensor) and _storage_ref(value) not in inputs:
            freeable[node.name] = (_storage_ref(value), value.untyped_storage().nbytes(),
                                   "activations")
    tangents = [n for n in backward.graph.nodes
                if n.op == "placeholder" and n.name.startswith(TANGENT_PREFIX)]
    for n in tangents:
        freeable[n.name] = (n.name, n.meta["val"].untyped_storage().nbytes(), "transient")
    try:
        forward_peak, forward_end, sizes, forward_kernels = _code_held(
            forward, forward_inputs, mode, backward=False,
            categories=lambda i: "transient" if i < len(outputs) else "activations")
        # a saved buffer's bytes as Inductor lays it out (it may pad strides: GPT-2's logits)
        storage_bytes: dict[object, int] = {}
        for i, node in enumerate(output.args[0]):
            if isinstance(node, torch.fx.Node) and node.name in freeable and i in sizes:
                ref = freeable[node.name][0]
                storage_bytes[ref] = max(storage_bytes.get(ref, 0), sizes[i])
        freeable = {name: (ref, storage_bytes.get(ref, size), category)
                    for name, (ref, size, category) in freeable.items()}
        loss = sum(2 * o.dtype.itemsize for o in outputs)  # the loss and its gradient
        start = Held(forward_end.activations, forward_end.transient + loss + sum(
            n.meta["val"].untyped_storage().nbytes() for n in tangents), 0, "backward")
        backward_peak, backward_end, _, backward_kernels = _code_held(
            backward, backward_inputs, mode, backward=True, start=start, freeable=freeable,
            categories=lambda i: "grads" if i < params else "transient")
    except Exception as exc:  # torch's internal code generator: no figure, not a wrong one
        warnings.warn(f"graphcost: no compiled peak: Inductor's code generation failed here "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                      stacklevel=2)
        return {}
    return {"forward_peak": forward_peak, "forward_end": forward_end,
            "backward_peak": backward_peak, "backward_end": backward_end,
            "kernels": (KernelSample(None, forward_kernels, backward_kernels),)}


def _code_held(gm: torch.fx.GraphModule, inputs: list, mode, *, backward: bool,
               categories, start: Held = Held(),
               freeable: dict[str, tuple[object, int, str]] | None = None,
               ) -> tuple[Held, Held, dict[int, int], Kernels]:
    """(fullest, returned, {output index: bytes of its buffer}, its kernels) of what the code
    Inductor generates for `gm` holds beyond its inputs, from `start`. Inductor lowers and
    schedules the graph on the fake inputs and writes its wrapper, without compiling a kernel;
    the wrapper's memory lines are replayed: each buffer from its allocation (or a fallback
    kernel's outputs from its call) to its deletion, a reused one passed on. A buffer the graph
    returns as its i-th output is of category `categories(i)`, any other transient. The inputs
    in `freeable` ({name: (storage, bytes, category)}) are freed where the code deletes the
    last name of their storage, the rest when it returns."""
    from torch._inductor import ir
    from torch._inductor.codegen import wrapper
    from torch._inductor.compile_fx import maybe_disable_comprehensive_padding
    from torch._inductor.debug import DebugContext
    from torch._inductor.graph import GraphLowering
    from torch._inductor.virtualized import V

    freeable = dict(freeable or {})

    def nbytes(node) -> int:
        layout = getattr(node, "layout", None)
        if layout is None or isinstance(layout, ir.MultiOutputLayout):
            return 0  # a fallback kernel's tuple: its outputs are counted
        return int(layout.storage_size()) * layout.dtype.itemsize

    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def origin(node) -> str:
        """The op of the graph a buffer computes: the last of the ops it fuses."""
        ops = [o for o in getattr(node, "origins", ()) or () if o.op == "call_function"]
        return str(max(ops, key=lambda o: order.get(o, -1)).target) if ops else node.get_name()

    # as compile_fx lowers a graph: no comprehensive padding for the CPU
    with V.set_fake_mode(mode), DebugContext(), warnings.catch_warnings(), \
            maybe_disable_comprehensive_padding(inputs):
        warnings.simplefilter("ignore")
        graph = GraphLowering(gm, example_inputs=inputs, is_inference=False,
                              is_backward=backward)
        with V.set_graph_handler(graph):
            graph.run(*inputs)
            graph.codegen()
            returned: dict[str, str] = {}
            out_names: dict[int, str] = {}
            for i, out in enumerate(graph.graph_outputs):
                try:
                    out_names[i] = out.get_name()
                except (AttributeError, NotImplementedError):
                    continue
                returned.setdefault(out_names[i], categories(i))
            names: dict[object, int] = {}  # freeable input storage -> its names not deleted
            for storage, _, _ in freeable.values():
                names[storage] = names.get(storage, 0) + 1
            live = dict(zip(HELD, start.numbers()))
            alive: dict[str, tuple[int, str]] = {}  # buffer -> (bytes, category)
            peak = last = start

            def allocate(name: str, size: int) -> None:
                alive[name] = (size, returned.get(name, "transient"))
                live[alive[name][1]] += size

            for line in graph.wrapper_code.lines:
                node = getattr(line, "node", None)
                if isinstance(line, (wrapper.AllocateLine, wrapper.ExternKernelAllocLine)):
                    allocate(node.get_name(), nbytes(node))
                elif isinstance(line, wrapper.MultiOutputLine):
                    buffer = graph.try_get_buffer(line.result_name)
                    if buffer is not None and line.result_name not in alive:
                        allocate(line.result_name, nbytes(buffer))
                        node = buffer
                elif isinstance(line, wrapper.ReuseLine):
                    old, new = node.get_name(), line.reused_as.get_name()
                    if not line.delete_old:  # both names stay: one buffer, counted once
                        alive[new] = alive.get(old, (0, "transient"))
                        continue
                    size, category = alive.pop(old, (0, "transient"))
                    live[category] -= size
                    allocate(new, size)  # of the new name's category
                elif isinstance(line, (wrapper.FreeLine, wrapper.FreeIfNotReusedLine)):
                    if getattr(line, "is_reused", False):
                        continue
                    name = node.get_name()
                    size, category = alive.pop(name, (0, "transient"))
                    live[category] -= size
                    if name in freeable:
                        storage, size, category = freeable.pop(name)
                        names[storage] -= 1
                        live[category] -= size if names[storage] == 0 else 0
                else:
                    continue
                last = Held(**live, op=origin(node))
                if last.total_bytes > peak.total_bytes:
                    peak = last
            # the graph returns: its locals die, and the backward's inputs with them (autograd
            # lets go of the saved tensors once the backward has run)
            for name, (size, category) in alive.items():
                live[category] -= 0 if name in returned else size
            for storage, size, category in freeable.values():
                names[storage] -= 1
                live[category] -= size if names[storage] == 0 else 0
            sizes = {i: nbytes(graph.try_get_buffer(name)) for i, name in out_names.items()
                     if graph.try_get_buffer(name) is not None}
            kernels = _kernels(graph.scheduler.nodes, origin)
    return peak, Held(**live, op="return"), sizes, kernels


def _kernels(nodes, origin) -> Kernels:
    """The scheduler nodes of Inductor's that run a kernel, as Kernels (`origin`: the op of
    the graph a buffer computes). A kernel's FLOPs are FlopCounterMode's formulas over the
    graph ops it computes, each op counted once (a fallback kernel's outputs are separate
    nodes with the same origin)."""
    from torch._inductor import ir
    from torch._inductor.scheduler import ExternKernelSchedulerNode, NopKernelSchedulerNode

    counted: set[torch.fx.Node] = set()
    kernels = []
    for node in nodes:
        if isinstance(node, NopKernelSchedulerNode) or (
                isinstance(node, ExternKernelSchedulerNode) and
                isinstance(node.node, ir.MultiOutput)):
            continue
        buffers = [n.node for n in node.get_nodes() if n.node is not None]
        ops = [o for b in buffers for o in b.origins if o.op == "call_function"]
        flops = sum(_node_flops(o) for o in dict.fromkeys(ops) if o not in counted)
        counted.update(ops)
        values = [o.meta.get("val") for o in ops]
        dtype = next((str(v.dtype).replace("torch.", "") for v in
                      torch.utils._pytree.tree_leaves(values[::-1])
                      if isinstance(v, torch.Tensor)), "")
        kernels.append(Kernel(op=origin(buffers[-1]) if buffers else "", matmul=flops > 0,
                              flops=flops, bytes=_kernel_bytes(node), dtype=dtype))
    return _count(kernels)


def _kernel_bytes(node) -> int:
    """The bytes a kernel reads and writes: each buffer once, and no more of it than the
    kernel's loops reach (Inductor's own count, get_read_write_buffer_accesses, per node it
    fuses), less the buffers made and used up inside the kernel. NB: Inductor counts a fused
    kernel's buffers whole (a gather from the embedding table would read all of it)."""
    leaves = node.get_nodes()
    if len(leaves) == 1:
        return int(node.get_read_write_buffers_sizes())
    inside = {id(n) for n in leaves}
    made = {buf.get_name(): buf for n in leaves for buf in n.get_outputs()}
    accessed: dict[str, int] = {}
    for leaf in leaves:
        for name, nbytes in leaf.get_read_write_buffer_accesses(True, True).items():
            accessed[name] = max(accessed.get(name, 0), nbytes)
    for name, buf in made.items():
        if all(id(getattr(user, "node", None)) in inside for user in buf.users):
            accessed.pop(name, None)  # never leaves the kernel
    return sum(accessed.values())


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


# ops FlopCounterMode has no formula for, counted with the formula of the op they compute with
# the same leading arguments: the CPU's flash attention ((grad_out,) query, key, value, ...)
_FLOP_ALIASES = {
    "aten._scaled_dot_product_flash_attention_for_cpu":
        torch.ops.aten._scaled_dot_product_flash_attention,
    "aten._scaled_dot_product_flash_attention_for_cpu_backward":
        torch.ops.aten._scaled_dot_product_flash_attention_backward,
}


def _node_flops(node: torch.fx.Node) -> int:
    """FlopCounterMode's formula for one traced op, on its recorded fake values."""
    from torch.utils.flop_counter import flop_registry

    packet = getattr(node.target, "overloadpacket", None)
    packet = _FLOP_ALIASES.get(str(packet), packet)
    if packet not in flop_registry:
        return 0

    def value(x):
        return x.meta.get("val") if isinstance(x, torch.fx.Node) else x

    args = torch.fx.node.map_aggregate(node.args, value)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, value)
    return int(flop_registry[packet](*args, **kwargs, out_val=node.meta.get("val")))


__all__ = ["CompiledStep", "compiled_step"]
