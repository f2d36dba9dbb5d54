"""Where torch.compile would split a model into several graphs (its graph breaks), asked of
dynamo itself: `torch._dynamo.explain` runs the model on fake CPU tensors (a copy of the module
whose parameters and buffers are fake; nothing is allocated) and reports each break with its
reason and the line of the model's source that caused it.

graphcost.passes.compiled partitions a model as one graph. Where dynamo would break it, what
is kept and held around the breaks differs (a graph's outputs are materialized, the ops between
graphs run eagerly), and reports say so, naming the breaks.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

from graphcost.trace.blocks import find_repeated_blocks, first_blocks
from graphcost.trace.fake_kernels import shape_only_kernels

# the graph attributes it reads (graphcost/graph/schema.py): none, it runs dynamo
READS: tuple[str, ...] = ()


def graph_breaks(module: nn.Module, example_inputs: tuple,
                 kwargs: dict | None = None) -> tuple[str, ...]:
    """The distinct places torch.compile would break `module(*example_inputs, **kwargs)`, one
    line each ('file:line: reason'); () when it compiles into one graph. A stack of identical
    blocks is asked with its first block only: a break in one block is in every block.
    UnknownBreaks: dynamo cannot run the model on fake tensors (a data-dependent op, such as
    `.item()` deciding a branch, is a graph break it then runs on values)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    blocks = find_repeated_blocks(module)
    mode = FakeTensorMode()
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.CRITICAL)  # dynamo's own lines about the breaks: ours say it once
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if blocks is not None and blocks.count > 1:
                with first_blocks(module, blocks, 1):
                    fake = _fake_copy(module, mode)
            else:
                fake = _fake_copy(module, mode)
            with mode, shape_only_kernels():
                args, kw = torch.utils._pytree.tree_map_only(
                    torch.Tensor, lambda t: _fake(t, mode), (tuple(example_inputs), kwargs or {}))
                torch._dynamo.reset()
                explained = torch._dynamo.explain(fake)(*args, **kw)
    except Exception as exc:  # dynamo could not run it here
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise UnknownBreaks(f"{type(exc).__name__}: {first}") from exc
    finally:
        torch._dynamo.reset()
        torch_log.setLevel(level)
    lines = []
    for r in explained.break_reasons:
        frame = r.user_stack[-1] if r.user_stack else None
        where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}: " if frame else ""
        text = str(r.reason).strip()
        reason = next((line.strip().removeprefix("Explanation: ") for line in text.splitlines()
                       if line.strip().startswith("Explanation:")), None)
        lines.append(where + (reason or f"dynamo: {text.splitlines()[0] if text else '?'}")[:200])
    return tuple(dict.fromkeys(lines))


class UnknownBreaks(Exception):
    """Dynamo could not run the model on fake tensors: its graph breaks are not known."""


def _fake(t: torch.Tensor, mode) -> torch.Tensor:
    with mode:
        x = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
    return x.requires_grad_(t.requires_grad) if t.is_floating_point() else x


def _fake_copy(module: nn.Module, mode) -> nn.Module:
    """A copy of `module` whose parameters and buffers are fake CPU tensors."""
    fake = copy.deepcopy(module)
    for m in fake.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = nn.Parameter(_fake(p.detach(), mode),
                                                   requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = _fake(b, mode)
    return fake


__all__ = ["UnknownBreaks", "graph_breaks"]
