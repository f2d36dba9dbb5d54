"""Compare checkpoint policies, and find the one with the least recomputation that fits a budget.

`compare` walks a training step (passes/memory/) once per policy: peak memory, the bytes
kept for backward, recompute FLOPs and hardware FLOPs per step.

`optimize` searches the per-block mixes: every block of the main stack gets one of
none / selective / save-matmuls / full (`BLOCK_OPTIONS`), 4^L policies. Its model of a mix's
peak comes from the uniform walks (one per option) that `compare` makes anyway, by
decomposing every event of a step:

    an event in block i (its forward, its recomputation or its backward) holds
        sum over blocks j < i of S_j(o_j)  +  a local part that depends on o_i only,
    an event after the stack (final norm, head, loss and their backward) holds
        sum over all blocks of S_j(o_j)  +  a constant;
    an event before it (embeddings), or of the optimizer, holds a constant,

where S_j(o) is what block j keeps for its backward: the tensors its ops save, its region's
inputs and its policy's cached outputs (a tensor kept by two blocks counts for the first: it
lives until that one's backward), wherever they were made. The least-recompute mix under the budget is then a small
integer program (binary x[i, o], one option per block, one peak constraint per block and one for
the tail), solved exactly with scipy.optimize.milp (HiGHS; the constraints keep a 256-byte
margin below the budget for its feasibility tolerance). The mix found is walked once more
and that walk's peak is the one reported (tests check the decomposition against walks of random
mixes, and the walks against real runs); should the walk exceed the budget where the
decomposition did not, the search warns and runs again below it.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace

import numpy as np

from graphcost.analysis.analyze import Analysis
from graphcost.collector import collector_paused
from graphcost.errors import ConfigError
from graphcost.optional import require
from graphcost.passes.checkpoint.policy import (
    BLOCK_OPTIONS,
    BUILTIN_POLICIES,
    main_blocks,
    model_regions,
    module_calls,
    parse_policy,
    per_block_spec,
)
from graphcost.passes.memory.timeline import training_timeline
from graphcost.passes.memory.training import PHASES, MemoryTimeline, TrainingConfig

READS: tuple[str, ...] = ()  # graph attributes it reads itself: none (graph/schema.py)


@dataclass(frozen=True)
class PolicyRow:
    """One policy's costs for a training step (FLOPs per optimizer step: all micro-batches)."""

    policy: str
    peak_bytes: int
    peak_phase: str
    peak_module: str
    saved_activation_bytes: int
    recompute_flops: int
    recompute_bytes: int  # memory traffic of the recomputed ops
    model_flops: int  # forward + backward: what MFU counts
    hardware_flops: int  # model FLOPs + recompute: what the device runs (HFU)
    fits: bool | None  # None: no budget given

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def policy_row(analysis: Analysis, timeline: MemoryTimeline, budget: float | None) -> PolicyRow:
    """A policy's row from its walked timeline (compiled or eager)."""
    micro = timeline.config.grad_accumulation
    model = (analysis.forward_flops + analysis.backward_flops) * micro
    recompute = timeline.recompute_flops * micro
    return PolicyRow(
        policy=str(timeline.config.checkpoint), peak_bytes=timeline.peak_bytes,
        peak_phase=timeline.peak.phase, peak_module=timeline.peak.module_path,
        saved_activation_bytes=timeline.saved_activation_bytes, recompute_flops=recompute,
        recompute_bytes=timeline.recompute_bytes * micro,
        model_flops=model, hardware_flops=model + recompute,
        fits=None if budget is None else timeline.peak_bytes <= budget)


@collector_paused()
def compare(analysis: Analysis, policies=BUILTIN_POLICIES, config: TrainingConfig | None = None,
            budget_bytes: float | None = None) -> list[PolicyRow]:
    """One row per policy, in the order given. A policy that does not apply to the model
    (selective without attention, block policies without blocks) raises ConfigError."""
    config = config or TrainingConfig()
    walks = _walks(analysis, config, policies)
    return [policy_row(analysis, walks[str(parse_policy(p))], budget_bytes) for p in policies]


def _walks(analysis: Analysis, config: TrainingConfig, policies) -> dict[str, MemoryTimeline]:
    specs = dict.fromkeys(str(parse_policy(p)) for p in policies)
    return {p: training_timeline(analysis, replace(config, checkpoint=p)) for p in specs}


