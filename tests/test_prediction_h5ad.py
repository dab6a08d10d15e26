"""Prediction files of a real run plot with scanpy (and squidpy, when installed) as they are."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import matplotlib
import numpy as np
import pytest

from stbench.benchmark.spatial_h5ad import lowres_image, spatial_entry
from stbench.data.image import SlideImage

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def mean_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    from method_harness import run_method

    out = tmp_path_factory.mktemp("pred-h5ad")
    row = run_method("mean", synthetic_root, out, config=None)
    return row, out / "jobs" / row["job_id"] / "predictions" / f"{row['test_slides'][0]}.h5ad"


def test_run_prediction_carries_visium_spatial(mean_run: tuple[dict, Path]) -> None:
    row, path = mean_run
    a = ad.read_h5ad(path)
    lib = row["test_slides"][0]
    entry = a.uns["spatial"][lib]
    img = entry["images"]["lowres"]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and max(img.shape[:2]) <= 600
    sf = entry["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(55.0)  # synthetic: 55 µm spots at 1 µm/px
    xy = np.asarray(a.obsm["spatial"]) * sf["tissue_lowres_scalef"]
    h, w = img.shape[:2]
    assert (xy >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
    prov = a.uns["stbench"]
    assert prov["job_id"] == row["job_id"] and prov["method"] == "mean" and prov["fold"] == row["fold"]
    assert prov["dataset"] == "synthetic" and prov["weights"] == "none"
    assert prov["target_transform"] == row["target"] == "normalize_log1p"
    panel = json.loads((path.parents[1] / "gene_panel.json").read_text())["genes"]
    assert list(a.var_names) == panel


def test_scanpy_plots_a_run_prediction(mean_run: tuple[dict, Path]) -> None:
    import matplotlib.pyplot as plt
    import scanpy as sc

    row, path = mean_run
    a = ad.read_h5ad(path)
    ax = sc.pl.spatial(a, color=a.var_names[0], library_id=row["test_slides"][0], show=False)
    assert ax is not None and len(ax[0].images) == 1  # the H&E under the spots
    plt.close("all")


def test_squidpy_autocorrelation_on_a_run_prediction(mean_run: tuple[dict, Path]) -> None:
    sq = pytest.importorskip("squidpy")
    _, path = mean_run
    a = ad.read_h5ad(path)
    a.X = np.asarray(a.layers["truth"])  # the mean predictor is constant; Moran's I needs variance
    sq.gr.spatial_neighbors(a, coord_type="generic", n_neighs=6)
    sq.gr.spatial_autocorr(a, mode="moran", genes=list(a.var_names[:5]), n_perms=None)
    assert "moranI" in a.uns and np.isfinite(a.uns["moranI"]["I"]).all()


def test_lowres_keeps_the_aspect_and_the_scale(tmp_path: Path) -> None:
    from PIL import Image

    rgb = np.zeros((900, 1500, 3), np.uint8)
    rgb[:, 750:] = 255
    Image.fromarray(rgb).save(tmp_path / "he.jpg", quality=95)
    small, scale = lowres_image(SlideImage(tmp_path / "he.jpg"))
    assert small.shape == (360, 600, 3) and scale == pytest.approx(0.4)
    assert small[:, :290].mean() < 10 and small[:, 310:].mean() > 245  # left dark, right white


def test_tiff_pyramid_reads_a_coarse_level(tmp_path: Path) -> None:
    import tifffile

    rgb = np.full((2048, 2048, 3), 200, np.uint8)
    with tifffile.TiffWriter(tmp_path / "p.tif") as tw:
        tw.write(rgb, subifds=2, tile=(256, 256))
        tw.write(rgb[::2, ::2], subfiletype=1, tile=(256, 256))
        tw.write(rgb[::4, ::4], subfiletype=1, tile=(256, 256))
    small, scale = lowres_image(SlideImage(tmp_path / "p.tif"))
    assert small.shape == (600, 600, 3) and scale == pytest.approx(600 / 2048)
    assert np.abs(small.astype(int) - 200).max() <= 1


def test_slide_without_image_gets_scalefactors_only() -> None:
    entry = spatial_entry(None, mpp=0.5, spot_diameter_px=110.0)
    assert "images" not in entry
    assert entry["scalefactors"]["spot_diameter_fullres"] == 110.0
    assert entry["metadata"]["mpp"] == 0.5
