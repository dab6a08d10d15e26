"""STMDiT's two training objectives on latents, with their samplers.

- `ddpm`: linear betas over T = 1,000 steps, eps prediction with a learned variance (the DiT's 32
  output channels = 16 eps + 16 variance interpolation), improved-DDPM hybrid loss; DDIM sampler
  (50 steps). The Gaussian process itself is Stem's (`stbench/methods/toolkit/diffusion.py`), which
  works on flat rows: latents (B, C, H, W) are viewed as (B, C*H*W) and the network output as (B, 2, C*H*W).
- `flow`: rectified-flow matching, x_t = (1 - t) x0 + t noise, the network predicts the velocity
  noise - x0 (its first 16 channels; the variance channels are unused); Euler sampler over 50 steps
  from t = 1 to 0. The network is told t * 1,000 so both objectives share the timestep embedding.

Samplers take a guided model function (see guidance.py) and per-spot generators, so a tile depends
only on its spot's seed, not on its batch or rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from stbench.methods.toolkit.diffusion import GaussianDiffusion, randn

OBJECTIVES = ("ddpm", "flow")
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B,C,H,W), t (B,)) -> (B, 2C, H, W)


def _rows(out: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, 2C, H, W) network output -> (B, 2, C*H*W) as the Gaussian process expects."""
    b = out.shape[0]
    return torch.stack([out[:, :channels].reshape(b, -1), out[:, channels:].reshape(b, -1)], dim=1)


class LatentObjective:
    def __init__(self, kind: str = "ddpm", num_steps: int = 1000, vlb_lambda: float = 1e-3) -> None:
        if kind not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {kind!r}")
        self.kind, self.num_steps, self.vlb_lambda = kind, num_steps, vlb_lambda
        self.diffusion = GaussianDiffusion.linear(num_steps) if kind == "ddpm" else None

    def loss(
        self, predict: Predict, x0: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Per-sample training loss (B,) on clean latents x0."""
        b, c = x0.shape[:2]
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        if self.kind == "flow":
            t = torch.rand(b, generator=generator).to(x0)
            tt = t.view(b, *([1] * (x0.dim() - 1)))
            xt = (1 - tt) * x0 + tt * noise
            v = predict(xt, t * self.num_steps)[:, :c]
            return ((v - (noise - x0)) ** 2).flatten(1).mean(1)
        t = torch.randint(0, self.num_steps, (b,), generator=generator).to(x0.device)
        shape = x0.shape

        def model(xt_rows: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
            return _rows(predict(xt_rows.view(shape), t_model.float()), c)

        terms = self.diffusion.training_losses(model, x0.flatten(1), t, noise.flatten(1), self.vlb_lambda)
        return terms["loss"]

    @torch.no_grad()
    def sample(
        self,
        predict: Predict,
        shape: Sequence[int],
        generators: Sequence[torch.Generator],
        steps: int = 50,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Latents (B, C, H, W): DDIM (ddpm) or Euler (flow) over `steps` steps."""
        b, c = shape[0], shape[1]
        if self.kind == "flow":
            x = randn(tuple(shape), list(generators), device)
            grid = torch.linspace(1.0, 0.0, steps + 1)
            for i in range(steps):
                t = torch.full((b,), float(grid[i]), device=x.device)
                v = predict(x, t * self.num_steps)[:, :c]
                x = x + (grid[i + 1] - grid[i]).item() * v
            return x

        def model(x_rows: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
            return _rows(predict(x_rows.view(*shape), t_model.float()), c)

        flat = (b, int(torch.tensor(shape[1:]).prod()))
        rows = self.diffusion.sample_ddim(model, flat, list(generators), device, steps=steps)
        return rows.view(*shape)
