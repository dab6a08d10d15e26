"""HEST-1k reader on a generated folder (st/, wsis/, patches/, metadata/)."""

from __future__ import annotations

import shutil
import warnings

import anndata as ad
import numpy as np
import pytest

from stbench.data.readers import get_reader
from stbench.data.readers.hest import HestReader
from stbench.errors import DataError
from tests.fixtures._spot_images import colours_at
from tests.fixtures.hest_layout import write_hest

EXPECTED = {  # id -> (mpp, spot diameter, platform, patient)
    "TENX95": (0.2738, 55.0, "visium", "TENX95"),
    "NCBI770": (
        0.5493,
        150.0,
        "st",
        "Single Cell and Spatial Analysis of Human Squamous Cell Carcinoma [ST] / Patient 2",
    ),
    "TENX158": (0.2738, None, "xenium", "FFPE Human Skin Primary Dermal Melanoma / Patient 1"),
}


def _read(path):
    with warnings.catch_warnings():  # the fixture's repeated gene symbol
        warnings.simplefilter("ignore", UserWarning)
        return ad.read_h5ad(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("hest")
    return root, write_hest(root)


def test_registered_and_lists_samples(dataset):
    root, _ = dataset
    assert get_reader("hest") is HestReader
    assert HestReader(root).list_slides() == ["NCBI770", "TENX158", "TENX95"]
    assert HestReader(root, ids=["TENX95", "NCBI770"]).list_slides() == ["NCBI770", "TENX95"]
    with pytest.raises(DataError) as e:
        HestReader(root, ids=["TENX1"]).list_slides()
    assert e.value.field == "ids" and e.value.slide == "TENX1"


@pytest.mark.parametrize("sid", list(EXPECTED))
def test_reads_sample(dataset, sid):
    root, truth = dataset
    s = HestReader(root).read_slide(sid).validate()
    mpp, diam, platform, patient = EXPECTED[sid]
    assert s.n_spots == 25 and s.n_genes == 10
    assert s.genes == [f"G{i}" for i in range(9)] + ["G0-1"]  # repeated symbol made unique
    np.testing.assert_array_equal(s.counts(), truth.counts[sid].to_numpy())
    assert s.spot_ids == list(truth.counts[sid].index)
    np.testing.assert_allclose(s.coords, truth.pixel_xy[sid])
    assert s.image.path.name == f"{sid}.tif" and s.image.size == (400, 400)  # level 0 of the pyramid
    assert colours_at(s.image.read(), s.coords) == [truth.colour[sid][b] for b in s.spot_ids]
    assert s.mpp == pytest.approx(mpp)  # estimated, else the embedded value (NCBI770)
    assert s.spot_diameter_um == diam  # NaN in HEST metadata -> None
    assert s.platform == platform and s.patient == patient
    assert s.meta["hest_patches"] == str(root / "patches" / f"{sid}.h5")
    assert s.meta["patient_raw"] == truth.meta[sid]["patient"]
    assert s.meta["hest_metadata"]["organ"] == "Skin"
    assert "pxl_col_in_fullres" in s.adata.obs.columns


def test_hest_bench_layout_without_metadata_or_wsi(tmp_path):
    write_hest(tmp_path, ids=("TENX95",))
    (tmp_path / "st").rename(tmp_path / "adata")
    shutil.rmtree(tmp_path / "metadata")
    shutil.rmtree(tmp_path / "wsis")
    r = HestReader(tmp_path)
    assert r.list_slides() == ["TENX95"]
    s = r.read_slide("TENX95").validate()
    assert s.image is None and s.mpp is None and s.patient == "TENX95" and s.platform == "other"
    assert s.meta["hest_patches"].endswith("patches/TENX95.h5")


def test_counts_layer_option(tmp_path):
    truth = write_hest(tmp_path, ids=("TENX95",))
    path = tmp_path / "st" / "TENX95.h5ad"
    a = _read(path)
    a.layers["raw"] = a.X.copy()
    a.X = a.X * 0.5
    a.write_h5ad(path)
    s = HestReader(tmp_path, counts_layer="raw").read_slide("TENX95")
    np.testing.assert_array_equal(s.counts(), truth.counts["TENX95"].to_numpy())
    with pytest.raises(DataError) as e:
        HestReader(tmp_path, counts_layer="counts").read_slide("TENX95")
    assert e.value.field == "layers/counts" and e.value.file == str(path)


def test_missing_spatial_and_bad_metadata_are_reported(tmp_path):
    write_hest(tmp_path, ids=("TENX95", "TENX158"))
    path = tmp_path / "st" / "TENX95.h5ad"
    a = _read(path)
    del a.obsm["spatial"]
    a.write_h5ad(path)
    (tmp_path / "metadata" / "TENX158.json").write_text("{not json")
    problems = {p.slide: p for p in HestReader(tmp_path).check()}
    assert problems["TENX95"].field == "obsm/spatial" and problems["TENX95"].file == str(path)
    assert problems["TENX158"].field == "metadata"
    assert problems["TENX158"].file.endswith("metadata/TENX158.json")


def test_missing_h5ad_and_missing_st_folder(tmp_path):
    write_hest(tmp_path, ids=("TENX95",))
    with pytest.raises(DataError) as e:
        HestReader(tmp_path).read_slide("TENX99")
    assert e.value.slide == "TENX99" and e.value.field == "st/<id>.h5ad"
    shutil.rmtree(tmp_path / "st")
    with pytest.raises(DataError) as e:
        HestReader(tmp_path).list_slides()
    assert e.value.field == "st"


def test_spots_outside_the_wsi_fail_validation(tmp_path):
    write_hest(tmp_path, ids=("TENX95",))
    path = tmp_path / "st" / "TENX95.h5ad"
    a = _read(path)
    a.obsm["spatial"] = np.asarray(a.obsm["spatial"]) + 1000.0
    a.write_h5ad(path)
    with pytest.raises(DataError, match="outside") as e:
        HestReader(tmp_path).read_slide("TENX95").validate()
    assert e.value.slide == "TENX95" and e.value.field == "obsm/spatial"
    assert e.value.file.endswith("wsis/TENX95.tif")


def test_log_normalised_x_is_refused_unless_declared(tmp_path):
    """A HEST h5ad whose X was log-normalised would be log1p-transformed again: refused (issue 14)."""
    truth = write_hest(tmp_path, ids=("TENX95",))
    path = tmp_path / "st" / "TENX95.h5ad"
    a = _read(path)
    raw = np.asarray(a.X.toarray() if hasattr(a.X, "toarray") else a.X, dtype=np.float64)
    tot = np.maximum(raw.sum(1, keepdims=True), 1)
    a.X = np.log1p(raw / tot * 1e4).astype(np.float32)
    a.write_h5ad(path)
    with pytest.raises(DataError, match="look already normalised") as e:
        HestReader(tmp_path).read_slide("TENX95")
    assert e.value.file == str(path) and e.value.slide == "TENX95" and e.value.field == "X"
    assert "counts: normalized" in e.value.problem
    with pytest.raises(DataError, match="look already normalised"):
        HestReader(tmp_path, allow_non_integer=True).read_slide("TENX95")
    s = HestReader(tmp_path, counts="normalized").read_slide("TENX95")
    np.testing.assert_allclose(s.counts(), a.X, rtol=1e-6)
    assert s.n_spots == truth.counts["TENX95"].shape[0]
