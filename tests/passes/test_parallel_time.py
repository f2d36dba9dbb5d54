"""Step time of parallel plans, from hand-computed cases: the one-device roofline, ring volumes
of the collectives a plan adds, the 1F1B bubble, and what overlapping hides."""

from __future__ import annotations

import pytest
import torch
from graphcost.models import SMALL_OVERRIDES, load

from graphcost import analyze
from graphcost.hardware.devices import Device
from graphcost.hardware.network import Link, Network, all_gather_bytes, all_reduce_bytes
from graphcost.passes.parallel.plan import ParallelPlan, model_states_per_rank
from graphcost.passes.parallel.step_time import parallel_step_time
from graphcost.passes.roofline import training_step_time

F32 = torch.float32
TOY = Device("toy", "cuda", memory_bytes=80 * 2**30, bandwidth_bytes_per_s=1e12,
             peak_flops_per_s={F32: 1e14}, vector_peak_flops_per_s={F32: 1e13})
NET = Network(Link("fast", 1e11), Link("slow", 1e10), gpus_per_node=4)


@pytest.fixture(scope="module")
def llama():
    return analyze(*load("llama3-8b", batch=2, seq=16, with_targets=True,
                         **dict(SMALL_OVERRIDES["llama3-8b"], n_layers=4)))


def test_ring_volumes():
    assert all_reduce_bytes(100, 4) == 150  # 2 (n - 1) / n
    assert all_gather_bytes(100, 4) == 75
    assert all_reduce_bytes(100, 1) == 0


def test_one_device_is_the_roofline(llama):
    one = training_step_time(llama, TOY)
    step = parallel_step_time(llama, ParallelPlan(), TOY, network=NET)
    assert step.step_time_s == pytest.approx(one.step_time_s)
    assert step.collectives == () and step.bubble_s == 0


@pytest.mark.parametrize("overlap", [True, False])
def test_data_parallel_all_reduce_of_the_gradients(llama, overlap):
    one = training_step_time(llama, TOY)
    plan = ParallelPlan(gpus=8, micro_batches=1)  # 8 ranks: two nodes of 4, the slow link
    step = parallel_step_time(llama, plan, TOY, network=NET, overlap=overlap)
    (dp,) = step.collectives
    grads = model_states_per_rank(llama, ParallelPlan()).grads_bytes
    assert dp.bytes_per_step == 2 * 7 / 8 * grads
    assert dp.seconds == pytest.approx(dp.bytes_per_step / 1e10)
    backward = one.backward_s
    assert dp.exposed_s == pytest.approx(max(0.0, dp.seconds - backward) if overlap
                                         else dp.seconds)
    assert step.step_time_s == pytest.approx(one.step_time_s + dp.exposed_s)
    assert step.mfu == pytest.approx(8 * one.model_flops / (8 * step.step_time_s * 1e14))


def test_pipeline_bubble_and_sends(llama):
    one = training_step_time(llama, TOY)
    plan = ParallelPlan(gpus=2, pp=2, micro_batches=4)
    step = parallel_step_time(llama, plan, TOY, network=NET)
    assert len(step.stage_s) == 2
    sends = [c for c in step.collectives if c.group == "pp"]
    boundary = 2 * 16 * 64 * 4  # the residual stream (batch 2 x 16 tokens x dim 64, fp32)
    assert sends[0].bytes_per_step == 2 * boundary * 4 * 1
    # every op on one stage or the other; the first also sends (forward) and receives
    compute = sum(o.seconds for o in one.ops)
    assert sum(step.stage_s) == pytest.approx(compute + 2 * boundary / 1e11)
    assert step.bubble_s == pytest.approx(max(step.stage_s))
    assert step.step_time_s == pytest.approx(4 * max(step.stage_s) + step.bubble_s
                                             + step.optimizer_s)


def test_tensor_parallel_all_reduces(llama):
    """Megatron: per block 2 all-reduces forward (wo, w2) and 2 backward (the inputs of
    q/k/v and of w1/w3), each of the residual stream; plus the vocab-parallel embedding's
    output (forward) and the head's input (backward)."""
    plan = ParallelPlan(gpus=2, tp=2, micro_batches=1)
    step = parallel_step_time(llama, plan, TOY, network=NET)
    (tp,) = [c for c in step.collectives if c.group == "tp"]
    stream = 2 * 16 * 64 * 4
    count = 4 * 4 + 1 + 1
    assert tp.bytes_per_step == pytest.approx(count * all_reduce_bytes(stream, 2))
    assert tp.exposed_s == pytest.approx(tp.bytes_per_step / 1e11)
