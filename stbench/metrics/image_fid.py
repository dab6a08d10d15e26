"""Fréchet distance (FID) between real and generated tile features, per regime and per tissue.

FID = |mu_r - mu_g|^2 + Tr(S_r) + Tr(S_g) - 2 Tr((S_r S_g)^{1/2})   (Heusel et al., 2017)

* Statistics are float64; covariances are SAMPLE covariances (ddof = 1, numpy's `np.cov` default,
  as the standard pytorch-fid code), so a streaming accumulation equals the batch result.
* Tr((S_r S_g)^{1/2}) is computed WITHOUT a general (complex) matrix square root: with
  A = S_r^{1/2} (symmetric, by `eigh`), S_r S_g = A (A S_g) has the same eigenvalues as the
  symmetric PSD matrix A S_g A, so the trace is the sum of the square roots of its eigenvalues
  (eigenvalues at rounding level, below d * eps * the largest, count as 0). No imaginary parts can
  appear and a singular covariance (fewer tiles than feature dimensions) needs no eps offset.
* `REGIMES` are STMDiT's four conditioning regimes; `fid_delta` = FID(UNI+GE) - FID(UNI)
  (Table 1: negative means gene expression improves image quality).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

REGIMES = ("uni+ge", "uni", "ge", "none")
REGIME_KEYS = {"uni+ge": "uni_ge", "uni": "uni", "ge": "ge", "none": "none"}  # result-row spelling


def as_features(x: object, name: str) -> np.ndarray:
    """A finite (n, d) float64 feature matrix (torch tensors accepted)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (tiles, features), got shape {a.shape}")
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{name} has non-finite values (first at tile {bad[0]}, feature {bad[1]})")
    return a


@dataclass(frozen=True)
class GaussianStats:
    """Mean and sample covariance (ddof = 1) of a feature set; `n` tiles."""

    mean: np.ndarray
    cov: np.ndarray
    n: int


def feature_stats(features: object) -> GaussianStats:
    """Batch statistics of (n, d) features; n >= 2 (a covariance needs two tiles)."""
    x = as_features(features, "features")
    if x.shape[0] < 2:
        raise ValueError(f"FID statistics need at least 2 tiles, got {x.shape[0]}")
    mu = x.mean(axis=0)
    xc = x - mu
    return GaussianStats(mu, (xc.T @ xc) / (x.shape[0] - 1), int(x.shape[0]))


