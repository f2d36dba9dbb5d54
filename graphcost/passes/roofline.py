"""Roofline time: every op of the costed graph takes

    max(FLOPs / (peak FLOP/s for its dtype and op class x matmul or vector efficiency),
        bytes moved / (bandwidth x bandwidth efficiency))

and a training step is its forward, its backward, the recomputation its checkpoint policy runs
(once per micro-batch) and the optimizer step. The efficiencies are named options, 1.0 by
default: the physical limit, which no kernel reaches (others measured 87% of the bf16 peak
for large matmuls on an A100 SXM, 80% on an H100 SXM: ../shared/reference/hardware.md), and
`graphcost calibrate` measures this machine's achieved figures.

Op classes: matmul-class ops (linear, matmul, bmm, attention, convolution: the ops
FlopCounterMode counts) run at the device's dense matmul peak for their dtype (tensor cores);
any other op with FLOPs at the vector peak. Pointwise ops have no FLOPs in FlopCounterMode's
convention: their time is their memory traffic, which is what bounds them.

Bytes moved: forward, the op's bytes_read + bytes_written (annotate: its inputs and new
outputs, or what its rule says). Backward: the incoming gradient of each output, the tensors
saved for it, and a gradient written for each input that needs one. Optimizer: the single-tensor
update reads and writes each trainable parameter's state (`OPTIMIZER_ACCESSES`) and does
`OPTIMIZER_FLOPS` per parameter (counted from torch.optim's single-tensor code).

MFU = model FLOPs (forward + backward) / (step time x the dense peak of the dtype the model's
matmuls run in); HFU counts the recomputed FLOPs too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from graphcost.analysis.analyze import Analysis
from graphcost.errors import ConfigError
from graphcost.hardware.devices import Device, get_device
from graphcost.passes.checkpoint.policy import MATMUL_OPS, short_op
from graphcost.passes.memory.timeline import training_timeline
from graphcost.passes.memory.training import TrainingConfig
from graphcost.rules.registry import values_in

# the graph attributes it reads (graphcost/graph/schema.py)
READS = ("args", "backward_flops", "bytes_read", "bytes_written", "forward_flops", "kind",
         "kwargs", "module_path", "op", "order", "outputs", "requires_grad", "runs_backward",
         "saved", "storage_bytes", "weight_bytes")

# Reads + writes of a parameter-sized tensor per trainable parameter, single-tensor update:
# AdamW reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq.
OPTIMIZER_ACCESSES = {"sgd": 3, "sgd-momentum": 5, "adam": 7, "adamw": 7}
# FLOPs per trainable parameter of one step (torch/optim/adamw.py, single tensor):
# weight decay p *= 1 - lr*wd (1), exp_avg.lerp_ (3), exp_avg_sq.mul_().addcmul_() (4),
# denom = sqrt / c + eps (3), p.addcdiv_ (3); Adam has no decoupled decay; SGD p -= lr*g (2),
# momentum buf = m*buf + g (2) first.
OPTIMIZER_FLOPS = {"sgd": 2, "sgd-momentum": 4, "adam": 13, "adamw": 14}


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the device's peaks that kernels reach (1.0: the physical limit)."""

    matmul: float = 1.0
    vector: float = 1.0
    bandwidth: float = 1.0

    def __post_init__(self) -> None:
        for name in ("matmul", "vector", "bandwidth"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} efficiency must be in (0, 1], got {value}")


