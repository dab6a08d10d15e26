"""SSIM, co-expression agreement and ARI against skimage / numpy / sklearn and hand formulas."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from skimage.metrics import structural_similarity

from stbench.metrics import ari, coexpr, rasterise, slide_metrics, spot_grid, ssim, ssim_genes
from stbench.metrics.spatial import ssim_maps
from tests.conftest import HER2ST as HER2ST_ROOT

HER2ST = HER2ST_ROOT / "data"


def _grid_slide(seed: int = 0, h: int = 9, w: int = 11, g: int = 6, holes: int = 10):
    """Spots on an h x w array grid (a few cells empty), smooth truth, noisy prediction."""
    rng = np.random.default_rng(seed)
    rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    cells = np.stack([rr.ravel(), cc.ravel()], axis=1)
    cells = cells[np.sort(rng.choice(len(cells), len(cells) - holes, replace=False))]
    freq = rng.uniform(0.2, 0.8, size=(g, 2))
    truth = np.sin(cells[:, :1] * freq[:, 0] + cells[:, 1:] * freq[:, 1]) + 0.1 * rng.normal(
        size=(len(cells), g)
    )
    pred = 0.8 * truth + 0.3 * rng.normal(size=truth.shape)
    return truth, pred, cells


def _ref_ssim_gene(t: np.ndarray, p: np.ndarray, cells: np.ndarray, win: int = 7) -> float:
    """Independent: scale by the truth range by hand, grid by hand, skimage SSIM map, mean over spots."""
    pad = (win - 1) // 2
    lo, hi = t.min(), t.max()
    shape = tuple(cells.max(axis=0) + 1 + 2 * pad)
    mt, mp, mask = np.zeros(shape), np.zeros(shape), np.zeros(shape, dtype=bool)
    for (r, c), a, b in zip(cells, t, p, strict=True):
        mt[r + pad, c + pad] = (a - lo) / (hi - lo)
        mp[r + pad, c + pad] = (b - lo) / (hi - lo)
        mask[r + pad, c + pad] = True
    _, smap = structural_similarity(mt, mp, data_range=1.0, win_size=win, full=True)
    return float(smap[mask].mean())


def _naive_ssim_at(x: np.ndarray, y: np.ndarray, r: int, c: int, win: int = 7) -> float:
    """Wang et al. 2004 at one pixel with explicit window statistics (sample covariance)."""
    k = (win - 1) // 2
    a, b = x[r - k : r + k + 1, c - k : c + k + 1].ravel(), y[r - k : r + k + 1, c - k : c + k + 1].ravel()
    ma, mb = a.mean(), b.mean()
    va, vb, cov = a.var(ddof=1), b.var(ddof=1), np.cov(a, b, ddof=1)[0, 1]
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))


# --- grid ---------------------------------------------------------------------------------------


def test_spot_grid_from_pixels_and_errors():
    rng = np.random.default_rng(0)
    cells = np.array([[r, c] for r in range(5) for c in range(7) if (r, c) != (0, 0)])
    xy = np.stack([1000 + 290 * cells[:, 1], 500 + 290 * cells[:, 0]], axis=1) + rng.uniform(
        -40, 40, (len(cells), 2)
    )
    np.testing.assert_array_equal(spot_grid(xy, 290.0), cells)
    with pytest.raises(ValueError, match="pitches off a grid"):
        spot_grid(xy, 200.0)
    with pytest.raises(ValueError, match="share a grid cell"):
        spot_grid(np.array([[0.0, 0.0], [0.1, 0.0], [1.0, 1.0]]), 1.0)
    hexagonal = np.array([[c + 0.5 * (r % 2), r * np.sqrt(3) / 2] for r in range(10) for c in range(10)])
    with pytest.raises(ValueError, match="hexagonal"):
        spot_grid(hexagonal, 1.0)


def test_rasterise_places_each_spot_once():
    vals = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    maps, mask = rasterise(vals, np.array([[0, 0], [1, 2], [2, 1]]), margin=1)
    assert maps.shape == (2, 5, 5) and mask.sum() == 3
    assert maps[1, 2, 3] == 20.0 and maps[0, 3, 2] == 3.0 and maps[0, 0, 0] == 0.0


# --- SSIM ---------------------------------------------------------------------------------------


def test_ssim_map_equals_skimage_and_explicit_windows():
    rng = np.random.default_rng(1)
    x, y = rng.random((15, 17)), rng.random((15, 17))
    ours = ssim_maps(x[None], y[None])[0]
    _, sk = structural_similarity(x, y, data_range=1.0, full=True)
    np.testing.assert_allclose(ours, sk, atol=1e-12)
    for r, c in [(3, 3), (7, 9), (11, 13)]:
        assert ours[r, c] == pytest.approx(_naive_ssim_at(x, y, r, c), abs=1e-12)


def test_ssim_per_gene_equals_independent_skimage_pipeline():
    truth, pred, cells = _grid_slide()
    per_gene, excluded = ssim_genes(truth, pred, cells)
    ref = [_ref_ssim_gene(truth[:, j], pred[:, j], cells) for j in range(truth.shape[1])]
    np.testing.assert_allclose(per_gene, ref, atol=1e-12)
    assert not excluded.any()
    assert ssim(truth, pred, cells).value == pytest.approx(np.mean(ref), abs=1e-12)
    assert ssim_genes(truth, pred, cells, window=3)[0][0] == pytest.approx(
        _ref_ssim_gene(truth[:, 0], pred[:, 0], cells, win=3), abs=1e-12
    )


def test_ssim_perfect_constant_truth_and_constant_prediction():
    truth, pred, cells = _grid_slide(g=4)
    assert ssim(truth, truth, cells).value == pytest.approx(1.0, abs=1e-12)
    truth[:, 1] = 2.0
    res = ssim(truth, pred, cells)
    assert (res.n, res.excluded, res.excluded_truth) == (3, 1, 1)
    flat = np.tile(truth.mean(axis=0), (len(truth), 1))
    res = ssim(truth, flat, cells)  # a constant predictor gets a real (low) SSIM
    assert res.value is not None and res.value < 0.9 and res.n == 3


# --- co-expression ------------------------------------------------------------------------------


def _ref_coexpr(truth: np.ndarray, pred: np.ndarray) -> float:
    iu = np.triu_indices(truth.shape[1], k=1)
    return stats.pearsonr(np.corrcoef(truth.T)[iu], np.corrcoef(pred.T)[iu])[0]


def test_coexpr_equals_corrcoef_upper_triangles():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(150, 4))
    truth = base @ rng.normal(size=(4, 25)) + 0.5 * rng.normal(size=(150, 25))
    pred = truth + 1.5 * rng.normal(size=truth.shape)
    res = coexpr(truth, pred)
    assert res.value == pytest.approx(_ref_coexpr(truth, pred), abs=1e-10)
    assert coexpr(truth, pred, block=4).value == pytest.approx(res.value, abs=1e-12)  # blocked = whole
    assert coexpr(truth, truth).value == pytest.approx(1.0, abs=1e-12)
    truth[:, 3] = 1.0
    pred[:, 7] = 0.0
    res = coexpr(truth, pred)
    keep = [j for j in range(25) if j not in (3, 7)]
    assert res.value == pytest.approx(_ref_coexpr(truth[:, keep], pred[:, keep]), abs=1e-10)
    assert (res.n, res.excluded, res.excluded_truth, res.excluded_pred) == (23, 2, 1, 1)
    assert coexpr(truth, np.tile(truth.mean(0), (150, 1))).value is None


# --- ARI ----------------------------------------------------------------------------------------


def _ari_by_hand(a: list, b: list) -> float:
    """Hubert & Arabie's ARI from the contingency table (independent of sklearn)."""
    pairs = lambda n: n * (n - 1) / 2  # noqa: E731
    la, lb = sorted(set(a)), sorted(set(b))
    table = np.array(
        [[sum(1 for x, y in zip(a, b, strict=True) if x == u and y == v) for v in lb] for u in la]
    )
    index = sum(pairs(n) for n in table.ravel())
    ea, eb = sum(pairs(n) for n in table.sum(1)), sum(pairs(n) for n in table.sum(0))
    expected = ea * eb / pairs(len(a))
    return (index - expected) / (0.5 * (ea + eb) - expected)


