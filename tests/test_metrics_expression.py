"""Expression metrics against independent computations (scipy.stats.pearsonr loops, numpy formulas)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from stbench.errors import UnknownNameError
from stbench.metrics import (
    describe,
    genewise_pcc,
    mae,
    mse,
    pcc,
    pcc_fixed_genes,
    pcc_pooled,
    pcc_posthoc,
    pcc_spot,
    pooled_metrics,
    rvd,
    slide_metrics,
)
from stbench.metrics import expression as expression_module
from tests.conftest import HER2ST

B4 = HER2ST / "data" / "ST-cnts" / "B4.tsv.gz"


def _pair(seed: int = 0, n: int = 120, g: int = 40, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.gamma(2.0, 1.0, size=(n, g))
    return truth, truth + noise * rng.normal(size=(n, g))


def _ref_gene_r(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Independent per-gene r: one scipy.stats.pearsonr call per column."""
    return np.array([stats.pearsonr(truth[:, j], pred[:, j])[0] for j in range(truth.shape[1])])


# --- gene-wise PCC ----------------------------------------------------------------------------


def test_genewise_pcc_equals_pearsonr_loop():
    truth, pred = _pair()
    corr = genewise_pcc(truth, pred)
    np.testing.assert_allclose(corr.r, _ref_gene_r(truth, pred), rtol=0, atol=1e-12)
    res = pcc(truth, pred)
    assert res.value == pytest.approx(np.mean(_ref_gene_r(truth, pred)), abs=1e-12)
    assert (res.n, res.excluded, res.excluded_truth, res.excluded_pred) == (40, 0, 0, 0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(3, 60),
    g=st.integers(1, 30),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([np.float32, np.float64]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_genewise_pcc_property(n, g, seed, dtype, scale):
    rng = np.random.default_rng(seed)
    truth = (scale * rng.normal(size=(n, g))).astype(dtype)
    pred = (scale * rng.normal(size=(n, g)) + truth).astype(dtype)
    corr = genewise_pcc(truth, pred)
    ref = _ref_gene_r(truth.astype(np.float64), pred.astype(np.float64))
    assert not corr.excluded.any()
    np.testing.assert_allclose(corr.r, ref, atol=1e-9)
    assert np.all(np.abs(corr.r) <= 1.0)


def test_blocks_do_not_change_results(monkeypatch):
    truth, pred = _pair(g=37)
    whole = genewise_pcc(truth, pred).r
    monkeypatch.setattr(expression_module, "_BLOCK_ELEMENTS", 120 * 5)  # 5 genes per block
    np.testing.assert_array_equal(genewise_pcc(truth, pred).r, whole)
    assert mse(truth, pred) == pytest.approx(np.mean((pred - truth) ** 2), rel=1e-13)


def test_constant_genes_are_excluded_and_counted_never_nan():
    truth, pred = _pair(g=10)
    truth[:, 1] = 3.0  # constant in truth
    pred[:, 2] = -1.5  # constant in prediction
    truth[:, 3] = 0.0  # constant in both
    pred[:, 3] = 0.0
    res = pcc(truth, pred)
    keep = [0, 4, 5, 6, 7, 8, 9]
    assert res.value == pytest.approx(np.mean(_ref_gene_r(truth[:, keep], pred[:, keep])), abs=1e-12)
    assert np.isfinite(res.value)
    assert (res.n, res.excluded, res.excluded_truth, res.excluded_pred) == (7, 3, 2, 2)
    corr = genewise_pcc(truth, pred)
    assert np.isnan(corr.r[[1, 2, 3]]).all() and np.isfinite(corr.r[keep]).all()


def test_constant_tolerance_is_relative_to_scale():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(50, 3))
    pred = np.empty_like(truth)
    pred[:, 0] = 1000.0 + 1e-5 * rng.normal(size=50)  # std 1e-8 of scale: float noise -> constant
    pred[:, 1] = 1e-6 * rng.normal(size=50)  # tiny values but real variation -> kept
    pred[:, 2] = np.float32(5.0) + np.float32(1e-7) * rng.normal(size=50).astype(np.float32)
    corr = genewise_pcc(truth, pred)
    assert corr.constant_pred.tolist() == [True, False, True]
    assert corr.r[1] == pytest.approx(stats.pearsonr(truth[:, 1], pred[:, 1])[0], abs=1e-9)


def test_mean_predictor_has_no_pcc_and_says_why():
    truth, _ = _pair(g=25)
    mean_pred = np.tile(truth.mean(axis=0), (truth.shape[0], 1))
    res = pcc(truth, mean_pred)
    assert res.value is None
    assert (res.n, res.excluded, res.excluded_pred) == (0, 25, 25)
    row = slide_metrics(
        truth, mean_pred, [f"g{i}" for i in range(25)], fixed_genes={5: [f"g{i}" for i in range(5)]}
    )
    assert row["pcc"] is None and row["pcc_excluded"] == 25 and row["pcc_n"] == 0
    assert row["pcc5"] is None and row["pcc5_posthoc"] is None
    assert describe(row, "pcc") == "n/a (all 25 genes constant in prediction)"
    assert describe(row, "pcc5") == "n/a (all 5 genes constant in prediction)"
    # the errors and RVD are still defined: RVD of a constant predictor is exactly 1 per gene
    assert row["mse"] == pytest.approx(np.mean((mean_pred - truth) ** 2))
    assert row["rvd"] == pytest.approx(1.0)


# --- PCC-k: fixed genes vs post-hoc --------------------------------------------------------------


def test_fixed_pcc_k_uses_only_the_given_genes_and_differs_from_posthoc():
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(200, 30))
    noise = np.linspace(0.2, 5.0, 30)  # gene j gets noise sd noise[j]: early genes predict well
    pred = truth + noise * rng.normal(size=truth.shape)
    fixed = [29, 25, 20, 15, 10]  # chosen before testing, e.g. by training variance
    res = pcc_fixed_genes(truth, pred, fixed)
    ref = _ref_gene_r(truth, pred)
    assert res.value == pytest.approx(np.mean(ref[fixed]), abs=1e-12)
    post = pcc_posthoc(truth, pred, 5)
    assert post.value == pytest.approx(np.mean(np.sort(ref)[::-1][:5]), abs=1e-12)
    assert post.value > res.value + 0.3  # the post-hoc choice flatters
    # the fixed metric never reads the other genes
    pred2 = pred.copy()
    pred2[:, [j for j in range(30) if j not in fixed]] = 0.0
    assert pcc_fixed_genes(truth, pred2, fixed).value == res.value
    # the report names them apart
    genes = [f"G{j}" for j in range(30)]
    row = slide_metrics(
        truth, pred, genes, fixed_genes={5: [genes[j] for j in fixed]}, metrics=["pcc_k", "pcc_posthoc"]
    )
    assert row["pcc5"] == pytest.approx(res.value) and row["pcc5_posthoc"] == pytest.approx(post.value)


