"""Pointwise ops and reductions: no FLOPs (FlopCounterMode's convention: they are memory-bound and
costed by bytes moved); what autograd saves follows tools/autograd/derivatives.yaml."""

from __future__ import annotations

import torch

from graphcost.rules.registry import OpCost, Out, RuleContext, TensorSpec, Value, register

aten = torch.ops.aten


@register(aten.add, aten.sub, aten.rsub, aten.neg, aten.mean, aten.sum, aten.add_, aten.sub_,
          aten.gt, aten.lt, aten.ge, aten.le, aten.eq, aten.ne, aten.logical_not,
          aten.logical_and, aten.logical_or, aten.logical_xor, aten.bitwise_not,
          aten.bitwise_and, aten.bitwise_or, aten.bitwise_xor, aten.argmax, aten.argmin,
          aten.upsample_nearest2d, aten.upsample_bilinear2d, aten.upsample_nearest1d,
          aten.upsample_linear1d, aten.upsample_bicubic2d, aten.zero_, aten.fill_, aten.copy_,
          aten.sign, aten.floor, aten.ceil, aten.round, aten.trunc,
          aten.randn_like, aten.rand_like, aten.one_hot, aten.bernoulli, aten.bernoulli_,
          aten.uniform_, aten.normal_)
def nothing_saved(ctx: RuleContext) -> OpCost:
    """No FLOPs and nothing kept for backward. Listed, down to the ops that cost nothing at all,
    so that "unsupported" means unknown: a gradient that needs no tensor (add, sum), a zero
    gradient (sign, the roundings) or none (comparisons, random tensors,
    one_hot's int64 output)."""
    return OpCost()


@register(aten.cumsum)
def cumsum_cost(ctx: RuleContext) -> OpCost:
    """Keeps nothing. Its backward is the reversed cumsum of the gradient,
    grad.flip(dim).cumsum(dim).flip(dim): the first flip and the cumsum (one gradient each)
    exist beside the result until the expression ends."""
    out, dim = ctx.out, ctx.arg(1, "dim")
    if not ctx.requires_grad or out is None or out.numel <= 1 or out.shape[dim] == 1:
        return OpCost()
    return OpCost(backward_workspace_bytes=2 * out.nbytes)


# NB: a Python number operand (x * 0.5) becomes a 0-dim "wrapped number" tensor that autograd
# keeps for mul/div, but saved_tensors_hooks never see it and it lives on the host, never in
# device memory: it is not an activation, so it is not listed.


@register(aten.mul, aten.mul_)
def mul_cost(ctx: RuleContext) -> OpCost:
    """d/da = grad * b, d/db = grad * a. The product for a broadcast operand (an RMSNorm's
    weight) is made at the output's size and reduced by autograd's engine after the backward
    returns: each such product is alive beside the reduced gradient (backward workspace)."""
    a, b = ctx.arg(0, "self"), ctx.arg(1, "other")
    saved = []
    if ctx.needs_grad(a) and isinstance(b, Value):  # d/da = b
        saved.append(b)
    if ctx.needs_grad(b):  # d/db = a
        saved.append(a)
    out = ctx.out
    # (reduced in the product's dtype, then cast to the operand's: an RMSNorm's bf16 weight
    # times its fp32 normalized input)
    workspace = sum(out.nbytes + v.spec.numel * max(0, out.dtype.itemsize - v.dtype.itemsize)
                    for v in (a, b) if ctx.needs_grad(v) and v.spec.numel < out.numel)
    return OpCost(saved=ctx.saved_if_grad(*saved),
                  backward_workspace_bytes=workspace if ctx.requires_grad else 0)


@register(aten.div, aten.div_)
def div_cost(ctx: RuleContext) -> OpCost:
    a, b = ctx.arg(0, "self"), ctx.arg(1, "other")
    saved = []
    if (ctx.needs_grad(a) or ctx.needs_grad(b)) and isinstance(b, Value):
        saved.append(b)
    if ctx.needs_grad(b):
        saved.append(a)
    return OpCost(saved=ctx.saved_if_grad(*saved))


@register(aten.remainder, aten.fmod)
def remainder_cost(ctx: RuleContext) -> OpCost:
    """d/da = 1; d/db = -floor(a / b) (remainder) or -trunc(a / b) (fmod): a and b are kept
    only for b's gradient."""
    a, b = ctx.arg(0, "self"), ctx.arg(1, "other")
    return OpCost(saved=ctx.saved_if_grad(a, b) if ctx.needs_grad(b) else ())


