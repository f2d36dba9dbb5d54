"""Tracing a stack of identical blocks once and copying it gives the same graph costs, row by
row, as exporting every block; anything that does not repeat cleanly falls back."""

from __future__ import annotations

import pytest
import torch
from graphcost.models import load
from torch import nn

from graphcost import analyze
from graphcost.trace.blocks import find_repeated_blocks


def rows(a):
    return [(r.op, r.module_path, r.forward_flops, r.backward_flops, r.saved_bytes,
             r.output_bytes, r.weight_bytes) for r in a.ops]


@pytest.mark.parametrize("name, overrides", [
    ("gpt2", dict(n_layer=5)),
    ("gpt2", dict(n_layer=5, flash=False)),  # a causal-mask buffer in every block
    ("llama3-8b", dict(n_layers=5, dim=256, n_heads=8, n_kv_heads=2, ffn_dim=512)),
    ("cs336-gpt2-xl", dict(n_layers=4, d_model=128, n_heads=4, d_ff=256)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copied_blocks_equal_full_export(name, overrides, dtype):
    module, inputs = load(name, batch=2, seq=32, dtype=dtype, with_targets=True, **overrides)
    fast = analyze(module, inputs)
    full = analyze(module, inputs, reuse_blocks=False)
    assert fast.totals() == full.totals()
    assert rows(fast) == rows(full)
    # Every parameter once, in the module's own order (the order an optimizer walks them in).
    params = [d["names"][0] for _, d in sorted(fast.graph.nodes(data=True),
                                                key=lambda item: item[1]["order"])
              if d["kind"] == "param"]
    assert params == [n for n, _ in module.named_parameters()]
    buffers = [d["names"][0] for _, d in sorted(fast.graph.nodes(data=True),
                                                 key=lambda item: item[1]["order"])
               if d["kind"] == "buffer"]
    assert buffers == [n for n, _ in module.named_buffers()]


def test_frozen_blocks_are_not_identical():
    module, _ = load("llama3-8b", n_layers=5)
    assert find_repeated_blocks(module).count == 5
    for p in module.layers[0].parameters():
        p.requires_grad_(False)
    assert find_repeated_blocks(module) is None


class Interleaved(nn.Module):
    """The parent runs an op between blocks: copying the block alone would miss it."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x)) * 2
        return x


def test_ops_between_blocks_fall_back_to_full_export():
    with torch.device("meta"):
        module, x = Interleaved(), torch.empty(3, 16)
    fast, full = analyze(module, (x,)), analyze(module, (x,), reuse_blocks=False)
    assert rows(fast) == rows(full)
    assert fast.forward_flops == 4 * 2 * 3 * 16 * 16
