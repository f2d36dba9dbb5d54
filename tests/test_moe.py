"""Mixture of experts: the Mixtral preset's published totals, a small config against PyTorch's
own counts, and expert parallelism."""

from __future__ import annotations

import pytest
import torch
from graphcost.models import build_model, load

from graphcost import analyze
from graphcost.errors import ConfigError
from graphcost.hardware.devices import Device
from graphcost.hardware.network import Link, Network, all_gather_bytes
from graphcost.passes.experts import moe_summary
from graphcost.passes.parallel.plan import ParallelPlan, model_states_per_rank, per_device_memory
from graphcost.passes.parallel.step_time import parallel_step_time
from validation.groundtruth import measure_flops, measure_saved_bytes

SMALL = dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, vocab_size=100, ffn_dim=96,
             max_seq_len=64, n_experts=4, top_k=2)


def test_mixtral_totals_are_the_published_ones():
    """Mixtral 8x7B: 46,702,792,704 parameters, 12,879,925,248 active per token."""
    a = analyze(*load("mixtral-8x7b", seq=16))
    assert a.params == sum(p.numel() for p in build_model("mixtral-8x7b").parameters())
    moe = moe_summary(a)
    assert (moe.total_params, moe.active_params) == (46_702_792_704, 12_879_925_248)
    assert (len(moe.layers), moe.layers[0].n_experts, moe.layers[0].top_k) == (32, 8, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("capacity_factor", [1.0, 1.5])
def test_small_moe_matches_pytorch(dtype, capacity_factor):
    cfg = dict(SMALL, capacity_factor=capacity_factor)
    a = analyze(*load("mixtral-8x7b", batch=2, seq=16, with_targets=True, dtype=dtype, **cfg))
    assert a.unsupported_ops == {}
    if dtype == torch.float32:
        assert (a.forward_flops, a.backward_flops) == measure_flops(
            *load("mixtral-8x7b", batch=2, seq=16, with_targets=True, **cfg))
    torch.manual_seed(0)
    real = load("mixtral-8x7b", batch=2, seq=16, with_targets=True, device="cpu", dtype=dtype,
                **cfg)
    assert a.saved_activation_bytes == measure_saved_bytes(*real)


def test_experts_do_the_work_of_top_k_tokens():
    """Balanced routing: each of E experts runs ceil(k N / E) tokens, so the experts' forward
    FLOPs are those of k dense feed-forwards over the N tokens."""
    a = analyze(*load("mixtral-8x7b", batch=2, seq=16, with_targets=True, **SMALL))
    moe = moe_summary(a)
    n, k, e = 2 * 16, 2, 4
    dense_ffn = 3 * 2 * 64 * 96  # w1, w3, w2 per token
    assert moe.layers[0].forward_flops_per_expert == (k * n // e) * dense_ffn


def test_expert_parallel_states_and_all_to_all():
    a = analyze(*load("mixtral-8x7b", batch=2, seq=16, with_targets=True, **SMALL))
    moe = moe_summary(a)
    whole = model_states_per_rank(a, ParallelPlan())
    ranks = [model_states_per_rank(a, ParallelPlan(gpus=4, ep=4), dp_rank=r) for r in range(4)]
    expert = moe.expert_params
    assert sum(r.params for r in ranks) == 4 * (whole.params - expert) + expert
    net = Network(Link("n", 1e11), Link("n", 1e11), 8)
    toy = Device("toy", "cuda", 80 * 2**30, 1e12, {torch.float32: 1e14},
                 vector_peak_flops_per_s={torch.float32: 1e13})
    step = parallel_step_time(a, ParallelPlan(gpus=4, ep=4, micro_batches=1), toy, network=net)
    (a2a,) = [c for c in step.collectives if c.group == "ep"]
    dispatched = 2 * 2 * 16 * 64 * 4  # k x N tokens of dim 64, fp32
    assert a2a.bytes_per_step == 2 * 4 * all_gather_bytes(dispatched, 4)  # 2 layers
    assert per_device_memory(a, ParallelPlan(gpus=4, ep=4))


def test_expert_parallel_needs_experts_it_can_split():
    dense = analyze(*load("llama3-8b", batch=2, seq=16, n_layers=2, dim=64, n_heads=4,
                          n_kv_heads=2, vocab_size=100, ffn_dim=96, max_seq_len=64))
    with pytest.raises(ConfigError, match="no experts"):
        per_device_memory(dense, ParallelPlan(gpus=2, ep=2))
    moe = analyze(*load("mixtral-8x7b", batch=2, seq=16, **SMALL))
    with pytest.raises(ConfigError, match="must divide the 4 experts"):
        per_device_memory(moe, ParallelPlan(gpus=3, ep=3))
