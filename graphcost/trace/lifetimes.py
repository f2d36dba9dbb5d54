"""How long eager Python keeps each forward value: observed while the model is exported.

The graph says when a value is read last; eager PyTorch frees it only when its last Python
reference dies. A local variable lives until it is rebound or its function returns
(`q = self.q(x)` inside an attention forward is alive until that forward returns, whether or
not it is read again), and so do the locals of library functions such as
`F.multi_head_attention_forward`. torch.export (non-strict) runs the model's own Python on fake
tensors, so those deaths happen during the export, in the same order as in eager execution.

`observing_lifetimes` puts a weakref finalizer on every tensor the tracer hands to the model's
code (each op output, as torch.fx's proxy tracer registers it; not those made inside torch's
Python decompositions, which stand in for a kernel) and notes which node was the last one
traced when it died. `mark_lifetimes` writes that on the exported graph as
`node.meta["custom"]["graphcost_held_until"]`, an id that survives run_decompositions like the
node's other custom metadata. While it watches, autograd saves nothing (a saved-tensor hook that
keeps no reference), so what keeps a tensor alive is Python alone. Only deaths during the
forward count: a tensor whose Python object outlives the forward (the model returned or stored
it) keeps the graph's lifetime, its last read.
"""

from __future__ import annotations

import contextlib
import operator
import os
import sys
import weakref
from collections.abc import Iterator

import torch
from torch import nn

ID_KEY = "graphcost_id"
HELD_KEY = "graphcost_held_until"


def last_traced_node() -> str | None:
    """The name of the last node the export in progress has traced (None: none yet, or only
    placeholders, which the exported program renames; also outside an export)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    mode = get_proxy_mode()
    if mode is None:
        return None
    last = next(iter(reversed(mode.tracer.graph.nodes)), None)
    return None if last is None or last.op == "placeholder" else last.name


@contextlib.contextmanager
def observing_lifetimes(module: nn.Module) -> Iterator[dict[str, list[str]]]:
    """{node name: [the last node traced when one of its tensors' Python objects died]} of the
    forward of `module` exported inside the block (see the module docstring)."""
    with observing_deaths() as (deaths, running):
        def forward_returned(*_args) -> None:
            running[0] = False

        hook = module.register_forward_hook(forward_returned, always_call=True)
        try:
            yield deaths
        finally:
            hook.remove()


@contextlib.contextmanager
def observing_deaths() -> Iterator[tuple[dict[str, list[str]], list[bool]]]:
    """({node name: [the last node traced when one of its tensors died]}, [watching]) of what
    the proxy tracer traces inside the block; set watching[0] = False to stop recording. The
    tensors are those torch.fx's proxy tracer registers (an op's outputs, not a parameter's,
    not those made inside torch's Python decompositions). Autograd keeps nothing meanwhile."""
    from torch.fx.experimental import proxy_tensor

    deaths: dict[str, list[str]] = {}
    watching: dict[int, weakref.ref] = {}
    running = [True]
    original = proxy_tensor.set_proxy_slot

    def died(name: str) -> None:
        if running[0]:
            last = last_traced_node()
            if last is not None:
                deaths.setdefault(name, []).append(last)

    def set_proxy_slot(obj, tracer, proxy) -> None:
        original(obj, tracer, proxy)
        if not isinstance(obj, torch.Tensor) or isinstance(obj, nn.Parameter):
            return
        node = getattr(getattr(proxy, "proxy", None), "node", None)
        if node is None or node.op != "call_function" or _in_decomposition():
            return
        ref = watching.get(id(obj))
        if ref is not None and ref() is obj:
            return  # already watched (an in-place op re-registers its tensor)
        watching[id(obj)] = weakref.ref(obj)
        weakref.finalize(obj, died, node.name)

    proxy_tensor.set_proxy_slot = set_proxy_slot
    try:
        # Autograd keeps nothing while tracing (nothing runs the backward): a tensor it would
        # save for backward dies when Python lets go of it, as a tensor it does not save does.
        with torch.autograd.graph.saved_tensors_hooks(_keep_nothing, _keep_nothing):
            yield deaths, running
    finally:
        proxy_tensor.set_proxy_slot = original
        running[0] = False


# torch's Python decompositions: the tracer runs them where eager PyTorch runs a kernel, so
# their locals are not Python objects in a real run
_DECOMPOSITIONS = tuple(f"{os.sep}torch{os.sep}{d}{os.sep}" for d in ("_decomp", "_refs", "_prims"))


def _in_decomposition() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if any(d in frame.f_code.co_filename for d in _DECOMPOSITIONS):
            return True
        frame = frame.f_back
    return False


def _keep_nothing(_tensor) -> None:
    return None


def mark_lifetimes(graph: torch.fx.Graph, deaths: dict[str, list[str]]) -> None:
    """Write on each op node an id, and for each of its outputs whose Python objects died after
    their last reader the id of the last op traced before they did (see the module docstring).
    An output of a multi-output op is the `getitem` node that unpacks it."""
    ops = [n for n in graph.nodes if n.op == "call_function"
           and n.target is not operator.getitem]
    position = {n.name: i for i, n in enumerate(graph.nodes)}
    nodes = {n.name: n for n in graph.nodes}
    for i, node in enumerate(ops):
        node.meta.setdefault("custom", {})[ID_KEY] = i
    ids = {n.name: i for i, n in enumerate(ops)}

    def output(name: str) -> tuple[str, int]:
        node = nodes[name]
        if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
            return node.args[0].name, int(node.args[1])
        return name, 0

    held: dict[str, dict[int, str]] = {}
    for name, lasts in deaths.items():
        known = [output(d)[0] for d in lasts if d in position]
        if name not in position or not known:
            continue
        last = max(known, key=position.__getitem__)
        op, index = output(name)
        if op in ids and last in ids and position[last] > position[op]:
            before = held.setdefault(op, {}).get(index)
            if before is None or position[last] > position[before]:
                held[op][index] = last
    for op, by_index in held.items():
        nodes[op].meta["custom"][HELD_KEY] = {i: ids[last] for i, last in by_index.items()}


def held_until_ids(node: torch.fx.Node) -> tuple[int | None, dict[int, int]]:
    """(this node's id, {output index: the id of the node Python holds that output until})
    from `mark_lifetimes`."""
    custom = node.meta.get("custom") or {}
    return custom.get(ID_KEY), custom.get(HELD_KEY) or {}
