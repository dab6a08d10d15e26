"""Aggregation, bootstrap CIs, paired tests and significance marks against scipy and hand formulas."""

from __future__ import annotations

from itertools import product

import numpy as np
import pytest
from scipy import stats

from stbench.metrics import (
    aggregate,
    aggregate_rows,
    bootstrap_ci,
    mse,
    paired_ttest,
    pcc,
    significance_mark,
    significance_mark_stars,
    wilcoxon_test,
)
from tests.conftest import HER2ST

B4 = HER2ST / "data" / "ST-cnts" / "B4.tsv.gz"


# --- aggregation --------------------------------------------------------------------------------


def test_aggregate_is_mean_and_sample_sd_and_counts_missing():
    vals = [0.31, 0.42, None, 0.27, float("nan"), 0.5]
    agg = aggregate(vals)
    x = np.array([0.31, 0.42, 0.27, 0.5])
    assert agg.mean == pytest.approx(x.mean()) and agg.sd == pytest.approx(x.std(ddof=1))
    assert (agg.n, agg.n_missing) == (4, 2)
    assert aggregate(vals, ddof=0).sd == pytest.approx(x.std())
    assert str(agg) == f"{x.mean():.3f} ± {x.std(ddof=1):.3f}"
    none = aggregate([None, None])
    assert none.mean is None and none.n_missing == 2 and str(none) == "n/a"
    one = aggregate([0.2])
    assert one.sd is None and str(one) == "0.200"


def test_aggregate_rows_over_slides_and_seeds():
    rows = [
        {"slide": "B4", "seed": 0, "pcc": 0.3, "mse": 1.0, "pcc_excluded": 2},
        {"slide": "C2", "seed": 0, "pcc": None, "mse": 2.0, "pcc_excluded": 50},
        {"slide": "B4", "seed": 1, "pcc": 0.5, "mse": 1.5, "pcc_excluded": 0},
    ]
    out = aggregate_rows(rows)
    assert set(out) == {"seed", "pcc", "mse", "pcc_excluded"}  # strings are not aggregated
    assert out["pcc"].mean == pytest.approx(0.4) and out["pcc"].n_missing == 1
    assert out["mse"].sd == pytest.approx(np.std([1.0, 2.0, 1.5], ddof=1))
    assert aggregate_rows(rows, ["ssim"])["ssim"].n_missing == 3


# --- bootstrap ----------------------------------------------------------------------------------


def _slide(seed: int = 0, n: int = 150, g: int = 12):
    rng = np.random.default_rng(seed)
    truth = rng.gamma(2.0, 1.0, size=(n, g))
    return truth, truth + rng.normal(size=(n, g))


def _pcc_by_scipy(t: np.ndarray, p: np.ndarray) -> float | None:
    """Independent gene-wise PCC: pearsonr per gene, constant genes skipped."""
    rs = [
        stats.pearsonr(t[:, j], p[:, j])[0]
        for j in range(t.shape[1])
        if np.ptp(t[:, j]) > 0 and np.ptp(p[:, j]) > 0
    ]
    return float(np.mean(rs)) if rs else None


def test_bootstrap_ci_reproduced_by_an_independent_loop():
    truth, pred = _slide()
    ci = bootstrap_ci(truth, pred, pcc, n_boot=200, seed=3)
    rng = np.random.default_rng(3)  # the documented resampling scheme
    reps = []
    for _ in range(200):
        idx = rng.integers(0, 150, 150)
        reps.append(_pcc_by_scipy(truth[idx], pred[idx]))
    lo, hi = np.percentile(reps, [2.5, 97.5])
    assert ci.low == pytest.approx(lo, abs=1e-10) and ci.high == pytest.approx(hi, abs=1e-10)
    assert ci.estimate == pytest.approx(_pcc_by_scipy(truth, pred), abs=1e-12)
    assert ci.low < ci.estimate < ci.high and ci.n_undefined == 0 and ci.n_boot == 200
    assert bootstrap_ci(truth, pred, pcc, n_boot=200, seed=3) == ci  # seeded
    assert bootstrap_ci(truth, pred, pcc, n_boot=200, seed=4).low != ci.low


def test_bootstrap_agrees_with_scipy_bootstrap_percentile():
    truth, pred = _slide(1, n=200)
    ci = bootstrap_ci(truth, pred, mse, n_boot=2000, seed=0)
    ref = stats.bootstrap(
        (np.arange(200),),
        lambda i: np.mean((pred[i] - truth[i]) ** 2),
        vectorized=False,
        n_resamples=2000,
        method="percentile",
        random_state=np.random.default_rng(0),
    ).confidence_interval
    width = ref.high - ref.low
    assert ci.low == pytest.approx(ref.low, abs=0.1 * width)  # Monte-Carlo agreement
    assert ci.high == pytest.approx(ref.high, abs=0.1 * width)


def test_bootstrap_counts_undefined_replicates():
    rng = np.random.default_rng(2)
    truth = np.zeros((40, 3))
    truth[0] = [1.0, 2.0, 3.0]  # only one spot expresses anything
    pred = rng.normal(size=(40, 3))
    ci = bootstrap_ci(truth, pred, pcc, n_boot=300, seed=0)
    p_miss = (39 / 40) ** 40  # chance a resample lacks spot 0 -> every gene constant -> undefined
    assert 0 < ci.n_undefined < 300
    assert ci.n_undefined == pytest.approx(300 * p_miss, abs=4 * np.sqrt(300 * p_miss))
    assert ci.low is not None and np.isfinite(ci.low)


