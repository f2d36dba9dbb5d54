"""Models whose forward returns structured outputs: a @dataclass, a dict, a NamedTuple, nested
tuples. The ground truth's loss is the sum of every floating output that needs a gradient
(validation.groundtruth.scalar_loss, through containers and dataclass fields)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import Entry, floats, inputs, ints

B = 4


@dataclass
class DetectionOutput:
    loss: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor


class TinyDetector(nn.Module):
    """A conv backbone with box-regression and class heads, returning a @dataclass (loss and
    the predictions)."""

    def __init__(self, classes=5):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.box = nn.Conv2d(16, 4, 1)
        self.cls = nn.Conv2d(16, classes, 1)

    def forward(self, images, target_boxes, target_cls):
        f = self.backbone(images)
        boxes = self.box(f).flatten(2).transpose(1, 2)  # (B, HW, 4)
        logits = self.cls(f).flatten(2).transpose(1, 2)  # (B, HW, C)
        loss = F.smooth_l1_loss(boxes, target_boxes) + F.cross_entropy(logits.flatten(0, 1),
                                                                      target_cls.flatten())
        return DetectionOutput(loss=loss, boxes=boxes.detach(), scores=logits.softmax(-1))


class MultiTaskDict(nn.Module):
    """A shared encoder with two heads, returning a dict of losses and logits."""

    def __init__(self, d=16, hidden=32):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.cls_head = nn.Linear(hidden, 3)
        self.reg_head = nn.Linear(hidden, 1)

    def forward(self, x, y_cls, y_reg):
        h = self.encoder(x)
        logits = self.cls_head(h)
        pred = self.reg_head(h).squeeze(-1)
        return {"cls_loss": F.cross_entropy(logits, y_cls),
                "reg_loss": F.mse_loss(pred, y_reg),
                "logits": logits}


class VAEOutput(NamedTuple):
    recon: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor


class MLPAutoencoder(nn.Module):
    """A variational autoencoder that returns a NamedTuple (the loss is the caller's)."""

    def __init__(self, d=24, latent=6):
        super().__init__()
        self.enc = nn.Linear(d, 2 * latent)
        self.dec = nn.Sequential(nn.Linear(latent, 16), nn.ReLU(), nn.Linear(16, d))

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return VAEOutput(self.dec(z), mu, logvar)


class TwoTowerNested(nn.Module):
    """Returns nested tuples: ((query, key), (similarity, (temperature-scaled logits,)))."""

    def __init__(self, d=16, out=8):
        super().__init__()
        self.q = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, out))
        self.k = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, out))
        self.log_temp = nn.Parameter(torch.zeros(()))

    def forward(self, a, b):
        q = F.normalize(self.q(a), dim=-1)
        k = F.normalize(self.k(b), dim=-1)
        sim = q @ k.t()
        return (q, k), (sim, (sim * self.log_temp.exp(),))


ENTRIES = [
    Entry("dataclass_output", "outputs", TinyDetector,
          inputs(floats(B, 3, 16, 16), floats(B, 16, 4), ints(5, B, 16)),
          "@dataclass output (loss, detached boxes, softmax scores)"),
    Entry("dict_output", "outputs", MultiTaskDict,
          inputs(floats(B, 16), ints(3, B), floats(B)),
          "dict of two losses and the logits"),
    Entry("namedtuple_output", "outputs", MLPAutoencoder, inputs(floats(B, 24)),
          "NamedTuple (recon, mu, logvar), randn_like"),
    Entry("nested_tuple_output", "outputs", TwoTowerNested, inputs(floats(B, 16), floats(B, 16)),
          "nested tuples, F.normalize"),
]
