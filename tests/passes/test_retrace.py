"""One trace, several shapes (graphcost.passes.retrace) against a trace per shape: the bytes
alive after every event of a training step and of inference must be the same, event for
event, as those of timelines walked on graphs exported at each shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from graphcost.models import SMALL_OVERRIDES, load
from torch import nn

from graphcost import analyze
from graphcost.errors import ConfigError
from graphcost.hardware.devices import Device, get_device
from graphcost.passes.memory.inference import inference_memory
from graphcost.passes.memory.timeline import training_timeline
from graphcost.passes.memory.training import TrainingConfig
from graphcost.sizing import fit as fit_module
from graphcost.sizing.fit import fit
from graphcost.sizing.retrace import Rewrite, marker, step_events
from graphcost.sizing.sampled import Sampled, Unsupported, decode, encode

CPU = Device("tiny", "cpu", memory_bytes=1 << 40, bandwidth_bytes_per_s=1.0)
SMALL_LLAMA = dict(SMALL_OVERRIDES["llama3-8b"], max_seq_len=256)
GPT2_4 = dict(n_layer=4, n_embd=64, n_head=4, vocab_size=100, block_size=128)


def traced_per_shape(loader, shape, training, config, device, autocast):
    module, inputs = loader(*shape, training)
    a = analyze(module, inputs, device=device, autocast=autocast)
    if training:
        return np.array([e.total_bytes for e in training_timeline(a, config).events], float)
    return np.array(inference_memory(a).event_bytes, float)


@pytest.mark.parametrize("name, overrides, seq, seq_limit, device, autocast, config", [
    ("llama3-8b", SMALL_LLAMA, 64, 256, CPU, None, TrainingConfig()),  # GQA, 2 blocks
    ("llama3-8b", dict(SMALL_LLAMA, n_layers=5), 48, 256, "h100-sxm", None, TrainingConfig()),
    ("llama3-8b", SMALL_LLAMA, 32, 256, CPU, torch.bfloat16, TrainingConfig()),
    ("gpt2", GPT2_4, 100, 128, CPU, None, TrainingConfig(optimizer="sgd-momentum")),
    ("gpt2", GPT2_4, 64, 128, "h100-sxm", None, TrainingConfig(grad_accumulation=2, steps=1)),
    ("resnet-cnn", {}, 32, None, CPU, None, TrainingConfig()),  # batch only: no length
])
def test_one_trace_gives_the_events_of_a_trace_per_shape(name, overrides, seq, seq_limit,
                                                          device, autocast, config):
    device = get_device(device)

    def loader(batch, seq, training):
        return load(name, batch=batch, seq=seq, with_targets=training, **overrides)

    shapes = [(1, seq), (2, seq)] + ([(1, seq // 2), (1, seq // 4)] if seq_limit else [])
    for training in (True, False):
        found = step_events(loader, shapes, training=training, config=config, device=device,
                            autocast=autocast, seq_limit=seq_limit)
        for shape in shapes:
            expected = traced_per_shape(loader, shape, training, config, device, autocast)
            np.testing.assert_array_equal(found[shape], expected, err_msg=f"{shape}")


def test_a_model_one_trace_cannot_serve_is_traced_per_shape(monkeypatch):
    """GPT-2 with its position table as long as the sequence: the parameters change with the
    length, so one trace refuses it and fit traces every shape."""
    def loader(batch, seq, training):
        return load("gpt2", batch=batch, seq=seq, with_targets=training,
                    **dict(GPT2_4, block_size=seq))

    with pytest.raises(Unsupported, match="parameters"):
        step_events(loader, [(1, 64), (2, 64), (1, 32), (1, 16)], training=True,
                    config=TrainingConfig(), device=CPU, autocast=None, seq_limit=128)
    device = Device("small", "cpu", memory_bytes=30e6, bandwidth_bytes_per_s=1.0)
    answer = fit(loader, device=device, seq=64, model_max_seq=128, reserve_bytes=0)

    def refuse(*args, **kwargs):
        raise Unsupported("every shape traced on its own")

    monkeypatch.setattr(fit_module, "step_events", refuse)
    assert fit(loader, device=device, seq=64, model_max_seq=128, reserve_bytes=0) == answer
    assert answer.train_max_batch > 0


def test_a_length_that_changes_the_step_fails_as_loudly_as_before():
    """At a length of 1 a sequence's tensors have size-1 dimensions and are laid out (and
    aliased) differently: one trace refuses it, and so does the per-shape search."""
    def loader(batch, seq, training):
        return load("gpt2", batch=batch, seq=seq, with_targets=training, **GPT2_4)

    with pytest.raises(Unsupported):
        step_events(loader, [(1, 4), (2, 4), (1, 2), (1, 1)], training=True,
                    config=TrainingConfig(), device=CPU, autocast=None, seq_limit=128)
    device = Device("small", "cpu", memory_bytes=60e6, bandwidth_bytes_per_s=1.0)
    with pytest.raises(ConfigError, match="sequence length"):
        fit(loader, device=device, seq=4, model_max_seq=128, reserve_bytes=0)


def test_byte_counts_carry_every_shape_through_sums():
    a, b = encode((10, 20, 5, 7)), encode((1, 1, 1, 1))
    assert b == 1  # a constant is itself
    assert decode(a + b - encode((3, 0, 4, 2)), 4) == (8, 21, 2, 6)
    assert decode(a * 4 // 2, 4) == (20, 40, 10, 14)


def test_sizes_multiply_at_every_shape_and_must_compare_alike():
    batch, seq = Sampled((1, 2, 1, 1)), Sampled((64, 64, 32, 16))
    numel = batch * seq * 8
    assert numel.values == (512, 1024, 256, 128)
    assert decode(numel * 4 + 100, 4) == (2148, 4196, 1124, 612)  # nbytes plus a constant
    assert (numel * 4) // batch == Sampled((2048, 2048, 1024, 512))
    assert seq == Sampled((64, 64, 32, 16)) and seq != seq * 2
    with pytest.raises(Unsupported):
        _ = batch == 1  # true at batch 1, false at batch 2: the walks would diverge
    with pytest.raises(Unsupported):
        _ = seq / 2


def test_rewrite_reads_batch_and_length_out_of_the_marker_integers():
    rewrite = Rewrite((1009, 2039), (2, 512))
    assert rewrite([1009, 2039, 32, 128]) == [2, 512, 32, 128]
    assert rewrite((1009 * 2039 * 7, -1, 0, 1)) == (2 * 512 * 7, -1, 0, 1)
    assert rewrite(2039 * 2039) == 512 * 512
    assert rewrite({"dim": 3, "size": [1009 * 32]}) == {"dim": 3, "size": [64]}


def test_marker_avoids_the_models_dimensions():
    model = nn.Sequential(nn.Linear(1009, 2039 * 2), nn.Linear(2039 * 2, 5))
    b0, t0 = marker(model, seq_limit=2048)
    assert b0 != 1009 and b0 > 1000
    assert t0 == 2029  # 2039 divides a weight's dimension: the next prime down
