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
from graphcost.rules.registry import OpCost, Out, RuleContext, TensorSpec, Value, register

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


# ---- _trilinear (nn.Bilinear) ------------------------------------------------------------------

def _sumproduct_pair(left: list[int], right: list[int],
                     sum_dims: list[int]) -> tuple[int, list[int]]:
    """FLOPs and (keepdim) result shape of ATen's sumproduct_pair: (left * right).sum(sum_dims)
    as one bmm of (lro, lo, sum) x (lro, sum, ro); a dim only one side has is summed first."""
    if not sum_dims:  # a plain mul
        return 0, [max(a, b) for a, b in zip(left, right)]
    lro = lo = ro = summed = 1
    shape = []
    for i, (a, b) in enumerate(zip(left, right)):
        if i in sum_dims:
            if a != 1 and b != 1:
                summed *= a
            shape.append(1)
        elif a != 1 and b != 1:
            lro *= a
            shape.append(a)
        elif a != 1:
            lo *= a
            shape.append(a)
        else:
            ro *= b
            shape.append(b)
    return bmm_flop((lro, lo, summed), (lro, summed, ro)), shape


def trilinear_flops(s1: tuple[int, ...], s2: tuple[int, ...], s3: tuple[int, ...],
                    expand1: list[int], expand2: list[int], expand3: list[int],
                    sumdim: list[int], unroll_dim: int = 1) -> int:
    """The bmm FLOPs ATen's _trilinear kernel runs (Linear.cpp): (i1 * i2 * i3).sum(sumdim),
    the operands unsqueezed at their expand dims, unrolled along `unroll_dim`: per slice one
    sumproduct_pair of i1 and i2, then one of that and i3."""
    total = len(s1) + len(expand1)

    def unsqueezed(shape: tuple[int, ...], expand: list[int]) -> list[int]:
        sizes = iter(shape)
        return [1 if i in expand else next(sizes) for i in range(total)]

    e1, e2, e3 = unsqueezed(s1, expand1), unsqueezed(s2, expand2), unsqueezed(s3, expand3)
    if 0 in e1 + e2 + e3:
        return 0
    # the unrolled dim's size: the last operand that has it (i3, else i2, else i1)
    unroll_size = next(e[unroll_dim] for e, expand in ((e3, expand3), (e2, expand2),
                                                        (e1, expand1)) if unroll_dim not in expand)
    sums_12 = [i for i in sumdim if i != unroll_dim and i in expand3]
    sums_23 = [i for i in sumdim if i != unroll_dim and i not in expand3]
    for e in (e1, e2, e3):
        e[unroll_dim] = 1  # each slice narrows the unrolled dim to 1
    first, buf = _sumproduct_pair(e1, e2, sums_12)
    second, _ = _sumproduct_pair(buf, e3, sums_23)
    return unroll_size * (first + second)


@register(aten._trilinear)
def trilinear_cost(ctx: RuleContext) -> OpCost:
    """nn.Bilinear's kernel (F.bilinear runs it on the flattened inputs). FlopCounterMode has no
    formula for it (counts 0); its kernel's bmm calls are counted here instead. The gradient of
    each operand is a _trilinear of the gradient and the other two, which are kept."""
    i1, i2, i3 = ctx.inputs[:3]
    expand1, expand2, expand3, sumdim = (list(ctx.arg(k, name)) for k, name in (
        (3, "expand1"), (4, "expand2"), (5, "expand3"), (6, "sumdim")))
    unroll_dim = ctx.arg(7, "unroll_dim", 1)
    grad = ctx.out.shape
    forward = trilinear_flops(i1.shape, i2.shape, i3.shape, expand1, expand2, expand3, sumdim,
                              unroll_dim)
    g1, g2, g3 = i1.requires_grad, i2.requires_grad, i3.requires_grad
    backward = (
        (trilinear_flops(grad, i2.shape, i3.shape, sumdim, expand2, expand3, expand1) if g1 else 0)
        + (trilinear_flops(i1.shape, grad, i3.shape, expand1, sumdim, expand3, expand2)
           if g2 else 0)
        + (trilinear_flops(i1.shape, i2.shape, grad, expand1, expand2, sumdim, expand3)
           if g3 else 0))
    kept = [v for v, other_grads in ((i1, g2 or g3), (i2, g1 or g3), (i3, g1 or g2)) if other_grads]
    return OpCost(forward_flops=forward, backward_flops=backward, saved=ctx.saved_if_grad(*kept))


# ---- torch.cdist ---------------------------------------------------------------------------------

@register(aten._euclidean_dist)
def euclidean_dist_cost(ctx: RuleContext) -> OpCost:
    """torch.cdist's matmul path (p = 2, compute_mode use_mm_for_euclid_dist, or rows > 25 by
    default): one matmul of x1 and x2 each padded with their squared norms and ones, (.., R1,
    M + 2) @ (.., M + 2, R2). FlopCounterMode has no formula for the op (counts 0); the matmul
    its kernel runs is counted here. Its backward, two matmuls of the gradient with x2 and x1
    (both, whichever gradient is asked for), keeps x1, x2 and the distances."""
    x1, x2 = ctx.inputs[0], ctx.inputs[1]
    *batch, rows1, m = x1.shape
    rows2 = x2.shape[-2]
    size = math.prod(batch)
    forward = bmm_flop((size, rows1, m + 2), (size, m + 2, rows2))
    backward = 2 * bmm_flop((size, rows1, rows2), (size, rows2, m))
    return OpCost(forward_flops=forward, backward_flops=backward,
                  saved=ctx.saved_if_grad(x1, x2, Out(0)),
                  backward_memory_exact=False)  # its backward's temporaries are not modelled


@register(aten._cdist_forward)
def cdist_cost(ctx: RuleContext) -> OpCost:
    """torch.cdist's direct kernel (p != 2, or few rows): no FLOPs, by FlopCounterMode's
    convention (no formula: a pairwise difference reduced over the features, pointwise work,
    no matmul). Its backward keeps x1, x2 and the distances."""
    x1, x2 = ctx.inputs[0], ctx.inputs[1]
    return OpCost(saved=ctx.saved_if_grad(x1, x2, Out(0)))
