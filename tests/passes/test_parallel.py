"""The parallelism pass against published figures (Megatron-LM's activation formulas, the ZeRO
paper's model-state figure) and against plans a user can get wrong."""

from __future__ import annotations

import pytest
import torch
from graphcost.models import SMALL_OVERRIDES, load

from graphcost import analyze
from graphcost.errors import ConfigError
from graphcost.passes.parallel.plan import (
    ParallelPlan,
    model_states_per_rank,
    per_device_memory,
    tensor_split,
    zero_model_states_bytes,
)

GB = 1e9


@pytest.mark.parametrize("stage, published_gb", [(0, 120), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_figure(stage, published_gb):
    """Rajbhandari et al. 2020, figure 1: 7.5B parameters, Adam in mixed precision, 64 GPUs."""
    assert zero_model_states_bytes(7.5e9, 64, stage) / GB == pytest.approx(published_gb,
                                                                           abs=0.05)


def _gpt3_layer_kept(plan, n_layer):
    s, h, a = 2048, 12288, 96
    m, i = load("gpt2", batch=1, seq=s, with_targets=True, dtype=torch.bfloat16,
                n_layer=n_layer, n_embd=h, n_head=a, block_size=s, vocab_size=128,
                flash=False, dropout=0.1)
    return per_device_memory(analyze(m, i, device="a100-80gb"), plan)[0].activation_bytes


@pytest.mark.parametrize("tp, sp", [(1, False), (8, False), (8, True)])
def test_megatron_tensor_parallel_activations_on_the_gpt3_layer(tp, sp):
    """Korthikanti et al. 2022, eq. 2 and 4: per layer sbh(10 + 24/t + 5as/(ht)) with tensor
    parallelism, sbh(34/t + 5as/(ht)) with sequence parallelism too; graphcost's only extra
    bytes are LayerNorm's fp32 mean and rstd (replicated, or split under SP)."""
    s, b, h, a = 2048, 1, 12288, 96
    plan = ParallelPlan(gpus=tp, tp=tp, sequence_parallel=sp)
    per_layer = _gpt3_layer_kept(plan, 2) - _gpt3_layer_kept(plan, 1)
    layernorm_stats = 2 * 2 * 4 * s * b
    if sp:
        formula = s * b * h * (34 / tp + 5 * a * s / (h * tp)) + layernorm_stats / tp
    else:
        formula = s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp)) + layernorm_stats
    assert per_layer == formula


def _small_llama():
    return analyze(*load("llama3-8b", batch=2, seq=16, with_targets=True,
                         **dict(SMALL_OVERRIDES["llama3-8b"], n_layers=4)))


def test_tensor_split_is_megatrons():
    """Column-parallel q, k, v, w1, w3 and the head (dim 0), row-parallel wo, w2 (dim 1),
    vocab-parallel embedding (dim 0), norms replicated."""
    a = _small_llama()
    dims = tensor_split(a.graph).param_dims
    names = {a.graph.nodes[n]["names"][0]: dim for n, dim in dims.items()}
    for w in ("wq", "wk", "wv"):
        assert names[f"layers.0.attention.{w}.weight"] == 0
    assert names["layers.0.attention.wo.weight"] == 1
    assert names["layers.3.feed_forward.w1.weight"] == 0
    assert names["layers.3.feed_forward.w2.weight"] == 1
    assert names["tok_embeddings.weight"] == 0 and names["output.weight"] == 0
    assert "norm.weight" not in names and "layers.0.attention_norm.weight" not in names


