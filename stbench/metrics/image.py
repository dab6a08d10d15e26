"""Image-generation metrics (`task = image`, STMDiT): one import point for the three modules.

* image_fid: FID (eigendecomposition route), streaming statistics, per-group FID, bootstrap, Delta.
* image_oracle: oracle regressors fitted on training pairs, per-k Pearson curve, integrated AUC.
* image_perturbation: the tissue perturbation composite (transition + monotonicity).
"""

from stbench.metrics.image_fid import (
    REGIME_KEYS,
    REGIMES,
    FIDBootstrap,
    GaussianStats,
    GroupFID,
    StreamingStats,
    feature_stats,
    fid,
    fid_bootstrap,
    fid_delta,
    fid_from_stats,
    fid_per_group,
    frechet_distance,
    trace_sqrt_product,
)
from stbench.metrics.image_oracle import (
    INTEGRATIONS,
    K_GRID,
    CurveScore,
    MLPOracle,
    RidgeOracle,
    bootstrap_auc,
    effective_ks,
    integrate_curve,
    oracle_alpha,
    score_curve,
    top_variance_genes,
)
from stbench.metrics.image_perturbation import (
    ALPHAS,
    LAMBDA_MONO,
    PerturbationScores,
    class_centroids,
    composite_from_distances,
    interpolate,
    perturbation_composite,
    three_pair_mean,
)

__all__ = [
    "ALPHAS",
    "INTEGRATIONS",
    "K_GRID",
    "LAMBDA_MONO",
    "REGIMES",
    "REGIME_KEYS",
    "CurveScore",
    "FIDBootstrap",
    "GaussianStats",
    "GroupFID",
    "MLPOracle",
    "PerturbationScores",
    "RidgeOracle",
    "StreamingStats",
    "bootstrap_auc",
    "class_centroids",
    "composite_from_distances",
    "effective_ks",
    "feature_stats",
    "fid",
    "fid_bootstrap",
    "fid_delta",
    "fid_from_stats",
    "fid_per_group",
    "frechet_distance",
    "integrate_curve",
    "interpolate",
    "oracle_alpha",
    "perturbation_composite",
    "score_curve",
    "three_pair_mean",
    "top_variance_genes",
    "trace_sqrt_product",
]
