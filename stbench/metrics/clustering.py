"""ARI of clusters of predicted expression against pathologist region labels.

Declared pipeline (`ari`, and `ari_truth` = the same on the measured expression, the ceiling a
prediction can be compared with):
  1. spots whose label is missing (None / NaN / empty) or in `ignore` (default "undetermined",
     Her2ST's label for unannotated spots, and "unlabelled", the Her2ST reader's mark for spots
     absent from the label file) are dropped and counted;
  2. PCA of the expression (centred, not scaled; sklearn `PCA(svd_solver="full")`) to
     min(n_pcs = 20, genes, spots - 1) components;
  3. k-means with k = number of distinct remaining labels (`KMeans(n_init=10, random_state=seed)`);
  4. sklearn `adjusted_rand_score(labels, clusters)`.
Expression with zero total variance (a constant predictor) is one cluster: ARI = 0 by definition
of the adjusted index, computed rather than special-cased by hand.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stbench.metrics.expression import as_matrix

ARI_PCS = 20
IGNORED_LABELS = ("undetermined", "unlabelled")


@dataclass(frozen=True)
class AriResult:
    value: float
    n_spots: int  # spots scored
    excluded_spots: int  # spots without a usable label
    n_clusters: int  # k = number of distinct labels


def _usable(labels: Sequence[object], ignore: Sequence[str]) -> np.ndarray:
    def ok(v: object) -> bool:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return False
        return str(v).strip() != "" and str(v) not in ignore

    return np.array([ok(v) for v in labels], dtype=bool)


def cluster_expression(x: np.ndarray, k: int, *, n_pcs: int = ARI_PCS, seed: int = 0) -> np.ndarray:
    """k-means cluster ids of spots on the PCA of their expression (seeded, deterministic)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    x = np.asarray(x, dtype=np.float64)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if np.allclose(x, x[0:1], rtol=0.0, atol=0.0) or k == 1:
        return np.zeros(x.shape[0], dtype=np.int64)
    n_comp = max(1, min(n_pcs, x.shape[1], x.shape[0] - 1))
    z = PCA(n_components=n_comp, svd_solver="full").fit_transform(x)
    # k-means on one OpenMP thread: spots are few (<= ~10^4), and on a busy machine its threads
    # oversubscribe the cores and run 10-100x slower. The result does not depend on it.
    with threadpool_limits(limits=1, user_api="openmp"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning when fewer distinct points than k
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z)


def ari(
    expression: object,
    labels: Sequence[object],
    *,
    n_pcs: int = ARI_PCS,
    seed: int = 0,
    ignore: Sequence[str] = IGNORED_LABELS,
) -> AriResult:
    """ARI between k-means clusters of `expression` (spots, genes) and per-spot `labels`."""
    from sklearn.metrics import adjusted_rand_score

    x = as_matrix(expression, "expression")
    labels = list(labels)
    if len(labels) != x.shape[0]:
        raise ValueError(f"{len(labels)} labels for {x.shape[0]} spots")
    use = _usable(labels, ignore)
    kept = [str(v) for v, u in zip(labels, use, strict=True) if u]
    k = len(set(kept))
    if k < 2:
        raise ValueError(f"ARI needs at least 2 distinct labels among the labelled spots, got {k}")
    clusters = cluster_expression(x[use], k, n_pcs=n_pcs, seed=seed)
    return AriResult(float(adjusted_rand_score(kept, clusters)), int(use.sum()), int((~use).sum()), k)
