"""Magnitude-preserving (MP) primitives of EDM2 (Karras et al., CVPR 2024), as DiffBulk uses them.

Why they exist: EDM2 removes every normalisation layer and bias and instead keeps the expected
magnitude (RMS) of every activation at 1 by construction. Each primitive below maps unit-RMS inputs
to unit-RMS outputs (for uncorrelated inputs), so the network's activations and the effective
learning rate stay stable without group norms or weight decay:
- `normalize` rescales a tensor so each slice along the first axis has RMS 1;
- `MPConv` uses *forced* weight normalisation: in train mode the stored weights are re-normalised
  in place (under no_grad) before every forward, and the forward also normalises (so gradients are
  taken through the normalisation), then scales by gain / sqrt(fan_in);
- `mp_silu` divides SiLU by 0.596, SiLU's output RMS for a standard normal input;
- `mp_sum` / `mp_cat` are weighted sum / concatenation whose weights are renormalised by the
  balance t so that the result keeps unit RMS;
- `MPFourier` gives random Fourier features cos(2 pi (f x + phi)) * sqrt(2) (RMS 1);
- `resample` is a box-filter (the [1, 1] filter) down/up-sampler (average / nearest, depthwise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MP_SILU_DIVISOR = 0.596  # E[silu(z)^2]^0.5 for z ~ N(0, 1) (EDM2 eq. 81)


def normalize(x: torch.Tensor, dim: Sequence[int] | int | None = None, eps: float = 1e-4) -> torch.Tensor:
    """Rescale x so that it has RMS 1 over `dim` (default: all but the first axis).

    The norm is divided by sqrt(#elements reduced) so the target is unit RMS, not unit L2 norm, and
    eps is added to the (rescaled) norm so an all-zero slice stays finite.
    """
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def pixel_norm(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Unit RMS over channels at every pixel (EDM2's replacement for group norm in encoder blocks)."""
    return normalize(x, dim=1, eps=eps)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU rescaled to keep unit RMS for standard-normal inputs."""
    return F.silu(x) / MP_SILU_DIVISOR


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """(1 - t) a + t b, divided by sqrt((1 - t)^2 + t^2) so two independent unit-RMS inputs give
    a unit-RMS output; t is the weight of b (t = 0.3 in residual blocks, 0.5 for embeddings)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenate a and b along `dim` with weights chosen so the result has unit RMS and b's share of
    the total energy is governed by t, independently of the two channel counts."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    wa = c / math.sqrt(na) * (1 - t)
    wb = c / math.sqrt(nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


def resample(x: torch.Tensor, mode: str = "keep", filt: Sequence[float] = (1.0, 1.0)) -> torch.Tensor:
    """Depthwise separable-filter resampling: 'keep' is the identity, 'down' filters then strides by 2
    (a 2x2 average for the default box filter), 'up' is the transposed op with the filter x 4 (nearest
    neighbour for the box filter). EDM2 uses no learned resampling so magnitudes stay predictable."""
    if mode == "keep":
        return x
    if mode not in ("down", "up"):
        raise ValueError(f"resample mode must be 'keep', 'down' or 'up', got {mode!r}")
    f = torch.as_tensor(list(filt), dtype=torch.float32)
    if f.ndim != 1 or len(f) % 2 != 0:
        raise ValueError(f"resample filter must be 1-d with even length, got {list(filt)}")
    pad = (len(f) - 1) // 2
    f = f / f.sum()
    kernel = torch.outer(f, f)[None, None].to(device=x.device, dtype=x.dtype)
    c = x.shape[1]
    if mode == "down":
        return F.conv2d(x, kernel.tile(c, 1, 1, 1), groups=c, stride=2, padding=pad)
    return F.conv_transpose2d(x, (kernel * 4).tile(c, 1, 1, 1), groups=c, stride=2, padding=pad)


class MPFourier(nn.Module):
    """Fixed random Fourier features of a scalar (the noise level c_noise), RMS 1 per channel.

    Frequencies ~ N(0, bandwidth^2) and phases ~ U(0, 1) (both x 2 pi) are drawn from a private
    generator seeded with `seed`, so construction is deterministic without touching the global RNG.
    They are buffers: not trained, but saved with the model.
    """

    def __init__(self, num_channels: int, bandwidth: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels, generator=g) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, C)
        y = torch.outer(x.to(torch.float32).flatten(), self.freqs.to(torch.float32))
        y = torch.cos(y + self.phases.to(torch.float32)) * math.sqrt(2)
        return y.to(x.dtype)


class MPConv(nn.Module):
    """Bias-free magnitude-preserving convolution (kernel (k, k)) or linear layer (kernel ()).

    Weights start ~ N(0, 1). forward(x, gain): in train mode the stored weight is first replaced by
    its normalised version (forced weight normalisation, so the raw weight norm cannot grow and the
    effective learning rate stays constant); then normalise again (differentiably) and scale by
    gain / sqrt(fan_in). `gain` may be a learnable scalar tensor (e.g. the zero-initialised output
    gain), which makes the layer output exactly 0 until the gain moves.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int] = ()) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self._normalized_version = -1

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        # Forced normalisation once per weight update: a layer called twice in one forward (the
        # noise embedding under a per-sample condition mask) must not bump the weight's version
        # after the first call saved it for backward.
        if self.training and self.weight._version != self._normalized_version:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
            self._normalized_version = self.weight._version
        w = normalize(w)
        w = w * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        if w.ndim != 4:
            raise ValueError(f"MPConv supports kernel () or (k, k), weight has shape {tuple(w.shape)}")
        return F.conv2d(x, w, padding=w.shape[-1] // 2)
