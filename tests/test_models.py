"""The model zoo: published parameter counts, small real forward/backward runs, errors."""

import math
import time

import pytest
import torch
from graphcost.models import (
    GPT2Config,
    LlamaConfig,
    UnknownModelError,
    build_model,
    example_inputs,
    get_config,
    list_models,
    load,
)
from graphcost.models.llama import apply_rope, precompute_rope


def n_params(model):
    return sum(p.numel() for p in model.parameters())  # PyTorch counts tied params once


# Published counts (shared/reference/models.md).
PUBLISHED_PARAMS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
    "llama-65b": 65_285_660_672,
    "llama2-7b": 6_738_415_616,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3-405b": 405_853_388_800,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_published_param_count(name):
    assert n_params(build_model(name)) == PUBLISHED_PARAMS[name]


def test_gpt2_param_count_without_position_embedding():
    for name, without_wpe in [("gpt2", 123_653_376), ("gpt2-xl", 1_555_972_800)]:
        model = build_model(name)
        assert n_params(model) - model.wpe.weight.numel() == without_wpe


def test_nanogpt_bias_free_gpt2_breakdown():
    model = build_model("gpt2", bias=False)
    assert model.wte.weight.numel() == 38_597_376
    assert model.wpe.weight.numel() == 786_432
    assert all(n_params(block) == 7_079_424 for block in model.h)
    assert n_params(model.ln_f) == 768
    assert n_params(model) == 124_337_664


def test_cs336_transformer_lm_param_count():
    vocab, ctx, L, d, d_ff = 50257, 1024, 48, 1600, 6400
    per_layer = 4 * d * d + 2 * d * d_ff + 2 * d  # q, k, v, out; w1, w2; two RMSNorm weights
    expected = vocab * d + ctx * d + L * per_layer + d + vocab * d  # untied head
    assert n_params(build_model("cs336-gpt2-xl")) == expected


def test_every_preset_builds_on_meta_without_allocating():
    assert len(list_models()) == len(set(list_models()))
    for name in list_models():
        model = build_model(name, dtype=torch.bfloat16)
        assert all(p.device.type == "meta" for p in model.parameters())
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_llama3_405b_builds_fast():
    build_model("llama-7b")  # warm up lazy initialisation
    start = time.perf_counter()
    build_model("llama3-405b")
    assert time.perf_counter() - start < 2.0


def test_gpt2_head_is_tied_to_embedding():
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model("gpt2", dtype=dtype)
        assert model.lm_head.weight is model.wte.weight
    untied = build_model("gpt2", tie_weights=False)
    assert untied.lm_head.weight is not untied.wte.weight
    assert n_params(untied) == PUBLISHED_PARAMS["gpt2"] + 50257 * 768


def test_llama3_8b_grouped_query_attention_shapes():
    cfg = get_config("llama3-8b")
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta) == (32, 8, 500000.0)
    head_dim = cfg.dim // cfg.n_heads
    attn = build_model("llama3-8b", n_layers=1).layers[0].attention
    assert attn.wq.weight.shape == (cfg.n_heads * head_dim, cfg.dim)
    assert attn.wk.weight.shape == (cfg.n_kv_heads * head_dim, cfg.dim)
    assert attn.wv.weight.shape == (cfg.n_kv_heads * head_dim, cfg.dim)
    assert attn.wo.weight.shape == (cfg.dim, cfg.n_heads * head_dim)


def test_llama_rope_buffers_are_non_persistent_tables():
    model = build_model("llama3-8b", n_layers=1)
    head_dim = 4096 // 32
    assert model.rope_cos.shape == model.rope_sin.shape == (8192, head_dim)
    assert not any(k.startswith("rope_") for k in model.state_dict())


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    hd = 8
    cos, sin = precompute_rope(hd, 32, 10000.0)
    q, k = torch.randn(hd), torch.randn(hd)

    def score(m, n):  # q at position m, k at position n
        x = torch.stack([q, k]).view(2, 1, 1, hd)  # (B, T=1, nh=1, hd)
        qm = apply_rope(x[:1], cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(x[1:], cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17))
    torch.testing.assert_close(score(0, 0), q @ k)


