"""EDM2 training loss with learned per-sigma uncertainty (EDM2 eqs. 14-16, 21; DiffBulk eqs. 8-9).

ln sigma ~ N(P_mean, P_std^2) with (-0.4, 1.0) (DiffBulk / EDM2 img512 presets); the EDM weight
lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 makes the effective target of F unit-variance; the
per-element loss is lambda / exp(u(sigma)) * (D - y)^2 + u(sigma), u the network's log-variance head.

Reduction: EDM2 sums that per-element loss over every element and divides by the batch size. Here
`per_sample_loss` returns one value per sample, the MEAN over C, H, W by default (the same minimiser
and, with Adam, practically the same updates, since Adam is invariant to a constant loss scale up to
eps); `element_reduction="sum"` gives EDM2's per-sample sum exactly.
"""

from __future__ import annotations

import torch


def loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out(sigma)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def uncertainty_loss(
    denoised: torch.Tensor,
    target: torch.Tensor,
    sigma: torch.Tensor,
    logvar: torch.Tensor,
    sigma_data: float = 0.5,
    element_reduction: str = "mean",
) -> torch.Tensor:
    """Per-sample EDM2 loss from given D, y, sigma (N, 1, 1, 1) and logvar (N, 1, 1, 1) -> (N,)."""
    per_element = loss_weight(sigma, sigma_data) / logvar.exp() * (denoised - target) ** 2 + logvar
    dims = list(range(1, per_element.ndim))
    if element_reduction == "mean":
        return per_element.mean(dim=dims)
    if element_reduction == "sum":
        return per_element.sum(dim=dims)
    raise ValueError(f"element_reduction must be 'mean' or 'sum', got {element_reduction!r}")


class EDM2Loss:
    def __init__(
        self,
        p_mean: float = -0.4,
        p_std: float = 1.0,
        sigma_data: float = 0.5,
        element_reduction: str = "mean",
    ) -> None:
        self.p_mean, self.p_std, self.sigma_data = float(p_mean), float(p_std), float(sigma_data)
        self.element_reduction = element_reduction

    def sample_sigma(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """(n, 1, 1, 1) log-normal noise levels drawn from `generator` (on its own device)."""
        gdev = generator.device if generator is not None else device
        z = torch.randn(n, 1, 1, 1, generator=generator, device=gdev).to(device)
        return (z * self.p_std + self.p_mean).exp()

    def __call__(
        self,
        net: torch.nn.Module,
        images: torch.Tensor,
        cond: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        cond_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample loss (N,) for clean images y (N, C, H, W) in [-1, 1]; sigma and noise come from
        `generator` so a seeded run is reproducible. `net` is a Precond (returns D and logvar)."""
        sigma = self.sample_sigma(images.shape[0], generator, images.device)
        gdev = generator.device if generator is not None else images.device
        noise = torch.randn(images.shape, generator=generator, device=gdev).to(images.device) * sigma
        denoised, logvar = net(images + noise, sigma.flatten(), cond, return_logvar=True, cond_mask=cond_mask)
        return uncertainty_loss(denoised, images, sigma, logvar, self.sigma_data, self.element_reduction)
