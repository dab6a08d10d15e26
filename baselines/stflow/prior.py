"""STFlow's flow-matching pieces: the zero-inflated negative binomial prior, the straight probability
path and the Euler sampler.

Why a count prior: the targets are log1p counts (non-negative, mostly small, many zeros), so the
flow starts from log1p of count noise with that shape instead of a Gaussian. The authors' defaults
(their `--zinb_total_count 1 --zinb_logits 0.1 --zinb_zi_logits 0`): an NB with total count 1 and
logits 0.1 (mean e^0.1 = 1.105, torch's parametrisation) whose draws are set to zero with
probability sigmoid(0) = 0.5, then log1p.

Every draw takes an optional `torch.Generator` and is made on the CPU, so a seeded generator gives
the same noise on any device and in any process (DDP ranks and one process agree).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ZINBPrior:
    """ZINB(total_count, logits, zi_logits) counts, log1p'd when `log1p` (the authors' default)."""

    total_count: float = 1.0
    logits: float = 0.1
    zi_logits: float = 0.0
    log1p: bool = True

    def __post_init__(self) -> None:
        if not self.total_count > 0:
            raise ValueError(f"ZINB total_count must be > 0, got {self.total_count}")

    @property
    def zero_inflation(self) -> float:
        """Probability that a draw is forced to zero: sigmoid(zi_logits)."""
        return 1.0 / (1.0 + math.exp(-self.zi_logits))

    def zero_probability(self) -> float:
        """P(count = 0) = pi + (1 - pi) * (1 - p)^r with p = sigmoid(logits), r = total_count."""
        q = 1.0 / (1.0 + math.exp(self.logits))  # 1 - p
        return self.zero_inflation + (1.0 - self.zero_inflation) * q**self.total_count

    def mean_count(self) -> float:
        """E[count] = (1 - pi) * r * exp(logits)."""
        return (1.0 - self.zero_inflation) * self.total_count * math.exp(self.logits)

    def sample_counts(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw ZINB counts (float32, CPU): Gamma-Poisson NB, then the zero-inflation mask."""
        shape = tuple(int(s) for s in shape)
        alpha = torch.full(shape, float(self.total_count))
        # NB(r, p) = Poisson(Gamma(shape r, scale p / (1 - p) = exp(logits)))
        rate = torch._standard_gamma(alpha, generator=generator) * math.exp(self.logits)
        counts = torch.poisson(rate, generator=generator)
        zero = torch.rand(shape, generator=generator) < self.zero_inflation
        return counts.masked_fill(zero, 0.0)

    def sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """x0 for the flow: log1p(counts) (or the counts when `log1p` is off), on `device`."""
        x = self.sample_counts(shape, generator)
        x = torch.log1p(x) if self.log1p else x
        return x.to(device) if device is not None else x


# ---- the probability path and the sampler -----------------------------------------------------
def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - t) x0 + t x1; `t` broadcasts against the rows (a scalar or an (N, 1) column)."""
    return (1.0 - t) * x0 + t * x1


def time_grid(steps: int = 5, t_start: float = 0.01) -> torch.Tensor:
    """The sampler's time points: linspace(t_start, 1, steps) (the authors: 5 points from 0.01)."""
    if steps < 2:
        raise ValueError(f"the sampler needs at least 2 time points, got {steps}")
    return torch.linspace(float(t_start), 1.0, int(steps))


def euler_sample(
    predict_x1: Callable[[torch.Tensor, float], torch.Tensor],
    x0: torch.Tensor,
    steps: int = 5,
    t_start: float = 0.01,
) -> torch.Tensor:
    """Integrate dx/dt = (x1_hat(x, t) - x) / (1 - t) with Euler steps over `time_grid`.

    The model is asked for x1 at every grid point but the last (steps - 1 calls); the final step
    lands on t = 1, where the Euler update equals the last x1 estimate exactly, so that estimate is
    returned (as the authors' sampler does)."""
    ts = time_grid(steps, t_start).tolist()
    x = x0
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        x1_hat = predict_x1(x, t)
        if i == len(ts) - 2 and t_next >= 1.0:
            return x1_hat
        x = x + (t_next - t) * (x1_hat - x) / (1.0 - t)
    return x
