"""Eager's branches of transformers' attention-mask code, taken while a model is exported.

transformers decides on each call whether attention needs a mask. Without padding and with one
sequence per row, an eager run builds none: SDPA runs with `is_causal` (a decoder) or with no
mask (an encoder), and grouped-query attention passes `enable_gqa` instead of repeating the
key/value heads. Those decisions read tensor values (is a position padded? do the position ids
pack several sequences?), which torch.export cannot, so under export transformers skips them and
always builds the (B, 1, T, T) boolean mask: another kernel, which on the CPU saves a float copy
of the mask, and for grouped-query attention copies of the repeated keys and values — a trace
that is not the eager run.

While graphcost exports a model, `eager_mask_branches` makes each of those decisions (`DECISIONS`,
the functions of transformers.masking_utils that take them) as an eager run does, wherever the
values it reads are known: a tensor computed from constants alone (the positions a model derives
with arange, a mask it builds itself) is evaluated on the CPU (`constant_value`), and the
decision runs on those values, with `torch.compiler.is_exporting()` and `is_compiling()` false
as in eager. A decision whose eager answer is a tensor (packed sequences) is traced as before.
A decision that reads a model input (an attention_mask passed in: graphcost never sees its
values) is traced as before too: the mask is kept, as an eager run on padded inputs keeps it.
(graphcost.load.hf builds unpadded inputs and tells transformers so.)

Any model that does not use transformers is traced as it is.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

DECISIONS = ("find_packed_sequence_indices", "_ignore_causal_mask_sdpa",
             "_ignore_bidirectional_mask_sdpa")  # in transformers.masking_utils
MAX_CONSTANT_ELEMENTS = 2**24  # per tensor evaluated on the CPU to answer a decision


@contextlib.contextmanager
def eager_mask_branches() -> Iterator[None]:
    """While inside, transformers' mask decisions answer as in an eager run wherever the values
    they read are known (see the module docstring); without transformers, nothing changes."""
    masking = sys.modules.get("transformers.masking_utils")
    originals = {name: getattr(masking, name) for name in DECISIONS
                 if masking is not None and hasattr(masking, name)}
    try:
        for name, decide in originals.items():
            setattr(masking, name, _as_in_eager(decide))
        yield
    finally:
        for name, decide in originals.items():
            setattr(masking, name, decide)


def _as_in_eager(decide: Callable) -> Callable:
    @functools.wraps(decide)
    def decided(*args: Any, **kwargs: Any) -> Any:
        leaves, tree = tree_flatten((args, kwargs))
        values = [constant_value(x) if isinstance(x, torch.Tensor) else x for x in leaves]
        if any(isinstance(x, torch.Tensor) and v is None for x, v in zip(leaves, values)):
            return decide(*args, **kwargs)  # it reads an input's values: as traced
        eager_args, eager_kwargs = tree_unflatten(values, tree)
        try:
            with _eager():
                answer = decide(*eager_args, **eager_kwargs)
        except Exception:  # transformers' own code on real values: trace it as it is
            return decide(*args, **kwargs)
        if any(isinstance(x, torch.Tensor) for x in tree_leaves(answer)):
            return decide(*args, **kwargs)  # eager builds something from the values: trace it
        return answer
    return decided


@contextlib.contextmanager
def _eager() -> Iterator[None]:
    """Real tensors, nothing traced, and torch.compiler.is_exporting()/is_compiling() false."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    compiling, exporting = torch.compiler._is_compiling_flag, torch.compiler._is_exporting_flag
    torch.compiler._is_compiling_flag = torch.compiler._is_exporting_flag = False
    try:
        with unset_fake_temporarily(), disable_proxy_modes_tracing(), \
                torch._C.DisableTorchFunction():
            yield
    finally:
        torch.compiler._is_compiling_flag, torch.compiler._is_exporting_flag = compiling, exporting


def constant_value(t: torch.Tensor) -> torch.Tensor | None:
    """The value of a tensor being traced, on the CPU, when the ops that made it read no model
    input, parameter or buffer (and no tensor of theirs exceeds MAX_CONSTANT_ELEMENTS); else
    None."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot

    mode = get_proxy_mode()
    slot = get_proxy_slot(t, mode.tracer, None) if mode is not None else None
    if slot is None:
        return None
    order = _ancestors(slot.proxy.node)
    for node in order:
        if node.op not in ("call_function", "get_attr") or not all(
                v.numel() <= MAX_CONSTANT_ELEMENTS for v in tree_leaves(node.meta.get("val"))
                if isinstance(v, torch.Tensor)):
            return None  # a placeholder (an input, a parameter), or too big to evaluate
    env: dict[torch.fx.Node, Any] = {}
    try:
        with _eager():
            for node in order:
                if node.op == "get_attr":
                    env[node] = getattr(mode.tracer.root, node.target)
                    continue
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
                args, kwargs = _on_cpu(args), _on_cpu(kwargs)
                env[node] = node.target(*args, **kwargs)
    except Exception:  # an op that does not run on its own: the value stays unknown
        return None
    value = env[order[-1]]
    return value if isinstance(value, torch.Tensor) and value.device.type == "cpu" else None


def _ancestors(node: torch.fx.Node) -> list[torch.fx.Node]:
    """`node` and the nodes it is computed from, each after its inputs."""
    order: list[torch.fx.Node] = []
    done: set[torch.fx.Node] = set()
    stack = [(node, False)]
    while stack:
        n, expanded = stack.pop()
        if n in done:
            continue
        if expanded:
            done.add(n)
            order.append(n)
            continue
        stack.append((n, True))
        stack.extend((m, False) for m in n.all_input_nodes if m not in done)
    return order


def _on_cpu(tree: Any) -> Any:
    """Every device argument (`device=` of a factory op) as the CPU."""
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([torch.device("cpu") if isinstance(x, torch.device) else x
                           for x in leaves], spec)
