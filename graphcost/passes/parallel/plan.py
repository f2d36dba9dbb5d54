"""Many devices: a parallel plan (data, tensor, pipeline parallel; ZeRO or FSDP sharding) and
the memory it leaves on each device.

Tensor parallelism is read off the graph, Megatron-style: a value is "split" across the TP
ranks or replicated. The model's inputs, parameters and buffers are replicated; a linear whose
input is replicated is column-parallel (its weight and bias split on dim 0, its output split),
one whose input is split is row-parallel (its weight split on dim 1, bias replicated, output
replicated after an all-reduce); an embedding is vocab-parallel (weight split on dim 0, output
replicated); any other op's output is split when one of its tensor inputs is (scalars are
replicated). Attention heads, q/k/v, the scores and the MLP's hidden units come out split; the
residual stream, the norms' inputs and the dropout masks on it stay replicated, unless
sequence parallelism splits those too. On the GPT-3 layer this gives Megatron-LM's
sbh(10 + 24/t + 5as/(ht)) (tests).

Model states per rank follow PyTorch's engines as measured on a fake process group
(graphcost.groundtruth_parallel, torch 2.13): tensor parallel shards a parameter along its dim
as DTensor's Shard does (torch.chunk: ceil(n / t) rows per rank, the last ranks fewer; a short
dim-0 shard is stored padded to the full chunk), and the vocab-parallel embedding's gradient
comes back full size on every rank; FSDP (`fully_shard`) shards every parameter on dim 0 the
same way across the data-parallel ranks, each rank's storage padded to the full chunk, the
gradients as views of one padded buffer per group, the AdamW state unpadded plus a 0-dim fp32
step per parameter; ZeRO stage 1/2/3 partitions the flattened optimizer state / + gradients /
+ parameters evenly across data-parallel ranks. Pipeline
parallelism gives each stage a contiguous run of blocks (the embeddings to the first, the head
and loss to the last); under 1F1B stage s holds the activations of min(P - s, M) micro-batches.
Expert parallelism (a mixture-of-experts model) gives each of the E ranks of a data-parallel
group E/ep of every layer's experts (their data-parallel replicas, dp/ep of them, are what FSDP
shards); with balanced routing each rank's experts process as many tokens as without it.

NB: per-device activations and the peak are estimates built from the single-device walk, not
a walk of the sharded step: the larger of (states + the activations in flight + FSDP's
gathered block and gradient buffer + the walk's largest forward/backward transient / t) and
(states + the walk's optimizer temporaries scaled to the local parameters). Communication
buffers other than FSDP's are not counted.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx

from graphcost.analysis.analyze import Analysis
from graphcost.errors import ConfigError
from graphcost.graph.costed import CostedGraph
from graphcost.passes.checkpoint.policy import main_blocks, module_calls, short_op
from graphcost.passes.memory.timeline import training_timeline
from graphcost.passes.memory.training import (
    CATEGORIES,
    PHASES,
    STEP_TENSOR_BYTES,
    MemoryTimeline,
    TrainingConfig,
)
from graphcost.rules.registry import values_in

# the graph attributes it reads (graphcost/graph/schema.py)
READS = ("args", "kind", "kwargs", "module_path", "names", "op", "order", "outputs",
         "requires_grad", "saved", "storage_owner", "storages")

LINEAR_OPS = ("linear",)
EMBEDDING_OPS = ("embedding",)


@dataclass(frozen=True)
class ParallelPlan:
    """How `gpus` devices split the work: dp x tp x pp = gpus (dp defaults to what is left)."""

    gpus: int = 1
    dp: int | None = None
    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero: int = 0  # ZeRO stage, 0-3
    fsdp: bool = False  # PyTorch FSDP (fully_shard): parameters, gradients, state sharded
    sequence_parallel: bool = False
    partition_activations: bool = False  # checkpointed activations split across TP ranks
    micro_batches: int | None = None  # per pipeline flush (default: pp)

    def __post_init__(self) -> None:
        for name in ("gpus", "tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.dp is None:
            if self.gpus % (self.tp * self.pp):
                raise ConfigError(f"--gpus {self.gpus} is not a multiple of --tp {self.tp} x "
                                  f"--pp {self.pp}; pick sizes whose product divides it")
            object.__setattr__(self, "dp", self.gpus // (self.tp * self.pp))
        if self.dp < 1 or self.dp * self.tp * self.pp != self.gpus:
            raise ConfigError(f"--dp {self.dp} x --tp {self.tp} x --pp {self.pp} = "
                              f"{self.dp * self.tp * self.pp}, not --gpus {self.gpus}")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.fsdp and self.zero:
            raise ConfigError("--fsdp and --zero are two ways to shard; pick one")
        if (self.sequence_parallel or self.partition_activations) and self.tp == 1:
            raise ConfigError("--sequence-parallel and --partition-activations split activations "
                              "across tensor-parallel ranks: they need --tp > 1")
        if self.micro_batches is not None and self.micro_batches < 1:
            raise ConfigError(f"--micro-batches must be at least 1, got {self.micro_batches}")

    @property
    def in_flight(self) -> int:
        return self.micro_batches or self.pp


# ------------------------------------------------------------------------ tensor parallelism

@dataclass(frozen=True)
class TensorSplit:
    """Which values and parameters tensor parallelism splits, and along which dim."""

    split_values: frozenset[tuple[str, int]]  # (node, output index) split across TP ranks
    param_dims: dict[str, int | None]  # parameter node -> the dim TP shards (None: replicated)
    split_storages: frozenset[int]  # storages of split values
    embeddings: frozenset[str] = frozenset()  # vocab-parallel embedding weights


def tensor_split(g: CostedGraph) -> TensorSplit:
    """Propagate split/replicated through the graph (see the module docstring); once per graph
    (a plan search asks many times)."""
    return g.derived(_tensor_split)


def _tensor_split(g: CostedGraph) -> TensorSplit:
    split: set[tuple[str, int]] = set()
    dims: dict[str, int | None] = {}
    embeddings: set[str] = set()
    for n in g.op_order:
        d = g.nodes[n]
        inputs = values_in((d["args"], list(d["kwargs"].values())))
        name = short_op(d["op"])
        out_split = False
        if name in LINEAR_OPS and len(inputs) >= 2:
            x, w = inputs[0], inputs[1]
            column = (x.node, x.index) not in split
            if w.kind == "param":
                dims.setdefault(w.node, 0 if column else 1)
            if len(inputs) > 2 and inputs[2].kind == "param":
                dims.setdefault(inputs[2].node, 0 if column else None)
            out_split = column
        elif name in EMBEDDING_OPS and inputs:
            if inputs[0].kind == "param":
                dims.setdefault(inputs[0].node, 0)
                embeddings.add(inputs[0].node)
        else:
            out_split = any((v.node, v.index) in split for v in inputs)
        for i, spec in enumerate(d["outputs"]):
            if out_split and spec is not None and spec.shape:
                split.add((n, i))
    storages = set()
    for node, i in split:
        sid = g.nodes[node]["storages"][i]
        if sid is not None:
            storages.add(sid)
    for n in g.op_order:  # tensors a kernel makes to save, from a split op
        d = g.nodes[n]
        if (n, 0) in split:
            storages |= {s for s in d["saved"] if g.graph["storage_owner"].get(s) == n}
    return TensorSplit(frozenset(split), dims, frozenset(storages), frozenset(embeddings))


def _padded(full: tuple, local: tuple, dim: int | None, parts: int) -> tuple:
    """`local` with dim `dim` padded to the full chunk, ceil(full[dim] / parts) rows."""
    if dim is None or parts == 1 or not full:
        return tuple(local)
    out = list(local)
    out[dim] = math.ceil(full[dim] / parts)
    return tuple(out)


def _chunk(n: int, parts: int, rank: int) -> int:
    """Rows rank `rank` gets when torch.chunk splits n rows into `parts`."""
    size = math.ceil(n / parts) if n else 0
    return max(0, min(size, n - rank * size))


def local_shape(shape: tuple[int, ...], dim: int | None, parts: int, rank: int) -> tuple:
    if dim is None or parts == 1 or not shape:
        return tuple(shape)
    out = list(shape)
    out[dim] = _chunk(shape[dim], parts, rank)
    return tuple(out)


# ------------------------------------------------------------------------ model states

@dataclass(frozen=True)
class ModelStates:
    params_bytes: int
    grads_bytes: int
    optimizer_state_bytes: int
    params: int  # parameter elements on this rank
    local_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_state_bytes


STATE_TENSORS = {"adamw": 2, "adam": 2, "sgd": 0, "sgd-momentum": 1}


def _params(g: nx.DiGraph) -> list[tuple[str, dict]]:
    return sorted(((n, d) for n, d in g.nodes(data=True) if d["kind"] == "param"),
                  key=lambda x: x[1]["order"])


def stage_of_params(g: CostedGraph, pp: int) -> dict[str, int]:
    """Pipeline stage of each parameter: blocks split into pp contiguous runs, what comes
    before the stack to the first stage, after it to the last (a tied embedding/head
    parameter belongs to both: it is counted on the first). Once per graph and pp."""
    return g.derived(_stage_of_params, pp)


def _stage_of_params(g: CostedGraph, pp: int) -> dict[str, int]:
    stage_of_op = op_stages(g, pp)
    out = {}
    for n, _ in _params(g):
        readers = [stage_of_op[m] for m in g.successors(n) if m in stage_of_op]
        out[n] = min(readers) if readers else 0
    return out


def model_states_per_rank(analysis: Analysis, plan: ParallelPlan,
                          config: TrainingConfig | None = None, *, tp_rank: int = 0,
                          dp_rank: int = 0, stage: int = 0) -> ModelStates:
    """Parameter, gradient and optimizer-state bytes on one device of the plan."""
    config = config or TrainingConfig()
    g = analysis.graph
    split = tensor_split(g) if plan.tp > 1 else TensorSplit(frozenset(), {}, frozenset())
    stages = stage_of_params(g, plan.pp)
    params = grads = state = elements = 0
    shapes = {}
    flat_params = flat_grads = flat_state = 0
    experts = _expert_index(g) if plan.ep > 1 else {}
    per_rank = (max(experts.values()) + 1) // plan.ep if experts else 0
    for n, d in _params(g):
        if stages[n] != stage:
            continue
        # expert parallelism: this rank holds experts [ep_rank * E/ep, (ep_rank + 1) * E/ep)
        if n in experts and experts[n] // per_rank != dp_rank % plan.ep:
            continue
        replicas = plan.dp // plan.ep if n in experts else plan.dp
        spec = d["outputs"][0]
        item = spec.dtype.itemsize
        tp_dim = split.param_dims.get(n)
        shape = local_shape(spec.shape, tp_dim, plan.tp, tp_rank)
        # DTensor keeps a short dim-0 shard in storage padded to the full chunk
        stored = _padded(spec.shape, shape, tp_dim, plan.tp) if tp_dim == 0 else shape
        if plan.fsdp:
            tp_local = shape
            shape = local_shape(tp_local, 0, replicas, dp_rank // plan.ep)
            stored = _padded(tp_local, shape, 0, replicas)  # FSDP2 pads every rank's shard
        numel, stored_bytes = math.prod(shape), math.prod(stored) * item
        shapes[d["names"][0]] = shape
        elements += numel
        trainable = d["requires_grad"]
        n_states = STATE_TENSORS[config.optimizer] if trainable else 0
        step = STEP_TENSOR_BYTES if trainable and config.optimizer in ("adam", "adamw") else 0
        if plan.fsdp:  # gradients: views of one padded reduce-scatter buffer per group
            grad = stored_bytes
        elif plan.tp > 1 and n in split.embeddings:  # DTensor's embedding backward: full size
            grad = spec.nbytes
        else:
            grad = numel * item
        if plan.fsdp or plan.zero == 0:
            params += stored_bytes
            grads += grad if trainable else 0
            state += n_states * numel * item + step
        else:  # ZeRO: flat buffers partitioned evenly (below)
            flat_params += numel * item
            flat_grads += numel * item if trainable else 0
            flat_state += n_states * numel * item + step
    if not plan.fsdp and plan.zero:
        def part(x: int, sharded: bool) -> int:
            return math.ceil(x / plan.dp) if sharded else x
        params = part(flat_params, plan.zero >= 3)
        grads = part(flat_grads, plan.zero >= 2)
        state = part(flat_state, plan.zero >= 1)
    return ModelStates(params, grads, state, elements, shapes)


def _expert_index(g: nx.DiGraph) -> dict[str, int]:
    """Parameter node -> its expert's index, for the parameters of experts."""
    from graphcost.passes.experts import EXPERT_INDEX

    out = {}
    for n, d in _params(g):
        m = EXPERT_INDEX.match(d["names"][0])
        if m:
            out[n] = int(m.group(2))
    return out


