"""Per-gene linear fit of the target on log library size, as a plain module (no image, no training).

Closed-form OLS accumulated in float64 over batches, so the fit is exact whatever the batch order
and never holds all training spots in memory at once.
"""

from __future__ import annotations

import torch
from torch import nn


def log_depth(totals: torch.Tensor) -> torch.Tensor:
    """log(max(total, 1)): a spot with no counts gets log 1 = 0 instead of -inf (float64)."""
    return torch.log(totals.double().clamp_min(1.0))


class DepthLinear(nn.Module):
    """target[g] ~ intercept[g] + slope[g] * log(max(total, 1)), one OLS per gene."""

    def __init__(self, n_genes: int) -> None:
        super().__init__()
        self.register_buffer("intercept", torch.zeros(n_genes, dtype=torch.float64))
        self.register_buffer("slope", torch.zeros(n_genes, dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._reset_sums(n_genes)

    def _reset_sums(self, n_genes: int) -> None:
        self._n = 0
        self._sx = 0.0
        self._sxx = 0.0
        self._sy = torch.zeros(n_genes, dtype=torch.float64)
        self._sxy = torch.zeros(n_genes, dtype=torch.float64)

    def accumulate(self, totals: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch: totals (B,) library sizes, targets (B, G)."""
        x = log_depth(totals.reshape(-1)).cpu()
        y = targets.double().cpu()
        if y.shape != (x.numel(), self._sy.numel()):
            raise ValueError(f"targets {tuple(y.shape)} do not match totals ({x.numel()},) x genes")
        self._n += x.numel()
        self._sx += float(x.sum())
        self._sxx += float((x * x).sum())
        self._sy += y.sum(0)
        self._sxy += x @ y

    def finish(self) -> None:
        """Solve the normal equations. With no spread in log depth (every training spot has the same
        total) the slope is set to 0 and the fit is the training mean."""
        if self._n == 0:
            raise ValueError("no training spots to fit")
        n = float(self._n)
        mx = self._sx / n
        my = self._sy / n
        sxx = self._sxx - n * mx * mx
        sxy = self._sxy - n * mx * my
        slope = sxy / sxx if sxx > 1e-12 * max(1.0, self._sxx) else torch.zeros_like(sxy)
        self.slope.copy_(slope)
        self.intercept.copy_(my - slope * mx)
        self.fitted.fill_(True)
        self._reset_sums(self._sy.numel())

    def forward(self, totals: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            raise RuntimeError("DepthLinear used before fit")
        x = log_depth(totals.reshape(-1))
        return self.intercept.unsqueeze(0) + x.unsqueeze(1) * self.slope.unsqueeze(0)
