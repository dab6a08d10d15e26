"""A tiny encoder with the Issue-4 `Encoder` interface, for feature-store and probe tests.

Why: tests must count forward calls and run in seconds on CPU; the real zoo is tested elsewhere.
Output = per-channel 4x4 average pooling of the [0, 1] image and its square (96-d), plus a fixed
random projection: informative about the synthetic morphology, deterministic, no training needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StandInSpec:
    name: str = "standin"
    arch: str = "pool4"
    dim: int = 104
    input_px: int = 16
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)
    mpp: float | None = None
    token: str = "pooled"


class StandInEncoder(nn.Module):
    def __init__(
        self, name: str = "standin", weights_id: str = "none", seed: int = 0, dim: int = 104
    ) -> None:
        super().__init__()
        self.spec = StandInSpec(name=name, dim=dim)
        self.weights_id = weights_id
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Linear(96, dim - 96)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(dim - 96, 96, generator=g) * 0.1)
            self.proj.bias.zero_()
        self.calls = 0
        self.patches_seen = 0
        self.fail_after: int | None = None  # raise on the call after this many calls

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.patches_seen += images.shape[0]
        x = nn.functional.interpolate(images, size=self.spec.input_px, mode="bilinear", antialias=True)
        p = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        h = torch.cat([p, p**2], 1)
        return torch.cat([h, self.proj(h)], 1)


class TinyConvEncoder(nn.Module):
    """A trainable two-layer CNN with the Encoder interface (for end-to-end fine-tuning tests)."""

    def __init__(self, name: str = "tinyconv", weights_id: str = "none", dim: int = 32) -> None:
        super().__init__()
        self.spec = StandInSpec(name=name, arch="cnn2", dim=dim)
        self.weights_id = weights_id
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, dim, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)