# Small real configs, one per family, run on the CPU.
SMALL = {
    "gpt2": dict(n_layer=2, n_head=2, n_embd=32, vocab_size=101, block_size=16),
    "llama3-8b": dict(n_layers=2, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=101, max_seq_len=16),
    "cs336-gpt2-xl": dict(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=101, context_length=16),
    "resnet-cnn": dict(channels=(8, 16), blocks=(1, 1)),
}
LMS = ["gpt2", "llama3-8b", "cs336-gpt2-xl"]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_model_forward_and_backward(name):
    torch.manual_seed(0)
    model, (x, y) = load(name, batch=2, with_targets=True, device="cpu", **SMALL[name])
    logits = model(x)
    if name == "resnet-cnn":
        assert x.shape == (2, 3, 32, 32) and y.shape == (2,) and y.dtype == torch.int64
        assert logits.shape == (2, 10)
    else:
        assert x.shape == y.shape == (2, 16) and x.dtype == torch.int64
        assert logits.shape == (2, 16, 101)
    loss = model(x, y)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", LMS)
def test_language_models_are_causal(name):
    torch.manual_seed(0)
    model, (x,) = load(name, batch=1, seq=12, device="cpu", **SMALL[name])
    changed = x.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 101  # alter only the future of position 7
    torch.testing.assert_close(model(x)[:, :8], model(changed)[:, :8])


def test_llama_torch_rmsnorm_matches_hand_written():
    torch.manual_seed(0)
    ours, (x,) = load("llama3-8b", device="cpu", **SMALL["llama3-8b"])
    theirs = build_model("llama3-8b", device="cpu", use_torch_rmsnorm=True, **SMALL["llama3-8b"])
    assert isinstance(theirs.norm, torch.nn.RMSNorm)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), theirs(x))


def test_example_inputs_defaults():
    (x,) = example_inputs("gpt2")
    assert x.shape == (1, 1024) and x.dtype == torch.int64 and x.device.type == "meta"
    assert example_inputs("llama3-8b")[0].shape == (1, 2048)  # capped
    assert example_inputs("llama3-8b", seq=8192)[0].shape == (1, 8192)
    x, y = example_inputs(get_config("resnet-cnn"), batch=4, with_targets=True)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (4,)
    x, y = example_inputs("cs336-gpt2-xl", batch=3, seq=7, with_targets=True)
    assert x.shape == y.shape == (3, 7) and y.dtype == torch.int64


def test_load_on_meta_runs_forward():
    model, inputs = load("llama3-8b", n_layers=2, batch=2, seq=64, with_targets=True)
    loss = model(*inputs)
    assert loss.shape == () and loss.device.type == "meta"


def test_unknown_model_name_suggests_closest():
    with pytest.raises(UnknownModelError, match="Did you mean 'llama3-8b'") as info:
        build_model("llama3_8b")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert "gpt2-xl" in str(info.value)  # lists the known names
    with pytest.raises(KeyError):
        get_config("bert")
    with pytest.raises(ValueError):
        example_inputs("bert")


def test_bad_overrides_raise_clear_errors():
    with pytest.raises(ValueError, match="n_layers.*n_layer"):
        build_model("gpt2", n_layers=2)  # GPT-2 calls it n_layer
    with pytest.raises(ValueError, match="n_kv_heads"):
        build_model("llama3-8b", n_kv_heads=5)
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(n_layer=1, n_head=5, n_embd=32)
    with pytest.raises(ValueError, match="context length"):
        example_inputs("gpt2", seq=2048)


def test_get_config_returns_a_copy():
    cfg = get_config("llama3-8b")
    assert isinstance(cfg, LlamaConfig)
    cfg.n_layers = 1
    assert get_config("llama3-8b").n_layers == 32
    assert get_config("llama3-8b", n_layers=2).n_layers == 2
    assert math.isclose(get_config("llama-7b").rope_theta, 10000.0)