@dataclass(frozen=True)
class OpTime:
    name: str
    op: str
    module_path: str
    phase: str  # forward | backward | recompute
    dtype: str
    op_class: str  # matmul | vector (pointwise, reductions, copies)
    flops: int
    bytes: int
    compute_s: float
    memory_s: float

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved (0 for an op that computes and moves nothing: a view)."""
        if not self.bytes:
            return float("inf") if self.flops else 0.0
        return self.flops / self.bytes

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s > self.memory_s else "memory"

    def as_dict(self) -> dict:
        return {**self.__dict__, "seconds": self.seconds, "intensity": self.intensity,
                "bound": self.bound}


@dataclass(frozen=True)
class StepTime:
    """Roofline time of one training step, or of one forward (kind "forward": a prefill, an
    evaluation batch) or decode step."""

    device: str
    efficiency: Efficiency
    ops: tuple[OpTime, ...] = field(repr=False)
    forward_s: float
    backward_s: float
    recompute_s: float
    optimizer_s: float
    micro_batches: int
    model_flops: int  # per step, all micro-batches: forward + backward
    hardware_flops: int  # model FLOPs + recompute
    optimizer_flops: int
    peak_flops_per_s: float  # the dense peak MFU is taken against
    mfu_dtype: str
    tokens: int  # tokens (or samples) per step, all micro-batches
    kind: str = "training"  # "training", "forward" (prefill, evaluation) or "decode"
    # seconds_by_bound where `ops` are a compiled stack's first blocks (roofline_compiled.py)
    bound_s: dict[str, float] | None = None

    @property
    def step_time_s(self) -> float:
        return (self.forward_s + self.backward_s + self.recompute_s) * self.micro_batches + \
            self.optimizer_s

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.step_time_s * self.peak_flops_per_s)

    @property
    def hfu(self) -> float:
        return self.hardware_flops / (self.step_time_s * self.peak_flops_per_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_time_s

    def seconds_by_bound(self) -> dict[str, float]:
        """Time per micro-batch spent in compute- and in memory-bound ops."""
        if self.bound_s is not None:
            return dict(self.bound_s)
        out = {"compute": 0.0, "memory": 0.0}
        for o in self.ops:
            out[o.bound] += o.seconds
        return out

    def totals(self) -> dict:
        return {
            "device": self.device, "step_time_s": self.step_time_s, "mfu": self.mfu,
            "hfu": self.hfu, "tokens_per_s": self.tokens_per_s, "tokens": self.tokens,
            "model_flops": self.model_flops, "hardware_flops": self.hardware_flops,
            "forward_s": self.forward_s, "backward_s": self.backward_s,
            "recompute_s": self.recompute_s, "optimizer_s": self.optimizer_s,
            "micro_batches": self.micro_batches, "peak_flops_per_s": self.peak_flops_per_s,
            "mfu_dtype": self.mfu_dtype, "efficiency": dict(self.efficiency.__dict__),
        }


def _dtype(d: dict) -> torch.dtype:
    out = next((s for s in d["outputs"] if s is not None), None)
    return out.dtype if out is not None else torch.float32


class _Roof:
    def __init__(self, device: Device, efficiency: Efficiency) -> None:
        self.device, self.eff = device, efficiency

    def time(self, name: str, d: dict, phase: str, flops: int, nbytes: int) -> OpTime:
        dtype = _dtype(d)
        matmul = short_op(d["op"]) in MATMUL_OPS
        compute = 0.0
        if flops:
            peak = (self.device.matmul_flops_per_s(dtype) * self.eff.matmul if matmul
                    else self.device.vector_flops_per_s(dtype) * self.eff.vector)
            compute = flops / peak
        memory = nbytes / (self.device.memory_bandwidth_bytes_per_s() * self.eff.bandwidth)
        return OpTime(name=name, op=d["op"], module_path=d["module_path"], phase=phase,
                      dtype=str(dtype).replace("torch.", ""),
                      op_class="matmul" if matmul else "vector", flops=flops, bytes=nbytes,
                      compute_s=compute, memory_s=memory)


def _backward_bytes(g, n: str, d: dict) -> int:
    """Incoming gradients, the saved tensors, and one gradient per input that needs one."""
    incoming = sum(s.nbytes for s in d["outputs"] if s is not None)
    saved = sum(g.graph["storage_bytes"][sid] for sid in d["saved"])
    seen, written = set(), 0
    for v in values_in((d["args"], list(d["kwargs"].values()))):
        if v.requires_grad and (v.node, v.index) not in seen:
            seen.add((v.node, v.index))
            written += v.spec.nbytes
    return incoming + saved + written


def op_times(analysis: Analysis, device: str | Device, efficiency: Efficiency = Efficiency(),
             backward: bool = True) -> list[OpTime]:
    """Forward (and backward) time of every op of the graph."""
    device = get_device(device)
    roof, g = _Roof(device, efficiency), analysis.graph
    rows = []
    ops = g.op_order
    for n in ops:
        d = g.nodes[n]
        rows.append(roof.time(n, d, "forward", d["forward_flops"],
                              d["bytes_read"] + d["bytes_written"]))
    if backward:
        for n in reversed(ops):
            d = g.nodes[n]
            if d["runs_backward"]:
                rows.append(roof.time(n, d, "backward", d["backward_flops"],
                                      _backward_bytes(g, n, d)))
    return rows


def mfu_dtype(analysis: Analysis) -> torch.dtype:
    """The dtype the model's matmul-class FLOPs mostly run in."""
    flops: dict[torch.dtype, int] = {}
    g = analysis.graph
    for n in g.op_order:
        d = g.nodes[n]
        if short_op(d["op"]) in MATMUL_OPS:
            flops[_dtype(d)] = flops.get(_dtype(d), 0) + d["forward_flops"]
    return max(flops, key=flops.get) if flops else torch.float32


