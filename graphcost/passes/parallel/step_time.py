"""Step time of a parallel plan: each device's roofline share, the collectives the plan adds,
and the pipeline bubble.

Compute. Every op of the one-device graph (traced at the micro-batch) is timed by the roofline
(forward, backward, recomputation); an op tensor parallelism splits (a split output, a column-
or row-parallel linear; under sequence parallelism any op inside the blocks) takes 1/t of that
time on each TP rank. Pipeline stage s runs its ops; with M micro-batches per step and 1F1B the
step is (M + P - 1) x the slowest stage's micro-batch time: the bubble is (P - 1) of those.

Collectives per step (ring volumes, graphcost.network), and what is exposed:
- tensor parallel: per micro-batch, an all-reduce of each row-parallel linear's and each
  vocab-parallel embedding's output in the forward (again when the checkpoint policy
  recomputes it), and of each column-parallel linear's input gradient in the backward (one per
  input value: q, k and v share theirs); on the critical path (not overlapped);
- pipeline: per micro-batch and stage boundary, the boundary activation forward and its
  gradient backward; not overlapped;
- expert parallel: per MoE layer and micro-batch, the all-to-alls that send each expert its
  tokens and bring their outputs back, forward and backward; not overlapped;
- data parallel: the gradients' all-reduce (ZeRO 1/2: reduce-scatter + all-gather, the same
  volume), overlapped with the backward of the last micro-batch; ZeRO-3 / FSDP add an
  all-gather of the parameters in the forward and again in the backward, overlapped with
  compute. Exposed: whatever exceeds the compute it overlaps (`overlap=False`: all of it).
The optimizer step updates the device's local shard. Groups are placed TP innermost, then DP,
then PP (Megatron's order): a group uses the node's link when it fits in one node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from graphcost.analysis.analyze import Analysis
from graphcost.hardware.devices import Device, get_device
from graphcost.hardware.network import Network, all_gather_bytes, all_reduce_bytes, network_for
from graphcost.passes.checkpoint.policy import main_blocks, short_op
from graphcost.passes.memory.training import TrainingConfig
from graphcost.passes.parallel.plan import (
    EMBEDDING_OPS,
    LINEAR_OPS,
    ParallelPlan,
    TensorSplit,
    check_plan,
    model_states_per_rank,
    op_stages,
    tensor_split,
)
from graphcost.passes.roofline import (
    OPTIMIZER_ACCESSES,
    OPTIMIZER_FLOPS,
    Efficiency,
    StepTime,
    mfu_dtype,
    tokens_of,
    training_step_time,
)
from graphcost.rules.registry import values_in

# the graph attributes it reads (graphcost/graph/schema.py)
READS = ("args", "module_calls", "module_path", "op", "outputs")


@dataclass(frozen=True)
class Collective:
    kind: str  # all-reduce | all-gather | reduce-scatter | send-recv
    group: str  # tp | dp | pp
    bytes_per_step: float  # through each GPU's link
    seconds: float
    exposed_s: float


@dataclass(frozen=True)
class ParallelStepTime:
    plan: ParallelPlan
    micro_batch_tokens: int
    micro_batches: int
    stage_s: tuple[float, ...]  # per micro-batch, compute + TP + PP communication
    bubble_s: float
    optimizer_s: float
    collectives: tuple[Collective, ...] = field(repr=False)
    model_flops: float  # per step, all devices
    peak_flops_per_s: float

    @property
    def dp_exposed_s(self) -> float:
        return sum(c.exposed_s for c in self.collectives if c.group == "dp")

    @property
    def step_time_s(self) -> float:
        return (self.micro_batches * max(self.stage_s) + self.bubble_s + self.optimizer_s
                + self.dp_exposed_s)

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_tokens * self.micro_batches * self.plan.dp

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.plan.gpus * self.step_time_s * self.peak_flops_per_s)

    def totals(self) -> dict:
        return {"step_time_s": self.step_time_s, "mfu": self.mfu,
                "tokens_per_s": self.tokens_per_s, "tokens_per_step": self.tokens_per_step,
                "micro_batches": self.micro_batches, "stage_s": list(self.stage_s),
                "bubble_s": self.bubble_s, "optimizer_s": self.optimizer_s,
                "dp_exposed_s": self.dp_exposed_s,
                "collectives": [c.__dict__ for c in self.collectives]}


def parallel_step_time(analysis: Analysis, plan: ParallelPlan, device: str | Device,
                       config: TrainingConfig | None = None,
                       efficiency: Efficiency = Efficiency(), *,
                       network: Network | None = None, overlap: bool = True,
                       one: StepTime | None = None) -> ParallelStepTime:
    """One optimizer step of the plan: `plan.in_flight` micro-batches per data-parallel rank,
    each the batch `analysis` was traced at (see the module docstring). `one`: the
    one-device roofline of `analysis` under `config`, when the caller has it."""
    device = get_device(device)
    config = config or TrainingConfig()
    check_plan(analysis, plan)
    network = network or network_for(device.name)
    g = analysis.graph
    one = one or training_step_time(analysis, device, config, efficiency)
    split = tensor_split(g) if plan.tp > 1 else TensorSplit(frozenset(), {}, frozenset())
    ops = g.op_order
    stage_of = op_stages(g, plan.pp)
    inside = _in_blocks(g, ops)
    divided = {n for n in ops if (n, 0) in split.split_values
               or short_op(g.nodes[n]["op"]) in LINEAR_OPS
               or (plan.sequence_parallel and n in inside)} if plan.tp > 1 else set()
    stage = [0.0] * plan.pp
    for o in one.ops:
        stage[stage_of[o.name]] += o.seconds / (plan.tp if o.name in divided else 1)

    tp_link = network.link(plan.tp, 1)
    dp_link = network.link(plan.dp, plan.tp)
    pp_link = network.link(plan.pp, plan.tp * plan.dp)
    collectives = []
    m = plan.in_flight
    if plan.tp > 1:
        per_stage = [0.0] * plan.pp
        rerun = {o.name for o in one.ops if o.phase == "recompute"}
        for n, size, forward in _tp_all_reduces(g, ops, split):
            moved = all_reduce_bytes(size, plan.tp)
            # a recomputed forward all-reduces again
            per_stage[stage_of[n]] += moved * (2 if forward and n in rerun else 1)
        seconds = [b / tp_link.bytes_per_s for b in per_stage]
        for s in range(plan.pp):
            stage[s] += seconds[s]
        collectives.append(Collective("all-reduce", "tp", sum(per_stage) * m,
                                      sum(seconds) * m, sum(seconds) * m))
    if plan.pp > 1:
        boundary = _boundary_bytes(g, ops, stage_of, plan)
        seconds = 2 * boundary / pp_link.bytes_per_s  # activation forward, gradient backward
        for s in range(plan.pp - 1):
            stage[s] += seconds
        collectives.append(Collective("send-recv", "pp", 2 * boundary * m * (plan.pp - 1),
                                      seconds * m, seconds * m))
    if plan.ep > 1:
        size = _dispatched_bytes(analysis)  # per MoE layer and micro-batch
        layers = [0.0] * plan.pp
        for path, nbytes in size:
            node = next(n for n in ops if path in g.nodes[n].get("module_calls", ()))
            # dispatch and combine, forward and backward
            layers[stage_of[node]] += 4 * all_gather_bytes(nbytes, plan.ep)
        ep_link = network.link(plan.ep, plan.tp)
        seconds = [b / ep_link.bytes_per_s for b in layers]
        for s in range(plan.pp):
            stage[s] += seconds[s]
        collectives.append(Collective("all-to-all", "ep", sum(layers) * m, sum(seconds) * m,
                                      sum(seconds) * m))
    busiest = max(range(plan.pp), key=lambda s: stage[s])
    states = model_states_per_rank(analysis, plan, config, stage=busiest)
    if plan.dp > 1:
        # this rank's parameters before data-parallel sharding (expert-parallel ones stay)
        unsharded = model_states_per_rank(
            analysis, ParallelPlan(gpus=plan.tp * plan.pp * plan.ep, dp=plan.ep, tp=plan.tp,
                                   pp=plan.pp, ep=plan.ep), config, stage=busiest)
        grads = all_reduce_bytes(unsharded.grads_bytes, plan.dp)
        backward = sum(o.seconds for o in one.ops if o.phase in ("backward", "recompute")
                       and stage_of[o.name] == busiest) / (plan.tp if plan.tp > 1 else 1)
        seconds = grads / dp_link.bytes_per_s
        exposed = max(0.0, seconds - backward) if overlap else seconds
        collectives.append(Collective("all-reduce" if not (plan.zero or plan.fsdp)
                                      else "reduce-scatter + all-gather", "dp", grads, seconds,
                                      exposed))
        if plan.fsdp or plan.zero == 3:
            gathers = 2 * m * all_gather_bytes(unsharded.params_bytes, plan.dp)
            seconds = gathers / dp_link.bytes_per_s
            compute = m * stage[busiest]
            exposed = max(0.0, seconds - compute) if overlap else seconds
            collectives.append(Collective("all-gather", "dp", gathers, seconds, exposed))
    opt_flops = OPTIMIZER_FLOPS[config.optimizer] * states.params
    opt_bytes = OPTIMIZER_ACCESSES[config.optimizer] * states.params_bytes
    dtype = mfu_dtype(analysis)
    optimizer_s = max(opt_flops / (device.vector_flops_per_s(dtype) * efficiency.vector),
                      opt_bytes / (device.memory_bandwidth_bytes_per_s()
                                   * efficiency.bandwidth))
    return ParallelStepTime(
        plan=plan, micro_batch_tokens=tokens_of(analysis), micro_batches=m,
        stage_s=tuple(stage), bubble_s=(plan.pp - 1) * max(stage), optimizer_s=optimizer_s,
        collectives=tuple(collectives),
        model_flops=(analysis.forward_flops + analysis.backward_flops) * m * plan.dp,
        peak_flops_per_s=device.matmul_flops_per_s(dtype))


def _dispatched_bytes(analysis: Analysis) -> list[tuple[str, int]]:
    """(MoE layer path, bytes of the k x N token vectors it sends to its experts) per layer."""
    from graphcost.passes.experts import moe_summary

    moe = moe_summary(analysis)
    g = analysis.graph
    out = []
    for layer in moe.layers:
        moved = 0
        for n in g.op_order:  # each expert's first linears read its dispatched tokens
            d = g.nodes[n]
            if d["module_path"].startswith(layer.path + ".experts.") and \
                    short_op(d["op"]) in LINEAR_OPS:
                x = values_in(d["args"])[0]
                if d["module_path"].endswith(".w1"):
                    moved += x.spec.nbytes
        out.append((layer.path, moved))
    return out


def _in_blocks(g, ops) -> set[str]:
    blocks = set(main_blocks(g))
    return {n for n in ops if blocks & set(g.nodes[n].get("module_calls", ()))}


def _tp_all_reduces(g, ops, split: TensorSplit) -> list[tuple[str, int, bool]]:
    """(op, bytes, in the forward?) of each tensor-parallel all-reduce of a micro-batch:
    forward outputs of row-parallel linears and vocab-parallel embeddings, backward input
    gradients of column-parallel linears (one per input value)."""
    out, seen_inputs, reads = [], set(), g.op_inputs
    for n in ops:
        d = g.nodes[n]
        name = short_op(d["op"])
        inputs = reads[n]
        if name in LINEAR_OPS and inputs:
            x = inputs[0]
            row = (x.node, x.index) in split.split_values
            if row:
                out.append((n, d["outputs"][0].nbytes, True))
            elif (x.node, x.index) not in seen_inputs and x.requires_grad:
                seen_inputs.add((x.node, x.index))
                out.append((n, x.spec.nbytes, False))
        elif name in EMBEDDING_OPS:
            out.append((n, d["outputs"][0].nbytes, True))
    return out


def _boundary_bytes(g, ops, stage_of, plan: ParallelPlan) -> float:
    """The largest activation that crosses from one pipeline stage to the next."""
    largest, reads = 0, g.op_inputs
    for n in ops:
        for v in reads[n]:
            if v.node in stage_of and stage_of[v.node] < stage_of[n]:
                nbytes = v.spec.nbytes
                if plan.sequence_parallel:
                    nbytes = math.ceil(nbytes / plan.tp)
                largest = max(largest, nbytes)
    return largest
