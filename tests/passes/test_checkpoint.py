"""Checkpoint policies against real runs with torch.utils.checkpoint (graphcost.checkpoint_apply
applies the plan: checkpoint(use_reentrant=False), selective contexts for the kept ops):
recompute FLOPs against the extra FLOPs FlopCounterMode counts, the bytes kept for backward
against the live storages after a real forward, and the peak against the live-tensor tracker
over two real training steps."""

from __future__ import annotations

import contextlib
import functools
import random
import warnings

import pytest
import torch
from graphcost.models import SMALL_OVERRIDES, load
from graphcost.models import gpt2 as gpt2_module
from torch.utils.checkpoint import checkpoint

from graphcost import analyze
from graphcost.errors import ConfigError
from graphcost.graph.build import op_nodes
from graphcost.passes.checkpoint.apply import checkpointed
from graphcost.passes.checkpoint.policy import (
    BUILTIN_POLICIES,
    main_blocks,
    parse_policy,
    per_block_spec,
    plan,
)
from graphcost.passes.checkpoint.search import (
    _applicable,
    _Decomposition,
    _walks,
    compare,
    optimize,
)
from graphcost.passes.memory.timeline import training_timeline
from graphcost.passes.memory.training import TrainingConfig
from validation.groundtruth import measure_flops
from validation.memtrack import measure_training_peak

torch.set_num_threads(1)

# 4 blocks, and a batch and length at which activations, not the optimizer, set the peak
FAMILIES = {
    "gpt2": dict(SMALL_OVERRIDES["gpt2"], n_layer=4),
    "gpt2-unfused": dict(SMALL_OVERRIDES["gpt2"], n_layer=4, flash=False, dropout=0.1),
    "llama3-8b": dict(SMALL_OVERRIDES["llama3-8b"], n_layers=4),
    "cs336-gpt2-xl": dict(SMALL_OVERRIDES["cs336-gpt2-xl"], n_layers=4),
    "resnet-cnn": {},
}
SHAPE = dict(batch=8, seq=64)
PEAK_TOLERANCE = 0.01  # the bar; the matrix below is within a few bytes


def _zoo(family: str) -> str:
    return "gpt2" if family.startswith("gpt2") else family


def _load(family: str, device: str, dtype=torch.float32):
    shape = dict(batch=4, seq=32) if family == "resnet-cnn" else SHAPE
    return load(_zoo(family), **shape, with_targets=True, device=device, dtype=dtype,
                **FAMILIES[family])


@functools.cache
def _analysis(family: str, dtype: torch.dtype = torch.float32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return analyze(*_load(family, "meta", dtype))


@contextlib.contextmanager
def _applied(model, p):
    """checkpoint_apply for every policy; the written-out attention core of gpt2-unfused is a
    module-level function, wrapped here the way a user would wrap it."""
    if p.policy.kind == "selective" and any(r.start != r.stop for r in p.regions):
        core = gpt2_module.attention_core
        gpt2_module.attention_core = lambda *a: checkpoint(core, *a, use_reentrant=False)
        try:
            yield model
        finally:
            gpt2_module.attention_core = core
    else:
        with checkpointed(model, p):
            yield model


def _real(family: str, policy: str, dtype=torch.float32, **config):
    """(peak over two steps, live bytes after the first forward, fwd+bwd FLOPs) of a real
    CPU run with the policy applied."""
    p = plan(_analysis(family, dtype).graph, policy)
    torch.manual_seed(0)
    model, inputs = _load(family, "cpu", dtype)
    with _applied(model, p):
        measured = measure_training_peak(model, inputs, precision="bf16" if dtype ==
                                         torch.bfloat16 else "fp32", **config)
    model, inputs = _load(family, "cpu", dtype)
    with _applied(model, p):
        flops = sum(measure_flops(model, inputs))
    after_forward = [e for e in measured.timeline if e.step == 0 and e.phase == "forward"][-1]
    return measured, after_forward.live_bytes, flops


@functools.cache
def _flops_without(family: str) -> int:
    model, inputs = _load(family, "cpu")
    return sum(measure_flops(model, inputs))


def _check(family, policy, dtype=torch.float32, **config):
    predicted = training_timeline(_analysis(family, dtype),
                                  TrainingConfig(checkpoint=policy, **config))
    measured, after_forward, flops = _real(family, policy, dtype, **config)
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=PEAK_TOLERANCE)
    if config.get("grad_accumulation", 1) == 1:
        # what is kept for backward: live bytes after the first forward, exactly. In bf16 the
        # forward still misses a local eager Python holds (schedule.py's known gap), so there
        # the policy's saving against no checkpointing is compared, exactly.
        forward_end = _forward_end(predicted)
        if dtype == torch.float32:
            assert forward_end == after_forward
        else:
            none = training_timeline(_analysis(family, dtype), TrainingConfig(**config))
            assert _forward_end(none) - forward_end == \
                _real(family, "none", dtype, **config)[1] - after_forward
    if dtype == torch.float32:
        assert predicted.recompute_flops == flops - _flops_without(family)
    return predicted, measured