def tokens_of(analysis: Analysis) -> int:
    """Tokens per micro-batch: the elements of the first integer input (token ids), or the
    first input's batch size (samples) for other models."""
    g = analysis.graph
    inputs = sorted((n for n, d in g.nodes(data=True) if d["kind"] == "input"),
                    key=lambda n: g.nodes[n]["order"])
    for n in inputs:
        spec = g.nodes[n]["outputs"][0]
        if not spec.dtype.is_floating_point and spec.dtype != torch.bool:
            return spec.numel
    return g.nodes[inputs[0]]["outputs"][0].shape[0] if inputs else 1


def training_step_time(analysis: Analysis, device: str | Device,
                       config: TrainingConfig | None = None,
                       efficiency: Efficiency = Efficiency()) -> StepTime:
    """Roofline time, MFU and HFU of one optimizer step (`config.grad_accumulation`
    micro-batches; recomputation from `config.checkpoint`)."""
    device = get_device(device)
    config = config or TrainingConfig()
    if config.compile:  # its kernels come from the module (roofline_compiled.py)
        raise ConfigError("a compiled step's time needs its kernels: "
                          "graphcost.analyze(...).roofline(compile=True)")
    ops = op_times(analysis, device, efficiency)
    recomputed = training_timeline(analysis, replace(config, steps=1)).recomputed_ops \
        if config.checkpoint != "none" else ()
    by_name = {o.name: o for o in ops if o.phase == "forward"}
    rerun = [replace(by_name[n], phase="recompute") for n in recomputed]
    opt_flops, optimizer_s = optimizer_time(analysis, device, config, efficiency)
    micro = config.grad_accumulation
    dtype = mfu_dtype(analysis)
    recompute_flops = sum(o.flops for o in rerun)
    return StepTime(
        device=device.name, efficiency=efficiency, ops=tuple(ops + rerun),
        forward_s=sum((o.seconds for o in ops if o.phase == "forward"), 0.0),
        backward_s=sum((o.seconds for o in ops if o.phase == "backward"), 0.0),
        recompute_s=sum((o.seconds for o in rerun), 0.0), optimizer_s=optimizer_s,
        micro_batches=micro,
        model_flops=(analysis.forward_flops + analysis.backward_flops) * micro,
        hardware_flops=(analysis.forward_flops + analysis.backward_flops + recompute_flops)
        * micro,
        optimizer_flops=opt_flops,
        peak_flops_per_s=device.matmul_flops_per_s(dtype), mfu_dtype=str(dtype).replace(
            "torch.", ""),
        tokens=tokens_of(analysis) * micro)


