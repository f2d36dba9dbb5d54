"""The Python API: the command line's verbs as functions and methods, with the same options as
keyword arguments and the same results (graphcost.api.results; the CLI prints their `to_dict()`).

    >>> import graphcost
    >>> a = graphcost.analyze("gpt2", seq=128, overrides={"n_layer": 2})
    >>> a.params
    53561088
    >>> a.memory(optimizer="sgd").peak_bytes > a.weight_bytes
    True

`analyze` takes a module and its example inputs, as graphcost.analysis.analyze does, or MODEL as
the command line names it (a zoo name, `path/to/file.py:factory`, `hf:path/to/config.json`) with
its shape. It returns a `ModelAnalysis`: the Analysis, its shape, and the methods `memory`,
`checkpoints`, `optimize`, `roofline`, `cost` and `coverage`. `fit`, `plan`, `sweep` and `cost`
by name (graphcost.api.shapes) trace MODEL at the shapes they need; the vocabulary they share
(precision, sizes, budgets, training options) is graphcost.api.options.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from graphcost.analysis.analyze import Analysis
from graphcost.analysis.analyze import analyze as analyze_module
from graphcost.analysis.coverage import coverage
from graphcost.api.options import (
    CHECKPOINT_IS_TRAINING,
    Budget,
    check_context,
    efficiency_of,
    parse_bytes,
    parse_precision,
    precision_dtypes,
    resolve_budget,
    roofline_device,
    sized_device,
    training_config,
)
from graphcost.api.results import (
    CheckpointResult,
    CostResult,
    CoverageResult,
    InferenceMemoryResult,
    InferenceRooflineResult,
    MemoryResult,
    ModelShape,
    ParallelMemoryResult,
    RooflineResult,
)
from graphcost.errors import ConfigError, GraphcostError
from graphcost.hardware.devices import DEFAULT_DEVICE, Device, get_device
from graphcost.load.model import DTYPES, CliError, dtype_name, load_model
from graphcost.passes.checkpoint.policy import BUILTIN_POLICIES, parse_policy
from graphcost.passes.checkpoint.policy import plan as policy_plan
from graphcost.passes.checkpoint.search import Optimum, compare, optimize, policy_row
from graphcost.passes.compiled import CompiledStep, compiled_step
from graphcost.passes.experts import moe_summary
from graphcost.passes.memory.compiled import compiled_timeline
from graphcost.passes.memory.inference import inference_memory
from graphcost.passes.memory.timeline import approximate_ops, training_timeline
from graphcost.passes.memory.training import TrainingConfig
from graphcost.passes.parallel.plan import ParallelPlan, per_device_memory
from graphcost.passes.roofline import (
    Efficiency,
    StepTime,
    decode_time,
    forward_time,
    memory_bound_context,
    training_cost,
    training_step_time,
)
from graphcost.passes.roofline import compute_bound_batch as find_compute_bound_batch
from graphcost.passes.roofline_compiled import compiled_step_time
from graphcost.rules.registry import RuleRegistry

# ---------------------------------------------------------------- analyze


@dataclass(frozen=True)
class ModelSource:
    """How a ModelAnalysis was loaded, so that it can be traced again at another shape."""

    model: str
    batch: int | None = None
    seq: int | None = None
    precision: str | None = None
    targets: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)
    device: Device | str = DEFAULT_DEVICE
    strict: bool = False
    rules: RuleRegistry | None = None
    autocast: torch.dtype | None = None
    reuse_blocks: bool = True

    def analyze(self) -> ModelAnalysis:
        return analyze(self.model, batch=self.batch, seq=self.seq, precision=self.precision,
                       targets=self.targets, overrides=self.overrides, device=self.device,
                       strict=self.strict, rules=self.rules, autocast=self.autocast,
                       reuse_blocks=self.reuse_blocks)


@dataclass(frozen=True)
class ModelAnalysis(Analysis):
    """An Analysis with its model's shape, and the passes as methods."""

    shape: ModelShape | None = None
    source: ModelSource | None = field(default=None, repr=False, compare=False)
    # a module analyzed as given: (module, example inputs, kwargs), for torch.compile's trace
    module_call: tuple | None = field(default=None, repr=False, compare=False)
    _compiled: dict = field(default_factory=dict, repr=False, compare=False)

    batch = property(lambda self: self.shape.batch)
    seq = property(lambda self: self.shape.seq)
    dtype = property(lambda self: self.shape.dtype)
    tokens = property(lambda self: self.shape.tokens)
    precision = property(lambda self: self.shape.precision)

    def compiled(self, checkpoint: str = "none") -> CompiledStep:
        """The training step under torch.compile (Inductor, default settings), with the
        `checkpoint` policy's regions checkpointed: the activations its partitioner keeps for
        backward, what the backward recomputes, and what its forward and backward hold above
        the step's start (graphcost.passes.compiled). A MODEL named by a string is loaded
        again; computed once per analysis and policy. NB: the graphs are those Inductor makes
        for the CPU, whatever the analysis' device (docs/compile.md)."""
        plan = policy_plan(self.graph, checkpoint)
        key = str(plan.policy)
        if key not in self._compiled:
            self._compiled[key] = self._compile(plan)
        return self._compiled[key]

    def _compile(self, plan) -> CompiledStep:
        autocast = None  # bf16-mixed: the compiled model called under torch.autocast
        if self.precision is not None and self.precision.endswith("-mixed"):
            autocast = DTYPES[self.precision.removesuffix("-mixed")]
        if self.module_call is not None:
            module, inputs, kwargs = self.module_call
        elif self.source is not None:
            cast, _ = precision_dtypes(self.source.precision)
            s = self.source
            loaded = load_model(s.model, batch=s.batch, seq=s.seq, dtype=cast,
                                targets=s.targets, overrides=s.overrides)
            module, inputs, kwargs = loaded.module, loaded.inputs, None
        else:
            raise ConfigError(f"{self.model_name!r} has no module to compile: call "
                              "graphcost.passes.compiled.compiled_step(module, inputs)")
        return compiled_step(module, inputs, kwargs=kwargs, peak=True, autocast=autocast,
                             checkpoint=plan)

    def to_dict(self, module_depth: int | None = 2) -> dict[str, Any]:
        """The analysis with its shape (and, for a mixture of experts, the expert figures)."""
        moe = moe_summary(self)
        s = self.shape
        return {**super().to_dict(module_depth=module_depth), "batch": s.batch,
                **(moe.as_dict() if moe else {}), "seq": s.seq, "dtype": s.dtype,
                "tokens": s.tokens}

    def reshaped(self, **changes: Any) -> ModelAnalysis:
        """The same model traced again with some load options changed (batch, seq, targets)."""
        if self.source is None:
            raise ConfigError(f"{self.model_name!r} was analyzed from a module: another shape "
                              f"({', '.join(changes)}) needs MODEL by name, e.g. "
                              "graphcost.analyze('gpt2', batch=2)")
        return replace(self.source, **changes).analyze()

    def coverage(self) -> CoverageResult:
        """Every op of the trace with the rule that costs it (graphcost coverage)."""
        return CoverageResult(self.model_name, tuple(coverage(self)), self.unsupported_ops)

    # ------------------------------------------------------------ memory

    def memory(self, *, inference: bool = False, context: int | None = None,
               plan: ParallelPlan | None = None, **training: Any):
        """The memory timeline of training steps (`peak_bytes`, `peak_at`, `breakdown_at_peak`);
        with `inference`, a prefill with a KV cache of `context` tokens (default: seq); with
        `plan`, the memory per device of a parallel plan."""
        config = training_config(**training)
        if config.compile and (inference or plan is not None):
            other = "--inference" if inference else "a parallel plan"
            raise ConfigError(f"--compile with {other} is not modelled yet: drop one of them")
        if inference:
            if parse_policy(config.checkpoint).kind != "none":
                raise ConfigError(CHECKPOINT_IS_TRAINING)
            a = self._untargeted(context)
            return InferenceMemoryResult(a.shape, a.device.name, inference_memory(a),
                                         a.unsupported_ops)
        if context is not None:
            raise ConfigError("--context is the cached context of --inference; for training "
                              "use --seq")
        if plan is not None:
            stages = tuple(per_device_memory(self, plan, config))
            return ParallelMemoryResult(self.shape, self.device.name, plan, config, stages,
                                        self.unsupported_ops)
        if config.compile:
            step = self.compiled(config.checkpoint)
            return MemoryResult(self.shape, self.device.name, config,
                                compiled_timeline(self, config, step), self.unsupported_ops,
                                compiled=step)
        return MemoryResult(self.shape, self.device.name, config,
                            training_timeline(self, config), self.unsupported_ops,
                            approximate_ops(self.graph))

    def _untargeted(self, seq: int | None = None) -> ModelAnalysis:
        """This model without targets (inference) at `seq` (default: its own)."""
        seq = seq or self.seq
        if self.source is None or (not self.source.targets and seq == self.seq):
            return self
        return self.reshaped(targets=False, seq=seq)

    # ------------------------------------------------------------ checkpointing

    def checkpoints(self, policies: str | Sequence[str] | None = None,
                    budget: int | str | None = None, *, reserve: int | str | None = None,
                    **training: Any) -> CheckpointResult:
        """Checkpoint policies side by side (`rows`: peak, saved bytes, recompute FLOPs, fits);
        with `budget`, also the per-block mix with the least recompute that fits it
        (`optimum`). Without a budget, 'fits' is judged against the device's memory less
        `reserve`."""
        config = training_config(**training)
        if config.compile and budget is not None:
            raise ConfigError("the budget search (per-block mixes) under --compile is not "
                              "modelled yet: drop --budget to compare the policies compiled")
        resolved = resolve_budget(self.device, budget, reserve)
        kept, skipped = self.applicable_policies(policies)
        optimum = None
        if config.compile:  # each policy compiled: Inductor's partitioner with its regions
            rows = [policy_row(self, self.memory(**dict(training, checkpoint=p)).timeline,
                               resolved.bytes) for p in kept]
        elif budget is not None:
            optimum = optimize(self, resolved.bytes, config, kept)
            rows = optimum.builtin
        else:
            rows = compare(self, kept, config, resolved.bytes)
        return CheckpointResult(self.shape, self.device.name, config, resolved.bytes,
                                resolved.source, tuple(rows), tuple(skipped), optimum,
                                self.unsupported_ops)

    def optimize(self, budget: int | str, policies: str | Sequence[str] | None = None,
                 **training: Any) -> Optimum:
        """The fitting checkpoint policy (or per-block mix) with the least recompute."""
        return self.checkpoints(policies, budget, **training).optimum

    def applicable_policies(self, policies: str | Sequence[str] | None = None):
        """The policies to compare, deduplicated, in the order given, and the built-ins skipped
        because they do not apply to the model ((policy, why) pairs). A policy named that does
        not apply is an error; the default list drops those quietly and says so."""
        given = policies is not None
        if isinstance(policies, str):
            names = [p.strip() for p in policies.split(",")]
        else:
            names = list(policies) if given else list(BUILTIN_POLICIES)
        if given and not all(names):
            raise CliError(f"--policies {policies!r} has an empty name; write e.g. "
                           "--policies none,full,selective")
        kept, skipped = [], []
        for spec in dict.fromkeys(str(parse_policy(p)) for p in names):
            try:  # as resolved: "none" is "model" for a model that checkpoints itself
                resolved = str(policy_plan(self.graph, spec).policy)
            except GraphcostError as exc:
                if given:
                    raise
                skipped.append((spec, str(exc)))
            else:
                if resolved not in kept:
                    kept.append(resolved)
        return kept, skipped

    # ------------------------------------------------------------ time and cost

    def roofline(self, device: str | Device | None = None, *, inference: bool = False,
                 context: int | None = None, compute_bound_batch: bool = False,
                 matmul_efficiency: float = 1.0, vector_efficiency: float = 1.0,
                 bandwidth_efficiency: float = 1.0, **training: Any):
        """The roofline time of a training step on `device` (default: the analysis' own):
        `step_time_s`, `mfu`, `hfu`, `tokens_per_s`. With `inference`: a prefill, a decode
        step at `context` cached tokens and where decoding turns memory-bound."""
        config = training_config(**training)
        efficiency = efficiency_of(matmul_efficiency, vector_efficiency, bandwidth_efficiency)
        device = roofline_device(self.device if device is None else device)
        if config.compile and (inference or compute_bound_batch):
            other = "--inference" if inference else "--compute-bound-batch"
            raise ConfigError(f"--compile with {other} is not modelled yet: drop one of them")
        if inference:
            return self._inference_roofline(device, context, config, efficiency,
                                            compute_bound_batch)
        if context is not None:
            raise ConfigError("--context is the cached context of --inference; for training "
                              "use --seq")
        step = self.step_time(device, config, efficiency)
        cbb = None
        if compute_bound_batch:
            ones = self if self.batch == 1 else self.reshaped(batch=1)
            twos = self if self.batch == 2 else self.reshaped(batch=2)
            try:
                cbb = find_compute_bound_batch(ones, twos, device, config, efficiency)
            except ValueError as exc:
                raise CliError(f"--compute-bound-batch: {exc}") from None
        return RooflineResult(self.shape, config, step, cbb, compute_bound_batch,
                              self.unsupported_ops)

    def step_time(self, device: Device, config: TrainingConfig,
                  efficiency: Efficiency) -> StepTime:
        """The roofline time of a training step (under torch.compile: its kernels')."""
        if config.compile:
            return compiled_step_time(self, self.compiled(config.checkpoint), device, config,
                                      efficiency)
        return training_step_time(self, device, config, efficiency)

    def _inference_roofline(self, device, context, config, efficiency, compute_bound_batch):
        if parse_policy(config.checkpoint).kind != "none":
            raise ConfigError(CHECKPOINT_IS_TRAINING)
        if config.grad_accumulation != 1 or compute_bound_batch:
            option = "--grad-accumulation" if config.grad_accumulation != 1 else \
                "--compute-bound-batch"
            raise ConfigError(f"{option} applies to training; drop it or --inference")
        if self.source is not None:
            check_context(self.source.model, context, self.source.overrides)
        prefill = self._untargeted()
        if prefill.tokens is None:
            raise CliError(f"--inference times a prefill and the decoding of a language "
                           f"model; {prefill.model_name!r} does not take (batch, seq) token ids")
        context = context or prefill.seq
        one_token = prefill.reshaped(seq=1, targets=False)
        return InferenceRooflineResult(
            prefill.shape, device.name, context, efficiency,
            forward_time(prefill, device, efficiency),
            decode_time(one_token, context, device, efficiency),
            memory_bound_context(one_token, device, efficiency), prefill.unsupported_ops)

    def cost(self, tokens: float, device: str | Device | None = None, *, gpus: int = 1,
             usd_per_hour: float | None = None, mfu: float | None = None,
             inference: bool = False, matmul_efficiency: float = 1.0,
             vector_efficiency: float = 1.0, bandwidth_efficiency: float = 1.0,
             **training: Any) -> CostResult:
        """Time, GPU-hours and dollars of training on `tokens` tokens with `gpus` devices at
        the roofline's MFU (or `mfu`); with `inference`, of the forward over them."""
        config = training_config(**training)
        efficiency = efficiency_of(matmul_efficiency, vector_efficiency, bandwidth_efficiency)
        device = roofline_device(self.device if device is None else device)
        if inference and config.compile:
            raise ConfigError("--compile with --inference is not modelled yet: drop one of them")
        if inference:
            if parse_policy(config.checkpoint).kind != "none":
                raise ConfigError("--checkpoint applies to training; drop --checkpoint or "
                                  "--inference")
            a = self._untargeted()
            step = forward_time(a, device, efficiency)
        else:
            a = self
            step = a.step_time(device, config, efficiency)
        try:
            cost = training_cost(step, params=a.params, tokens=tokens, gpus=gpus,
                                 usd_per_gpu_hour=usd_per_hour, mfu=mfu)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        return CostResult(a.shape, device.name, config, inference, cost, step,
                          a.unsupported_ops)


