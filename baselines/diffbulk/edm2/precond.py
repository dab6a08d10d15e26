"""EDM preconditioning around the U-Net, plus EDM2's learned per-sigma uncertainty.

D(x; sigma, cond) = c_skip x + c_out F(c_in x; c_noise, cond) with sigma_data = 0.5 and
c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2),
c_noise = ln(sigma) / 4 (DiffBulk eq. 3 and Sec. IV-B; EDM2). Why: the network input and its
training target both have unit variance at every sigma, so one network serves all noise levels.

The uncertainty head u(sigma) = MPConv(MPFourier(c_noise)) (128 Fourier channels -> 1) is EDM2's
learned log-variance: the loss divides each sigma's error by exp(u) and adds u, which balances the
noise levels automatically. It only matters for training; sampling and feature taps ignore it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .mp import MPConv, MPFourier
from .unet import UNet


class Precond(nn.Module):
    def __init__(self, sigma_data: float = 0.5, logvar_channels: int = 128, **unet_kwargs: object) -> None:
        super().__init__()
        self.sigma_data = float(sigma_data)
        self.unet = UNet(**unet_kwargs)
        self.img_resolution, self.img_channels = self.unet.img_resolution, self.unet.img_channels
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, ())

    def coefficients(
        self, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) for sigma of shape (N, 1, 1, 1); c_noise is flattened to (N,)."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.flatten().log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        cond: torch.Tensor | None = None,
        taps: str | None = None,
        return_logvar: bool = False,
        cond_mask: torch.Tensor | None = None,
        authors_quirks: bool = False,
    ) -> torch.Tensor | tuple:
        """Denoise x (N, C, H, W) at noise level sigma (scalar or (N,)).

        Returns D, or a tuple (D, logvar (N, 1, 1, 1)) with return_logvar, with the features dict of
        `UNet.forward` appended last when `taps` is given: (D, feats) or (D, logvar, feats).
        """
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        sigma = sigma.reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        res = self.unet(
            c_in * x, c_noise, cond, taps=taps, cond_mask=cond_mask, authors_quirks=authors_quirks
        )
        f_x, feats = res if taps is not None else (res, None)
        d_x = c_skip * x + c_out * f_x.to(torch.float32)
        out: tuple = (d_x,)
        if return_logvar:
            out += (self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1),)
        if taps is not None:
            out += (feats,)
        return out[0] if len(out) == 1 else out


@torch.no_grad()
def extract_features(
    net: Precond,
    x: torch.Tensor,
    sigma: float = 0.01,
    taps: str = "decoder",
    generator: torch.Generator | None = None,
    authors_quirks: bool = False,
) -> OrderedDict[str, torch.Tensor]:
    """Stage II features: noise the clean tile x ([-1, 1] scale) with N(0, sigma^2) drawn from
    `generator` (seeded per batch by the caller for reproducibility), run the frozen network without a
    gene condition and return the tapped activations. sigma = 0 adds no noise, but c_noise = ln(sigma)/4
    needs sigma > 0, so the network is then told sigma = 1e-8 (the paper's sigma = 0 row does not say
    what the authors passed; their extractor would produce NaN at exactly 0)."""
    device = x.device if generator is None else generator.device
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=device).to(x.device)
    noisy = x.to(torch.float32) + noise * sigma
    _, feats = net(noisy, max(sigma, 1e-8), None, taps=taps, authors_quirks=authors_quirks)
    return feats
