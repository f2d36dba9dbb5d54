"""Unit formatting (bytes binary, FLOPs decimal) and the text tables, from named constants."""

from __future__ import annotations

import pytest
from graphcost.models import load

from graphcost import analyze
from graphcost.report.analysis import module_table, op_table, render
from graphcost.report.units import (
    format_bandwidth,
    format_bytes,
    format_count,
    format_count_short,
    format_flops,
    format_flops_per_s,
    table,
)
from validation.groundtruth import measure_flops

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (KiB, "1.00 KiB"), (1.5 * KiB, "1.50 KiB"),
    (3 * MiB, "3.00 MiB"), (25.1 * GiB, "25.10 GiB"), (2 * TiB, "2.00 TiB"),
])
def test_bytes_are_binary(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("n, text", [
    (0, "0 FLOP"), (999, "999 FLOP"), (98_304_000, "98.30 MFLOP"),
    (2 * 10**9, "2.00 GFLOP"), (29_261_612_187_648, "29.26 TFLOP"), (3 * 10**15, "3.00 PFLOP"),
])
def test_flops_are_decimal(n, text):
    assert format_flops(n) == text


def test_counts_and_rates():
    assert format_count(6_738_415_616) == "6,738,415,616"
    assert format_count_short(6_738_415_616) == "6.74 B"
    assert format_count_short(124_439_808) == "124.44 M"
    assert format_count_short(512) == "512"
    assert format_flops_per_s(989.4e12) == "989.40 TFLOP/s"
    assert format_bandwidth(3350e9) == "3.35 TB/s"


def test_table_aligns_columns():
    text = table(["op", "calls"], [["aten.mm", "3"], ["x", "120"]])
    assert text.splitlines() == ["op       calls", "-------  -----", "aten.mm      3",
                                 "x          120"]


def test_tables_of_a_small_model():
    n_layer, n_embd, vocab, batch, seq = 2, 64, 100, 2, 16
    module, inputs = load("gpt2", batch=batch, seq=seq, with_targets=True, n_layer=n_layer,
                          n_embd=n_embd, n_head=4, vocab_size=vocab, block_size=32)
    a = analyze(module, inputs, model_name="small")
    forward, backward = measure_flops(module, inputs)
    modules = module_table(a, depth=2)
    assert [line.split()[0] for line in modules.splitlines()[2:]] == [
        r.key for r in a.by_module(2)]
    assert {"h.0", "h.1", "lm_head"} <= set(modules.split())
    ops = op_table(a, top=2).splitlines()
    assert len(ops) == 2 + 2
    assert ops[2].split()[0] == "aten.linear.default"  # the matmuls carry nearly all FLOPs
    text = render(a, tokens=batch * seq)
    assert f"({forward:,})" in text and f"({backward:,})" in text
    assert f"{batch * seq} tokens" in text
