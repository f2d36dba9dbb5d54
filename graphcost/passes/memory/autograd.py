"""Which gradients an op's backward returns without allocating: autograd's rules that the
training-step walk (graphcost/passes/memory/walk.py) needs to know what a backward node makes.
"""

from __future__ import annotations

import torch

READS = ("outputs", "storages", "target")

aten = torch.ops.aten


# ops whose backward hands the incoming gradient on as the input's gradient (same shape)
GRAD_IS_INCOMING = {aten.add.Tensor, aten.add_.Tensor, aten.clone.default, aten.alias.default,
                    aten.contiguous.default, aten.to.dtype, aten.type_as.default,
                    aten._to_copy.default, aten.to.dtype_layout, aten.to.device}


# view ops whose backward is a view (reshape) of the incoming gradient
GRAD_IS_VIEW = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                aten.flatten.using_ints, aten.unflatten.int, aten.transpose.int,
                aten.permute.default, aten.t.default, aten.unsqueeze.default,
                aten.squeeze.dim, aten.squeeze.default, aten.squeeze.dims, aten.view_as.default,
                aten.reshape_as.default, aten.alias.default, aten.contiguous.default,
                aten.detach.default}


# reductions whose backward expands the incoming gradient (a view: no new memory)
GRAD_IS_EXPANDED = {aten.sum.default, aten.sum.dim_IntList}


# joins whose backward hands each input a slice of the incoming gradient (cat: narrow, stack:
# unbind), a view while the dtypes agree: the whole incoming gradient lives while any is held
GRAD_IS_SLICE = {aten.cat.default, aten.stack.default}


# tensor inputs (by position among the op's tensor inputs) that get no gradient: they only
# give a shape or a dtype
NOT_DIFFERENTIABLE = {aten.type_as.default: (1,), aten.view_as.default: (1,),
                      aten.reshape_as.default: (1,), aten.expand_as.default: (1,),
                      aten.zeros_like.default: (0,), aten.ones_like.default: (0,),
                      aten.empty_like.default: (0,), aten.full_like.default: (0,)}


def _in_place(target) -> bool:
    name = getattr(target, "_schema", None)
    return name is not None and name.name.split("::")[-1].endswith("_")


def grad_passes_through(d: dict, v, find) -> bool:
    """Is the gradient of input `v` of the op with node data `d` a view of the op's incoming
    gradient (no new memory)? `find`: the graph's storage_root."""
    out = d["outputs"][0] if d["outputs"] else None
    if out is None:
        return False
    target = d.get("target")
    if target in GRAD_IS_INCOMING:
        return v.spec.shape == out.shape and v.spec.dtype == out.dtype
    if target in GRAD_IS_EXPANDED:
        return True
    if target in GRAD_IS_SLICE:
        return v.spec.dtype == out.dtype
    if target in GRAD_IS_VIEW:
        return v.spec.numel == out.numel
    # an op that returns its input itself (dropout that does nothing, a same-dtype `to`); not
    # an in-place op (relu_, silu_), whose backward makes a new gradient from the incoming one
    if _in_place(target):
        return False
    return (len(d["outputs"]) == 1 and d["storages"][0] is not None
            and find(d["storages"][0]) == find(v.storage)
            and v.spec.numel == out.numel and v.spec.dtype == out.dtype)


__all__ = ["GRAD_IS_EXPANDED", "GRAD_IS_INCOMING", "GRAD_IS_SLICE", "GRAD_IS_VIEW", "NOT_DIFFERENTIABLE",
           "grad_passes_through"]
