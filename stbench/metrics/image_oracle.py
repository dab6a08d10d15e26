"""Oracle regressors: how much transcriptomic signal generated tiles carry (STMDiT, Table 2).

A regressor is fitted on REAL (tile features, expression) pairs of the TRAINING split only (`fit`
takes exactly those two arrays), then applied to the features of generated test tiles and of the
real test tiles (the ceiling). Its predictions are scored against the MEASURED test expression:

* genes: the top-k genes by training-set variance (`top_variance_genes`, ties by column order),
  k in K_GRID = (50, 100, 200, 500, 1000), each k capped at the number of genes and de-duplicated;
* curve: for each k, the mean per-gene Pearson r over those k genes across the test spots
  (constant genes excluded and counted, as every stbench PCC, `column_pearson`);
* AUC (`integrate_curve`): the paper "averages the resulting curve over k in {50, ..., 1000}"
  (STMDiT D.4), so the default "mean" is the plain average of the curve's points (each k weighs the
  same). Trapezoid rules over log k, k or the k index are options; every rule is normalised by the
  width of its axis, so a constant curve c integrates to c: the zero-correlation null is 0 and the
  real-tile ceiling is on the same scale as the model's AUC.

`RidgeOracle` (UNI2-h features -> PCA 256 -> Ridge, alpha = 100 / (256 k), one fit per k, HEST-style
standardisation before PCA) and `MLPOracle` (Midnight features -> MLP 1024-1024 on all genes, negative
predictions clipped to 0 before correlation, sklearn MLPRegressor's defaults re-implemented in torch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from stbench.metrics.expression import CONSTANT_RTOL, MetricResult, as_matrix, column_pearson
from stbench.metrics.statistics import BootstrapCI, bootstrap_ci

K_GRID = (50, 100, 200, 500, 1000)
INTEGRATIONS = ("mean", "trapezoid_log_k", "trapezoid_k", "trapezoid_index")
_CONSTANT = 10 * np.finfo(np.float64).eps  # sklearn StandardScaler's "constant feature" level


def top_variance_genes(train_expression: object, n: int) -> np.ndarray:
    """Column indices of the n genes with the largest TRAINING variance (stable: ties by index)."""
    y = as_matrix(train_expression, "train_expression").astype(np.float64)
    n = min(int(n), y.shape[1])
    return np.argsort(-y.var(axis=0), kind="stable")[:n]


def effective_ks(ks: Sequence[int], n_genes: int) -> tuple[int, ...]:
    """k grid capped at the number of genes, de-duplicated and sorted (a capped k is one point)."""
    if not ks or min(ks) < 1:
        raise ValueError(f"k grid must be non-empty positive integers, got {ks}")
    return tuple(sorted({min(int(k), int(n_genes)) for k in ks}))


def oracle_alpha(k: int, n_components: int = 256) -> float:
    """STMDiT/HEST ridge strength 100 / (D k), D = feature dimension after PCA."""
    return 100.0 / (n_components * k)


class _Regressor:
    """Shared bookkeeping: gene order from training variance, per-k gene sets."""

    ks: tuple[int, ...]
    order: np.ndarray

    def __init__(self, ks: Sequence[int]) -> None:
        self.requested_ks = tuple(int(k) for k in ks)
        self.n_train = 0

    def _setup(self, x: object, y: object) -> tuple[np.ndarray, np.ndarray]:
        xf = as_matrix(x, "train_features").astype(np.float64)
        yf = as_matrix(y, "train_expression").astype(np.float64)
        if xf.shape[0] != yf.shape[0]:
            raise ValueError(
                f"train_features ({xf.shape[0]}) and train_expression ({yf.shape[0]}) rows differ"
            )
        if xf.shape[0] < 2:
            raise ValueError("an oracle needs at least 2 training spots")
        self.ks = effective_ks(self.requested_ks, yf.shape[1])
        self.order = top_variance_genes(yf, max(self.ks))
        self.n_train = int(xf.shape[0])
        return xf, yf

    def genes(self, k: int) -> np.ndarray:
        """Column indices (into the expression matrix) of the top-k training-variance genes."""
        return self.order[:k]

    def _check_fitted(self, x: object) -> np.ndarray:
        if not self.n_train:
            raise RuntimeError(f"{type(self).__name__}.fit has not run")
        return as_matrix(x, "features").astype(np.float64)


class RidgeOracle(_Regressor):
    """features -> (standardise) -> PCA(n_components) -> Ridge(alpha(k)) per k, closed form, float64.

    Standardise + PCA are fitted once on the training features (HEST-Bench's pipeline, which the
    paper's Oracle is "inspired by"); the ridge has an intercept (equivalent for Pearson r to
    HEST's no-intercept fit on centred PCA scores, and keeps predictions on the target's scale)."""

    def __init__(
        self,
        ks: Sequence[int] = K_GRID,
        n_components: int = 256,
        *,
        standardize: bool = True,
        alpha: Callable[[int, int], float] = oracle_alpha,
        clip_negative: bool = False,
    ) -> None:
        super().__init__(ks)
        self.n_components, self.standardize = int(n_components), standardize
        self.alpha_fn, self.clip_negative = alpha, clip_negative
        self.alphas: dict[int, float] = {}

    def fit(self, train_features: object, train_expression: object) -> RidgeOracle:
        """Fit on the TRAINING split's real-tile features (n, d) and expression (n, G) only."""
        x, y = self._setup(train_features, train_expression)
        self.mean = x.mean(0) if self.standardize else np.zeros(x.shape[1])
        scale = x.std(0) if self.standardize else np.ones(x.shape[1])
        self.scale = np.where(scale < _CONSTANT * np.maximum(np.abs(self.mean), 1.0), 1.0, scale)
        xs = (x - self.mean) / self.scale
        self.pca_mean = xs.mean(0)
        d = int(min(self.n_components, x.shape[0], x.shape[1]))
        self.components = np.linalg.svd(xs - self.pca_mean, full_matrices=False)[2][:d]
        z = (xs - self.pca_mean) @ self.components.T
        z_mean = z.mean(0)
        zc = z - z_mean
        gram = zc.T @ zc
        self.coef: dict[int, np.ndarray] = {}
        self.intercept: dict[int, np.ndarray] = {}
        for k in self.ks:
            yk = y[:, self.genes(k)]
            y_mean = yk.mean(0)
            a = float(self.alpha_fn(k, d))
            coef = np.linalg.solve(gram + a * np.eye(d), zc.T @ (yk - y_mean))
            self.alphas[k], self.coef[k], self.intercept[k] = a, coef, y_mean - z_mean @ coef
        self.dim = d
        return self

    def predict(self, features: object) -> dict[int, np.ndarray]:
        """{k: (n, k) predictions for `genes(k)`}."""
        x = self._check_fitted(features)
        z = ((x - self.mean) / self.scale - self.pca_mean) @ self.components.T
        out = {k: z @ self.coef[k] + self.intercept[k] for k in self.ks}
        return {k: np.clip(p, 0.0, None) for k, p in out.items()} if self.clip_negative else out


