"""The timeline of a deep stack derived from walks of shortened ones (passes/memory/stack.py) against
the walk of every block (training_timeline(..., derive=False)): the same events, byte for byte,
with the same nodes and module paths, and the same recompute, saved and kept figures. The full
walk is itself checked against real runs (tests/passes/test_schedule.py, test_checkpoint.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from graphcost.models import load

import graphcost.passes.memory.stack as stack
from graphcost import analyze
from graphcost.graph.build import op_nodes
from graphcost.passes.checkpoint.policy import main_blocks, module_calls
from graphcost.passes.memory.stack import derived_timeline
from graphcost.passes.memory.timeline import training_timeline
from graphcost.passes.memory.training import TrainingConfig

L = 12  # blocks: enough for every policy but sqrt to repeat (see test_sqrt_segments)
MODELS = {
    "gpt2": ("gpt2", dict(seq=32, n_layer=L, n_embd=64, n_head=4)),
    "gpt2-unfused": ("gpt2", dict(seq=32, n_layer=L, n_embd=64, n_head=4, flash=False)),
    "llama3": ("llama3-8b", dict(seq=32, n_layers=L, dim=128, n_heads=4, n_kv_heads=2,
                                 ffn_dim=256)),
    "mixtral": ("mixtral-8x7b", dict(seq=16, n_layers=L, dim=64, n_heads=4, n_kv_heads=2,
                                     ffn_dim=128)),
    "cs336": ("cs336-gpt2-xl", dict(seq=32, n_layers=L, d_model=64, n_heads=4, d_ff=128)),
}
POLICIES = ["none", "full", "every-2", "every-3", "selective", "save-matmuls",
            "modules:layers.*.attention,layers.*.feed_forward+save:linear",
            f"per-block:full*3,save-matmuls*{L - 3}",
            f"per-block:none,full*4,selective*{L - 7},full*2",
            f"per-block:full*{L // 2},none*{L - L // 2}"]
CONFIGS = [TrainingConfig(),
           TrainingConfig(optimizer="sgd-momentum", grad_accumulation=2, steps=1),
           TrainingConfig(optimizer="adam", optimizer_impl="foreach", set_to_none=False)]


@pytest.fixture(scope="module")
def analyses():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: analyze(*load(name, with_targets=True, **kw)) for k, (name, kw) in
                MODELS.items()}


@pytest.fixture(autouse=True)
def derive_small_stacks(monkeypatch):
    """Derive even where a 12-block stack would walk in full (the default saves too little)."""
    monkeypatch.setattr(stack, "MAX_WALKED_SHARE", 2.0)


def assert_same(derived, walked):
    a, b = derived.table, walked.table
    assert len(a) == len(b)
    assert np.array_equal(a.category_bytes, b.category_bytes)
    assert np.array_equal(a.step, b.step) and np.array_equal(a.phase, b.phase)
    assert a.node == b.node and a.op == b.op and a.module_path == b.module_path
    assert derived.peak == walked.peak
    for name in ("recompute_flops", "recompute_bytes", "saved_activation_bytes",
                 "optimizer_impl"):
        assert getattr(derived, name) == getattr(walked, name), name
    assert sorted(derived.recomputed_ops) == sorted(walked.recomputed_ops)
    assert derived.plan == walked.plan


def policies_of(model: str) -> list[str]:
    names = POLICIES
    if model.startswith("gpt2"):  # nanoGPT's module names
        names = [p.replace("attention", "attn").replace("feed_forward", "mlp")
                 .replace("layers.", "h.") for p in names]
    if model == "cs336":
        names = [p.replace("attention", "attn").replace("feed_forward", "ffn") for p in names]
    return names


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("k", range(len(POLICIES)))
def test_derived_equals_walk(analyses, model, k):
    analysis = analyses[model]
    policy = policies_of(model)[k]
    config = TrainingConfig(**{**CONFIGS[k % len(CONFIGS)].__dict__, "checkpoint": policy})
    derived = derived_timeline(analysis.graph, config)
    assert derived is not None, f"{policy} was not derived"
    assert_same(derived, training_timeline(analysis, config, derive=False))


@pytest.mark.parametrize("model", ["llama3", "gpt2-unfused"])
def test_kept_tensors(analyses, model):
    """What the decomposition and the parallel estimate read: the kept bytes by block, and
    (walking the whole graph on demand) the kept storages themselves."""
    analysis = analyses[model]
    config = TrainingConfig(checkpoint="full")
    derived = derived_timeline(analysis.graph, config)
    walked = training_timeline(analysis, config, derive=False)
    ops = op_nodes(analysis.graph)
    spans = module_calls(analysis.graph, ops)
    blocks = main_blocks(analysis.graph, ops)
    first = spans[blocks[0]][0]
    where = {n: -1 if k < first else L for k, n in enumerate(ops)}  # as the search has it
    where.update({n: i for i, b in enumerate(blocks) for n in ops[spans[b][0]:spans[b][1] + 1]})
    assert derived.kept_bytes_by_block(where, L) == walked.kept_bytes_by_block(where, L)
    assert derived.kept_storages == walked.kept_storages
    assert derived.kept_by == walked.kept_by


def test_used_by_default_on_deep_stacks():
    """training_timeline derives by default once the short walks cover little of the stack;
    a model traced block by block (no template) is walked in full."""
    module, inputs = load("gpt2", seq=16, n_layer=32, n_embd=32, n_head=2, with_targets=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copied = analyze(module, inputs)
        traced = analyze(module, inputs, reuse_blocks=False)
    config = TrainingConfig(checkpoint="selective")
    fast = training_timeline(copied, config)
    assert fast.block_kept_bytes is not None  # derived
    slow = training_timeline(traced, config)
    assert slow.block_kept_bytes is None  # walked
    assert np.array_equal(fast.table.category_bytes, slow.table.category_bytes)


def hf_config(name: str):
    tf = pytest.importorskip("transformers")
    tiny = dict(num_hidden_layers=8, hidden_size=64, vocab_size=100, intermediate_size=128,
                num_attention_heads=4, max_position_embeddings=64)
    return {
        "llama": lambda: tf.LlamaConfig(**tiny, num_key_value_heads=2),
        "mixtral": lambda: tf.MixtralConfig(**tiny, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2),
        "gpt2": lambda: tf.GPT2Config(n_layer=8, n_embd=64, n_head=4, vocab_size=100,
                                      n_positions=64),
        "bert": lambda: tf.BertConfig(**tiny),
        "vit": lambda: tf.ViTConfig(hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                                    intermediate_size=128, image_size=32, patch_size=8,
                                    num_labels=10),
        "t5": lambda: tf.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=8,
                                  num_heads=4, decoder_start_token_id=0, pad_token_id=0),
    }[name]()


@pytest.mark.parametrize("name", ["llama", "mixtral", "gpt2", "bert", "vit", "t5"])
def test_hugging_face_stacks(tmp_path, name):
    """transformers' own models. T5 has two stacks (encoder and decoder): the stack the trace
    copied is not the one the checkpoint policies use, so it is walked in full."""
    from graphcost.load.hf import load_hf

    hf_config(name).save_pretrained(tmp_path)
    model = load_hf(str(tmp_path), batch=2, seq=32 if name == "vit" else 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = analyze(model.module, model.inputs)
    for policy in ("none", "full", "save-matmuls", "every-2"):
        config = TrainingConfig(checkpoint=policy)
        derived = derived_timeline(analysis.graph, config)
        if name == "t5":
            assert derived is None
            continue
        assert derived is not None, policy
        assert_same(derived, training_timeline(analysis, config, derive=False))


def test_not_derived_when_blocks_differ():
    """A per-block mix that changes at every block has no run to derive: the whole stack is
    walked, and the answer is the same."""
    module, inputs = load("gpt2", seq=16, n_layer=L, n_embd=32, n_head=2, with_targets=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = analyze(module, inputs)
    mixed = "per-block:" + ",".join(["full", "none", "selective", "full", "save-matmuls", "none",
                                     "full", "full", "selective", "none", "save-matmuls", "full"])
    config = TrainingConfig(checkpoint=mixed)
    assert derived_timeline(analysis.graph, config) is None
    assert training_timeline(analysis, config).block_kept_bytes is None


@pytest.mark.parametrize("name,kw", [
    ("gpt2", dict(seq=16, n_layer=26, n_embd=32, n_head=2)),
    ("llama3-8b", dict(seq=16, n_layers=26, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128))])
def test_sqrt_segments(name, kw):
    """sqrt's regions span ceil(sqrt(26)) = 6 blocks: units of 6, a last segment of 2."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = analyze(*load(name, with_targets=True, **kw))
    for config in (TrainingConfig(checkpoint="sqrt"),
                   TrainingConfig(checkpoint="sqrt", grad_accumulation=2, steps=1)):
        assert_same(derived_timeline(analysis.graph, config),
                    training_timeline(analysis, config, derive=False))


