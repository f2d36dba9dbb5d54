"""A model graphcost did not ship: `graphcost analyze examples/mlp.py:factory --batch 64`.

`factory()` runs under `torch.device("meta")`, so the module and its example inputs are built
without allocating anything; a `batch` (or `seq`) parameter receives --batch (or --seq).
"""

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 784, d_hidden: int = 4096, n_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.head = nn.Linear(d_hidden, n_classes)

    def forward(self, x, y):  # x: (B, d_in) images, y: (B,) labels
        h = torch.relu(self.fc1(x))  # (B, d_hidden)
        h = torch.relu(self.fc2(h))  # (B, d_hidden)
        return nn.functional.cross_entropy(self.head(h), y)  # the scalar the backward starts from


def factory(batch: int = 32):
    return MLP(), (torch.empty(batch, 784), torch.zeros(batch, dtype=torch.long))
