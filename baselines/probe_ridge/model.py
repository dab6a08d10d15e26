"""HEST-Bench's linear probe as a module: standardise -> PCA -> ridge without intercept.

Fitted in closed form in float64 (no optimiser); stored as buffers so predictions run on any device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# sklearn's StandardScaler treats a feature whose std is below this (relative) level as constant
# and leaves it unscaled (scale 1), so constant features do not blow up.
_CONSTANT = 10 * np.finfo(np.float64).eps


def hest_alpha(n_components: int, n_genes: int) -> float:
    """HEST-Bench's ridge strength: 100 / (D * G), D = feature dim AFTER PCA, G = number of genes."""
    return 100.0 / (n_components * n_genes)


class RidgeProbe(nn.Module):
    """x (B, D) -> ((x - mean) / scale - pca_mean) @ components.T @ coef (+ intercept)."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("mean", "scale", "pca_mean", "components", "coef", "intercept"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.float64))
        self.alpha = float("nan")

    @torch.no_grad()
    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        n_components: int = 256,
        alpha: float | None = None,
        standardize: bool = True,
        fit_intercept: bool = False,
        solver: str = "closed-form",
        seed: int = 0,
    ) -> dict[str, float]:
        """Fit on training features x (N, D) and targets y (N, G); returns what was used."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        mean = x.mean(0) if standardize else np.zeros(x.shape[1])
        scale = x.std(0) if standardize else np.ones(x.shape[1])
        scale = np.where(scale < _CONSTANT * np.maximum(np.abs(mean), 1.0), 1.0, scale)
        xs = (x - mean) / scale
        pca_mean = xs.mean(0)
        xc = xs - pca_mean
        k = int(min(n_components, *x.shape)) if n_components else x.shape[1]
        if n_components:
            _, _, vt = np.linalg.svd(xc, full_matrices=False)
            comps = vt[:k]
        else:  # no PCA: identity projection
            comps = np.eye(x.shape[1])
        z = xc @ comps.T
        a = hest_alpha(k, y.shape[1]) if alpha is None else float(alpha)
        y_off = y.mean(0) if fit_intercept else np.zeros(y.shape[1])
        z_off = z.mean(0) if fit_intercept else np.zeros(k)
        zc, yc = z - z_off, y - y_off
        if solver == "closed-form":  # the exact minimiser of HEST's objective
            coef = np.linalg.solve(zc.T @ zc + a * np.eye(k), zc.T @ yc)  # (k, G)
        elif solver == "lsqr":  # HEST's literal call: float32 PCA output (torch.Tensor), sklearn lsqr
            from sklearn.linear_model import Ridge

            reg = Ridge(alpha=a, fit_intercept=False, solver="lsqr", max_iter=1000, random_state=seed)
            coef = reg.fit(zc.astype(np.float32), yc).coef_.T.astype(np.float64)
        else:
            raise ValueError(f"solver must be 'closed-form' or 'lsqr', got {solver!r}")
        intercept = y_off - z_off @ coef
        for name, v in (
            ("mean", mean),
            ("scale", scale),
            ("pca_mean", pca_mean),
            ("components", comps),
            ("coef", coef),
            ("intercept", intercept),
        ):
            setattr(self, name, torch.from_numpy(np.ascontiguousarray(v)).to(self.mean.device))
        self.alpha = a
        return {"n_components": k, "alpha": a, "n_train": int(x.shape[0])}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float64 predictions (B, G); callers cast."""
        if self.coef.numel() == 0:
            raise RuntimeError("RidgeProbe.fit has not run")
        z = ((x.double() - self.mean) / self.scale - self.pca_mean) @ self.components.T
        return z @ self.coef + self.intercept
