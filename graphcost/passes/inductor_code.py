"""The code Inductor generates for a compiled graph, read without compiling it: what its
buffers hold over the graph (by the memory timeline's categories) and its kernels (what each
reads, writes and computes). graphcost.passes.compiled partitions the graphs; this module
replays them.

Inductor lowers and schedules a graph on its fake inputs and writes its wrapper code, as
`compile_fx` does (no comprehensive padding on a CPU); no kernel is compiled. The wrapper's
memory lines are replayed: each buffer from its allocation (or a fallback kernel's outputs from
its call) to its deletion, a reused one passed on. NB: a fallback kernel's own temporaries (the
CPU flash attention backward's) are not in the wrapper.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from graphcost.rules.registry import TensorSpec

# the graph attributes it reads (graphcost/graph/schema.py): none, it reads Inductor's graphs
READS: tuple[str, ...] = ()

TANGENT_PREFIX = "tangents_"  # aot_autograd's name for the backward's incoming gradients

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
    flops: int  # FlopCounterMode's formulas over the ops it computes; 0 for pointwise
    bytes: int  # read + written (Inductor's access count, per node it fuses: _kernel_bytes)
    dtype: str


Kernels = tuple[tuple[Kernel, int], ...]  # (kernel, how many), sorted


def _count(kernels) -> Kernels:
    counts: dict[Kernel, int] = {}
    for k in kernels:
        counts[k] = counts.get(k, 0) + 1
    return tuple(sorted(counts.items()))


def kept_for_backward(backward: torch.fx.GraphModule) -> int:
    """How many of the forward graph's outputs (its last ones) it keeps for backward: the
    backward's inputs that are not incoming gradients."""
    return sum(1 for n in backward.graph.nodes
               if n.op == "placeholder" and not n.name.startswith(TANGENT_PREFIX))


def step_held(forward: torch.fx.GraphModule, forward_inputs: list,
              backward: torch.fx.GraphModule, backward_inputs: list, outputs: tuple,
              params: int, mode) -> dict:
    """What a compiled forward and backward hold above the step's start, at their fullest and
    at their end, what the forward keeps for backward as its code lays it out, and their
    kernels ({} where Inductor's code generation fails: no figure rather than a wrong one).

    The forward's last outputs, as many as the backward's inputs that are not incoming
    gradients, are kept for backward: the buffers its code returns there are activations (a
    graph input Inductor returns in another layout, a convolution's weight made channels-last,
    is a new buffer), the rest transient. The backward starts from what the forward left (the
    model's outputs and the saved activations), the loss and its gradient (a scalar each) and
    the incoming gradients made contiguous; it frees the saved activations and the incoming
    gradients where its code deletes the last name of their buffer (not the parameters: the
    module holds them), and the gradients it returns for the first `params` inputs (the
    parameters) are gradients."""
    [output] = [n for n in forward.graph.nodes if n.op == "output"]
    tangents = [n for n in backward.graph.nodes
                if n.op == "placeholder" and n.name.startswith(TANGENT_PREFIX)]
    first_saved = len(output.args[0]) - kept_for_backward(backward)
    try:
        forward_peak, forward_end, lowered, forward_kernels = _code_held(
            forward, forward_inputs, mode, backward=False,
            categories=lambda i: "activations" if i >= first_saved else "transient")
        # the backward's inputs it may free: the saved buffers (several names can be views of
        # one), and the incoming gradients
        freeable: dict[str, tuple[object, int, str]] = {}
        saved: dict[str, tuple[TensorSpec, int]] = {}  # buffer -> (spec, bytes)
        strides: dict[str, tuple[int, ...] | None] = {}
        for i, node in enumerate(output.args[0]):
            if i < first_saved or i not in lowered or not isinstance(node, torch.fx.Node):
                continue
            buffer, nbytes, is_input, stride = lowered[i]
            strides[node.name] = stride
            if not is_input:
                freeable[node.name] = (buffer, nbytes, "activations")
                value = node.meta["val"]
                saved.setdefault(buffer, (TensorSpec(tuple(value.shape), value.dtype), nbytes))
        for n in tangents:
            freeable[n.name] = (n.name, n.meta["val"].untyped_storage().nbytes(), "transient")
        loss = sum(2 * o.dtype.itemsize for o in outputs)  # the loss and its gradient
        start = Held(forward_end.activations, forward_end.transient + loss + sum(
            n.meta["val"].untyped_storage().nbytes() for n in tangents), 0, "backward")
        # the backward is compiled for the forward's outputs as its code lays them out (a
        # convolution's saved input channels-last), as compile_fx does
        placeholders = [n for n in backward.graph.nodes if n.op == "placeholder"]
        backward_inputs = [_restrided(x, strides.get(n.name), mode)
                           for n, x in zip(placeholders, backward_inputs)]
        backward_peak, backward_end, _, backward_kernels = _code_held(
            backward, backward_inputs, mode, backward=True, start=start, freeable=freeable,
            categories=lambda i: "grads" if i < params else "transient")
    except Exception as exc:  # torch's internal code generator: no figure, not a wrong one
        warnings.warn(f"graphcost: no compiled peak: Inductor's code generation failed here "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                      stacklevel=2)
        return {}
    return {"saved": tuple(spec for spec, _ in saved.values()),
            "saved_activation_bytes": sum(nbytes for _, nbytes in saved.values()),
            "forward_peak": forward_peak, "forward_end": forward_end,
            "backward_peak": backward_peak, "backward_end": backward_end,
            "kernels": (forward_kernels, backward_kernels)}


def _code_held(gm: torch.fx.GraphModule, inputs: list, mode, *, backward: bool,
               categories, start: Held = Held(),
               freeable: dict[str, tuple[object, int, str]] | None = None,
               ) -> tuple[Held, Held, dict[int, tuple], Kernels]:
    """(fullest, returned, {output index: (its buffer, bytes, whether a graph input, its
    strides)}, its kernels) of what the code
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
            lowered = {i: (name, nbytes(graph.try_get_buffer(name)), name in graph.graph_inputs,
                           _stride(graph.graph_outputs[i]))
                       for i, name in out_names.items() if graph.try_get_buffer(name) is not None}
            kernels = _kernels(graph.scheduler.nodes, origin)
    return peak, Held(**live, op="return"), lowered, kernels


def _restrided(x, stride: tuple[int, ...] | None, mode):
    """`x` (a fake input of the backward) with the strides the forward's code gave it."""
    if not isinstance(x, torch.Tensor) or stride is None or tuple(x.stride()) == stride:
        return x
    with mode:
        return torch.empty_strided(x.shape, stride, dtype=x.dtype, device=x.device)


def _stride(node) -> tuple[int, ...] | None:
    """The strides Inductor gives an output of its graph (None: not fixed)."""
    try:
        return tuple(int(s) for s in node.get_stride())
    except (AttributeError, NotImplementedError, TypeError):
        return None


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
        flops = sum(node_flops(o) for o in dict.fromkeys(ops) if o not in counted)
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


# ops FlopCounterMode has no formula for, counted with the formula of the op they compute with
# the same leading arguments: the CPU's flash attention ((grad_out,) query, key, value, ...)
_FLOP_ALIASES = {
    "aten._scaled_dot_product_flash_attention_for_cpu":
        torch.ops.aten._scaled_dot_product_flash_attention,
    "aten._scaled_dot_product_flash_attention_for_cpu_backward":
        torch.ops.aten._scaled_dot_product_flash_attention_backward,
}


def node_flops(node: torch.fx.Node) -> int:
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


__all__ = ["HELD", "Held", "Kernel", "Kernels", "node_flops", "step_held"]
