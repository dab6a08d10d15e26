"""`evaluate_images` end to end on tiny seeded tiles with the stand-in encoder: FID per regime and
Delta, oracle AUC with ceiling and CIs, per-tissue FID, perturbation, training-only oracle fits,
and the featurizers (zoo encoder and Inception, random init, always labelled as such)."""

from __future__ import annotations

import numpy as np
import pytest
from encoder_standin import StandInEncoder

from stbench.benchmark.evaluate_images import ImageEvalConfig, TrainPairs, evaluate_images
from stbench.benchmark.image_features import Featurizer, build_featurizer, tiles_to_tensor
from stbench.errors import LeakageError
from stbench.metrics import image_oracle
from stbench.metrics.image_fid import fid

pytestmark = pytest.mark.usefixtures("one_thread", "one_blas_thread")


@pytest.fixture(scope="module")
def one_blas_thread():
    """Small eigh/matmul calls: multi-threaded OpenBLAS on a busy 2-core machine is ~100x slower."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


N_TRAIN, N_TEST, PX, G = 80, 40, 16, 10


def _cohort(seed: int, n: int):
    """Tiles whose colour blocks and expression share a latent z (so tiles carry expression signal)."""
    fixed = np.random.default_rng(100)
    w_img, w_expr = fixed.normal(size=(3, 4 * 3)), fixed.normal(size=(3, G))
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3))
    blocks = 128 + 40 * np.tanh(z @ w_img).reshape(n, 2, 2, 3)  # a 2x2 grid of colour blocks
    tiles = np.kron(blocks, np.ones((1, PX // 2, PX // 2, 1))) + rng.normal(0, 4, size=(n, PX, PX, 3))
    expr = z @ w_expr + 0.3 * rng.normal(size=(n, G))
    labels = np.where(z[:, 0] > 0, "tumor", "stroma")
    return np.clip(tiles, 0, 255).astype(np.uint8), expr, labels


def _noisy(tiles: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(tiles + rng.normal(0, sigma, tiles.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def setup():
    train_tiles, train_expr, _ = _cohort(0, N_TRAIN)
    test_tiles, test_expr, labels = _cohort(1, N_TEST)
    rng = np.random.default_rng(2)
    generated = {
        "uni+ge": _noisy(test_tiles, 3, 3),
        "uni": _noisy(test_tiles, 30, 4),
        "ge": test_tiles[rng.permutation(N_TEST)],  # plausible tiles, wrong spots
        "none": rng.integers(0, 256, size=test_tiles.shape, dtype=np.uint8),
    }
    feat = Featurizer(StandInEncoder(), label="standin@none", batch_size=16)
    return train_tiles, train_expr, test_tiles, test_expr, labels, generated, feat


def _config(**kw) -> ImageEvalConfig:
    return ImageEvalConfig(**{"ks": (3, 5, 50), "n_components": 16, "n_boot": 20, **kw})


def _perturbation(test_tiles: np.ndarray, labels: np.ndarray):
    """Tumor spots whose tiles morph linearly into the mean stroma tile (toward), and stroma spots
    whose tiles morph into noise (away from the tumor centroid)."""
    stroma_mean = test_tiles[labels == "stroma"].astype(float).mean(0)
    alphas = np.array([0.0, 0.25, 0.5, 0.75, 1.0])[None, :, None, None, None]
    src = test_tiles[labels == "tumor"][:4].astype(float)[:, None]
    toward = ((1 - alphas) * src + alphas * stroma_mean).astype(np.uint8)
    away_src = test_tiles[labels == "stroma"][:4].astype(float)[:, None]
    away = np.clip(away_src + alphas * 300 * (np.arange(PX) % 2)[None, None, :, None, None], 0, 255)
    return {("tumor", "stroma"): toward, ("stroma", "tumor"): away.astype(np.uint8)}


def test_evaluate_images_reports_every_regime(setup):
    train_tiles, train_expr, test_tiles, test_expr, labels, generated, feat = setup
    res = evaluate_images(
        test_tiles,
        generated,
        TrainPairs(train_expr, tiles=train_tiles),
        test_expr,
        tissue_labels=labels,
        fid_featurizer=feat,
        oracle_featurizer=feat,
        mlp_featurizer=feat,
        perturbation=_perturbation(test_tiles, labels),
        config=_config(mlp={"hidden": (16,), "epochs": 30, "batch_size": 20}),
    )
    m = res.metrics
    assert m["n_test"] == N_TEST and m["headline_regime"] == "uni+ge" and m["fid_encoder"] == "standin@none"
    assert m["fid_uni_ge"] == pytest.approx(fid(feat(test_tiles), feat(generated["uni+ge"])))
    assert m["fid_uni_ge"] < m["fid_uni"] < m["fid_none"]
    assert m["fid_delta"] == pytest.approx(m["fid_uni_ge"] - m["fid_uni"]) and m["fid_delta"] < 0
    for r in ("uni_ge", "uni", "ge", "none"):
        assert m[f"fid_{r}_low"] <= m[f"fid_{r}_high"] and m[f"fid_{r}_halfwidth"] >= 0
        assert m[f"oracle_auc_{r}_low"] <= m[f"oracle_auc_{r}_high"]
    # transcriptomic signal: faithful tiles ~ ceiling; shuffled spots and noise tiles ~ the zero null
    assert m["oracle_auc_null"] == 0.0 and m["oracle_ks"] == "3,5,10"
    assert m["oracle_auc_ceiling"] > 0.5
    assert m["oracle_auc"] == m["oracle_auc_uni_ge"] > 0.8 * m["oracle_auc_ceiling"]
    assert abs(m["oracle_auc_ge"]) < 0.3 and abs(m["oracle_auc_none"]) < 0.3
    assert m["oracle_auc_pct_ceiling"] == pytest.approx(100 * m["oracle_auc"] / m["oracle_auc_ceiling"])
    assert m["oracle_auc_low"] == m["oracle_auc_uni_ge_low"]
    assert {f"oracle_pcc_k{k}_real" for k in (3, 5, 10)} <= set(m)
    assert m["mlp_auc_ceiling"] is not None and "mlp_auc_uni_ge" in m and m["mlp_encoder"] == "standin@none"
    # per-tissue FID table and per-k curves
    assert set(res.per_tissue["tissue"]) == {"stroma", "tumor"} and len(res.per_tissue) == 8
    assert set(res.curves["source"]) == {"real", "uni+ge", "uni", "ge", "none"}
    assert set(res.curves["regressor"]) == {"oracle", "mlp"}
    # perturbation: toward the target scores high, the noise path low
    assert m["perturb_tumor_to_stroma"] > 0.9
    assert m["perturb_tumor_to_stroma"] > m["perturb_stroma_to_tumor"]
    assert m["perturb_three_pair_mean"] == pytest.approx(
        (m["perturb_tumor_to_stroma"] + m["perturb_stroma_to_tumor"]) / 2
    )


def test_oracle_is_fitted_on_training_pairs_only(setup, monkeypatch):
    train_tiles, train_expr, test_tiles, test_expr, labels, generated, feat = setup
    seen = []
    original = image_oracle.RidgeOracle.fit

    def spy(self, train_features, train_expression):
        seen.append((np.array(train_features), np.array(train_expression)))
        return original(self, train_features, train_expression)

    monkeypatch.setattr(image_oracle.RidgeOracle, "fit", spy)
    evaluate_images(
        test_tiles,
        {"uni": generated["uni"]},
        TrainPairs(train_expr, tiles=train_tiles),
        test_expr,
        fid_featurizer=feat,
        oracle_featurizer=feat,
        config=_config(n_boot=0),
    )
    (x, y), *more = seen
    assert not more
    assert np.array_equal(y, train_expr) and np.array_equal(x, feat(train_tiles))
    test_rows = {r.tobytes() for r in test_expr}
    assert not any(r.tobytes() in test_rows for r in y)


def test_overlapping_spots_and_misaligned_inputs_are_refused(setup):
    train_tiles, train_expr, test_tiles, test_expr, labels, generated, feat = setup
    ids = [f"s{i}" for i in range(N_TRAIN)]
    kw = {"fid_featurizer": feat, "oracle_featurizer": feat, "config": _config(n_boot=0)}
    with pytest.raises(LeakageError, match=r"40 test spots .*s10"):
        evaluate_images(
            test_tiles,
            {"uni": generated["uni"]},
            TrainPairs(train_expr, tiles=train_tiles, spot_ids=ids),
            test_expr,
            test_spot_ids=[f"s{i}" for i in range(3, 3 + N_TEST)],
            **kw,
        )
    with pytest.raises(ValueError, match=r"generated\[uni\]"):
        evaluate_images(
            test_tiles,
            {"uni": generated["uni"][:-1]},
            TrainPairs(train_expr, tiles=train_tiles),
            test_expr,
            **kw,
        )
    with pytest.raises(ValueError, match="unknown conditioning regime"):
        evaluate_images(
            test_tiles, {"full": generated["uni"]}, TrainPairs(train_expr, tiles=train_tiles), test_expr, **kw
        )
    with pytest.raises(ValueError, match="tiles or precomputed features"):
        evaluate_images(test_tiles, {"uni": generated["uni"]}, TrainPairs(train_expr), test_expr, **kw)


def test_precomputed_training_features_and_headline_fallback(setup):
    train_tiles, train_expr, test_tiles, test_expr, labels, generated, feat = setup
    res = evaluate_images(
        test_tiles,
        {"uni": generated["uni"]},  # a no-GE baseline: UNI only
        TrainPairs(train_expr, features={"oracle": feat(train_tiles)}),
        test_expr,
        fid_featurizer=feat,
        oracle_featurizer=feat,
        config=_config(n_boot=0),
    )
    m = res.metrics
    assert m["headline_regime"] == "uni" and m["oracle_auc"] == m["oracle_auc_uni"]
    assert m["fid_delta"] is None and "fid_uni_low" not in m and res.per_tissue.empty


def test_tiles_to_tensor_layouts():
    hwc = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    t = tiles_to_tensor(hwc)
    assert t.shape == (2, 3, 4, 4) and float(t[0, 1, 0, 0]) == pytest.approx(1 / 255)
    assert tiles_to_tensor(t).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiles_to_tensor(np.full((1, 3, 4, 4), 2.0, dtype=np.float32))


def test_zoo_and_inception_featurizers_are_labelled():
    from stbench.encoders import get_spec

    tiles = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    h0 = build_featurizer("h0-mini", "none", arch_overrides=get_spec("h0-mini").tiny, batch_size=2)
    assert h0.label == "h0-mini[tiny]@random-init(seed 0)"
    f = h0(tiles)
    assert f.shape == (3, 32) and np.isfinite(f).all()
    inc = build_featurizer("inception", "none", arch_overrides={"input_px": 75})
    assert "random-init" in inc.label
    g = inc(tiles[:2])
    assert g.shape == (2, 2048) and np.isfinite(g).all()
    assert np.array_equal(
        g, build_featurizer("inception", "none", arch_overrides={"input_px": 75})(tiles[:2])
    )
