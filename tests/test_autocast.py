"""bf16 mixed precision (torch.autocast, fp32 weights) against PyTorch itself: saved tensors
on a real CPU run under autocast, FLOPs from FlopCounterMode, the peak of real training steps,
and the seed formula of 16 bytes per parameter for AdamW mixed-precision model states."""

from __future__ import annotations

import warnings

import pytest
import torch
from graphcost.models import SMALL_OVERRIDES, load

from graphcost import analyze
from graphcost.passes.memory.timeline import training_timeline
from graphcost.passes.memory.training import TrainingConfig
from validation.groundtruth import measure_flops, measure_saved_bytes
from validation.memtrack import measure_training_peak

BF16 = torch.bfloat16


def _load(name, device="meta", frozen=False):
    seq = 32 if name == "resnet-cnn" else 16
    torch.manual_seed(0)
    model, inputs = load(name, batch=2, seq=seq, with_targets=True, device=device,
                         **SMALL_OVERRIDES[name])
    if frozen:
        first = next(m for m in model.modules() if isinstance(m, (torch.nn.Embedding,
                                                                  torch.nn.Conv2d)))
        first.requires_grad_(False)
    return model, inputs


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("name", list(SMALL_OVERRIDES))
def test_saved_bytes_and_flops_under_autocast(name, frozen):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = analyze(*_load(name, frozen=frozen), autocast=BF16)
    assert a.unsupported_ops == {}
    assert (a.forward_flops, a.backward_flops) == measure_flops(*_load(name, frozen=frozen))
    model, inputs = _load(name, "cpu", frozen)
    with torch.autocast("cpu", dtype=BF16):
        assert a.saved_activation_bytes == measure_saved_bytes(model, inputs)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("name", list(SMALL_OVERRIDES))
def test_peak_under_autocast_matches_measured(name, optimizer):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = analyze(*_load(name), autocast=BF16)
        predicted = training_timeline(a, TrainingConfig(optimizer=optimizer))
        measured = measure_training_peak(*_load(name, "cpu"), optimizer=optimizer,
                                         precision="bf16-mixed")
    finally:
        torch.set_num_threads(old)
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.01)
    assert (predicted.peak.step, predicted.peak.phase) == (measured.peak_step,
                                                           measured.peak_phase)


def test_adamw_mixed_precision_model_states_are_16_bytes_per_parameter():
    """ZeRO's accounting (../shared/reference/models.md): fp32 weights, fp32 gradients and two
    fp32 AdamW states = 16 bytes per parameter (plus AdamW's 4-byte `step` per tensor)."""
    model, inputs = _load("llama3-8b")
    a = analyze(model, inputs, autocast=BF16)
    timeline = training_timeline(a)
    after_step = [e for e in timeline.events if e.phase == "optimizer" and e.step == 0][-1]
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    states = after_step.params + after_step.grads + after_step.optimizer_state
    assert states == 16 * n_params + 4 * n_tensors + buffers