@dataclass(frozen=True)
class Optimum:
    """What `optimize` found: `row`, the fitting policy with the least recompute FLOPs (ties:
    the least recompute traffic, then the lowest peak) among the per-block mixes and the
    compared policies (sqrt's segments are no per-block mix and can win). `row` is None when
    nothing fits (then `smallest` says how close the policy with the least memory came)."""

    budget_bytes: float
    row: PolicyRow | None
    per_block: tuple[str, ...]  # the mix, when the answer is one
    mix: PolicyRow | None  # the best per-block mix (None: no mix fits)
    builtin: list[PolicyRow]  # the compared policies
    best_builtin: PolicyRow | None  # the fitting compared policy with the least recompute
    smallest: PolicyRow  # the walked policy with the least peak
    search_seconds: float  # the integer program and the walk of the mix it found
    total_seconds: float  # with the walks of every option and compared policy


@collector_paused()
def optimize(analysis: Analysis, budget_bytes: float, config: TrainingConfig | None = None,
             policies=BUILTIN_POLICIES) -> Optimum:
    """The per-block mix with the least recompute FLOPs whose peak is within `budget_bytes`;
    `policies` are walked too, to say how far the best of them is from it."""
    require("scipy.optimize", "optimize", "the checkpoint optimizer (a budget)")  # ~0.5 s, before the clocks

    started = time.perf_counter()
    config = config or TrainingConfig()
    g = analysis.graph
    ops = g.op_order
    if model_regions(g, ops):  # the model checkpoints itself: that is the one plan there is
        only = policy_row(analysis, training_timeline(analysis,
                                                      replace(config, checkpoint="model")),
                          budget_bytes)
        best = only if only.fits else None
        return Optimum(budget_bytes=budget_bytes, row=best, per_block=(), mix=None,
                       builtin=[only], best_builtin=best, smallest=only, search_seconds=0.0,
                       total_seconds=time.perf_counter() - started)
    blocks = main_blocks(g)
    if not blocks:
        raise ConfigError("checkpoint search needs a stack of identical blocks (a ModuleList or "
                          "Sequential); compare policies instead (graphcost checkpoint "
                          "--policies ...)")
    options = _applicable(g, ops)
    policies = [p for p in policies if p != "selective" or "selective" in options]
    all_walks = _walks(analysis, config, list(policies) + list(options))
    walks = {o: all_walks[o] for o in options}
    rows = [policy_row(analysis, all_walks[str(parse_policy(p))], budget_bytes) for p in policies]
    start = time.perf_counter()
    model = _Decomposition(g, ops, blocks, walks)
    mix, target = None, budget_bytes
    for _ in range(3):  # the decomposition is exact on the zoo; elsewhere, tighten and retry
        choice = model.solve(target)
        if choice is None:
            break
        timeline = training_timeline(analysis, replace(config, checkpoint=per_block_spec(choice)))
        if timeline.peak_bytes <= budget_bytes:
            mix = policy_row(analysis, timeline, budget_bytes)
            break
        warnings.warn(f"graphcost checkpoint search: the walk of {per_block_spec(choice)} "
                      f"peaks {timeline.peak_bytes - model.peak(choice):+,} B off the "
                      "decomposition's prediction; searching again below it", stacklevel=2)
        target -= timeline.peak_bytes - budget_bytes
    seconds = time.perf_counter() - start
    fitting = [r for r in rows if r.fits]
    walked = [policy_row(analysis, t, budget_bytes) for t in all_walks.values()]
    best_builtin = min(fitting, key=_cheapest) if fitting else None
    row = min([r for r in (mix, best_builtin) if r is not None], key=_cheapest, default=None)
    return Optimum(budget_bytes=budget_bytes, row=row,
                   per_block=tuple(choice) if row is mix and mix is not None else (), mix=mix,
                   builtin=rows, best_builtin=best_builtin,
                   smallest=min(walked, key=lambda r: r.peak_bytes), search_seconds=seconds,
                   total_seconds=time.perf_counter() - started)


def _cheapest(r: PolicyRow) -> tuple:
    return r.recompute_flops, r.recompute_bytes, r.peak_bytes


def _applicable(g, ops) -> tuple[str, ...]:
    from graphcost.passes.checkpoint.policy import attention_cores

    return tuple(o for o in BLOCK_OPTIONS if o != "selective" or attention_cores(g, ops))


