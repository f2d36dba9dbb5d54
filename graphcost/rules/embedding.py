"""Embedding lookups: no FLOPs (gathers and, for bags, sums: FlopCounterMode has no formula and,
by its convention, none is due); the backward keeps the indices."""

from __future__ import annotations

import torch

from graphcost.rules.layout import strides_of
from graphcost.rules.registry import OpCost, RuleContext, TensorSpec, Value, register

aten = torch.ops.aten

SUM, MEAN, MAX = 0, 1, 2  # EmbeddingBagMode
FAST_SUM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@register(aten.embedding)
def embedding_cost(ctx: RuleContext) -> OpCost:
    weight, indices = ctx.arg(0, "weight"), ctx.arg(1, "indices")
    return OpCost(saved=ctx.saved_if_grad(indices) if weight.requires_grad else ())


@register(aten.embedding_bag, aten._embedding_bag)
def embedding_bag_cost(ctx: RuleContext) -> OpCost:
    """nn.EmbeddingBag / F.embedding_bag. `embedding_bag` is kept whole (it is composite: it runs
    `_embedding_bag` on contiguous indices and offsets when the table or the per-sample weights
    need a gradient; export's decomposition decides that without knowing whether the per-sample
    weights do). The kernel (CPU, EmbeddingBag.cpp) keeps the indices, the offsets, the
    per-sample weights (and the table, for their gradient) and three index tensors it makes,
    whose real sizes are not the traced ones:
    offset2bag, one entry per index plus one, except on the fast sum path (sum, no padding_idx,
    a float/half/bf16 table with unit stride) where it stays empty; bag_size, one per offset
    (include_last_offset narrows it, the storage stays); max_indices, (bags, D) for max, one
    per bag otherwise. NB: the CUDA kernel's are taken to be the same (not checked here)."""
    weight, indices, offsets = ctx.arg(0, "weight"), ctx.arg(1, "indices"), ctx.arg(2, "offsets")
    mode = ctx.arg(4, "mode", SUM)
    per_sample_weights = ctx.arg(6, "per_sample_weights")
    include_last_offset = bool(ctx.arg(7, "include_last_offset", False))
    padding_idx = ctx.arg(8, "padding_idx", -1)
    padding_idx = -1 if padding_idx is None else padding_idx
    if not ctx.requires_grad:
        return OpCost()
    indices, offsets = _contiguous(indices), _contiguous(offsets)
    strides = strides_of(weight)
    fast_sum = (mode == SUM and padding_idx < 0 and weight.dtype in FAST_SUM_DTYPES
                and strides is not None and strides[-1] == 1)
    bags = offsets.shape[0] - include_last_offset
    saved = [indices, offsets,
             TensorSpec(offsets.shape, offsets.dtype),  # bag_size
             TensorSpec((bags, weight.shape[1]) if mode == MAX else (bags,), indices.dtype)]
    if not fast_sum:
        saved.append(TensorSpec((indices.shape[0] + 1,), indices.dtype))  # offset2bag
    if per_sample_weights is not None:
        saved.append(per_sample_weights)
        if per_sample_weights.requires_grad:
            saved.append(weight)
    return OpCost(saved=tuple(saved))


def _contiguous(x: Value) -> Value | TensorSpec:
    """`x.contiguous()`: x itself, or the copy it makes."""
    return x if x.contiguous else TensorSpec(x.shape, x.dtype)


@register(aten._embedding_bag_forward_only)
def embedding_bag_forward_only_cost(ctx: RuleContext) -> OpCost:
    """What F.embedding_bag runs for a table without a gradient: nothing recorded, nothing kept."""
    return OpCost()
