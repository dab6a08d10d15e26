"""DeepSpaCE's network: torchvision VGG16 with its last classifier layer replaced by one output per
gene (Monjo et al. 2022, Sci Rep; `make_model` in tmonjo/DeepSpaCE DeepSpaceLib.py).

The convolutional trunk is the encoder zoo's `vgg16` (same torchvision layers and ImageNet
checkpoint); the classifier (adaptive 7x7 average pool -> flatten -> Linear 25088->4096 -> ReLU ->
Dropout -> Linear 4096->4096 -> ReLU -> Dropout) is rebuilt here with torchvision's layer order, so
the checkpoint's `classifier.0` / `classifier.3` weights load into it; `head` is the new last layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _trunk(encoder: nn.Module) -> nn.Module:
    """The zoo's VGG conv trunk (torchvision `make_layers`), without its global average pool."""
    return encoder.net.net


class DeepSpaCENet(nn.Module):
    """images in [0, 1] -> the encoder's resize + ImageNet normalisation -> VGG conv trunk ->
    AdaptiveAvgPool(pool) -> classifier (hidden layers) -> head Linear(hidden[-1], n_genes)."""

    def __init__(
        self,
        encoder: nn.Module,
        n_genes: int,
        hidden: Sequence[int] = (4096, 4096),
        pool: int = 7,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        trunk = _trunk(encoder)
        with torch.no_grad():
            was_training = trunk.training
            channels = int(trunk.eval()(torch.zeros(1, 3, 64, 64)).shape[1])
            trunk.train(was_training)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        layers: list[nn.Module] = []
        width = channels * pool * pool
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = int(h)
        self.classifier = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_genes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, n_genes)."""
        x = _trunk(self.encoder)(self.encoder.preprocess(images))
        return self.head(self.classifier(self.pool(x).flatten(1)))
