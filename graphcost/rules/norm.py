"""Normalization: layer_norm, rms_norm, batch_norm, group_norm. No FLOPs (FlopCounterMode's
convention); the statistics the kernels keep for backward are listed with their dtypes."""

from __future__ import annotations

import torch

from graphcost.rules.layout import is_dense_in, suggested_memory_format
from graphcost.rules.registry import OpCost, RuleContext, TensorSpec, Value, register

aten = torch.ops.aten


def _stats(x: Value, normalized_ndim: int, dtype: torch.dtype) -> TensorSpec:
    return TensorSpec(x.shape[: len(x.shape) - normalized_ndim] + (1,) * normalized_ndim, dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _stats_dtype(ctx: RuleContext, x: Value, weight) -> torch.dtype:
    """The CPU kernels keep their statistics in the input dtype, unless the weight's dtype
    differs (bf16 activations with fp32 weights under autocast: the mixed-type kernel keeps
    float32); CUDA keeps float32."""
    mixed = isinstance(weight, Value) and weight.dtype != x.dtype
    return x.dtype if ctx.device.kind == "cpu" and not mixed else _acc_dtype(x.dtype)


@register(aten.layer_norm)
def layer_norm_cost(ctx: RuleContext) -> OpCost:
    x = ctx.inputs[0]
    normalized = ctx.arg(1, "normalized_shape")
    weight, bias = ctx.arg(2, "weight"), ctx.arg(3, "bias")
    # NB: the CUDA dtypes in this file are PyTorch's documented kernels, not checked here (CPU).
    stats = _stats(x, len(normalized), _stats_dtype(ctx, x, weight))
    return OpCost(saved=ctx.saved_if_grad(x, weight, bias, stats, stats))


@register(aten.rms_norm)
def rms_norm_cost(ctx: RuleContext) -> OpCost:
    """rms_norm runs as its composite: upcast, pow, mean, add, rsqrt, mul, mul weight, cast back.

    Each step is recorded by autograd only if what it reads needs a gradient."""
    x = ctx.inputs[0]
    normalized = ctx.arg(1, "normalized_shape")
    weight = ctx.arg(2, "weight")
    acc = _acc_dtype(x.dtype)
    upcast = x if acc == x.dtype else TensorSpec(x.shape, acc)
    rstd = _stats(x, len(normalized), acc)
    saved = []
    if x.requires_grad:
        saved += [upcast, rstd, upcast, rstd]  # pow(x, 2) keeps x; rsqrt its result; x * rstd both
    if isinstance(weight, Value):
        if weight.requires_grad:
            saved.append(TensorSpec(x.shape, acc))  # x * rstd, kept for the weight's gradient
        if x.requires_grad:
            saved.append(weight)
    # Keep each extra tensor once: the same Python object stands for the same storage.
    unique = list({id(s): s for s in saved}.values())
    return OpCost(saved=tuple(unique) if ctx.requires_grad else (),
                  backward_workspace_bytes=_rms_norm_backward_workspace(x, weight, acc))


def _rms_norm_backward_workspace(x: Value, weight, acc: torch.dtype) -> int:
    """The composite's backward, node by node, beyond the gradients it returns. With u = x's
    size in the accumulation dtype: the incoming gradient upcast (u, when x is not already in
    it), the weight's product and its gradient before the sum (2u; the saved x * rstd, u, is
    released after it), then the gradient of x * rstd (u), the mean's gradient (u) and pow's
    backward (its gradient and two temporaries, 3u) all alive together: 5u at the peak, less
    the incoming gradient and x * rstd already counted, and x's gradient counted apart."""
    u = x.spec.numel * acc.itemsize
    weight_grad = isinstance(weight, Value) and weight.requires_grad
    if not x.requires_grad:
        return (u if weight_grad else 0) + (u if acc != x.dtype else 0)
    return 5 * u - x.spec.nbytes - (u if weight_grad else 0) - x.spec.nbytes


@register(aten.batch_norm)
def batch_norm_cost(ctx: RuleContext) -> OpCost:
    x = ctx.inputs[0]
    weight = ctx.arg(1, "weight")
    running_mean, running_var = ctx.arg(3, "running_mean"), ctx.arg(4, "running_var")
    training = ctx.arg(5, "training")
    channels = x.shape[1]
    dtype = _stats_dtype(ctx, x, weight)  # save_mean / save_invstd
    stats = TensorSpec((channels,), dtype) if training else TensorSpec((0,), x.dtype)
    saved = [x, weight, running_mean, running_var, stats, TensorSpec(stats.shape, stats.dtype)]
    return OpCost(saved=ctx.saved_if_grad(*(s for s in saved if s is not None)))


@register(aten.instance_norm)
def instance_norm_cost(ctx: RuleContext) -> OpCost:
    """batch_norm of x viewed as (1, N*C, ...): the affine and running-stat tensors are repeated
    N times (new tensors batch_norm keeps), the statistics are per (sample, channel)."""
    x = ctx.inputs[0]
    weight = ctx.arg(1, "weight")
    running_mean, running_var = ctx.arg(3, "running_mean"), ctx.arg(4, "running_var")
    use_input_stats = ctx.arg(5, "use_input_stats")
    folded = x.shape[0] * x.shape[1]
    kept_x = x if x.contiguous else TensorSpec(x.shape, x.dtype)  # input.contiguous().view(...)
    repeated = [TensorSpec((folded,), t.dtype) for t in (weight, running_mean, running_var)
                if t is not None]
    dtype = x.dtype if ctx.device.kind == "cpu" else _acc_dtype(x.dtype)
    stats = TensorSpec((folded,) if use_input_stats else (0,), dtype)
    return OpCost(saved=ctx.saved_if_grad(kept_x, *repeated, stats,
                                          TensorSpec(stats.shape, stats.dtype)))


@register(aten.group_norm)
def group_norm_cost(ctx: RuleContext) -> OpCost:
    """Eager group_norm (CompositeImplicit, aten/src/ATen/native/group_norm.cpp) runs
    native_group_norm on `X = input.contiguous(input.suggest_memory_format())` on the CPU
    (`input.contiguous()` on CUDA): an input that is not dense in that format (a transpose of a
    (B, T, C) activation) is copied, and autograd keeps the copy, with the per-group mean and
    rstd (with nothing recorded, the copy and the statistics are freed after the op). Its
    backward calls native_group_norm_backward with `grad.contiguous(X.suggest_memory_format())`:
    a copy of the incoming gradient when it is laid out otherwise, alive beside the gradients
    the backward returns."""
    x = ctx.inputs[0]
    groups = ctx.arg(1, "num_groups")
    weight = ctx.arg(2, "weight")
    # NB: mean and rstd in the input dtype, as the CPU kernel keeps them (CUDA not checked).
    stats = TensorSpec((x.shape[0], groups), x.dtype)
    suggested = suggested_memory_format(x)  # None: strides unknown
    channels_last = suggested not in (None, torch.contiguous_format)
    layout = suggested if channels_last and ctx.device.kind == "cpu" else torch.contiguous_format
    copied = is_dense_in(x, layout) is False
    if not ctx.requires_grad:
        return OpCost(forward_workspace_bytes=(x.spec.nbytes if copied else 0) + 2 * stats.nbytes)
    # NB: the incoming gradient's layout is not known to a rule; it is taken to be contiguous,
    # as most ops make it (those after a permute back from channels-last too), so it is copied
    # for a channels-last X. Not counted: a gradient that reaches the norm strided (a transpose
    # back after the norm hands its gradient on transposed: copied to contiguous) or
    # channels-last (a model that stays channels-last after the norm: not copied).
    kept_x = TensorSpec(x.shape, x.dtype) if copied else x
    return OpCost(saved=ctx.saved_if_grad(kept_x, weight, stats,
                                          TensorSpec(stats.shape, stats.dtype)),
                  backward_workspace_bytes=x.spec.nbytes if layout != torch.contiguous_format
                  else 0)
