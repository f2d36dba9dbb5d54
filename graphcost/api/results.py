"""What the Python API (graphcost.api.analyze) returns: frozen results that join a pass's answer with the
model's shape (name, batch, seq, dtype, precision) and the options that produced it.

Each has `to_dict()`, the one definition of its JSON keys: the command line's `--json` prints
exactly that (graphcost.cli), so the API and the CLI give the same figures by construction.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from graphcost.analysis.coverage import CoverageRow
from graphcost.passes.checkpoint.policy import parse_policy
from graphcost.passes.checkpoint.search import Optimum, PolicyRow
from graphcost.passes.compiled import CompiledStep
from graphcost.passes.memory.inference import InferenceMemory
from graphcost.passes.memory.training import MemoryTimeline, TrainingConfig
from graphcost.passes.parallel.plan import DeviceMemory, ParallelPlan
from graphcost.passes.roofline import DecodeTime, Efficiency, StepTime, TrainingCost
from graphcost.report.checkpoint import checkpoint_optimum_dict
from graphcost.sizing.fit import FitResult as Sizes
from graphcost.sizing.plans import Candidate


def json_safe(value):
    """inf and nan (an op that moves no bytes has infinite intensity) as null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def policy_name(config: TrainingConfig) -> str:
    """The checkpoint policy of a training config as the reports spell it ('every-2', 'none')."""
    return str(parse_policy(config.checkpoint))


@dataclass(frozen=True)
class ModelShape:
    """What MODEL named and at which shape: the keys every verb's JSON starts from."""

    name: str
    batch: int | None
    seq: int | None
    dtype: str | None  # the dtype the model was cast to (None: as built)
    tokens: int | None  # batch * seq for a (batch, seq) token model
    precision: str | None  # dtype, or "bf16-mixed" (fp32 weights under torch.autocast)


@dataclass(frozen=True)
class CoverageResult:
    """Every op of the trace with the rule that costs it, unsupported ones first."""

    name: str
    rows: tuple[CoverageRow, ...]
    unsupported_ops: dict[str, int]

    @property
    def missing(self) -> list[CoverageRow]:
        return [r for r in self.rows if not r.supported]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.name,
                "ops": [dict(r.__dict__, supported=r.supported) for r in self.rows],
                "unsupported_ops": self.unsupported_ops}


# ---------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryResult:
    """A training step's memory timeline (graphcost.passes.memory) with its model and options."""

    shape: ModelShape
    device: str
    config: TrainingConfig
    timeline: MemoryTimeline = field(repr=False)
    unsupported_ops: dict[str, int]
    # ops whose backward's memory their rule does not model exactly (OpCost.
    # backward_memory_exact): the training peak around them is approximate
    approximate_ops: dict[str, int] = field(default_factory=dict)
    # trained as torch.compile(model): its forward and backward (graphcost.passes.compiled)
    compiled: CompiledStep | None = field(default=None, repr=False)

    @property
    def peak_bytes(self) -> int:
        return self.timeline.peak.total_bytes

    @property
    def peak_at(self) -> dict[str, Any]:
        peak = self.timeline.peak
        return {"step": peak.step, "phase": peak.phase, "op": peak.op,
                "module": peak.module_path, "node": peak.node}

    @property
    def breakdown_at_peak(self) -> dict[str, int]:
        return self.timeline.peak.breakdown()

    def to_dict(self) -> dict[str, Any]:
        s, config, timeline = self.shape, self.config, self.timeline
        return {
            "model": s.name, "device": self.device, "batch": s.batch, "seq": s.seq,
            "dtype": s.dtype, "precision": s.precision, "optimizer": config.optimizer,
            "optimizer_impl": timeline.optimizer_impl,
            "steps": config.steps, "grad_accumulation": config.grad_accumulation,
            "checkpoint": policy_name(config), "compile": config.compile,
            # per optimizer step (all micro-batches), as `graphcost checkpoint` counts them
            "recompute_flops": timeline.recompute_flops * config.grad_accumulation,
            "saved_activation_bytes": timeline.saved_activation_bytes,
            "peak_bytes": self.peak_bytes, "peak_at": self.peak_at,
            "breakdown_at_peak": self.breakdown_at_peak,
            "phase_peaks": [{"step": st, "phase": p, "peak_bytes": b}
                            for (st, p), b in timeline.phase_peaks().items()],
            "unsupported_ops": self.unsupported_ops,
            "approximate_ops": self.approximate_ops,
            **({"compiled": self.compiled.to_dict()} if self.compiled else {}),
        }


