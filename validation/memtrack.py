"""Measured peak memory of real training steps: the ground truth for graphcost's prediction.

`LiveTensorTracker` is a TorchDispatchMode that keeps the live bytes of every tensor storage it
knows: the ones registered as existing when the region starts (parameters, buffers, inputs,
gradients, optimizer state: live from the start) and every storage an aten op returns from then
on. Each storage is counted once (keyed by its StorageImpl, so views and in-place results add
nothing) at ``untyped_storage().nbytes()``, and uncounted when it dies (a weakref callback on the
storage's Python object, which PyTorch keeps alive exactly as long as the StorageImpl). The live
total is sampled after every op — the op's outputs exist and its inputs are still alive, which is
where the allocator's high-water mark for that op sits — into a timeline of `TimelineEvent`s,
each labelled with the phase (``forward``/``backward``/``optimizer``/...) and step it ran in.

`measure_training_peak` runs real CPU training steps under the tracker and returns a
`MemoryMeasurement`; `measure_training_peak_memtracker` runs the same loop under PyTorch's
``torch.distributed._tools.mem_tracker.MemTracker`` as the independent cross-check. On the same
loop the two agree to the byte (tests/test_memtrack.py), because they see the same storages at
the same points: both count op outputs by storage, both free through a weakref on the storage,
both sample after each op. What neither sees (so neither is "the allocator's" peak):

- memory a kernel allocates and frees inside one op (e.g. the CPU flash-attention kernel's
  per-thread buffers, an mm kernel's internal contiguous copy of a strided operand);
- allocator overheads (alignment, caching; on CUDA, 512-byte rounding, which MemTracker applies
  and this tracker does not: here bytes are exact storage sizes).

The optimizer PyTorch picks on CPU: with default arguments ``torch.optim.AdamW/Adam/SGD`` resolve
``foreach=None`` through ``_default_to_fused_or_foreach``, which allows foreach only on
cuda/xpu/mtia/privateuse1 devices, so on CPU they run the **single-tensor** (for-loop)
implementation (``MemoryMeasurement.optimizer_impl`` records the one observed, from the ops
that ran: ``_fused_*`` → fused, ``_foreach_*`` → foreach, else single-tensor). Its memory:

- Adam/AdamW: step 1's ``_init_group`` creates, for every trainable param up front,
  ``exp_avg`` and ``exp_avg_sq`` (zeros_like: 2 × trainable-param bytes, in the param dtype)
  and a 0-dim float32 ``step`` (4 bytes each, also under bf16). Then, per param in order,
  ``denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)`` makes two param-sized
  temporaries (the sqrt dies after the division), while the loop's local ``denom`` still holds
  the previous param's denom until the new one is assigned; the rest is in place (``lerp_``,
  ``mul_``, ``addcmul_``, ``addcdiv_``, AdamW's decoupled ``mul_``). So the optimizer
  transient on top of params + grads + state is max_i (2·|p_i| + |p_(i-1)|) over the
  trainable params in ``model.parameters()`` order (small llama: 3 × the 24 KiB w1/w2/w3 =
  0.25 × trainable-param bytes), and the optimizer peak = params + grads + state + that.
- SGD (momentum 0): ``param.add_(grad, alpha=-lr)``, no allocation at all.
- SGD with momentum: step 1 creates ``momentum_buffer = grad.clone()`` param by param
  (1 × trainable-param bytes); later steps update it in place; no temporaries.
- Asked for explicitly on CPU (``optimizer_kwargs``): ``foreach=True`` peaks at
  ``_foreach_sqrt``, one trainable-param-sized list (1.0 × trainable-param bytes) on top of
  params + grads + state; ``fused=True`` (``_fused_adamw_``) shows no temporary at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    is_traceable_wrapper_subclass,
)
from torch.utils._pytree import tree_flatten

from validation.groundtruth import scalar_loss

__all__ = [
    "OPTIMIZERS", "PRECISIONS", "LiveTensorTracker", "MemTrackerMeasurement", "MemoryMeasurement",
    "TimelineEvent", "freeze_as_buffers", "measure_training_peak",
    "measure_training_peak_memtracker",
]

OPTIMIZERS = ("adamw", "adam", "sgd", "sgd-momentum")
PRECISIONS = ("fp32", "bf16", "bf16-mixed")


@dataclasses.dataclass(frozen=True)
class TimelineEvent:
    """Live bytes right after event ``index``: an aten op, or ``<enter>``/``<track>``/``<exit>``."""

    index: int
    op: str
    live_bytes: int
    phase: str
    step: int


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages behind a tensor (a traceable wrapper subclass has several), or none."""
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        out = []
        for attr in attrs:
            inner = getattr(t, attr)
            if isinstance(inner, torch.Tensor):
                out.extend(_storages(inner))
        return out
    if t.is_sparse or t.layout != torch.strided:
        return []  # sparse / nested layouts have no single untyped storage
    try:
        return [t.untyped_storage()]
    except (RuntimeError, NotImplementedError):
        return []


