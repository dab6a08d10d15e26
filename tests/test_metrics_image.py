"""Image-generation metrics (STMDiT, issue 8) against independent computations and hand values:
FID vs scipy.linalg.sqrtm and vs a nuclear-norm identity, streaming statistics, the oracle AUC vs
an sklearn pipeline + scipy.stats.pearsonr loop, training-only fitting, bootstrap CIs, and the
perturbation composite on hand-made distance paths."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import scipy.linalg
from scipy import stats

from stbench.metrics.image import (
    K_GRID,
    GaussianStats,
    MLPOracle,
    RidgeOracle,
    StreamingStats,
    bootstrap_auc,
    class_centroids,
    composite_from_distances,
    effective_ks,
    feature_stats,
    fid,
    fid_bootstrap,
    fid_delta,
    fid_from_stats,
    fid_per_group,
    frechet_distance,
    integrate_curve,
    interpolate,
    oracle_alpha,
    perturbation_composite,
    score_curve,
    three_pair_mean,
    top_variance_genes,
)
from stbench.metrics.statistics import bootstrap_ci

pytestmark = pytest.mark.usefixtures("one_thread", "one_blas_thread")


@pytest.fixture(scope="module")
def one_blas_thread():
    """Small eigh/matmul calls: multi-threaded OpenBLAS on a busy 2-core machine is ~100x slower."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def _feats(seed: int, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = np.eye(d) + 0.3 * rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mix + shift


def _fid_scipy(x: np.ndarray, y: np.ndarray) -> float:
    """The standard pytorch-fid recipe: np.cov, scipy.linalg.sqrtm of the product, real part."""
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        assert np.abs(covmean.imag).max() < 1e-6 * np.abs(covmean.real).max()
        covmean = covmean.real
    return float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _fid_nuclear(x: np.ndarray, y: np.ndarray) -> float:
    """Independent route valid for singular covariances: with S_i = B_i B_i^T (B_i = centred
    data^T / sqrt(n_i - 1)), Tr((S1 S2)^1/2) = sum of singular values of B1^T B2."""
    b1 = (x - x.mean(0)).T / np.sqrt(len(x) - 1)
    b2 = (y - y.mean(0)).T / np.sqrt(len(y) - 1)
    tr = np.linalg.svd(b1.T @ b2, compute_uv=False).sum()
    m = x.mean(0) - y.mean(0)
    return float(m @ m + (b1 * b1).sum() + (b2 * b2).sum() - 2 * tr)


# --- FID ----------------------------------------------------------------------------------------


def test_fid_equals_scipy_sqrtm_computation():
    real, gen = _feats(0, 400, 48), _feats(1, 300, 48, shift=0.4)
    ours = fid(real, gen)
    assert ours == pytest.approx(_fid_scipy(real, gen), rel=1e-6)
    assert ours == pytest.approx(_fid_nuclear(real, gen), rel=1e-6)
    assert ours > 1.0


def test_fid_identical_sets_zero_and_symmetric():
    real, gen = _feats(2, 200, 16), _feats(3, 150, 16, shift=1.0)
    assert fid(real, real) == pytest.approx(0.0, abs=1e-8)
    assert fid(real, gen) == pytest.approx(fid(gen, real), rel=1e-9)
    assert fid(real, real[::-1]) == pytest.approx(0.0, abs=1e-8)  # order of tiles is irrelevant


def test_frechet_distance_hand_values():
    # 1-D: N(0, 1) vs N(1, 4): 1 + 1 + 4 - 2 * sqrt(4) = 2
    assert frechet_distance(np.zeros(1), np.eye(1), np.ones(1), 4 * np.eye(1)) == pytest.approx(2.0)
    # diagonal covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu = np.array([3.0, 0.0, -4.0])
    expected = 25.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance(mu, np.diag(a), np.zeros(3), np.diag(b)) == pytest.approx(expected)


