"""The roofline against hand-computed cases from named dimensions (a toy device with round
figures, so every expected time is arithmetic on the model's dimensions)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphcost import analyze
from graphcost.hardware.devices import Device
from graphcost.passes.memory.training import TrainingConfig
from graphcost.passes.roofline import (
    OPTIMIZER_ACCESSES,
    OPTIMIZER_FLOPS,
    Efficiency,
    forward_time,
    training_step_time,
)

F32 = torch.float32
# round figures; LOW has a ridge point (5 FLOP/B) the small test models' matmuls can pass
LOW = Device("low", "cuda", memory_bytes=80 * 2**30, bandwidth_bytes_per_s=1e12,
             peak_flops_per_s={F32: 5e12}, vector_peak_flops_per_s={F32: 5e12})
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


# ------------------------------------------------------------------ inference and cost

def _llama(batch, seq, **kw):
    from graphcost.models import SMALL_OVERRIDES, load

    return analyze(*load("llama3-8b", batch=batch, seq=seq,
                         **dict(SMALL_OVERRIDES["llama3-8b"], **kw)))


def _bounds(step):
    return (sum(o.memory_s for o in step.ops), sum(o.compute_s for o in step.ops))


def test_decode_step_reads_the_cache():
    from graphcost.passes.memory.inference import kv_cache_bytes_per_token
    from graphcost.passes.roofline import decode_time

    one = _llama(4, 1)
    context = 100
    d = decode_time(one, context, TOY)
    plain = forward_time(one, TOY)
    attention = [o for o in d.step.ops if "scaled_dot_product" in o.op]
    assert len(attention) == 2  # n_layers
    per_layer_kv = kv_cache_bytes_per_token(one) // 2
    q = one.graph.nodes[attention[0].name]["args"][0].spec.shape  # (B, H, 1, head_dim)
    before = {o.name: o for o in plain.ops}
    for o in attention:
        assert o.flops == 4 * 4 * q[1] * q[3] * (context + 1)
        assert o.bytes == before[o.name].bytes + 4 * per_layer_kv * context
    others = [o for o in d.step.ops if o not in attention]
    assert others == [before[o.name] for o in others]
    assert d.tokens_per_s == pytest.approx(4 / d.step.step_time_s)


def test_memory_bound_context_against_a_large_batch():
    """Beyond the context found, a decode step of a batch this large (the weights' reads shared
    by all sequences) spends more time moving bytes than computing; well before it, less."""
    from graphcost.passes.roofline import decode_time, memory_bound_context

    mha = dict(n_kv_heads=4, dim=256, ffn_dim=512)  # a cache read of 0.5 FLOP per byte
    context = memory_bound_context(_llama(1, 1, **mha), LOW)
    assert context is not None and context > 10
    big = _llama(4096, 1, **mha)
    memory, compute = _bounds(decode_time(big, int(context * 1.2) + 1, LOW).step)
    assert memory > compute
    memory, compute = _bounds(decode_time(big, int(context * 0.8), LOW).step)
    assert memory < compute


def test_compute_bound_batch_against_traces_at_it():
    from graphcost.passes.roofline import compute_bound_batch

    shape = dict(n_layers=1, dim=256, ffn_dim=1024)  # one token per sequence: weights dominate

    def compute_bound(batch):
        by = training_step_time(_llama(batch, 1, **shape), LOW).seconds_by_bound()
        return by["compute"] > by["memory"]

    found = compute_bound_batch(_llama(1, 1, **shape), _llama(2, 1, **shape), LOW)
    assert found is not None and found > 1
    assert compute_bound(found) and not compute_bound(found - 1)


def test_training_cost_from_its_definition():
    from graphcost.passes.roofline import training_cost

    step = training_step_time(_linear(4096, 1024, 512), TOY)
    cost = training_cost(step, params=1024 * 512 + 512, tokens=1e9, gpus=8,
                         usd_per_gpu_hour=2.0, mfu=0.5)
    per_token = step.model_flops / step.tokens
    assert cost.seconds == pytest.approx(1e9 * per_token / (8 * 1e14 * 0.5))
    assert cost.gpu_hours == pytest.approx(cost.seconds * 8 / 3600)
    assert cost.usd == pytest.approx(cost.gpu_hours * 2)
    six = cost.rule_of_thumb(6)
    assert six["flops"] == 6 * (1024 * 512 + 512) * 1e9
    predicted = training_cost(step, params=1, tokens=1e9)
    assert predicted.mfu == step.mfu and predicted.mfu_source == "predicted"
    with pytest.raises(ValueError):
        training_cost(step, params=1, tokens=1e9, mfu=1.5)
