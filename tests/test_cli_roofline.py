"""`graphcost roofline`, `cost` and `sweep`, run in-process.

The numbers are the roofline engine's (passes/roofline.py, tested in tests/passes/): here the CLI
must print exactly what the engine returns for the model it loads, order and cut the op table as
asked, do the cost arithmetic from the device's own peak, write one CSV row per combination, and
exit 2 with one message on user errors."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from graphcost import analyze
from graphcost.cli.main import main
from graphcost.hardware.devices import Device, save_device_file
from graphcost.load.model import load_model
from graphcost.passes.memory.training import TrainingConfig
from graphcost.passes.roofline import (
    Efficiency,
    compute_bound_batch,
    decode_time,
    forward_time,
    memory_bound_context,
    training_step_time,
)
from tests.helpers import assert_user_error

# 2 blocks; enough tokens (8 x 32) that activations, not the optimizer state, make the peak
GPT2 = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=100, block_size=64)
SMALL = [a for k, v in GPT2.items() for a in ("--set", f"{k}={v}")]
GPU = ["--device", "a100-80gb"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def engine_analysis(batch=8, seq=32, dtype=None, targets=True, autocast=None):
    """The analysis the CLI builds for the test model, built here the same way."""
    model = load_model("gpt2", batch=batch, seq=seq, dtype=dtype, targets=targets,
                       overrides=GPT2)
    return analyze(model.module, model.inputs, device="a100-80gb", model_name=model.name,
                   autocast=autocast)


def strict_json(d: dict) -> dict:
    """An engine dict as strict JSON carries it (an infinite intensity is null)."""
    return {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in d.items()}


def table_rows(out: str) -> list[list[str]]:
    """The per-op table's cells (the block under the header starting with 'name')."""
    lines = out.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("name ")) + 2
    rows = []
    for line in lines[start:]:
        if not line.strip() or line.startswith("..."):
            break
        rows.append(line.split())
    return rows


@pytest.mark.parametrize("extra, config, efficiency, dtype, autocast", [
    ([], TrainingConfig(), Efficiency(), None, None),
    (["--checkpoint", "full", "--grad-accumulation", "2", "--optimizer", "sgd",
      "--matmul-efficiency", "0.6", "--bandwidth-efficiency", "0.8", "--precision", "bf16"],
     TrainingConfig(checkpoint="full", grad_accumulation=2, optimizer="sgd"),
     Efficiency(matmul=0.6, bandwidth=0.8), "bf16", None),
    (["--precision", "bf16-mixed", "--vector-efficiency", "0.5"], TrainingConfig(),
     Efficiency(vector=0.5), "fp32", torch.bfloat16),
])
def test_roofline_json_is_the_engines(capsys, extra, config, efficiency, dtype, autocast):
    code, out, _ = run(capsys, "roofline", "gpt2", "--batch", "8", "--seq", "32", *SMALL, *GPU,
                       *extra, "--json")
    assert code == 0
    result = json.loads(out)
    step = training_step_time(engine_analysis(dtype=dtype, autocast=autocast), "a100-80gb",
                              config, efficiency)
    for key, value in step.totals().items():
        assert result[key] == value, key
    assert {"step_time_s", "mfu", "hfu", "tokens_per_s", "model_flops",
            "hardware_flops"} <= set(result)
    assert result["ops"] == [strict_json(o.as_dict()) for o in step.ops]  # all, not the top
    bound = step.seconds_by_bound()
    assert (result["compute_bound_s"], result["memory_bound_s"]) == (bound["compute"],
                                                                     bound["memory"])
    assert (result["batch"], result["seq"]) == (8, 32)
    if config.checkpoint == "full":
        assert result["recompute_s"] > 0 and result["hfu"] > result["mfu"]


def test_roofline_text_sorted_by_flops(capsys):
    step = training_step_time(engine_analysis(), "a100-80gb")
    flops = {(o.name, o.phase): o.flops for o in step.ops}
    code, out, _ = run(capsys, "roofline", "gpt2", "--batch", "8", "--seq", "32", *SMALL, *GPU,
                       "--sort", "flops", "--top", "7")
    assert code == 0
    for needle in ("step time", "forward", "backward", "recompute", "optimizer",
                   "MFU", "of the float32 dense matmul peak", "HFU", "tokens/s", "model FLOPs",
                   "hardware FLOPs", "bound"):
        assert needle in out, needle
    rows = table_rows(out)
    shown = [flops[(r[0], r[3])] for r in rows]
    assert len(shown) == 7
    assert shown == sorted(shown, reverse=True)
    assert shown == sorted(flops.values(), reverse=True)[:7]
    assert f"... {len(step.ops) - 7:,} more ops" in out


def test_roofline_top_0_shows_every_op_by_time(capsys):
    step = training_step_time(engine_analysis(), "a100-80gb")
    seconds = {(o.name, o.phase): o.seconds for o in step.ops}
    code, out, _ = run(capsys, "roofline", "gpt2", "--batch", "8", "--seq", "32", *SMALL, *GPU,
                       "--top", "0")
    assert code == 0
    shown = [seconds[(r[0], r[3])] for r in table_rows(out)]
    assert len(shown) == len(step.ops) and shown == sorted(shown, reverse=True)
    assert "more ops" not in out


