"""Losses. cross_entropy runs as log_softmax + nll_loss: the log-probabilities, the targets and
nll_loss's 0-dim total weight are kept for backward. Its backward holds the gradient of the
log-probabilities (nll_loss's, a logits-sized tensor) while log_softmax's backward makes the
logits' gradient: that tensor is the rule's backward workspace."""

from __future__ import annotations

import math

import torch

from graphcost.rules.registry import OpCost, Out, RuleContext, TensorSpec, Value, register

aten = torch.ops.aten


MEAN = 1  # at::Reduction::Mean


@register(aten.cross_entropy_loss)
def cross_entropy_cost(ctx: RuleContext) -> OpCost:
    """log_softmax, then nll_loss (class indices) or -(log_probs * target) (class
    probabilities); label smoothing adds a smoothing term (ATen's LossNLL.cpp)."""
    logits, target = ctx.arg(0, "self"), ctx.arg(1, "target")
    weight = ctx.arg(2, "weight")
    reduction = ctx.arg(3, "reduction", MEAN)
    label_smoothing = ctx.arg(5, "label_smoothing", 0.0) or 0.0
    if not ctx.requires_grad:
        return OpCost()
    log_probs = TensorSpec(logits.shape, logits.dtype)
    workspace = log_probs.nbytes  # d loss / d log_probs, alive during log_softmax's backward
    if target.dtype.is_floating_point:  # class probabilities: -(log_probs * target * weight)
        if label_smoothing > 0:  # target * (1 - ls) + ls / C: a new tensor
            target = TensorSpec(target.shape, target.dtype)
        return OpCost(saved=(log_probs, target) + ((weight,) if weight is not None else ()),
                      backward_workspace_bytes=workspace)
    if len(logits.shape) == 3 and not target.contiguous:
        # nll_loss_nd reshapes (N, C, d) to 4-d for nll_loss2d: a non-contiguous target is
        # copied, and the copy is what it keeps (checked against autograd)
        target = TensorSpec(target.shape, target.dtype)
    saved = [log_probs, target, TensorSpec((), logits.dtype)]  # nll_loss: total_weight
    if weight is not None:
        saved.append(weight)
    if label_smoothing > 0:
        # -(log_probs [* weight]).sum(class_dim), masked_fill_(target == ignore_index, 0):
        # the mask is kept; a mean divides by a 0-dim count (int64) or weight sum.
        saved.append(TensorSpec(target.shape, torch.bool))
        if reduction == MEAN:
            saved.append(TensorSpec((), torch.int64 if weight is None else weight.dtype))
    return OpCost(saved=tuple(saved), backward_workspace_bytes=workspace)


@register(aten.nll_loss, aten.nll_loss_nd, aten.nll_loss2d)
def nll_loss_cost(ctx: RuleContext) -> OpCost:
    x, target, weight = ctx.arg(0, "self"), ctx.arg(1, "target"), ctx.arg(2, "weight")
    return OpCost(saved=ctx.saved_if_grad(x, target, TensorSpec((), x.dtype), weight))


@register(aten.mse_loss, aten.smooth_l1_loss, aten.huber_loss)
def regression_loss_cost(ctx: RuleContext) -> OpCost:
    """Keeps the input and the target. On the CPU, mse_loss and smooth_l1_loss compute the
    elementwise loss and reduce it in place: the reduced 0-dim result keeps a storage of the
    unreduced size (checked: untyped_storage().nbytes()); huber_loss does not."""
    x, target = ctx.inputs[:2]
    storage = None
    if ctx.device.kind == "cpu" and ctx.op in (aten.mse_loss.default, aten.smooth_l1_loss.default) \
            and ctx.arg(2, "reduction", MEAN) != 0:
        shape = torch.broadcast_shapes(x.shape, target.shape)
        storage = {0: math.prod(shape) * ctx.out.dtype.itemsize}
    return OpCost(saved=ctx.saved_if_grad(x, target), output_storage_bytes=storage)


@register(aten.l1_loss)
def l1_loss_cost(ctx: RuleContext) -> OpCost:
    """(input - target).abs(), reduced: abs keeps the difference, a new tensor; the absolute
    values exist beside it until the reduction is done (reduction "none": they are the
    output)."""
    x, target = ctx.inputs[0], ctx.inputs[1]
    diff = TensorSpec(tuple(torch.broadcast_shapes(x.shape, target.shape)),
                      torch.promote_types(x.dtype, target.dtype))
    saved = ctx.saved_if_grad(diff)
    reduced = ctx.arg(2, "reduction", 1) != 0
    workspace = diff.nbytes * reduced + (0 if saved else diff.nbytes)
    return OpCost(saved=saved, forward_workspace_bytes=workspace)


@register(aten.binary_cross_entropy_with_logits, aten.binary_cross_entropy)
def binary_cross_entropy_cost(ctx: RuleContext) -> OpCost:
    """Both keep the input, the target and the optional (pos_)weight."""
    return OpCost(saved=ctx.saved_if_grad(*ctx.inputs))


SUM = 2  # at::Reduction::Sum


def _ctc_alpha_width(ctx: RuleContext, targets) -> int:
    """The longest target: known from the int lengths; from tensor lengths (values), the padded
    targets' width, or for concatenated targets their total.
    NB: with tensor lengths that is exact when the longest target fills the padding (or for a
    batch of one); otherwise log_alpha is counted wider than it is."""
    lengths = ctx.arg(3, "target_lengths")
    if isinstance(lengths, (list, tuple)) and lengths and not isinstance(lengths[0], Value):
        return max(int(n) for n in lengths)
    return targets.shape[-1] if len(targets.shape) == 2 else targets.shape[0]


@register(aten.ctc_loss)
def ctc_loss_cost(ctx: RuleContext) -> OpCost:
    """F.ctc_loss (kept whole: it is composite, and eager turns the lengths into int lists, not
    the tensors export's fake run would keep). It runs _ctc_loss on the targets as int64, which
    keeps the log-probabilities, the targets, the per-sample negative log-likelihood (N,) and
    log_alpha (N, T, 2 * longest target + 1); zero_infinity's where keeps its (N,) mask; a mean
    divides by the target lengths as a tensor of the loss's dtype, which it keeps. No FLOPs (no
    formula in FlopCounterMode: a recursion of pointwise log-sum-exps)."""
    log_probs, targets = ctx.arg(0, "log_probs"), ctx.arg(1, "targets")
    reduction, zero_infinity = ctx.arg(5, "reduction", MEAN), ctx.arg(6, "zero_infinity", False)
    if not ctx.requires_grad:
        return OpCost()
    t, n = log_probs.shape[0], (log_probs.shape[1] if len(log_probs.shape) == 3 else 1)
    dtype = log_probs.dtype
    kept = [log_probs,
            targets if targets.dtype == torch.int64 else TensorSpec(targets.shape, torch.int64),
            TensorSpec((n,), dtype),
            TensorSpec((n, t, 2 * _ctc_alpha_width(ctx, targets) + 1), dtype)]
    if zero_infinity:
        kept.append(TensorSpec((n,), torch.bool))
    if reduction == MEAN:
        kept.append(TensorSpec((n,), dtype))
    return OpCost(saved=tuple(kept))


@register(aten._ctc_loss)
def _ctc_loss_cost(ctx: RuleContext) -> OpCost:
    """The kernel alone: the log-probabilities, the targets and both its outputs."""
    return OpCost(saved=ctx.saved_if_grad(ctx.arg(0, "log_probs"), ctx.arg(1, "targets"),
                                          Out(0), Out(1)))
