"""Matrix multiplies: FLOPs from torch.utils.flop_counter's formulas; backward FLOPs only for the
operands that need a gradient; each operand is saved only if the *other* one needs a gradient.

`linear` and `matmul` are composites: autograd records the mm/bmm they dispatch to, which keep
the operands *as reshaped for the kernel*. A reshape that can be a view keeps the operand's own
storage; one that cannot (a non-contiguous or broadcast operand) makes a copy, a new activation.
`matmul_plan` mirrors ATen's `_matmul_impl` (LinearAlgebra.cpp) to know which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch.utils.flop_counter import bmm_flop, mm_flop

from graphcost.rules.layout import expand_strides, strides_of, view_strides
from graphcost.rules.registry import OpCost, RuleContext, TensorSpec, Value, register

aten = torch.ops.aten


def reshaped(x: Value, new_shape: tuple[int, ...], shape: tuple[int, ...] | None = None,
             strides: tuple[int, ...] | None = None) -> Value | TensorSpec:
    """`x` — or a view of it with `shape` and `strides` (expanded, transposed) — reshaped to
    `new_shape`: x's own storage when the reshape is a view, else the copy it makes."""
    if shape is None:
        shape, strides = x.shape, strides_of(x)
    if strides is not None and view_strides(shape, strides, new_shape) is not None:
        return x
    return TensorSpec(tuple(new_shape), x.dtype)  # (unknown strides: taken to copy)


@dataclass(frozen=True)
class MatmulPlan:
    """What torch.matmul(a, b) dispatches to: its FLOPs (as FlopCounterMode counts them) and
    the two operands the recorded mm/bmm/mv/dot keeps."""

    flops: int
    a: Value | TensorSpec
    b: Value | TensorSpec
    a_requires_grad: bool
    b_requires_grad: bool

    def saved(self) -> tuple:
        kept = []
        if self.b_requires_grad:
            kept.append(self.a)
        if self.a_requires_grad:
            kept.append(self.b)
        return tuple(kept)


def _mT(shape: tuple[int, ...], strides: tuple[int, ...] | None):
    shape = shape[:-2] + (shape[-1], shape[-2])
    return shape, None if strides is None else strides[:-2] + (strides[-1], strides[-2])


def _should_fold(a: Value, b: Value) -> bool:
    """ATen's should_fold: fold the larger operand into a matrix and call mm/mv."""
    a_larger = len(a.shape) >= len(b.shape)
    big, small = (a, b) if a_larger else (b, a)
    shape, strides = (big.shape, strides_of(big)) if a_larger else _mT(b.shape, strides_of(b))
    if not (len(shape) >= 3 and len(small.shape) <= 2):
        return False
    if small.requires_grad:
        return True
    if len(a.shape) == 2:
        return False
    if math.prod(shape) == 0:
        return True
    if strides is None:
        return False
    return all(strides[i] == strides[i + 1] * shape[i + 1] for i in range(len(shape) - 2))


