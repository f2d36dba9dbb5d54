"""Matrix multiplies: FLOPs from torch.utils.flop_counter's formulas; backward FLOPs only for the
operands that need a gradient; each operand is saved only if the *other* one needs a gradient."""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import bmm_flop, mm_flop

from graphcost.rules.registry import OpCost, RuleContext, TensorSpec, Value, register

aten = torch.ops.aten


def _as_2d(x: Value) -> tuple[int, int]:
    return (math.prod(x.shape[:-1]), x.shape[-1])


@register(aten.linear)
def linear_cost(ctx: RuleContext) -> OpCost:
    x, w = ctx.arg(0, "input"), ctx.arg(1, "weight")
    m, k = _as_2d(x)
    n = w.shape[0]
    flops = mm_flop((m, k), (k, n))
    backward = flops * (x.requires_grad + w.requires_grad)
    saved = []
    if ctx.requires_grad:
        if w.requires_grad:
            # NB: a non-contiguous 3D+ input is folded by a copy that is saved instead of it.
            saved.append(x if x.contiguous or len(x.shape) <= 2 else TensorSpec((m, k), x.dtype))
        if x.requires_grad:
            saved.append(w)
    return OpCost(forward_flops=flops, backward_flops=backward, saved=tuple(saved))


def _two_operand(ctx: RuleContext, a: Value, b: Value, flops: int) -> OpCost:
    saved = []
    if ctx.requires_grad:
        if b.requires_grad:
            saved.append(a)
        if a.requires_grad:
            saved.append(b)
    return OpCost(forward_flops=flops,
                  backward_flops=flops * (a.requires_grad + b.requires_grad),
                  saved=tuple(saved))


@register(aten.mm)
def mm_cost(ctx: RuleContext) -> OpCost:
    a, b = ctx.arg(0, "self"), ctx.arg(1, "mat2")
    return _two_operand(ctx, a, b, mm_flop(a.shape, b.shape))


@register(aten.addmm)
def addmm_cost(ctx: RuleContext) -> OpCost:
    a, b = ctx.arg(1, "mat1"), ctx.arg(2, "mat2")
    return _two_operand(ctx, a, b, mm_flop(a.shape, b.shape))


@register(aten.bmm)
def bmm_cost(ctx: RuleContext) -> OpCost:
    a, b = ctx.arg(0, "self"), ctx.arg(1, "mat2")
    return _two_operand(ctx, a, b, bmm_flop(a.shape, b.shape))


@register(aten.baddbmm)
def baddbmm_cost(ctx: RuleContext) -> OpCost:
    a, b = ctx.arg(1, "batch1"), ctx.arg(2, "batch2")
    return _two_operand(ctx, a, b, bmm_flop(a.shape, b.shape))


@register(aten.matmul)
def matmul_cost(ctx: RuleContext) -> OpCost:
    a, b = ctx.arg(0, "self"), ctx.arg(1, "other")
    if len(a.shape) == 1 and len(b.shape) <= 2:
        # dot / vector-matrix: dot and mv have no FLOP formula in FlopCounterMode.
        flops = 0 if len(b.shape) == 1 else mm_flop((1, a.shape[0]), b.shape)
    elif len(b.shape) == 1:
        flops = 0  # matrix-vector: mv has no FLOP formula either
    else:
        n, k = a.shape[-2], a.shape[-1]
        m = b.shape[-1]
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        flops = math.prod(batch) * mm_flop((n, k), (k, m))
    # NB: an operand that is broadcast across batch dimensions is saved as its expanded copy.
    return _two_operand(ctx, a, b, flops)