def zero_model_states_bytes(params: float, dp: int, stage: int,
                            bytes_per_param: tuple[float, float, float] = (2, 2, 12)) -> float:
    """The ZeRO paper's per-device model states (Rajbhandari et al. 2020, figure 1): fp16
    parameters and gradients (2 + 2 bytes) and K = 12 bytes of fp32 Adam state (master
    weights, momentum, variance), partitioned across `dp` ranks from stage 1 (state), 2
    (+ gradients), 3 (+ parameters)."""
    p, gr, k = (b * params for b in bytes_per_param)
    return (p / dp if stage >= 3 else p) + (gr / dp if stage >= 2 else gr) + \
        (k / dp if stage >= 1 else k)


# ------------------------------------------------------------------------ per device

@dataclass(frozen=True)
class DeviceMemory:
    """The estimated peak of one device of the plan (the busiest pipeline stage, rank 0)."""

    plan: ParallelPlan
    stage: int
    states: ModelStates
    activation_bytes: int  # kept for backward, all in-flight micro-batches
    activations_per_micro_batch: int
    in_flight: int
    gather_bytes: int  # FSDP: one block's unsharded parameters and its gradients' buffer
    transient_bytes: int  # the one-device walk's largest forward/backward transient, / tp
    optimizer_transient_bytes: int  # its optimizer-step temporaries, scaled to local params

    @property
    def training_peak_bytes(self) -> int:
        """States, kept activations, FSDP's buffers and a transient: the backward's peak."""
        return (self.states.total_bytes + self.activation_bytes + self.gather_bytes
                + self.transient_bytes)

    @property
    def optimizer_peak_bytes(self) -> int:
        """States and the optimizer's temporaries (no activation is alive then)."""
        return self.states.total_bytes + self.optimizer_transient_bytes

    @property
    def peak_bytes(self) -> int:
        return max(self.training_peak_bytes, self.optimizer_peak_bytes)

    @property
    def peak_phase(self) -> str:
        return "backward" if self.training_peak_bytes >= self.optimizer_peak_bytes \
            else "optimizer"

    def breakdown(self) -> dict[str, int]:
        """What is alive at the estimated peak."""
        at_optimizer = self.peak_phase == "optimizer"
        return {"params": self.states.params_bytes, "grads": self.states.grads_bytes,
                "optimizer_state": self.states.optimizer_state_bytes,
                "activations": 0 if at_optimizer else self.activation_bytes,
                "fsdp_buffers": 0 if at_optimizer else self.gather_bytes,
                "transient": self.optimizer_transient_bytes if at_optimizer
                else self.transient_bytes}


