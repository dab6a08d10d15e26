"""Gaussian diffusion over expression vectors, as Stem trains and samples it (improved-DDPM recipe).

Facts (Stem's code, SichenZhu/Stem `Stem/diffusion`, itself derived from improved-DDPM / DiT):
- linear beta schedule over T = 1,000 steps from 1e-4 to 0.02, both scaled by 1000 / T so other T
  keep the same overall noise;
- the network predicts epsilon and a variance interpolation v: log var = f log beta_t +
  (1 - f) log beta~_t with f = (v + 1) / 2 (v unconstrained; beta~ = clipped posterior variance);
- hybrid loss: MSE(eps) + VLB term of the sampled t, in bits, with the mean detached so the VLB
  trains only the variance. improved-DDPM writes it L_simple + lambda L_vlb with lambda = 0.001
  and L_vlb = T * E_t[L_t]; Stem's code adds the per-t term with weight 1 (= 0.001 x 1000), which
  is what `vlb_lambda * T` gives here;
- the decoder term at t = 0: the code keeps improved-DDPM's discretised Gaussian (uint8 images in
  [-1, 1]); expression is continuous, so the default here is the continuous Gaussian NLL
  (`decoder_nll="discretized"` restores the code's choice). Neither sampler uses the t = 0
  variance, so the choice only changes a 1-in-T training term;
- no clipping of the predicted x0 (the code samples with clip_denoised=False); `clip=(lo, hi)`
  optionally clamps it (improved-DDPM's clip_denoised, with the data range instead of [-1, 1]);
- samplers: ancestral over all kept steps (1,000 by default) and DDIM (eta 0) over a sub-sequence
  of steps; both run on a "respaced" process whose betas are re-derived from alpha_bar at the kept
  steps, and the network always sees the original step index.

Every sampler draws its noise from the given torch.Generator, or from one generator per block of
rows (a sequence of generators): then each spot's samples depend only on its own generator, so a
spot's prediction is the same whatever batch or rank it lands in.

Shared by Stem (expression vectors) and STMDiT (VAE latents), hence in the toolkit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, G), t (B,)) -> (B, 2, G)
Generators = torch.Generator | Sequence[torch.Generator]
Clip = tuple[torch.Tensor, torch.Tensor]  # (lo, hi), each broadcastable to (B, G)
DECODER_NLL = ("continuous", "discretized")
LN2 = math.log(2.0)


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al.'s linear schedule, endpoints scaled by 1000 / T (float64)."""
    scale = 1000.0 / num_steps
    return np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)


