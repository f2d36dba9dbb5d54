"""Search parallel plans: every (tp, pp, dp) that multiplies to the GPU count, with each
micro-batch size, sharding and checkpoint policy asked for, ranked by predicted step time
among those whose per-device memory fits; the others are kept with the reason they were
rejected.

Tensor parallelism stays inside a node (tp <= GPUs per node, and it must divide the heads),
with sequence parallelism on; pipeline stages are at most the model's blocks and need at least
as many micro-batches per step as stages. The global batch is dp x micro-batch x micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from graphcost.analysis.analyze import Analysis
from graphcost.errors import ConfigError
from graphcost.hardware.devices import Device, get_device
from graphcost.hardware.network import Network, network_for
from graphcost.passes.checkpoint.policy import main_blocks
from graphcost.passes.memory.timeline import training_timeline
from graphcost.passes.memory.training import TrainingConfig
from graphcost.passes.parallel.plan import DeviceMemory, ParallelPlan, per_device_memory
from graphcost.passes.parallel.step_time import ParallelStepTime, parallel_step_time
from graphcost.passes.roofline import Efficiency, training_step_time

READS: tuple[str, ...] = ()  # graph attributes it reads itself: none (graph/schema.py)

SHARDINGS = {"zero-1": dict(zero=1), "zero-2": dict(zero=2), "zero-3": dict(zero=3),
             "fsdp": dict(fsdp=True), "none": {}}


@dataclass(frozen=True)
class Candidate:
    plan: ParallelPlan
    micro_batch: int
    sharding: str
    checkpoint: str
    step: ParallelStepTime | None = None
    memory: DeviceMemory | None = None  # the busiest stage
    rejected: str = ""  # why it was not ranked ("" when feasible)

    def as_dict(self) -> dict:
        out = {"dp": self.plan.dp, "tp": self.plan.tp, "pp": self.plan.pp,
               "micro_batch": self.micro_batch, "micro_batches": self.plan.in_flight,
               "sharding": self.sharding, "checkpoint": self.checkpoint,
               "sequence_parallel": self.plan.sequence_parallel, "rejected": self.rejected}
        if self.memory is not None:
            out["peak_bytes_per_device"] = self.memory.peak_bytes
        if self.step is not None:
            out.update(step_time_s=self.step.step_time_s, mfu=self.step.mfu,
                       tokens_per_s=self.step.tokens_per_s, bubble_s=self.step.bubble_s)
        return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search_plans(load: Callable[[int], Analysis], *, gpus: int, device: str | Device,
                 global_batch: int, config: TrainingConfig | None = None,
                 micro_batches=(1, 2, 4), policies=("none", "full"),
                 shardings=("zero-1", "fsdp"), reserve_bytes: float = 2 * 2**30,
                 network: Network | None = None, max_pp: int = 16,
                 efficiency: Efficiency = Efficiency()) -> list[Candidate]:
    """Feasible plans first, fastest first; then the rejected ones. `load(micro_batch)`
    returns the model's analysis at that micro-batch."""
    device = get_device(device)
    if not device.memory_bytes:
        raise ConfigError(f"device {device.name!r} has no memory size; pick a GPU preset")
    for s in shardings:
        if s not in SHARDINGS:
            raise ConfigError(f"unknown sharding {s!r}; use {', '.join(SHARDINGS)}")
    config = config or TrainingConfig()
    network = network or network_for(device.name)
    budget = device.memory_bytes - reserve_bytes
    found: list[Candidate] = []
    for mb in micro_batches:
        if global_batch % mb:
            continue
        analysis = load(mb)
        blocks = len(main_blocks(analysis.graph))
        for policy in policies:
            cfg = replace(config, checkpoint=policy)
            one = training_step_time(analysis, device, cfg, efficiency)
            timeline = training_timeline(analysis, cfg)
            for tp in [t for t in _divisors(gpus) if t <= network.gpus_per_node]:
                for pp in [p for p in _divisors(gpus // tp) if p <= max(1, min(blocks, max_pp))]:
                    dp = gpus // (tp * pp)
                    for sharding in shardings:
                        found.append(_evaluate(analysis, device, cfg, one, timeline, network,
                                               efficiency, budget, gpus, dp, tp, pp, mb,
                                               global_batch, sharding, policy))
    feasible = sorted((c for c in found if not c.rejected), key=lambda c: c.step.step_time_s)
    return feasible + [c for c in found if c.rejected]


def _evaluate(analysis, device, cfg, one, timeline, network, efficiency, budget, gpus, dp, tp,
              pp, mb, global_batch, sharding, policy) -> Candidate:
    options = SHARDINGS[sharding]
    m = global_batch // (dp * mb) if global_batch % (dp * mb) == 0 else 0
    plan = ParallelPlan(gpus=gpus, dp=dp, tp=tp, pp=pp, sequence_parallel=tp > 1,
                        micro_batches=max(m, 1), **(options if dp > 1 else {}))
    base = dict(plan=plan, micro_batch=mb, sharding=sharding if dp > 1 else "none",
                checkpoint=policy)
    if not m:
        return Candidate(**base, rejected=f"global batch {global_batch} is not a multiple of "
                         f"dp {dp} x micro-batch {mb}")
    if pp > 1 and m < pp:
        return Candidate(**base, rejected=f"{m} micro-batches for {pp} pipeline stages")
    try:
        memory = max(per_device_memory(analysis, plan, cfg, timeline),
                     key=lambda d: d.peak_bytes)
    except ConfigError as exc:
        return Candidate(**base, rejected=str(exc).split(";")[0])
    if memory.peak_bytes > budget:
        return Candidate(**base, memory=memory,
                         rejected=f"needs {memory.peak_bytes / 2**30:.1f} GiB per device")
    step = parallel_step_time(analysis, plan, device, cfg, efficiency, network=network, one=one)
    return Candidate(**base, step=step, memory=memory)
