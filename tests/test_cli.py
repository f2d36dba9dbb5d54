"""The command line, run in-process: JSON figures against PyTorch's own measurements
(FlopCounterMode, the module's parameters), the text report, and every user error as one
message with exit status 2."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from graphcost.models import load

from graphcost.cli.main import main
from graphcost.hardware.devices import PRESETS
from graphcost.rules import REGISTRY
from validation.groundtruth import measure_flops

SMALL_GPT2 = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=100, block_size=32)
REQUIRED_KEYS = {"model", "device", "params", "trainable_params", "weight_bytes",
                 "forward_flops", "backward_flops", "saved_activation_bytes", "unsupported_ops",
                 "modules", "ops", "batch", "seq", "dtype", "tokens"}

MODEL_FILE = '''
import torch
from torch import nn
from graphcost.models import load

SMALL_GPT2 = {small!r}


def small_gpt2(batch=1, seq=16):
    return load("gpt2", batch=batch, seq=seq, with_targets=True, **SMALL_GPT2)


def noisy():
    print("building the model")  # must not corrupt --json
    return load("gpt2", batch=2, seq=8, with_targets=True, **SMALL_GPT2)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        y = self.proj(x)
        if y.sum() > 0:  # data-dependent: cannot be traced
            return y * 2
        return y


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()

    def forward(self, x):
        return self.inner(x)


def branchy():
    return Wrapper(), (torch.empty(2, 8),)


class Cumulative(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return torch.lgamma(self.proj(x))


def cumulative():
    return Cumulative(), (torch.empty(2, 8),)


def not_a_pair():
    return nn.Linear(8, 8)


def raises():
    raise RuntimeError("weights not found")
'''


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "my_models.py"
    path.write_text(MODEL_FILE.format(small=SMALL_GPT2))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)  # exactly one JSON object: json.loads rejects anything after it


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- figures against PyTorch


@pytest.mark.parametrize("batch, seq", [(1, 16), (3, 8)])
def test_file_model_json_matches_flop_counter(capsys, model_file, batch, seq):
    out = run_json(capsys, "analyze", f"{model_file}:small_gpt2", "--batch", batch, "--seq", seq)
    assert REQUIRED_KEYS <= out.keys()
    module, inputs = load("gpt2", batch=batch, seq=seq, with_targets=True, **SMALL_GPT2)
    assert (out["forward_flops"], out["backward_flops"]) == measure_flops(module, inputs)
    assert out["params"] == out["trainable_params"] == n_params(module)
    assert (out["batch"], out["seq"], out["tokens"], out["dtype"]) == (batch, seq, batch * seq,
                                                                       "fp32")
    assert out["unsupported_ops"] == {}
    assert [m["key"] for m in out["modules"] if m["key"].startswith("h.")] == ["h.0", "h.1"]


ZOO_CASES = [
    # name, CLI options, load() arguments
    ("gpt2", ["--seq", "16"], dict(seq=16)),
    ("llama3-8b", ["--seq", "32", "--batch", "2", "--set", "n_layers=2"],
     dict(seq=32, batch=2, n_layers=2)),
    ("llama-7b", ["--seq", "16", "--dtype", "bf16", "--set", "n_layers=2"],
     dict(seq=16, dtype=torch.bfloat16, n_layers=2)),
    ("cs336-gpt2-xl", ["--seq", "16", "--no-targets", "--set", "n_layers=2"],
     dict(seq=16, with_targets=False, n_layers=2)),
    ("resnet-cnn", ["--seq", "32", "--batch", "2"], dict(seq=32, batch=2)),
]


@pytest.mark.parametrize("name, options, load_args", ZOO_CASES, ids=[c[0] for c in ZOO_CASES])
def test_zoo_model_json_matches_flop_counter(capsys, name, options, load_args):
    out = run_json(capsys, "analyze", name, *options)
    assert REQUIRED_KEYS <= out.keys()
    load_args = {"with_targets": True, **load_args}
    module, inputs = load(name, **load_args)
    assert (out["forward_flops"], out["backward_flops"]) == measure_flops(module, inputs)
    assert out["params"] == n_params(module)
    assert out["model"] == name and out["device"] == "cpu"
    batch, seq = load_args.get("batch", 1), load_args["seq"]
    assert (out["batch"], out["seq"]) == (batch, seq)
    assert out["tokens"] == (None if name == "resnet-cnn" else batch * seq)
    assert out["dtype"] == ("bf16" if load_args.get("dtype") == torch.bfloat16 else "fp32")


def test_shipped_example_file(capsys):
    example = Path(__file__).resolve().parent.parent / "examples" / "mlp.py"
    out = run_json(capsys, "analyze", f"{example}:factory", "--batch", "64")
    namespace = runpy.run_path(str(example))
    with torch.device("meta"):
        module, inputs = namespace["factory"](batch=64)
    assert (out["forward_flops"], out["backward_flops"]) == measure_flops(module, inputs)
    assert out["params"] == n_params(module)
    assert out["tokens"] is None and out["batch"] == 64


def test_file_model_dtype_casts_parameters(capsys, model_file):
    out = run_json(capsys, "analyze", f"{model_file}:small_gpt2", "--dtype", "bf16")
    module, _ = load("gpt2", **SMALL_GPT2)
    assert out["dtype"] == "bf16"
    assert out["weight_bytes"] == n_params(module) * torch.bfloat16.itemsize


def test_gpu_device_preset(capsys, model_file):
    out = run_json(capsys, "analyze", f"{model_file}:small_gpt2", "--device", "h100-sxm")
    assert out["device"] == "h100-sxm"
    module, inputs = load("gpt2", seq=16, with_targets=True, **SMALL_GPT2)
    assert (out["forward_flops"], out["backward_flops"]) == measure_flops(module, inputs)


def test_json_stays_one_object_when_the_factory_prints(capsys, model_file):
    code, out, err = run(capsys, "analyze", f"{model_file}:noisy", "--json")
    assert code == 0
    assert json.loads(out)["tokens"] == 2 * 8
    assert "building the model" in err


def test_depth_option_reaches_json(capsys, model_file):
    out = run_json(capsys, "analyze", f"{model_file}:small_gpt2", "--depth", "1")
    assert "h" in {m["key"] for m in out["modules"]}
    assert not any(m["key"].startswith("h.") for m in out["modules"])


# ---------------------------------------------------------------- the text report


def test_text_report(capsys, model_file):
    batch, seq = 2, 16
    code, out, err = run(capsys, "analyze", f"{model_file}:small_gpt2", "--batch", batch,
                         "--seq", seq, "--top", "3")
    assert code == 0, err
    module, inputs = load("gpt2", batch=batch, seq=seq, with_targets=True, **SMALL_GPT2)
    forward, backward = measure_flops(module, inputs)
    assert f"{n_params(module):,}" in out
    assert f"({forward:,})" in out and f"({backward:,})" in out
    per_token = (forward + backward) / (batch * seq)
    assert 1e3 <= per_token < 1e6
    assert f"{per_token / 1e3:.2f} KFLOP per token" in out
    for name in ("wte", "h.0", "h.1", "ln_f", "lm_head", "aten.linear.default"):
        assert name in out
    assert "top 3 of" in out
    assert "UNSUPPORTED" not in out


def test_zoo_text_report_defaults(capsys):
    code, out, err = run(capsys, "analyze", "gpt2", "--seq", "8", "--set", "n_layer=1")
    assert code == 0, err
    assert "graphcost: gpt2 on cpu, fp32" in out
    assert "(1, 8) int64" in out and "= 8 tokens" in out


def test_unsupported_op_is_listed_and_warned_once(capsys, model_file):
    assert REGISTRY.lookup(torch.ops.aten.lgamma.default) is None  # else pick another op
    code, out, err = run(capsys, "analyze", f"{model_file}:cumulative")
    assert code == 0
    assert "UNSUPPORTED OPS" in out and "aten.lgamma.default (x1)" in out
    assert err.count("aten.lgamma.default") == 1
    out = run_json(capsys, "analyze", f"{model_file}:cumulative")
    assert out["unsupported_ops"] == {"aten.lgamma.default": 1}


def test_devices(capsys):
    code, out, err = run(capsys, "devices")
    assert code == 0
    for name in PRESETS:
        assert name in out
    out = run_json(capsys, "devices")
    h100 = next(d for d in out["devices"] if d["name"] == "h100-sxm")
    assert h100["bandwidth_bytes_per_s"] == PRESETS["h100-sxm"].bandwidth_bytes_per_s
    assert h100["peak_flops_per_s"]["bf16"] == PRESETS["h100-sxm"].peak_flops_per_s[
        torch.bfloat16]


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "graphcost", "models"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "llama-7b" in done.stdout.split()


# ---------------------------------------------------------------- user errors: one message, exit 2


def assert_one_error(code, out, err, *fragments):
    assert code == 2
    assert out == ""
    assert err.startswith("graphcost: error: ")
    assert err.count("graphcost: error:") == 1
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_unknown_model_suggests_the_closest(capsys):
    assert_one_error(*run(capsys, "analyze", "lama-7b"), "'lama-7b'", "Did you mean 'llama-7b'")


def test_unknown_device(capsys):
    assert_one_error(*run(capsys, "analyze", "gpt2", "--device", "h100"), "unknown device 'h100'",
                     "h100-sxm")


def test_bad_dtype(capsys):
    assert_one_error(*run(capsys, "analyze", "gpt2", "--dtype", "fp8"), "'fp8'", "--dtype",
                     "fp32, bf16, fp16")


@pytest.mark.parametrize("options, fragment", [
    (["--seq", "5000"], "seq=5000"),
    (["--set", "n_lyer=2"], "n_layer"),
    (["--batch", "0"], "--batch"),
    (["--top", "many"], "--top"),
])
def test_bad_shape_or_option(capsys, options, fragment):
    assert_one_error(*run(capsys, "analyze", "gpt2", *options), fragment)


def test_missing_file(capsys, tmp_path):
    missing = tmp_path / "nowhere.py"
    assert_one_error(*run(capsys, "analyze", f"{missing}:factory"), str(missing), "not found")


def test_missing_factory_lists_the_functions(capsys, model_file):
    assert_one_error(*run(capsys, "analyze", f"{model_file}:build"), "'build'", "small_gpt2")
    assert_one_error(*run(capsys, "analyze", str(model_file)), "FACTORY", "small_gpt2")


def test_factory_returning_the_wrong_thing(capsys, model_file):
    assert_one_error(*run(capsys, "analyze", f"{model_file}:not_a_pair"), "not_a_pair()",
                     "(module, example_inputs)")


def test_factory_that_raises(capsys, model_file):
    line = MODEL_FILE.splitlines().index('    raise RuntimeError("weights not found")') + 1
    assert_one_error(*run(capsys, "analyze", f"{model_file}:raises"), "weights not found",
                     f"{model_file}:{line}")


def test_batch_for_a_factory_without_that_parameter(capsys, model_file):
    assert_one_error(*run(capsys, "analyze", f"{model_file}:cumulative", "--seq", "4"), "--seq",
                     "'seq'")


def test_untraceable_model_names_module_and_line(capsys, model_file):
    line = MODEL_FILE.splitlines().index("        if y.sum() > 0:  # data-dependent: cannot be "
                                         "traced") + 1
    # --strict: without it, inner is one opaque op (tests/test_trace_fallback.py)
    assert_one_error(*run(capsys, "analyze", f"{model_file}:branchy", "--strict"), "cannot trace",
                     "in module inner (Branchy)", f"{model_file}:{line}", "if y.sum() > 0")


def test_strict_with_an_op_without_rule(capsys, model_file):
    assert REGISTRY.lookup(torch.ops.aten.lgamma.default) is None  # else pick another op
    assert_one_error(*run(capsys, "analyze", f"{model_file}:cumulative", "--strict"),
                     "aten.lgamma.default", "register_rule")


def test_no_verb_prints_help(capsys):
    code, out, err = run(capsys)
    assert code == 2 and "analyze" in err


def test_help_mentions_gpu_presets(capsys):
    code, out, err = run(capsys, "analyze", "--help")
    assert code == 0
    assert "h100-sxm" in out and "file.py:factory" in " ".join(out.split())


# ---------------------------------------------------------------- one vocabulary (docs/cli.md)

SMALL_SET = [arg for k, v in SMALL_GPT2.items() for arg in ("--set", f"{k}={v}")]


@pytest.mark.parametrize("verb", ["analyze", "memory", "checkpoint"])
def test_dtype_is_precision_on_every_verb(capsys, verb):
    """--dtype is an alias of --precision: the same option, accepted wherever a model loads."""
    by_dtype = run_json(capsys, verb, "gpt2", *SMALL_SET, "--seq", "16", "--dtype", "bf16")
    by_precision = run_json(capsys, verb, "gpt2", *SMALL_SET, "--seq", "16", "--precision",
                            "bfloat16")
    assert by_dtype == by_precision and by_dtype["dtype"] == "bf16"


def test_precision_takes_fp16_and_bf16_mixed_on_every_verb(capsys):
    half = run_json(capsys, "memory", "gpt2", *SMALL_SET, "--seq", "16", "--precision", "fp16")
    assert (half["dtype"], half["precision"]) == ("fp16", "fp16")
    mixed = run_json(capsys, "analyze", "gpt2", *SMALL_SET, "--seq", "16", "--dtype",
                     "bf16-mixed")
    fp32 = run_json(capsys, "analyze", "gpt2", *SMALL_SET, "--seq", "16")
    assert mixed["dtype"] == "fp32" and mixed["params"] == fp32["params"]
    assert mixed["saved_activation_bytes"] != fp32["saved_activation_bytes"]  # bf16 copies


def test_bad_precision_names_both_spellings(capsys):
    assert_one_error(*run(capsys, "memory", "gpt2", "--precision", "fp8"), "'fp8'",
                     "--precision/--dtype", "fp32, bf16, fp16 or bf16-mixed")


def test_reserve_defaults_to_2gib_on_every_verb(capsys):
    fit = run_json(capsys, "fit", "gpt2", *SMALL_SET, "--device", "a100-80gb")
    check = run_json(capsys, "checkpoint", "gpt2", *SMALL_SET, "--seq", "16", "--device",
                     "a100-80gb")
    assert fit["reserve_bytes"] == 2 * 2**30
    assert check["budget_bytes"] == fit["budget_bytes"] == PRESETS["a100-80gb"].memory_bytes \
        - 2 * 2**30


def test_top_zero_lists_every_row(capsys):
    code, out, _ = run(capsys, "analyze", "gpt2", *SMALL_SET, "--seq", "16", "--top", "0")
    assert code == 0
    shown, total = out.split("top ", 1)[1].split(" ops", 1)[0].split(" of ")
    assert shown == total
