"""Augmented views for Hist2ST's self-distillation.

One view = one random transform applied to every spot patch of the slide alike (the authors
transform the whole (N, 3, H, W) stack at once): grayscale with probability 0.1, a rotation by an
angle uniform in [-90, 90] degrees (nearest neighbour, black fill), a horizontal flip with
probability 0.2 - torchvision's RandomGrayscale(0.1), RandomRotation(90), RandomHorizontalFlip(0.2).
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF


def slide_view(
    images: torch.Tensor,
    p_gray: float = 0.1,
    max_degrees: float = 90.0,
    p_flip: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(N, 3, H, W) -> one augmented view of the same shape."""
    draws = torch.rand(3, generator=generator)
    out = images
    if draws[0] < p_gray:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    angle = float((draws[1] * 2.0 - 1.0) * max_degrees)
    out = TF.rotate(out, angle, interpolation=TF.InterpolationMode.NEAREST, fill=0.0)
    if draws[2] < p_flip:
        out = TF.horizontal_flip(out)
    return out