def test_model_states_shard_across_ranks():
    a = _small_llama()
    whole = model_states_per_rank(a, ParallelPlan())
    assert whole.params == a.params
    for dp in (2, 3):
        ranks = [model_states_per_rank(a, ParallelPlan(gpus=dp, fsdp=True), dp_rank=r)
                 for r in range(dp)]
        assert sum(r.params for r in ranks) == a.params
        padded = sum(r.grads_bytes for r in ranks)  # FSDP2 pads short shards (3 ranks)
        assert padded == whole.grads_bytes if dp == 2 else padded > whole.grads_bytes
    zero1 = model_states_per_rank(a, ParallelPlan(gpus=4, zero=1))
    assert zero1.params_bytes == whole.params_bytes and zero1.grads_bytes == whole.grads_bytes
    assert zero1.optimizer_state_bytes == -(-whole.optimizer_state_bytes // 4)
    tp = [model_states_per_rank(a, ParallelPlan(gpus=2, tp=2), tp_rank=r) for r in range(2)]
    replicated = sum(d["outputs"][0].numel for n, d in a.graph.nodes(data=True)
                     if d["kind"] == "param" and n not in tensor_split(a.graph).param_dims)
    assert sum(r.params for r in tp) == a.params + replicated  # norms on both ranks


def test_pipeline_stages_hold_in_flight_micro_batches():
    a = _small_llama()
    one = per_device_memory(a, ParallelPlan())[0]
    stages = per_device_memory(a, ParallelPlan(gpus=2, pp=2))
    assert [s.in_flight for s in stages] == [2, 1]
    assert sum(s.activations_per_micro_batch for s in stages) == one.activation_bytes
    assert sum(s.states.params for s in stages) == a.params


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpus=8, tp=3), "not a multiple"),
    (dict(gpus=8, dp=2, tp=2, pp=1), "not --gpus 8"),
    (dict(gpus=8, zero=4), "0, 1, 2 or 3"),
    (dict(gpus=8, zero=2, fsdp=True), "pick one"),
    (dict(gpus=8, sequence_parallel=True), "--tp > 1"),
])
def test_bad_plans_say_what_is_wrong(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ParallelPlan(**kwargs)


def test_plans_the_model_cannot_take():
    a = _small_llama()  # 4 query heads, 2 key/value heads, 4 blocks
    with pytest.raises(ConfigError, match="does not divide the 2 key/value heads"):
        per_device_memory(a, ParallelPlan(gpus=4, tp=4))
    with pytest.raises(ConfigError, match="needs at least 8 blocks"):
        per_device_memory(a, ParallelPlan(gpus=8, pp=8))
    with pytest.raises(ConfigError, match="no experts"):
        per_device_memory(a, ParallelPlan(gpus=2, ep=2))


# ------------------------------------------------------------------ PyTorch's own engine

def _build(**extra):
    cfg = dict(SMALL_OVERRIDES["llama3-8b"], **extra)

    def build():
        torch.manual_seed(0)
        return load("llama3-8b", batch=2, seq=16, with_targets=True, device="cpu", **cfg)

    return build, analyze(*load("llama3-8b", batch=2, seq=16, with_targets=True, **cfg))


@pytest.mark.parametrize("mode, world, extra", [("fsdp", 2, {}), ("fsdp", 3, {}),
                                                 ("tp", 2, {}), ("tp", 4, {"n_kv_heads": 4}),
                                                 ("tp", 3, {})])
def test_model_states_per_rank_equal_pytorchs_sharding(mode, world, extra):
    """FSDP2 (fully_shard) and tensor parallel (parallelize_module) on a fake process group:
    every rank's parameter, gradient and AdamW-state bytes, as PyTorch stores them."""
    from validation.sharding import measure_sharded_states

    build, a = _build(**extra)
    for rank in range(world):
        measured = measure_sharded_states(build, world, rank, mode=mode)
        plan = (ParallelPlan(gpus=world, fsdp=True) if mode == "fsdp"
                else ParallelPlan(gpus=world, tp=world))
        predicted = model_states_per_rank(a, plan, **({"dp_rank": rank} if mode == "fsdp"
                                                      else {"tp_rank": rank}))
        assert predicted.params_bytes == measured.params_bytes, rank
        if measured.grads_bytes is not None:  # TP at 3 ranks cannot run a step (split heads)
            assert predicted.grads_bytes == measured.grads_bytes, rank
            assert predicted.optimizer_state_bytes == measured.optimizer_state_bytes, rank


@pytest.mark.parametrize("mode, world", [("fsdp", 2), ("fsdp", 4), ("tp", 2)])
def test_per_device_peak_estimate_bounds_the_measured_one(mode, world):
    """The per-device peak is an estimate (docs/parallel.md); against MemTracker on a fake-PG
    rank running two real steps (8 x 64 tokens) it is an upper bound within 10%."""
    from validation.sharding import measure_sharded_states

    cfg = dict(SMALL_OVERRIDES["llama3-8b"])

    def build():
        torch.manual_seed(0)
        return load("llama3-8b", batch=8, seq=64, with_targets=True, device="cpu", **cfg)

    a = analyze(*load("llama3-8b", batch=8, seq=64, with_targets=True, **cfg))
    plan = (ParallelPlan(gpus=world, fsdp=True) if mode == "fsdp"
            else ParallelPlan(gpus=world, tp=world))
    predicted = max(d.peak_bytes for d in per_device_memory(a, plan))
    measured = measure_sharded_states(build, world, 0, mode=mode, measure_peak=True,
                                      steps=2).peak_bytes
    assert measured <= predicted <= 1.10 * measured
