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
    """rms_norm kept whole: for a CUDA target (for a CPU one trace replaces it by the ops of its
    composite, rms_norm_composite in layer_norm.cpp, graphcost/trace/decompose.py):
    `up = x.to(acc); rstd = rsqrt(pow(up, 2).mean(-1, keepdim).add_(eps)); y = up * rstd`,
    then `y * weight` and `.type_as(x)`. Each step is recorded by autograd only if what it reads
    needs a gradient; its memory inside the op and inside its backward is simulated below."""
    # NB: on CUDA (same dtypes, not channels-last) rms_norm is the fused _fused_rms_norm kernel,
    # with its own backward; this rule costs the composite there (not checked: no GPU).
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
    composite = _RmsNorm(x, weight, acc, rstd.nbytes, ctx.out.nbytes)
    return OpCost(saved=tuple(unique) if ctx.requires_grad else (),
                  forward_workspace_bytes=composite.forward_workspace(ctx.requires_grad),
                  backward_workspace_bytes=composite.backward_workspace()
                  if ctx.requires_grad else 0)


class _Live:
    """Bytes alive through a composite's ops, freed as eager frees them; `peak` is the most
    alive after any op."""

    def __init__(self, **alive: int) -> None:
        self.alive = dict(alive)
        self.peak = sum(self.alive.values())

    def make(self, name: str, nbytes: int) -> None:
        self.alive[name] = nbytes
        self.peak = max(self.peak, self.total)

    def free(self, *names: str) -> None:
        for name in names:
            self.alive.pop(name, None)

    @property
    def total(self) -> int:
        return sum(self.alive.values())


class _RmsNorm:
    """rms_norm's composite, op by op, for the memory it holds inside the forward and inside
    its backward beyond what graphcost counts at the node (output, saved tensors, incoming
    gradient, returned gradients). With n = x's elements: ua = n in the accumulation dtype,
    s = the (..., 1) statistics."""

    def __init__(self, x: Value, weight, acc: torch.dtype, stats_bytes: int,
                 out_bytes: int) -> None:
        n = x.spec.numel
        self.x_grad = x.requires_grad
        self.affine = isinstance(weight, Value)
        self.w_grad = self.affine and weight.requires_grad
        self.upcast = acc != x.dtype
        product = torch.promote_types(acc, weight.dtype) if self.affine else acc
        self.cast = product != x.dtype  # .type_as(x) makes the output
        self.ua, self.s, self.out, self.ux = n * acc.itemsize, stats_bytes, out_bytes, x.spec.nbytes
        self.uprod = n * product.itemsize
        self.w_bytes = weight.spec.nbytes if self.affine else 0
        self.w_sum = weight.spec.numel * product.itemsize if self.affine else 0

    def forward_workspace(self, recorded: bool) -> int:
        """The peak inside the forward less what outlives it (the output and the saved
        tensors): pow(up, 2) and the mean beside rstd; y * weight beside a y not kept (a frozen
        weight); the product beside the cast that makes the output."""
        keep_up = recorded and self.x_grad and self.upcast
        keep_rstd = recorded and self.x_grad
        keep_y = recorded and self.w_grad
        live = _Live()
        if self.upcast:
            live.make("up", self.ua)
        live.make("pow", self.ua)
        live.make("mean", self.s)  # eps is added in place
        live.make("rstd", self.s)
        live.free("pow", "mean")
        live.make("y", self.ua)
        result = "y"
        if self.affine:
            live.make("product", self.uprod)
            if not keep_y:
                live.free("y")
            result = "product"
        if not keep_up:
            live.free("up")  # before the cast (rstd only after it)
        if self.cast:
            live.make("out", self.out)
            live.free(result)
        if not keep_rstd:
            live.free("rstd")
        return max(0, live.peak - live.total)

    def backward_workspace(self) -> int:
        """The peak of the composite's backward, node by node, less the incoming gradient, the
        saved tensors and the gradients it returns (all held at graphcost's one backward
        event): the cast's gradient upcast; y * weight's gradients (the weight's before its
        sum); up * rstd's (rstd's before its sum); rsqrt's and the mean's; pow's (its gradient,
        two temporaries and the result) beside the part of x's gradient made by up * rstd; their
        sum; the cast of x's gradient back to its dtype."""
        ua, s = self.ua, self.s
        saved = {"up": ua if self.x_grad and self.upcast else 0,
                 "rstd": s if self.x_grad else 0, "y": ua if self.w_grad else 0}
        live = _Live(grad=self.out, **saved)
        counted = live.total + (self.ux if self.x_grad else 0) + (
            self.w_bytes if self.w_grad else 0)
        grad = "grad"
        if self.cast:  # ToCopyBackward
            live.make("grad_product", self.uprod)
            live.free("grad")
            grad = "grad_product"
        grad_y = grad
        if self.affine:  # MulBackward of y * weight
            if self.x_grad:
                live.make("grad_y", ua)
                grad_y = "grad_y"
            if self.w_grad:
                live.make("grad_w_full", self.uprod)
                live.make("grad_w", self.w_sum)  # sum_to the weight's shape
                live.free("grad_w_full")
                if self.w_sum != self.w_bytes:
                    live.make("grad_w_cast", self.w_bytes)
                    live.free("grad_w")
            live.free(grad, "y")
        if self.x_grad:
            live.make("grad_up_a", ua)  # MulBackward of up * rstd: grad_y * rstd
            live.make("grad_rstd_full", ua)  # grad_y * up, summed to rstd's shape
            live.make("grad_rstd", s)
            live.free("grad_rstd_full", grad_y)
            for temporary in ("rstd_cubed", "scaled", "grad_mean"):  # rsqrt's backward
                live.make(temporary, s)
            live.free("rstd_cubed", "scaled", "grad_rstd", "rstd")
            live.make("grad_pow", ua)  # the mean's backward: expand / n
            live.free("grad_mean")
            for temporary in ("up_pow_1", "scaled_up", "grad_up_b"):  # pow's backward
                live.make(temporary, ua)
            live.free("up_pow_1", "scaled_up", "grad_pow", "up")
            live.make("grad_up", ua)  # the two parts summed
            live.free("grad_up_a", "grad_up_b")
            if self.upcast:
                live.make("grad_x", self.ux)  # ToCopyBackward to x's dtype
        # NB: x's gradient is made in two parts (from up * rstd, then from pow), summed at the
        # end; graphcost's one event holds the whole of it from the start. Where x already has
        # a gradient waiting (a residual stream's skip connection) and is not upcast, eager adds
        # the first part to it midway (no second input-sized buffer at pow's backward), so the
        # backward peak here is high by up to x's bytes; the walk would need the partial
        # delivery.
        return max(0, live.peak - counted)


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