@register(aten.pow)
def pow_cost(ctx: RuleContext) -> OpCost:
    """x ** 2 keeps x; a tensor exponent also needs the result for its gradient:
    2 ** e keeps e and the result, x ** e keeps x, e and the result."""
    base, exponent = ctx.arg(0, "self"), ctx.arg(1, "exponent")
    if not isinstance(exponent, Value):
        # Its backward, grad * (exponent * x.pow(exponent - 1)), holds two x-sized temporaries
        # beside the gradient it returns (none for exponent 0: zeros_like).
        temporaries = 2 if ctx.needs_grad(base) and exponent != 0 else 0
        return OpCost(saved=ctx.saved_if_grad(base),
                      backward_workspace_bytes=temporaries * ctx.out.nbytes)
    if not isinstance(base, Value):
        return OpCost(saved=ctx.saved_if_grad(exponent, Out(0)))
    return OpCost(saved=ctx.saved_if_grad(base, exponent, Out(0)))


@register(aten.gelu, aten.silu, aten.log, aten.sin, aten.cos, aten.abs,
          aten.clamp, aten.clamp_min, aten.clamp_max, aten.leaky_relu,
          aten.hardtanh, aten.elu, aten.softplus, aten.mish, aten.hardswish, aten.log1p,
          aten.erf, aten.square, aten.hardsigmoid, aten.glu, aten.selu, aten.celu, aten.atan2,
          aten.var, aten._prelu_kernel, aten.xlogy, aten.clamp_, aten.clamp_min_,
          aten.clamp_max_)
def saves_input(ctx: RuleContext) -> OpCost:
    # Every tensor argument: clamp.Tensor keeps its min/max tensors too, prelu its weight,
    # xlogy both operands. square runs as pow(self, 2). An in-place clamp keeps a clone of its
    # input (graphcost/analysis/annotate.py: _clone_overwritten).
    return OpCost(saved=ctx.saved_if_grad(*ctx.inputs))


@register(aten.cumprod, aten.logsumexp, aten.amax, aten.amin, aten.linalg_vector_norm,
          aten.norm, aten.std)
def saves_input_and_output(ctx: RuleContext) -> OpCost:
    """Reductions and scans whose gradient needs the input and the result (amax's ties, the
    norm's and std's division by the result, logsumexp's exp(x - result))."""
    return OpCost(saved=ctx.saved_if_grad(ctx.inputs[0], Out(0)))


@register(aten.log_sigmoid)
def log_sigmoid_cost(ctx: RuleContext) -> OpCost:
    """log_sigmoid runs log_sigmoid_forward, which keeps the input and a buffer: input-sized on
    the CPU, empty on CUDA."""
    x = ctx.inputs[0]
    # NB: the CUDA branch is not checked here (no GPU); the CPU one is.
    buffer = TensorSpec(x.shape if ctx.device.kind == "cpu" else (0,), x.dtype)
    return OpCost(saved=ctx.saved_if_grad(x, buffer))


@register(aten.minimum, aten.maximum, aten.min.other, aten.max.other)
def elementwise_min_max_cost(ctx: RuleContext) -> OpCost:
    """minimum(a, b): the gradient goes to the smaller (split on ties): both are kept. Each
    input's gradient is `where(a == b, grad / 2, grad).masked_fill_(a < b, 0)`
    (derivatives.yaml), one expression after the other: at the second, grad / 2 (the gradient's
    size) and two bool masks are alive beside the first gradient, and freed with the
    expression (the same with one gradient to make)."""
    # NB: a broadcast operand's gradient is made at the output's size and reduced (sum_to)
    # only after both are made; that unreduced gradient is not counted here.
    out = ctx.out
    workspace = out.nbytes + 2 * out.numel * torch.bool.itemsize if ctx.requires_grad else 0
    return OpCost(saved=ctx.saved_if_grad(*ctx.inputs), backward_workspace_bytes=workspace)


@register(aten.rsqrt, aten.sqrt, aten.exp, aten.tanh, aten.sigmoid, aten.relu, aten.relu_,
          aten.reciprocal,
          aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten._safe_softmax,
          aten.tanh_, aten.sigmoid_, aten.exp_)
def saves_output(ctx: RuleContext) -> OpCost:
    return OpCost(saved=ctx.saved_if_grad(Out(0)))


# In-place activations (nn.SiLU(inplace=True) and the like). The result lives in the input's
# storage. Where the gradient needs the input the kernel overwrites, autograd's generated code
# (VariableType) clones it before the kernel runs (`original_self = self.clone()`, only when the
# op is recorded) and keeps the clone: a new input-sized tensor, alive until the backward.


@register(aten.silu_, aten.hardswish_, aten.mish_, aten.hardsigmoid_, aten.hardtanh_,
          aten.relu6_, aten.threshold_)