def _tensors_of(objs: Any) -> Iterator[torch.Tensor]:
    """Every tensor an object stands for: a module's parameters, their .grad and its buffers; an
    optimizer's state tensors; tensors in (nested) lists, tuples and dicts."""
    for obj in tree_flatten(objs)[0]:
        if isinstance(obj, torch.Tensor):
            yield obj
            if obj.is_leaf and obj.grad is not None:
                yield obj.grad
        elif isinstance(obj, nn.Module):
            for p in obj.parameters():
                yield p
                if p.grad is not None:
                    yield p.grad
            yield from obj.buffers()
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                yield from (v for v in tree_flatten(state)[0] if isinstance(v, torch.Tensor))
        elif obj is not None and not isinstance(obj, (int, float, bool, str)):
            raise TypeError(f"cannot track {type(obj).__name__}: pass modules, optimizers, tensors "
                            "or containers of them")


_LIFT_FRESH = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)


class LiveTensorTracker(TorchDispatchMode):
    """Live bytes of tensor storages over a region, sampled after every aten op.

        tracker = LiveTensorTracker(model, optimizer, inputs)  # live from the start
        with tracker:
            with tracker.phase("forward", step=0):
                loss = model(*inputs)
            with tracker.phase("backward", step=0):
                loss.backward()
        tracker.peak_bytes, tracker.peak_event.phase, tracker.peak_event.op

    ``existing``: modules (parameters, their grads, buffers), optimizers (state tensors), tensors,
    or containers of these, counted as live from the start. More can be added with `track`.
    ``devices``: device types counted (CPU only by default; meta tensors never).
    ``track_unseen_inputs``: a storage an op reads that the tracker has neither been given nor
    seen an op make was made outside its view (before the region and not registered, or by code
    that bypasses the dispatcher); when True it is counted from that op on, and its bytes are
    summed in `unseen_input_bytes` (0 when everything was registered).
    ``record_timeline``: keep one `TimelineEvent` per op (the peak is kept either way).

    A tracker measures one region (entered once). Frees are seen when they happen, but sampled
    only at the next event: the live total between ops never exceeds the last sample.
    """

    def __init__(self, *existing: Any, devices: tuple[str, ...] = ("cpu",),
                 track_unseen_inputs: bool = True, record_timeline: bool = True):
        super().__init__()
        self.devices = tuple(devices)
        self.track_unseen_inputs = track_unseen_inputs
        self.record_timeline = record_timeline
        self._live: dict[int, tuple[int, weakref.ref]] = {}  # StorageImpl address -> (bytes, ref)
        self.live_bytes = 0
        self.unseen_input_bytes = 0
        self.current_phase = "start"
        self.current_step = 0
        self._index = 0
        self._last_step = 0
        self._active = False
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self.peak_event: TimelineEvent | None = None
        self.timeline: list[TimelineEvent] = []
        self.phase_peaks: dict[str, int] = {}
        self.step_phase_peaks: dict[tuple[int, str], int] = {}
        self.op_names: set[str] = set()
        self.track(*existing)

    # -- storages ---------------------------------------------------------------------------

    def _counts(self, t: torch.Tensor) -> bool:
        return t.device.type in self.devices

    def _add(self, st: torch.UntypedStorage) -> int:
        """Start counting ``st``; returns the bytes added (0 when already counted)."""
        key = st._cdata
        entry = self._live.get(key)
        if entry is not None:
            nbytes = st.nbytes()
            if nbytes != entry[0]:  # resized in place (resize_, out= ops)
                self._live[key] = (nbytes, entry[1])
                self.live_bytes += nbytes - entry[0]
                return nbytes - entry[0]
            return 0
        nbytes = st.nbytes()
        ref = weakref.ref(st, lambda _ref, key=key: self._free(key))
        self._live[key] = (nbytes, ref)
        self.live_bytes += nbytes
        return nbytes

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.live_bytes -= entry[0]

    def is_tracked(self, t: torch.Tensor) -> bool:
        return any(st._cdata in self._live for st in _storages(t))

    def track(self, *objs: Any) -> int:
        """Count these (modules, optimizers, tensors, containers) as live from now: from the start
        when called before entering. Returns the bytes newly counted."""
        added = 0
        for t in _tensors_of(objs):
            if self._counts(t):
                for st in _storages(t):
                    added += self._add(st)
        if self._active and added:
            self._sample("<track>")
        return added

    # -- phases -----------------------------------------------------------------------------

    def set_phase(self, name: str, step: int | None = None) -> None:
        self.current_phase = name
        if step is not None:
            self.current_step = step
            self._last_step = max(self._last_step, step)

    @contextlib.contextmanager
    def phase(self, name: str, step: int | None = None):
        """Label the ops run inside with ``name`` (and ``step``); restores the previous label."""
        before = (self.current_phase, self.current_step)
        self.set_phase(name, step)
        try:
            yield self
        finally:
            self.current_phase, self.current_step = before

    # -- sampling ---------------------------------------------------------------------------

    def _sample(self, op: str) -> None:
        live, phase, step = self.live_bytes, self.current_phase, self.current_step
        event = None
        if self.record_timeline:
            event = TimelineEvent(self._index, op, live, phase, step)
            self.timeline.append(event)
        if live > self.peak_bytes or self.peak_event is None:
            self.peak_bytes = live
            self.peak_event = event or TimelineEvent(self._index, op, live, phase, step)
        if live > self.phase_peaks.get(phase, -1):
            self.phase_peaks[phase] = live
        if live > self.step_phase_peaks.get((step, phase), -1):
            self.step_phase_peaks[(step, phase)] = live
        self._index += 1

    def __enter__(self):
        if self._index:
            raise RuntimeError("a LiveTensorTracker measures one region: make a new one")
        self._active = True
        self.baseline_bytes = self.live_bytes
        self._sample("<enter>")
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self.set_phase("end", self._last_step)
        self._sample("<exit>")
        self._active = False
        self._live.clear()  # drops the weakrefs: nothing more is counted
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # torch.tensor(...) builds its tensor outside the dispatcher, then shows it to modes through
        # lift_fresh: that is its creation (counted as lift_fresh's output), not an unseen input.
        if self.track_unseen_inputs and func not in _LIFT_FRESH:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and self._counts(t):
                    for st in _storages(t):
                        if st._cdata not in self._live:
                            self.unseen_input_bytes += self._add(st)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and self._counts(t):
                for st in _storages(t):
                    self._add(st)
        name = str(func)
        self.op_names.add(name)
        self._sample(name)
        return out