def test_posthoc_skips_constant_genes_and_checks_k():
    truth, pred = _pair(g=6)
    pred[:, 0] = 1.0
    post = pcc_posthoc(truth, pred, 6)  # only 5 candidates left
    assert post.n == 5 and post.excluded == 1
    assert post.value == pytest.approx(np.mean(_ref_gene_r(truth[:, 1:], pred[:, 1:])))
    with pytest.raises(ValueError, match="between 1 and the number of genes"):
        pcc_posthoc(truth, pred, 7)


def test_fixed_gene_list_errors_name_the_problem():
    truth, pred = _pair(g=4)
    genes = ["A", "B", "C", "D"]
    with pytest.raises(ValueError, match=r"pcc2: 1 fixed genes are not among the predicted genes: \['Z'\]"):
        slide_metrics(truth, pred, genes, fixed_genes={2: ["A", "Z"]})
    with pytest.raises(ValueError, match="pcc3: the fixed gene list has 2 genes, not 3"):
        slide_metrics(truth, pred, genes, fixed_genes={3: ["A", "B"]})
    with pytest.raises(ValueError, match="duplicates"):
        pcc_fixed_genes(truth, pred, [0, 0])
    with pytest.raises(UnknownNameError, match="unknown metric 'pcc_pooled'"):
        slide_metrics(truth, pred, genes, metrics=["pcc_pooled"])
    with pytest.raises(ValueError, match="needs `grid`"):
        slide_metrics(truth, pred, genes, metrics=["ssim"])


# --- pooled and spot-wise PCC -------------------------------------------------------------------