def optimizer_time(analysis: Analysis, device: Device, config: TrainingConfig,
                    efficiency: Efficiency) -> tuple[int, float]:
    """(FLOPs, seconds) of the optimizer's step (single-tensor updates)."""
    g = analysis.graph
    params = [d for _, d in g.nodes(data=True) if d["kind"] == "param" and d["requires_grad"]]
    param_count = sum(d["outputs"][0].numel for d in params)
    param_bytes = sum(d["outputs"][0].nbytes for d in params)
    opt_flops = OPTIMIZER_FLOPS[config.optimizer] * param_count
    opt_bytes = OPTIMIZER_ACCESSES[config.optimizer] * param_bytes
    opt_dtype = params[0]["outputs"][0].dtype if params else torch.float32
    return opt_flops, max(
        opt_flops / (device.vector_flops_per_s(opt_dtype) * efficiency.vector)
        if opt_flops else 0.0,
        opt_bytes / (device.memory_bandwidth_bytes_per_s() * efficiency.bandwidth))


def forward_time(analysis: Analysis, device: str | Device,
                 efficiency: Efficiency = Efficiency()) -> StepTime:
    """Roofline time of one forward without autograd (a prefill, an evaluation batch)."""
    device = get_device(device)
    ops = op_times(analysis, device, efficiency, backward=False)
    dtype = mfu_dtype(analysis)
    return StepTime(
        device=device.name, efficiency=efficiency, ops=tuple(ops),
        forward_s=sum(o.seconds for o in ops), backward_s=0.0, recompute_s=0.0,
        optimizer_s=0.0, micro_batches=1, model_flops=analysis.forward_flops,
        hardware_flops=analysis.forward_flops, optimizer_flops=0,
        peak_flops_per_s=device.matmul_flops_per_s(dtype),
        mfu_dtype=str(dtype).replace("torch.", ""), tokens=tokens_of(analysis), kind="forward")


# ------------------------------------------------------------------------------- inference

@dataclass(frozen=True)
class DecodeTime:
    """One decode step: every sequence of the batch appends one token, attending to `context`
    cached tokens."""

    batch: int
    context: int
    step: StepTime  # its ops: the one-token forward, attention over the cache

    @property
    def seconds_per_token(self) -> float:
        """Per generated token of one sequence: the step's time (all sequences advance)."""
        return self.step.step_time_s

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.step.step_time_s


def decode_time(one_token: Analysis, context: int, device: str | Device,
                efficiency: Efficiency = Efficiency()) -> DecodeTime:
    """Time of a decode step, from the model traced on one token (batch B, seq 1) without
    targets: its ops as traced, except that each attention reads a cache of `context` tokens:
    FLOPs 4 B H d (context + 1) (FlopCounterMode's SDPA formula with that key length) and
    bytes the cached keys and values (kv_cache_bytes_per_token's share of each attention)."""
    from graphcost.passes.memory.inference import kv_cache_bytes_per_token

    device = get_device(device)
    g = one_token.graph
    ops = op_times(one_token, device, efficiency, backward=False)
    attention = [o for o in ops if "scaled_dot_product" in o.op]
    per_op_kv = kv_cache_bytes_per_token(one_token) // max(len(attention), 1)
    roof = _Roof(device, efficiency)
    out = []
    batch = tokens_of(one_token)
    for o in ops:
        if o in attention:
            d = g.nodes[o.name]
            q = d["args"][0].spec.shape  # (B, H, 1, d)
            heads, dim = q[-3], q[-1]
            keys = context + 1
            flops = 4 * batch * heads * dim * keys
            moved = o.bytes + batch * per_op_kv * context
            o = roof.time(o.name, d, "forward", flops, moved)
        out.append(o)
    dtype = mfu_dtype(one_token)
    flops = sum(o.flops for o in out)
    step = StepTime(device=device.name, efficiency=efficiency, ops=tuple(out),
                    forward_s=sum(o.seconds for o in out), backward_s=0.0, recompute_s=0.0,
                    optimizer_s=0.0, micro_batches=1, model_flops=flops, hardware_flops=flops,
                    optimizer_flops=0, peak_flops_per_s=device.matmul_flops_per_s(dtype),
                    mfu_dtype=str(dtype).replace("torch.", ""), tokens=batch, kind="decode")
    return DecodeTime(batch=batch, context=context, step=step)


