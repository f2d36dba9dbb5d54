"""Recommendation: DLRM (Naumov et al. 2019) with nn.EmbeddingBag."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import Entry

B, DENSE, TABLES, ROWS, DIM, BAG = 4, 8, 3, 40, 8, 3


def mlp(sizes, sigmoid_last=False):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        layers.append(nn.Sigmoid() if sigmoid_last and i == len(sizes) - 2 else nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """Bottom MLP on dense features, one EmbeddingBag(mode="sum") per sparse feature, pairwise
    dot-product interaction (lower triangle), top MLP, BCE on click labels."""

    def __init__(self):
        super().__init__()
        self.bot_l = mlp([DENSE, 16, DIM])
        self.emb_l = nn.ModuleList(nn.EmbeddingBag(ROWS, DIM, mode="sum") for _ in range(TABLES))
        n = TABLES + 1
        self.top_l = mlp([DIM + n * (n - 1) // 2, 16, 1], sigmoid_last=True)

    def interact_features(self, x, ly):
        batch, d = x.shape
        T = torch.cat([x] + ly, dim=1).view((batch, -1, d))
        Z = torch.bmm(T, torch.transpose(T, 1, 2))
        _, ni, nj = Z.shape
        li = torch.tensor([i for i in range(ni) for j in range(i)], device=x.device)
        lj = torch.tensor([j for i in range(nj) for j in range(i)], device=x.device)
        Zflat = Z[:, li, lj]
        return torch.cat([x] + [Zflat], dim=1)

    def forward(self, dense_x, lS_o, lS_i, labels):
        x = self.bot_l(dense_x)
        ly = [emb(lS_i[k], lS_o[k]) for k, emb in enumerate(self.emb_l)]
        z = self.interact_features(x, ly)
        p = self.top_l(z)
        return F.binary_cross_entropy(p.squeeze(1), labels)


def dlrm_inputs(device, dtype):
    dense = torch.rand(B, DENSE, device=device, dtype=dtype)
    offsets = torch.arange(0, B * BAG, BAG, device=device).repeat(TABLES, 1)  # (TABLES, B)
    indices = torch.randint(0, ROWS, (TABLES, B * BAG), device=device)
    labels = torch.randint(0, 2, (B,), device=device).to(dtype)
    return dense, offsets, indices, labels


ENTRIES = [
    Entry("dlrm", "recsys", DLRM, dlrm_inputs,
          "EmbeddingBag(mode='sum') with offsets, bottom/top MLP, bmm pairwise interaction with "
          "torch.tensor index lists, BCE"),
]