def _forward_end(timeline) -> int:
    return [e for e in timeline.events if e.step == 0 and e.phase == "forward"][-1].total_bytes


POLICIES = ["none", "full", "every-2", "sqrt", "selective", "save-matmuls"]
CASES = [(f, p) for f in ("gpt2", "gpt2-unfused", "llama3-8b", "cs336-gpt2-xl") for p in POLICIES]
CASES += [("resnet-cnn", p) for p in ("full", "every-2", "sqrt", "save-matmuls")]


@pytest.mark.parametrize("family, policy", CASES)
def test_policy_matches_a_real_checkpointed_run(family, policy):
    predicted, measured = _check(family, policy)
    if policy != "none":
        assert predicted.recompute_flops > 0 or policy == "save-matmuls"


@pytest.mark.parametrize("policy", ["modules:layers.*.attention,layers.*.feed_forward",
                                    "modules:layers.*+save:linear",
                                    "per-block:full,selective,save-matmuls,none"])
def test_user_policies_match_a_real_run(policy):
    _check("llama3-8b", policy)


def test_bf16_and_gradient_accumulation():
    _check("llama3-8b", "full", torch.bfloat16)
    _check("gpt2", "every-2", grad_accumulation=2)


def test_checkpointing_lowers_the_activation_peak():
    """On a shape where activations dominate, full < save-matmuls < none, and selective saves
    the most on the written-out attention (the T x T scores)."""
    rows = {r.policy: r for r in compare(_analysis("gpt2-unfused"), POLICIES)}
    assert rows["full"].peak_bytes < rows["save-matmuls"].peak_bytes < rows["none"].peak_bytes
    assert rows["sqrt"].saved_activation_bytes < rows["full"].saved_activation_bytes
    assert rows["selective"].peak_bytes < rows["none"].peak_bytes
    assert rows["none"].recompute_flops == 0 and rows["save-matmuls"].recompute_flops == 0
    assert rows["full"].hardware_flops == rows["full"].model_flops + rows["full"].recompute_flops


def test_megatron_selective_recompute_on_the_gpt3_layer():
    """Korthikanti et al. 2022: a GPT-3 175B layer (h=12288, a=96, s=2048, b=1, 16-bit
    activations, 1-byte dropout masks) keeps sbh(34 + 5as/h) bytes for backward; recomputing
    the attention core (selective) leaves 34sbh. graphcost traces nanoGPT's unfused layer; the
    only other bytes are LayerNorm's fp32 mean and rstd (2 x 2 x 4 sb)."""
    s, b, h, a = 2048, 1, 12288, 96
    cfg = dict(n_embd=h, n_head=a, block_size=s, vocab_size=128, flash=False, dropout=0.1)

    def per_layer(policy):
        kept = []
        for n_layer in (1, 2):
            m, i = load("gpt2", batch=b, seq=s, with_targets=True, dtype=torch.bfloat16,
                        n_layer=n_layer, **cfg)
            t = training_timeline(analyze(m, i, device="a100-80gb"),  # fused dropout
                                  TrainingConfig(checkpoint=policy))
            kept.append(t.saved_activation_bytes)
        return kept[1] - kept[0]

    layernorm_stats = 2 * 2 * 4 * s * b
    assert per_layer("none") == s * b * h * (34 + 5 * a * s / h) + layernorm_stats
    assert per_layer("selective") == 34 * s * b * h + layernorm_stats