def per_device_memory(analysis: Analysis, plan: ParallelPlan,
                      config: TrainingConfig | None = None,
                      timeline: MemoryTimeline | None = None) -> list[DeviceMemory]:
    """One estimate per pipeline stage (rank 0 of its TP and DP groups); the first is the
    busiest under 1F1B. `analysis` is traced at the micro-batch size; `timeline`: its
    one-device walk under `config`, when the caller has it."""
    config = config or TrainingConfig()
    check_plan(analysis, plan)
    g = analysis.graph
    timeline = timeline or training_timeline(analysis, config)
    split = tensor_split(g) if plan.tp > 1 else TensorSplit(frozenset(), {}, frozenset())
    ops = g.op_order
    stage_of_op = op_stages(g, plan.pp)
    # a checkpointed region keeps its inputs under its first op's name (schedule.kept_by)
    frames = {ops[r.start] for r in timeline.plan.regions} if timeline.plan else set()
    kept = [0] * plan.pp
    for sid, nbytes in timeline.kept_storages.items():
        holders = timeline.kept_by[sid]
        stage = min(stage_of_op.get(h, 0) for h in holders)
        divided = (sid in split.split_storages or plan.sequence_parallel
                   or (plan.partition_activations and any(h in frames for h in holders)))
        kept[stage] += math.ceil(nbytes / plan.tp) if divided else nbytes
    transient = timeline.table.category_bytes[:, CATEGORIES.index("transient")]
    at_optimizer = timeline.table.phase == PHASES.index("optimizer")
    step_transient = int(transient[~at_optimizer].max(initial=0))
    optimizer_transient = int(transient[at_optimizer].max(initial=0))
    whole = model_states_per_rank(analysis, ParallelPlan(), config).params_bytes or 1
    out = []
    for s in range(plan.pp):
        states = model_states_per_rank(analysis, plan, config, stage=s)
        in_flight = min(plan.pp - s, plan.in_flight)
        gather = 0
        if plan.fsdp and plan.dp > 1:
            gather = 2 * _largest_block_param_bytes(g, plan, split)
        out.append(DeviceMemory(
            plan, s, states, kept[s] * in_flight, kept[s], in_flight, gather,
            math.ceil(step_transient / plan.tp),
            math.ceil(optimizer_transient * states.params_bytes / whole)))
    return out


