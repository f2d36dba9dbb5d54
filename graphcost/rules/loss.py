"""Losses. cross_entropy runs as log_softmax + nll_loss: the log-probabilities, the targets and
nll_loss's 0-dim total weight are kept for backward."""

from __future__ import annotations

import torch

from graphcost.rules.registry import OpCost, RuleContext, TensorSpec, register

aten = torch.ops.aten


@register(aten.cross_entropy_loss)
def cross_entropy_cost(ctx: RuleContext) -> OpCost:
    logits, target = ctx.arg(0, "self"), ctx.arg(1, "target")
    weight = ctx.arg(2, "weight")
    label_smoothing = ctx.arg(5, "label_smoothing", 0.0) or 0.0
    if not ctx.requires_grad:
        return OpCost()
    log_probs = TensorSpec(logits.shape, logits.dtype)
    if target.dtype.is_floating_point:  # class probabilities: -(target * log_probs).sum()
        return OpCost(saved=(log_probs, target))
    saved = [log_probs, target, TensorSpec((), logits.dtype)]  # nll_loss: total_weight
    if weight is not None:
        saved.append(weight)
    # NB: label smoothing adds a weighted mean of the log-probabilities; nothing else is kept.
    del label_smoothing
    return OpCost(saved=tuple(saved))


@register(aten.nll_loss, aten.nll_loss_nd, aten.nll_loss2d)
def nll_loss_cost(ctx: RuleContext) -> OpCost:
    x, target = ctx.arg(0, "self"), ctx.arg(1, "target")
    return OpCost(saved=ctx.saved_if_grad(x, target, TensorSpec((), x.dtype)))


@register(aten.mse_loss, aten.l1_loss, aten.smooth_l1_loss, aten.huber_loss)
def regression_loss_cost(ctx: RuleContext) -> OpCost:
    return OpCost(saved=ctx.saved_if_grad(*ctx.inputs[:2]))
