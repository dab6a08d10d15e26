"""A small convolutional network trained from scratch on spot patches (stbench's reference model)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Fixed input normalisation (ImageNet statistics): a convention, not learned from any split.
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class PatchCNNNet(nn.Module):
    """Conv blocks (two 3x3 convs + BN + ReLU, then 2x2 max-pool) -> global average pool -> linear."""

    def __init__(
        self, n_genes: int, channels: Sequence[int] = (32, 64, 128, 256), dropout: float = 0.2
    ) -> None:
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            layers.append(conv_block(c_in, c))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, n_genes)
        self.register_buffer("rgb_mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1))
        self.register_buffer("rgb_std", torch.tensor(RGB_STD).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: (B, 3, H, W) in [0, 1] -> (B, n_genes)."""
        x = (image - self.rgb_mean) / self.rgb_std
        x = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(x))