def memory_bound_context(one_token: Analysis, device: str | Device,
                         efficiency: Efficiency = Efficiency()) -> float | None:
    """The context length beyond which a decode step is memory-bound at any batch size: its
    bytes take longer than its FLOPs however many sequences share the weights' reads. None if
    that never happens (compute grows faster with the context than the cache read).

    Per sequence (the limit of a large batch), from the one-token trace: each op's FLOPs and
    its bytes other than the weights it reads scale with the batch; the weights' bytes do not
    and vanish. Each attention adds, per cached token, 4 H d FLOPs and the cache's bytes. With
    c0 + c1 C the compute time and m0 + m1 C the memory time per sequence, the answer is the
    C where they cross."""
    from graphcost.passes.memory.inference import kv_cache_bytes_per_token

    device = get_device(device)
    g = one_token.graph
    batch = tokens_of(one_token)
    bw = device.memory_bandwidth_bytes_per_s() * efficiency.bandwidth
    ops = op_times(one_token, device, efficiency, backward=False)
    attention = [o for o in ops if "scaled_dot_product" in o.op]
    kv = kv_cache_bytes_per_token(one_token) / max(len(attention), 1)
    c0 = c1 = m0 = m1 = 0.0
    for o in ops:
        d = g.nodes[o.name]
        m0 += (o.bytes - d["weight_bytes"]) / batch / bw
        if o in attention:
            q = d["args"][0].spec.shape
            per_key = 4 * q[-3] * q[-1] / (
                device.matmul_flops_per_s(_dtype(d)) * efficiency.matmul)
            c0 += per_key  # the token attends to itself too
            c1 += per_key
            m1 += kv / bw
        else:
            c0 += o.compute_s / batch
    if m1 <= c1:
        return None
    return max(0.0, (c0 - m0) / (m1 - c1))


def compute_bound_batch(at_batch_1: Analysis, at_batch_2: Analysis, device: str | Device,
                        config: TrainingConfig | None = None,
                        efficiency: Efficiency = Efficiency(), limit: int = 1 << 20) -> int | None:
    """The smallest batch at which a training step spends more time in compute-bound ops than in
    memory-bound ones (same sequence length; None up to `limit`). Per op, compute and memory time
    are linear in the batch (FLOPs and activations scale with it, weights do not), so two traces
    give every op's two lines, and the step at any batch follows."""
    ones = training_step_time(at_batch_1, device, config, efficiency)
    twos = training_step_time(at_batch_2, device, config, efficiency)
    if [(o.name, o.phase) for o in ones.ops] != [(o.name, o.phase) for o in twos.ops]:
        raise ValueError("the two traces differ in their ops: not the same model")
    lines = [(2 * a.compute_s - b.compute_s, b.compute_s - a.compute_s,
              2 * a.memory_s - b.memory_s, b.memory_s - a.memory_s)
             for a, b in zip(ones.ops, twos.ops)]

    # Each op flips between bounds at most once, where its two lines cross; between those
    # points the set of compute-bound ops is fixed and the comparison is linear in the batch.
    cuts = {1, limit + 1}
    for c0, c1, m0, m1 in lines:
        if c1 != m1:
            t = (m0 - c0) / (c1 - m1)
            if 1 <= t < limit:
                cuts |= {math.floor(t) + 1, math.ceil(t)}
    cuts_sorted = sorted(c for c in cuts if 1 <= c <= limit + 1)
    for lo, nxt in zip(cuts_sorted, cuts_sorted[1:]):
        alpha = beta = 0.0  # compute-bound time - memory-bound time = alpha * B + beta
        for c0, c1, m0, m1 in lines:
            if c0 + c1 * lo > m0 + m1 * lo:
                alpha, beta = alpha + c1, beta + c0
            else:
                alpha, beta = alpha - m1, beta - m0
        if alpha * lo + beta > 0:
            return lo
        if alpha > 0:
            first = math.floor(-beta / alpha) + 1
            if lo <= first < nxt:
                return first
    return None