class _Decomposition:
    """Peak of any per-block mix from the uniform walks (see the module docstring)."""

    def __init__(self, g, ops, blocks, walks: dict[str, MemoryTimeline]) -> None:
        self.options = list(walks)
        spans = module_calls(g)
        first, last = spans[blocks[0]][0], spans[blocks[-1]][1]
        where: dict[str, int] = {}  # op -> block index, -1 before the stack, L after it
        block_of_index = np.full(len(ops), -1)
        for i, b in enumerate(blocks):
            lo, hi = spans[b]
            block_of_index[lo:hi + 1] = i
        for k, n in enumerate(ops):
            where[n] = int(block_of_index[k]) if first <= k <= last else (-1 if k < first
                                                                           else len(blocks))
        L = len(blocks)
        self.L = L
        self.kept = np.zeros((L, len(self.options)))  # S_i(o)
        self.local = np.full((L, len(self.options)), -np.inf)  # max local part in block i
        self.tail = np.full(len(self.options), -np.inf)
        self.constant = -np.inf
        self.recompute = np.zeros(len(self.options))
        self.traffic = np.zeros(len(self.options))
        for k, option in enumerate(self.options):
            t = walks[option]
            self.kept[:, k] = t.kept_bytes_by_block(where, L)[:L]
            prefix = np.concatenate([[0.0], np.cumsum(self.kept[:, k])])
            # each event's block: -1 before the stack (and the optimizer), L after it
            block = np.array([where.get(n, -1) for n in t.table.node])
            block[t.table.phase == PHASES.index("optimizer")] = -1
            totals = t.table.total_bytes.astype(float)
            inside = (block >= 0) & (block < L)
            local = totals[inside] - prefix[block[inside]]
            np.maximum.at(self.local[:, k], block[inside], local)
            after = block == L
            if after.any():
                self.tail[k] = float(np.max(totals[after] - prefix[L]))
            if (block < 0).any():
                self.constant = max(self.constant, float(np.max(totals[block < 0])))
            self.recompute[k] = t.recompute_flops / L
            self.traffic[k] = t.recompute_bytes / L
        self.tail_max = float(np.max(self.tail))

    def peak(self, choice) -> int:
        k = [self.options.index(o) for o in choice]
        kept = self.kept[np.arange(self.L), k]
        prefix = np.concatenate([[0.0], np.cumsum(kept)])
        local = self.local[np.arange(self.L), k] + prefix[:-1]
        return int(max(self.constant, float(np.max(local)), self.tail_max + prefix[-1]))

    def solve(self, budget: float) -> tuple[str, ...] | None:
        """Binary x[i, o] (row-major), one option per block; least recompute under the budget."""
        from scipy.optimize import Bounds, LinearConstraint, milp

        if self.constant > budget:
            return None
        L, K = self.L, len(self.options)
        n = L * K
        cost = np.tile(self.recompute, L)
        rows, upper = [], []
        for i in range(L):  # block i's events: kept by blocks before it + its local part
            row = np.zeros(n)
            for j in range(i):
                row[j * K:(j + 1) * K] = self.kept[j]
            row[i * K:(i + 1) * K] = self.local[i]
            rows.append(row)
            upper.append(budget)
        tail = self.kept.reshape(-1).copy()  # the events after the stack: all blocks' kept
        rows.append(tail)
        upper.append(budget - self.tail_max)
        one = np.zeros((L, n))
        for i in range(L):
            one[i, i * K:(i + 1) * K] = 1
        # In GiB, HiGHS's feasibility tolerance (1e-7) is ~100 bytes: the constraints leave a
        # 256-byte margin so that what it calls feasible fits (checked below, exactly).
        a = np.array(rows) / 2**30
        constraints = [LinearConstraint(a, -np.inf, (np.array(upper) - 256) / 2**30),
                       LinearConstraint(one, 1, 1)]
        # Lexicographic by weights: recompute FLOPs, then recompute traffic (none before
        # save-matmuls, both 0 FLOPs), then kept bytes. A block's FLOPs term is either 0 or
        # at least min_step; the lower terms add up to less than that over all L blocks.
        flops = cost / max(float(np.max(cost)), 1.0)
        steps = [f for f in np.unique(flops) if f > 0]
        unit = (min(steps) if steps else 1.0) / (10 * L)
        traffic = np.tile(self.traffic, L) / max(float(np.max(self.traffic)), 1.0)
        kept = self.kept.reshape(-1) / max(float(np.max(self.kept)), 1.0)
        cost = flops + unit * traffic + unit * 1e-3 * kept
        result = milp(cost, constraints=constraints,
                      integrality=np.ones(n), bounds=Bounds(0, 1),
                      options={"mip_rel_gap": 0})  # the optimum, not one within 0.01%
        if result.x is None:
            return None
        x = np.round(result.x).reshape(L, K)
        choice = tuple(self.options[int(np.argmax(x[i]))] for i in range(L))
        # The same options in blocks, sorted (the heaviest checkpointing first or last), cost
        # the same: prefer that readable order ("full*5,save-matmuls*27") when it fits too.
        rank = {o: k for k, o in enumerate(self.options)}
        for order in (sorted(choice, key=lambda o: -rank[o]), sorted(choice, key=rank.get)):
            if self.peak(order) <= budget:
                return tuple(order)
        return choice if self.peak(choice) <= budget else None


__all__ = ["BLOCK_OPTIONS", "Optimum", "PolicyRow", "compare", "optimize", "parse_policy",
           "policy_row"]