class MLPOracle(_Regressor):
    """features -> MLP (ReLU, hidden 1024-1024) -> all G genes; the curve reads the top-k columns.

    Training follows sklearn MLPRegressor's documented defaults (the paper's regressor): Adam
    (lr 1e-3), squared loss / 2 + 0.5 * l2 * |W|^2 / batch, minibatches of min(200, n) reshuffled each
    epoch, at most `epochs` epochs, stop after `n_iter_no_change` epochs without a training-loss
    improvement > tol; Glorot-uniform init of weights and biases. Seeded through a torch.Generator."""

    def __init__(
        self,
        ks: Sequence[int] = K_GRID,
        hidden: Sequence[int] = (1024, 1024),
        *,
        epochs: int = 200,
        lr: float = 1e-3,
        l2: float = 1e-4,
        batch_size: int = 200,
        tol: float = 1e-4,
        n_iter_no_change: int = 10,
        clip_negative: bool = True,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        super().__init__(ks)
        self.hidden, self.epochs, self.lr, self.l2 = tuple(int(h) for h in hidden), int(epochs), lr, l2
        self.batch_size, self.tol, self.n_iter_no_change = int(batch_size), tol, int(n_iter_no_change)
        self.clip_negative, self.seed, self.device = clip_negative, int(seed), device
        self.loss_curve: list[float] = []

    def _build(self, d_in: int, d_out: int, gen: object):
        import torch

        dims = (d_in, *self.hidden, d_out)
        layers: list[torch.nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            lin = torch.nn.Linear(a, b, dtype=torch.float32)
            bound = float(np.sqrt(6.0 / (a + b)))
            with torch.no_grad():
                lin.weight.copy_((torch.rand(b, a, generator=gen) * 2 - 1) * bound)
                lin.bias.copy_((torch.rand(b, generator=gen) * 2 - 1) * bound)
            layers.append(lin)
            if i < len(dims) - 2:
                layers.append(torch.nn.ReLU())
        return torch.nn.Sequential(*layers).to(self.device)

    def fit(self, train_features: object, train_expression: object) -> MLPOracle:
        """Fit on the TRAINING split's real-tile features (n, d) and expression (n, G) only."""
        import torch

        x, y = self._setup(train_features, train_expression)
        gen = torch.Generator().manual_seed(self.seed)
        self.net = self._build(x.shape[1], y.shape[1], gen)
        xt = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        yt = torch.as_tensor(y, dtype=torch.float32, device=self.device)
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr, betas=(0.9, 0.999), eps=1e-8)
        weights = [m.weight for m in self.net if isinstance(m, torch.nn.Linear)]
        n, bs = x.shape[0], min(self.batch_size, x.shape[0])
        best, stale = np.inf, 0
        self.loss_curve = []
        self.net.train()
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=gen).to(self.device)
            total = 0.0
            for start in range(0, n, bs):
                idx = perm[start : start + bs]
                loss = 0.5 * torch.mean((self.net(xt[idx]) - yt[idx]) ** 2)
                loss = loss + 0.5 * self.l2 * sum((w**2).sum() for w in weights) / idx.numel()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.numel()
            self.loss_curve.append(total / n)
            if self.loss_curve[-1] > best - self.tol:
                stale += 1
            else:
                stale = 0
            best = min(best, self.loss_curve[-1])
            if stale >= self.n_iter_no_change:
                break
        self.net.eval()
        return self

    def predict(self, features: object) -> dict[int, np.ndarray]:
        """{k: (n, k) predictions for `genes(k)`} (one network, the columns of the top-k genes)."""
        import torch

        x = self._check_fitted(features)
        with torch.no_grad():
            p = self.net(torch.as_tensor(x, dtype=torch.float32, device=self.device)).double().cpu().numpy()
        if self.clip_negative:
            p = np.clip(p, 0.0, None)
        return {k: p[:, self.genes(k)] for k in self.ks}