@pytest.mark.real_data
def test_bootstrap_on_real_b4():
    from stbench.data.readers.count_table import read_count_table

    if not B4.is_file():
        pytest.skip(f"real data not found at {B4}")
    x = np.log1p(read_count_table(B4).to_numpy())
    x = x[:, np.argsort(-x.var(axis=0), kind="stable")[:50]]
    pred = 0.7 * x + 0.3 * x.mean(axis=0) + 0.4 * np.random.default_rng(0).normal(size=x.shape)
    ci = bootstrap_ci(x, pred, pcc, n_boot=100, seed=0)
    rng = np.random.default_rng(0)
    reps = [_pcc_by_scipy(x[i], pred[i]) for i in (rng.integers(0, len(x), len(x)) for _ in range(100))]
    assert (ci.low, ci.high) == pytest.approx(tuple(np.percentile(reps, [2.5, 97.5])), abs=1e-10)
    assert ci.low < ci.estimate < ci.high


# --- paired tests -------------------------------------------------------------------------------


def test_paired_ttest_equals_scipy_and_the_t_formula():
    ours = [0.52, 0.47, 0.55]  # three folds, DiffBulk style
    base = [0.45, 0.46, 0.49]
    res = paired_ttest(ours, base)
    ref = stats.ttest_rel(ours, base, alternative="greater")
    assert res.pvalue == pytest.approx(ref.pvalue) and res.statistic == pytest.approx(ref.statistic)
    d = np.subtract(ours, base)
    t = d.mean() / (d.std(ddof=1) / np.sqrt(3))
    assert res.statistic == pytest.approx(t) and res.pvalue == pytest.approx(stats.t.sf(t, df=2))
    assert res.alternative == "greater" and res.n == 3 and res.mark == significance_mark(res.pvalue)
    less = paired_ttest(
        [1.0, 1.1, 0.9, 1.2], [1.3, 1.2, 1.25, 1.4], alternative="less"
    )  # MSE: lower is better
    assert less.pvalue == pytest.approx(
        stats.ttest_rel([1.0, 1.1, 0.9, 1.2], [1.3, 1.2, 1.25, 1.4], alternative="less").pvalue
    )
    assert less.pvalue < 0.05


def test_wilcoxon_equals_scipy_and_exact_enumeration():
    rng = np.random.default_rng(5)
    ours = rng.normal(0.5, 0.05, 8)
    base = ours - rng.normal(0.02, 0.03, 8)
    for alt in ("two-sided", "greater", "less"):
        res = wilcoxon_test(ours, base, alternative=alt)
        ref = stats.wilcoxon(ours, base, alternative=alt)
        assert res.pvalue == pytest.approx(ref.pvalue) and res.statistic == pytest.approx(ref.statistic)
    # exact one-sided p by enumerating all 2^8 sign flips of the ranked |differences|
    d = ours - base
    ranks = stats.rankdata(np.abs(d))
    w_plus = ranks[d > 0].sum()
    sums = [sum(r for r, s in zip(ranks, signs, strict=True) if s) for signs in product([0, 1], repeat=8)]
    p_exact = np.mean(np.array(sums) >= w_plus - 1e-9)
    assert wilcoxon_test(ours, base, alternative="greater").pvalue == pytest.approx(p_exact)


def test_paired_tests_refuse_missing_pairs_and_handle_ties():
    with pytest.raises(ValueError, match=r"missing \(None/NaN\) at positions \[1\]"):
        paired_ttest([0.1, None, 0.3], [0.2, 0.2, 0.2])
    with pytest.raises(ValueError, match="equal lengths"):
        wilcoxon_test([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="alternative must be one of"):
        paired_ttest([0.1, 0.2], [0.1, 0.3], alternative="bigger")
    same = wilcoxon_test([0.3, 0.4, 0.5], [0.3, 0.4, 0.5])
    assert same.pvalue == 1.0 and same.mark == "" and same.note == "all differences are zero"
    assert paired_ttest([0.3, 0.4], [0.3, 0.4]).pvalue == 1.0
    shifted = paired_ttest([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])  # 0.1 each: t undefined, limit is +inf
    assert (shifted.statistic, shifted.pvalue, shifted.note) == (np.inf, 0.0, "constant non-zero differences")
    assert paired_ttest([0.5, 0.6, 0.7], [0.4, 0.5, 0.6], alternative="less").pvalue == 1.0


# --- marks --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "diffbulk", "hinge"),
    [
        (0.0005, "**", "***"),
        (0.001, "**", "**"),
        (0.0099, "**", "**"),
        (0.01, "**", "*"),
        (0.049, "**", "*"),
        (0.05, "*", "ns"),
        (0.0999, "*", "ns"),
        (0.1, "", "ns"),
        (0.7, "", "ns"),
        (None, "", ""),
        (float("nan"), "", ""),
    ],
)
def test_significance_marks(p, diffbulk, hinge):
    assert significance_mark(p) == diffbulk
    assert significance_mark_stars(p) == hinge
