"""The Python API's functions that trace MODEL at the shapes they need: `fit` (the batch and
context searches), `plan` (a trace per micro-batch), `sweep` (a grid of batch x seq), and `cost`
(MODEL at one shape, then ModelAnalysis.cost). Like the rest of the API (graphcost.api.analyze), they
take the command line's options as keyword arguments, and the CLI prints their `to_dict()`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from graphcost.api.analyze import ModelAnalysis, analyze, mixed_name
from graphcost.api.options import (
    efficiency_of,
    parse_bytes,
    precision_dtypes,
    resolve_budget,
    roofline_device,
    sized_device,
    training_config,
)
from graphcost.api.results import CostResult, FitResult, ParallelFitResult, PlanResult, SweepResult
from graphcost.errors import ConfigError
from graphcost.hardware.devices import Device
from graphcost.hardware.network import network_for
from graphcost.load.model import load_model
from graphcost.models import list_models, max_context
from graphcost.passes.checkpoint.policy import parse_policy
from graphcost.passes.memory.training import TrainingConfig
from graphcost.passes.parallel.plan import ParallelPlan, per_device_memory
from graphcost.sizing.fit import DEFAULT_RESERVE_BYTES, largest
from graphcost.sizing.fit import fit as fit_sizes
from graphcost.sizing.plans import search_plans

Loader = Callable[[int, int, bool], tuple]  # (batch, seq, training) -> (module, inputs)


def fit(model: str | Loader, *, device: str | Device, seq: int | None = None,
        precision: str | None = None, reserve: int | str = DEFAULT_RESERVE_BYTES,
        overrides: dict[str, Any] | None = None, plan: ParallelPlan | None = None,
        **training: Any) -> FitResult | ParallelFitResult:
    """The largest batch at `seq` and the largest context at batch 1 that fit on `device` less
    `reserve`, training and inference (`max_batch`, `max_seq`: the training answers). `model`
    is MODEL by name, or a loader `(batch, seq, training) -> (module, inputs)` (then `seq` is
    required). With `plan`: the largest micro-batch per data-parallel rank."""
    config = training_config(**training)
    cast, autocast = precision_dtypes(precision)
    reserve_bytes = parse_bytes(reserve)
    overrides = dict(overrides or {})
    if callable(model):
        if seq is None:
            raise ConfigError("fit with a loader needs seq")
        name, dtype, first_seq, context, loader = getattr(model, "__name__", "model"), cast, \
            seq, None, model
    else:
        first = load_model(model, batch=1, seq=seq, dtype=cast, overrides=overrides)
        # the context is searched for token models only (a CNN's `seq` is its image size)
        context = max_context(model, **overrides) if model in list_models() and first.tokens \
            else None
        name, dtype, first_seq = first.name, first.dtype, first.seq

        def loader(batch: int, length: int, training: bool):
            m = load_model(model, batch=batch, seq=length if first.seq is not None else None,
                           dtype=cast, targets=training, overrides=overrides)
            return m.module, m.inputs

    if plan is not None:
        if config.compile:
            raise ConfigError("--compile with a parallel plan is not modelled yet: drop one "
                              "of them")
        if callable(model):
            raise ConfigError("fit with a parallel plan needs MODEL by name")
        return fit_parallel(model, plan, device=device, seq=seq, precision=precision,
                            reserve=reserve_bytes, overrides=overrides, config=config,
                            name=name, first_seq=first_seq)
    sizes = fit_sizes(loader, device=device, seq=first_seq, model_max_seq=context,
                      autocast=autocast, config=config, reserve_bytes=reserve_bytes)
    return FitResult(name, dtype, mixed_name(autocast) or dtype, config, sizes)


def fit_parallel(model: str, plan: ParallelPlan, *, device: str | Device, seq: int | None,
                 precision: str | None, reserve: int, overrides: dict[str, Any],
                 config: TrainingConfig, name: str, first_seq: int | None) -> ParallelFitResult:
    """The largest micro-batch per device under a parallel plan: the per-device estimate's two
    peaks (backward, optimizer step) are each linear in the micro-batch, so traces at 1 and 2
    give them at any size."""
    device = sized_device(device)
    budget = device.memory_bytes - reserve
    lines = []
    for batch in (1, 2):
        a = analyze(model, batch=batch, seq=seq, precision=precision, device=device,
                    overrides=overrides)
        stages = per_device_memory(a, plan, config)
        lines.append([(d.training_peak_bytes, d.optimizer_peak_bytes) for d in stages])

    def peak(b: int) -> float:
        return max(max(one[k] + (two[k] - one[k]) * (b - 1) for k in (0, 1))
                   for one, two in zip(*lines))

    best = largest(peak, budget, 1, 1 << 20)
    return ParallelFitResult(name, first_seq, device.name, plan, config, budget, best)


def plan(model: str, *, gpus: int, global_batch: int, device: str | Device,
         seq: int | None = None, precision: str | None = None,
         micro_batch: Sequence[int] = (1, 2, 4), checkpoint: Sequence[str] = ("none", "full"),
         sharding: Sequence[str] = ("zero-1", "fsdp"), intra_node: str | float | None = None,
         inter_node: str | float | None = None, gpus_per_node: int | None = None,
         reserve: int | str = DEFAULT_RESERVE_BYTES, overrides: dict[str, Any] | None = None,
         strict: bool = False, matmul_efficiency: float = 1.0, vector_efficiency: float = 1.0,
         bandwidth_efficiency: float = 1.0, **training: Any) -> PlanResult:
    """Every dp x tp x pp of `gpus` devices with each micro-batch, sharding and checkpoint
    policy: the plans that fit ranked by step time, then the rejected ones with why."""
    config = training_config(**training)
    if config.compile:
        raise ConfigError("plans under --compile (sharded compiled steps) are not modelled "
                          "yet: drop --compile")
    device = sized_device(roofline_device(device),
                          " such as h100-sxm ('graphcost devices')")
    for p in checkpoint:
        parse_policy(p)
    network = network_for(device.name, intra=intra_node, inter=inter_node,
                          gpus_per_node=gpus_per_node)
    reserve_bytes = parse_bytes(reserve)
    cache: dict[int, ModelAnalysis] = {}

    def load(mb: int) -> ModelAnalysis:
        if mb not in cache:
            cache[mb] = analyze(model, batch=mb, seq=seq, precision=precision, device=device,
                                overrides=overrides, strict=strict)
        return cache[mb]

    plans = search_plans(load, gpus=gpus, device=device, global_batch=global_batch,
                         config=config, micro_batches=list(micro_batch),
                         policies=list(checkpoint), shardings=list(sharding),
                         reserve_bytes=reserve_bytes, network=network,
                         efficiency=efficiency_of(matmul_efficiency, vector_efficiency,
                                                  bandwidth_efficiency))
    name = next(iter(cache.values())).model_name if cache else model
    return PlanResult(name, device.name, gpus, global_batch, seq, network, tuple(plans))


def cost(model: str, tokens: float, *, device: str | Device, batch: int | None = None,
         seq: int | None = None, precision: str | None = None, targets: bool = True,
         overrides: dict[str, Any] | None = None, strict: bool = False, inference: bool = False,
         **options: Any) -> CostResult:
    """MODEL at `batch` x `seq` on `device`, then ModelAnalysis.cost (gpus, usd_per_hour, mfu,
    the efficiencies and the training options)."""
    roofline_device(device)
    a = analyze(model, batch=batch, seq=seq, precision=precision, device=device,
                targets=targets and not inference, overrides=overrides, strict=strict)
    return a.cost(tokens, inference=inference, **options)


def sweep(model: str, *, device: str | Device, batch: Sequence[int | None] = (1,),
          seq: Sequence[int | None] = (None,), precision: str | None = None,
          budget: int | str | None = None, reserve: int | str | None = None,
          overrides: dict[str, Any] | None = None, strict: bool = False,
          matmul_efficiency: float = 1.0, vector_efficiency: float = 1.0,
          bandwidth_efficiency: float = 1.0, **training: Any) -> SweepResult:
    """For every batch x seq: the roofline step time, MFU, HFU, tokens/s, the training peak and
    whether it fits the budget (`budget`, else the device's memory less `reserve`)."""
    config = training_config(**training)
    efficiency = efficiency_of(matmul_efficiency, vector_efficiency, bandwidth_efficiency)
    device = roofline_device(device)
    resolved = resolve_budget(device, budget, reserve)
    rows, a, unsupported = [], None, {}
    for t in seq:
        for b in batch:
            a = analyze(model, batch=b, seq=t, precision=precision, device=device,
                        overrides=overrides, strict=strict)
            step = a.step_time(device, config, efficiency)
            peak = a.memory(**training).peak_bytes
            rows.append({"batch": b, "seq": a.seq, "tokens": step.tokens,
                         "step_time_s": step.step_time_s, "mfu": step.mfu, "hfu": step.hfu,
                         "tokens_per_s": step.tokens_per_s, "peak_bytes": peak,
                         "fits": None if resolved.bytes is None else peak <= resolved.bytes})
            unsupported = unsupported or a.unsupported_ops
    return SweepResult(a.model_name, device.name, a.precision, config, efficiency,
                       resolved.bytes, tuple(rows), unsupported)


__all__ = ["cost", "fit", "fit_parallel", "plan", "sweep"]
