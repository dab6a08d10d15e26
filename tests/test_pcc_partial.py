"""`pcc_partial` (partial gene-wise PCC given log library size) against an independent computation:
numpy lstsq residuals on [1, log total] per gene, then scipy.stats.pearsonr; plus its invariants."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from stbench.metrics import describe, log_library_size, pcc, pcc_partial, slide_metrics
from stbench.metrics import expression as expression_module


def _depth_data(seed: int = 0, n: int = 300, g: int = 25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Totals (one of them 0), truth that rises with log depth plus gene signal, a noisy prediction."""
    rng = np.random.default_rng(seed)
    totals = np.round(rng.lognormal(8.0, 1.0, size=n))
    totals[5] = 0.0
    z = log_library_size(totals)
    signal = rng.normal(size=(n, g))
    truth = 0.5 + rng.uniform(1.0, 2.0, size=g) * z[:, None] + signal
    pred = 1.0 * z[:, None] + signal + rng.normal(scale=1.5, size=(n, g))
    return truth, pred, totals


def _ref_partial(truth: np.ndarray, pred: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Independent: per gene, lstsq residuals of truth and pred on [1, log(max(total, 1))], pearsonr."""
    z = np.log(np.maximum(totals, 1.0))
    design = np.column_stack([np.ones_like(z), z])
    out = []
    for j in range(truth.shape[1]):
        rt = truth[:, j] - design @ np.linalg.lstsq(design, truth[:, j], rcond=None)[0]
        rp = pred[:, j] - design @ np.linalg.lstsq(design, pred[:, j], rcond=None)[0]
        out.append(stats.pearsonr(rt, rp)[0])
    return np.array(out)


def test_partial_pcc_equals_lstsq_residuals_then_pearsonr():
    truth, pred, totals = _depth_data()
    ref = _ref_partial(truth, pred, totals)
    corr = expression_module.partial_column_pearson(truth, pred, log_library_size(totals))
    assert np.max(np.abs(corr.r - ref)) < 1e-9
    res = pcc_partial(truth, pred, log_library_size(totals))
    assert res.value == pytest.approx(ref.mean(), abs=1e-9)
    assert (res.n, res.excluded) == (truth.shape[1], 0)
    assert res.value < pcc(truth, pred).value - 0.1  # depth inflated the plain PCC


def test_partial_pcc_in_gene_blocks_equals_one_block(monkeypatch):
    truth, pred, totals = _depth_data(seed=1, n=120, g=40)
    whole = expression_module.partial_column_pearson(truth, pred, log_library_size(totals)).r
    monkeypatch.setattr(expression_module, "_BLOCK_ELEMENTS", 120 * 3)  # 3 genes per block
    blocked = expression_module.partial_column_pearson(truth, pred, log_library_size(totals)).r
    np.testing.assert_allclose(blocked, whole, rtol=0, atol=1e-13)
    assert np.max(np.abs(blocked - _ref_partial(truth, pred, totals))) < 1e-9


def test_depth_only_prediction_has_high_pcc_but_no_partial_signal():
    rng = np.random.default_rng(2)
    n, g = 2000, 20
    totals = np.round(rng.lognormal(8.0, 0.7, size=n))
    z = log_library_size(totals)
    truth = 0.2 + 0.6 * z[:, None] + 0.4 * rng.normal(size=(n, g))
    nonlinear = np.exp(0.5 * z)[:, None] * rng.uniform(0.5, 2.0, size=g)  # a function of depth alone
    assert pcc(truth, nonlinear).value > 0.7
    assert abs(pcc_partial(truth, nonlinear, z).value) < 0.1
    # exactly linear in log depth (the `depth` reference): residuals are rounding noise -> excluded
    linear = (1.0 + 0.6 * z[:, None] * np.ones(g)).astype(np.float32)
    assert pcc(truth, linear).value > 0.7
    res = pcc_partial(truth, linear, z)
    assert res.value is None and res.excluded_pred == g and res.excluded_truth == 0
    row = slide_metrics(truth, linear, [f"g{j}" for j in range(g)], log_totals=z, metrics=["pcc_partial"])
    assert describe(row, "pcc_partial") == f"n/a (all {g} genes constant in prediction)"


def test_adding_a_plus_b_log_total_changes_nothing():
    truth, pred, totals = _depth_data(seed=3)
    z = log_library_size(totals)
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=truth.shape[1]), rng.normal(scale=3.0, size=truth.shape[1])
    base = expression_module.partial_column_pearson(truth, pred, z).r
    shifted_pred = expression_module.partial_column_pearson(truth, pred + a + b * z[:, None], z).r
    shifted_truth = expression_module.partial_column_pearson(truth - a + b * z[:, None], pred, z).r
    assert np.max(np.abs(shifted_pred - base)) < 1e-9
    assert np.max(np.abs(shifted_truth - base)) < 1e-9
    # while the plain PCC does move
    assert abs(pcc(truth, pred + a + b * z[:, None]).value - pcc(truth, pred).value) > 0.05


def test_constant_residuals_are_excluded_and_counted_like_pcc():
    truth, pred, totals = _depth_data(seed=5, g=6)
    z = log_library_size(totals)
    truth[:, 0] = 2.0 - 0.5 * z  # truth of gene 0 is depth alone: no residual
    pred[:, 1] = 7.0  # constant prediction
    res = pcc_partial(truth, pred, z)
    assert (res.n, res.excluded, res.excluded_truth, res.excluded_pred) == (4, 2, 1, 1)
    ref = _ref_partial(truth[:, 2:], pred[:, 2:], totals)
    assert res.value == pytest.approx(ref.mean(), abs=1e-9)


def test_covariate_without_spread_gives_the_plain_pcc():
    truth, pred, _ = _depth_data(seed=6)
    same = np.full(truth.shape[0], np.log(5000.0))
    assert pcc_partial(truth, pred, same).value == pytest.approx(pcc(truth, pred).value, abs=1e-12)


def test_log_library_size_guard_and_input_checks():
    np.testing.assert_array_equal(log_library_size([0, 1, np.e**2]), [0.0, 0.0, 2.0])
    with pytest.raises(ValueError, match=">= 0"):
        log_library_size([3.0, -1.0])
    with pytest.raises(ValueError, match="finite"):
        log_library_size([3.0, np.inf])
    truth, pred, totals = _depth_data(n=40, g=4)
    with pytest.raises(ValueError, match="39 values for 40 spots"):
        pcc_partial(truth, pred, log_library_size(totals[:39]))


def test_slide_metrics_has_pcc_partial_only_when_log_totals_are_given():
    truth, pred, totals = _depth_data(g=8)
    genes = [f"g{j}" for j in range(8)]
    row = slide_metrics(truth, pred, genes, log_totals=log_library_size(totals))
    assert row["pcc_partial"] == pytest.approx(_ref_partial(truth, pred, totals).mean(), abs=1e-9)
    assert (row["pcc_partial_n"], row["pcc_partial_excluded"]) == (8, 0)
    assert row["pcc_partial_excluded_truth"] == 0 and row["pcc_partial_excluded_pred"] == 0
    assert "pcc_partial" not in slide_metrics(truth, pred, genes)
    with pytest.raises(ValueError, match="needs `log_totals`"):
        slide_metrics(truth, pred, genes, metrics=["pcc_partial"])
