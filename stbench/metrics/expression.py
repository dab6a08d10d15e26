"""Expression metrics of one test slide: gene-wise / spot-wise / pooled PCC, PCC-k, MSE, MAE, RVD.

Every metric takes `truth` and `pred` as (spots, genes) arrays in the protocol's target space and is
computed in float64, in gene blocks so 20,000 genes x 5,000 spots never needs a full float64 copy.

Conventions (docs/metrics.md is the reference; the names here are the names in result rows):

* A gene (or spot) whose values are constant - standard deviation <= `rtol` x its largest absolute
  value, default rtol = 1e-6 (~8 float32 ulps), or exactly zero - has no correlation. It is
  EXCLUDED from the mean and counted (`excluded_truth`, `excluded_pred`), never turned into NaN or
  0 inside a mean. If every gene is excluded the value is None (a constant predictor such as
  `mean` has no gene-wise PCC), shown in tables as "n/a (all G genes constant in prediction)".
* `pcc_fixed_genes` averages genes fixed BEFORE testing; `pcc_posthoc` (the k highest per-gene
  PCCs on the test slide, Stem's convention) exists only under the `pcc{k}_posthoc` name.
* `pcc_pooled` correlates over the spots of several slides pooled together: a different (and
  usually higher) number than the per-slide mean, hence its own name. It follows HEST-Bench
  exactly: the plain mean over ALL genes, so one constant gene makes it undefined (None), as
  HEST's `np.mean` of a NaN `pearsonr` is NaN.
* `pcc_partial` is the gene-wise partial correlation given log library size: what a prediction
  gets right beyond sequencing depth (a depth-only predictor has none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

CONSTANT_RTOL = 1e-6
_BLOCK_ELEMENTS = 1_000_000  # float64 elements per block and per array (~8 MB)


@dataclass(frozen=True)
class MetricResult:
    """A mean over items (genes or spots) plus what was left out, so a missing value explains itself."""

    value: float | None  # None when no item is left to average
    n: int  # items averaged
    excluded: int  # items excluded (constant in truth or prediction)
    excluded_truth: int  # constant in truth (whether or not also constant in prediction)
    excluded_pred: int  # constant in prediction (whether or not also constant in truth)


@dataclass(frozen=True)
class Correlations:
    """Per-column Pearson r; `r` is NaN exactly where `excluded` is True (never averaged)."""

    r: np.ndarray
    constant_truth: np.ndarray
    constant_pred: np.ndarray

    @property
    def excluded(self) -> np.ndarray:
        return self.constant_truth | self.constant_pred

    def summary(self, subset: np.ndarray | None = None) -> MetricResult:
        """Mean of r over the non-excluded columns (of `subset`, an index array, when given)."""
        r, ct, cp = (self.r, self.constant_truth, self.constant_pred)
        if subset is not None:
            r, ct, cp = r[subset], ct[subset], cp[subset]
        keep = ~(ct | cp)
        value = float(np.mean(r[keep])) if keep.any() else None
        return MetricResult(value, int(keep.sum()), int((~keep).sum()), int(ct.sum()), int(cp.sum()))


def as_matrix(x: object, name: str) -> np.ndarray:
    """A finite 2-D float array (spots, genes); torch tensors and lists are accepted."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy() if str(x.dtype) == "torch.bfloat16" else x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (spots, genes), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{name} has non-finite values (first at spot {bad[0]}, gene {bad[1]})")
    return a


def check_pair(truth: object, pred: object) -> tuple[np.ndarray, np.ndarray]:
    t, p = as_matrix(truth, "truth"), as_matrix(pred, "pred")
    if t.shape != p.shape:
        raise ValueError(f"truth {t.shape} and pred {p.shape} must have the same (spots, genes) shape")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"empty input: shape {t.shape}")
    return t, p


def _blocks(n_rows: int, n_cols: int) -> list[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(n_rows, 1))
    return [slice(j, min(j + step, n_cols)) for j in range(0, n_cols, step)]