def test_pooled_pcc_differs_from_per_slide_mean():
    rng = np.random.default_rng(3)
    truths, preds = [], []
    for level in (0.0, 4.0, 8.0):  # slide-level shifts that the prediction gets right
        t = level + rng.normal(size=(80, 12))
        truths.append(t)
        preds.append(level + rng.normal(size=(80, 12)))  # no within-slide signal at all
    per_slide = np.mean([pcc(t, p).value for t, p in zip(truths, preds, strict=True)])
    pooled = pcc_pooled(truths, preds)
    ref = _ref_gene_r(np.concatenate(truths), np.concatenate(preds)).mean()
    assert pooled.value == pytest.approx(ref, abs=1e-12)
    assert abs(per_slide) < 0.1 and pooled.value > 0.8
    assert pooled_metrics(truths, preds)["pcc_pooled"] == pytest.approx(ref)
    with pytest.raises(ValueError, match="different gene counts"):
        pcc_pooled([truths[0], truths[1][:, :5]], [preds[0], preds[1][:, :5]])


def test_spotwise_pcc_equals_row_loop_and_excludes_constant_spots():
    truth, pred = _pair(n=30, g=15)
    truth[4] = 0.0  # an empty spot
    res = pcc_spot(truth, pred)
    ref = [stats.pearsonr(truth[i], pred[i])[0] for i in range(30) if i != 4]
    assert res.value == pytest.approx(np.mean(ref), abs=1e-12)
    assert (res.n, res.excluded, res.excluded_truth) == (29, 1, 1)
    row = slide_metrics(truth, pred, [f"g{j}" for j in range(15)], metrics=["pcc_spot"])
    assert row["pcc_spot_excluded"] == 1


# --- errors and variance ------------------------------------------------------------------------


def test_mse_mae_equal_numpy():
    truth, pred = _pair(n=70, g=9)
    assert mse(truth, pred) == pytest.approx(np.mean((pred - truth) ** 2), rel=1e-13)
    assert mae(truth, pred) == pytest.approx(np.mean(np.abs(pred - truth)), rel=1e-13)
    t32, p32 = truth.astype(np.float32), pred.astype(np.float32)  # accumulated in float64
    assert mse(t32, p32) == pytest.approx(np.mean((p32.astype(float) - t32.astype(float)) ** 2), rel=1e-12)


def test_rvd_matches_stem_formula_and_excludes_constant_truth():
    truth, pred = _pair(g=8)
    pred *= 0.5
    ref = np.mean((np.var(pred, axis=0) - np.var(truth, axis=0)) ** 2 / np.var(truth, axis=0) ** 2)
    assert rvd(truth, pred).value == pytest.approx(ref, rel=1e-12)
    truth[:, 0] = 2.0
    res = rvd(truth, pred)
    ref = np.mean(
        (np.var(pred[:, 1:], axis=0) - np.var(truth[:, 1:], axis=0)) ** 2 / np.var(truth[:, 1:], axis=0) ** 2
    )
    assert res.value == pytest.approx(ref, rel=1e-12) and (res.n, res.excluded) == (7, 1)


def test_inputs_are_checked():
    truth, pred = _pair(g=3)
    with pytest.raises(ValueError, match="same"):
        pcc(truth, pred[:, :2])
    bad = pred.copy()
    bad[5, 2] = np.nan
    with pytest.raises(ValueError, match="pred has non-finite values .first at spot 5, gene 2"):
        mse(truth, bad)
    with pytest.raises(ValueError, match="2-D"):
        pcc(truth[:, 0], pred[:, 0])


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    truth, pred = _pair(g=5)
    r = pcc(torch.from_numpy(truth), torch.from_numpy(pred).to(torch.bfloat16)).value
    assert r == pytest.approx(pcc(truth, torch.from_numpy(pred).to(torch.bfloat16).float().numpy()).value)


# --- the whole report ---------------------------------------------------------------------------


def test_slide_metrics_values_equal_the_single_metrics():
    truth, pred = _pair(n=90, g=20)
    genes = [f"g{j}" for j in range(20)]
    row = slide_metrics(truth, pred, genes, fixed_genes={5: genes[-5:], 10: genes[:10]}, posthoc_k=[5])
    ref = _ref_gene_r(truth, pred)
    assert row["pcc"] == pytest.approx(ref.mean(), abs=1e-12)
    assert row["pcc5"] == pytest.approx(ref[-5:].mean(), abs=1e-12)
    assert row["pcc10"] == pytest.approx(ref[:10].mean(), abs=1e-12)
    assert row["pcc5_posthoc"] == pytest.approx(np.sort(ref)[-5:].mean(), abs=1e-12)
    assert "pcc10_posthoc" not in row  # only the ks asked for
    assert row["mse"] == pytest.approx(np.mean((pred - truth) ** 2))
    assert row["n_spots"] == 90 and row["n_genes"] == 20
    assert "ssim" not in row and "ari" not in row  # their inputs were not given
    assert describe(row, "pcc") == f"{ref.mean():.3f}"


