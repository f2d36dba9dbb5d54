"""The predicted training timeline (graphcost.passes.schedule) against measured real CPU steps
(graphcost.memtrack.measure_training_peak, equal to PyTorch's MemTracker to the byte)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from graphcost.models import SMALL_OVERRIDES, load
from torch import nn

from graphcost import analyze
from graphcost.passes.memory.timeline import training_timeline
from graphcost.passes.memory.training import TrainingConfig
from validation.memtrack import measure_training_peak

torch.set_num_threads(1)

SMALL = {name: (name, overrides) for name, overrides in SMALL_OVERRIDES.items()}
SMALL["llama3-8b-torch-rmsnorm"] = ("llama3-8b", dict(SMALL_OVERRIDES["llama3-8b"],
                                                      use_torch_rmsnorm=True))
# "frozen": the embedding(s) and the first block do not train
FROZEN = {"gpt2": ["wte", "wpe", "h.0"], "llama3-8b": ["tok_embeddings", "layers.0"],
          "llama3-8b-torch-rmsnorm": ["tok_embeddings", "layers.0"],
          "cs336-gpt2-xl": ["token_embeddings", "position_embeddings", "layers.0"],
          "resnet-cnn": ["stem", "stages.0.0"]}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Predicted peaks (overall, and every phase of every step) are within a few bytes of the
# measured ones on this matrix; the tolerance leaves room for other shapes. Forward phases
# included: eager Python keeps a local until its function returns, and graphcost observes
# those lifetimes while exporting (trace/lifetimes.py).
PEAK_TOLERANCE = 0.005


def _build(family: str, dtype: torch.dtype, device: str, frozen: bool):
    zoo, overrides = SMALL[family]
    seq = 32 if family == "resnet-cnn" else 16
    model, inputs = load(zoo, batch=2, seq=seq, dtype=dtype, with_targets=True, device=device,
                         **overrides)
    if frozen:
        for path in FROZEN[family]:
            model.get_submodule(path).requires_grad_(False)
    return model, inputs


@functools.cache
def _analysis(family: str, dtype: str, frozen: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return analyze(*_build(family, DTYPES[dtype], "meta", frozen))


def _measure(family, dtype, frozen, **kw):
    torch.manual_seed(0)
    model, inputs = _build(family, DTYPES[dtype], "cpu", frozen)
    return measure_training_peak(model, inputs, precision=dtype, **kw)


def _check(family, dtype, frozen, optimizer, grad_accumulation=1, set_to_none=True):
    config = TrainingConfig(optimizer=optimizer, grad_accumulation=grad_accumulation,
                            set_to_none=set_to_none)
    predicted = training_timeline(_analysis(family, dtype, frozen), config)
    measured = _measure(family, dtype, frozen, optimizer=optimizer,
                        grad_accumulation=grad_accumulation, set_to_none=set_to_none)
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=PEAK_TOLERANCE)
    measured_phases = dict(measured.step_phase_peaks)
    for key, value in predicted.phase_peaks().items():
        assert value == pytest.approx(measured_phases[key], rel=PEAK_TOLERANCE), key
    # where: the phase of the predicted peak holds the measured peak too
    assert measured_phases[(predicted.peak.step, predicted.peak.phase)] == pytest.approx(
        measured.peak_bytes, rel=PEAK_TOLERANCE)


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd", "sgd-momentum"])
@pytest.mark.parametrize("family", list(SMALL))
def test_peak_matches_measured(family, optimizer, dtype, frozen):
    _check(family, dtype, frozen, optimizer)


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
@pytest.mark.parametrize("family", list(SMALL))
@pytest.mark.parametrize("optimizer,grad_accumulation,set_to_none",
                         [("sgd", 2, True), ("adamw", 2, True), ("sgd", 1, False)])
def test_accumulation_and_kept_grads(family, optimizer, grad_accumulation, set_to_none, frozen):
    _check(family, "bf16" if family.startswith("llama") else "fp32", frozen, optimizer,
           grad_accumulation, set_to_none)


B, D_IN, D_OUT = 8, 32, 16


def test_single_linear_sgd_by_hand():
    """nn.Linear(D_IN, D_OUT) on a (B, D_IN) batch, loss = output.sum(), plain SGD, fp32."""
    params = (D_OUT * D_IN + D_OUT) * 4
    x = B * D_IN * 4
    out = B * D_OUT * 4
    loss = ones = 4
    forward = params + x + out + loss  # at the loss: output.sum() while the output is alive
    # backward: d loss = ones (a scalar, expanded: no memory); d weight, d bias
    backward = params + x + loss + ones + D_OUT * D_IN * 4 + D_OUT * 4
    optimizer = params + x + params  # grads stay; SGD updates in place
    with torch.device("meta"):
        model = nn.Linear(D_IN, D_OUT)
    t = training_timeline(analyze(model, (torch.empty(B, D_IN, device="meta"),)),
                          TrainingConfig(optimizer="sgd"))
    assert t.phase_peaks()[(0, "forward")] == forward
    assert t.phase_peaks()[(0, "backward")] == backward
    assert t.phase_peaks()[(0, "optimizer")] == optimizer
    assert (t.peak.phase, t.peak_bytes) == ("backward", backward)
    torch.manual_seed(0)
    measured = measure_training_peak(nn.Linear(D_IN, D_OUT), (torch.randn(B, D_IN),),
                                     optimizer="sgd")
    assert measured.peak_bytes == backward
    assert measured.step_phase_peaks[(0, "forward")] == forward
    assert measured.step_phase_peaks[(0, "optimizer")] == optimizer


@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("family", ["llama3-8b", "gpt2"])
def test_multi_tensor_adamw_matches_measured(family, impl):
    """PyTorch's foreach (CUDA's default) and fused AdamW, run on the CPU when asked for."""
    config = TrainingConfig(optimizer="adamw", optimizer_impl=impl)
    predicted = training_timeline(_analysis(family, "fp32", False), config)
    measured = _measure(family, "fp32", False, optimizer="adamw",
                        optimizer_kwargs={impl: True})
    assert measured.optimizer_impl == impl
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=PEAK_TOLERANCE)
    assert (predicted.peak.step, predicted.peak.phase) == (measured.peak_step,
                                                           measured.peak_phase)
