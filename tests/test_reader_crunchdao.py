"""CrunchDAO Crunch-1 reader on generated SpatialData stores (zarr v2 and v3 layouts)."""

from __future__ import annotations

import json
import shutil
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from stbench.data.dataset import Dataset
from stbench.data.image_regions import RegionReader, ZarrImage
from stbench.data.prepare import prepare
from stbench.data.pseudobulk import tile_slide
from stbench.data.readers import get_reader
from stbench.data.readers.crunchdao import CrunchDAOReader, patient_of
from stbench.errors import DataError
from tests.fixtures.crunchdao_layout import GENES, write_crunchdao


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("crunch")
    return root, write_crunchdao(root)


def test_registered_lists_stores_and_patients(dataset):
    root, _ = dataset
    assert get_reader("crunchdao") is CrunchDAOReader
    assert CrunchDAOReader(root).list_slides() == ["DC5", "UC1_I", "UC1_NI"]
    assert CrunchDAOReader(root / "UC1_I.zarr").list_slides() == ["UC1_I"]  # a single store
    assert [patient_of(s) for s in ("UC1_I", "UC1_NI", "DC5", "UC9_I-train-final")] == [
        "UC1",
        "UC1",
        "DC5",
        "UC9",
    ]


@pytest.mark.parametrize("sid", ["UC1_NI", "UC1_I", "DC5"])
def test_nuclei_counts_positions_and_image(dataset, sid):
    root, truth = dataset
    s = CrunchDAOReader(root).read_slide(sid).validate()
    want = truth.counts[sid]
    assert s.genes == GENES and s.spot_ids == list(want.index)  # the unlabelled nucleus is dropped
    np.testing.assert_array_equal(s.counts(), want.to_numpy(np.float32))  # raw counts, not log1p X
    np.testing.assert_allclose(s.coords, truth.xy[sid], atol=1e-9)  # centroid of the 3x3 label squares
    assert s.meta["dropped_spots"] == {str(truth.unlabelled[sid]): "no nucleus label in labels"}
    assert s.adata.obs["group"].tolist() == truth.group[sid]
    assert s.patient == patient_of(sid) and s.platform == "xenium" and s.spot_diameter_um is None
    assert isinstance(s.image, ZarrImage) and s.image.size == (512, 480)
    img = s.image.read()
    assert img.shape == (480, 512, 3) and img.dtype == np.uint8
    # HE_original -> global maps to DAPI px at 0.5 / 0.2125: 0.5 um/px, with or without a DAPI image
    assert s.mpp == pytest.approx(0.5)
    assert s.meta["mpp_source"].startswith(
        "HE_original -> global -> DAPI" if sid == "UC1_NI" else "HE_original"
    )
    with RegionReader(s.image) as rr:
        assert rr.levels == [(512, 480), (256, 240)]
        np.testing.assert_array_equal(rr.read(0, 10, 20, 74, 60), img[20:60, 10:74])


def test_options_and_errors(dataset, tmp_path):
    root, truth = dataset
    s = CrunchDAOReader(root, mpp={"DC5": 0.25}, positions="obsm").read_slide("DC5")
    assert s.mpp == 0.25 and s.meta["mpp_source"] == "option mpp"
    np.testing.assert_allclose(s.coords[:-1], truth.xy["DC5"] * (0.5 / 0.2125) + (40.0, 25.0))  # DAPI frame
    copy = tmp_path / "c"
    shutil.copytree(root / "DC5.zarr", copy / "DC5.zarr")
    table_dir = copy / "DC5.zarr" / "tables" / "anucleus"
    table = ad.read_zarr(str(table_dir))
    del table.layers["counts"]
    shutil.rmtree(table_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table.write_zarr(str(table_dir))
    with pytest.raises(DataError, match="raw-count layer") as e:
        CrunchDAOReader(copy).read_slide("DC5")
    assert (e.value.field, e.value.slide) == ("layers/counts", "DC5")
    assert e.value.file.endswith("tables/anucleus")
    shutil.rmtree(copy / "DC5.zarr" / "tables" / "anucleus")
    with pytest.raises(DataError) as e:
        CrunchDAOReader(copy).read_slide("DC5")
    assert e.value.field == "tables/anucleus"
    with pytest.raises(DataError) as e:
        CrunchDAOReader(tmp_path).list_slides()  # no <slide>.zarr here
    assert e.value.field == "root"
    # without a usable transformation the scale is unknown, and tiling says which option to set
    attrs_file = copy / "DC5.zarr" / "images" / "HE_original" / ".zattrs"
    attrs = json.loads(attrs_file.read_text())
    attrs["multiscales"][0]["coordinateTransformations"] = [
        {"type": "identity", "input": {"name": "cyx"}, "output": {"name": "global"}}
    ]
    attrs_file.write_text(json.dumps(attrs))
    shutil.copytree(root / "DC5.zarr" / "tables" / "anucleus", copy / "DC5.zarr" / "tables" / "anucleus")
    s = CrunchDAOReader(copy).read_slide("DC5")
    assert s.mpp is None and "set reader option mpp" in s.meta["mpp_source"]
    with pytest.raises(DataError) as e:
        tile_slide(s, {"aggregate": "cells"})
    assert (e.value.field, e.value.slide) == ("mpp", "DC5")


def test_zarr_v3_store(tmp_path):
    truth = write_crunchdao(tmp_path, samples=("UC7_I",), zarr_format=3)
    s = CrunchDAOReader(tmp_path).read_slide("UC7_I").validate()
    np.testing.assert_array_equal(s.counts(), truth.counts["UC7_I"].to_numpy(np.float32))
    np.testing.assert_allclose(s.coords, truth.xy["UC7_I"])
    assert s.mpp == pytest.approx(0.5) and s.image.read().shape == (480, 512, 3)


def test_crunchdao_bowel_card_tiles_nuclei(dataset, tmp_path):
    """The catalog card: 224 px tiles at 0.5 um/px = 2 x 2 tiles of the 512 x 480 fixture image."""
    root, truth = dataset
    manifest = prepare("crunchdao-bowel", tmp_path, root)
    assert {s: e["patient"] for s, e in manifest["slides"].items()} == {
        "DC5": "DC5",
        "UC1_I": "UC1",
        "UC1_NI": "UC1",
    }
    ds = Dataset.open("crunchdao-bowel", tmp_path)
    for sid in ds.slide_ids:
        t = ds.load_slide(sid)  # from the cache: the zarr image handle comes back as a ZarrImage
        assert isinstance(t.image, ZarrImage) and t.image.read().shape == (480, 512, 3)
        assert t.platform == "xenium-pseudobulk" and t.n_spots == 4 and t.spot_diameter_um == 112.0
        xy = truth.xy[sid]
        rc = np.floor((xy + 0.5) / 224.0).astype(int)
        inside = (rc[:, 0] < 2) & (rc[:, 1] < 2)
        ids = [f"r{r}_c{c}" for c, r in rc[inside]]
        want = truth.counts[sid][inside].groupby(ids).sum()
        got = pd.DataFrame(t.counts(), index=t.spot_ids, columns=t.genes)
        pd.testing.assert_frame_equal(got, want.astype(np.float32).loc[t.spot_ids], check_names=False)
        assert t.adata.obs["n_cells"].sum() == inside.sum()
        assert t.meta["pseudobulk"]["tissue_filter"]["applied"]  # HE_original is 8-bit RGB