def inplace_saves_a_copy_of_its_input(ctx: RuleContext) -> OpCost:
    """silu_, hardswish_, mish_, hardsigmoid_, hardtanh_ (nn.ReLU6), relu6_ (hardtanh_ in
    eager), threshold_: the gradient is a function of the original input, so autograd keeps
    its clone."""
    x = ctx.inputs[0]
    return OpCost(saved=ctx.saved_if_grad(TensorSpec(x.shape, x.dtype)))


@register(aten.elu_, aten.leaky_relu_, aten.celu_, aten.selu_)
def inplace_saves_its_result(ctx: RuleContext) -> OpCost:
    """elu_, leaky_relu_, celu_, selu_ (elu_ in eager): the gradient is computed from the
    result (`is_result=true` in derivatives.yaml), which is the overwritten input: no copy."""
    return OpCost(saved=ctx.saved_if_grad(Out(0)))


@register(aten.rrelu_)
def inplace_rrelu_cost(ctx: RuleContext) -> OpCost:
    """rrelu_ runs rrelu_with_noise_(x, empty_like(x)), train or eval: autograd keeps the noise
    (a new input-sized tensor) and the result."""
    x = ctx.inputs[0]
    noise = TensorSpec(x.shape, x.dtype)
    if not ctx.requires_grad:
        return OpCost(forward_workspace_bytes=noise.nbytes)  # made, filled, freed after the op
    return OpCost(saved=(noise, Out(0)))


@register(aten.masked_fill, aten.masked_fill_)
def masked_fill_cost(ctx: RuleContext) -> OpCost:
    return OpCost(saved=ctx.saved_if_grad(ctx.arg(1, "mask")))


@register(aten.where)
def where_cost(ctx: RuleContext) -> OpCost:
    return OpCost(saved=ctx.saved_if_grad(ctx.arg(0, "condition")))


FEATURE_DROPOUTS = (aten.feature_dropout.default, aten.feature_alpha_dropout.default,
                    aten.feature_dropout_.default, aten.feature_alpha_dropout_.default)
ALPHA_DROPOUTS = (aten.alpha_dropout.default, aten.feature_alpha_dropout.default,
                  aten.alpha_dropout_.default, aten.feature_alpha_dropout_.default)


@register(aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.feature_alpha_dropout,
          aten.dropout_, aten.feature_dropout_, aten.alpha_dropout_, aten.feature_alpha_dropout_)
def dropout_cost(ctx: RuleContext) -> OpCost:
    """Eager dropout on the CPU (ATen's _dropout_impl, the in-place forms `dropout_` etc. of
    nn.Dropout(inplace=True) alike): `noise = empty_like(x).bernoulli_(1 - p).div_(1 - p)`, then
    `x * noise` (`x.mul_(noise)` in place); feature dropout draws one value per (sample,
    channel). Autograd keeps the noise. It is made whether or not a gradient is needed: when
    nothing is recorded it lives beside the output at the multiply and is freed after it.
    Alpha dropout also makes `b = (noise - 1) * alpha_a + alpha_a * p` (noise-sized), added
    to the product after it and then freed."""
    p, train = ctx.arg(1, "p"), ctx.arg(2, "train")
    x = ctx.inputs[0]
    if not train or p == 0:
        return OpCost(output_is_input=0)  # eager returns the input itself (traced: a copy)
    if p == 1:
        noise = TensorSpec((), x.dtype)  # input * zeros(()): a 0-dim zero
    elif ctx.op == aten.dropout.default and ctx.device.kind == "cuda":
        # CUDA dropout is the fused native_dropout kernel: it keeps a boolean mask.
        # NB: not checked here (no GPU); the CPU branches are.
        noise = TensorSpec(x.shape, torch.bool)
    else:
        shape = x.shape
        if ctx.op in FEATURE_DROPOUTS:
            shape = x.shape[:2] + (1,) * (len(x.shape) - 2)
        noise = TensorSpec(shape, x.dtype)
    alpha_b = noise.nbytes if ctx.op in ALPHA_DROPOUTS and p != 1 else 0
    if not ctx.requires_grad:
        return OpCost(forward_workspace_bytes=noise.nbytes + alpha_b)
    return OpCost(saved=(noise,), forward_workspace_bytes=alpha_b)


@register(aten.native_dropout)
def native_dropout_cost(ctx: RuleContext) -> OpCost:
    """The fused dropout kernel (output, boolean mask), which a model or a decomposition can
    call directly: on the CPU it is costed as eager dropout, input * noise (dropout_cost), on
    CUDA as this kernel, which keeps its mask."""
    p, train = ctx.arg(1, "p"), ctx.arg(2, "train")
    if not ctx.requires_grad or not train or p == 0:
        return OpCost()
    if ctx.device.kind == "cuda" and 0 < p < 1:
        return OpCost(saved=(Out(1),))  # NB: not checked here (no GPU)
    return dropout_cost(ctx)