def integrate_curve(ks: Sequence[int], values: Sequence[float | None], method: str = "mean") -> float | None:
    """Normalised area under the k -> mean-r curve (constant c -> c); None if any point is missing."""
    if method not in INTEGRATIONS:
        raise ValueError(f"integration must be one of {INTEGRATIONS}, got {method!r}")
    if len(ks) != len(values) or not ks:
        raise ValueError(f"need one value per k, got {len(ks)} ks and {len(values)} values")
    if any(v is None for v in values):
        return None
    v = np.asarray(values, dtype=np.float64)
    if method == "mean" or len(ks) == 1:
        return float(v.mean())
    axis = {
        "trapezoid_log_k": np.log(np.asarray(ks, np.float64)),
        "trapezoid_k": np.asarray(ks, np.float64),
        "trapezoid_index": np.arange(len(ks), dtype=np.float64),
    }[method]
    return float(np.sum((v[1:] + v[:-1]) / 2 * np.diff(axis)) / (axis[-1] - axis[0]))


@dataclass(frozen=True)
class CurveScore:
    auc: float | None
    curve: dict[int, MetricResult]  # k -> mean per-gene r over the top-k genes (with exclusions)
    integration: str


def _blocks(
    test_expression: object, predictions: Mapping[int, np.ndarray], genes: Mapping[int, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, slice]]]:
    """Truth and prediction columns of every k side by side (one matrix: one bootstrap resample)."""
    t = as_matrix(test_expression, "test_expression")
    ts, ps, spans, col = [], [], [], 0
    for k in sorted(predictions):
        p = as_matrix(predictions[k], f"predictions[{k}]")
        idx = np.asarray(genes[k])
        if p.shape != (t.shape[0], idx.size):
            raise ValueError(f"predictions[{k}] has shape {p.shape}, expected {(t.shape[0], idx.size)}")
        ts.append(t[:, idx])
        ps.append(p)
        spans.append((k, slice(col, col + idx.size)))
        col += idx.size
    return np.concatenate(ts, 1), np.concatenate(ps, 1), spans


def _score_blocks(
    t: np.ndarray, p: np.ndarray, spans: list[tuple[int, slice]], integration: str
) -> CurveScore:
    curve = {k: column_pearson(t[:, s], p[:, s], rtol=CONSTANT_RTOL).summary() for k, s in spans}
    ks = [k for k, _ in spans]
    return CurveScore(integrate_curve(ks, [curve[k].value for k in ks], integration), curve, integration)


def score_curve(
    test_expression: object,
    predictions: Mapping[int, np.ndarray],
    genes: Mapping[int, np.ndarray],
    *,
    integration: str = "mean",
) -> CurveScore:
    """Per-k mean per-gene Pearson r of predictions against MEASURED test expression, and its AUC."""
    t, p, spans = _blocks(test_expression, predictions, genes)
    return _score_blocks(t, p, spans, integration)


def bootstrap_auc(
    test_expression: object,
    predictions: Mapping[int, np.ndarray],
    genes: Mapping[int, np.ndarray],
    *,
    integration: str = "mean",
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Spot-level percentile CI of the AUC (STMDiT D.6): resample test spots (statistics.bootstrap_ci's
    scheme, so the same seed draws the same spots for every model), recompute every per-gene r, integrate."""
    t, p, spans = _blocks(test_expression, predictions, genes)
    return bootstrap_ci(
        t,
        p,
        lambda tt, pp: _score_blocks(tt, pp, spans, integration).auc,
        n_boot=n_boot,
        confidence=confidence,
        seed=seed,
    )