def test_bf16_model_with_dropout():
    module, inputs = load("gpt2", seq=16, n_layer=L, n_embd=32, n_head=2, dropout=0.1,
                          with_targets=True, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = analyze(module, inputs)
    for policy in ("none", "selective", "full"):
        config = TrainingConfig(checkpoint=policy)
        assert_same(derived_timeline(analysis.graph, config),
                    training_timeline(analysis, config, derive=False))


def test_mixed_precision_on_a_cuda_device(monkeypatch):
    """Under autocast, for a GPU's kernels (foreach AdamW by default there), a per-block mix of
    all four options: three runs and literal blocks, four short walks."""
    monkeypatch.setattr(stack, "MAX_WALKED_SHARE", 4.0)
    module, inputs = load("llama3-8b", seq=16, n_layers=L, dim=64, n_heads=4, n_kv_heads=2,
                          ffn_dim=128, with_targets=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = analyze(module, inputs, device="h100-sxm", autocast=torch.bfloat16)
    for policy in ("none", "full", "per-block:none*4,selective*3,save-matmuls*3,full*2"):
        config = TrainingConfig(checkpoint=policy)
        derived = derived_timeline(analysis.graph, config)
        assert derived is not None, policy
        assert derived.optimizer_impl == "foreach"
        assert_same(derived, training_timeline(analysis, config, derive=False))
