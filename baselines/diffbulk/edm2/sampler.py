"""Deterministic EDM sampler (Karras et al. 2022, Alg. 1; the sampler EDM2 uses), seeded by a generator.

Why this sampler: the EDM ODE dx/dsigma = (x - D(x; sigma)) / sigma integrated with Heun's 2nd-order
method on the rho = 7 schedule sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho,
i = 0..n-1, then sigma_n = 0 (the last step is a plain Euler step). No stochastic churn: given the
initial noise the result is a deterministic function of the denoiser, which is what we want for
reproducible tiles. The only randomness is the initial noise, drawn from `generator`.

Guidance: DiffBulk's PMS trains the same network with and without the gene condition, so
classifier-free guidance is available: D = D(x; sigma) + w (D(x; sigma, cond) - D(x; sigma)), i.e.
D_uncond.lerp(D_cond, w) as in EDM2's sampler (w = 1: purely conditional, no unconditional pass).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def sigma_steps(
    num_steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """(num_steps + 1,) float64 noise levels from sigma_max down to sigma_min, then 0."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    i = torch.arange(num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    steps = (hi + i / (num_steps - 1) * (lo - hi)) ** rho
    return torch.cat([steps, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def edm_sample(
    net: Denoiser,
    shape: tuple[int, ...],
    cond: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    guidance: float = 1.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Generate a batch of `shape` (N, C, H, W) from `net(x, sigma (N,), cond) -> D` (e.g. a Precond).

    cond=None samples unconditionally; guidance != 1 needs a condition and runs the net twice per
    evaluation. Noise is drawn on the generator's device and moved to `device`.
    """
    if guidance != 1.0 and cond is None:
        raise ValueError("classifier-free guidance (guidance != 1) needs a condition")

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(torch.float32).expand(x.shape[0])
        d = net(x, s, cond).to(torch.float64)
        if guidance == 1.0:
            return d
        return net(x, s, None).to(torch.float64).lerp(d, guidance)

    gdev = generator.device if generator is not None else device
    noise = torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32).to(device)
    t_steps = sigma_steps(num_steps, sigma_min, sigma_max, rho).to(device)
    x = noise.to(torch.float64) * t_steps[0]
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        d_cur = (x - denoise(x.float(), t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if i < num_steps - 1:  # Heun correction (not at the final step to sigma = 0)
            d_next = (x_next - denoise(x_next.float(), t_next)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.to(torch.float32)
