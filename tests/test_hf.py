"""Hugging Face models from a config (graphcost.hf): `graphcost <verb> hf:CONFIG` on tiny
configs of eight architectures, each checked against PyTorch's own measurements of the same
transformers model: FlopCounterMode on the meta device, the model's own parameters, and what
autograd saves on a real CPU run."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from graphcost import analyze
from graphcost.cli.main import main
from graphcost.load.hf import load_hf
from validation.groundtruth import measure_flops, measure_saved_bytes

transformers = pytest.importorskip("transformers")

B, T = 2, 16  # the shape every check runs at
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 100, "intermediate_size": 128,
        "num_attention_heads": 4, "max_position_embeddings": 128, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0}


def tiny_configs() -> dict:
    tf = transformers
    return {
        "gpt2": tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=128,
                              bos_token_id=1, eos_token_id=2),
        "llama": tf.LlamaConfig(**TINY, num_key_value_heads=2),
        "mistral": tf.MistralConfig(**TINY, num_key_value_heads=2),
        "qwen2": tf.Qwen2Config(**TINY, num_key_value_heads=2),
        "mixtral": tf.MixtralConfig(**TINY, num_key_value_heads=2, num_local_experts=4,
                                    num_experts_per_tok=2),
        "bert": tf.BertConfig(**TINY),
        "t5": tf.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                          num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                          eos_token_id=1),
        "vit": tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, image_size=32, patch_size=8, num_labels=10),
    }


ARCHS = list(tiny_configs())


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for name, config in tiny_configs().items():
        config.save_pretrained(root / name)  # root/name/config.json
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


_ANALYZED: dict[str, dict] = {}


def analyzed(capsys, configs, arch: str) -> dict:
    """`graphcost analyze hf:<dir> --batch 2 --seq 16 --json`, once per architecture."""
    if arch not in _ANALYZED:
        _ANALYZED[arch] = run_json(capsys, "analyze", f"hf:{configs / arch}", "--batch", str(B),
                                   "--seq", str(T))
    return _ANALYZED[arch]


# ---------------------------------------------------------------- figures against PyTorch


@pytest.mark.parametrize("arch", ARCHS)
def test_analyze_matches_flop_counter_and_parameters(capsys, configs, arch):
    got = analyzed(capsys, configs, arch)
    built = load_hf(str(configs / arch), batch=B, seq=T)  # the same model, on meta
    forward, backward = measure_flops(built.module, built.inputs)
    hf_params = sum(p.numel() for p in built.module.hf_model.parameters())
    assert (got["forward_flops"], got["backward_flops"]) == (forward, backward)
    assert forward > 0 and backward > 0
    assert got["params"] == hf_params
    assert (got["model"], got["batch"], got["seq"]) == (arch, B, T)


@pytest.mark.parametrize("arch", [
    a for a in ARCHS])
def test_every_op_has_a_rule(capsys, configs, arch):
    assert analyzed(capsys, configs, arch)["unsupported_ops"] == {}


NO_DROPOUT = {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}


@pytest.mark.parametrize("arch, overrides", [
    ("gpt2", {}), ("bert", {}), ("t5", {}),  # attention dropout: SDPA's math path on the CPU
    ("gpt2", NO_DROPOUT), ("llama", {}), ("mixtral", {}), ("vit", {})])  # fused kernels
def test_saved_bytes_match_autograd_on_cpu(arch, overrides, configs):
    meta = load_hf(str(configs / arch), batch=B, seq=T, overrides=overrides)
    predicted = analyze(meta.module, meta.inputs, device="cpu").saved_activation_bytes
    torch.manual_seed(0)
    real = load_hf(str(configs / arch), batch=B, seq=T, device="cpu", overrides=overrides)
    assert predicted == measure_saved_bytes(real.module, real.inputs)


def test_experts_do_the_work_of_the_routed_tokens(configs):
    """Mixtral's experts run with balanced routing: N k (token, choice) pairs, each through one
    expert's SwiGLU (gate and up: D -> 2I, down: I -> D), 2 FLOPs per multiply-add."""
    built = load_hf(str(configs / "mixtral"), batch=B, seq=T)
    config = tiny_configs()["mixtral"]
    pairs, d, i = B * T * config.num_experts_per_tok, config.hidden_size, \
        config.intermediate_size
    experts = [r for r in analyze(built.module, built.inputs).ops
               if r.module_path == "model.layers.0.mlp.experts"]
    assert sum(r.forward_flops for r in experts) == 2 * pairs * (d * 2 * i + i * d)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_graphcost_sdpa_runs_as_transformers_sdpa(arch, configs):
    """The attention graphcost builds (masks skipped as in an eager run) is transformers' own
    SDPA path on these inputs: the same loss and the same saved tensors on a real CPU run."""
    runs = []
    for overrides in ({}, {"attn_implementation": "sdpa"}):
        torch.manual_seed(0)
        real = load_hf(str(configs / arch), batch=B, seq=T, device="cpu", overrides=overrides)
        real.module.eval()  # no dropout: the two runs draw the same weights, not the same masks
        runs.append((real.module(*real.inputs).item(),
                     measure_saved_bytes(real.module, real.inputs)))
    assert runs[0] == runs[1]


