"""Pseudo-bulk tiling of the real 10x Xenium crop in ../shared/data/xenium-crop.

The crop has no H&E: its DAPI morphology image (237 x 237 px, 8x downsampled = 1.7 um/px, cut at
(1000, 1000) um; see tests/test_reader_xenium.py) is the slide image, so the tissue filter, whose
thresholds are for 8-bit RGB H&E, is not applied and the slide says so. Transcripts span
1000-1400 um; 112 um tiles (65.9 px) give 3 x 3 whole tiles over 1000-1336 um, and every transcript
beyond them is an "edge" drop. Observed: 5,260 rows = 3,863 kept + 1,394 edge + 3 control, 0 low-qv
(55 um tiles: 7 x 7 tiles over 1000-1385 um, 4,916 kept + 341 edge + 3 control).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stbench.data.catalog import CATALOG, DatasetCard
from stbench.data.dataset import Dataset
from stbench.data.prepare import prepare
from stbench.data.pseudobulk import tile_slide
from stbench.data.readers.xenium import CONTROL_PREFIXES, XeniumReader
from tests.conftest import XENIUM_CROP

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not XENIUM_CROP.is_dir(), reason="../shared/data/xenium-crop is absent"),
]
CROP = {"morphology_mpp": 1.7, "morphology_origin_um": (1000.0, 1000.0)}


@pytest.fixture(scope="module")
def crop():
    slide = XeniumReader(XENIUM_CROP, **CROP).read_slide("xenium-crop")
    raw = pd.read_parquet(XENIUM_CROP / "transcripts.parquet")
    return slide, raw


def expected_tiles(raw: pd.DataFrame, tile_um: float) -> tuple[pd.DataFrame, int]:
    """Independent binning of the raw table: pixel p = (um - 1000) / 1.7 (the reader's frame),
    column floor((p + 0.5) / side); whole tiles of the 237 px image only."""
    side = tile_um / 1.7
    n = int(np.floor(237 / side))
    genes = raw[~raw["feature_name"].str.startswith(CONTROL_PREFIXES) & (raw["qv"] >= 20)]
    c = np.floor(((genes["x_location"] - 1000) / 1.7 + 0.5) / side)
    r = np.floor(((genes["y_location"] - 1000) / 1.7 + 0.5) / side)
    inside = (c >= 0) & (r >= 0) & (c < n) & (r < n)
    ids = [f"r{int(a)}_c{int(b)}" for a, b in zip(r[inside], c[inside], strict=True)]
    table = pd.crosstab(pd.Index(ids, name="tile"), genes.loc[inside, "feature_name"].to_numpy())
    return table, int((~inside).sum())


@pytest.mark.parametrize(
    ("tile_um", "n_side", "kept", "edge"), [(112.0, 3, 3_863, 1_394), (55.0, 7, 4_916, 341)]
)
def test_transcripts_per_gene_are_conserved_across_tiles(crop, tile_um, n_side, kept, edge):
    slide, raw = crop
    t = tile_slide(slide, {"tile_um": tile_um}).validate()
    pb = t.meta["pseudobulk"]
    assert (pb["grid"]["n_rows"], pb["grid"]["n_cols"]) == (n_side, n_side)
    assert t.n_spots == n_side * n_side and not t.meta["dropped_spots"]  # every tile is dense here
    assert t.mpp == 1.7 and t.spot_diameter_um == pytest.approx(tile_um)
    # per gene: kept + dropped (edge, filtered, low-qv, control) = rows of transcripts.parquet
    total = raw["feature_name"].value_counts()
    var = t.adata.var
    np.testing.assert_array_equal(var["total"].to_numpy(), total.reindex(t.genes).to_numpy())
    parts = var[["kept", "dropped_edge", "dropped_filtered", "dropped_low_qv", "dropped_control"]].sum(axis=1)
    np.testing.assert_array_equal(parts.to_numpy(), var["total"].to_numpy())
    np.testing.assert_array_equal(t.counts().sum(axis=0), var["kept"].to_numpy())
    controls = total[total.index.str.startswith(CONTROL_PREFIXES)]
    assert pb["transcripts"]["control_by_feature"] == controls.to_dict() and controls.sum() == 3
    assert pb["transcripts"]["dropped"] == {"control": 3, "low_qv": 0, "edge": edge, "filtered": 0}
    assert pb["transcripts"]["kept"] == kept and kept + edge + 3 == len(raw) == 5_260
    # the tile sums are exactly an independent binning of the raw table
    want, n_edge = expected_tiles(raw, tile_um)
    assert n_edge == edge
    got = pd.DataFrame(t.counts(), index=t.spot_ids, columns=t.genes)
    pd.testing.assert_frame_equal(
        got.sort_index(),
        want.reindex(columns=t.genes, fill_value=0).astype(np.float32).sort_index(),
        check_names=False,
    )
    # cells: every one of the 526 cells whose centroid is in a whole tile is counted once
    assert t.adata.obs["n_cells"].sum() <= 526
    assert pb["tissue_filter"]["applied"] is False and "not 8-bit RGB" in pb["tissue_filter"]["reason"]


def test_cells_aggregate_on_the_real_matrix(crop):
    slide, _ = crop
    t = tile_slide(slide, {"aggregate": "cells"}).validate()
    var = t.adata.var
    # the cell matrix holds 45,726 gene counts; the 3 x 3 tiles keep the cells whose centroid is inside
    assert int(var["total"].sum()) == 45_726
    np.testing.assert_array_equal((var["kept"] + var["dropped_edge"]).to_numpy(), var["total"].to_numpy())
    r, c = np.floor((slide.coords + 0.5) / (112 / 1.7)).T
    inside = (r < 3) & (c < 3) & (r >= 0) & (c >= 0)
    assert int(t.adata.obs["n_cells"].sum()) == int(inside.sum())
    np.testing.assert_array_equal(var["kept"].to_numpy(), slide.counts()[inside].sum(axis=0))


def test_a_plain_xenium_card_is_tiled_by_option(tmp_path, monkeypatch):
    card = DatasetCard(
        name="xenium-crop-tiles",
        title="real Xenium crop, tiled",
        reader="xenium",
        platform="xenium",
        tissue="-",
        n_slides=1,
        n_patients=1,
        source_url="-",
        how_to_get="-",
        access="-",
        licence="-",
        citation="-",
        default_protocol="diffbulk",
        reader_options={**CROP, "tiling": {"tile_um": 112.0}},
    )
    monkeypatch.setitem(CATALOG, card.name, card)
    source = tmp_path / "source"  # one Xenium output per sub-folder, as a user lays out a dataset
    source.mkdir()
    (source / "xenium-crop").symlink_to(XENIUM_CROP, target_is_directory=True)
    manifest = prepare(card.name, tmp_path / "root", source)
    assert manifest["slides"]["xenium-crop"]["spots"] == 9
    assert "xenium-crop/transcripts.parquet" in manifest["slides"]["xenium-crop"]["files"]
    t = Dataset.open(card.name, tmp_path / "root").load_slide("xenium-crop")  # cached by prepare
    assert t.platform == "xenium-pseudobulk" and t.meta["pseudobulk"]["transcripts"]["kept"] == 3_863
    direct = tile_slide(XeniumReader(XENIUM_CROP, **CROP).read_slide("xenium-crop"), {"tile_um": 112.0})
    np.testing.assert_array_equal(t.counts(), direct.counts())
    np.testing.assert_allclose(t.coords, direct.coords)
