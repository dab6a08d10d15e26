"""ST-Net's network: a DenseNet-121 trunk from the encoder zoo and a linear layer to the panel.

He et al. 2020 (Nat Biomed Eng) fine-tune torchvision's DenseNet-121 with its 1000-way classifier
replaced by a Linear(1024, n_genes); the trunk here is the zoo's DenseNet (same torchvision class,
same ImageNet checkpoint), so the only new module is the head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

N_DIHEDRAL = 8


def dihedral_tensor(images: torch.Tensor, code: int) -> torch.Tensor:
    """`stbench.data.datamodule.dihedral` on a (B, C, H, W) batch: rotate by 90 deg x (code % 4)
    counter-clockwise in the (H, W) plane, then mirror left-right when code >= 4."""
    out = torch.rot90(images, code % 4, dims=(-2, -1))
    return out.flip(-1) if code >= 4 else out


def dihedral_mean(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Mean of fn over the 8 dihedral transforms of `images` (ST-Net's `--average`). One transform
    at a time, so peak memory is that of a single pass."""
    total = None
    for code in range(N_DIHEDRAL):
        out = fn(dihedral_tensor(images, code)).float()
        total = out if total is None else total + out
    return total / N_DIHEDRAL


class StNetNet(nn.Module):
    """images in [0, 1] -> resize to the trunk's input -> (x - pixel_mean) / pixel_std -> DenseNet
    features -> ReLU -> global average pool -> Linear(dim, n_genes).

    The normalisation statistics are buffers of this module (saved in checkpoints) rather than the
    encoder's fixed ImageNet ones, because ST-Net normalises with channel statistics estimated on
    its training patches (`set_pixel_stats`)."""

    def __init__(self, encoder: nn.Module, n_genes: int) -> None:
        super().__init__()
        trunk = encoder.net.net
        if hasattr(trunk, "classifier"):  # torchvision's ImageNet classifier: never used, not counted
            trunk.classifier = nn.Identity()
        self.encoder = encoder
        self.input_px = int(encoder.input_px)
        self.resize = str(encoder.spec.resize)
        self.head = nn.Linear(int(encoder.dim), n_genes)
        self.register_buffer("pixel_mean", torch.tensor(encoder.spec.mean).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(encoder.spec.std).view(1, 3, 1, 1))

    def set_pixel_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.pixel_mean.copy_(mean.reshape(1, 3, 1, 1))
        self.pixel_std.copy_(std.reshape(1, 3, 1, 1).clamp_min(1e-6))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        px = self.input_px
        if x.shape[-2:] != (px, px):
            x = F.interpolate(x, size=(px, px), mode=self.resize, antialias=True).clamp(0.0, 1.0)
        return self.encoder.net((x - self.pixel_mean) / self.pixel_std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, n_genes)."""
        return self.head(self.features(images))