# --- a training step, measured ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemoryMeasurement:
    """Live storage bytes over ``steps`` real training steps (see `measure_training_peak`).

    ``peak_*``: the highest live total, the phase/step it was reached in and the op right after
    which it was sampled. ``phase_peaks``: the highest live total in each phase (``zero_grad``,
    ``forward``, ``backward``, ``optimizer``) over all steps; ``step_phase_peaks`` per
    (step, phase). ``baseline_bytes``: live at the start (parameters, buffers, inputs);
    ``final_bytes``: live at the end (those plus the grads and the optimizer state).
    ``param_bytes``/``trainable_param_bytes``/``buffer_bytes``/``input_bytes``: the unique
    storages of each; ``optimizer_state_bytes``: the optimizer's state tensors at the end.
    ``unseen_input_bytes``: storages ops read that were neither registered nor made by an op
    (0 for every zoo model: everything live is accounted for)."""

    peak_bytes: int
    peak_phase: str
    peak_step: int
    peak_op: str
    phase_peaks: Mapping[str, int]
    step_phase_peaks: Mapping[tuple[int, str], int]
    baseline_bytes: int
    final_bytes: int
    param_bytes: int
    trainable_param_bytes: int
    buffer_bytes: int
    input_bytes: int
    optimizer_state_bytes: int
    optimizer_impl: str
    unseen_input_bytes: int
    timeline: tuple[TimelineEvent, ...]