# ------------------------------------------------------------------------------- cost

@dataclass(frozen=True)
class TrainingCost:
    """Time and money to train on `tokens` tokens with `gpus` devices (data parallel, no
    communication cost: see the parallelism pass for that), at an MFU predicted by the roofline
    or assumed, next to the 6ND (and, with full recomputation, 8ND) rules of thumb; with
    kind "inference", to run the forward over them (evaluation, prefill), next to 2ND."""

    kind: str  # "training" or "inference"
    tokens: float
    gpus: int
    params: int
    model_flops_per_token: float  # forward + backward (inference: forward), from the graph
    peak_flops_per_s: float  # per device
    mfu: float
    mfu_source: str  # "predicted" (roofline) or "assumed"
    usd_per_gpu_hour: float | None

    @property
    def total_flops(self) -> float:
        return self.tokens * self.model_flops_per_token

    @property
    def seconds(self) -> float:
        return self.total_flops / (self.gpus * self.peak_flops_per_s * self.mfu)

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.gpus / 3600

    @property
    def days(self) -> float:
        return self.seconds / 86400

    @property
    def usd(self) -> float | None:
        return None if self.usd_per_gpu_hour is None else self.gpu_hours * self.usd_per_gpu_hour

    @property
    def rules(self) -> tuple[int, ...]:
        """The k of the k N D rules of thumb this run is compared with."""
        return (6, 8) if self.kind == "training" else (2,)

    def rule_of_thumb(self, flops_per_param_token: int) -> dict:
        """The same run counted as k N D FLOPs (training: 6, 8 with full recomputation;
        inference: 2)."""
        flops = flops_per_param_token * self.params * self.tokens
        seconds = flops / (self.gpus * self.peak_flops_per_s * self.mfu)
        hours = seconds * self.gpus / 3600
        return {"flops": flops, "seconds": seconds, "gpu_hours": hours, "days": seconds / 86400,
                "usd": None if self.usd_per_gpu_hour is None else hours * self.usd_per_gpu_hour}

    def as_dict(self) -> dict:
        return {**self.__dict__, "total_flops": self.total_flops, "seconds": self.seconds,
                "gpu_hours": self.gpu_hours, "days": self.days, "usd": self.usd,
                **{f"{k}ND": self.rule_of_thumb(k) for k in self.rules}}


def training_cost(step: StepTime, params: int, tokens: float, gpus: int = 1,
                  usd_per_gpu_hour: float | None = None, mfu: float | None = None) -> TrainingCost:
    """Cost of training on `tokens` tokens (a `training_step_time` step), or of running the
    forward over them (a `forward_time` step: kind "inference"); `mfu` None takes the
    roofline's (step.mfu)."""
    if tokens <= 0 or gpus < 1:
        raise ValueError(f"tokens ({tokens}) must be > 0 and gpus ({gpus}) >= 1")
    if mfu is not None and not 0 < mfu <= 1:
        raise ValueError(f"MFU must be in (0, 1], got {mfu}")
    return TrainingCost(kind="training" if step.kind == "training" else "inference",
                        tokens=tokens, gpus=gpus, params=params,
                        model_flops_per_token=step.model_flops / step.tokens,
                        peak_flops_per_s=step.peak_flops_per_s,
                        mfu=step.mfu if mfu is None else mfu,
                        mfu_source="predicted" if mfu is None else "assumed",
                        usd_per_gpu_hour=usd_per_gpu_hour)
