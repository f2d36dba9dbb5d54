"""Convolutions and pooling. Convolution FLOPs come from torch.utils.flop_counter's conv formulas
(forward, and the input gradient when it is required). The weight gradient multiplies each
input element with each output gradient it met in the forward, one product for each forward
product, so it costs what the forward costs. torch's `conv_backward_flop` counts it as if
`groups` were 1, `groups` times too many for a grouped or depthwise convolution
(docs/rules.md); graphcost does not inherit that."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import conv_backward_flop, conv_flop

from graphcost.rules.registry import OpCost, Out, RuleContext, TensorSpec, register

aten = torch.ops.aten


def _conv(ctx: RuleContext, transposed: bool, output_padding, dilation, groups) -> OpCost:
    x, w = ctx.arg(0, "input"), ctx.arg(1, "weight")
    bias = ctx.arg(2, "bias")
    stride, padding = ctx.arg(3, "stride", 1), ctx.arg(4, "padding", 0)
    out = ctx.out
    forward = conv_flop(x.shape, w.shape, bias, stride, padding, dilation, transposed,
                        out_val=out.shape)
    backward = 0
    if ctx.requires_grad and x.requires_grad:
        backward += conv_backward_flop(out.shape, x.shape, w.shape, None, stride, padding,
                                       dilation, transposed, output_padding, groups,
                                       [True, False, False], out_val=(x.shape, w.shape, None))
    if ctx.requires_grad and w.requires_grad:
        backward += forward  # the weight gradient: one product for each of the forward's
    # NB: the bias gradient is a sum over the output gradient: no FLOPs, as FlopCounterMode counts
    return OpCost(forward_flops=forward, backward_flops=backward, saved=ctx.saved_if_grad(x, w))


@register(aten.conv1d, aten.conv2d, aten.conv3d)
def conv_cost(ctx: RuleContext) -> OpCost:
    # conv(input, weight, bias, stride, padding, dilation, groups)
    return _conv(ctx, False, None, ctx.arg(5, "dilation", 1), ctx.arg(6, "groups", 1))


@register(aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
def conv_transpose_cost(ctx: RuleContext) -> OpCost:
    # conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation)
    return _conv(ctx, True, ctx.arg(5, "output_padding", 0), ctx.arg(7, "dilation", 1),
                 ctx.arg(6, "groups", 1))


@register(aten.max_pool1d, aten.max_pool2d, aten.max_pool3d)
def max_pool_cost(ctx: RuleContext) -> OpCost:
    """Eager max_pool runs max_pool*_with_indices: with a gradient needed, the input and the
    int64 indices are kept; without one the indices still exist beside the output until the op
    returns (forward workspace). max_pool2d and max_pool3d always take that path; max_pool1d
    without a gradient takes an index-free CPU kernel on a plain run, but not under a dispatch
    mode (isTensorSubclassLike: the live tracker, FSDP2's DTensors), which graphcost models."""
    indices = TensorSpec(ctx.out.shape, torch.int64)
    if not ctx.requires_grad:
        return OpCost(forward_workspace_bytes=indices.nbytes)
    return OpCost(saved=(ctx.inputs[0], indices))


@register(aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d)
def avg_pool_cost(ctx: RuleContext) -> OpCost:
    return OpCost(saved=ctx.saved_if_grad(ctx.inputs[0]))


@register(aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d)
def adaptive_avg_pool_cost(ctx: RuleContext) -> OpCost:
    # A 1x1 output is computed as mean(), which keeps nothing; other sizes keep the input.
    output_size = ctx.arg(1, "output_size")
    if all(s == 1 for s in output_size):
        return OpCost()
    return OpCost(saved=ctx.saved_if_grad(ctx.inputs[0]))


@register(aten.adaptive_max_pool1d, aten.adaptive_max_pool2d, aten.adaptive_max_pool3d,
          aten.max_pool1d_with_indices, aten.max_pool2d_with_indices,
          aten.max_pool3d_with_indices)
def max_pool_with_indices_cost(ctx: RuleContext) -> OpCost:
    """The input and the int64 indices (the op's second output) are kept."""
    return OpCost(saved=ctx.saved_if_grad(ctx.inputs[0], Out(1)))