# --- real data: Her2ST B4 -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def b4():
    from stbench.data.readers.count_table import read_count_table

    if not B4.is_file():
        pytest.skip(f"real data not found at {B4}")
    counts = read_count_table(B4)
    x = np.log1p(counts.to_numpy())
    order = np.argsort(-x.var(axis=0), kind="stable")[:300]  # 300 variable genes as "the set"
    return x[:, order], [str(counts.columns[j]) for j in order], list(counts.index)


def _smoothed_prediction(x: np.ndarray, spots: list[str], seed: int) -> np.ndarray:
    """A plausible prediction: neighbour average on the array grid (spot ids "<x>x<y>") + noise."""
    xy = np.array([[float(v) for v in s.split("x")] for s in spots])
    d = np.abs(xy[:, None, :] - xy[None, :, :]).max(axis=2)
    w = (d <= 1.01).astype(float)
    smooth = w @ x / w.sum(axis=1, keepdims=True)
    return smooth + 0.3 * np.random.default_rng(seed).normal(size=x.shape)


@pytest.mark.real_data
def test_real_her2st_b4_metrics_equal_independent_computations(b4):
    x, genes, spots = b4
    pred = _smoothed_prediction(x, spots, seed=0)
    pred[:, 7] = pred[:, 7].mean()  # one gene predicted constant
    row = slide_metrics(x, pred, genes, fixed_genes={50: genes[100:150]}, posthoc_k=[50, 200])
    ref = _ref_gene_r(x[:, [j for j in range(300) if j != 7]], np.delete(pred, 7, axis=1))
    assert row["pcc"] == pytest.approx(ref.mean(), abs=1e-10)
    assert row["pcc_excluded"] == 1 and row["pcc_excluded_pred"] == 1 and row["pcc_n"] == 299
    ref_fixed = _ref_gene_r(x[:, 100:150], pred[:, 100:150]).mean()
    assert row["pcc50"] == pytest.approx(ref_fixed, abs=1e-10)
    assert row["pcc50_posthoc"] == pytest.approx(np.sort(ref)[::-1][:50].mean(), abs=1e-10)
    assert row["pcc200_posthoc"] == pytest.approx(np.sort(ref)[::-1][:200].mean(), abs=1e-10)
    assert row["pcc50_posthoc"] > row["pcc50"]
    assert row["pcc"] > 0.2  # smoothing keeps real signal
    assert row["mse"] == pytest.approx(np.mean((pred - x) ** 2), rel=1e-12)
    assert row["mae"] == pytest.approx(np.mean(np.abs(pred - x)), rel=1e-12)
    keep = x.var(axis=0) > 0
    vt, vp = np.var(x[:, keep], axis=0), np.var(pred[:, keep], axis=0)
    assert row["rvd"] == pytest.approx(np.mean((vp - vt) ** 2 / vt**2), rel=1e-10)
    spot_ref = [stats.pearsonr(x[i], pred[i])[0] for i in range(x.shape[0]) if x[i].std() > 0]
    assert row["pcc_spot"] == pytest.approx(np.mean(spot_ref), abs=1e-10)


@pytest.mark.real_data
def test_real_her2st_b4_mean_predictor_and_pooling(b4):
    x, genes, spots = b4
    half = x.shape[0] // 2
    train, test = x[:half], x[half:]
    mean_pred = np.tile(train.mean(axis=0), (test.shape[0], 1))
    row = slide_metrics(test, mean_pred, genes)
    assert row["pcc"] is None and row["pcc_excluded"] == 300
    assert describe(row, "pcc") == "n/a (all 300 genes constant in prediction)"
    # two "slides" (halves of B4): pooled PCC over both is not the mean of per-slide PCCs
    pred = _smoothed_prediction(x, spots, seed=1)
    pred[half:] += 2.0  # a per-slide offset: harmless per slide, it distorts the pooled number
    per = [pcc(x[s], pred[s]).value for s in (slice(0, half), slice(half, None))]
    pooled = pcc_pooled([x[:half], x[half:]], [pred[:half], pred[half:]])
    assert pooled.value == pytest.approx(_ref_gene_r(x, pred).mean(), abs=1e-10)
    assert abs(pooled.value - np.mean(per)) > 0.02
