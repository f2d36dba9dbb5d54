"""Selection and scatter by index: no FLOPs (FlopCounterMode counts none); their backward keeps
the indices (tools/autograd/derivatives.yaml)."""

from __future__ import annotations

import torch

from graphcost.rules.registry import OpCost, Out, RuleContext, Value, register

aten = torch.ops.aten


@register(aten.topk, aten.max.dim, aten.min.dim, aten.kthvalue, aten.mode, aten.median.dim,
          aten.nanmedian.dim)
def topk_cost(ctx: RuleContext) -> OpCost:
    """Their backward scatters the gradient back through the chosen indices (output 1, int64)
    into zeros of the input's size, which it knows from the shape alone: in place, except
    under a dispatch mode (the live tracker, FSDP2's DTensors), where the zeros and the
    scattered copy exist together (value_selecting_reduction_backward)."""
    x = ctx.inputs[0]
    return OpCost(saved=ctx.saved_if_grad(Out(1)),
                  backward_workspace_bytes=x.spec.nbytes if ctx.requires_grad else 0)


@register(aten.sort)
def sort_cost(ctx: RuleContext) -> OpCost:
    """SortBackward scatters the gradient back through the permutation (output 1, int64)."""
    return OpCost(saved=ctx.saved_if_grad(Out(1)))


@register(aten.gather)
def gather_cost(ctx: RuleContext) -> OpCost:
    """gather(x, dim, index): the backward keeps x (for its shape and a sparse gradient) and the
    index it scatters the gradient through. Its gradient is zeros of x's shape with the
    incoming gradient scatter-added: in place, except under a dispatch mode (the live tracker,
    FSDP2's DTensors), where the zeros and the sum exist together."""
    x = ctx.arg(0, "self")
    return OpCost(saved=ctx.saved_if_grad(x, ctx.arg(2, "index")),
                  backward_workspace_bytes=x.spec.nbytes if ctx.requires_grad else 0)


@register(aten.index)
def index_cost(ctx: RuleContext) -> OpCost:
    """x[idx]: IndexBackward keeps the index tensors (index_put_ of the gradient)."""
    indices = [i for i in (ctx.arg(1, "indices") or []) if isinstance(i, Value)]
    return OpCost(saved=ctx.saved_if_grad(*indices))


@register(aten.index_select)
def index_select_cost(ctx: RuleContext) -> OpCost:
    """index_select(x, dim, index): the backward scatters the gradient through `index`."""
    index = ctx.arg(2, "index")
    return OpCost(saved=ctx.saved_if_grad(index))


@register(aten.index_add, aten.index_add_)
def index_add_cost(ctx: RuleContext) -> OpCost:
    """index_add(x, dim, index, source): source's gradient is grad.index_select(dim, index)
    expanded as source, which autograd keeps along with the index."""
    index, source = ctx.arg(2, "index"), ctx.arg(3, "source")
    saved = [index] + ([source] if ctx.needs_grad(source) else [])
    return OpCost(saved=ctx.saved_if_grad(*saved))


@register(aten.floor_divide)
def floor_divide_cost(ctx: RuleContext) -> OpCost:
    """Integer division: no gradient."""
    return OpCost()
