"""`graphcost memory` and `graphcost fit`, run in-process: their JSON against the measured
peak of a real CPU run (graphcost.memtrack), the published KV figures and hand arithmetic on
the device budget; user errors exit 2 with one message."""

from __future__ import annotations

import json

import pytest
import torch
from graphcost.models import load

from graphcost.cli.main import main
from graphcost.hardware.devices import PRESETS
from tests.helpers import assert_user_error
from validation.memtrack import measure_training_peak

SMALL = ["--set", "n_layer=2", "--set", "n_embd=64", "--set", "n_head=4",
         "--set", "vocab_size=100", "--set", "block_size=32"]
SMALL_GPT2 = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=100, block_size=32)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_memory_json_matches_a_real_training_run(capsys, optimizer):
    code, out, _ = run(capsys, "memory", "gpt2", "--batch", "2", "--seq", "16", *SMALL,
                       "--optimizer", optimizer, "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result["peak_at"]) >= {"step", "phase", "op", "module"}
    assert set(result["breakdown_at_peak"]) == {"params", "grads", "optimizer_state",
                                                "activations", "transient"}
    assert sum(result["breakdown_at_peak"].values()) == result["peak_bytes"]
    torch.manual_seed(0)
    model, inputs = load("gpt2", batch=2, seq=16, with_targets=True, device="cpu", **SMALL_GPT2)
    measured = measure_training_peak(model, inputs, optimizer=optimizer)
    assert result["peak_bytes"] == pytest.approx(measured.peak_bytes, rel=0.01)
    assert result["peak_at"]["phase"] == measured.peak_phase


def test_memory_text_and_plot(capsys, tmp_path):
    png = tmp_path / "timeline.png"
    code, out, _ = run(capsys, "memory", "gpt2", "--seq", "16", *SMALL, "--plot", str(png))
    assert code == 0
    assert "peak" in out and "optimizer state" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_inference_kv_cache(capsys):
    """llama3-8b in bf16 keeps 128 KiB of K and V per token (../shared/reference/models.md)."""
    code, out, _ = run(capsys, "memory", "llama3-8b", "--inference", "--context", "64",
                       "--batch", "2", "--precision", "bf16", "--set", "n_layers=2", "--json")
    assert code == 0
    result = json.loads(out)
    per_token_two_layers = 128 * 1024 * 2 // 32
    assert result["kv_cache_bytes_per_token"] == per_token_two_layers
    assert result["breakdown_at_peak"]["kv_cache"] == per_token_two_layers * 2 * 64
    assert sum(result["breakdown_at_peak"].values()) == result["peak_bytes"]


def test_fit_json(capsys):
    code, out, _ = run(capsys, "fit", "gpt2", "--device", "rtx3090", "--seq", "32", *SMALL,
                       "--reserve", "1GiB", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["budget_bytes"] == PRESETS["rtx3090"].memory_bytes - 2**30
    assert result["max_batch"] == result["train_max_batch"] > result["infer_max_batch"] / 100
    assert result["max_seq"] == 32  # tiny model: the whole context fits, the model's limit


@pytest.mark.parametrize("argv, needle", [
    (["memory", "gpt2", "--optimizer", "lion"], "invalid choice"),
    (["memory", "gpt2", "--context", "8"], "--context"),
    (["memory", "gpt2", "--inference", "--plot", "x.png"], "--plot"),
    (["fit", "gpt2", "--device", "cpu"], "no memory size"),
    (["fit", "gpt2", "--device", "h100-sxm", "--reserve", "lots"], "--reserve"),
    (["fit", "gpt2", "--device", "h100-sxm", "--reserve", "100GiB"], "leaves nothing"),
    (["fit", "gpt2"], "--device"),
])
def test_user_errors_exit_2(capsys, argv, needle):
    assert_user_error(capsys, argv, needle)


def test_fit_a_model_without_tokens(capsys):
    """examples/mlp.py: batch only; the answer is the edge of what fits, checked by tracing."""
    from pathlib import Path

    from graphcost import analyze
    from graphcost.load.model import load_model
    from graphcost.passes.memory.timeline import training_timeline

    spec = str(Path(__file__).parents[1] / "examples" / "mlp.py") + ":factory"
    code, out, _ = run(capsys, "fit", spec, "--device", "l4", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["max_seq"] is None

    def peak(batch):
        m = load_model(spec, batch=batch)
        return training_timeline(analyze(m.module, m.inputs, device="l4")).peak_bytes

    assert peak(result["max_batch"]) <= result["budget_bytes"] < peak(result["max_batch"] + 1)


def test_memory_bf16_mixed_matches_a_real_autocast_run(capsys):
    code, out, _ = run(capsys, "memory", "gpt2", "--batch", "2", "--seq", "16", *SMALL,
                       "--precision", "bf16-mixed", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["precision"] == "bf16-mixed" and result["dtype"] == "fp32"
    torch.manual_seed(0)
    model, inputs = load("gpt2", batch=2, seq=16, with_targets=True, device="cpu", **SMALL_GPT2)
    measured = measure_training_peak(model, inputs, precision="bf16-mixed")
    assert result["peak_bytes"] == pytest.approx(measured.peak_bytes, rel=0.01)


def test_approximate_backward_is_said(capsys, tmp_path):
    """torch.cdist's matmul path, whose backward's temporaries are not modelled: the report and
    the JSON say the peak is approximate; a model without such ops says nothing."""
    from tests.helpers import run_cli

    factory = tmp_path / "cdist_model.py"
    factory.write_text(
        "import torch\nfrom torch import nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.centres = nn.Parameter(torch.randn(32, 8))\n"
        "    def forward(self, x):\n"
        "        return torch.cdist(x, self.centres).mean()\n"
        "def build():\n"
        "    return M(), (torch.empty(40, 8),)\n")
    code, out, err = run_cli(capsys, "memory", f"{factory}:build")
    assert code == 0 and "aten._euclidean_dist.default (x1)" in out and "approximate" in out
    code, out, _ = run_cli(capsys, "memory", f"{factory}:build", "--json")
    assert json.loads(out)["approximate_ops"] == {"aten._euclidean_dist.default": 1}
    code, out, _ = run_cli(capsys, "memory", "examples/mlp.py:factory", "--json")
    assert json.loads(out)["approximate_ops"] == {}
