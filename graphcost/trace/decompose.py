"""Ops torch.export keeps whole that graphcost has no rule for, replaced by what PyTorch runs.

An op with a CompositeImplicitAutograd kernel (einsum, diff, cosine_similarity, bilinear, ...)
has no kernel of its own: eager PyTorch runs the ops its composite calls, and autograd
differentiates through those. So each such node is replaced by exactly those ops, found by
running the op on the node's own fake tensors under `make_fx` (below autograd: the composite
decomposes as it does in eager, in-place ops stay in place) and inlined in its place, with the
node's module path, source line and graphcost's tags. Nothing else in the graph changes: no
program-wide re-trace, which would also decompose ops graphcost has rules for (a traced dropout
would become native_dropout, `.contiguous()` a clone). Nested composites are replaced in turn.
An op with its own kernel and no rule stays as it is, unsupported.

Some composites branch on the device their tensors are on. For a CPU target the composites are
traced on fake CPU tensors, so they decompose into the kernels a CPU runs: nn.LSTM into one
oneDNN `mkldnn_rnn_layer` per layer and direction, nn.GRU / nn.RNN / nn.GRUCell into RNN.cpp's
cells step by step. Those recurrent ops have a rule, for the device whose kernel runs them
whole (cuDNN's `_cudnn_rnn`, the fused GRU cell), and are decomposed only for a CPU target
(`DECOMPOSED_ON_CPU`): autograd then sees, and frees, what eager's does, layer by layer and
step by step.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
from collections.abc import Iterator

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from graphcost.rules.registry import RuleRegistry
from graphcost.trace.grads import requires_grad_of
from graphcost.trace.lifetimes import HELD_KEY, ID_KEY, held_until_ids, observing_deaths

MAX_ROUNDS = 8  # composites inside composites
_KEPT_META = ("nn_module_stack", "stack_trace", "custom", "source_fn_stack", "torch_fn")
aten = torch.ops.aten
# composites with a rule for the kernel that runs them whole on CUDA, decomposed for a CPU
DECOMPOSED_ON_CPU = (aten.lstm.input, aten.gru.input, aten.rnn_tanh.input, aten.rnn_relu.input,
                     aten.rms_norm.default,
                     aten.gru_cell.default)


def _composite(op: object, rules: RuleRegistry, kernels: str) -> bool:
    if kernels == "cpu" and op in DECOMPOSED_ON_CPU:
        return True
    return (isinstance(op, torch._ops.OpOverload) and rules.lookup(op) is None
            and torch._C._dispatch_has_kernel_for_dispatch_key(op.name(),
                                                                "CompositeImplicitAutograd"))


def decompose_composites(program: torch.export.ExportedProgram, rules: RuleRegistry,
                         kernels: str = "cpu") -> torch.export.ExportedProgram:
    """`program` with every op that has no rule in `rules` and a CompositeImplicitAutograd
    kernel replaced, in place, by the ops that kernel runs on a `kernels` ("cpu" or "cuda")
    device (see the module docstring)."""
    graph = program.graph
    changed = False
    ids = itertools.count(1 + max((held_until_ids(n)[0] or 0 for n in graph.nodes), default=0))
    for _ in range(MAX_ROUNDS):
        nodes = [n for n in graph.nodes
                 if n.op == "call_function" and _composite(n.target, rules, kernels)]
        grads = requires_grad_of(graph) if nodes else {}
        done = [n for n in nodes if _inline_decomposition(graph, n, kernels, grads, ids)]
        changed = changed or bool(done)
        if not done:
            break
    if changed:  # no dead-code elimination: eager computes what the model leaves unused too
        graph.lint()
        program.graph_module.recompile()
    return program


def _trace(node: torch.fx.Node, kernels: str, grads: dict[torch.fx.Node, bool]
           ) -> tuple[torch.fx.GraphModule, list[torch.fx.Node], dict[str, str]] | None:
    """The ops `node`'s composite runs, traced on fakes like its inputs' values (on the CPU for
    a CPU target) that need a gradient where eager's would; the graph nodes its placeholders
    stand for; and {inner node: the inner node after which the kernel let go of its value},
    where that is later than its last reader (a C++ local such as RNN.cpp's gate matmul for
    the whole sequence lives until the layer returns). None: it cannot be traced here.
    Autograd's own copies (the clone an in-place op saves) are traced too and dropped: nothing
    in the graph reads them; the rules account for what autograd keeps."""
    from torch._guards import detect_fake_mode

    def value(x):
        return x.meta.get("val") if isinstance(x, torch.fx.Node) else x

    args = torch.fx.node.map_aggregate(node.args, value)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, value)
    flat, spec = torch.utils._pytree.tree_flatten((args, kwargs))
    sources = torch.utils._pytree.tree_leaves((node.args, node.kwargs))
    if len(sources) != len(flat):
        return None
    where = [i for i, a in enumerate(flat) if isinstance(a, torch.Tensor)]
    mode = detect_fake_mode(tuple(flat[i] for i in where))
    if mode is None or any(not isinstance(sources[i], torch.fx.Node) for i in where):
        return None

    def run(*tensors):
        values = list(flat)
        for i, t in zip(where, tensors):
            values[i] = t
        a, k = torch.utils._pytree.tree_unflatten(values, spec)
        return node.target(*a, **k)

    try:
        with mode:
            device = "cpu" if kernels == "cpu" else None
            tensors = [_like(flat[i], device, grads.get(sources[i], False)) for i in where]
            with observing_deaths() as (deaths, _), _noting_no_grad() as no_grad:
                sub = make_fx(run)(*tensors)
            for n in sub.graph.nodes:
                if n.name in no_grad:
                    n.meta[NO_GRAD] = True
            order = [n.name for n in sub.graph.nodes]
            _drop_autograd_copies(sub.graph)
            # the values again, on the program's own fakes (and its device for the tensors it
            # makes): a view of an input then shares its storage, as the graph's other nodes see
            _on_device(sub.graph, tensors[0].device, flat[where[0]].device)
            FakeTensorProp(sub, mode).propagate_dont_convert_inputs(*(flat[i] for i in where))
    except Exception:
        return None
    if any(n.op == "get_attr" for n in sub.graph.nodes):
        return None  # it made a tensor constant: nowhere to put it in the program
    return sub, [sources[i] for i in where], _last_deaths(sub.graph, order, deaths)


NO_GRAD = "graphcost_no_grad"


@contextlib.contextmanager
def _noting_no_grad() -> Iterator[set[str]]:
    """The names of the nodes the proxy tracer traces inside the block while grad mode is off
    (a composite's `at::NoGradGuard`: cosine_similarity clamps its norms in place unrecorded)."""
    from torch.fx.experimental import proxy_tensor

    names: set[str] = set()
    original = proxy_tensor.set_proxy_slot

    def set_proxy_slot(obj, tracer, proxy) -> None:
        original(obj, tracer, proxy)
        node = getattr(getattr(proxy, "proxy", None), "node", None)
        if node is not None and node.op == "call_function" and not torch.is_grad_enabled():
            names.add(node.name)

    proxy_tensor.set_proxy_slot = set_proxy_slot
    try:
        yield names
    finally:
        proxy_tensor.set_proxy_slot = original


AUTOGRAD_COPIES = (aten.clone.default, aten.detach.default)


def _drop_autograd_copies(graph: torch.fx.Graph) -> None:
    """The clones and detaches nothing reads: autograd's own (an in-place op's saved
    `self.clone()`, the detached outputs it saves), not the kernel's."""
    for n in reversed(list(graph.nodes)):
        if n.op == "call_function" and n.target in AUTOGRAD_COPIES and not n.users:
            graph.erase_node(n)


def _last_deaths(graph: torch.fx.Graph, order: list[str],
                 deaths: dict[str, list[str]]) -> dict[str, str]:
    """{node: the last node traced when its value died}, among the nodes `graph` kept (a death
    after a dropped node is one after the kept node before it)."""
    kept = {n.name for n in graph.nodes}
    position = {name: i for i, name in enumerate(order)}
    at_or_before, last = {}, None
    for name in order:
        last = name if name in kept else last
        at_or_before[name] = last
    found = {}
    for name, lasts in deaths.items():
        known = [d for d in lasts if d in position]
        if name in kept and known:
            found[name] = at_or_before[max(known, key=position.__getitem__)]
    return found


def _like(t: torch.Tensor, device: str | None, requires_grad: bool) -> torch.Tensor:
    """A fresh fake of `t`'s shape, strides and dtype, on `device` (None: t's)."""
    fresh = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device or t.device)
    return fresh.requires_grad_() if requires_grad and fresh.is_floating_point() else fresh


