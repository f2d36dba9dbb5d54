"""Weight normalization (torch.nn.utils.weight_norm and parametrizations.weight_norm): w = g * v /
||v||. Both run the composite `_weight_norm`, which calls the fused `_weight_norm_interface` for
a norm over every dim but the first or the last, and `v * (g / norm_except_dim(v, 2, dim))`
otherwise (dim=None is -1: one norm of the whole tensor). No FLOPs (FlopCounterMode's
convention: a norm and pointwise ops)."""

from __future__ import annotations

import torch

from graphcost.rules.layout import is_contiguous, strides_of
from graphcost.rules.registry import OpCost, Out, RuleContext, TensorSpec, register

aten = torch.ops.aten


@register(aten._weight_norm_interface)
def weight_norm_interface_cost(ctx: RuleContext) -> OpCost:
    """Keeps v, g and its second output, the norms (float32 for bf16/fp16 weights)."""
    return OpCost(saved=ctx.saved_if_grad(ctx.inputs[0], ctx.inputs[1], Out(1)))


@register(aten.norm_except_dim)
def norm_except_dim_cost(ctx: RuleContext) -> OpCost:
    """||v|| over every dim but `dim` (ATen's composite, which export keeps whole): v.norm(pow)
    for dim -1, else the norm of `v.contiguous()` viewed as a matrix, transposed first when dim
    is neither the first nor the last. The norm keeps its input and its result: v itself, or
    the copy `.contiguous()` makes."""
    v = ctx.inputs[0]
    dim = ctx.arg(2, "dim", 0)
    if not ctx.requires_grad:
        return OpCost()
    if dim == -1:
        return OpCost(saved=(v, Out(0)))
    shape, strides = list(v.shape), strides_of(v)
    if dim != len(shape) - 1 and dim != 0:  # norm_except_dim(v.transpose(0, dim), pow, 0)
        shape[0], shape[dim] = shape[dim], shape[0]
        if strides is not None:
            strides = list(strides)
            strides[0], strides[dim] = strides[dim], strides[0]
    kept = v if is_contiguous(shape, strides) else TensorSpec(tuple(shape), v.dtype)
    return OpCost(saved=(kept, Out(0)))
