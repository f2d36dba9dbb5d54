"""The measured peak memory of real training steps (graphcost.memtrack), checked two ways:

- against sizes computed by hand from named shapes (explicit allocations, one Linear with SGD and
  AdamW, two Linears with AdamW's per-parameter temporaries);
- against PyTorch's own MemTracker on small configs of every zoo family, for AdamW and SGD in
  fp32, bf16 and bf16-mixed: equal to the byte. MemTracker raises on frozen parameters (it puts
  a grad hook on every parameter), so frozen models are compared with MemTracker run on the
  same model with its frozen parameters re-registered as buffers (same storages, same math).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from graphcost.models import SMALL_OVERRIDES, load
from torch import nn

from validation.memtrack import (
    LiveTensorTracker,
    MemoryMeasurement,
    freeze_as_buffers,
    measure_training_peak,
    measure_training_peak_memtracker,
)

MiB = 2**20
F32 = 4  # bytes per float32 element

SMALL = SMALL_OVERRIDES


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Memory does not depend on the thread count (what differs per thread is kernel-internal
    # scratch, which no dispatch-level tracker sees), but on a busy 2-core machine OpenMP
    # barriers make these tiny ops ~100x slower with 2 threads.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small(name, batch=2, seq=16):
    torch.manual_seed(0)
    return load(name, batch=batch, seq=seq, with_targets=True, device="cpu", **SMALL[name])


def freeze_embedding_and_first_block(model):
    first = {"gpt2": ("wte", "wpe", "h.0"), "llama3-8b": ("tok_embeddings", "layers.0"),
             "cs336-gpt2-xl": ("token_embeddings", "position_embeddings", "layers.0"),
             "resnet-cnn": ("stem", "stages.0")}[_family(model)]
    for name in first:
        model.get_submodule(name).requires_grad_(False)
    return model


def _family(model):
    return {"GPT2": "gpt2", "Llama": "llama3-8b", "TransformerLM": "cs336-gpt2-xl",
            "ResNetCNN": "resnet-cnn"}[type(model).__name__]


# --- the tracker on explicit allocations -----------------------------------------------------


def test_explicit_allocations_and_frees():
    pre = torch.empty(100)  # 400 B, exists before the region
    tracker = LiveTensorTracker(pre)
    with tracker:
        with tracker.phase("a", step=0):
            a = torch.empty(1000)  # +4000
            b = torch.zeros(250, dtype=torch.float64)  # +2000
            v = a[10:]  # a view: no new storage
            a.add_(1)  # in place: nothing new
            del a  # v still holds a's storage
            assert tracker.live_bytes == 6400
        with tracker.phase("b", step=1):
            del v  # now a's storage dies
            assert tracker.live_bytes == 2400
            c = b + 1  # +2000
            del pre  # a tensor from before the region dies inside it
            assert tracker.live_bytes == 4000
            c.resize_(500)  # 250 -> 500 float64 elements: +2000 in place
    assert [(e.op, e.live_bytes) for e in tracker.timeline] == [
        ("<enter>", 400),
        ("aten.empty.memory_format", 4400),
        ("aten.zeros.default", 6400),
        ("aten.slice.Tensor", 6400),
        ("aten.add_.Tensor", 6400),
        ("aten.add.Tensor", 4400),  # a's 4000 freed, c's 2000 made
        ("aten.resize_.default", 6000),  # pre's 400 freed, c grew by 2000
        ("<exit>", 6000),
    ]
    assert tracker.baseline_bytes == 400
    assert tracker.peak_bytes == 6400
    assert (tracker.peak_event.op, tracker.peak_event.phase, tracker.peak_event.step) == (
        "aten.zeros.default", "a", 0)  # the first time it was reached
    assert tracker.phase_peaks == {"start": 400, "a": 6400, "b": 6000, "end": 6000}
    assert tracker.unseen_input_bytes == 0
    del b, c


def test_tensor_made_outside_the_region_counts_from_its_first_use():
    outside = torch.ones(256)  # 1024 B, not registered
    tracker = LiveTensorTracker()
    with tracker:
        y = outside * 2  # counted from here: input 1024 + output 1024
        assert tracker.live_bytes == 2048
        t = torch.tensor([1.0, 2.0])  # built outside the dispatcher, shown through lift_fresh
    assert tracker.unseen_input_bytes == 1024  # torch.tensor's storage is not "unseen"
    assert tracker.peak_bytes == 2056
    del y, t


def test_registered_objects_count_once_per_storage():
    lin = nn.Linear(8, 4)  # weight 128 B, bias 16 B
    x = torch.randn(3, 8)  # 96 B
    tracker = LiveTensorTracker(lin, [x, {"again": x, "view": x[1:]}], lin.weight)
    assert tracker.live_bytes == 128 + 16 + 96
    with pytest.raises(TypeError):
        LiveTensorTracker(object())
    with tracker:
        pass
    with pytest.raises(RuntimeError, match="one region"), tracker:
        pass


@pytest.mark.filterwarnings("ignore:global module forward hook")
def test_memtracker_cannot_take_a_frozen_parameter():
    # why frozen models go through freeze_as_buffers: MemTracker hooks every parameter's grad
    from torch.distributed._tools.mem_tracker import MemTracker

    lin = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(RuntimeError, match="hook"), MemTracker():
        lin(torch.ones(1, 4))


# --- hand-computed training steps -------------------------------------------------------------


def test_linear_sgd_peak_from_named_sizes():
    d, batch = 1024, 256
    weight, x, out, scalar = d * d * F32, batch * d * F32, batch * d * F32, F32
    assert (weight, x) == (4 * MiB, 1 * MiB)
    m = measure_training_peak(nn.Linear(d, d, bias=False), torch.randn(batch, d), optimizer="sgd")
    # forward: W, x, the output, the loss (output.sum())
    assert m.phase_peaks["forward"] == weight + x + out + scalar
    # backward: the output is gone (linear saves x and W, sum saves only a shape); live are
    # W, x, the loss, its grad (ones_like) and the weight's grad from mm
    assert m.peak_bytes == weight + x + scalar + scalar + weight
    assert (m.peak_phase, m.peak_step, m.peak_op) == ("backward", 0, "aten.mm.default")
    # SGD without momentum adds nothing; the grad stays until the next zero_grad
    assert m.phase_peaks["optimizer"] == m.final_bytes == weight + x + weight
    assert m.optimizer_state_bytes == 0 and m.optimizer_impl == "single-tensor"
    assert m.baseline_bytes == weight + x
    mt = measure_training_peak_memtracker(nn.Linear(d, d, bias=False), torch.randn(batch, d),
                                          optimizer="sgd")
    assert mt.peak_bytes == m.peak_bytes
    assert mt.breakdown["Parameter"] == weight and mt.breakdown["Other"] == x  # the input


def test_linear_adamw_peak_from_named_sizes():
    d, batch = 1024, 256
    weight, x, step_counter = d * d * F32, batch * d * F32, F32
    m = measure_training_peak(nn.Linear(d, d, bias=False), torch.randn(batch, d))
    state = 2 * weight + step_counter  # exp_avg, exp_avg_sq, a 0-dim float32 step
    assert m.optimizer_state_bytes == state
    # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps): sqrt and div coexist
    assert m.peak_bytes == weight + x + weight + state + 2 * weight
    assert (m.peak_phase, m.peak_step, m.peak_op) == ("optimizer", 0, "aten.div.Tensor")
    assert m.final_bytes == weight + x + weight + state
    # step 2's forward runs with the state live
    assert m.step_phase_peaks[(1, "forward")] - m.step_phase_peaks[(0, "forward")] == state


def test_adamw_temporaries_overlap_the_previous_params_denom():
    # The single-tensor loop's local `denom` keeps the previous parameter's denom alive until
    # the next one is assigned: the transient is max_i 2*|p_i| + |p_(i-1)|, not 2*max|p|.
    a, b, batch = 256 * 512 * F32, 512 * 512 * F32, 64
    model = nn.Sequential(nn.Linear(256, 512, bias=False), nn.Linear(512, 512, bias=False))
    m = measure_training_peak(model, torch.randn(batch, 256))
    params, x = a + b, batch * 256 * F32
    state = 2 * params + 2 * F32
    assert m.final_bytes == params + x + params + state
    assert m.peak_bytes == m.final_bytes + 2 * b + a
    assert m.peak_phase == "optimizer"


# --- MemTracker agrees on the zoo -------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-mixed"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("name", list(SMALL))
def test_agrees_with_memtracker_on_the_zoo(name, optimizer, precision):
    ours = measure_training_peak(*small(name), optimizer=optimizer, precision=precision)
    theirs = measure_training_peak_memtracker(*small(name), optimizer=optimizer,
                                              precision=precision)
    assert ours.peak_bytes == theirs.peak_bytes
    assert ours.unseen_input_bytes == 0  # every live byte was registered or made by an op
    assert ours.optimizer_impl == "single-tensor"  # PyTorch's default on CPU
    # at the end only the parameters, buffers, inputs, grads and optimizer state are left
    assert ours.final_bytes == (ours.param_bytes + ours.buffer_bytes + ours.input_bytes
                                + ours.trainable_param_bytes + ours.optimizer_state_bytes)
    assert ours.baseline_bytes == ours.param_bytes + ours.buffer_bytes + ours.input_bytes
    # the MemTracker snapshot at the peak: params as counted here, AdamW's state once made
    assert theirs.breakdown["Parameter"] == ours.param_bytes
    if optimizer == "adamw":
        assert ours.peak_phase == "optimizer" or ours.peak_step == 1
        assert ours.optimizer_state_bytes == 2 * ours.trainable_param_bytes + 4 * len(
            [p for p in small(name)[0].parameters()])


@pytest.mark.parametrize("name", list(SMALL))
def test_frozen_parameters(name):
    model, inputs = small(name)
    ours = measure_training_peak(freeze_embedding_and_first_block(model), inputs)
    assert 0 < ours.trainable_param_bytes < ours.param_bytes
    assert ours.optimizer_state_bytes == 2 * ours.trainable_param_bytes + 4 * sum(
        p.requires_grad for p in model.parameters())
    assert ours.final_bytes == (ours.param_bytes + ours.buffer_bytes + ours.input_bytes
                                + ours.trainable_param_bytes + ours.optimizer_state_bytes)
    model, inputs = small(name)
    with pytest.raises(ValueError, match="frozen"):
        measure_training_peak_memtracker(freeze_embedding_and_first_block(model), inputs)
    model, inputs = small(name)
    theirs = measure_training_peak_memtracker(
        freeze_as_buffers(freeze_embedding_and_first_block(model)), inputs)
    assert theirs.peak_bytes == ours.peak_bytes


@pytest.mark.parametrize("kwargs", [
    dict(optimizer="sgd-momentum"),
    dict(optimizer="adam", set_to_none=False),
    dict(optimizer="adamw", grad_accumulation=2, steps=1),
    dict(optimizer="adamw", optimizer_kwargs=dict(foreach=True)),
    dict(optimizer="adamw", optimizer_kwargs=dict(fused=True)),
])
def test_loop_variants_agree_with_memtracker(kwargs):
    ours = measure_training_peak(*small("llama3-8b"), **kwargs)
    theirs = measure_training_peak_memtracker(*small("llama3-8b"), **kwargs)
    assert ours.peak_bytes == theirs.peak_bytes
    impl = kwargs.get("optimizer_kwargs", {})
    assert ours.optimizer_impl == ("foreach" if "foreach" in impl else
                                   "fused" if "fused" in impl else "single-tensor")


def test_llama_phases():
    m = measure_training_peak(*small("llama3-8b"))
    params, state = m.param_bytes, m.optimizer_state_bytes
    # the optimizer state (made in step 0's optimizer.step) is live through all of step 1
    assert m.step_phase_peaks[(1, "forward")] - m.step_phase_peaks[(0, "forward")] == state
    assert m.step_phase_peaks[(1, "backward")] - m.step_phase_peaks[(0, "backward")] == state
    # the grads are freed by zero_grad(set_to_none=True), the activations by backward
    assert m.step_phase_peaks[(1, "zero_grad")] == m.baseline_bytes + params + state
    assert m.phase_peaks["backward"] > m.phase_peaks["forward"] > m.baseline_bytes
    # adamw's transient is three w1/w2/w3-sized tensors: (w1's denom, w2's sqrt and div)
    ffn = 64 * 96 * F32
    assert m.phase_peaks["optimizer"] == m.final_bytes + 3 * ffn
    assert m.peak_bytes == max(m.phase_peaks.values())
    assert [e.index for e in m.timeline] == list(range(len(m.timeline)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.peak_bytes = 0
    assert isinstance(m, MemoryMeasurement)


def test_bad_arguments():
    with pytest.raises(ValueError, match="optimizer"):
        measure_training_peak(nn.Linear(2, 2), torch.ones(1, 2), optimizer="lion")
    with pytest.raises(ValueError, match="precision"):
        measure_training_peak(nn.Linear(2, 2), torch.ones(1, 2), precision="fp8")
    with pytest.raises(ValueError, match="steps"):
        measure_training_peak(nn.Linear(2, 2), torch.ones(1, 2), steps=0)