def test_fid_with_singular_covariances_matches_nuclear_norm_route():
    real, gen = _feats(4, 20, 64), _feats(5, 30, 64, shift=0.2)  # fewer tiles than dimensions
    assert fid(real, gen) == pytest.approx(_fid_nuclear(real, gen), rel=1e-8)


def test_fid_from_stats_and_batch_stats():
    real, gen = _feats(6, 120, 10), _feats(7, 90, 10, shift=0.3)
    st = feature_stats(real)
    assert st.n == 120 and np.allclose(st.cov, np.cov(real, rowvar=False), atol=1e-12)
    assert fid_from_stats(st, feature_stats(gen)) == pytest.approx(fid(real, gen), rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 tiles"):
        feature_stats(real[:1])
    with pytest.raises(ValueError, match="differ in width"):
        fid(real, gen[:, :5])
    bad = real.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="tile 3, feature 2"):
        fid(bad, gen)


def test_streaming_stats_equal_batch_stats_for_any_split_and_merge():
    x = _feats(8, 257, 12, shift=1e6)  # a large offset: naive sums of squares would cancel
    ref = feature_stats(x)
    acc = StreamingStats(12)
    for lo, hi in ((0, 1), (1, 1), (1, 100), (100, 101), (101, 257)):  # incl. an empty and 1-row batch
        acc.update(x[lo:hi])
    got = acc.stats()
    assert got.n == 257
    assert np.allclose(got.mean, ref.mean, rtol=0, atol=1e-8)
    assert np.allclose(got.cov, ref.cov, rtol=1e-9, atol=1e-9)
    a, b = StreamingStats(12).update(x[:50]), StreamingStats(12).update(x[50:])
    merged = a.merge(b).stats()
    assert np.allclose(merged.cov, ref.cov, rtol=1e-9, atol=1e-9)
    assert isinstance(merged, GaussianStats)
    with pytest.raises(ValueError, match="13 features"):
        StreamingStats(12).update(np.zeros((2, 13)))


def test_fid_per_group_and_delta():
    real, gen = _feats(9, 90, 6), _feats(10, 90, 6, shift=0.5)
    labels = ["tumor"] * 50 + ["stroma"] * 38 + ["blood"] * 2
    labels_small = labels[:-2] + ["rare", "blood"]
    groups = {g.group: g for g in fid_per_group(real, gen, labels_small, min_count=3)}
    lab = np.array(labels_small)
    assert groups["tumor"].fid == pytest.approx(fid(real[lab == "tumor"], gen[lab == "tumor"]))
    assert (groups["stroma"].n_real, groups["stroma"].n_generated) == (38, 38)
    assert groups["rare"].fid is None and groups["blood"].fid is None  # too few tiles: reported, no value
    assert fid_delta({"uni+ge": 252.9, "uni": 255.7}) == pytest.approx(-2.8)
    assert fid_delta({"uni": 330.7}) is None


def test_fid_bootstrap_uses_the_statistics_resampling_scheme():
    real, gen = _feats(11, 60, 4), _feats(12, 60, 4, shift=0.3)
    ours = fid_bootstrap(real, gen, n_boot=40, seed=5)
    ref = bootstrap_ci(real, gen, _fid_scipy, n_boot=40, seed=5)  # resamples rows, scipy's FID
    assert ours.low == pytest.approx(ref.low, rel=1e-6) and ours.high == pytest.approx(ref.high, rel=1e-6)
    assert ours.estimate == pytest.approx(ref.estimate, rel=1e-6)
    big_r, big_g = _feats(13, 2000, 3), _feats(14, 2000, 3, shift=0.3)  # n >> d: small resampling bias
    ci = fid_bootstrap(big_r, big_g, n_boot=100, seed=0)
    assert ci.low < ci.estimate < ci.high and ci.halfwidth == pytest.approx((ci.high - ci.low) / 2)


# --- oracle -------------------------------------------------------------------------------------


