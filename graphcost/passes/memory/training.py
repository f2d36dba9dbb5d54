"""What a training step is (TrainingConfig: optimizer, steps, grad accumulation, checkpoint
policy) and what its walk returns (MemoryTimeline: every event's live bytes by category, the
peak, what autograd keeps). The walk itself is passes/memory/walk.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from graphcost.errors import ConfigError
from graphcost.passes.checkpoint.policy import Plan, parse_policy

READS: tuple[str, ...] = ()  # graph attributes it reads itself: none (graph/schema.py)

OPTIMIZERS = ("adamw", "adam", "sgd", "sgd-momentum")
OPTIMIZER_IMPLS = ("auto", "single-tensor", "foreach", "fused")
STEP_TENSOR_BYTES = 4  # Adam's per-parameter `step`: a 0-dim float32 tensor on the CPU
CATEGORIES = ("params", "grads", "optimizer_state", "activations", "transient")
PHASES = ("forward", "recompute", "backward", "optimizer")


@dataclass(frozen=True)
class TrainingConfig:
    optimizer: str = "adamw"
    steps: int = 2
    grad_accumulation: int = 1  # micro-batches per optimizer step
    set_to_none: bool = True  # zero_grad(set_to_none=True), PyTorch's default
    # "auto" is PyTorch's default: the single-tensor loop on the CPU, foreach on CUDA devices
    optimizer_impl: str = "auto"
    # an activation-checkpointing policy (graphcost.passes.checkpoint): "none", "full", ...
    checkpoint: str = "none"
    # trained as torch.compile(model), Inductor's defaults (graphcost.passes.compiled)
    compile: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of "
                              f"{', '.join(OPTIMIZERS)}")
        if self.optimizer_impl not in OPTIMIZER_IMPLS:
            raise ConfigError(f"unknown optimizer implementation {self.optimizer_impl!r}; choose "
                              f"one of {', '.join(OPTIMIZER_IMPLS)}")
        if self.steps < 1 or self.grad_accumulation < 1:
            raise ConfigError("steps and grad_accumulation must be at least 1")
        parse_policy(self.checkpoint)  # fails early on an unknown policy


@dataclass(frozen=True)
class MemoryEvent:
    """Bytes alive right after one event, by category."""

    index: int
    step: int
    phase: str  # "forward", "recompute" (inside the backward), "backward", "optimizer"
    node: str  # op node (forward/backward) or parameter node (optimizer)
    op: str
    module_path: str
    params: int
    grads: int
    optimizer_state: int
    activations: int
    transient: int

    @property
    def total_bytes(self) -> int:
        return self.params + self.grads + self.optimizer_state + self.activations + self.transient

    def breakdown(self) -> dict[str, int]:
        return {c: getattr(self, c) for c in CATEGORIES}


@dataclass(frozen=True, eq=False)
class EventTable:
    """The events of a walk, column by column (MemoryTimeline.events makes MemoryEvents of
    them on demand: a deep model's step has tens of thousands)."""

    category_bytes: np.ndarray  # (events, len(CATEGORIES)) int64
    step: np.ndarray  # (events,) int
    phase: np.ndarray  # (events,) index into PHASES
    node: list[str]
    op: list[str]
    module_path: list[str]

    @classmethod
    def from_rows(cls, rows: list[tuple]) -> EventTable:
        """Rows of (step, phase index, node, op, module path, *CATEGORIES bytes)."""
        if not rows:
            return cls(np.zeros((0, len(CATEGORIES)), np.int64), np.zeros(0, int),
                       np.zeros(0, int), [], [], [])
        step, phase, node, op, where, *categories = zip(*rows)
        try:
            values = np.array(categories, dtype=np.int64)
        except (TypeError, OverflowError):  # byte counts at several shapes at once, packed
            # in one integer or carried side by side (sizing/retrace.py, sizing/sampled.py)
            values = np.array(categories, dtype=object)
        return cls(values.T.copy(), np.array(step), np.array(phase), list(node), list(op),
                   list(where))

    def __len__(self) -> int:
        return len(self.node)

    @cached_property
    def total_bytes(self) -> np.ndarray:
        return self.category_bytes.sum(axis=1)

    def event(self, i: int) -> MemoryEvent:
        b = self.category_bytes[i]
        return MemoryEvent(int(i), int(self.step[i]), PHASES[self.phase[i]], self.node[i],
                           self.op[i], self.module_path[i],
                           *(int(x) if isinstance(x, np.integer) else x for x in b))


@dataclass(frozen=True)
class KeptTensors:
    """What a step keeps for backward at the end of its forward, by storage: the tensors
    autograd saves outside checkpointed regions, the regions' inputs and the outputs their
    policy keeps; `by`: who keeps each (the ops that save it, or a region's first op)."""

    storages: dict[int, int]  # storage -> bytes
    by: dict[int, tuple[str, ...]]


@dataclass(frozen=True, eq=False)
class MemoryTimeline:
    config: TrainingConfig
    table: EventTable = field(repr=False)
    optimizer_impl: str = "single-tensor"  # the implementation walked ("auto" resolved)
    plan: Plan | None = None  # the checkpoint regions walked
    # FLOPs the backward spends re-running checkpointed forward ops, per micro-batch, and the
    # bytes those ops read and write (their memory traffic: pointwise ops cost no FLOPs)
    recompute_flops: int = 0
    recompute_bytes: int = 0
    recomputed_ops: tuple[str, ...] = ()  # the forward ops run again, once per micro-batch
    # bytes kept for backward at the end of a forward (see KeptTensors)
    saved_activation_bytes: int = 0
    # KeptTensors, or how to get them (a timeline derived from a shortened stack reads them
    # off the whole graph when they are asked for, without walking it: passes/memory/stack.py)
    kept: KeptTensors | Callable[[], KeptTensors] = field(default=None, repr=False)
    # when derived from a shortened stack: kept_bytes_by_block over the main stack's blocks
    block_kept_bytes: tuple[int, ...] | None = field(default=None, repr=False)

    @cached_property
    def events(self) -> tuple[MemoryEvent, ...]:
        return tuple(self.table.event(i) for i in range(len(self.table)))

    @cached_property
    def peak(self) -> MemoryEvent:
        """The first event at the maximum."""
        return self.table.event(int(np.argmax(self.table.total_bytes)))

    @property
    def peak_bytes(self) -> int:
        return self.peak.total_bytes

    @cached_property
    def _kept(self) -> KeptTensors:
        return self.kept() if callable(self.kept) else self.kept

    @property
    def kept_storages(self) -> dict[int, int]:
        return self._kept.storages

    @property
    def kept_by(self) -> dict[int, tuple[str, ...]]:
        return self._kept.by

    def kept_bytes_by_block(self, block_of: dict[str, int], n_blocks: int) -> list[int]:
        """Bytes each block of a stack keeps for its backward, then (index n_blocks) what is
        kept after the stack; `block_of`: op -> its block, -1 before the stack, n_blocks after
        it. A kept tensor belongs to the first block that keeps it (the one whose backward
        releases it last): a block's input kept by its checkpoint frame, made by the block
        before, is the keeping block's. (A derived timeline has them for the model's main
        stack already.)"""
        if self.block_kept_bytes is not None:
            return list(self.block_kept_bytes)
        out = [0] * (n_blocks + 1)
        for sid, nbytes in self.kept_storages.items():
            i = min(block_of.get(n, n_blocks) for n in self.kept_by[sid])
            if i >= 0:
                out[min(i, n_blocks)] += nbytes
        return out

    def phase_peaks(self) -> dict[tuple[int, str], int]:
        peaks: dict[tuple[int, str], int] = {}
        totals, steps, phases = self.table.total_bytes, self.table.step, self.table.phase
        for key in dict.fromkeys(zip(steps.tolist(), phases.tolist())):
            mask = (steps == key[0]) & (phases == key[1])
            peaks[(key[0], PHASES[key[1]])] = int(totals[mask].max())
        return peaks