def analyze(module: nn.Module | str, example_inputs: Any = None, *, batch: int | None = None,
            seq: int | None = None, precision: str | None = None, dtype: str | None = None,
            device: str | Device = DEFAULT_DEVICE, targets: bool = True,
            overrides: dict[str, Any] | None = None, kwargs: dict | None = None,
            rules: RuleRegistry | None = None, strict: bool = False,
            model_name: str | None = None, autocast: torch.dtype | None = None,
            reuse_blocks: bool = True) -> ModelAnalysis:
    """Trace a model and cost every op: `module` with `example_inputs`, or MODEL by name (a zoo
    name, `path/to/file.py:factory`, `hf:path/to/config.json`) at `batch` x `seq`, cast to
    `precision` (fp32, bf16, fp16, or bf16-mixed: fp32 weights under torch.autocast; `dtype`
    is an alias), `overrides` setting config fields of a zoo model (the CLI's --set),
    `targets=False` for no loss (the CLI's --no-targets)."""
    if dtype is not None and precision is not None and dtype != precision:
        raise ConfigError(f"precision {precision!r} and dtype {dtype!r} disagree; give one")
    precision = precision if precision is not None else dtype
    cast, mixed = precision_dtypes(precision)
    autocast = mixed or autocast
    if isinstance(module, str):
        if example_inputs is not None:
            raise ConfigError("a MODEL named by a string builds its own inputs; give batch and "
                              "seq instead of example inputs")
        device = get_device(device)
        loaded = load_model(module, batch=batch, seq=seq, dtype=cast, targets=targets,
                            overrides=overrides)
        a = analyze_module(loaded.module, loaded.inputs, kwargs=kwargs, device=device,
                           rules=rules, strict=strict, model_name=model_name or loaded.name,
                           reuse_blocks=reuse_blocks, autocast=autocast)
        shape = ModelShape(a.model_name, loaded.batch, loaded.seq, loaded.dtype, loaded.tokens,
                           mixed_name(autocast) or loaded.dtype)
        source = ModelSource(module, batch, seq, precision, targets, dict(overrides or {}),
                             device, strict, rules, None if mixed else autocast, reuse_blocks)
    else:
        if cast is not None and mixed is None:
            raise ConfigError(f"precision {precision!r} casts a model named by a string; cast "
                              "the module itself (module.to(torch.bfloat16))")
        a = analyze_module(module, example_inputs, kwargs=kwargs, device=device, rules=rules,
                           strict=strict, model_name=model_name, reuse_blocks=reuse_blocks,
                           autocast=autocast)
        shape = ModelShape(a.model_name, None, None, None, None, mixed_name(autocast))
        source = None
    values = {f.name: getattr(a, f.name) for f in fields(Analysis) if f.init}
    call = None if isinstance(module, str) else (module, example_inputs, kwargs)
    return ModelAnalysis(**values, shape=shape, source=source, module_call=call)


def mixed_name(autocast: torch.dtype | None) -> str | None:
    """The precision of a model run under torch.autocast(`autocast`): 'bf16-mixed'."""
    return None if autocast is None else f"{dtype_name(autocast)}-mixed"


__all__ = ["Budget", "ModelAnalysis", "ModelSource", "analyze", "check_context", "mixed_name",
           "parse_bytes", "parse_precision", "precision_dtypes", "resolve_budget",
           "roofline_device", "sized_device", "training_config"]