def test_ari_equals_sklearn_pipeline_and_hand_formula():
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(3)
    labels = np.repeat(["tumour", "stroma", "fat"], 40).tolist()
    centres = {"tumour": 0.0, "stroma": 1.5, "fat": 3.0}
    x = np.array([centres[v] for v in labels])[:, None] + rng.normal(size=(120, 30))
    labels[:5] = ["undetermined"] * 5
    res = ari(x, labels, seed=7)
    keep = slice(5, None)
    z = PCA(n_components=20, svd_solver="full").fit_transform(x[keep])
    clusters = KMeans(n_clusters=3, n_init=10, random_state=7).fit_predict(z)
    assert res.value == pytest.approx(adjusted_rand_score(labels[keep], clusters), abs=1e-12)
    assert res.value == pytest.approx(_ari_by_hand(labels[keep], list(clusters)), abs=1e-12)
    assert (res.n_spots, res.excluded_spots, res.n_clusters) == (115, 5, 3)
    assert res.value > 0.5
    separated = np.array([centres[v] for v in labels[5:]])[:, None] * 100 + rng.normal(size=(115, 5))
    assert ari(separated, labels[5:]).value == pytest.approx(1.0)
    constant = np.ones((115, 5))
    assert ari(constant, labels[5:]).value == 0.0
    with pytest.raises(ValueError, match="at least 2 distinct labels"):
        ari(x, ["a"] * 120)


