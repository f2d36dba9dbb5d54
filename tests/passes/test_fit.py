"""Fit and inference memory against independent references: the fit answer against timelines
traced at it and one past it; the KV cache against the published per-token figures and the
seed formula; the no-grad forward against the live-tensor tracker on a real CPU run."""

from __future__ import annotations

import pytest
import torch
from graphcost.models import SMALL_OVERRIDES, get_config, load

from graphcost import analyze
from graphcost.hardware.devices import Device
from graphcost.passes.memory.inference import inference_memory, kv_cache_bytes_per_token
from graphcost.passes.memory.timeline import training_timeline
from graphcost.sizing.fit import fit
from validation.memtrack import LiveTensorTracker

KIB = 1024
SMALL_LLAMA = SMALL_OVERRIDES["llama3-8b"]


@pytest.mark.parametrize("name, kib", [("llama-7b", 512), ("llama3-8b", 128),
                                       ("llama3-70b", 320), ("llama3-405b", 504)])
def test_kv_cache_per_token_matches_published(name, kib):
    """../shared/reference/models.md: bf16 KV bytes per token for the LLaMA family."""
    a = analyze(*load(name, seq=16, dtype=torch.bfloat16))
    assert kv_cache_bytes_per_token(a) == kib * KIB


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_kv_cache_per_token_from_named_dimensions(kv_heads):
    cfg = dict(SMALL_LLAMA, n_kv_heads=kv_heads)
    a = analyze(*load("llama3-8b", seq=16, **cfg))
    head_dim = cfg["dim"] // cfg["n_heads"]
    assert kv_cache_bytes_per_token(a) == 2 * cfg["n_layers"] * kv_heads * head_dim * 4


def test_gpt2_kv_cache_from_named_dimensions():
    cfg = get_config("gpt2")
    a = analyze(*load("gpt2", seq=16, dtype=torch.bfloat16))
    assert kv_cache_bytes_per_token(a) == 2 * cfg.n_layer * cfg.n_embd * 2


@pytest.mark.parametrize("name, overrides", [
    ("llama3-8b", SMALL_LLAMA),
    ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, vocab_size=100, block_size=64)),
])
def test_inference_forward_matches_live_tensor_tracker(name, overrides):
    """Weights plus the no-grad forward's peak against a real CPU run (no cache is kept there)."""
    a = analyze(*load(name, batch=2, seq=32, **overrides))
    predicted = inference_memory(a)
    torch.manual_seed(0)
    model, inputs = load(name, batch=2, seq=32, device="cpu", **overrides)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tracker = LiveTensorTracker(model, inputs)
        with tracker, torch.no_grad():
            model(*inputs)
    finally:
        torch.set_num_threads(old)
    measured = tracker.peak_bytes
    assert abs(predicted.peak_bytes - predicted.kv_cache_bytes - measured) <= 0.01 * measured


def test_fit_answers_are_the_edges_of_what_fits():
    """The batch and the context fit answers, checked with timelines traced at and past them."""
    cfg = dict(SMALL_LLAMA, max_seq_len=512)

    def loader(batch, seq, training):
        return load("llama3-8b", batch=batch, seq=seq, with_targets=training, **cfg)

    def train_peak(batch, seq):
        return training_timeline(analyze(*loader(batch, seq, True))).peak_bytes

    def infer_peak(batch, seq):
        return inference_memory(analyze(*loader(batch, seq, False))).peak_bytes

    budget = train_peak(5, 64) + 1000  # a device on which 5 sequences of 64 just fit
    device = Device("tiny", "cpu", memory_bytes=budget + 100, bandwidth_bytes_per_s=1.0)
    r = fit(loader, device=device, seq=64, model_max_seq=512, reserve_bytes=100)
    assert r.budget_bytes == budget
    assert r.train_max_batch == 5
    assert train_peak(r.train_max_batch + 1, 64) > budget
    assert infer_peak(r.infer_max_batch, 64) <= budget < infer_peak(r.infer_max_batch + 1, 64)
    assert train_peak(1, r.train_max_seq) <= budget
    if r.train_max_seq < 512:
        assert train_peak(1, r.train_max_seq + 1) > budget
    assert infer_peak(1, r.infer_max_seq) <= budget
    if r.infer_max_seq < 512:
        assert infer_peak(1, r.infer_max_seq + 1) > budget