def _centred(block: np.ndarray, rtol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column-centred float64 block, its sums of squares, and which columns are constant."""
    x = block.astype(np.float64, copy=True)
    scale = np.abs(x).max(axis=0)
    x -= x.mean(axis=0)
    ss = np.einsum("ij,ij->j", x, x)
    std = np.sqrt(ss / x.shape[0])
    return x, ss, (std <= rtol * scale) | (ss == 0)


def _blockwise_pearson(
    truth: np.ndarray,
    pred: np.ndarray,
    prepare: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> Correlations:
    """Per-column Pearson r of `prepare`d blocks (centred, or residualised on a covariate): one
    loop for `pcc` and `pcc_partial`, so both share the block size and the exclusion rule."""
    n, g = truth.shape
    r = np.full(g, np.nan)
    const_t = np.zeros(g, dtype=bool)
    const_p = np.zeros(g, dtype=bool)
    for blk in _blocks(n, g):
        xt, sst, ct = prepare(truth[:, blk])
        xp, ssp, cp = prepare(pred[:, blk])
        sxy = np.einsum("ij,ij->j", xt, xp)
        ok = ~(ct | cp)
        rb = np.full(sxy.shape, np.nan)
        rb[ok] = np.clip(sxy[ok] / np.sqrt(sst[ok] * ssp[ok]), -1.0, 1.0)
        r[blk], const_t[blk], const_p[blk] = rb, ct, cp
    return Correlations(r, const_t, const_p)


def column_pearson(truth: np.ndarray, pred: np.ndarray, *, rtol: float = CONSTANT_RTOL) -> Correlations:
    """Pearson r of each column of `truth` with the same column of `pred` (two-pass, float64)."""
    return _blockwise_pearson(truth, pred, lambda block: _centred(block, rtol))


def genewise_pcc(truth: object, pred: object, *, rtol: float = CONSTANT_RTOL) -> Correlations:
    """Per-gene Pearson r across the spots of one slide (the building block of `pcc`)."""
    t, p = check_pair(truth, pred)
    return column_pearson(t, p, rtol=rtol)


def pcc(truth: object, pred: object, *, rtol: float = CONSTANT_RTOL) -> MetricResult:
    """`pcc`: mean over the genes of the set of the per-gene PCC across this slide's spots."""
    return genewise_pcc(truth, pred, rtol=rtol).summary()


def pcc_fixed_genes(
    truth: object, pred: object, genes: Sequence[int] | np.ndarray, *, rtol: float = CONSTANT_RTOL
) -> MetricResult:
    """`pcc{k}`: mean gene-wise PCC over genes chosen BEFORE testing (column indices, e.g. top-k
    training variance). Only these columns are read, so the test slide cannot influence the set."""
    t, p = check_pair(truth, pred)
    idx = np.asarray(genes, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError("pcc_fixed_genes needs at least one gene")
    if len(np.unique(idx)) != idx.size:
        raise ValueError("pcc_fixed_genes: the gene list has duplicates")
    if idx.min() < -t.shape[1] or idx.max() >= t.shape[1]:
        raise ValueError(f"pcc_fixed_genes: gene index out of range for {t.shape[1]} genes")
    return column_pearson(t[:, idx], p[:, idx], rtol=rtol).summary()


def posthoc_top_k(corr: Correlations, k: int) -> MetricResult:
    """Mean of the k highest per-gene PCCs (excluded genes are never candidates)."""
    if k < 1 or k > corr.r.size:
        raise ValueError(f"posthoc k={k} must be between 1 and the number of genes ({corr.r.size})")
    keep = ~corr.excluded
    r = np.sort(corr.r[keep])[::-1][:k]
    value = float(np.mean(r)) if r.size else None
    return MetricResult(
        value, int(r.size), int((~keep).sum()), int(corr.constant_truth.sum()), int(corr.constant_pred.sum())
    )


def pcc_posthoc(truth: object, pred: object, k: int, *, rtol: float = CONSTANT_RTOL) -> MetricResult:
    """`pcc{k}_posthoc`: mean of the k HIGHEST per-gene PCCs on the test slide itself (Stem's
    PCC-k). The genes are picked by their test score, so this is optimistic; it is only ever
    reported under the `_posthoc` name. Fewer than k non-constant genes: the mean of all of them
    (`n` says how many)."""
    return posthoc_top_k(genewise_pcc(truth, pred, rtol=rtol), k)


def pcc_pooled(
    truths: Sequence[object], preds: Sequence[object], *, rtol: float = CONSTANT_RTOL
) -> MetricResult:
    """`pcc_pooled`, HEST-Bench's fold score: per-gene PCC over the spots of ALL given slides stacked
    together, then the plain mean over every gene (HEST: `np.mean` of scipy `pearsonr`s, no nanmean).
    A gene constant over the pooled spots has no r, so the value is None whenever any gene is
    constant (HEST's NaN); `excluded*` count them. Between-slide differences in level inflate it
    relative to the per-slide mean (MERGE#6)."""
    if len(truths) != len(preds) or not truths:
        raise ValueError(
            f"pcc_pooled needs as many truths as predictions (>= 1): {len(truths)} vs {len(preds)}"
        )
    pairs = [check_pair(t, p) for t, p in zip(truths, preds, strict=True)]
    widths = {t.shape[1] for t, _ in pairs}
    if len(widths) != 1:
        raise ValueError(f"pcc_pooled: slides have different gene counts {sorted(widths)}")
    t = np.concatenate([t for t, _ in pairs], axis=0)
    p = np.concatenate([p for _, p in pairs], axis=0)
    res = column_pearson(t, p, rtol=rtol).summary()
    if res.excluded:  # np.mean over genes with a NaN is NaN: no partial mean under HEST's rule
        return MetricResult(None, res.n, res.excluded, res.excluded_truth, res.excluded_pred)
    return res


def log_library_size(totals: object) -> np.ndarray:
    """log(max(total, 1)) per spot, float64: the covariate of `pcc_partial`. A spot with no counts
    gets 0 (the value of a 1-count spot) instead of -inf, so it stays in the metric; the `depth`
    reference uses the same guard, so its prediction is exactly linear in this covariate."""
    x = np.asarray(totals, dtype=np.float64).reshape(-1)
    if not np.isfinite(x).all() or (x < 0).any():
        raise ValueError("library sizes must be finite and >= 0")
    return np.log(np.maximum(x, 1.0))


def _residualised(
    block: np.ndarray, zc: np.ndarray, zz: float, rtol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OLS residuals of each column on [1, z] (zc = z centred, zz = its sum of squares), their sums
    of squares, and which columns have constant residuals (same relative rule as `_centred`)."""
    x = block.astype(np.float64, copy=True)
    scale = np.abs(x).max(axis=0)
    x -= x.mean(axis=0)
    if zz > 0:
        x -= np.outer(zc, (zc @ x) / zz)
    ss = np.einsum("ij,ij->j", x, x)
    std = np.sqrt(ss / x.shape[0])
    return x, ss, (std <= rtol * scale) | (ss == 0)


def partial_column_pearson(
    truth: np.ndarray, pred: np.ndarray, covariate: object, *, rtol: float = CONSTANT_RTOL
) -> Correlations:
    """Per column, Pearson r of the OLS residuals of `truth` and `pred` on [1, covariate]: the partial
    correlation given the covariate. A covariate with no spread (std <= rtol x max|z|) explains
    nothing beyond the intercept, so r is then the plain Pearson r."""
    n = truth.shape[0]
    z = np.asarray(covariate, dtype=np.float64).reshape(-1)
    if z.size != n:
        raise ValueError(f"covariate has {z.size} values for {n} spots")
    if not np.isfinite(z).all():
        raise ValueError("covariate has non-finite values")
    zc = z - z.mean()
    zz = float(zc @ zc)
    if np.sqrt(zz / n) <= rtol * np.abs(z).max():
        zz = 0.0
    return _blockwise_pearson(truth, pred, lambda block: _residualised(block, zc, zz, rtol))


def pcc_partial(
    truth: object, pred: object, log_totals: object, *, rtol: float = CONSTANT_RTOL
) -> MetricResult:
    """`pcc_partial`: mean over genes of the partial PCC of truth and prediction given each spot's log
    library size (`log_library_size` of the totals over ALL genes of the slide). Gene-wise PCC on
    depth-dependent targets mostly measures depth; this is what is left. Genes whose residual is
    constant in truth or prediction (e.g. every gene of a prediction linear in log depth) are
    excluded and counted, as in `pcc`."""
    t, p = check_pair(truth, pred)
    return partial_column_pearson(t, p, log_totals, rtol=rtol).summary()


def pcc_spot(truth: object, pred: object, *, rtol: float = CONSTANT_RTOL) -> MetricResult:
    """`pcc_spot`: per spot, Pearson r across the genes of the set; mean over spots. Constant spots
    (e.g. all-zero truth) are excluded and counted like constant genes."""
    t, p = check_pair(truth, pred)
    if t.shape[1] < 2:
        raise ValueError("pcc_spot needs at least 2 genes")
    return column_pearson(t.T, p.T, rtol=rtol).summary()


def mse(truth: object, pred: object) -> float:
    """`mse`: mean of (pred - truth)^2 over all spots x genes of the set."""
    t, p = check_pair(truth, pred)
    total = 0.0
    for blk in _blocks(t.shape[0], t.shape[1]):
        d = p[:, blk].astype(np.float64) - t[:, blk].astype(np.float64)
        total += float(np.einsum("ij,ij->", d, d))
    return total / t.size


def mae(truth: object, pred: object) -> float:
    """`mae`: mean of |pred - truth| over all spots x genes of the set."""
    t, p = check_pair(truth, pred)
    total = 0.0
    for blk in _blocks(t.shape[0], t.shape[1]):
        total += float(np.abs(p[:, blk].astype(np.float64) - t[:, blk].astype(np.float64)).sum())
    return total / t.size


def rvd(truth: object, pred: object, *, rtol: float = CONSTANT_RTOL) -> MetricResult:
    """`rvd`, relative variance distance (Stem): mean over genes of (var_pred - var_true)^2 / var_true^2,
    variances across the slide's spots with ddof=0 (numpy's default, as in Stem's eval.ipynb).
    Genes constant in truth (var_true ~ 0) are excluded and counted; a constant prediction is
    fine here (it scores 1 for that gene)."""
    t, p = check_pair(truth, pred)
    g = t.shape[1]
    terms = np.full(g, np.nan)
    const_t = np.zeros(g, dtype=bool)
    for blk in _blocks(t.shape[0], g):
        _, sst, ct = _centred(t[:, blk], rtol)
        _, ssp, _ = _centred(p[:, blk], rtol)
        vt, vp = sst / t.shape[0], ssp / t.shape[0]
        tb = np.full(vt.shape, np.nan)
        tb[~ct] = (vp[~ct] - vt[~ct]) ** 2 / vt[~ct] ** 2
        terms[blk], const_t[blk] = tb, ct
    keep = ~const_t
    value = float(np.mean(terms[keep])) if keep.any() else None
    return MetricResult(value, int(keep.sum()), int(const_t.sum()), int(const_t.sum()), 0)
