"""Views, copies, casts and tensor factories: no FLOPs, nothing saved for backward.

Whether an output aliases its input (a view) or is a new storage is not decided here: the graph
stage reads it from the storages of the traced fake tensors, so `reshape`, `contiguous` and
`flatten` are exact whichever way they go.
"""

from __future__ import annotations

import torch

from graphcost.rules.registry import OpCost, RuleContext, register

aten = torch.ops.aten

VIEWS = [
    aten.view, aten._unsafe_view, aten.reshape, aten.transpose, aten.t, aten.permute,
    aten.expand, aten.expand_as, aten.unsqueeze, aten.squeeze, aten.slice, aten.select,
    aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.narrow, aten.flatten,
    aten.unflatten, aten.view_as, aten.alias, aten.detach, aten.movedim, aten.diagonal,
    aten.as_strided, aten.tensor_split, aten.swapaxes, aten.numpy_T, aten.mT,
    aten.broadcast_tensors, aten.detach_, aten.unsafe_split, aten.unsafe_split_with_sizes,
    aten.unsafe_chunk, aten.transpose_, aten.t_, aten.squeeze_, aten.unsqueeze_, aten.as_strided_,
]
COPIES = [
    aten.contiguous, aten.clone, aten.to, aten.type_as, aten._to_copy, aten.cat, aten.stack,
    aten.repeat, aten.lift_fresh_copy, aten.pad, aten.constant_pad_nd, aten.roll, aten.flip,
]
FACTORIES = [
    aten.arange, aten.zeros, aten.ones, aten.full, aten.empty, aten.zeros_like, aten.ones_like,
    aten.full_like, aten.empty_like, aten.new_zeros, aten.new_ones, aten.new_full,
    aten.new_empty, aten.scalar_tensor, aten.tril, aten.triu, aten.eye, aten.linspace,
    aten._assert_tensor_metadata, aten.sym_size, aten.sym_numel, aten._assert_scalar,
]


@register(*VIEWS, *COPIES, *FACTORIES)
def free_cost(ctx: RuleContext) -> OpCost:
    # NB: tril/triu on a tensor that needs a gradient save nothing either (only the diagonal).
    return OpCost()
