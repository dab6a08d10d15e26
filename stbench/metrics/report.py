"""The declared metric set of one test slide as one flat dict: the values a result row stores.

`slide_metrics` is what the runner calls once per test slide on the gathered, de-duplicated
predictions. Every mean-type metric X comes with its bookkeeping, so a missing value explains
itself and a table can print it honestly:

    X              value (None when every item was excluded)
    X_n            items averaged (genes; spots for pcc_spot)
    X_excluded     items excluded (constant in truth or prediction)
    X_excluded_truth / X_excluded_pred   the two reasons (a gene can have both)

`describe(row, "pcc")` renders "0.412" or "n/a (all 50 genes constant in prediction)".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from stbench.errors import UnknownNameError
from stbench.metrics import clustering, expression, spatial
from stbench.metrics.expression import CONSTANT_RTOL, MetricResult

METRICS = (
    "pcc",
    "pcc_partial",
    "pcc_k",
    "pcc_posthoc",
    "pcc_spot",
    "mse",
    "mae",
    "rvd",
    "ssim",
    "coexpr",
    "ari",
)
_NEEDS = {
    "pcc_partial": "log_totals",
    "pcc_k": "fixed_genes",
    "pcc_posthoc": "fixed_genes or posthoc_k",
    "ssim": "grid",
    "ari": "labels",
}
_UNIT = {"pcc_spot": "spots"}

Row = dict[str, float | int | None]


def _put(row: Row, key: str, res: MetricResult) -> None:
    row[key] = res.value
    row[f"{key}_n"] = res.n
    row[f"{key}_excluded"] = res.excluded
    row[f"{key}_excluded_truth"] = res.excluded_truth
    row[f"{key}_excluded_pred"] = res.excluded_pred


def _gene_index(genes: Sequence[str]) -> dict[str, int]:
    index = {g: i for i, g in enumerate(genes)}
    if len(index) != len(genes):
        dup = sorted({g for g in genes if list(genes).count(g) > 1})
        raise ValueError(f"duplicate gene names: {dup[:10]}")
    return index


def _fixed_indices(name: str, k: int, wanted: Sequence[str], index: Mapping[str, int]) -> np.ndarray:
    if len(wanted) != k:
        raise ValueError(f"{name}: the fixed gene list has {len(wanted)} genes, not {k}")
    missing = [g for g in wanted if g not in index]
    if missing:
        raise ValueError(
            f"{name}: {len(missing)} fixed genes are not among the predicted genes: {missing[:10]}"
        )
    return np.array([index[g] for g in wanted], dtype=np.int64)


def _selected(metrics: Sequence[str] | None, available: dict[str, bool]) -> list[str]:
    if metrics is None:
        return [m for m in METRICS if available[m]]
    for m in metrics:
        if m not in METRICS:
            raise UnknownNameError("metric", m, list(METRICS))
        if not available[m]:
            raise ValueError(f"metric {m!r} needs `{_NEEDS[m]}`")
    return list(metrics)


def slide_metrics(
    truth: object,
    pred: object,
    genes: Sequence[str],
    *,
    fixed_genes: Mapping[int, Sequence[str]] | None = None,
    posthoc_k: Sequence[int] | None = None,
    grid: np.ndarray | None = None,
    labels: Sequence[object] | None = None,
    log_totals: object | None = None,
    metrics: Sequence[str] | None = None,
    seed: int = 0,
    rtol: float = CONSTANT_RTOL,
) -> Row:
    """All declared metrics of one test slide (truth, pred: (spots, genes) in the target space).

    fixed_genes: {k: the k gene names fixed BEFORE testing} -> `pcc{k}` (e.g. `panel.top_k(50)`).
    posthoc_k:   ks for `pcc{k}_posthoc` (default: the ks of fixed_genes, so both sit side by side).
    grid:        integer (row, col) spot cells (`spatial.spot_grid`) -> `ssim`.
    labels:      per-spot pathologist labels -> `ari`, `ari_truth`.
    log_totals:  per-spot log library size (`expression.log_library_size` of the totals over ALL
                 genes of the slide, taken from the data, never from the method) -> `pcc_partial`.
    metrics:     a subset of METRICS; default every metric whose inputs were given.
    """
    t, p = expression.check_pair(truth, pred)
    genes = list(genes)
    if len(genes) != t.shape[1]:
        raise ValueError(f"{len(genes)} gene names for {t.shape[1]} predicted genes")
    index = _gene_index(genes)
    fixed = dict(fixed_genes or {})
    ks = sorted(set(posthoc_k if posthoc_k is not None else fixed))
    available = {m: True for m in METRICS}
    available.update(
        pcc_partial=log_totals is not None,
        pcc_k=bool(fixed),
        pcc_posthoc=bool(ks),
        ssim=grid is not None,
        ari=labels is not None,
    )
    chosen = _selected(metrics, available)

    row: Row = {"n_spots": int(t.shape[0]), "n_genes": int(t.shape[1])}
    corr = expression.column_pearson(t, p, rtol=rtol) if {"pcc", "pcc_posthoc"} & set(chosen) else None
    if "pcc" in chosen:
        _put(row, "pcc", corr.summary())
    if "pcc_partial" in chosen:
        _put(row, "pcc_partial", expression.pcc_partial(t, p, log_totals, rtol=rtol))
    if "pcc_k" in chosen:
        for k in sorted(fixed):
            _put(
                row,
                f"pcc{k}",
                expression.pcc_fixed_genes(t, p, _fixed_indices(f"pcc{k}", k, fixed[k], index), rtol=rtol),
            )
    if "pcc_posthoc" in chosen:
        for k in ks:
            _put(row, f"pcc{k}_posthoc", expression.posthoc_top_k(corr, k))
    if "pcc_spot" in chosen:
        _put(row, "pcc_spot", expression.pcc_spot(t, p, rtol=rtol))
    if "mse" in chosen:
        row["mse"] = expression.mse(t, p)
    if "mae" in chosen:
        row["mae"] = expression.mae(t, p)
    if "rvd" in chosen:
        _put(row, "rvd", expression.rvd(t, p, rtol=rtol))
    if "ssim" in chosen:
        _put(row, "ssim", spatial.ssim(t, p, grid, rtol=rtol))
    if "coexpr" in chosen:
        _put(row, "coexpr", spatial.coexpr(t, p, rtol=rtol))
    if "ari" in chosen:
        res = clustering.ari(p, labels, seed=seed)
        row.update(ari=res.value, ari_truth=clustering.ari(t, labels, seed=seed).value)
        row.update(ari_n_spots=res.n_spots, ari_excluded_spots=res.excluded_spots, ari_k=res.n_clusters)
    return row


def pooled_metrics(truths: Sequence[object], preds: Sequence[object], *, rtol: float = CONSTANT_RTOL) -> Row:
    """`pcc_pooled` (+ bookkeeping) over the spots of all given test slides stacked together, under
    HEST-Bench's rule (None when any gene is constant over the pooled spots)."""
    row: Row = {}
    _put(row, "pcc_pooled", expression.pcc_pooled(truths, preds, rtol=rtol))
    return row


def describe(row: Mapping[str, object], key: str, *, digits: int = 3) -> str:
    """A metric as a table shows it; a missing value says why, e.g. "n/a (all 50 genes constant in prediction)"."""
    if key not in row:
        return "—"
    value = row[key]
    if value is not None and not (isinstance(value, float) and np.isnan(value)):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    unit = _UNIT.get(key, "genes")
    total = int(row.get(f"{key}_excluded", 0) or 0) + int(row.get(f"{key}_n", 0) or 0)
    n_t, n_p = int(row.get(f"{key}_excluded_truth", 0) or 0), int(row.get(f"{key}_excluded_pred", 0) or 0)
    if total and n_p == total:
        return f"n/a (all {total} {unit} constant in prediction)"
    if total and n_t == total:
        return f"n/a (all {total} {unit} constant in truth)"
    n_ex = int(row.get(f"{key}_excluded", 0) or 0)
    if total and n_ex == total:
        return f"n/a (all {total} {unit} constant in truth or prediction)"
    if key == "pcc_pooled" and n_ex:
        return f"n/a ({n_ex} of {total} {unit} constant; HEST's mean over genes is undefined)"
    return "n/a"