@dataclass(frozen=True)
class InferenceMemoryResult:
    """A prefill's peak with the KV cache holding `context` tokens per sequence."""

    shape: ModelShape  # seq: the context
    device: str
    memory: InferenceMemory
    unsupported_ops: dict[str, int]

    @property
    def peak_bytes(self) -> int:
        return self.memory.peak_bytes

    @property
    def peak_at(self) -> dict[str, Any]:
        return {"phase": "prefill", "op": self.memory.peak_op, "module": self.memory.peak_module}

    @property
    def breakdown_at_peak(self) -> dict[str, int]:
        m = self.memory
        return {"params": m.weight_bytes, "kv_cache": m.kv_cache_bytes,
                "activations": m.activation_peak_bytes}

    def to_dict(self) -> dict[str, Any]:
        s = self.shape
        return {"model": s.name, "device": self.device, "batch": s.batch, "context": s.seq,
                "dtype": s.dtype, "peak_bytes": self.peak_bytes, "peak_at": self.peak_at,
                "breakdown_at_peak": self.breakdown_at_peak,
                "kv_cache_bytes_per_token": self.memory.kv_cache_bytes_per_token,
                "unsupported_ops": self.unsupported_ops}


@dataclass(frozen=True)
class ParallelMemoryResult:
    """Per-device memory under a parallel plan, one entry per pipeline stage."""

    shape: ModelShape
    device: str
    plan: ParallelPlan
    config: TrainingConfig
    stages: tuple[DeviceMemory, ...] = field(repr=False)
    unsupported_ops: dict[str, int]

    @property
    def busiest(self) -> DeviceMemory:
        return max(self.stages, key=lambda d: d.peak_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.busiest.peak_bytes

    def to_dict(self) -> dict[str, Any]:
        busiest = self.busiest
        return {"model": self.shape.name, "device": self.device, "batch": self.shape.batch,
                "seq": self.shape.seq, "plan": dict(self.plan.__dict__),
                "checkpoint": policy_name(self.config), "compile": self.config.compile,
                "peak_bytes_per_device": busiest.peak_bytes, "stage": busiest.stage,
                "breakdown_per_device": busiest.breakdown(),
                "stages": [{"stage": d.stage, "peak_bytes": d.peak_bytes,
                            "in_flight": d.in_flight, **d.breakdown()} for d in self.stages],
                "unsupported_ops": self.unsupported_ops}


# ---------------------------------------------------------------- checkpoint


@dataclass(frozen=True)
class CheckpointResult:
    """Checkpoint policies side by side; with a budget given, the optimum under it too."""

    shape: ModelShape
    device: str
    config: TrainingConfig
    budget_bytes: int | None
    budget_from: str | None  # "--budget" (given), "device" (its memory less the reserve), None
    rows: tuple[PolicyRow, ...]
    skipped: tuple[tuple[str, str], ...]  # (policy, why it does not apply)
    optimum: Optimum | None
    unsupported_ops: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        s, config = self.shape, self.config
        out = {"model": s.name, "device": self.device, "batch": s.batch, "seq": s.seq,
               "dtype": s.dtype, "precision": s.precision, "optimizer": config.optimizer,
               "grad_accumulation": config.grad_accumulation, "budget_bytes": self.budget_bytes,
               "budget_from": self.budget_from, "rows": [r.as_dict() for r in self.rows],
               "skipped": [{"policy": p, "reason": why} for p, why in self.skipped],
               "unsupported_ops": self.unsupported_ops}
        if self.optimum is not None:
            out.update(checkpoint_optimum_dict(self.optimum))
        return out


# ---------------------------------------------------------------- roofline and cost


@dataclass(frozen=True)
class RooflineResult:
    """The roofline time of a training step: `step_time_s`, `mfu`, `hfu`, `tokens_per_s`."""

    shape: ModelShape
    config: TrainingConfig
    step: StepTime = field(repr=False)
    compute_bound_batch: int | None
    with_compute_bound_batch: bool  # whether it was asked for (the key is left out otherwise)
    unsupported_ops: dict[str, int]

    step_time_s = property(lambda self: self.step.step_time_s)
    mfu = property(lambda self: self.step.mfu)
    hfu = property(lambda self: self.step.hfu)
    tokens_per_s = property(lambda self: self.step.tokens_per_s)

    def to_dict(self) -> dict[str, Any]:
        s, config, step = self.shape, self.config, self.step
        bound = step.seconds_by_bound()
        out = {"model": s.name, "batch": s.batch, "seq": s.seq, "dtype": s.dtype,
               "precision": s.precision, "optimizer": config.optimizer,
               "checkpoint": policy_name(config), "compile": config.compile,
               "grad_accumulation": config.grad_accumulation, **step.totals(),
               "optimizer_flops": step.optimizer_flops,
               "compute_bound_s": bound["compute"], "memory_bound_s": bound["memory"]}
        if self.with_compute_bound_batch:
            out["compute_bound_batch"] = self.compute_bound_batch
        out["unsupported_ops"] = self.unsupported_ops
        out["ops"] = [o.as_dict() for o in step.ops]
        return json_safe(out)


@dataclass(frozen=True)
class InferenceRooflineResult:
    """A prefill at (batch, seq), a decode step at `context`, and the context from which
    decoding is memory-bound at any batch."""

    shape: ModelShape
    device: str
    context: int
    efficiency: Efficiency
    prefill: StepTime = field(repr=False)
    decode: DecodeTime = field(repr=False)
    memory_bound_context: float | None
    unsupported_ops: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        s, prefill, decode = self.shape, self.prefill, self.decode
        return json_safe({
            "model": s.name, "device": self.device, "batch": s.batch, "seq": s.seq,
            "context": self.context, "dtype": s.dtype, "precision": s.precision,
            "efficiency": dict(self.efficiency.__dict__),
            "prefill_s": prefill.step_time_s, "prefill_tokens_per_s": prefill.tokens_per_s,
            "prefill_mfu": prefill.mfu, "prefill_flops": prefill.model_flops,
            "decode_s_per_token": decode.seconds_per_token,
            "decode_tokens_per_s": decode.tokens_per_s, "decode_flops": decode.step.model_flops,
            "memory_bound_context": self.memory_bound_context,
            "peak_flops_per_s": prefill.peak_flops_per_s, "mfu_dtype": prefill.mfu_dtype,
            "unsupported_ops": self.unsupported_ops,
            "ops": [o.as_dict() for o in prefill.ops]})


@dataclass(frozen=True)
class CostResult:
    """Time and money of a run over `cost.tokens` tokens, next to the k N D rules of thumb."""

    shape: ModelShape
    device: str
    config: TrainingConfig
    inference: bool  # the forward only over the tokens (evaluation, prefill)
    cost: TrainingCost
    step: StepTime = field(repr=False)
    unsupported_ops: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        s = self.shape
        return {"model": s.name, "device": self.device, "batch": s.batch, "seq": s.seq,
                "precision": s.precision,
                "checkpoint": policy_name(self.config), "compile": self.config.compile,
                **self.cost.as_dict(), "mfu_dtype": self.step.mfu_dtype,
                "unsupported_ops": self.unsupported_ops}


@dataclass(frozen=True)
class SweepResult:
    """Roofline and peak memory per (batch, seq): `rows` as the table and the CSV have them."""

    name: str
    device: str
    precision: str | None
    config: TrainingConfig
    efficiency: Efficiency
    budget_bytes: int | None
    rows: tuple[dict[str, Any], ...]
    unsupported_ops: dict[str, int]  # of the first traced shape that had any

    def to_dict(self) -> dict[str, Any]:
        config = self.config
        return {"model": self.name, "device": self.device, "precision": self.precision,
                "optimizer": config.optimizer, "checkpoint": policy_name(config), "compile": config.compile,
                "grad_accumulation": config.grad_accumulation,
                "efficiency": dict(self.efficiency.__dict__), "budget_bytes": self.budget_bytes,
                "rows": [dict(r) for r in self.rows]}


# ---------------------------------------------------------------- fit and plan


@dataclass(frozen=True)
class FitResult:
    """The largest batch at `seq` and the largest context at batch 1 that fit, for training and
    inference: `max_batch` and `max_seq` are the training answers."""

    name: str
    dtype: str | None
    precision: str | None
    config: TrainingConfig
    sizes: Sizes

    @property
    def max_batch(self) -> int:
        return self.sizes.train_max_batch

    @property
    def max_seq(self) -> int | None:
        return self.sizes.train_max_seq

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.name, "dtype": self.dtype, "precision": self.precision,
                "optimizer": self.config.optimizer, "checkpoint": policy_name(self.config),
                "compile": self.config.compile, **asdict(self.sizes), "max_batch": self.max_batch,
                "max_seq": self.max_seq}


