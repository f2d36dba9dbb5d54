"""Memory-layout arithmetic the rules need to know whether a kernel's internal reshape is a free
view or a copy (a copy that autograd saves is a new activation), and in which order a kernel that
allocates "like its input" lays out its output. Pure functions of shapes and strides, mirroring
ATen's `computeStride` (TensorUtils.cpp), `expand` and `infer_dense_strides`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch._prims_common import suggest_memory_format

from graphcost.rules.registry import Value


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def strides_of(x: Value) -> tuple[int, ...] | None:
    """The traced strides of `x`; for a Value built without them, contiguous ones if it is
    contiguous, else None (unknown)."""
    if x.strides is not None:
        return tuple(x.strides)
    return contiguous_strides(x.shape) if x.contiguous else None


def suggested_memory_format(x: Value) -> torch.memory_format | None:
    """ATen's `x.suggest_memory_format()`: channels_last (channels_last_3d) for a 4-D (5-D)
    tensor with NHWC-like strides, else contiguous_format; None when the strides are unknown."""
    strides = strides_of(x)
    if strides is None:
        return None
    return suggest_memory_format(torch.empty_strided(x.shape, strides, device="meta"))


def is_dense_in(x: Value, memory_format: torch.memory_format) -> bool | None:
    """Is `x.contiguous(memory_format)` x itself (True) or a copy (False)? None: unknown."""
    strides = strides_of(x)
    if strides is None:
        return None
    t = torch.empty_strided(x.shape, strides, device="meta")
    return t.is_contiguous(memory_format=memory_format)


def is_contiguous(shape: Sequence[int], strides: Sequence[int] | None) -> bool:
    """ATen's is_contiguous: row-major, sizes of 1 ignored (unknown strides: taken not to be,
    so that a `.contiguous()` on it is taken to copy)."""
    if strides is None:
        return False
    expected = 1
    for size, stride in zip(reversed(tuple(shape)), reversed(tuple(strides))):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def view_strides(shape: Sequence[int], strides: Sequence[int],
                 new_shape: Sequence[int]) -> tuple[int, ...] | None:
    """Strides of `tensor.view(new_shape)`, or None when no view exists (reshape then copies).
    ATen's computeStride."""
    shape, strides, new_shape = tuple(shape), tuple(strides), tuple(new_shape)
    if not shape:
        return (1,) * len(new_shape)
    numel = math.prod(shape)
    if numel == 0:
        return strides if shape == new_shape else contiguous_strides(new_shape)
    new_strides = [0] * len(new_shape)
    view_d = len(new_shape) - 1
    chunk_base_stride = strides[-1]
    tensor_numel = view_numel = 1
    for tensor_d in range(len(shape) - 1, -1, -1):
        tensor_numel *= shape[tensor_d]
        # At the end of a chunk of dims that are contiguous with each other, fill the view dims.
        if tensor_d == 0 or (shape[tensor_d - 1] != 1
                             and strides[tensor_d - 1] != tensor_numel * chunk_base_stride):
            while view_d >= 0 and (view_numel < tensor_numel or new_shape[view_d] == 1):
                new_strides[view_d] = view_numel * chunk_base_stride
                view_numel *= new_shape[view_d]
                view_d -= 1
            if view_numel != tensor_numel:
                return None
            if tensor_d > 0:
                chunk_base_stride = strides[tensor_d - 1]
                tensor_numel = view_numel = 1
    return tuple(new_strides) if view_d == -1 else None


def expand_strides(shape: Sequence[int], strides: Sequence[int] | None,
                   new_shape: Sequence[int]) -> tuple[int, ...] | None:
    """Strides of `tensor.expand(new_shape)`: broadcast dims get stride 0 (None if unknown)."""
    if strides is None:
        return None
    lead = len(new_shape) - len(shape)
    out = [0] * lead
    for size, stride, new in zip(shape, strides, new_shape[lead:]):
        out.append(stride if size == new else 0)
    return tuple(out)


def dense_dim_order(shape: Sequence[int], strides: Sequence[int]) -> tuple[int, ...]:
    """Dims from outermost to innermost of the dense tensor `empty_like(x)` allocates for a
    tensor x of these strides (ATen's infer_dense_strides: a stable sort by stride, dims with
    stride 0 stay where they are)."""
    ndim = len(shape)
    perm = list(range(ndim - 1, -1, -1))  # innermost first

    def should_swap(d0: int, d1: int) -> int:
        s0, s1 = strides[d0], strides[d1]
        if s0 == 0 or s1 == 0:
            return 0
        if s0 != s1:
            return 1 if s0 > s1 else -1
        return 1 if shape[d0] > shape[d1] else 0

    for i in range(1, ndim):
        dim1 = i
        for j in range(1, i + 1):
            dim0 = i - j
            cmp = should_swap(perm[dim0], perm[dim1])
            if cmp > 0:
                perm[dim0], perm[dim1] = perm[dim1], perm[dim0]
                dim1 = dim0
            elif cmp < 0:
                break
    return tuple(reversed(perm))
