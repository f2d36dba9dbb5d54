"""A small ResNet-style CNN for 32x32 images (CIFAR-sized).

Stem conv-bn-relu-maxpool, stages of residual BasicBlocks (the first block of each later
stage halves the resolution and widens the channels), global average pooling and a classifier.

    >>> cfg = ResNetCNNConfig(channels=(8, 16), blocks=(1, 1))
    >>> ResNetCNN(cfg)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ResNetCNNConfig:
    channels: tuple = (32, 64, 128)  # output channels of each stage (the stem uses channels[0])
    blocks: tuple = (2, 2, 2)  # BasicBlocks per stage
    num_classes: int = 10  # classifier outputs
    in_channels: int = 3  # input image channels
    image_size: int = 32  # side of the square input image (only used to make example inputs)

    def __post_init__(self):
        self.channels, self.blocks = tuple(self.channels), tuple(self.blocks)
        if len(self.channels) != len(self.blocks) or not self.channels:
            raise ValueError(
                f"ResNetCNNConfig: channels={self.channels} and blocks={self.blocks} must be "
                "non-empty and of the same length (one entry per stage)"
            )


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:  # project the residual to the new shape
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))  # (B, out_ch, H/s, W/s)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCNN(nn.Module):
    def __init__(self, config: ResNetCNNConfig):
        super().__init__()
        self.config = config
        c0 = config.channels[0]
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, c0, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(c0),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, c0, H/2, W/2)
        )
        stages, in_ch = [], c0
        for i, (out_ch, n) in enumerate(zip(config.channels, config.blocks)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_ch if j == 0 else out_ch, out_ch, stride if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, config.num_classes)

    def forward(self, x, targets=None):
        x = self.stages(self.stem(x))  # (B, C_last, H', W')
        logits = self.fc(torch.flatten(self.pool(x), 1))  # (B, num_classes)
        if targets is None:
            return logits
        return F.cross_entropy(logits, targets)
