"""Apply a checkpoint plan to a real module with torch.utils.checkpoint, the way a training
script would: the ground truth the scheduler's predictions are checked against, and a way to
run the policy graphcost chose.

    >>> from graphcost import analyze
    >>> from graphcost.models import SMALL_OVERRIDES, load
    >>> from graphcost.passes.checkpoint.policy import plan
    >>> cfg = SMALL_OVERRIDES["llama3-8b"]
    >>> p = plan(analyze(*load("llama3-8b", seq=8, **cfg)).graph, "full")
    >>> model, tokens = load("llama3-8b", seq=8, device="cpu", **cfg)
    >>> with checkpointed(model, p):
    ...     model(*tokens).sum().backward()  # blocks' activations recomputed in backward

Each region that covers modules (full, every-K, sqrt, save-matmuls, modules:...) wraps the
modules' forward in `torch.utils.checkpoint.checkpoint(use_reentrant=False)`; a region that
keeps some op outputs passes a `create_selective_checkpoint_contexts` context listing the
dispatcher ops those graph ops run as. A sqrt segment runs its blocks inside one checkpoint
(the first block's forward calls all of them; the others pass their input through). An
attention core (selective) is checkpointed by wrapping
`torch.nn.functional.scaled_dot_product_attention` while its module runs; one written out as
matmul/softmax/matmul cannot be reached from outside the module and raises.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from graphcost.errors import ConfigError
from graphcost.passes.checkpoint.policy import Plan, short_op

READS: tuple[str, ...] = ()  # graph attributes it reads itself: none (graph/schema.py)

aten = torch.ops.aten
# graph op (torch.export's training IR) -> the dispatcher ops it runs as in eager mode
_DISPATCH = {
    "linear": (aten.mm.default, aten.addmm.default),
    "matmul": (aten.mm.default, aten.bmm.default),
    "mm": (aten.mm.default,), "addmm": (aten.addmm.default,), "bmm": (aten.bmm.default,),
    "baddbmm": (aten.baddbmm.default,),
    "conv1d": (aten.convolution.default,), "conv2d": (aten.convolution.default,),
    "conv3d": (aten.convolution.default,), "convolution": (aten.convolution.default,),
    "scaled_dot_product_attention": (
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default),
}


def dispatch_ops(graph_ops: set[str]) -> list:
    """The dispatcher ops a selective checkpoint context must list to keep these graph ops'
    outputs."""
    out = []
    for op in sorted(graph_ops):
        ops = _DISPATCH.get(short_op(op))
        if ops is None:
            raise ConfigError(f"cannot keep {op!r} in a real selective checkpoint: its "
                              f"dispatcher ops are not known; keep one of {', '.join(_DISPATCH)}")
        out += [o for o in ops if o not in out]
    return out


@contextlib.contextmanager
def checkpointed(model: nn.Module, plan: Plan, *, preserve_rng_state: bool = True) -> Iterator:
    """Within the block, `model` runs with `plan`'s regions checkpointed (see module doc)."""
    patched: list[nn.Module] = []
    try:
        for region in plan.regions:
            if region.modules:
                modules = [model.get_submodule(p) for p in region.modules]
                context = None
                if region.save_ops:
                    context = functools.partial(create_selective_checkpoint_contexts,
                                                dispatch_ops(set(region.save_ops)))
                _wrap(modules, context, preserve_rng_state)
                patched += modules
            elif region.start == region.stop:  # a fused attention op, inside `within`
                module = model.get_submodule(region.within)
                _wrap_attention(module, preserve_rng_state)
                patched.append(module)
            else:
                raise ConfigError(
                    f"{region.name}: an attention core written out as matmul/softmax/matmul "
                    "cannot be checkpointed from outside its module; wrap that code in "
                    "torch.utils.checkpoint.checkpoint yourself, or use "
                    "F.scaled_dot_product_attention")
        yield model
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


def _wrap_attention(module: nn.Module, preserve_rng_state: bool) -> None:
    """While `module` runs, F.scaled_dot_product_attention runs inside a checkpoint."""
    forward = module.forward

    def run(*args, **kwargs):
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def checkpointed_sdpa(*a, **k):
            return checkpoint(sdpa, *a, use_reentrant=False,
                              preserve_rng_state=preserve_rng_state, **k)

        torch.nn.functional.scaled_dot_product_attention = checkpointed_sdpa
        try:
            return forward(*args, **kwargs)
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa

    module.forward = run


def _wrap(modules: list[nn.Module], context, preserve_rng_state: bool) -> None:
    forwards = [m.forward for m in modules]

    def run(x, *args, **kwargs):
        for f in forwards:
            x = f(x, *args, **kwargs)
        return x

    def first(*args, **kwargs):
        extra = {"context_fn": context} if context is not None else {}
        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state,
                          **extra, **kwargs)

    modules[0].forward = first
    for m in modules[1:]:
        m.forward = _pass_through


def _pass_through(x, *args, **kwargs):
    return x