def _on_device(graph: torch.fx.Graph, traced: torch.device, program: torch.device) -> None:
    """The tensors `graph` makes (zeros for an LSTM's missing biases) on the program's device."""
    def move(x):
        return program if isinstance(x, torch.device) and x == traced else x

    for n in graph.nodes:
        n.args = torch.fx.node.map_aggregate(n.args, move)
        n.kwargs = torch.fx.node.map_aggregate(n.kwargs, move)


def _inline_decomposition(graph: torch.fx.Graph, node: torch.fx.Node, kernels: str,
                          grads: dict[torch.fx.Node, bool], ids: Iterator[int]) -> bool:
    traced = _trace(node, kernels, grads)
    if traced is None:
        return False
    sub, inputs, deaths = traced
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    copies: list[torch.fx.Node] = []
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    env.update(zip(placeholders, inputs))
    kept = {k: node.meta[k] for k in _KEPT_META if k in node.meta}
    result = None
    outer_grad, grad_off = _grad_enabled_at(node), False
    with graph.inserting_before(node):
        for inner in sub.graph.nodes:
            if inner.op == "placeholder":
                continue
            if inner.op == "output":
                result = torch.fx.node.map_arg(inner.args[0], lambda n: env[n])
                if grad_off:
                    copies.append(graph.call_function(torch._C._set_grad_enabled, (True,)))
                continue
            if inner.op == "call_function" and outer_grad and \
                    inner.meta.get(NO_GRAD, False) != grad_off:
                grad_off = not grad_off  # the composite's NoGradGuard, as export writes one
                copies.append(graph.call_function(torch._C._set_grad_enabled, (not grad_off,)))
            copy = graph.node_copy(inner, lambda n: env[n])
            copy.meta = {**inner.meta, **{k: v for k, v in kept.items()
                                          if k != "custom"}}
            if "custom" in kept:
                copy.meta["custom"] = dict(kept["custom"])
            env[inner] = copy
            copies.append(copy)
    if isinstance(result, (list, tuple)):
        for user in list(node.users):
            if user.target is not operator.getitem:
                return _undo(graph, copies)
            user.replace_all_uses_with(result[user.args[1]])
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(result)
    _carry_lifetimes(node, sub, env, copies, result, deaths, ids)
    _same_storages(graph, node.meta.get("val"), result)
    graph.erase_node(node)
    return True