@pytest.mark.parametrize("family, dtype", [("llama3-8b", torch.float32),
                                           ("llama3-8b", torch.bfloat16),
                                           ("gpt2-unfused", torch.float32),
                                           ("cs336-gpt2-xl", torch.bfloat16)])
def test_recompute_decomposition_matches_walks_of_random_mixes(family, dtype):
    """bf16 matters: its RMSNorm saves an fp32 copy, not the block input, so whether a block's
    input is kept depends on the next block's option (its checkpoint frame keeps it)."""
    a = _analysis(family, dtype)
    g = a.graph
    ops = op_nodes(g)
    options = _applicable(g, ops)
    model = _Decomposition(g, ops, main_blocks(g, ops), _walks(a, TrainingConfig(), options))
    rng = random.Random(0)
    for _ in range(12):
        choice = tuple(rng.choice(options) for _ in range(4))
        walk = training_timeline(a, TrainingConfig(checkpoint=per_block_spec(choice)))
        assert model.peak(choice) == walk.peak_bytes, choice


def test_optimize_finds_the_least_recompute_under_the_budget():
    a = _analysis("gpt2")
    rows = {r.policy: r for r in compare(a, POLICIES)}
    budget = (rows["full"].peak_bytes + rows["none"].peak_bytes) / 2
    found = optimize(a, budget, policies=POLICIES)
    assert found.row.peak_bytes <= budget
    assert found.row.recompute_flops <= found.best_builtin.recompute_flops
    # exhaustive check of the 4^4 mixes
    best = min((training_timeline(a, TrainingConfig(checkpoint=per_block_spec(c))))
               .recompute_flops for c in _mixes(_applicable(a.graph, op_nodes(a.graph)), 4)
               if training_timeline(a, TrainingConfig(checkpoint=per_block_spec(c))).peak_bytes
               <= budget)
    assert found.row.recompute_flops == best


def _mixes(options, n):
    if n == 0:
        yield ()
        return
    for rest in _mixes(options, n - 1):
        for o in options:
            yield rest + (o,)


def test_optimize_says_when_nothing_fits():
    a = _analysis("gpt2")
    found = optimize(a, 1000.0, policies=POLICIES)
    assert found.row is None and found.best_builtin is None
    assert found.smallest.peak_bytes > 1000


def test_policy_specs():
    assert parse_policy("every-4").every == 4
    assert parse_policy("per-block:full*2,none").per_block == ("full", "full", "none")
    assert per_block_spec(("full", "full", "none")) == "per-block:full*2,none"
    assert set(BUILTIN_POLICIES) >= {"none", "full", "sqrt", "selective", "save-matmuls"}
    for bad in ("everything", "every-0", "modules:", "per-block:fast"):
        with pytest.raises(ConfigError):
            parse_policy(bad)
    with pytest.raises(ConfigError):
        TrainingConfig(checkpoint="bogus")


def test_blocks_and_regions_are_found():
    g = _analysis("llama3-8b").graph
    assert main_blocks(g) == [f"layers.{i}" for i in range(4)]
    assert [r.modules for r in plan(g, "sqrt").regions] == [("layers.0", "layers.1"),
                                                            ("layers.2", "layers.3")]
    assert [r.name for r in plan(g, "every-2").regions] == ["layers.0", "layers.2"]
    assert len(plan(g, "selective").regions) == 4
    with pytest.raises(ConfigError, match="no attention"):
        plan(_analysis("resnet-cnn").graph, "selective")
    with pytest.raises(ConfigError, match="no module call matches"):
        plan(g, "modules:decoder.*")
