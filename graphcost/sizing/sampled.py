"""Numbers that hold their values at several shapes at once, for one walk to serve them all
(graphcost.passes.retrace).

A byte count is one plain int: v0 + sum over k >= 1 of (v_k - v0) * SLOT**k, v_k its value at
shape k. A constant is itself, and a sum or a difference of two such ints is the same sum or
difference at every shape, so the walks (which add and subtract byte counts) run on them at
native speed. A tensor size is a `Sampled` int, for the products (numel, nbytes) and the
equality tests the walks make of sizes: its value at the first shape, carrying `values`.
NB: two encoded byte counts multiplied together, or one divided by a number that does not
divide it at every shape, give no encoded count; the walks scale byte counts by constants
(element sizes) only, and sizes are multiplied as `Sampled`.

>>> batch, seq = Sampled((1, 2)), Sampled((64, 64))
>>> decode(batch * seq * 4 + 100, 2)  # bytes of a (B, T) fp32 tensor, plus a constant
(356, 612)
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from graphcost.rules.registry import TensorSpec

READS: tuple[str, ...] = ()  # graph attributes it reads itself: none (graph/schema.py)

SLOT = 1 << 64  # a step's byte counts at the shapes served are far below SLOT / 2


class Unsupported(Exception):
    """One trace cannot serve every shape of this model; trace each shape instead."""


def encode(values: tuple[int, ...]) -> int:
    """One int holding `values` (a value per shape); a constant when they are all equal."""
    first = values[0]
    x, scale = first, 1
    for v in values[1:]:
        scale *= SLOT
        x += (v - first) * scale
    return x


def decode(x: int, n: int) -> tuple[int, ...]:
    """The values at `n` shapes of an int that `encode` made (a constant: n times itself)."""
    if -SLOT // 2 < x < SLOT // 2:
        return (x,) * n
    digits = []
    for _ in range(n - 1):
        d = x % SLOT
        d = d - SLOT if d >= SLOT // 2 else d
        digits.append(d)
        x = (x - d) // SLOT
    digits.append(x)
    return (digits[0],) + tuple(digits[0] + d for d in digits[1:])


class Sampled(int):
    """A size: an int (its value at the first shape) that carries its value at every shape,
    `values`. Products and quotients act on every value; a sum or a difference is an encoded
    plain int; equality must agree at every shape, else Unsupported (the walk would take a
    decision the shapes take differently); order compares the first values."""

    values: tuple[int, ...]

    def __new__(cls, values: tuple[int, ...]) -> int:
        if all(v == values[0] for v in values):
            return values[0]
        self = int.__new__(cls, values[0])
        self.values = values
        return self

    def _theirs(self, other: Any) -> tuple[int, ...]:
        if isinstance(other, Sampled):
            return other.values
        if isinstance(other, int):
            return decode(other, len(self.values))
        raise Unsupported(f"a size mixed with {type(other).__name__} {other!r}")

    def _each(self, other: Any, fn: Callable[[int, int], int], swap: bool = False) -> int:
        theirs = self._theirs(other)
        pairs = zip(theirs, self.values) if swap else zip(self.values, theirs)
        return Sampled(tuple(fn(a, b) for a, b in pairs))

    def __add__(self, other): return encode(self.values) + other
    def __radd__(self, other): return other + encode(self.values)
    def __sub__(self, other): return encode(self.values) - other
    def __rsub__(self, other): return other - encode(self.values)
    def __mul__(self, other): return self._each(other, operator.mul)
    def __rmul__(self, other): return self._each(other, operator.mul, swap=True)
    def __floordiv__(self, other): return self._each(other, operator.floordiv)
    def __rfloordiv__(self, other): return self._each(other, operator.floordiv, swap=True)
    def __neg__(self): return Sampled(tuple(-v for v in self.values))
    def __pos__(self): return self

    def _lost(self, *_: Any) -> Any:
        raise Unsupported("a size went through a float, a remainder or a rounding")

    __truediv__ = __rtruediv__ = __mod__ = __rmod__ = __divmod__ = __rdivmod__ = _lost
    __pow__ = __rpow__ = __float__ = __round__ = __ceil__ = __floor__ = __trunc__ = _lost
    __abs__ = __lshift__ = __rshift__ = _lost

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, int):
            return NotImplemented
        same = {a == b for a, b in zip(self.values, self._theirs(other))}
        if len(same) > 1:
            raise Unsupported("two sizes are equal at one shape and not at another")
        return same.pop()

    def __ne__(self, other: Any) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = int.__hash__

    def __repr__(self) -> str:
        return f"Sampled{self.values}"


class CarriedSpec(TensorSpec):
    """A TensorSpec whose sizes are Sampled and whose nbytes is an encoded byte count (worked
    out once: the walks ask for it often)."""

    @property
    def nbytes(self) -> int:
        if "encoded_nbytes" not in self.__dict__:
            n = self.numel * self.dtype.itemsize
            object.__setattr__(self, "encoded_nbytes",
                               encode(n.values) if isinstance(n, Sampled) else n)
        return self.__dict__["encoded_nbytes"]


def carried_spec(specs: list[TensorSpec]) -> TensorSpec:
    """One tensor at every shape (same rank and dtype) as one spec."""
    first = specs[0]
    if all(s.shape == first.shape for s in specs):
        return first
    shape = tuple(Sampled(tuple(s.shape[i] for s in specs)) for i in range(len(first.shape)))
    return CarriedSpec(shape, first.dtype)