class StreamingStats:
    """Mean / covariance accumulated batch by batch in float64 (Chan et al.'s pairwise update).

    Each batch contributes its own mean and centred scatter matrix, merged exactly, so a large
    feature mean never cancels catastrophically (the naive sum-of-outer-products would).
    `merge` combines two accumulators (e.g. per-process ones) with the same formula."""

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.n = 0
        self.mean = np.zeros(self.dim)
        self.m2 = np.zeros((self.dim, self.dim))

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if n_b == 0:
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.m2 = self.m2 + m2_b + np.outer(delta, delta) * (self.n * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.n = n

    def update(self, batch: object) -> StreamingStats:
        x = as_features(batch, "batch")
        if x.shape[1] != self.dim:
            raise ValueError(f"batch has {x.shape[1]} features, the accumulator {self.dim}")
        if x.shape[0]:
            mu = x.mean(axis=0)
            xc = x - mu
            self._combine(x.shape[0], mu, xc.T @ xc)
        return self

    def merge(self, other: StreamingStats) -> StreamingStats:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {other.dim}-d statistics into {self.dim}-d ones")
        self._combine(other.n, other.mean, other.m2)
        return self

    def stats(self) -> GaussianStats:
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 tiles, got {self.n}")
        return GaussianStats(self.mean.copy(), self.m2 / (self.n - 1), self.n)


def _clip_rank(w: np.ndarray) -> np.ndarray:
    """Eigenvalues at rounding level (below d * eps * max, numpy's matrix_rank tolerance) -> 0, so the
    square roots of rounding noise (~sqrt(eps) each) do not add up in a singular covariance."""
    tol = w.size * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), 0.0)
    return np.where(w > tol, w, 0.0)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (rounding-level eigenvalues -> 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(_clip_rank(w))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr((s1 s2)^{1/2}) for symmetric PSD s1, s2 via the eigenvalues of s1^{1/2} s2 s1^{1/2}."""
    a = _sqrt_psd(s1)
    m = a @ s2 @ a
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(_clip_rank(w)).sum())


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Fréchet distance of N(mu1, s1) and N(mu2, s2); clipped at 0 (rounding can go below)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(s1, np.float64), np.asarray(s2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shape mismatch: means {mu1.shape}, {mu2.shape}; covariances {s1.shape}, {s2.shape}"
        )
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))
    return max(value, 0.0)


def fid_from_stats(real: GaussianStats, generated: GaussianStats) -> float:
    return frechet_distance(real.mean, real.cov, generated.mean, generated.cov)


def fid(real_features: object, generated_features: object) -> float:
    """FID between (n, d) real and (m, d) generated features (n, m >= 2)."""
    r = as_features(real_features, "real_features")
    g = as_features(generated_features, "generated_features")
    if r.shape[1] != g.shape[1]:
        raise ValueError(f"real ({r.shape[1]}-d) and generated ({g.shape[1]}-d) features differ in width")
    return fid_from_stats(feature_stats(r), feature_stats(g))


def _weighted_stats(x: np.ndarray, counts: np.ndarray) -> GaussianStats:
    """Statistics of the rows of x repeated counts[i] times (one bootstrap resample, no copy)."""
    n = int(counts.sum())
    mu = counts @ x / n
    xc = x - mu
    return GaussianStats(mu, (xc.T * counts) @ xc / (n - 1), n)


@dataclass(frozen=True)
class FIDBootstrap:
    estimate: float  # FID on the full set
    low: float
    high: float
    mean: float  # mean over the resamples (STMDiT's Table 1 prints bootstrap means)
    confidence: float
    n_boot: int
    seed: int

    @property
    def halfwidth(self) -> float:
        return (self.high - self.low) / 2


def fid_bootstrap(
    real_features: object,
    generated_features: object,
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> FIDBootstrap:
    """Spot-level percentile CI of FID (STMDiT D.6). Row i of both sets is the same test spot; the
    resampling scheme is `statistics.bootstrap_ci`'s (replicate b draws rng.integers(0, n, n) from
    default_rng(seed)), so the same seed resamples the same spots as the AUC bootstrap."""
    r = as_features(real_features, "real_features")
    g = as_features(generated_features, "generated_features")
    if r.shape != g.shape:
        raise ValueError(f"a paired FID bootstrap needs equal shapes, got {r.shape} and {g.shape}")
    if n_boot < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < confidence < 1, got {n_boot}, {confidence}")
    rng = np.random.default_rng(seed)
    n = r.shape[0]
    reps = np.empty(n_boot)
    for b in range(n_boot):
        counts = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        reps[b] = fid_from_stats(_weighted_stats(r, counts), _weighted_stats(g, counts))
    alpha = 1.0 - confidence
    low, high = np.percentile(reps, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return FIDBootstrap(fid(r, g), float(low), float(high), float(reps.mean()), confidence, n_boot, seed)


@dataclass(frozen=True)
class GroupFID:
    group: str
    fid: float | None  # None when a side has fewer than `min_count` tiles
    n_real: int
    n_generated: int


def fid_per_group(
    real_features: object,
    generated_features: object,
    real_groups: Sequence[object],
    generated_groups: Sequence[object] | None = None,
    *,
    min_count: int = 2,
) -> list[GroupFID]:
    """FID within each group (e.g. tissue class, STMDiT Fig. 6). Generated tiles default to their
    paired real tile's group. Groups too small for a covariance are reported with fid None."""
    r = as_features(real_features, "real_features")
    g = as_features(generated_features, "generated_features")
    rg = np.asarray([str(x) for x in real_groups])
    gg = rg if generated_groups is None else np.asarray([str(x) for x in generated_groups])
    if rg.size != r.shape[0] or gg.size != g.shape[0]:
        raise ValueError(
            f"group labels ({rg.size}, {gg.size}) do not match tiles ({r.shape[0]}, {g.shape[0]})"
        )
    out = []
    for name in sorted(set(rg.tolist()) | set(gg.tolist())):
        rm, gm = rg == name, gg == name
        nr, ng = int(rm.sum()), int(gm.sum())
        value = fid(r[rm], g[gm]) if min(nr, ng) >= max(min_count, 2) else None
        out.append(GroupFID(name, value, nr, ng))
    return out


def fid_delta(fids: Mapping[str, float | None]) -> float | None:
    """Delta = FID(UNI+GE) - FID(UNI); None if either regime is missing."""
    a, b = fids.get("uni+ge"), fids.get("uni")
    return None if a is None or b is None else float(a) - float(b)


def check_regime(name: str) -> str:
    if name not in REGIMES:
        raise ValueError(f"unknown conditioning regime {name!r}; valid: {', '.join(REGIMES)}")
    return name
