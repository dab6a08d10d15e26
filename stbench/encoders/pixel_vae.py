"""A lossless stand-in for the VAE in tests and CI: pixel-unshuffle "latents" (space-to-depth by f).

Why: the SD3 VAE's weights are gated and absent offline, and a random-init VAE cannot reconstruct a
tile, so a tiny run with it could never produce tiles resembling real ones however well the denoiser
learned. Space-to-depth is exactly invertible (decode(encode(x)) = x), so a tiny STMDiT run measures
the denoiser and the conditioning, not a random decoder. Latents are the [-1, 1] pixels rearranged to
(3 f^2, H/f, W/f) with scale 1 and shift 0; the posterior std is 0 (a deterministic encoder).
Rows using it say `vae=pixels(f=...)`: it is not the paper's latent space.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stbench.encoders.vae import LatentVAE


class _Posterior:
    def __init__(self, mean: torch.Tensor) -> None:
        self.mean, self.std = mean, torch.zeros_like(mean)


class _Out:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class PixelUnshuffle(nn.Module):
    """AutoencoderKL-shaped (encode(x).latent_dist, decode(z).sample) space-to-depth by `factor`."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = int(factor)

    def encode(self, x: torch.Tensor) -> _Out:
        return _Out(latent_dist=_Posterior(F.pixel_unshuffle(x, self.factor)))

    def decode(self, z: torch.Tensor) -> _Out:
        return _Out(sample=F.pixel_shuffle(z, self.factor))


class PixelLatentVAE(LatentVAE):
    def __init__(self, factor: int = 4) -> None:
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"pixel VAE factor must be a power of two, got {factor}")
        super().__init__(
            PixelUnshuffle(factor),
            weights_id=f"pixels(f={factor})",
            scaling_factor=1.0,
            shift_factor=0.0,
            name=f"pixels-f{factor}",
        )
        self.factor = int(factor)

    @property
    def latent_channels(self) -> int:
        return 3 * self.factor**2

    @property
    def downsample(self) -> int:
        return self.factor

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "input": "2*img-1", "scaling_factor": 1.0, "shift_factor": 0.0}


def parse_pixels(source: str) -> int | None:
    """The factor of a "pixels[:f]" source (default 4), None for any other source."""
    name, _, arg = source.partition(":")
    return (int(arg) if arg else 4) if name == "pixels" else None
