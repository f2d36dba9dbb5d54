"""The Python API mirrors the command line: the README's "Python API" examples run as written,
and each result's `to_dict()` is exactly what the verb's `--json` prints for the same options."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import graphcost
from graphcost.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"overrides": {"n_layer": 2}, "seq": 128}
SMALL_ARGS = ["--set", "n_layer=2", "--seq", "128"]
GPU = "h100-sxm"
TIMINGS = {"search_seconds", "total_seconds"}  # wall clock of the search, not a figure


def readme_python_api() -> str:
    section = (ROOT / "README.md").read_text().split("### Python API", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))


def test_the_readme_examples_run():
    code = readme_python_api()
    assert "graphcost.fit(" in code and ".roofline(" in code
    exec(compile(code, "README.md (Python API)", "exec"), {"__name__": "readme_api"})


def cli_json(capsys, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def without_timings(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in TIMINGS}


def small(**changes):
    return graphcost.analyze("gpt2", **{**SMALL, **changes})


CASES = {
    "analyze": (lambda: small(batch=2).to_dict(), ["analyze", "gpt2", "--batch", "2"]),
    "coverage": (lambda: small().coverage(), ["coverage", "gpt2"]),
    "memory": (lambda: small(batch=2, precision="bf16-mixed").memory(checkpoint="full",
                                                                     grad_accumulation=2),
               ["memory", "gpt2", "--batch", "2", "--precision", "bf16-mixed", "--checkpoint",
                "full", "--grad-accumulation", "2"]),
    "memory --inference": (lambda: small().memory(inference=True, context=64),
                           ["memory", "gpt2", "--inference", "--context", "64"]),
    "memory, parallel": (lambda: small(device=GPU).memory(
        plan=graphcost.ParallelPlan(gpus=2, tp=2, sequence_parallel=True)),
        ["memory", "gpt2", "--device", GPU, "--gpus", "2", "--tp", "2",
         "--sequence-parallel"]),
    "checkpoint": (lambda: small(device=GPU).checkpoints("none,full,selective",
                                                          optimizer="sgd"),
                   ["checkpoint", "gpt2", "--device", GPU, "--policies", "none,full,selective",
                    "--optimizer", "sgd"]),
    "checkpoint --budget": (lambda: small(batch=4).checkpoints(budget="1.2GiB"),
                            ["checkpoint", "gpt2", "--batch", "4", "--budget", "1.2GiB"]),
    "roofline": (lambda: small(device=GPU, precision="bf16").roofline(
        checkpoint="full", compute_bound_batch=True, matmul_efficiency=0.7),
        ["roofline", "gpt2", "--device", GPU, "--precision", "bf16", "--checkpoint", "full",
         "--compute-bound-batch", "--matmul-efficiency", "0.7"]),
    "roofline --inference": (lambda: small(device=GPU, batch=4).roofline(inference=True,
                                                                         context=512),
                             ["roofline", "gpt2", "--device", GPU, "--batch", "4",
                              "--inference", "--context", "512"]),
    "cost": (lambda: graphcost.cost("gpt2", 3e9, device=GPU, gpus=8, usd_per_hour=2.5, **SMALL),
             ["cost", "gpt2", "--device", GPU, "--tokens", "3e9", "--gpus", "8",
              "--usd-per-hour", "2.5"]),
    "cost --inference": (lambda: small(device=GPU).cost(1e9, inference=True, mfu=0.5),
                         ["cost", "gpt2", "--device", GPU, "--tokens", "1e9", "--inference",
                          "--mfu", "0.5"]),
    "fit": (lambda: graphcost.fit("gpt2", device=GPU, precision="bf16", **SMALL),
            ["fit", "gpt2", "--device", GPU, "--precision", "bf16"]),
    "fit, parallel": (lambda: graphcost.fit("gpt2", device=GPU, reserve="1GiB",
                                            plan=graphcost.ParallelPlan(gpus=2, fsdp=True),
                                            **SMALL),
                      ["fit", "gpt2", "--device", GPU, "--reserve", "1GiB", "--gpus", "2",
                       "--fsdp"]),
    "plan": (lambda: graphcost.plan("gpt2", gpus=4, global_batch=8, device=GPU,
                                    micro_batch=[1, 2], checkpoint=["none"], **SMALL),
             ["plan", "gpt2", "--gpus", "4", "--global-batch", "8", "--device", GPU,
              "--micro-batch", "1,2", "--checkpoint", "none"]),
    "sweep": (lambda: graphcost.sweep("gpt2", device=GPU, batch=[1, 2], seq=[64, 128],
                                      budget="1GiB", overrides={"n_layer": 2}),
              ["sweep", "gpt2", "--device", GPU, "--batch", "1,2", "--seq", "64,128",
               "--budget", "1GiB", "--set", "n_layer=2"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_to_dict_is_the_cli_json(capsys, case):
    compute, argv = CASES[case]
    result = compute()
    if "--seq" not in argv:
        argv = [*argv, *SMALL_ARGS] if "--set" not in argv else argv
    expected = cli_json(capsys, *argv)
    got = result if isinstance(result, dict) else result.to_dict()
    assert without_timings(json.loads(json.dumps(got))) == without_timings(expected)


def test_the_results_name_their_units():
    a = small(device=GPU)
    mem = a.memory()
    assert mem.peak_bytes == mem.to_dict()["peak_bytes"] == sum(mem.breakdown_at_peak.values())
    assert set(mem.peak_at) == {"step", "phase", "op", "module", "node"}
    step = a.roofline()
    assert step.step_time_s > 0 and 0 < step.mfu <= step.hfu <= 1
    assert step.tokens_per_s == pytest.approx(a.tokens / step.step_time_s)
    answer = graphcost.fit("gpt2", device=GPU, **SMALL)
    assert (answer.max_batch, answer.max_seq) == (answer.sizes.train_max_batch,
                                                  answer.sizes.train_max_seq)
    assert a.optimize("1.2GiB").row == a.checkpoints(budget="1.2GiB").optimum.row


def test_a_module_analysis_has_the_methods():
    from graphcost.models import load

    module, inputs = load("gpt2", batch=2, seq=32, n_layer=1, with_targets=True)
    a = graphcost.analyze(module, inputs)
    assert isinstance(a, graphcost.Analysis)
    by_name = graphcost.analyze("gpt2", batch=2, seq=32, overrides={"n_layer": 1})
    assert a.memory().peak_bytes == by_name.memory().peak_bytes
    with pytest.raises(graphcost.ConfigError, match="needs MODEL by name"):
        a.roofline("h100-sxm", compute_bound_batch=True)


def test_precision_and_its_dtype_alias():
    assert small(dtype="bf16").dtype == small(precision="bfloat16").dtype == "bf16"
    assert small(precision="bf16-mixed").precision == "bf16-mixed"
    with pytest.raises(graphcost.ConfigError, match="fp32, bf16, fp16 or bf16-mixed"):
        small(precision="fp8")


@pytest.mark.parametrize("verb", ["analyze", "memory", "checkpoint", "roofline", "cost",
                                  "coverage", "fit", "plan", "sweep"])
def test_every_model_verb_takes_precision_and_dtype(capsys, verb):
    assert main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--precision" in out and "--dtype" in out and "bf16-mixed" in out
