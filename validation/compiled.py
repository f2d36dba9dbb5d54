"""Ground truth for a compiled training step: the tensors a real torch.compile keeps, and the
bytes its allocations hold at the peak.

`measure_compiled_saved` runs `torch.compile(model)` (Inductor, default settings, this
machine's CPU: its C++ backend) on real tensors and records, with saved_tensors_hooks, every
tensor the compiled forward saves for backward (aot_autograd's CompiledFunction saves them
through `ctx.save_for_backward`, which the hooks see): the storages that are not the model's
parameters, buffers or inputs, each once. Independent of graphcost's partition: this is what
the generated code keeps at run time.

`allocated_peak` measures a step's peak where dispatch-level trackers cannot: Inductor's
generated code allocates its buffers in C++, below any TorchDispatchMode. The profiler's memory
events (`profile_memory=True`) report every allocation and free of the CPU allocator, whoever
makes it; summed in time order they give the bytes allocated since the region began.
`tests/passes/test_compiled.py` checks the method against the live tracker on an eager step,
where both see everything: they agree to the byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CompiledSaved:
    saved_activation_bytes: int
    saved_tensors: int  # storages


def measure_compiled_saved(model: nn.Module, inputs: tuple) -> CompiledSaved:
    """The activations a real compiled forward of `model(*inputs)` keeps for backward."""
    torch._dynamo.reset()
    compiled = torch.compile(model)
    static = {t.untyped_storage().data_ptr()
              for t in [*model.parameters(), *model.buffers(), *inputs]
              if isinstance(t, torch.Tensor)}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in static:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compiled(*inputs)
    outs = [t for t in torch.utils._pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.requires_grad]
    torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])  # it runs
    return CompiledSaved(sum(seen.values()), len(seen))


def allocated_peak(step) -> tuple[int, int]:
    """(peak, final) bytes the CPU allocator holds beyond what it held when `step()` began,
    from the profiler's allocation events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events: list[tuple[int, int]] = []
    todo = list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        node = todo.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        todo.extend(node.children)
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak, live


def measure_compiled_training(model: nn.Module, inputs: tuple, *, steps: int = 2,
                              lr: float = 1e-3) -> dict[tuple[int, str], int]:
    """{(step, phase): the most a real compiled training run of `model(*inputs)` holds} over
    `steps` steps from a fresh optimizer, phase "forward+backward" (the compiled graphs) or
    "optimizer": the loss is the sum of its outputs, AdamW with PyTorch's defaults,
    zero_grad(set_to_none=True). Bytes held are those of the parameters, buffers and inputs,
    plus what the allocator's events (`allocated_peak`) add from there; a first step, not
    measured, compiles."""
    torch._dynamo.reset()
    compiled = torch.compile(model)

    def forward_backward():
        out = compiled(*inputs)
        outs = [t for t in torch.utils._pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor) and t.requires_grad]
        torch.autograd.backward([t.sum() for t in outs])

    trainable = [p for p in model.parameters() if p.requires_grad]
    warm = torch.optim.AdamW(trainable, lr=lr)
    forward_backward()  # compiles
    warm.step()
    warm.zero_grad(set_to_none=True)
    del warm
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers(), *inputs]
                if isinstance(t, torch.Tensor)}
    held, peaks = sum(storages.values()), {}
    for step in range(steps):
        for phase, run in (("forward+backward", forward_backward),
                           ("optimizer", optimizer.step)):
            peak, final = allocated_peak(run)
            peaks[(step, phase)] = held + peak
            held += final
        grads = {p.grad.untyped_storage().data_ptr(): p.grad.untyped_storage().nbytes()
                 for p in trainable if p.grad is not None}
        optimizer.zero_grad(set_to_none=True)
        held -= sum(grads.values())
    return peaks