@dataclass(frozen=True)
class ParallelFitResult:
    """The largest micro-batch per data-parallel rank under a parallel plan (`max_seq`: None,
    the context search is for one device)."""

    name: str
    seq: int | None
    device: str
    plan: ParallelPlan
    config: TrainingConfig
    budget_bytes: int
    max_batch: int
    max_seq: None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.name, "device": self.device, "plan": dict(self.plan.__dict__),
                "budget_bytes": self.budget_bytes, "checkpoint": policy_name(self.config),
                "compile": self.config.compile, "max_batch": self.max_batch, "max_seq": self.max_seq}


@dataclass(frozen=True)
class PlanResult:
    """Parallel plans, the feasible ones fastest first, then the rejected ones."""

    name: str
    device: str
    gpus: int
    global_batch: int
    seq: int | None  # as asked (None: the model's own)
    network: Any  # graphcost.hardware.network.Network
    plans: tuple[Candidate, ...]

    def to_dict(self) -> dict[str, Any]:
        n = self.network
        return json_safe({
            "model": self.name, "device": self.device, "gpus": self.gpus,
            "global_batch": self.global_batch, "seq": self.seq,
            "network": {"intra_node": n.intra.name, "inter_node": n.inter.name,
                        "gpus_per_node": n.gpus_per_node},
            "plans": [c.as_dict() for c in self.plans]})


__all__ = ["CheckpointResult", "CostResult", "CoverageResult", "FitResult", "InferenceMemoryResult",
           "InferenceRooflineResult", "MemoryResult", "ModelShape", "ParallelFitResult",
           "ParallelMemoryResult", "PlanResult", "RooflineResult", "SweepResult", "json_safe",
           "policy_name"]
