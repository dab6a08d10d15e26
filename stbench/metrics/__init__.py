"""Evaluation metrics with declared conventions (docs/metrics.md): the framework computes them,
identically for every method; methods never compute their own test metrics."""

from stbench.metrics.clustering import AriResult, ari, cluster_expression
from stbench.metrics.expression import (
    CONSTANT_RTOL,
    Correlations,
    MetricResult,
    genewise_pcc,
    log_library_size,
    mae,
    mse,
    pcc,
    pcc_fixed_genes,
    pcc_partial,
    pcc_pooled,
    pcc_posthoc,
    pcc_spot,
    rvd,
)
from stbench.metrics.report import METRICS, describe, pooled_metrics, slide_metrics
from stbench.metrics.spatial import coexpr, rasterise, spot_grid, ssim, ssim_genes
from stbench.metrics.statistics import (
    Aggregate,
    BootstrapCI,
    PairedTest,
    aggregate,
    aggregate_rows,
    bootstrap_ci,
    paired_ttest,
    significance_mark,
    significance_mark_stars,
    wilcoxon_test,
)

__all__ = [
    "CONSTANT_RTOL",
    "METRICS",
    "Aggregate",
    "AriResult",
    "BootstrapCI",
    "Correlations",
    "MetricResult",
    "PairedTest",
    "aggregate",
    "aggregate_rows",
    "ari",
    "bootstrap_ci",
    "cluster_expression",
    "coexpr",
    "describe",
    "genewise_pcc",
    "log_library_size",
    "mae",
    "mse",
    "paired_ttest",
    "pcc",
    "pcc_fixed_genes",
    "pcc_partial",
    "pcc_pooled",
    "pcc_posthoc",
    "pcc_spot",
    "pooled_metrics",
    "rasterise",
    "rvd",
    "significance_mark",
    "significance_mark_stars",
    "slide_metrics",
    "spot_grid",
    "ssim",
    "ssim_genes",
    "wilcoxon_test",
]

_STREAMING = ("GenewisePCC", "StreamingMAE", "StreamingMSE")
__all__ += list(_STREAMING)


def __getattr__(name: str) -> object:
    """Streaming (torchmetrics) classes load lazily: scoring predictions never needs torch."""
    if name in _STREAMING:
        from stbench.metrics import streaming

        return getattr(streaming, name)
    raise AttributeError(f"module 'stbench.metrics' has no attribute {name!r}")