def spaced_steps(num_steps: int, count: int) -> list[int]:
    """`count` steps of 0..T-1, evenly spaced and always including the first and the last."""
    if not 1 <= count <= num_steps:
        raise ValueError(f"sample steps must be in [1, {num_steps}], got {count}")
    if count == 1:
        return [num_steps - 1]
    return sorted({round(i * (num_steps - 1) / (count - 1)) for i in range(count)})


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str) -> torch.Tensor:
    """Standard normal noise; with a sequence of k generators, rows are split into k equal blocks
    and block i is drawn from generator i (its own stream, independent of the other rows)."""
    shape = tuple(shape)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device).to(device)
    gens = list(generator)
    if not gens or shape[0] % len(gens):
        raise ValueError(f"{len(gens)} generators cannot split {shape[0]} rows into equal blocks")
    block = (shape[0] // len(gens), *shape[1:])
    parts = [torch.randn(block, generator=g, device=g.device).to(device) for g in gens]
    return torch.cat(parts, dim=0)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def continuous_nll(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """-log N(x; mean, e^log_var) elementwise, in nats."""
    return 0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def _approx_cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF, tanh approximation (as improved-DDPM uses)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_nll(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """-log of the Gaussian mass of x's bin of width 2/255 in [-1, 1] (edge bins open), in nats."""
    inv_std = torch.exp(-0.5 * log_var)
    upper = _approx_cdf(inv_std * (x - mean + 1.0 / 255.0))
    lower = _approx_cdf(inv_std * (x - mean - 1.0 / 255.0))
    mass = torch.where(x < -0.999, upper, torch.where(x > 0.999, 1.0 - lower, upper - lower))
    return -torch.log(mass.clamp(min=1e-12))


class GaussianDiffusion:
    """Schedule quantities (float64 numpy, gathered per row as float32 tensors) and the operations
    on them. `timestep_map[i]` = the original step the network is told for step i of this process
    (the identity unless this process was made by `respaced`)."""

    def __init__(self, betas: np.ndarray, timestep_map: Sequence[int] | None = None) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-d array in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0): variance beta~_t (0 at t = 0, so its log is clipped to the t = 1 value)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:]) if len(pv) > 1 else pv)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        self.log_betas = np.log(betas)
        self._device_cache: dict[tuple[int, str], torch.Tensor] = {}

    @classmethod
    def linear(
        cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> GaussianDiffusion:
        return cls(linear_betas(num_steps, beta_start, beta_end))

    def respaced(self, steps: Sequence[int]) -> GaussianDiffusion:
        """The process restricted to `steps` (sorted original indices): betas from alpha_bar ratios."""
        steps = sorted(int(s) for s in steps)
        ab = self.alphas_cumprod[steps]
        betas = 1.0 - ab / np.append(1.0, ab[:-1])
        return GaussianDiffusion(betas, timestep_map=self.timestep_map[steps])

    # ---- gathering ------------------------------------------------------------------------------
    def _at(self, arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """arr[t] as a (B, 1, ...) tensor broadcastable against `like` (values computed in float64;
        each schedule array is copied to a device once)."""
        key = (id(arr), str(t.device))
        if key not in self._device_cache:
            self._device_cache[key] = torch.from_numpy(arr).to(device=t.device)
        out = self._device_cache[key][t].to(like.dtype)
        return out.view(-1, *([1] * (like.dim() - 1)))

    # ---- forward process ------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        return (
            self._at(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        )
        return (
            mean,
            self._at(self.posterior_variance, t, xt),
            self._at(self.posterior_log_variance_clipped, t, xt),
        )

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            self._at(self.sqrt_recip_alphas_cumprod, t, xt) * xt
            - self._at(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps
        )

    # ---- reverse process ------------------------------------------------------------------------
    def p_mean_variance(
        self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip: Clip | None = None
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from the network output (B, 2, G) = (eps, v); `clip` bounds x0."""
        eps, v = out[:, 0], out[:, 1]
        frac = (v + 1.0) / 2.0
        min_log = self._at(self.posterior_log_variance_clipped, t, xt)
        max_log = self._at(self.log_betas, t, xt)
        log_var = frac * max_log + (1.0 - frac) * min_log
        x0 = self.predict_x0(xt, t, eps)
        if clip is not None:
            x0 = torch.maximum(torch.minimum(x0, clip[1]), clip[0])
        mean, _, _ = self.q_posterior(x0, xt, t)
        return {"mean": mean, "log_var": log_var, "pred_x0": x0, "eps": eps}

    def vlb_bits(
        self,
        out: torch.Tensor,
        x0: torch.Tensor,
        xt: torch.Tensor,
        t: torch.Tensor,
        decoder_nll: str = "continuous",
    ) -> torch.Tensor:
        """Per-row L_t in bits (mean over genes): KL(q || p) for t > 0, decoder NLL of x_0 at t = 0."""
        if decoder_nll not in DECODER_NLL:
            raise ValueError(f"decoder_nll must be one of {DECODER_NLL}, got {decoder_nll!r}")
        true_mean, _, true_log_var = self.q_posterior(x0, xt, t)
        p = self.p_mean_variance(out, xt, t)
        kl = normal_kl(true_mean, true_log_var, p["mean"], p["log_var"]).mean(dim=1) / LN2
        nll_fn = continuous_nll if decoder_nll == "continuous" else discretized_nll
        nll = nll_fn(x0, p["mean"], p["log_var"]).mean(dim=1) / LN2
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        vlb_lambda: float = 1e-3,
        decoder_nll: str = "continuous",
    ) -> dict[str, torch.Tensor]:
        """Per-row hybrid loss: MSE(eps) + vlb_lambda * T * L_t, the VLB seeing a detached eps."""
        xt = self.q_sample(x0, t, noise)
        out = model(xt, self.timestep_map_tensor(t))
        mse = ((out[:, 0] - noise) ** 2).mean(dim=1)
        frozen = torch.stack([out[:, 0].detach(), out[:, 1]], dim=1)
        vb = self.vlb_bits(frozen, x0, xt, t, decoder_nll)
        return {"loss": mse + vlb_lambda * self.num_timesteps * vb, "mse": mse, "vb": vb}

    def timestep_map_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The original step index the network is told for step t of this process."""
        key = (id(self.timestep_map), str(t.device))
        if key not in self._device_cache:
            self._device_cache[key] = torch.from_numpy(self.timestep_map).to(t.device)
        return self._device_cache[key][t]

    # ---- samplers -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_ancestral(
        self,
        model: ModelFn,
        shape: Sequence[int],
        generator: Generators,
        device: torch.device | str = "cpu",
        steps: int | None = None,
        clip: Clip | None = None,
    ) -> torch.Tensor:
        """x_T ~ N(0, I), then x_{t-1} ~ p(x_{t-1} | x_t) with the learned variance, over all steps
        (or `steps` evenly spaced ones); no noise on the last step."""
        proc = (
            self
            if steps is None or steps == self.num_timesteps
            else self.respaced(spaced_steps(self.num_timesteps, steps))
        )
        x = randn(shape, generator, device)
        for i in reversed(range(proc.num_timesteps)):
            t = torch.full((shape[0],), i, device=x.device, dtype=torch.long)
            p = proc.p_mean_variance(model(x, proc.timestep_map_tensor(t)), x, t, clip)
            x = p["mean"]
            if i > 0:
                x = x + torch.exp(0.5 * p["log_var"]) * randn(shape, generator, device)
        return x

    @torch.no_grad()
    def sample_ddim(
        self,
        model: ModelFn,
        shape: Sequence[int],
        generator: Generators,
        device: torch.device | str = "cpu",
        steps: int = 50,
        eta: float = 0.0,
        clip: Clip | None = None,
    ) -> torch.Tensor:
        """DDIM over `steps` evenly spaced steps; eta = 0 is deterministic given x_T. With `clip`,
        x0 is clamped and eps re-derived from it (as improved-DDPM does)."""
        proc = self.respaced(spaced_steps(self.num_timesteps, steps))
        x = randn(shape, generator, device)
        for i in reversed(range(proc.num_timesteps)):
            t = torch.full((shape[0],), i, device=x.device, dtype=torch.long)
            eps = model(x, proc.timestep_map_tensor(t))[:, 0]
            x0 = proc.predict_x0(x, t, eps)
            if clip is not None:
                x0 = torch.maximum(torch.minimum(x0, clip[1]), clip[0])
                eps = (proc._at(proc.sqrt_recip_alphas_cumprod, t, x) * x - x0) / proc._at(
                    proc.sqrt_recipm1_alphas_cumprod, t, x
                )
            ab, ab_prev = proc._at(proc.alphas_cumprod, t, x), proc._at(proc.alphas_cumprod_prev, t, x)
            sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
            x = torch.sqrt(ab_prev) * x0 + torch.sqrt(1 - ab_prev - sigma**2) * eps
            if eta > 0 and i > 0:
                x = x + sigma * randn(shape, generator, device)
        return x