def test_roofline_compute_bound_batch(capsys):
    code, out, _ = run(capsys, "roofline", "gpt2", "--batch", "4", "--seq", "32", *SMALL, *GPU,
                       "--compute-bound-batch", "--json")
    assert code == 0
    expected = compute_bound_batch(engine_analysis(batch=1), engine_analysis(batch=2),
                                   "a100-80gb", TrainingConfig())
    assert json.loads(out)["compute_bound_batch"] == expected


def test_roofline_inference(capsys):
    code, out, _ = run(capsys, "roofline", "gpt2", "--batch", "2", "--seq", "32", *SMALL, *GPU,
                       "--inference", "--context", "48", "--json")
    assert code == 0
    result = json.loads(out)
    one_token = engine_analysis(batch=2, seq=1, targets=False)
    prefill = forward_time(engine_analysis(batch=2, seq=32, targets=False), "a100-80gb")
    decode = decode_time(one_token, 48, "a100-80gb")
    assert result["prefill_s"] == prefill.step_time_s
    assert result["decode_s_per_token"] == decode.seconds_per_token
    assert result["decode_tokens_per_s"] == decode.tokens_per_s
    assert result["memory_bound_context"] == memory_bound_context(one_token, "a100-80gb")
    assert result["context"] == 48 and len(result["ops"]) == len(prefill.ops)

    code, out, _ = run(capsys, "roofline", "gpt2", "--batch", "2", "--seq", "32", *SMALL, *GPU,
                       "--inference")
    assert code == 0
    assert "prefill" in out and "per token at a context of 32" in out
    assert "decode is memory-bound" in out


def test_roofline_on_a_device_file(capsys, tmp_path):
    """A CPU measured by `graphcost calibrate` is a device file; the roofline runs on it."""
    path = tmp_path / "cpu.json"
    save_device_file(Device("my-cpu", "cpu", memory_bytes=16 * 2**30,
                            bandwidth_bytes_per_s=50e9,
                            peak_flops_per_s={torch.float32: 1e12},
                            vector_peak_flops_per_s={torch.float32: 2.5e11}), path)
    code, out, _ = run(capsys, "roofline", "gpt2", "--batch", "8", "--seq", "32", *SMALL,
                       "--device", str(path), "--json")
    assert code == 0
    result = json.loads(out)
    assert result["device"] == "my-cpu" and result["peak_flops_per_s"] == 1e12


def test_cost_json(capsys):
    argv = ["cost", "gpt2", "--batch", "8", "--seq", "32", *SMALL, *GPU, "--precision", "bf16",
            "--tokens", "1.4T", "--gpus", "64", "--usd-per-hour", "2", "--json"]
    code, out, _ = run(capsys, *argv, "--mfu", "0.4")
    assert code == 0
    cost = json.loads(out)
    analysis = engine_analysis(dtype="bf16")
    flops_per_token = (analysis.forward_flops + analysis.backward_flops) / (8 * 32)
    peak = 312e12  # A100 dense bf16 (../shared/reference/hardware.md)
    assert cost["tokens"] == 1.4e12 and cost["gpus"] == 64 and cost["params"] == analysis.params
    assert cost["mfu"] == 0.4 and cost["mfu_source"] == "assumed"
    assert cost["seconds"] == pytest.approx(1.4e12 * flops_per_token / (64 * peak * 0.4),
                                            rel=1e-12)
    assert cost["gpu_hours"] == pytest.approx(cost["seconds"] * 64 / 3600, rel=1e-12)
    assert cost["days"] == pytest.approx(cost["seconds"] / 86400, rel=1e-12)
    assert cost["usd"] == pytest.approx(cost["gpu_hours"] * 2, rel=1e-12)
    six = cost["6ND"]
    assert six["flops"] == 6 * analysis.params * 1.4e12
    assert six["seconds"] == pytest.approx(six["flops"] / (64 * peak * 0.4), rel=1e-12)

    code, out, _ = run(capsys, *argv)  # the roofline's MFU
    assert code == 0
    cost = json.loads(out)
    step = training_step_time(analysis, "a100-80gb")
    assert cost["mfu"] == step.mfu and cost["mfu_source"] == "predicted"
    assert cost["gpu_hours"] == pytest.approx(cost["seconds"] * 64 / 3600, rel=1e-12)


def test_cost_text(capsys):
    code, out, _ = run(capsys, "cost", "gpt2", "--batch", "8", "--seq", "32", *SMALL, *GPU,
                       "--tokens", "3e9", "--gpus", "8", "--usd-per-hour", "2.5")
    assert code == 0
    for needle in ("FLOPs/token", "x 6N", "predicted by the roofline", "graph", "6ND", "8ND",
                   "total FLOPs", "wall clock", "GPU-hours", "$"):
        assert needle in out, needle


