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
"""

from __future__ import annotations

import operator

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from graphcost.rules.registry import RuleRegistry

MAX_ROUNDS = 8  # composites inside composites
_KEPT_META = ("nn_module_stack", "stack_trace", "custom", "source_fn_stack", "torch_fn")


def _composite(op: object, rules: RuleRegistry) -> bool:
    return (isinstance(op, torch._ops.OpOverload) and rules.lookup(op) is None
            and torch._C._dispatch_has_kernel_for_dispatch_key(op.name(),
                                                                "CompositeImplicitAutograd"))


def decompose_composites(program: torch.export.ExportedProgram,
                         rules: RuleRegistry) -> torch.export.ExportedProgram:
    """`program` with every op that has no rule in `rules` and a CompositeImplicitAutograd
    kernel replaced, in place, by the ops that kernel runs (see the module docstring)."""
    graph = program.graph
    changed = False
    for _ in range(MAX_ROUNDS):
        nodes = [n for n in graph.nodes if n.op == "call_function" and _composite(n.target, rules)]
        done = [n for n in nodes if _inline_decomposition(graph, n)]
        changed = changed or bool(done)
        if not done:
            break
    if changed:
        graph.eliminate_dead_code()
        graph.lint()
        program.graph_module.recompile()
    return program


def _trace(node: torch.fx.Node) -> tuple[torch.fx.GraphModule, list[torch.fx.Node]] | None:
    """The ops `node`'s composite runs, traced on its inputs' fake values, and the graph nodes
    its placeholders stand for (None: it cannot be traced here)."""
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
            sub = make_fx(run)(*(flat[i] for i in where))
    except Exception:
        return None
    if any(n.op == "get_attr" for n in sub.graph.nodes):
        return None  # it made a tensor constant: nowhere to put it in the program
    return sub, [sources[i] for i in where]


def _inline_decomposition(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    traced = _trace(node)
    if traced is None:
        return False
    sub, inputs = traced
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    copies: list[torch.fx.Node] = []
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    env.update(zip(placeholders, inputs))
    kept = {k: node.meta[k] for k in _KEPT_META if k in node.meta}
    result = None
    with graph.inserting_before(node):
        for inner in sub.graph.nodes:
            if inner.op == "placeholder":
                continue
            if inner.op == "output":
                result = torch.fx.node.map_arg(inner.args[0], lambda n: env[n])
                continue
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
    graph.erase_node(node)
    return True


def _undo(graph: torch.fx.Graph, copies: list[torch.fx.Node]) -> bool:
    """A tuple output used other than through getitem: keep the op whole."""
    for copy in reversed(copies):
        graph.erase_node(copy)
    return False
