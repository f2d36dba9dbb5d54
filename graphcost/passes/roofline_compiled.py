"""Roofline time of a training step under torch.compile: the forward's and backward's kernels
as Inductor generates them (graphcost.passes.compiled: `CompiledStep.kernels`), then the
optimizer's eager step.

A kernel takes max(FLOPs / (peak x efficiency), bytes / (bandwidth x efficiency)), as an op does
in graphcost.passes.roofline: an extern kernel with FLOPs (mm, attention, convolution) at the
dense matmul peak of its dtype, every other kernel (a fused chain of pointwise ops and
reductions, which reads its inputs and writes its outputs once) at its memory traffic. The
recomputation the partitioner adds runs inside the backward's kernels; HFU counts its FLOPs.
NB: the kernels are those Inductor makes for the CPU, standing in for the device's.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from graphcost.analysis.analyze import Analysis
from graphcost.hardware.devices import Device
from graphcost.passes.compiled import CompiledStep, kernel_seconds
from graphcost.passes.inductor_code import Kernel
from graphcost.passes.memory.training import TrainingConfig
from graphcost.passes.roofline import (
    Efficiency,
    OpTime,
    StepTime,
    mfu_dtype,
    optimizer_time,
    tokens_of,
)

# the graph attributes it reads (graphcost/graph/schema.py): roofline.py's, through its helpers
READS: tuple[str, ...] = ()


def kernel_time(kernel: Kernel, phase: str, device: Device, efficiency: Efficiency,
                where: str) -> OpTime:
    """One kernel of Inductor's generated code on the roofline: an extern kernel with FLOPs
    (mm, attention, convolution) at the dense matmul peak of its dtype, the others (fused
    pointwise chains and reductions) at their memory traffic."""
    dtype = getattr(torch, kernel.dtype, torch.float32) if kernel.dtype else torch.float32
    compute = kernel.flops / (device.matmul_flops_per_s(dtype) * efficiency.matmul) \
        if kernel.flops else 0.0
    memory = kernel.bytes / (device.memory_bandwidth_bytes_per_s() * efficiency.bandwidth)
    return OpTime(name=where, op=kernel.op, module_path=where, phase=phase, dtype=kernel.dtype,
                  op_class="matmul" if kernel.matmul else "vector", flops=kernel.flops,
                  bytes=kernel.bytes, compute_s=compute, memory_s=memory)


def compiled_step_time(analysis: Analysis, compiled: CompiledStep, device: Device,
                        config: TrainingConfig, efficiency: Efficiency) -> StepTime:
    """A training step under torch.compile: the forward's and backward's kernels as Inductor
    generates them (the recomputation the partitioner adds is inside the backward's kernels),
    then the optimizer's eager step. MFU counts the model's FLOPs, HFU the recomputed too."""
    def seconds(phase: str, bound: str | None = None):
        def of(kernel: Kernel) -> float:
            t = kernel_time(kernel, phase, device, efficiency, "")
            return t.seconds if bound in (None, t.bound) else 0.0
        return of

    forward_s, _ = kernel_seconds(compiled, seconds("forward"))
    _, backward_s = kernel_seconds(compiled, seconds("backward"))
    bound_s = None
    sample = compiled.kernels[-1]
    if sample.blocks is not None:  # the rows are the first blocks' kernels: bounds apart
        bound_s = {b: sum(kernel_seconds(compiled, seconds(p, b))[i]
                          for i, p in enumerate(("forward", "backward")))
                   for b in ("compute", "memory")}
    first = "" if sample.blocks is None else \
        f" (first {sample.blocks} of {compiled.blocks} blocks)"
    ops = [replace(kernel_time(k, phase, device, efficiency, f"compiled {phase}{first}"),
                   name=f"{phase} kernel")
           for phase, kernels in (("forward", sample.forward), ("backward", sample.backward))
           for k, n in kernels for _ in range(n)]
    opt_flops, optimizer_s = optimizer_time(analysis, device, config, efficiency)
    micro = config.grad_accumulation
    dtype = mfu_dtype(analysis)
    model = analysis.forward_flops + analysis.backward_flops
    return StepTime(
        device=device.name, efficiency=efficiency, ops=tuple(ops), forward_s=forward_s,
        backward_s=backward_s, recompute_s=0.0, optimizer_s=optimizer_s, micro_batches=micro,
        model_flops=model * micro, hardware_flops=(model + compiled.recompute_flops) * micro,
        optimizer_flops=opt_flops, peak_flops_per_s=device.matmul_flops_per_s(dtype),
        mfu_dtype=str(dtype).replace("torch.", ""), tokens=tokens_of(analysis) * micro,
        bound_s=bound_s)


__all__ = ["compiled_step_time", "kernel_time"]
