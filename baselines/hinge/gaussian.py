"""A small DDPM for HINGE's Gauss-Diff ablation (Table 3): Gaussian noise on every gene, x0-prediction.

Linear beta over T steps (t = 1..T, alpha_bar_0 = 1); the network predicts x0 (HINGE's decoder
outputs expression), the loss is MSE on every gene, and sampling is ancestral DDPM over a K-step
respacing of t = T..0 (posterior q(x_s | x_t, x0_hat) between consecutive kept steps). Independent
of Stem's diffusion code on purpose: this ablation only needs the forward process and the sampler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from baselines.hinge.masking import step_times


class GaussianDiffusion:
    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        self.T = int(T)
        betas = torch.linspace(beta_start, beta_end, self.T, dtype=torch.float64)
        self.alpha_bars = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(1, self.T + 1, (n,), generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t (n,)."""
        ab = self.alpha_bars[t.cpu()].to(device=x0.device, dtype=x0.dtype).unsqueeze(1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    @torch.no_grad()
    def sample(
        self, predict: Callable[[torch.Tensor, int], torch.Tensor], noise: torch.Tensor, K: int
    ) -> torch.Tensor:
        """noise (K' + 1, n, G) pre-drawn (x_T, then one draw per step; K' = len(steps) - 1) so the
        caller controls the randomness (per-spot generators)."""
        ts = step_times(self.T, K)
        if noise.shape[0] < len(ts):
            raise ValueError(f"need {len(ts)} noise draws for {len(ts) - 1} steps, got {noise.shape[0]}")
        x = noise[0]
        for i, (t, s) in enumerate(zip(ts[:-1], ts[1:], strict=True)):
            x0 = predict(x, t).to(x.dtype)
            if s == 0:
                return x0
            ab_t, ab_s = float(self.alpha_bars[t]), float(self.alpha_bars[s])
            a_ts = ab_t / ab_s
            mean = (ab_s**0.5 * (1 - a_ts) / (1 - ab_t)) * x0 + (a_ts**0.5 * (1 - ab_s) / (1 - ab_t)) * x
            var = (1 - a_ts) * (1 - ab_s) / (1 - ab_t)
            x = mean + var**0.5 * noise[i + 1]
        return x