# ---------------------------------------------------------------- every verb


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_memory_checkpoint_roofline_fit_accept_hf_models(capsys, configs, arch):
    model = f"hf:{configs / arch}"
    shape = ("--batch", str(B), "--seq", str(T))
    memory = run_json(capsys, "memory", model, *shape)
    assert memory["peak_bytes"] > memory["saved_activation_bytes"] > 0
    inference = run_json(capsys, "memory", model, "--inference", *shape)
    assert inference["kv_cache_bytes_per_token"] > 0
    code, out, err = run(capsys, "checkpoint", model, *shape)
    assert code == 0, err
    assert "full" in out and "every-2" in out  # the policies over the model's layers apply
    roofline = run_json(capsys, "roofline", model, *shape, "--device", "a100-80gb")
    assert roofline["step_time_s"] > 0
    fit = run_json(capsys, "fit", model, "--seq", str(T), "--device", "a100-80gb")
    assert fit["max_batch"] > 1


def test_fit_image_model(capsys, configs):
    """ViT's step at batch 1 runs other events (its (1, T, d) position embeddings' gradient is
    summed over the batch only from B = 2): fit checks batch 1 alone and extrapolates from 2
    and 3. The answer is checked with timelines traced at it and one past it."""
    from graphcost.hardware.devices import Device
    from graphcost.passes.memory.timeline import training_timeline
    from graphcost.sizing.fit import fit

    def loader(batch, seq, training):
        model = load_hf(str(configs / "vit"), batch=batch, seq=seq, targets=training)
        return model.module, model.inputs

    def train_peak(batch):
        return training_timeline(analyze(*loader(batch, 32, True))).peak_bytes

    one, two = (training_timeline(analyze(*loader(b, 32, True))) for b in (1, 2))
    assert len(one.table) != len(two.table)  # what made the old extrapolation impossible
    budget = train_peak(6) + 1000
    device = Device("tiny", "cpu", memory_bytes=budget + 100, bandwidth_bytes_per_s=1.0)
    r = fit(loader, device=device, seq=32, model_max_seq=None, reserve_bytes=100)
    assert r.train_max_batch == 6 and train_peak(7) > budget
    device = Device("tiny", "cpu", memory_bytes=train_peak(1) + 100, bandwidth_bytes_per_s=1.0)
    assert fit(loader, device=device, seq=32, model_max_seq=None,
               reserve_bytes=100).train_max_batch == 1
    assert run_json(capsys, "fit", f"hf:{configs / 'vit'}", "--device", "a100-80gb")[
        "max_batch"] > 1


# ---------------------------------------------------------------- options


def test_config_file_seq_default_and_module_paths(capsys, configs):
    got = run_json(capsys, "analyze", f"hf:{configs / 'gpt2' / 'config.json'}")
    assert (got["model"], got["batch"], got["seq"]) == ("gpt2", 1, 128)  # n_positions
    assert {"transformer", "lm_head"} <= {row["key"] for row in got["modules"]}  # its paths


def test_set_overrides_config_fields(capsys, configs):
    got = run_json(capsys, "analyze", f"hf:{configs / 'llama'}", "--seq", str(T),
                   "--set", "num_hidden_layers=3", "--set", "intermediate_size=96")
    config = tiny_configs()["llama"]
    config.num_hidden_layers, config.intermediate_size = 3, 96
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert got["params"] == sum(p.numel() for p in model.parameters())


def test_image_model_seq_is_the_image_size(capsys, configs):
    got = run_json(capsys, "analyze", f"hf:{configs / 'vit'}", "--seq", "64")
    built = load_hf(str(configs / "vit"), seq=64)
    assert built.inputs[0].shape == (1, 3, 64, 64)
    assert got["seq"] == 64 and got["tokens"] is None
    assert got["params"] == sum(p.numel() for p in built.module.hf_model.parameters())


# ---------------------------------------------------------------- errors: exit 2, one message


@pytest.mark.parametrize("spec, argv, message", [
    ("hf:no/such/dir", (), "not found; give hf:path/to/config.json"),
    ("hf:", (), "no config named"),
    ("hf:{root}", (), "no config.json in the directory"),
    ("hf:{root}/llama", ("--set", "num_hidden_layer=3"), "no such field"),
    ("hf:{root}/gpt2", ("--seq", "4096"), "beyond the gpt2 config's"),
    ("hf:{root}/bad", (), "cannot read the Hugging Face config"),
])
def test_user_errors_exit_2_with_one_message(capsys, configs, spec, argv, message):
    (configs / "bad").mkdir(exist_ok=True)
    (configs / "bad" / "config.json").write_text('{"model_type": "no-such-model"}')
    code, out, err = run(capsys, "analyze", spec.format(root=configs), *argv)
    assert code == 2 and out == ""
    assert err.startswith("graphcost: error: ") and message in err
    assert "Traceback" not in err


def test_missing_transformers_says_what_to_install(capsys, configs, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    code, _, err = run(capsys, "analyze", f"hf:{configs / 'gpt2'}")
    assert code == 2 and "pip install 'graphcost[hf]'" in err


def test_mixtral_from_config_reports_active_params(configs):
    """transformers' Mixtral stacks its experts in one tensor per projection (E x 2I x D): the
    active parameters per token are the non-expert ones plus k/E of the expert ones, counted
    here from the module's own named parameters."""
    from graphcost.passes.experts import moe_summary

    built = load_hf(str(configs / "mixtral"), batch=B, seq=T)
    summary = moe_summary(analyze(built.module, built.inputs))
    config = tiny_configs()["mixtral"]
    named = dict(built.module.named_parameters())
    experts = sum(p.numel() for n, p in named.items() if ".experts." in n)
    total = sum(p.numel() for p in named.values())
    k, e = config.num_experts_per_tok, config.num_local_experts
    assert summary is not None and summary.total_params == total
    assert (summary.layers[0].n_experts, summary.layers[0].top_k) == (e, k)
    assert summary.active_params == total - experts + experts * k // e
