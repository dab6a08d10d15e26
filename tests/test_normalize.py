"""Target transforms: formulas, scanpy equivalence, scale step fitted on training spots only."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stbench.data.genes import GenePanel, panel_matrix, spot_totals
from stbench.data.normalize import TargetTransform
from stbench.data.slide import Slide, make_adata


def make_slide(name: str, counts: np.ndarray, genes: list[str]) -> Slide:
    n = counts.shape[0]
    coords = np.stack([np.arange(n) * 10.0, np.zeros(n)], axis=1)
    return Slide(name, name[0], make_adata(counts, [f"s{i}" for i in range(n)], genes, coords))


GENES = [f"G{i}" for i in range(12)]


def slides(seed: int = 0, k: int = 3) -> list[Slide]:
    rng = np.random.default_rng(seed)
    return [
        make_slide(f"S{i}", rng.poisson(rng.uniform(0.5, 8, size=12), size=(20, 12)), GENES) for i in range(k)
    ]


PANEL = GenePanel("list", ("G3", "G0", "G7", "G5"), {"missing": "intersect"}, ("S0",))


def test_log_formulas_and_none() -> None:
    x = np.array([[0, 1, 3], [7, 0, 15]], dtype=np.float32)
    np.testing.assert_allclose(TargetTransform("log1p").transform(x), np.log(1 + x), rtol=1e-6)
    np.testing.assert_allclose(TargetTransform("log2p1").transform(x), np.log2(1 + x), rtol=1e-6)
    assert TargetTransform("log2p1").transform(x)[1, 2] == pytest.approx(4.0)
    np.testing.assert_array_equal(TargetTransform("none").transform(x), x)
    assert TargetTransform().transform(x).dtype == np.float32


def test_normalize_log1p_equals_scanpy_with_library_size_over_all_genes() -> None:
    import scanpy as sc

    s = slides()[0]
    a = s.adata.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    expected = a[:, list(PANEL.genes)].X.toarray()
    t = TargetTransform("normalize_log1p", target_sum=1e4)
    np.testing.assert_allclose(t.transform_slide(s, PANEL), expected, rtol=1e-5)
    # library size from the panel only would be a different (wrong) number
    panel_only = np.log1p(panel_matrix(s, PANEL) / panel_matrix(s, PANEL).sum(1, keepdims=True) * 1e4)
    assert not np.allclose(t.transform_slide(s, PANEL), panel_only)
    with pytest.raises(ValueError, match="totals over ALL genes"):
        t.transform(panel_matrix(s, PANEL))


def test_normalize_log1p_panel_equals_scanpy_on_the_panel_genes_only() -> None:
    """TRIPLEX's convention: normalize_total over the panel genes, then log1p."""
    import scanpy as sc

    s = slides()[2]
    sub = s.adata[:, list(PANEL.genes)].copy()
    sc.pp.normalize_total(sub, target_sum=1e4)
    sc.pp.log1p(sub)
    expected = np.asarray(sub.X.toarray() if hasattr(sub.X, "toarray") else sub.X)
    t = TargetTransform("normalize_log1p_panel")
    assert t.target_sum == 1e4 and not t.needs_totals
    got = t.transform_slide(s, PANEL)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # the panel rows sum to target_sum before the log; whole-transcriptome normalisation does not
    np.testing.assert_allclose(np.expm1(got.astype(np.float64)).sum(1), 1e4, rtol=1e-5)
    whole = TargetTransform("normalize_log1p").transform_slide(s, PANEL)
    assert not np.allclose(got, whole)
    half = TargetTransform("normalize_log1p_panel", target_sum=5e3).transform_slide(s, PANEL)
    np.testing.assert_allclose(np.expm1(half.astype(np.float64)).sum(1), 5e3, rtol=1e-5)
    assert np.all(TargetTransform("normalize_log1p_panel").transform(np.zeros((2, 3))) == 0)


def test_zero_library_spot_stays_zero() -> None:
    t = TargetTransform("normalize_log1p")
    out = t.transform(np.zeros((1, 3)), np.zeros(1))
    assert np.all(out == 0)


def test_stnet_formula() -> None:
    s = slides()[1]
    counts, totals = s.counts().astype(np.float64), spot_totals(s)
    y = TargetTransform("stnet").transform_slide(s, PANEL)
    idx = [GENES.index(g) for g in PANEL.genes]
    expected = np.log((1 + counts[:, idx]) / (counts.sum(1, keepdims=True) + len(GENES)))
    np.testing.assert_allclose(y, expected, rtol=1e-5)
    # over the full transcriptome the smoothed fractions sum to one
    full = TargetTransform("stnet").transform(counts, totals, s.n_genes)
    np.testing.assert_allclose(np.exp(full.astype(np.float64)).sum(1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="n_total_genes"):
        TargetTransform("stnet").transform(counts, totals)


def test_zscore_fitted_on_training_spots_only() -> None:
    train, test = slides(0, 3), slides(9, 1)[0]
    t = TargetTransform("log1p", scale="zscore").fit_slides(train, PANEL)
    y_train = np.log1p(np.concatenate([panel_matrix(s, PANEL) for s in train]).astype(np.float64))
    np.testing.assert_allclose(t.center, y_train.mean(0), rtol=1e-12)
    np.testing.assert_allclose(t.spread, y_train.std(0), rtol=1e-12)
    z = np.concatenate([t.transform_slide(s, PANEL) for s in train])
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-5)
    before = t.state_dict()
    zt = t.transform_slide(test, PANEL)  # test uses training statistics, and never changes them
    np.testing.assert_allclose(zt, (np.log1p(panel_matrix(test, PANEL)) - t.center) / t.spread, rtol=1e-5)
    assert t.state_dict() == before
    np.testing.assert_allclose(t.inverse(zt), np.log1p(panel_matrix(test, PANEL)), rtol=1e-5, atol=1e-6)


def test_minmax_and_constant_gene() -> None:
    x = np.array([[1, 5, 2], [3, 5, 2], [7, 5, 9]], dtype=np.float32)
    t = TargetTransform("none", scale="minmax").fit([x])
    y = t.transform(x)
    assert y.min() == 0 and y.max() == 1
    np.testing.assert_array_equal(y[:, 1], 0)  # constant gene: shifted, range treated as 1
    np.testing.assert_allclose(t.inverse(y), x)
    tz = TargetTransform("none", scale="zscore").fit([x])
    assert tz.spread[1] == 1.0


def test_unfitted_scale_and_bad_settings() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        TargetTransform(scale="zscore").transform(np.ones((2, 2)))
    with pytest.raises(ValueError, match="unknown target transform"):
        TargetTransform("log10")
    with pytest.raises(ValueError, match="unknown scale"):
        TargetTransform(scale="robust")
    t = TargetTransform(scale="zscore").fit([np.ones((3, 2))])
    with pytest.raises(ValueError, match="fitted on 2 genes"):
        t.transform(np.ones((3, 4)))


def test_state_dict_roundtrip_and_hash() -> None:
    t = TargetTransform("normalize_log1p", target_sum=1e4, scale="zscore").fit_slides(slides(), PANEL)
    d = json.loads(json.dumps(t.state_dict()))
    u = TargetTransform.from_state_dict(d)
    s = slides(5, 1)[0]
    np.testing.assert_array_equal(u.transform_slide(s, PANEL), t.transform_slide(s, PANEL))
    assert u.hash == t.hash
    other = TargetTransform("normalize_log1p", target_sum=1e4, scale="zscore").fit_slides(slides(1), PANEL)
    assert other.hash != t.hash
    assert TargetTransform("log1p").hash != TargetTransform("log2p1").hash
