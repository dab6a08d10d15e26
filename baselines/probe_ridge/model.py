"""HEST-Bench's linear probe as a module: standardise -> PCA -> ridge without intercept.

By default it follows HEST's own numerics (sklearn PCA with svd_solver='auto' and random_state,
float32 PCA output, Ridge(solver='lsqr')), because those choices, not only the objective, set the
numbers HEST reports. `pca_solver="exact"` + `solver="closed-form"` give the exact float64 minimiser.
The fit is stored as buffers so predictions run on any device.
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


def _hest_pca(
    x: np.ndarray, k: int, standardize: bool, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """HEST's own calls: StandardScaler -> PCA(k, svd_solver='auto', random_state=seed).fit_transform.

    Why sklearn itself and not an equivalent: lsqr (next step) is sensitive to round-off in its input
    (a PCA output recomputed as X @ V.T instead of fit_transform's U * S moves predictions by up to
    6%), so only the same float operations give HEST's coefficients."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    if standardize:
        scaler = StandardScaler().fit(x)
        mean, scale, xs = scaler.mean_, scaler.scale_, scaler.transform(x)
    else:
        mean, scale, xs = np.zeros(x.shape[1]), np.ones(x.shape[1]), x
    pca = PCA(n_components=k, svd_solver="auto", random_state=seed)
    z = pca.fit_transform(xs)
    return mean, scale, pca.mean_, pca.components_, z, str(getattr(pca, "_fit_svd_solver", "auto"))


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
        solver: str = "lsqr",
        seed: int = 1,
        pca_solver: str = "auto",
    ) -> dict[str, float | int | str]:
        """Fit on training features x (N, D) and targets y (N, G); returns what was used."""
        if pca_solver not in ("auto", "exact"):
            raise ValueError(f"pca_solver must be 'auto' or 'exact', got {pca_solver!r}")
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        k = int(min(n_components, *x.shape)) if n_components else x.shape[1]
        if n_components and pca_solver == "auto":
            mean, scale, pca_mean, comps, z, pca_used = _hest_pca(x, k, standardize, seed)
        else:
            mean = x.mean(0) if standardize else np.zeros(x.shape[1])
            scale = x.std(0) if standardize else np.ones(x.shape[1])
            scale = np.where(scale < _CONSTANT * np.maximum(np.abs(mean), 1.0), 1.0, scale)
            xs = (x - mean) / scale
            pca_mean = xs.mean(0)
            xc = xs - pca_mean
            if n_components:
                _, _, vt = np.linalg.svd(xc, full_matrices=False)
                comps, pca_used = vt[:k], "exact"
            else:  # no PCA: identity projection
                comps, pca_used = np.eye(x.shape[1]), "none"
            z = xc @ comps.T
        a = hest_alpha(k, y.shape[1]) if alpha is None else float(alpha)
        y_off = y.mean(0) if fit_intercept else np.zeros(y.shape[1])
        z_off = z.mean(0) if fit_intercept else np.zeros(k)
        zc, yc = z - z_off, y - y_off
        if solver == "closed-form":  # the exact minimiser of HEST's objective
            coef = np.linalg.solve(zc.T @ zc + a * np.eye(k), zc.T @ yc)  # (k, G)
        elif solver == "lsqr":
            from sklearn.linear_model import Ridge

            # HEST passes torch.Tensor(PCA output): values rounded to float32, but sklearn does not
            # read a torch dtype as float32 and solves in float64. Both matter to lsqr (see _hest_pca).
            z32 = zc.astype(np.float32).astype(np.float64)
            reg = Ridge(alpha=a, fit_intercept=False, solver="lsqr", max_iter=1000, random_state=seed)
            coef = reg.fit(z32, yc).coef_.T.astype(np.float64)
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
        return {"n_components": k, "alpha": a, "n_train": int(x.shape[0]), "pca_solver": pca_used}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float64 predictions (B, G); callers cast."""
        if self.coef.numel() == 0:
            raise RuntimeError("RidgeProbe.fit has not run")
        z = ((x.double() - self.mean) / self.scale - self.pca_mean) @ self.components.T
        return z @ self.coef + self.intercept