def matmul_plan(a: Value, b: Value) -> MatmulPlan:
    da, db = len(a.shape), len(b.shape)
    rg_a, rg_b = a.requires_grad, b.requires_grad
    if da <= 2 and db <= 2:
        if da == 2 and db == 2:
            flops = mm_flop(a.shape, b.shape)
        elif da == 1 and db == 2:
            flops = mm_flop((1, a.shape[0]), b.shape)  # a.unsqueeze(0).mm(b): a view of a
        else:
            flops = 0  # dot and mv have no FLOP formula in FlopCounterMode
        return MatmulPlan(flops, a, b, rg_a, rg_b)
    if _should_fold(a, b):
        transpose = db > da
        big, small = (b, a) if transpose else (a, b)
        shape, strides = _mT(b.shape, strides_of(b)) if transpose else (a.shape, strides_of(a))
        rows = math.prod(shape[:-1])
        folded = reshaped(big, (rows, shape[-1]), shape, strides)
        # The other operand (a.t() when transposed) is a view: mm for a matrix, mv (no FLOPs)
        # for a vector.
        cols = small.shape[0] if transpose else small.shape[-1]
        flops = mm_flop((rows, shape[-1]), (shape[-1], cols)) if len(small.shape) == 2 else 0
        return MatmulPlan(flops, folded, small, big.requires_grad, small.requires_grad)
    if da == 3 and db == 3 and a.shape[0] != b.shape[0]:
        # A batch of one that needs a gradient is squeezed rather than expanded.
        if a.shape[0] == 1 and rg_a:
            return matmul_plan(_squeeze0(a), b)
        if b.shape[0] == 1 and rg_b:
            return matmul_plan(a, _squeeze0(b))
    n = a.shape[-2] if da > 1 else 1
    m = a.shape[-1]
    p = b.shape[-1] if db > 1 else 1
    batch = tuple(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    size = math.prod(batch)
    # Each operand is expanded to the broadcast batch, then reshaped to 3D (b to 2D if a vector).
    a_expanded, b_matrix = batch + (n, m), (m,) if db == 1 else (m, p)
    b_expanded = batch + b_matrix
    a_kept = reshaped(a, (size, n, m), a_expanded,
                      expand_strides(a.shape, strides_of(a), a_expanded))
    b_kept = reshaped(b, (size, *b_matrix), b_expanded,
                      expand_strides(b.shape, strides_of(b), b_expanded))
    return MatmulPlan(bmm_flop((size, n, m), (size, m, p)), a_kept, b_kept, rg_a, rg_b)


def _squeeze0(x: Value) -> Value:
    strides = strides_of(x)
    return replace(x, spec=TensorSpec(x.shape[1:], x.dtype),
                   strides=None if strides is None else strides[1:])


def _cost(ctx: RuleContext, plan: MatmulPlan) -> OpCost:
    backward = plan.flops * (plan.a_requires_grad + plan.b_requires_grad)
    return OpCost(forward_flops=plan.flops, backward_flops=backward,
                  saved=plan.saved() if ctx.requires_grad else ())


def _two_operand(ctx: RuleContext, a: Value, b: Value, flops: int) -> OpCost:
    return _cost(ctx, MatmulPlan(flops, a, b, a.requires_grad, b.requires_grad))


@register(aten.linear)
def linear_cost(ctx: RuleContext) -> OpCost:
    """x @ w.T (+ b): addmm on x viewed as a matrix when x is contiguous and there is a bias,
    otherwise matmul(x, w.t()) — whose fold reshapes x (copying it if it cannot be a view)."""
    x, w = ctx.arg(0, "input"), ctx.arg(1, "weight")
    k = x.shape[-1]
    m = math.prod(x.shape[:-1])
    flops = mm_flop((m, k), (k, w.shape[0]))
    # x is kept (for w's gradient) as the matrix the fold makes. With a frozen weight, an
    # unfoldable input takes matmul's batched path instead: the same FLOPs, and x is not kept.
    kept_x = reshaped(x, (m, k)) if len(x.shape) > 2 else x
    cost = _cost(ctx, MatmulPlan(flops, kept_x, w, x.requires_grad, w.requires_grad))
    bias = ctx.arg(2, "bias")
    if isinstance(bias, Value) and len(x.shape) > 2 and not x.contiguous:
        # matmul, then the bias added out of place (at::linear adds in place unless a tensor
        # is subclass-like, which it is under any dispatch mode: FSDP2's DTensors, the live
        # tracker): the product and the sum exist together
        out = ctx.outputs[0]
        cost = replace(cost, forward_workspace_bytes=out.nbytes if out else 0)
    return cost


@register(aten.mm)
def mm_cost(ctx: RuleContext) -> OpCost:
    a, b = ctx.arg(0, "self"), ctx.arg(1, "mat2")
    return _two_operand(ctx, a, b, mm_flop(a.shape, b.shape))


@register(aten.addmm)
def addmm_cost(ctx: RuleContext) -> OpCost:
    a, b = ctx.arg(1, "mat1"), ctx.arg(2, "mat2")
    return _two_operand(ctx, a, b, mm_flop(a.shape, b.shape))


@register(aten.bmm)
def bmm_cost(ctx: RuleContext) -> OpCost:
    a, b = ctx.arg(0, "self"), ctx.arg(1, "mat2")
    return _two_operand(ctx, a, b, bmm_flop(a.shape, b.shape))


@register(aten.baddbmm)
def baddbmm_cost(ctx: RuleContext) -> OpCost:
    a, b = ctx.arg(1, "batch1"), ctx.arg(2, "batch2")
    return _two_operand(ctx, a, b, bmm_flop(a.shape, b.shape))


@register(aten.matmul)
def matmul_cost(ctx: RuleContext) -> OpCost:
    return _cost(ctx, matmul_plan(ctx.arg(0, "self"), ctx.arg(1, "other")))
