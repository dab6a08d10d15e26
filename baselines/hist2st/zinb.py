"""Zero-inflated negative binomial (ZINB) head activations and negative log-likelihood (Hist2ST).

Parameterisation (as in DCA / Hist2ST): mean mu > 0 (scaled by the spot's size factor), dispersion
theta > 0 (NB variance mu + mu^2 / theta), dropout probability pi in (0, 1):
    P(0) = pi + (1 - pi) * (theta / (theta + mu))^theta
    P(x > 0) = (1 - pi) * NB(x; mu, theta)
Small eps terms keep logarithms finite at the activation clamps (the authors' loss uses the same 1e-10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-10


class MeanAct(nn.Module):
    """exp, clamped to [1e-5, 1e6]: a positive NB mean that cannot overflow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.exp(x), min=1e-5, max=1e6)


class DispAct(nn.Module):
    """softplus, clamped to [1e-4, 1e4]: a positive dispersion."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(F.softplus(x), min=1e-4, max=1e4)


def zinb_nll(
    x: torch.Tensor,
    mean: torch.Tensor,
    disp: torch.Tensor,
    pi: torch.Tensor,
    scale_factor: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Element-wise ZINB negative log-likelihood of counts `x` (N, G); `scale_factor` (N,) multiplies
    the mean per spot (library-size normalisation). Reduce the result as you need."""
    if isinstance(scale_factor, torch.Tensor):
        scale_factor = scale_factor.reshape(-1, 1)
    mu = mean * scale_factor
    log_theta_mu = torch.log(disp + mu + EPS)
    log_p0_nb = disp * (torch.log(disp + EPS) - log_theta_mu)  # log NB(0) = theta * log(theta / (theta + mu))
    log_nb = (
        torch.lgamma(x + disp + EPS)
        - torch.lgamma(disp + EPS)
        - torch.lgamma(x + 1.0)
        + log_p0_nb
        + x * (torch.log(mu + EPS) - log_theta_mu)
    )
    nll_zero = -torch.log(pi + (1.0 - pi) * torch.exp(log_p0_nb) + EPS)
    nll_pos = -torch.log(1.0 - pi + EPS) - log_nb
    return torch.where(x <= 1e-8, nll_zero, nll_pos)
