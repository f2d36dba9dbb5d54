"""Models that checkpoint inside their own forward with torch.utils.checkpoint (non-reentrant):
per block, and with checkpoint_sequential."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from . import Entry, floats, inputs, ints

V, B, T, D = 40, 2, 8, 32


class Block(nn.Module):
    def __init__(self, d=D, heads=4):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False, is_causal=False)[0]
        return x + self.mlp(self.ln2(x))


class CheckpointedLM(nn.Module):
    """A transformer LM whose blocks each run under checkpoint(..., use_reentrant=False), as
    training scripts add with a `gradient_checkpointing` flag."""

    def __init__(self, layers=3, gradient_checkpointing=True):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V)
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, ids, targets):
        x = self.embed(ids)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return F.cross_entropy(self.head(self.norm(x)).flatten(0, 1), targets.flatten())


class SequentialCheckpointMLP(nn.Module):
    """A deep MLP classifier run with checkpoint_sequential in 2 segments."""

    def __init__(self, d=48, depth=6, classes=10):
        super().__init__()
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(d, d), nn.LayerNorm(d), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, classes)

    def forward(self, x, y):
        h = checkpoint_sequential(self.body, 2, x, use_reentrant=False)
        return F.cross_entropy(self.head(h), y)


class CheckpointedConvNet(nn.Module):
    """A CNN that checkpoints the function of each stage (a closure over the stage's modules,
    BatchNorm included) rather than a module."""

    def __init__(self, ch=(8, 16), classes=10):
        super().__init__()
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        cin = 3
        for c in ch:
            self.convs.append(nn.Conv2d(cin, c, 3, padding=1))
            self.bns.append(nn.BatchNorm2d(c))
            cin = c
        self.fc = nn.Linear(cin, classes)

    def forward(self, x, y):
        for conv, bn in zip(self.convs, self.bns):
            def stage(t, conv=conv, bn=bn):
                return F.max_pool2d(F.relu(bn(conv(t))), 2)
            x = checkpoint(stage, x, use_reentrant=False)
        return F.cross_entropy(self.fc(x.mean((2, 3))), y)


ENTRIES = [
    Entry("checkpoint_per_block", "checkpoint", CheckpointedLM, inputs(ints(V, B, T), ints(V, B, T)),
          "checkpoint(block, x, use_reentrant=False) per transformer block"),
    Entry("checkpoint_sequential", "checkpoint", SequentialCheckpointMLP,
          inputs(floats(4, 48), ints(10, 4)),
          "checkpoint_sequential(body, 2 segments, use_reentrant=False)"),
    Entry("checkpoint_closure_cnn", "checkpoint", CheckpointedConvNet,
          inputs(floats(B, 3, 16, 16), ints(10, B)),
          "checkpoint of a closure per stage, BatchNorm inside the checkpointed region"),
]
