"""Will it fit: the largest micro-batch, and the largest context at batch 1, for training and
for inference, on a device with a memory budget.

Exact for the model, without a search over traces: every tensor's size is a polynomial in the
batch size B (degree 1) and in the sequence length T (degree <= 2: attention scores are T x T),
and the sequence of events in a step does not depend on either. So the bytes alive after each
event are evaluated on 2 batch sizes (3 lengths), the polynomials recovered per event, and the
largest B (T) whose maximum over events is within budget found on the polynomials.

The event vectors at those 4 shapes come, for training and for inference each, from one export
and one walk (graphcost.passes.retrace: the export made at a marker shape is re-run at every
shape on meta tensors, and the walk carries each byte count at all of them). Where that does
not hold for a model, each shape is exported and walked on its own (analyze, then
training_timeline / inference_memory). Both give the same vectors, event for event
(tests/passes/test_retrace.py); `tests/passes/test_fit.py` checks the answer against
timelines traced at it and one past it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from graphcost.analysis.analyze import analyze
from graphcost.collector import collector_paused
from graphcost.errors import ConfigError, GraphcostError
from graphcost.hardware.devices import Device, get_device
from graphcost.passes.checkpoint.policy import plan
from graphcost.passes.compiled import compiled_step
from graphcost.passes.memory.compiled import compiled_timeline
from graphcost.passes.memory.inference import inference_memory
from graphcost.passes.memory.timeline import training_timeline
from graphcost.passes.memory.training import TrainingConfig
from graphcost.sizing.retrace import Unsupported, step_events

READS: tuple[str, ...] = ()  # graph attributes it reads itself: none (graph/schema.py)

logger = logging.getLogger(__name__)
GIB = 2**30
# What a "fit" answer leaves free: the CUDA context (0.3-1.5 GiB depending on the stack, see
# ../shared/reference/hardware.md) and allocator slack. Override with reserve_bytes / --reserve.
DEFAULT_RESERVE_BYTES = 2 * GIB

Loader = Callable[[int, int, bool], tuple]  # (batch, seq, training) -> (module, inputs)


@dataclass(frozen=True)
class FitResult:
    device: str
    memory_bytes: float
    reserve_bytes: int
    budget_bytes: float
    seq: int | None  # the context the batch search holds fixed (None: not a token model)
    batch: int  # the batch the context search holds fixed (1)
    train_max_batch: int  # 0: not even one sequence fits
    train_max_seq: int | None  # None: the model has no sequence dimension to search
    infer_max_batch: int
    infer_max_seq: int | None
    model_max_seq: int | None  # the longest context the model accepts (its position tables)


class _Events:
    """Bytes alive after each event of a step at (batch, seq): all the shapes a search will ask
    for from one trace (graphcost.passes.retrace) where that holds, else a trace per shape."""

    def __init__(self, load: Loader, config: TrainingConfig, device: Device,
                 autocast: torch.dtype | None) -> None:
        self.load, self.config, self.device, self.autocast = load, config, device, autocast
        self.cache: dict[tuple[int, int, bool], np.ndarray] = {}

    def prepare(self, shapes: list[tuple[int, int]], training: bool,
                seq_limit: int | None) -> None:
        if training and self.config.compile:
            return  # the compiled step is partitioned at each shape (_events)
        try:
            found = step_events(self.load, shapes, training=training, config=self.config,
                                device=self.device, autocast=self.autocast,
                                seq_limit=seq_limit)
        except Unsupported as exc:
            logger.debug("fit: one trace does not serve every shape (%s); tracing each", exc)
            return
        except GraphcostError:
            raise  # the user's to fix, as the trace per shape would say
        except Exception:  # a graphcost bug: the trace per shape still answers
            logger.warning("fit: one trace for every shape failed; tracing each", exc_info=True)
            return
        self.cache.update({(b, t, training): events for (b, t), events in found.items()})

    def __call__(self, batch: int, seq: int, training: bool) -> np.ndarray:
        key = (batch, seq, training)
        if key not in self.cache:
            self.cache[key] = _events(self.load, batch, seq, training, self.config, self.device,
                                      self.autocast)
        return self.cache[key]


def _events(load: Loader, batch: int, seq: int, training: bool, config: TrainingConfig,
            device: Device, autocast: torch.dtype | None = None) -> np.ndarray:
    module, inputs = load(batch, seq, training)
    analysis = analyze(module, inputs, device=device, autocast=autocast)
    if training and config.compile:
        step = compiled_step(module, inputs, peak=True, autocast=autocast,
                             checkpoint=plan(analysis.graph, config.checkpoint))
        timeline = compiled_timeline(analysis, config, step)
        return timeline.table.total_bytes.astype(np.float64)
    if training:
        return training_timeline(analysis, config).table.total_bytes.astype(np.float64)
    return np.array(inference_memory(analysis).event_bytes, dtype=np.float64)


def largest(peak: Callable[[int], float], budget: float, low: int, high: int) -> int:
    """Largest n in [low, high] with peak(n) <= budget (peak non-decreasing); low - 1 if none."""
    if peak(low) > budget:
        return low - 1
    while low < high:
        mid = (low + high + 1) // 2
        if peak(mid) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def _checked(found: int, exact: Callable[[int], float], budget: float, limit: int,
             low: int = 1) -> int:
    """`found`, the answer of the polynomials, checked where they are not exact: a compiled
    step's peak is the most of its generated code's buffers at one line, and which line can
    change with the shape. The step at `found` must fit and the one past it must not; else
    the answer is searched on steps computed at each shape."""
    if (found < low or exact(found) <= budget) and (found >= limit or exact(found + 1) > budget):
        return found
    return largest(exact, budget, low, limit)


def max_batch(events: _Events, *, seq: int, budget_bytes: float, training: bool,
              limit: int = 1 << 20) -> int:
    found = _max_batch(events, seq=seq, budget_bytes=budget_bytes, training=training,
                       limit=limit)
    if training and events.config.compile:
        found = _checked(found, lambda b: float(np.max(events(b, seq, training))),
                         budget_bytes, limit)
    return found


def _max_batch(events: _Events, *, seq: int, budget_bytes: float, training: bool,
               limit: int) -> int:
    one, two = (events(b, seq, training) for b in (1, 2))
    if one.shape == two.shape:
        slope, intercept = two - one, 2 * one - two
        return largest(lambda b: float(np.max(intercept + slope * b)), budget_bytes, 1, limit)
    # Batch 1 can run other events: a (1, T, d) parameter added to a (B, T, d) activation gets
    # its gradient summed over the batch only when B >= 2 (ViT's position embeddings). Then
    # batch 1 is checked on its own and the line comes from batches 2 and 3.
    three = events(3, seq, training)
    if three.shape != two.shape:
        raise ConfigError("the step's events change with the batch size; cannot extrapolate")
    if float(np.max(one)) > budget_bytes:
        return 0
    slope, intercept = three - two, 3 * two - 2 * three
    return max(1, largest(lambda b: float(np.max(intercept + slope * b)), budget_bytes, 2,
                           limit))


def _seq_points(seq: int) -> list[int]:
    """Three lengths recover each event's quadratic; `seq` is one of them (its trace is shared
    with the batch search)."""
    points = sorted({seq, max(1, seq // 2), max(1, seq // 4)} | ({seq + 1} if seq < 4 else set()))
    if len(points) < 3:
        points = sorted(set(points) | {seq + 1, seq + 2})
    return points


def max_seq(events: _Events, *, batch: int, seq: int, budget_bytes: float, training: bool,
            limit: int) -> int:
    points = _seq_points(seq)
    samples = [events(batch, t, training) for t in points]
    if len({s.shape for s in samples}) != 1:
        raise ConfigError("the step's events change with the sequence length; cannot "
                          "extrapolate")
    coefficients = np.polyfit(np.array(points, dtype=np.float64), np.stack(samples), 2)

    def peak(t: int) -> float:
        return float(np.max(np.polyval(coefficients, t)))

    found = largest(peak, budget_bytes, 1, limit)
    if training and events.config.compile:
        found = _checked(found, lambda t: float(np.max(events(batch, t, training))),
                         budget_bytes, limit)
    return found


def fit(load: Loader, *, device: str | Device, seq: int | None, model_max_seq: int | None,
        config: TrainingConfig | None = None,
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
        autocast: torch.dtype | None = None) -> FitResult:
    """Largest batch at `seq` and largest context at batch 1, training and inference."""
    device = get_device(device)
    if not device.memory_bytes:
        raise ConfigError(f"device {device.name!r} has no memory size; pick a GPU preset such "
                          "as a100-80gb (see 'graphcost devices')")
    config = config or TrainingConfig()
    budget = device.memory_bytes - reserve_bytes
    if budget <= 0:
        raise ConfigError(f"the reserve ({reserve_bytes / GIB:.2f} GiB) leaves nothing of "
                          f"{device.name}'s {device.memory_bytes / GIB:.2f} GiB")
    events = _Events(load, config, device, autocast)
    shapes = [(1, seq), (2, seq)]
    if model_max_seq:
        shapes += [(1, t) for t in _seq_points(seq) if t != seq]
    with collector_paused():
        for training in (True, False):
            events.prepare(shapes, training, model_max_seq or None)
        result = dict(
            train_max_batch=max_batch(events, seq=seq, budget_bytes=budget, training=True),
            infer_max_batch=max_batch(events, seq=seq, budget_bytes=budget, training=False),
            train_max_seq=None, infer_max_seq=None)
        if model_max_seq:
            for mode, training in (("train", True), ("infer", False)):
                result[f"{mode}_max_seq"] = max_seq(events, batch=1, seq=seq,
                                                    budget_bytes=budget, training=training,
                                                    limit=model_max_seq)
    return FitResult(device=device.name, memory_bytes=device.memory_bytes,
                     reserve_bytes=reserve_bytes, budget_bytes=budget, seq=seq, batch=1,
                     model_max_seq=model_max_seq, **result)