@dataclasses.dataclass(frozen=True)
class MemTrackerMeasurement:
    """MemTracker's peak: its ``get_tracker_snapshot("peak")`` total for the CPU, and the
    breakdown of that snapshot by its reference types (Parameter, Buffer, Gradient, Activation,
    Temp, Optstate, Other)."""

    peak_bytes: int
    breakdown: Mapping[str, int]


def _unique_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        for st in _storages(t):
            seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def freeze_as_buffers(model: nn.Module) -> nn.Module:
    """Re-register every parameter with ``requires_grad=False`` as a buffer holding the same
    storage (in place; tied parameters stay tied). The computation and the memory are unchanged;
    this is how a frozen model is measured with MemTracker, which registers a grad hook on every
    parameter and so raises on frozen ones."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and not p.requires_grad:
                del module._parameters[name]
                module.register_buffer(name, p.detach())
    return model


def make_optimizer(name: str, params: list, kwargs: dict | None) -> torch.optim.Optimizer:
    kwargs = dict(kwargs or {})
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if name == "adam":
        return torch.optim.Adam(params, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(params, **kwargs)
    if name == "sgd-momentum":
        kwargs.setdefault("momentum", 0.9)
        return torch.optim.SGD(params, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def _prepare(model: nn.Module, inputs: Any, optimizer: str, precision: str,
             optimizer_kwargs: dict | None):
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
    if precision == "bf16":
        model.to(torch.bfloat16)
        inputs = tuple(t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.is_floating_point()
                       else t for t in inputs)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return inputs, make_optimizer(optimizer, params, optimizer_kwargs)


def _training_steps(model, inputs, opt, *, precision, steps, grad_accumulation, set_to_none,
                    phase=None, before_forward=None) -> None:
    """The measured loop. Nothing outlives its use: the model output is dropped once the loss is
    taken, the loss once backward ran (as a training loop that keeps neither would)."""
    phase = phase or (lambda name, step: contextlib.nullcontext())
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16-mixed" \
        else contextlib.nullcontext
    for step in range(steps):
        with phase("zero_grad", step):
            opt.zero_grad(set_to_none=set_to_none)
        for _ in range(grad_accumulation):
            if before_forward is not None:
                before_forward()
            with phase("forward", step), autocast():
                output = model(*inputs)
                loss = _loss(output)
                del output
                if grad_accumulation > 1:
                    loss = loss / grad_accumulation
            with phase("backward", step):
                loss.backward()
                del loss
        with phase("optimizer", step):
            opt.step()


def _loss(output: Any) -> torch.Tensor:
    """The output when it is a scalar, ``output.sum()`` for any other tensor, and for a tuple or
    list the sum of its floating outputs (groundtruth.scalar_loss)."""
    if isinstance(output, torch.Tensor):
        return output if output.dim() == 0 else output.sum()
    return scalar_loss(output)


def _check_args(steps: int, grad_accumulation: int) -> None:
    if steps < 1 or grad_accumulation < 1:
        raise ValueError(f"steps={steps} and grad_accumulation={grad_accumulation} must be >= 1")


def measure_training_peak(model: nn.Module, inputs: Any, *, optimizer: str = "adamw",
                          precision: str = "fp32", steps: int = 2, grad_accumulation: int = 1,
                          set_to_none: bool = True, optimizer_kwargs: dict | None = None,
                          record_timeline: bool = True) -> MemoryMeasurement:
    """Peak live storage bytes over ``steps`` real CPU training steps of ``model(*inputs)``.

    Each step: ``optimizer.zero_grad(set_to_none)``; ``grad_accumulation`` times forward (loss =
    the output when it is a scalar, else the sum of its floating outputs; divided by
    ``grad_accumulation`` when > 1) and backward; ``optimizer.step()``. The optimizer is
    PyTorch's with default settings (``torch.optim.AdamW(trainable params)`` etc.; SGD's
    "sgd-momentum" sets momentum=0.9), over the parameters that require grad, built before the
    region (its state appears during step 1's ``optimizer.step``); ``optimizer_kwargs`` are
    passed on (e.g. ``foreach=True``). ``precision``: "fp32" as given; "bf16" casts the model and
    the floating inputs to bf16 (in place, before the region); "bf16-mixed" runs the forward and
    the loss under ``torch.autocast("cpu", dtype=torch.bfloat16)``. The parameters, buffers,
    inputs and any existing grads are live from the start. Peak = max over all steps."""
    _check_args(steps, grad_accumulation)
    inputs, opt = _prepare(model, inputs, optimizer, precision, optimizer_kwargs)
    tracker = LiveTensorTracker(model, opt, inputs, record_timeline=record_timeline)
    with tracker:
        _training_steps(model, inputs, opt, precision=precision, steps=steps,
                        grad_accumulation=grad_accumulation, set_to_none=set_to_none,
                        phase=tracker.phase)
    ops = tracker.op_names
    impl = ("fused" if any("._fused_" in o for o in ops)
            else "foreach" if any("._foreach_" in o for o in ops) else "single-tensor")
    peak = tracker.peak_event
    return MemoryMeasurement(
        peak_bytes=tracker.peak_bytes,
        peak_phase=peak.phase,
        peak_step=peak.step,
        peak_op=peak.op,
        phase_peaks=MappingProxyType(dict(tracker.phase_peaks)),
        step_phase_peaks=MappingProxyType(dict(tracker.step_phase_peaks)),
        baseline_bytes=tracker.baseline_bytes,
        final_bytes=tracker.timeline[-1].live_bytes if tracker.timeline else tracker.live_bytes,
        param_bytes=_unique_bytes(model.parameters()),
        trainable_param_bytes=_unique_bytes(p for p in model.parameters() if p.requires_grad),
        buffer_bytes=_unique_bytes(model.buffers()),
        input_bytes=_unique_bytes(t for t in inputs if isinstance(t, torch.Tensor)),
        optimizer_state_bytes=_unique_bytes(_tensors_of(opt)),
        optimizer_impl=impl,
        unseen_input_bytes=tracker.unseen_input_bytes,
        timeline=tuple(tracker.timeline),
    )


def measure_training_peak_memtracker(model: nn.Module, inputs: Any, *, optimizer: str = "adamw",
                                     precision: str = "fp32", steps: int = 2,
                                     grad_accumulation: int = 1, set_to_none: bool = True,
                                     optimizer_kwargs: dict | None = None) -> MemTrackerMeasurement:
    """The same loop as `measure_training_peak`, measured by PyTorch's MemTracker.

    Used as documented: ``track_external(model, optimizer, *inputs)`` before entering (it only
    counts what it is given or sees an op return), ``reset_mod_stats()`` before every forward
    after the first (it refuses a second call of the root module otherwise), and the peak is
    ``get_tracker_snapshot("peak")[cpu]["Total"]``. MemTracker registers a grad hook on every
    parameter of every module it sees run, which raises on a parameter with
    ``requires_grad=False``: measure a frozen model after `freeze_as_buffers`."""
    from torch.distributed._tools.mem_tracker import MemTracker

    _check_args(steps, grad_accumulation)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(f"MemTracker cannot run a model with frozen parameters ({frozen[0]}, "
                         "...): it registers a grad hook on each; call freeze_as_buffers(model) "
                         "first")
    inputs, opt = _prepare(model, inputs, optimizer, precision, optimizer_kwargs)
    mt = MemTracker()
    mt.track_external(model, opt, *[t for t in inputs if isinstance(t, torch.Tensor)])
    with mt:
        _training_steps(model, inputs, opt, precision=precision, steps=steps,
                        grad_accumulation=grad_accumulation, set_to_none=set_to_none,
                        before_forward=mt.reset_mod_stats)
    snapshot = mt.get_tracker_snapshot("peak")
    cpu = snapshot.get(torch.device("cpu"), {})
    total = cpu.get("Total", 0)
    breakdown = {getattr(k, "value", str(k)): v for k, v in cpu.items() if k != "Total"}
    return MemTrackerMeasurement(total, MappingProxyType(breakdown))
