"""The roofline against hand-computed cases from named dimensions (a toy device with round
figures, so every expected time is arithmetic on the model's dimensions)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphcost import analyze
from graphcost.hardware import Device
from graphcost.passes.roofline import (OPTIMIZER_ACCESSES, OPTIMIZER_FLOPS, Efficiency,
                                       forward_time, training_step_time)
from graphcost.passes.schedule import TrainingConfig

F32 = torch.float32
TOY = Device("toy", "cuda", memory_bytes=80 * 2**30, bandwidth_bytes_per_s=1e12,
             peak_flops_per_s={F32: 1e14, torch.bfloat16: 4e14},
             vector_peak_flops_per_s={F32: 1e13, torch.bfloat16: 1e13})


class Linear(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def _linear(batch, d_in, d_out):
    with torch.device("meta"):
        model = Linear(d_in, d_out)
    return analyze(model, (torch.empty(batch, d_in, device="meta"),))


@pytest.mark.parametrize("batch, bound", [(1, "memory"), (4096, "compute")])
def test_linear_forward_from_its_dimensions(batch, bound):
    d_in, d_out = 1024, 512
    t = forward_time(_linear(batch, d_in, d_out), TOY)
    (op,) = [o for o in t.ops if o.op == "aten.linear.default"]
    flops = 2 * batch * d_in * d_out
    moved = 4 * (batch * d_in + d_in * d_out + d_out + batch * d_out)  # x, W, b read; y written
    assert (op.flops, op.bytes) == (flops, moved)
    assert op.compute_s == pytest.approx(flops / 1e14)
    assert op.memory_s == pytest.approx(moved / 1e12)
    assert op.seconds == max(op.compute_s, op.memory_s) and op.bound == bound
    assert op.intensity == pytest.approx(flops / moved)
    assert t.step_time_s == pytest.approx(sum(o.seconds for o in t.ops))


def test_pointwise_op_is_its_memory_traffic():
    with torch.device("meta"):
        model = nn.ReLU()
    t = forward_time(analyze(model, (torch.empty(64, 1000, device="meta"),)), TOY)
    (op,) = t.ops
    assert op.flops == 0 and op.bound == "memory"
    assert op.seconds == pytest.approx(2 * 64 * 1000 * 4 / 1e12)  # read x, write y


def test_training_step_from_its_dimensions():
    """Forward, backward (weight and bias gradients only: x needs none) and AdamW."""
    batch, d_in, d_out = 4096, 1024, 512
    t = training_step_time(_linear(batch, d_in, d_out), TOY, TrainingConfig(optimizer="adamw"))
    params = d_in * d_out + d_out
    backward = [o for o in t.ops if o.phase == "backward" and o.op == "aten.linear.default"]
    (bw,) = backward
    assert bw.flops == 2 * batch * d_in * d_out  # dW = dy^T x (FlopCounterMode: db is free)
    # incoming dy, saved x, written dW and db
    assert bw.bytes == 4 * (batch * d_out + batch * d_in + params)
    assert t.optimizer_s == pytest.approx(max(OPTIMIZER_FLOPS["adamw"] * params / 1e13,
                                              OPTIMIZER_ACCESSES["adamw"] * 4 * params / 1e12))
    assert t.step_time_s == pytest.approx(t.forward_s + t.backward_s + t.optimizer_s)
    assert t.model_flops == 2 * 2 * batch * d_in * d_out  # no dx: the input needs no grad
    assert t.mfu == pytest.approx(t.model_flops / (t.step_time_s * 1e14))
    assert t.tokens == batch  # samples: the input is not token ids


def test_gradient_accumulation_and_efficiency():
    a = _linear(4096, 1024, 512)
    one = training_step_time(a, TOY)
    four = training_step_time(a, TOY, TrainingConfig(grad_accumulation=4))
    per_micro = one.step_time_s - one.optimizer_s
    assert four.step_time_s == pytest.approx(4 * per_micro + one.optimizer_s)
    assert four.model_flops == 4 * one.model_flops and four.tokens == 4 * one.tokens
    half = training_step_time(a, TOY, efficiency=Efficiency(matmul=0.5))
    (op,) = [o for o in half.ops if o.phase == "forward" and o.op == "aten.linear.default"]
    assert op.compute_s == pytest.approx(2 * 4096 * 1024 * 512 / 0.5e14)
    with pytest.raises(ValueError):
        Efficiency(bandwidth=1.5)


def test_recompute_is_timed_and_counted_in_hfu_not_mfu():
    from graphcost.models import SMALL_OVERRIDES, load

    a = analyze(*load("llama3-8b", batch=4, seq=64, with_targets=True,
                      **dict(SMALL_OVERRIDES["llama3-8b"], n_layers=4)))
    none = training_step_time(a, TOY)
    full = training_step_time(a, TOY, TrainingConfig(checkpoint="full"))
    assert none.recompute_s == 0 and full.recompute_s > 0
    assert full.model_flops == none.model_flops
    assert full.hardware_flops - full.model_flops == sum(o.flops for o in full.ops
                                                          if o.phase == "recompute") > 0
    assert full.hfu > full.mfu and none.hfu == pytest.approx(none.mfu)
    assert full.step_time_s == pytest.approx(none.step_time_s + full.recompute_s)
    assert full.tokens == 4 * 64


def test_a_device_without_figures_says_how_to_get_them():
    from graphcost.errors import ConfigError

    with pytest.raises(ConfigError, match="calibrate"):
        forward_time(_linear(8, 16, 16), "cpu")
