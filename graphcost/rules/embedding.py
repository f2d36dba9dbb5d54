"""Embedding lookups: no FLOPs; the backward keeps the indices."""

from __future__ import annotations

import torch

from graphcost.rules.registry import OpCost, RuleContext, register

aten = torch.ops.aten


@register(aten.embedding)
def embedding_cost(ctx: RuleContext) -> OpCost:
    weight, indices = ctx.arg(0, "weight"), ctx.arg(1, "indices")
    return OpCost(saved=ctx.saved_if_grad(indices) if weight.requires_grad else ())