def op_stages(g: CostedGraph, pp: int) -> dict[str, int]:
    """Pipeline stage of every op (see stage_of_params), once per graph and pp."""
    return g.derived(_op_stages, pp)


def _op_stages(g: CostedGraph, pp: int) -> dict[str, int]:
    ops = g.op_order
    if pp == 1:
        return {n: 0 for n in ops}
    blocks = main_blocks(g)
    if len(blocks) < pp:
        raise ConfigError(f"--pp {pp} needs at least {pp} blocks; the model's main stack has "
                          f"{len(blocks)}")
    spans = module_calls(g)
    sizes = [len(blocks) // pp + (1 if s < len(blocks) % pp else 0) for s in range(pp)]
    bounds = [sum(sizes[:s]) for s in range(pp + 1)]
    first = spans[blocks[0]][0]
    stage = {}
    for k, n in enumerate(ops):
        stage[n] = 0 if k < first else pp - 1
    for s in range(pp):
        for b in blocks[bounds[s]:bounds[s + 1]]:
            lo, hi = spans[b]
            for n in ops[lo:hi + 1]:
                stage[n] = s
    return stage


def _largest_block_param_bytes(g, plan: ParallelPlan, split: TensorSplit) -> int:
    """FSDP all-gathers one block's parameters (TP-local) for its forward and backward and
    reduce-scatters its gradients from a buffer of the same size."""
    blocks = set(main_blocks(g))
    totals: dict[str, int] = defaultdict(int)  # by block ("": the whole model, without blocks)
    for n, d in _params(g):
        parts = d["names"][0].split(".")
        block = next((p for p in (".".join(parts[:k]) for k in range(1, len(parts)))
                      if p in blocks), None) if blocks else ""
        if block is not None:
            spec = d["outputs"][0]
            shape = local_shape(spec.shape, split.param_dims.get(n), plan.tp, 0)
            totals[block] += math.prod(shape) * spec.dtype.itemsize
    return max(totals.values(), default=0)


def check_plan(analysis: Analysis, plan: ParallelPlan) -> None:
    """What the model allows: TP must divide every attention's heads and every split dim."""
    g = analysis.graph
    if plan.tp > 1:
        for n in g.op_order:
            d = g.nodes[n]
            if "scaled_dot_product" in d["op"]:
                from graphcost.passes.memory.inference import cache_source

                q, k = d["args"][0].spec.shape, d["args"][1].spec.shape
                # key/value heads before grouped-query attention repeated them
                kv_heads = cache_source(g, d["args"][1]).spec.numel // (
                    math.prod(k[:-3]) * k[-2] * k[-1])
                for what, heads in (("query", q[-3]), ("key/value", kv_heads)):
                    if heads % plan.tp:
                        raise ConfigError(
                            f"--tp {plan.tp} does not divide the {heads} {what} heads of "
                            f"{d['module_path']}; pick a tensor-parallel size that divides "
                            "them")
    if plan.ep > 1:
        from graphcost.passes.experts import moe_summary

        moe = moe_summary(analysis)
        if moe is None:
            raise ConfigError(f"--ep {plan.ep}: the model has no experts to split (expert "
                              "parallelism applies to mixture-of-experts models)")
        experts = moe.layers[0].n_experts
        if experts % plan.ep or plan.dp % plan.ep:
            raise ConfigError(f"--ep {plan.ep} must divide the {experts} experts per layer and "
                              f"--dp {plan.dp} (expert parallelism splits each data-parallel "
                              "group's experts)")
    if plan.pp > 1:
        blocks = main_blocks(g)
        if len(blocks) < plan.pp:
            raise ConfigError(f"--pp {plan.pp} needs at least {plan.pp} blocks; the model's "
                              f"main stack has {len(blocks)}")


__all__ = ["DeviceMemory", "ModelStates", "ParallelPlan", "TensorSplit", "check_plan",
           "local_shape", "model_states_per_rank", "per_device_memory", "tensor_split",
           "zero_model_states_bytes"]