def _pairs(seed: int, n: int, d: int = 20, g: int = 12, noise: float = 0.5):
    """Features and expression that share a low-rank signal (so the oracle has something to find)."""
    fixed = np.random.default_rng(100)  # one feature -> expression map shared by train and test
    w_x, w_y = fixed.normal(size=(4, d)), fixed.normal(size=(4, g)) * np.linspace(0.3, 2.0, g)
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    return z @ w_x + 0.3 * rng.normal(size=(n, d)), z @ w_y + noise * rng.normal(size=(n, g))


def _sklearn_oracle_auc(xtr, ytr, x_eval, yte, ks, n_components):
    """Independent Oracle: sklearn StandardScaler -> PCA -> Ridge per k, scipy pearsonr per gene."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    order = np.argsort(-np.var(ytr, axis=0), kind="stable")
    curve = []
    for k in sorted({min(k, ytr.shape[1]) for k in ks}):
        genes = order[:k]
        d = min(n_components, *xtr.shape)
        model = make_pipeline(
            StandardScaler(), PCA(d, svd_solver="full"), Ridge(alpha=100 / (d * k), solver="cholesky")
        )
        pred = model.fit(xtr, ytr[:, genes]).predict(x_eval)
        curve.append(np.mean([stats.pearsonr(yte[:, j], pred[:, i])[0] for i, j in enumerate(genes)]))
    return float(np.mean(curve)), curve


def test_ridge_oracle_auc_equals_independent_sklearn_computation():
    xtr, ytr = _pairs(0, 150)
    xte, yte = _pairs(1, 60)
    gen = xte + 0.8 * np.random.default_rng(2).normal(size=xte.shape)  # "generated" tiles' features
    ks = (3, 5, 8, 50)  # 50 is capped at the 12 genes
    oracle = RidgeOracle(ks, n_components=8).fit(xtr, ytr)
    assert oracle.ks == (3, 5, 8, 12) and oracle.alphas[5] == pytest.approx(100 / (8 * 5))
    genes = {k: oracle.genes(k) for k in oracle.ks}
    for feats in (xte, gen):
        score = score_curve(yte, oracle.predict(feats), genes)
        ref_auc, ref_curve = _sklearn_oracle_auc(xtr, ytr, feats, yte, ks, 8)
        assert score.auc == pytest.approx(ref_auc, abs=1e-8)
        assert [score.curve[k].value for k in oracle.ks] == pytest.approx(ref_curve, abs=1e-8)
    ceiling = score_curve(yte, oracle.predict(xte), genes).auc
    assert ceiling > score_curve(yte, oracle.predict(gen), genes).auc > 0  # noisier tiles carry less signal


def test_k_grid_alpha_and_gene_order():
    assert K_GRID == (50, 100, 200, 500, 1000)
    assert oracle_alpha(50) == pytest.approx(100 / (256 * 50))
    assert effective_ks(K_GRID, 300) == (50, 100, 200, 300)
    y = np.array([[0.0, 5.0, 1.0, 1.0], [0.0, -5.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    assert top_variance_genes(y, 3).tolist() == [1, 2, 3]  # ties keep column order
    with pytest.raises(ValueError, match="positive"):
        effective_ks((0, 5), 10)


def test_oracle_fit_only_accepts_training_pairs():
    """No test-data path into a regressor: `fit` takes exactly (train_features, train_expression),
    the gene sets come from training variance, and the test expression only enters scoring."""
    for cls in (RidgeOracle, MLPOracle):
        params = list(inspect.signature(cls.fit).parameters)
        assert params == ["self", "train_features", "train_expression"]
    xtr, ytr = _pairs(3, 80)
    xte, yte = _pairs(4, 40)
    oracle = RidgeOracle((4, 8), n_components=6).fit(xtr, ytr)
    before = {k: oracle.coef[k].copy() for k in oracle.ks}
    genes = {k: oracle.genes(k) for k in oracle.ks}
    score_curve(yte, oracle.predict(xte), genes)
    score_curve(yte[::-1] * 10, oracle.predict(xte), genes)
    assert all(np.array_equal(before[k], oracle.coef[k]) for k in oracle.ks)
    assert oracle.genes(8).tolist() == top_variance_genes(ytr, 8).tolist()
    with pytest.raises(RuntimeError, match="fit has not run"):
        RidgeOracle().predict(xte)


def test_integrate_curve_hand_values():
    ks, v = (50, 100, 200, 500, 1000), [0.1, 0.2, 0.3, 0.4, 0.5]
    assert integrate_curve(ks, v) == pytest.approx(0.3)  # the paper's "averages the curve over k"
    assert integrate_curve(ks, v, "trapezoid_index") == pytest.approx((0.15 + 0.25 + 0.35 + 0.45) / 4)
    assert integrate_curve(ks, v, "trapezoid_k") == pytest.approx(362.5 / 950)
    logs = np.log(ks)
    by_hand = sum((v[i] + v[i + 1]) / 2 * (logs[i + 1] - logs[i]) for i in range(4)) / (logs[-1] - logs[0])
    assert integrate_curve(ks, v, "trapezoid_log_k") == pytest.approx(by_hand)
    for method in ("mean", "trapezoid_index", "trapezoid_k", "trapezoid_log_k"):
        assert integrate_curve(ks, [0.25] * 5, method) == pytest.approx(0.25)  # constant c -> c
        assert integrate_curve(ks, [0.0] * 5, method) == 0.0  # the zero-correlation null
    assert integrate_curve(ks, [0.1, None, 0.3, 0.4, 0.5]) is None
    assert integrate_curve((12,), [0.4], "trapezoid_log_k") == pytest.approx(0.4)
    with pytest.raises(ValueError, match="integration"):
        integrate_curve(ks, v, "simpson")


def test_auc_bootstrap_matches_independent_loop_and_width_scales():
    xtr, ytr = _pairs(5, 200)
    xte, yte = _pairs(6, 80)
    oracle = RidgeOracle((3, 6, 12), n_components=8).fit(xtr, ytr)
    preds, genes = oracle.predict(xte), {k: oracle.genes(k) for k in oracle.ks}
    ci = bootstrap_auc(yte, preds, genes, n_boot=60, seed=1)
    rng = np.random.default_rng(1)  # statistics.bootstrap_ci's documented scheme
    reps = []
    for _ in range(60):
        idx = rng.integers(0, 80, 80)
        curve = [
            np.mean([stats.pearsonr(yte[idx, j], preds[k][idx, i])[0] for i, j in enumerate(genes[k])])
            for k in oracle.ks
        ]
        reps.append(np.mean(curve))
    assert (ci.low, ci.high) == pytest.approx(tuple(np.percentile(reps, [2.5, 97.5])), abs=1e-9)
    assert ci.low < ci.estimate < ci.high
    # width order: 16x the spots -> about 4x narrower (sqrt(n) scaling)
    widths = []
    for n in (100, 1600):
        x, y = _pairs(7, n)
        p = oracle.predict(x)
        c = bootstrap_auc(y, p, genes, n_boot=200, seed=0)
        assert c.low < c.estimate < c.high
        widths.append(c.high - c.low)
    assert 2.0 < widths[0] / widths[1] < 8.0


def test_mlp_oracle_seeded_clipped_and_learns():
    xtr, ytr = _pairs(8, 200, d=10, g=6, noise=0.2)
    xte, yte = _pairs(9, 60, d=10, g=6, noise=0.2)
    ytr, yte = ytr - ytr.min() + 0.1, yte - ytr.min() + 0.1  # expression-like: mostly positive
    kw = {"hidden": (32, 32), "epochs": 60, "batch_size": 50, "seed": 3}
    a = MLPOracle((2, 6), **kw).fit(xtr, ytr)
    b = MLPOracle((2, 6), **kw).fit(xtr, ytr)
    pa, pb = a.predict(xte), b.predict(xte)
    assert all(np.array_equal(pa[k], pb[k]) for k in a.ks)  # same seed, same network
    assert a.loss_curve[-1] < a.loss_curve[0]
    assert min(p.min() for p in pa.values()) >= 0.0  # negatives clipped before correlation
    score = score_curve(yte, pa, {k: a.genes(k) for k in a.ks})
    assert score.auc > 0.5
    assert pa[2].shape == (60, 2) and np.array_equal(pa[6][:, :2], pa[2])  # one net, top-k columns


# --- perturbation composite ---------------------------------------------------------------------


def test_composite_hand_values_and_ordering():
    paths = np.array(
        [
            [4.0, 3.0, 2.0, 1.0, 0.5],  # monotone toward the target
            [4.0, 2.0, 3.0, 1.0, 3.5],  # wobbly, ends a little closer
            [1.0, 2.0, 3.0, 4.0, 5.0],  # monotone away
        ]
    )
    res = composite_from_distances(paths, 4.0)
    # transition (d0 - d1) / gap; monotonicity -Spearman(alpha, d):
    # row 2 ranks of d = [5, 2, 3, 1, 4], sum of squared rank differences 26 -> rho = 1 - 6*26/120 = -0.3
    assert res.transition == pytest.approx([3.5 / 4, 0.5 / 4, -4.0 / 4])
    assert res.monotonicity == pytest.approx([1.0, 0.3, -1.0])
    assert res.composite == pytest.approx([1.875, 0.425, -2.0])
    assert res.median == pytest.approx(0.425) and (res.n_defined, res.n_undefined) == (3, 0)
    assert res.composite[0] > res.composite[1] > res.composite[2]
    half = composite_from_distances(paths, 4.0, lambda_mono=0.5)
    assert half.composite == pytest.approx(res.transition + 0.5 * res.monotonicity)
    rho = [stats.spearmanr([0, 0.25, 0.5, 0.75, 1], row).statistic for row in paths]
    assert res.monotonicity == pytest.approx(-np.array(rho))


def test_composite_undefined_when_nothing_moves_and_ties():
    res = composite_from_distances([[2.0, 2.0, 2.0, 2.0, 2.0], [3.0, 2.0, 2.0, 1.0, 1.0]], 2.0)
    assert np.isnan(res.composite[0]) and res.n_undefined == 1 and res.n_defined == 1
    tied = -stats.spearmanr([0, 0.25, 0.5, 0.75, 1], [3.0, 2.0, 2.0, 1.0, 1.0]).statistic
    assert res.monotonicity[1] == pytest.approx(tied) and res.median == pytest.approx(1.0 + tied)
    none = composite_from_distances([[1.0] * 5], 1.0)
    assert none.median is None


def test_composite_from_features_and_centroids():
    cs, ct = np.array([0.0, 0.0]), np.array([4.0, 0.0])
    steps = np.array([0.0, 0.5, 1.0, 1.5, 2.0])  # moves half-way along the axis
    feats = np.stack([np.stack([steps, np.full(5, 3.0)], 1)])  # 3 units off-axis
    res = perturbation_composite(feats, cs, ct)
    d0, d1 = np.hypot(4.0, 3.0), np.hypot(2.0, 3.0)
    assert res.transition[0] == pytest.approx((d0 - d1) / 4.0)
    assert res.monotonicity[0] == pytest.approx(1.0)
    pos = perturbation_composite(feats, cs, ct, transition="position")
    assert pos.transition[0] == pytest.approx((np.hypot(2.0, 3.0) - d1) / 4.0)  # equidistant -> 0
    ge = interpolate([0.0, 2.0], [4.0, 6.0])
    assert ge.shape == (5, 2) and ge[2] == pytest.approx([2.0, 4.0])
    cents = class_centroids(np.array([[0.0, 0], [2, 0], [4, 4]]), ["a", "a", "b"])
    assert cents["a"] == pytest.approx([1.0, 0.0]) and cents["b"] == pytest.approx([4.0, 4.0])
    assert three_pair_mean({"t->s": -0.159, "t->i": 0.547, "i->t": 0.620}) == pytest.approx(0.336)
    assert three_pair_mean({"t->s": None, "t->i": 0.5}) is None
