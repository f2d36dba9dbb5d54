"""The parallel-plan options of memory and fit, and `graphcost plan`, against the engine."""

from __future__ import annotations

import json

import pytest

from graphcost import analyze
from graphcost.cli.main import main
from graphcost.load.model import load_model
from graphcost.passes.parallel.plan import ParallelPlan, per_device_memory

SMALL = ["--set", "n_layers=4", "--set", "dim=64", "--set", "n_heads=4", "--set",
         "n_kv_heads=2", "--set", "vocab_size=100", "--set", "ffn_dim=96", "--set",
         "max_seq_len=64", "--seq", "32"]
OVERRIDES = dict(n_layers=4, dim=64, n_heads=4, n_kv_heads=2, vocab_size=100, ffn_dim=96,
                 max_seq_len=64)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _analysis(batch=1):
    m = load_model("llama3-8b", batch=batch, seq=32, dtype=None, targets=True,
                   overrides=OVERRIDES)
    return analyze(m.module, m.inputs, device="h100-sxm", model_name=m.name)


def test_memory_per_device_equals_the_engine(capsys):
    code, out, _ = run(capsys, "memory", "llama3-8b", *SMALL, "--device", "h100-sxm",
                       "--gpus", "4", "--tp", "2", "--pp", "2", "--json")
    result = json.loads(out)
    stages = per_device_memory(_analysis(), ParallelPlan(gpus=4, tp=2, pp=2))
    assert code == 0 and result["plan"]["dp"] == 1
    assert result["peak_bytes_per_device"] == max(d.peak_bytes for d in stages)
    assert [s["in_flight"] for s in result["stages"]] == [2, 1]


def test_fit_per_device_batch_is_checked_at_it_and_past_it(capsys):
    code, out, _ = run(capsys, "fit", "llama3-8b", *SMALL, "--device", "h100-sxm",
                       "--device-memory", "4MiB", "--reserve", "0", "--gpus", "2", "--fsdp",
                       "--json")
    best = json.loads(out)["max_batch"]
    assert code == 0 and best >= 1
    plan = ParallelPlan(gpus=2, fsdp=True)
    for batch, fits in ((best, True), (best + 1, False)):
        peak = max(d.peak_bytes for d in per_device_memory(_analysis(batch), plan))
        assert (peak <= 4 * 2**20) == fits


def test_plan_ranks_feasible_plans_by_step_time(capsys):
    code, out, _ = run(capsys, "plan", "llama3-8b", *SMALL, "--device", "h100-sxm",
                       "--gpus", "4", "--global-batch", "8", "--micro-batch", "1,2",
                       "--json")
    plans = json.loads(out)["plans"]
    feasible = [p for p in plans if not p["rejected"]]
    assert code == 0 and feasible
    times = [p["step_time_s"] for p in feasible]
    assert times == sorted(times)
    assert {(p["dp"] * p["tp"] * p["pp"]) for p in plans} == {4}
    assert any("key/value heads" in p["rejected"] for p in plans)  # tp 4 > 2 kv heads


@pytest.mark.parametrize("argv, message", [
    (["memory", "llama3-8b", "--gpus", "8", "--tp", "3"], "not a multiple"),
    (["memory", "llama3-8b", "--gpus", "2", "--zero", "2", "--fsdp"], "pick one"),
    (["memory", "llama3-8b", "--gpus", "2", "--dp", "3"], "not --gpus 2"),
    (["plan", "llama3-8b", "--gpus", "4", "--global-batch", "8", "--device", "h100-sxm",
      "--sharding", "zero-9"], "unknown --sharding"),
])
def test_bad_plans_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err
