"""HINGE's masked diffusion over expression: schedule, forward masking, losses, curriculum, sampler.

Visible fraction alpha_bar_t = (1 - t/T)^zeta, zeta = log_T G clipped to [1.05, 4] ("poly_auto").
Forward (authors' code): one random gene order per sample; at step t the first
floor((1 - alpha_bar_t) G) genes of that order are masked. Because the masks are nested in t, the
same order also defines the reverse trajectory: going from t to s < t reveals exactly the genes with
rank in [n_masked(s), n_masked(t)), so every gene is revealed once and then never changes. (The
paper's per-gene Bernoulli masks have the same law up to the count being fixed rather than binomial.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

ZETA_RANGE = (1.05, 4.0)
LOSSES = ("paper", "code")
Predict = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (values, visible, t) -> x0_hat


def auto_zeta(n_genes: int, T: int) -> float:
    """zeta = log_T G, clipped to [1.05, 4] as in the authors' code (G = 200, T = 50 -> 1.354)."""
    z = math.log(max(n_genes, 2)) / math.log(T)
    return min(max(z, ZETA_RANGE[0]), ZETA_RANGE[1])


class MaskSchedule:
    """alpha_bar_t for t = 0..T and the derived masked-gene counts and loss weights."""

    def __init__(self, n_genes: int, T: int = 50, zeta: float | str = "auto") -> None:
        if T < 1 or n_genes < 1:
            raise ValueError(f"MaskSchedule needs T >= 1 and n_genes >= 1, got T={T}, n_genes={n_genes}")
        self.T, self.n_genes = int(T), int(n_genes)
        self.zeta = auto_zeta(n_genes, T) if zeta == "auto" else float(zeta)
        t = torch.arange(self.T + 1, dtype=torch.float64)
        self.alpha_bars = (1 - t / self.T).clamp_min(0) ** self.zeta  # exact 1 at t=0 and 0 at t=T
        # floor((1 - abar) G); the 1e-9 guards against (1 - abar) G landing a hair under an integer.
        self.n_masked_table = torch.floor((1 - self.alpha_bars) * self.n_genes + 1e-9).long()

    def alpha_bar(self, t: torch.Tensor | int) -> torch.Tensor:
        return self.alpha_bars[torch.as_tensor(t, dtype=torch.long)]

    def n_masked(self, t: torch.Tensor | int) -> torch.Tensor:
        return self.n_masked_table[torch.as_tensor(t, dtype=torch.long).cpu()]

    def weight(self, t: torch.Tensor | int) -> torch.Tensor:
        """Paper's w_t = (abar_{t-1} - abar_t) / (1 - abar_t) for t >= 1 (w_1 = 1)."""
        t = torch.as_tensor(t, dtype=torch.long)
        return (self.alpha_bars[t - 1] - self.alpha_bars[t]) / (1 - self.alpha_bars[t])

    def band(self, rho: float) -> torch.Tensor:
        """Warm-start band: the t in 1..T with alpha_bar_t >= 1 - rho (t = 1 if none qualifies)."""
        t = torch.arange(1, self.T + 1)
        ok = t[self.alpha_bars[1:] >= 1 - rho - 1e-12]
        return ok if ok.numel() else torch.ones(1, dtype=torch.long)

    def sample_t(
        self, n: int, *, curriculum: bool = False, rho: float = 0.2, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(n,) timesteps: uniform over 1..T, or uniform over the warm-start band."""
        allowed = self.band(rho) if curriculum else torch.arange(1, self.T + 1)
        return allowed[torch.randint(len(allowed), (n,), generator=generator)]


def random_ranks(n: int, n_genes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, G) rank of every gene in one uniformly random order per row (0 = masked first)."""
    return torch.rand(n, n_genes, generator=generator).argsort(dim=1).argsort(dim=1)


def visible_mask(ranks: torch.Tensor, schedule: MaskSchedule, t: torch.Tensor | int) -> torch.Tensor:
    """(n, G) bool: visible at step t (rank >= number of masked genes at t); t scalar or (n,)."""
    k = schedule.n_masked(t).to(ranks.device)
    return ranks >= (k.unsqueeze(-1) if k.dim() else k)


def masked_loss(
    pred: torch.Tensor,
    x0: torch.Tensor,
    ranks: torch.Tensor,
    t: torch.Tensor,
    schedule: MaskSchedule,
    variant: str = "paper",
) -> torch.Tensor:
    """Training objective on genes hidden at t.

    `paper` (eq. 2): w_t * sum over masked genes of the squared error, divided by G (a constant, so
    the value reads per gene), averaged over the batch. `code` (authors' repository): squared error
    on the genes revealed at this step (masked at t, visible at t-1), normalised by their count."""
    err = (pred.float() - x0.float()) ** 2
    masked = ~visible_mask(ranks, schedule, t)
    if variant == "paper":
        w = schedule.weight(t.cpu()).to(device=err.device, dtype=err.dtype)
        return (w * (err * masked).sum(dim=1)).mean() / schedule.n_genes
    if variant == "code":
        revealed = masked & visible_mask(ranks, schedule, t - 1)
        return (err * revealed).sum() / revealed.sum().clamp_min(1)
    raise ValueError(f"hinge loss must be one of {LOSSES}, got {variant!r}")


def step_times(T: int, K: int) -> list[int]:
    """A K-step budget over t = T..0: [T, ..., 0], strictly decreasing, len <= K + 1."""
    if K < 1:
        raise ValueError(f"the sampler needs K >= 1 steps, got {K}")
    K = min(K, T)
    ts = [round(T * (1 - k / K)) for k in range(K + 1)]
    return sorted(set(ts), reverse=True)


@torch.no_grad()
def masked_sample(
    predict: Predict,
    ranks: torch.Tensor,
    schedule: MaskSchedule,
    K: int,
    fill: torch.Tensor,
    trace: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Reverse masked diffusion from fully masked to fully revealed in a K-step budget.

    At each (t -> s): predict x0_hat from (x_t, visible_t, t); keep the visible values; the genes
    newly visible at s take x0_hat. Masked entries enter the model as `fill` (zeros, or N(0,1) for
    RandMask). `trace` (tests) receives (t, visible_t, model input) per step."""
    x = fill.clone()
    for t, s in zip(step_times(schedule.T, K)[:-1], step_times(schedule.T, K)[1:], strict=True):
        vis_t = visible_mask(ranks, schedule, t)
        inp = torch.where(vis_t, x, fill)
        if trace is not None:
            trace.append((t, vis_t.clone(), inp.clone()))
        x0_hat = predict(inp, vis_t, t)
        new = visible_mask(ranks, schedule, s) & ~vis_t
        x = torch.where(new, x0_hat.to(x.dtype), x)
    return x