def test_sweep_csv_plot_and_json(capsys, tmp_path):
    out_csv, png = tmp_path / "sweep.csv", tmp_path / "mfu.png"
    code, out, _ = run(capsys, "sweep", "gpt2", *SMALL, *GPU, "--batch", "1,8", "--seq",
                       "16,32", "--csv", str(out_csv), "--plot", str(png))
    assert code == 0
    assert "fits?" in out and f"csv: {out_csv}" in out
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["batch", "seq", "tokens", "step_time_s", "mfu", "hfu",
                             "tokens_per_s", "peak_bytes", "fits"]
    assert sorted((int(r["batch"]), int(r["seq"])) for r in rows) == [(1, 16), (1, 32),
                                                                      (8, 16), (8, 32)]
    assert all(int(r["tokens"]) == int(r["batch"]) * int(r["seq"]) for r in rows)
    assert all(r["fits"] == "true" for r in rows)  # a few MiB on an 80 GiB GPU
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same numbers as `roofline` and `memory` for one combination
    row = next(r for r in rows if (r["batch"], r["seq"]) == ("8", "32"))
    code, out, _ = run(capsys, "roofline", "gpt2", "--batch", "8", "--seq", "32", *SMALL, *GPU,
                       "--json")
    roof = json.loads(out)
    assert float(row["step_time_s"]) == roof["step_time_s"] and float(row["mfu"]) == roof["mfu"]
    code, out, _ = run(capsys, "memory", "gpt2", "--batch", "8", "--seq", "32", *SMALL, *GPU,
                       "--json")
    assert int(row["peak_bytes"]) == json.loads(out)["peak_bytes"]

    # a budget between the peaks: the larger shapes do not fit
    peaks = sorted(int(r["peak_bytes"]) for r in rows)
    assert peaks[0] < peaks[-1]
    budget = (peaks[0] + peaks[-1]) // 2
    code, out, _ = run(capsys, "sweep", "gpt2", *SMALL, *GPU, "--batch", "1,8", "--seq",
                       "16,32", "--budget", str(budget), "--json")
    assert code == 0
    result = json.loads(out)
    assert result["budget_bytes"] == budget and len(result["rows"]) == 4
    assert [r["fits"] for r in result["rows"]] == [r["peak_bytes"] <= budget
                                                   for r in result["rows"]]
    assert {r["fits"] for r in result["rows"]} == {True, False}


@pytest.mark.parametrize("argv, needle", [
    (["roofline", "gpt2", *SMALL], "run `graphcost calibrate`"),
    (["cost", "gpt2", *SMALL, "--tokens", "1e9"], "run `graphcost calibrate`"),
    (["sweep", "gpt2", *SMALL, "--batch", "1,2"], "run `graphcost calibrate`"),
    (["cost", "gpt2", *SMALL, *GPU, "--tokens", "1e9", "--mfu", "1.5"],
     "argument --mfu: expected a fraction in (0, 1]"),
    (["cost", "gpt2", *SMALL, *GPU, "--tokens", "0"], "argument --tokens"),
    (["cost", "gpt2", *SMALL, *GPU, "--tokens", "lots"], "argument --tokens"),
    (["cost", "gpt2", *SMALL, *GPU, "--tokens", "1e9", "--gpus", "0"], "argument --gpus"),
    (["sweep", "gpt2", *SMALL, *GPU, "--batch", "1,x"], "bad --batch '1,x'"),
    (["sweep", "gpt2", *SMALL, *GPU, "--seq", "16,,32"], "bad --seq '16,,32'"),
    (["roofline", "gpt2", *SMALL, *GPU, "--matmul-efficiency", "0"],
     "argument --matmul-efficiency"),
    (["roofline", "gpt2", *SMALL, *GPU, "--sort", "name"], "argument --sort"),
    (["roofline", "gpt2", *SMALL, *GPU, "--inference", "--checkpoint", "full"],
     "--checkpoint applies to training"),
    (["roofline", "gpt2", *SMALL, *GPU, "--inference", "--context", "65"],
     "--context 65 is beyond gpt2's context length 64"),
    (["roofline", "gpt2", *SMALL, *GPU, "--context", "16"], "--context is the cached context"),
    (["roofline", "resnet-cnn", *GPU, "--inference"], "does not take (batch, seq) token ids"),
])
def test_user_errors_exit_2(capsys, argv, needle):
    assert_user_error(capsys, argv, needle)


def test_cost_inference_is_the_forward_next_to_2nd(capsys):
    code, out, _ = run(capsys, "cost", "gpt2", *SMALL, *GPU, "--tokens", "1e9", "--inference",
                       "--mfu", "0.5", "--json")
    result = json.loads(out)
    assert code == 0 and result["kind"] == "inference"
    assert "2ND" in result and "6ND" not in result
    a = engine_analysis(targets=False, batch=1, seq=64)
    assert result["model_flops_per_token"] == a.forward_flops / 64
    assert result["seconds"] == pytest.approx(1e9 * result["model_flops_per_token"]
                                              / (result["peak_flops_per_s"] * 0.5))