def _carry_lifetimes(node: torch.fx.Node, sub: torch.fx.GraphModule,
                     env: dict[torch.fx.Node, torch.fx.Node], copies: list[torch.fx.Node],
                     result: object, deaths: dict[str, str], ids: Iterator[int]) -> None:
    """trace/lifetimes.py's marks for the ops that replace `node`: each gets an id of its own
    but the last, which takes `node`'s (what other values are held until); an output the
    model's Python held is held by the op that now makes it, and a value the kernel held past
    its last reader is held until the op after which it died."""
    own, held = held_until_ids(node)
    if own is None:
        return  # not observed: not an export's graph
    ops = [c for c in copies if c.op == "call_function"
           and c.target not in (operator.getitem, torch._C._set_grad_enabled)]
    for c in ops:
        c.meta["custom"][ID_KEY] = next(ids)
        c.meta["custom"].pop(HELD_KEY, None)
    if ops:
        ops[-1].meta["custom"][ID_KEY] = own
    position = {c: i for i, c in enumerate(copies)}

    def output(n: torch.fx.Node) -> tuple[torch.fx.Node, int]:
        if n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node):
            return n.args[0], int(n.args[1])
        return n, 0

    marks: dict[torch.fx.Node, dict[int, int]] = {}
    outputs = result if isinstance(result, (list, tuple)) else [result]
    for index, until in held.items():
        if index < len(outputs) and outputs[index] in position:
            op, i = output(outputs[index])
            marks.setdefault(op, {})[i] = until
    copy_of = {inner.name: env[inner] for inner in sub.graph.nodes if inner in env}
    for name, last in deaths.items():
        if name not in copy_of or last not in copy_of:
            continue
        (op, i), (died_after, _) = output(copy_of[name]), output(copy_of[last])
        if op in position and died_after in position and position[died_after] > position[op]:
            marks.setdefault(op, {}).setdefault(i, died_after.meta["custom"][ID_KEY])
    for op, by_index in marks.items():
        op.meta["custom"][HELD_KEY] = by_index


STORAGE_ALIASES = "graphcost_storage_aliases"


def _same_storages(graph: torch.fx.Graph, before: object, result: object) -> None:
    """The values downstream of a replaced op keep their fake tensors, views of its old
    outputs: note on the graph (graph_module.meta[STORAGE_ALIASES], pairs of fake tensors,
    kept alive so their storages stay distinct) that each old output's storage is the new
    one's; the graph builder reads them as one."""
    old = before if isinstance(before, (list, tuple)) else [before]
    new = result if isinstance(result, (list, tuple)) else [result]
    pairs = graph.owning_module.meta.setdefault(STORAGE_ALIASES, [])
    for o, n in zip(old, new):
        value = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
        if isinstance(o, torch.Tensor) and isinstance(value, torch.Tensor):
            pairs.append((o, value))


def _grad_enabled_at(node: torch.fx.Node) -> bool:
    """Grad mode where `node` runs: the last `_set_grad_enabled` before it says (on if none)."""
    previous = node.prev
    while previous.op != "root":
        if previous.op == "call_function" and previous.target is torch._C._set_grad_enabled:
            return bool(previous.args[0])
        previous = previous.prev
    return True


def _undo(graph: torch.fx.Graph, copies: list[torch.fx.Node]) -> bool:
    """A tuple output used other than through getitem: keep the op whole."""
    for copy in reversed(copies):
        graph.erase_node(copy)
    return False
