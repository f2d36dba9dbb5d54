"""`graphcost checkpoint`, and `--checkpoint POLICY` on `memory` and `fit`, run in-process.

The numbers are the engine's (passes/checkpoint/search.py; its walks are checked against real
torch.utils.checkpoint runs in tests/passes/): here the CLI must print exactly what `compare`
and `optimize` return for the same model, judge the budget right, and exit 2 on user errors."""

from __future__ import annotations

import json

import pytest

from graphcost import analyze
from graphcost.cli.main import main
from graphcost.load.model import load_model
from graphcost.passes.checkpoint.policy import BUILTIN_POLICIES
from graphcost.passes.checkpoint.search import compare
from tests.helpers import assert_user_error

# 4 blocks, and enough tokens (8 x 32) that the activations, not the optimizer, make the peak
GPT2 = dict(n_layer=4, n_embd=64, n_head=4, vocab_size=100, block_size=32)
SMALL = [a for k, v in GPT2.items() for a in ("--set", f"{k}={v}")]
SHAPE = ["--batch", "8", "--seq", "32"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def rows_by_policy():
    """The engine's rows for the test model, built as the CLI builds it."""
    model = load_model("gpt2", batch=8, seq=32, overrides=GPT2)
    analysis = analyze(model.module, model.inputs, device="cpu", model_name=model.name)
    return {r.policy: r for r in compare(analysis, BUILTIN_POLICIES)}


def test_table_has_every_builtin_policy(capsys):
    code, out, _ = run(capsys, "checkpoint", "gpt2", *SHAPE, *SMALL, "--device", "a100-80gb")
    assert code == 0
    assert "budget 78.00 GiB = a100-80gb's 80.00 GiB - reserve 2.00 GiB" in out
    lines = out.splitlines()
    body = lines[lines.index(next(x for x in lines if x.startswith("policy"))) + 2:]
    assert [line.split()[0] for line in body[:len(BUILTIN_POLICIES)]] == list(BUILTIN_POLICIES)
    assert all(line.split()[-1] == "yes" for line in body[:len(BUILTIN_POLICIES)])


def test_json_rows_are_compares(capsys, rows_by_policy):
    code, out, _ = run(capsys, "checkpoint", "gpt2", *SHAPE, *SMALL, "--json",
                       "--policies", "full,none,every-2")
    assert code == 0
    result = json.loads(out)
    assert result["model"] == "gpt2" and result["device"] == "cpu"
    assert result["budget_bytes"] is None  # the CPU preset has no memory size
    assert [r["policy"] for r in result["rows"]] == ["full", "none", "every-2"]
    for r in result["rows"]:
        assert set(r) >= {"policy", "peak_bytes", "saved_activation_bytes", "recompute_flops"}
        assert r == rows_by_policy[r["policy"]].as_dict()
    assert "optimum" not in result


def test_budget_between_full_and_none_finds_a_cheaper_mix(capsys, rows_by_policy, tmp_path):
    none, full = rows_by_policy["none"], rows_by_policy["full"]
    assert full.peak_bytes < none.peak_bytes
    budget = (full.peak_bytes + none.peak_bytes) // 2
    png = tmp_path / "pareto.png"
    code, out, _ = run(capsys, "checkpoint", "gpt2", *SHAPE, *SMALL, "--budget", str(budget),
                       "--json", "--plot", str(png))
    assert code == 0
    result = json.loads(out)
    assert result["budget_bytes"] == budget and result["fits"] is True
    optimum, best = result["optimum"], result["best_builtin"]
    assert optimum["policy"].startswith("per-block:") and len(optimum["per_block"]) == 4
    assert optimum["peak_bytes"] <= budget
    assert optimum["recompute_flops"] <= best["recompute_flops"]
    assert best["policy"] in BUILTIN_POLICIES and best["peak_bytes"] <= budget
    assert best == min((r for r in result["rows"] if r["fits"]),
                       key=lambda r: (r["recompute_flops"], r["peak_bytes"]))
    assert result["best_builtin_extra_recompute_flops"] == (best["recompute_flops"]
                                                            - optimum["recompute_flops"])
    # the search (integer program and its walk) is part of the whole, walks included
    assert 0 < result["search_seconds"] <= result["total_seconds"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_text_names_the_optimum(capsys, rows_by_policy):
    budget = (rows_by_policy["full"].peak_bytes + rows_by_policy["none"].peak_bytes) // 2
    code, out, _ = run(capsys, "checkpoint", "gpt2", *SHAPE, *SMALL, "--budget", str(budget))
    assert code == 0
    assert "least recompute within" in out and "per-block:" in out
    assert "the best that fits" in out and "search" in out


def test_a_budget_nothing_fits_is_an_answer(capsys, rows_by_policy):
    smallest = min(rows_by_policy.values(), key=lambda r: r.peak_bytes)
    code, out, _ = run(capsys, "checkpoint", "gpt2", *SHAPE, *SMALL, "--budget", "1MiB")
    assert code == 0
    assert "NOTHING FITS in 1.00 MiB" in out and f"({smallest.policy})" in out
    code, out, _ = run(capsys, "checkpoint", "gpt2", *SHAPE, *SMALL, "--budget", "1e6",
                       "--json")
    assert code == 0
    result = json.loads(out)
    assert result["fits"] is False and result["optimum"] is None
    assert result["best_builtin"] is None
    assert result["smallest"]["peak_bytes"] == smallest.peak_bytes
    assert not any(r["fits"] for r in result["rows"])


def test_builtins_that_do_not_apply_are_skipped_with_a_note(capsys):
    code, out, _ = run(capsys, "checkpoint", "resnet-cnn")
    assert code == 0
    assert "skipped selective: the model has no attention" in out
    assert "save-matmuls" in out


@pytest.mark.parametrize("argv, needle", [
    (["checkpoint", "gpt2", *SMALL, "--policies", "none,bogus"],
     "unknown checkpoint policy 'bogus'"),
    (["checkpoint", "resnet-cnn", "--policies", "none,selective"], "no attention"),
    (["checkpoint", "gpt2", "--budget", "lots"], "bad size 'lots' in --budget"),
    (["checkpoint", "gpt2", "--budget", "0GiB"], "--budget"),
    (["checkpoint", "gpt2", "--budget", "1GiB", "--reserve", "1GiB"], "--reserve"),
    (["memory", "gpt2", *SMALL, "--checkpoint", "every-0"], "every-0"),
    (["memory", "gpt2", "--inference", "--checkpoint", "full"], "--checkpoint"),
    (["fit", "gpt2", "--device", "l4", "--checkpoint", "most"], "'most'"),
])
def test_user_errors_exit_2(capsys, argv, needle):
    assert_user_error(capsys, argv, needle)


def test_memory_checkpoint_full(capsys, rows_by_policy):
    results = {}
    for policy in ("none", "full"):
        code, out, _ = run(capsys, "memory", "gpt2", *SHAPE, *SMALL, "--checkpoint", policy,
                           "--json")
        assert code == 0
        results[policy] = json.loads(out)
    none, full = results["none"], results["full"]
    assert (none["checkpoint"], none["recompute_flops"]) == ("none", 0)
    assert full["checkpoint"] == "full" and full["recompute_flops"] > 0
    assert full["peak_bytes"] < none["peak_bytes"]
    assert full["saved_activation_bytes"] < none["saved_activation_bytes"]
    for policy, result in results.items():  # the same walk as the checkpoint verb's
        row = rows_by_policy[policy]
        assert (result["peak_bytes"], result["recompute_flops"],
                result["saved_activation_bytes"]) == (row.peak_bytes, row.recompute_flops,
                                                      row.saved_activation_bytes)
    code, out, _ = run(capsys, "memory", "gpt2", *SHAPE, *SMALL, "--checkpoint", "full")
    assert code == 0 and "checkpoint  full: 4 regions, recompute" in out


def test_fit_checkpoint_full_fits_at_least_as_much(capsys):
    results = {}
    for policy in ("none", "full"):
        code, out, _ = run(capsys, "fit", "gpt2", "--device", "l4", "--seq", "32", *SMALL,
                           "--checkpoint", policy, "--json")
        assert code == 0
        results[policy] = json.loads(out)
    assert results["full"]["checkpoint"] == "full"
    assert results["full"]["max_batch"] >= results["none"]["max_batch"] > 0
    # inference ignores the policy
    assert results["full"]["infer_max_batch"] == results["none"]["infer_max_batch"]
