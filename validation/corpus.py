"""One corpus model (tests/corpus) against PyTorch's own ground truth, every figure graphcost gives.

`check(entry)` builds the model twice from the same seed, in fp32: on the meta device for
graphcost (`analyze`, `training_timeline`) and FlopCounterMode, on the CPU for autograd's saved
tensors and the live-tensor tracker's training steps. It returns a `Record`: each quantity as a
(graphcost, ground truth) pair, graphcost's unsupported ops, and the error of any stage that
raised (as text: a trace failure is a result, not an exception).

    parameters        analysis.params           vs the module's unique parameters
    forward FLOPs     analysis.forward_flops    vs FlopCounterMode (meta; measure_flops)
    backward FLOPs    analysis.backward_flops + timeline.recompute_flops (what checkpoints
                      in the model's forward re-run) vs FlopCounterMode (meta; measure_flops)
    saved bytes       analysis.saved_activation_bytes vs autograd's saved tensors (CPU run)
    training peak     training_timeline(...).peak_bytes vs measure_training_peak(...).peak_bytes
    forward peaks     timeline.phase_peaks()[(step, "forward")] vs step_phase_peaks, each step

Both timelines run TrainingConfig()'s defaults: AdamW (PyTorch's single-tensor loop on the CPU),
two steps, set_to_none gradients. Entries whose inputs end with keyword arguments
(`kwarg_names`) are called as ``model(*args, **kwargs)`` by graphcost (``analyze(kwargs=...)``)
and through `KeywordCall` by the ground truth, whose helpers call ``model(*inputs)``.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from validation.groundtruth import measure_flops, measure_saved_bytes
from validation.memtrack import measure_training_peak

Pair = tuple[int, int]  # (graphcost, ground truth)
STAGES = ("graphcost", "timeline", "flops", "saved", "peak")


@dataclasses.dataclass
class Record:
    name: str
    kind: str
    params: Pair | None = None
    forward_flops: Pair | None = None
    backward_flops: Pair | None = None
    saved_bytes: Pair | None = None
    peak_bytes: Pair | None = None
    forward_peaks: dict[int, Pair] = dataclasses.field(default_factory=dict)  # step -> pair
    unsupported_ops: dict[str, int] = dataclasses.field(default_factory=dict)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)  # stage -> error text
    notes: list[str] = dataclasses.field(default_factory=list)  # how a figure was measured
    seconds: float = 0.0

    EXACT = ("params", "forward_flops", "backward_flops", "saved_bytes")

    def problems(self, tolerance: float = 0.005) -> list[str]:
        """What does not match: an error, an unsupported op, an exact quantity that differs, a
        peak off by more than `tolerance` (relative). Empty when everything matches."""
        out = [f"{stage} raised: {text}" for stage, text in self.errors.items()]
        if self.unsupported_ops:
            out.append(f"unsupported ops {self.unsupported_ops}")
        for field in self.EXACT:
            pair = getattr(self, field)
            if pair is not None and pair[0] != pair[1]:
                out.append(f"{field}: graphcost {pair[0]:,} != {pair[1]:,} ({relative(pair):+.2%})")
        peaks = [("training peak", self.peak_bytes)] + [
            (f"forward peak (step {s})", p) for s, p in sorted(self.forward_peaks.items())]
        for label, pair in peaks:
            if pair is not None and abs(relative(pair)) > tolerance:
                out.append(f"{label}: graphcost {pair[0]:,} vs measured {pair[1]:,} "
                           f"({relative(pair):+.2%})")
        return out


def relative(pair: Pair) -> float:
    """(graphcost - truth) / truth (0 when both are 0; inf when only the truth is)."""
    ours, truth = pair
    if truth == 0:
        return 0.0 if ours == 0 else float("inf")
    return (ours - truth) / truth


class KeywordCall(nn.Module):
    """``forward(*inputs)`` -> ``model(*inputs[:-k], **dict(zip(names, inputs[-k:])))``: the
    positional call the ground-truth helpers make, for a model called with keywords. The model
    is a child (its parameters are this module's), so it is tracked and trained as is."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *inputs):
        k = len(self.names)
        return self.model(*inputs[:len(inputs) - k], **dict(zip(self.names, inputs[len(inputs) - k:])))


def build(entry: Any, device: str, dtype: torch.dtype = torch.float32, seed: int = 0
          ) -> tuple[nn.Module, tuple]:
    """The entry's module (under `device` as default device, in `dtype`) and inputs, from
    `seed`."""
    torch.manual_seed(seed)
    with torch.device(device):
        module = entry.make_module().to(dtype)
    inputs = entry.make_inputs(torch.device(device), dtype)
    return module, inputs if isinstance(inputs, tuple) else (inputs,)


def positional(entry: Any, module: nn.Module) -> nn.Module:
    return KeywordCall(module, tuple(entry.kwarg_names)) if entry.kwarg_names else module


def _stage(record: Record, stage: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # a failure is part of the record
        lines = traceback.format_exception_only(type(exc), exc)
        record.errors[stage] = " ".join(" ".join(lines).split())[:600]
        return None


def check(entry: Any, *, seed: int = 0, measure_peak: bool = True) -> Record:
    """graphcost and the ground truth on one corpus entry (see the module docstring)."""
    from graphcost import analyze
    from graphcost.passes.memory.timeline import training_timeline
    from graphcost.passes.memory.training import TrainingConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    record = Record(entry.name, entry.kind)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _check(record, entry, seed, measure_peak, analyze, training_timeline, TrainingConfig)
    finally:
        torch.set_num_threads(threads)
        record.seconds = time.perf_counter() - start
    return record


def _split(entry: Any, inputs: tuple) -> tuple[tuple, dict]:
    k = len(entry.kwarg_names)
    return inputs[:len(inputs) - k], dict(zip(entry.kwarg_names, inputs[len(inputs) - k:]))


def _check(record, entry, seed, measure_peak, analyze, training_timeline, TrainingConfig) -> None:
    module, inputs = build(entry, "meta", seed=seed)
    truth_params = sum(p.numel() for p in module.parameters())
    args, kwargs = _split(entry, inputs)
    analysis = _stage(record, "graphcost", lambda: analyze(module, args, kwargs=kwargs or None,
                                                            device="cpu"))
    timeline = None
    if analysis is not None:
        record.params = (analysis.params, truth_params)
        record.unsupported_ops = dict(analysis.unsupported_ops)
        timeline = _stage(record, "timeline", lambda: training_timeline(analysis, TrainingConfig()))

    module, inputs = build(entry, "meta", seed=seed)
    flops = _stage(record, "flops", lambda: measure_flops(positional(entry, module), inputs))
    if flops is None:
        # An op without a meta kernel (ctc_loss's backward): count on the CPU (cpu_flop_counter),
        # with oneDNN off so that nn.LSTM runs the same decomposed cell as on meta (its oneDNN
        # kernel, mkldnn_rnn_layer, has no FLOP formula and would count as 0).
        # SDPA's math backend, as on meta: CPU flash attention's backward recomputes the scores
        # (FlopCounterMode counts 2.5 forwards), while model FLOPs count the math backward (2).
        error = record.errors.pop("flops")
        module, inputs = build(entry, "cpu", seed=seed)
        with torch.backends.mkldnn.flags(enabled=False), \
                sdpa_kernel(SDPBackend.MATH):
            flops = _stage(record, "flops",
                           lambda: measure_flops(positional(entry, module), inputs))
        record.notes.append(f"FLOPs counted on the CPU (on meta: {error[:120]})")
    if analysis is not None and flops is not None:
        record.forward_flops = (analysis.forward_flops, flops[0])
        # the backward as it runs: with checkpoints in the model's own forward, FlopCounterMode
        # counts their recomputation in it (graphcost: the timeline's recompute_flops)
        recompute = timeline.recompute_flops if timeline is not None else 0
        record.backward_flops = (analysis.backward_flops + recompute, flops[1])
        if recompute:
            record.notes.append(f"graphcost's backward FLOPs include {recompute:,} recomputed")

    module, inputs = build(entry, "cpu", seed=seed)
    saved = _stage(record, "saved", lambda: measure_saved_bytes(positional(entry, module), inputs))
    if analysis is not None and saved is not None:
        record.saved_bytes = (analysis.saved_activation_bytes, saved)

    if not measure_peak:
        return
    module, inputs = build(entry, "cpu", seed=seed)
    measured = _stage(record, "peak", lambda: measure_training_peak(
        positional(entry, module), inputs, record_timeline=False))
    if timeline is not None and measured is not None:
        record.peak_bytes = (timeline.peak_bytes, measured.peak_bytes)
        measured_phases = dict(measured.step_phase_peaks)
        for (step, phase), value in timeline.phase_peaks().items():
            if phase == "forward":
                record.forward_peaks[step] = (value, measured_phases.get((step, phase), 0))
