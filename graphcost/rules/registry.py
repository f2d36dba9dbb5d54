"""The op-rule registry: one table, keyed by ATen op, mapping to a pure cost function.

A rule sees shapes, dtypes and which inputs need gradients — never tensor data:

    @register(aten.gelu.default)
    def gelu_cost(ctx: RuleContext) -> OpCost:
        return OpCost(saved=ctx.saved_if_grad(ctx.inputs[0]))

FLOPs follow torch.utils.flop_counter's convention: matrix multiplies and convolutions,
`FLOPS_PER_FMA` per multiply-add; pointwise ops and reductions are costed by bytes moved.
Registering an op twice is an error unless `override=True` is passed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

FLOPS_PER_FMA = 2


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor (no data)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point or self.dtype.is_complex

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorSpec:
        return cls(tuple(int(s) for s in t.shape), t.dtype)


@dataclass(frozen=True)
class Value:
    """A tensor an op reads: output `index` of graph node `node`."""

    node: str
    index: int
    spec: TensorSpec
    requires_grad: bool
    kind: str  # "op", "param", "buffer", "input", "constant"
    storage: int  # id of the storage it lives in (views share their base's)
    contiguous: bool = True
    strides: tuple[int, ...] | None = None  # of the traced tensor; None: unknown

    @property
    def shape(self) -> tuple[int, ...]:
        return self.spec.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.dtype


def values_in(x: Any) -> list[Value]:
    """Every Value in an argument tree (tuples and lists of Values, numbers, None)."""
    if isinstance(x, Value):
        return [x]
    if isinstance(x, (list, tuple)):
        return [v for item in x for v in values_in(item)]
    return []


@dataclass(frozen=True)
class Out:
    """The op's own output number `index`, as an entry of OpCost.saved."""

    index: int = 0


Saved = Value | Out | TensorSpec  # an input, an own output, or a tensor the kernel creates


@dataclass(frozen=True)
class OpCost:
    """What one op costs. Bytes read/written default to its tensor inputs and new outputs."""

    forward_flops: int = 0
    backward_flops: int = 0
    saved: tuple[Saved, ...] = ()
    bytes_read: int | None = None
    bytes_written: int | None = None
    # The kernel's output layout when it differs from the traced (contiguous) one: logical dims
    # from outermost to innermost in memory. Flash attention writes (B, T, H, D) for a logical
    # (B, H, T, D) output: (0, 2, 1, 3). A later `.transpose(1, 2).contiguous()` is then free.
    output_dim_order: tuple[int, ...] | None = None
    # Memory the kernels allocate and free inside the op, beyond its outputs, saved tensors and
    # input gradients: at the forward op, and at its backward (graphcost.passes.schedule).
    forward_workspace_bytes: int = 0
    backward_workspace_bytes: int = 0
    # The op returns this input (an index into RuleContext.inputs) itself, not a new tensor,
    # where the traced graph shows a copy: eager dropout with p=0 or train=False returns its
    # input. Its output storage is then that input's.
    output_is_input: int | None = None
    # {output index: bytes} of the storage the kernel gives an output when larger than the
    # traced tensor's: CPU mse_loss reduces its elementwise loss in place, so the 0-dim result
    # keeps a storage of the unreduced size; oneDNN's RNN workspace is empty on meta.
    output_storage_bytes: Mapping[int, int] | None = None
    # False: the memory the op's backward uses is not modelled exactly (torch.cdist's
    # temporaries), so the peak around it is approximate; reports say so
    backward_memory_exact: bool = True


@dataclass
class RuleContext:
    """Everything a rule may look at for one op node."""

    name: str
    op: Any
    args: tuple
    kwargs: dict
    inputs: tuple[Value, ...]  # tensor arguments in order, args then kwargs
    outputs: tuple[TensorSpec, ...]
    requires_grad: bool  # does autograd record this op (some input needs a gradient)?
    device: Any  # graphcost.hardware.Device: which kernels run, so what they save
    schema_names: tuple[str, ...] = field(default=())

    def arg(self, position: int, name: str, default: Any = None) -> Any:
        """Argument by position, else by keyword, else `default`."""
        if position < len(self.args):
            return self.args[position]
        return self.kwargs.get(name, default)

    @property
    def out(self) -> TensorSpec:
        return self.outputs[0]

    def needs_grad(self, value: Any) -> bool:
        return isinstance(value, Value) and value.requires_grad

    def saved_if_grad(self, *saved: Saved) -> tuple[Saved, ...]:
        """`saved` when autograd records this op, else nothing."""
        return tuple(s for s in saved if s is not None) if self.requires_grad else ()


Rule = Callable[[RuleContext], OpCost]


class DuplicateRuleError(ValueError):
    pass


class RuleRegistry:
    """Maps an op (an OpOverload, an OpOverloadPacket covering all overloads, or a callable)
    to its rule. Lookup tries the exact overload first, then its packet."""

    def __init__(self) -> None:
        self._rules: dict[Any, Rule] = {}

    def register(self, *ops: Any, override: bool = False) -> Callable[[Rule], Rule]:
        def decorate(rule: Rule) -> Rule:
            for op in ops:
                if op in self._rules and not override:
                    raise DuplicateRuleError(f"a rule for {op_name(op)} is already registered; "
                                             "pass override=True to replace it")
                self._rules[op] = rule
            return rule

        return decorate

    def lookup(self, op: Any) -> Rule | None:
        rule = self._rules.get(op)
        if rule is None and isinstance(op, torch._ops.OpOverload):
            rule = self._rules.get(op.overloadpacket)
        return rule

    def merged(self, overrides: dict[Any, Rule] | None) -> RuleRegistry:
        """A new registry: these rules with `overrides` on top (the global table is untouched)."""
        new = RuleRegistry()
        new._rules = {**self._rules, **(overrides or {})}
        return new

    def ops(self) -> Iterable[Any]:
        return self._rules.keys()


def op_name(op: Any) -> str:
    """'aten.linear.default' for ATen ops, the function's name otherwise."""
    if isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(op)
    return getattr(op, "__name__", str(op))


REGISTRY = RuleRegistry()
register = REGISTRY.register