def test_report_with_grid_and_labels():
    truth, pred, cells = _grid_slide(g=8, holes=0)
    labels = np.where(cells[:, 1] < 5, "left", "right").tolist()
    genes = [f"g{j}" for j in range(8)]
    row = slide_metrics(truth, pred, genes, grid=cells, labels=labels, seed=1)
    assert row["ssim"] == pytest.approx(ssim(truth, pred, cells).value)
    assert row["coexpr"] == pytest.approx(_ref_coexpr(truth, pred), abs=1e-10)
    assert row["ari"] == pytest.approx(ari(pred, labels, seed=1).value)
    assert row["ari_truth"] == pytest.approx(ari(truth, labels, seed=1).value)
    assert row["ari_k"] == 2 and row["ari_excluded_spots"] == 0


# --- real data ----------------------------------------------------------------------------------


def _array_cells(spots: list[str]) -> np.ndarray:
    xy = np.array([[float(v) for v in s.split("x")] for s in spots])
    return spot_grid(xy, 1.0)


@pytest.mark.real_data
def test_real_her2st_b4_ssim_and_coexpr():
    from stbench.data.readers.count_table import read_count_table

    path = HER2ST / "ST-cnts" / "B4.tsv.gz"
    if not path.is_file():
        pytest.skip(f"real data not found at {path}")
    counts = read_count_table(path)
    x = np.log1p(counts.to_numpy())
    x = x[:, np.argsort(-x.var(axis=0), kind="stable")[:40]]
    cells = _array_cells(list(counts.index))
    rng = np.random.default_rng(0)
    maps, mask = rasterise(x, cells, margin=1)  # smooth on the grid: a plausible prediction
    kernel = np.ones((3, 3)) / 9.0
    from scipy.ndimage import convolve

    smooth = np.stack([convolve(m, kernel, mode="constant") for m in maps])
    pred = smooth[:, cells[:, 0] + 1, cells[:, 1] + 1].T + 0.2 * rng.normal(size=x.shape)
    per_gene, excluded = ssim_genes(x, pred, cells)
    ref = [_ref_ssim_gene(x[:, j], pred[:, j], cells) for j in range(x.shape[1])]
    np.testing.assert_allclose(per_gene, ref, atol=1e-12)
    assert not excluded.any() and 0.0 < np.mean(ref) < 1.0
    assert coexpr(x, pred).value == pytest.approx(_ref_coexpr(x, pred), abs=1e-10)


@pytest.mark.real_data
def test_real_her2st_a1_ari_against_pathologist_labels():
    import pandas as pd

    from stbench.data.readers.count_table import read_count_table

    cnt, lbl = HER2ST / "ST-cnts" / "A1.tsv.gz", HER2ST / "ST-pat" / "lbl" / "A1_labeled_coordinates.tsv"
    if not (cnt.is_file() and lbl.is_file()):
        pytest.skip("Her2ST A1 counts/labels not found")
    counts = read_count_table(cnt)
    table = pd.read_csv(lbl, sep="\t").dropna(subset=["x", "y"])
    key = table["x"].round().astype(int).astype(str) + "x" + table["y"].round().astype(int).astype(str)
    lut = dict(zip(key, table["label"], strict=False))
    labels = [lut.get(s) for s in counts.index]  # None: spot not in the label file
    x = np.log1p(counts.to_numpy())
    x = x[:, np.argsort(-x.var(axis=0), kind="stable")[:100]]
    res = ari(x, labels, seed=0)
    usable = [i for i, v in enumerate(labels) if v is not None and v != "undetermined"]
    assert res.n_spots == len(usable) and res.excluded_spots == len(labels) - len(usable)
    assert res.n_clusters == len({labels[i] for i in usable})
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    z = PCA(n_components=20, svd_solver="full").fit_transform(x[usable])
    clusters = KMeans(n_clusters=res.n_clusters, n_init=10, random_state=0).fit_predict(z)
    assert res.value == pytest.approx(_ari_by_hand([labels[i] for i in usable], list(clusters)), abs=1e-12)
