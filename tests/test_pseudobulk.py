"""Pseudo-bulk tiling on generated H&E + Xenium outputs whose tile contents are known exactly.

The fixture (tests/fixtures/pseudobulk_layout.py) plants transcripts at known H&E positions, maps
them to Xenium microns through a scaled + rotated + shifted alignment matrix, and paints tiles that
must fail a filter (white, dark, 3/4 white, flat profile, 3 transcripts)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stbench.data.catalog import CATALOG, DatasetCard
from stbench.data.dataset import Dataset, resolve_tiling
from stbench.data.image_regions import RegionReader
from stbench.data.prepare import prepare
from stbench.data.pseudobulk import TileGrid, TilingSpec, tile_slide
from stbench.data.readers.hest import HestReader
from stbench.data.readers.xenium import XeniumReader
from stbench.errors import DataError
from tests.fixtures.hest_layout import HEST_XENIUM_SIDE, write_hest_xenium
from tests.fixtures.pseudobulk_layout import (
    CONTROLS,
    FLAT,
    GENES,
    HE_SIZE,
    LOW,
    PART,
    SIDE,
    SPEC,
    WHITE,
    tile_id,
    write_he_xenium,
)

NO_FILTERS = {**SPEC, "tissue_min": None, "variance_min": None, "min_counts": None}


@pytest.fixture(scope="module")
def xenium(tmp_path_factory):
    root = tmp_path_factory.mktemp("pb-xenium")
    truth = write_he_xenium(root)
    return root, truth, XeniumReader(root).read_slide("PB1")


def frame(slide) -> pd.DataFrame:
    return pd.DataFrame(slide.counts(), index=slide.spot_ids, columns=slide.genes)


def check_conservation(t, n_input: int) -> None:
    """Every input transcript is kept or dropped for exactly one recorded reason."""
    var = t.adata.var
    parts = var[["kept", "dropped_control", "dropped_low_qv", "dropped_edge", "dropped_filtered"]].sum(axis=1)
    np.testing.assert_array_equal(parts.to_numpy(), var["total"].to_numpy())
    np.testing.assert_array_equal(t.counts().sum(axis=0), var["kept"].to_numpy())
    tx = t.meta["pseudobulk"]["transcripts"]
    assert tx["input"] == n_input == tx["kept"] + sum(tx["dropped"].values())


def test_tile_sums_equal_the_planted_transcripts(xenium):
    _, truth, s = xenium
    assert s.mpp == pytest.approx(0.25) and s.image.size == HE_SIZE  # measured from the alignment
    t = tile_slide(s, SPEC).validate()
    assert t.platform == "xenium-pseudobulk" and t.spot_diameter_um == 10.0 and t.mpp == s.mpp
    assert t.genes == GENES and t.patient == s.patient
    pd.testing.assert_frame_equal(frame(t), truth.kept.astype(np.float32).loc[t.spot_ids], check_names=False)
    # centres: (c + 0.5) * 40 - 0.5 in the pixel-index frame, so the patch store crops the tile exactly
    rc = t.adata.obs[["array_col", "array_row"]].to_numpy()
    np.testing.assert_allclose(t.coords, (rc + 0.5) * SIDE - 0.5, atol=1e-9)
    np.testing.assert_allclose(t.adata.obs[["x0_px", "y0_px"]].to_numpy(), rc * SIDE, atol=1e-9)
    pb = t.meta["pseudobulk"]
    assert pb["grid"] == {"n_rows": 4, "n_cols": 5, "origin_px": [0.0, 0.0]}
    assert pb["tiles"] == {
        "grid": 20,
        "empty": 2,
        "candidates": 18,
        "kept": 13,
        "removed": 5,
        "removed_by": {"tissue": 3, "variance": 1, "min_counts": 1},
    }
    var = t.adata.var
    np.testing.assert_array_equal(var["dropped_edge"], truth.edge.to_numpy())
    np.testing.assert_array_equal(var["dropped_low_qv"], truth.low_qv.to_numpy())
    np.testing.assert_array_equal(
        var["dropped_filtered"], truth.tiles.loc[list(truth.removed)].sum().to_numpy()
    )
    tx = pb["transcripts"]
    assert tx["dropped"]["control"] == truth.n_control == sum(tx["control_by_feature"].values())
    assert set(tx["control_by_feature"]) == set(CONTROLS)
    raw = pd.read_parquet(s.meta["transcripts_file"])
    assert (raw["feature_name"].value_counts().reindex(GENES).to_numpy() == var["total"].to_numpy()).all()
    check_conservation(t, len(raw))


def test_filters_are_recorded_per_tile_with_the_reason(xenium):
    _, truth, s = xenium
    t = tile_slide(s, SPEC)
    obs = t.adata.obs
    assert obs[["pass_tissue", "pass_variance", "pass_min_counts"]].all().all()
    np.testing.assert_allclose(obs["tissue_fraction"], 1.0)  # painted tissue colour everywhere
    assert set(t.meta["dropped_spots"]) == set(truth.removed)
    for tile, why in truth.removed.items():
        assert t.meta["dropped_spots"][tile].startswith(
            {"tissue": "tissue_fraction", "variance": "log1p variance", "min_counts": "n_transcripts"}[why]
        )
    rm = pd.DataFrame(t.meta["pseudobulk"]["removed_tiles"]).set_index("tile")
    assert (
        rm.loc[tile_id(WHITE), "background_fraction"] == 1.0
        and rm.loc[tile_id(WHITE), "tissue_fraction"] == 0.0
    )
    assert rm.loc["r2_c0", "dark_fraction"] == 1.0  # the near-black tile
    assert rm.loc[tile_id(PART), "tissue_fraction"] == pytest.approx(0.25)
    assert rm.loc[tile_id(FLAT), "log1p_variance"] == pytest.approx(0.0, abs=1e-12)
    assert rm.loc[tile_id(FLAT), "pass_tissue"] and rm.loc[tile_id(FLAT), "pass_min_counts"]
    assert rm.loc[tile_id(LOW), "n_transcripts"] == 3 and not rm.loc[tile_id(LOW), "pass_min_counts"]
    assert rm.loc[tile_id(LOW), "pass_variance"]  # 3 genes of 6 at 1: variance 0.12 >= 0.01
    info = t.meta["pseudobulk"]["tissue_filter"]
    assert info["applied"] and info["level"] == 1  # 40 px tiles are 20 px at level 1 (>= qc_min_px 16)
    assert t.summary()["dropped"] == 5


def test_filters_off_keep_every_candidate_tile(xenium):
    _, truth, s = xenium
    t = tile_slide(s, NO_FILTERS)
    pd.testing.assert_frame_equal(frame(t), truth.tiles.astype(np.float32).loc[t.spot_ids], check_names=False)
    assert t.n_spots == 18 and not t.meta["dropped_spots"]
    assert t.adata.obs["tissue_fraction"].isna().all()
    assert t.meta["pseudobulk"]["tissue_filter"] == {"applied": False, "reason": "disabled (tissue_min=None)"}
    # thresholds are parameters: a stricter tissue rule also drops nothing else here
    assert tile_slide(s, {**SPEC, "tissue_min": 0.2}).n_spots == 14  # the 3/4-white tile (0.25) comes back


@pytest.mark.parametrize(("tile_px", "grid"), [(10, (8, 10)), (20, (4, 5)), (40, (2, 2))])
def test_tile_side_changes_the_grid_and_conserves_counts(xenium, tile_px, grid):
    _, truth, s = xenium
    t = tile_slide(s, {**NO_FILTERS, "tile_px": tile_px})
    side = tile_px * 0.5 / 0.25
    assert (t.meta["pseudobulk"]["grid"]["n_rows"], t.meta["pseudobulk"]["grid"]["n_cols"]) == grid
    assert t.spot_diameter_um == tile_px * 0.5
    want = truth.expected(side).astype(np.float32)
    pd.testing.assert_frame_equal(frame(t).sort_index(), want.sort_index(), check_names=False)
    check_conservation(t, len(truth.rows))
    # tile_um is the same knob seen from the side length: tile_px stays 224, tile_mpp follows
    opts = {k: v for k, v in NO_FILTERS.items() if k not in ("tile_px", "tile_mpp")}
    u = tile_slide(s, {**opts, "tile_um": tile_px * 0.5})
    assert u.spot_ids == t.spot_ids and u.meta["pseudobulk"]["spec"]["tile_px"] == 224
    assert u.meta["pseudobulk"]["tile_um"] == pytest.approx(tile_px * 0.5)


def test_cells_aggregate_sums_cell_vectors(xenium):
    _, truth, s = xenium
    t = tile_slide(s, {**NO_FILTERS, "aggregate": "cells"}).validate()
    pd.testing.assert_frame_equal(
        frame(t), truth.cell_tiles.astype(np.float32).loc[t.spot_ids], check_names=False
    )
    assert t.meta["pseudobulk"]["units"] == "counts" and "total_counts" in t.adata.obs
    assert int(t.adata.obs["n_cells"].sum()) == len(truth.cells) - 2  # two cells sit in the border strips
    edge = truth.cells.iloc[-2:][GENES].sum().to_numpy()
    np.testing.assert_array_equal(t.adata.var["dropped_edge"], edge)
    assert t.meta["pseudobulk"]["counts"]["control_by_feature"] == {}  # the reader kept genes only
    with_filters = tile_slide(s, {**SPEC, "aggregate": "cells", "variance_min": None, "min_counts": None})
    assert set(with_filters.meta["dropped_spots"]) == {tile_id(WHITE), "r2_c0", tile_id(PART)}


def test_hest_xenium_sample_uses_he_x_he_y(tmp_path):
    truth = write_hest_xenium(tmp_path, "TENX111")
    r = HestReader(tmp_path)
    s = r.read_slide("TENX111")
    assert s.platform == "xenium" and s.mpp == 1.0
    assert s.meta["hest_transcripts"].endswith("transcripts/TENX111_transcripts.parquet")
    assert any(p.name == "TENX111_transcripts.parquet" for p in r.slide_files("TENX111"))
    t = tile_slide(s).validate()  # the card default: 224 px at 0.5 um/px = 112 um = 112 px here
    assert t.meta["pseudobulk"]["side_px"] == HEST_XENIUM_SIDE and t.spot_diameter_um == 112.0
    assert t.genes == sorted(GENES)  # in the order of HEST's bins, whose control features are dropped
    got = frame(t)[GENES]
    pd.testing.assert_frame_equal(got, truth.kept.astype(np.float32).loc[t.spot_ids], check_names=False)
    assert set(t.meta["dropped_spots"]) == set(truth.removed)
    assert t.meta["pseudobulk"]["source"]["columns"] == ["he_x", "he_y"]
    check_conservation(t, len(truth.rows))


def test_bad_inputs_name_file_slide_and_field(xenium, tmp_path):
    root, _, s = xenium
    no_align = type(s)(
        s.name,
        s.patient,
        s.adata,
        s.image,
        s.mpp,
        None,
        "xenium",
        s.source,
        {k: v for k, v in s.meta.items() if k != "um_to_px"},
    )
    with pytest.raises(DataError, match="microns to slide-image pixels") as e:
        tile_slide(no_align, SPEC)
    assert (e.value.field, e.value.slide) == ("um_to_px", "PB1")
    assert e.value.file.endswith("transcripts.parquet")

    bad = tmp_path / "PB1"
    bad.mkdir()
    pd.read_parquet(root / "PB1" / "transcripts.parquet").drop(columns=["y_location"]).to_parquet(
        bad / "transcripts.parquet"
    )
    moved = type(s)(
        s.name,
        s.patient,
        s.adata,
        s.image,
        s.mpp,
        None,
        "xenium",
        s.source,
        {**s.meta, "transcripts_file": str(bad / "transcripts.parquet")},
    )
    with pytest.raises(DataError, match="lack column") as e:
        tile_slide(moved, SPEC)
    assert (e.value.field, e.value.slide, e.value.file) == (
        "y_location",
        "PB1",
        str(bad / "transcripts.parquet"),
    )

    hest = tmp_path / "hest"
    write_hest_xenium(hest, "TENX148")
    tfile = hest / "transcripts" / "TENX148_transcripts.parquet"
    pd.read_parquet(tfile).drop(columns=["he_x"]).to_parquet(tfile)
    with pytest.raises(DataError) as e:
        tile_slide(HestReader(hest).read_slide("TENX148"))
    assert (e.value.field, e.value.slide, e.value.file) == ("he_x", "TENX148", str(tfile))

    with pytest.raises(DataError) as e:
        TilingSpec.from_options({"tile_size": 3})
    assert e.value.field == "tile_size"
    with pytest.raises(DataError) as e:
        TilingSpec(aggregate="spots")
    assert e.value.field == "aggregate"
    no_image = type(s)(s.name, s.patient, s.adata, None, s.mpp, None, "xenium", s.source, s.meta)
    with pytest.raises(DataError) as e:
        tile_slide(no_image, SPEC)
    assert (e.value.field, e.value.slide) == ("image", "PB1")
    with pytest.raises(DataError, match="passes the filters") as e:
        tile_slide(s, {**SPEC, "min_counts": 10_000})
    assert e.value.field == "pseudobulk"


def test_grid_rule_and_region_reads(xenium):
    """A point belongs to column floor((x + 0.5) / side); region reads equal slices of the image."""
    _, _, s = xenium
    g = TileGrid.for_image((215, 170), 40.0)
    row, col, inside = g.locate(
        np.array([[-0.5, 0.0], [39.49, 39.5], [199.4, 159.4], [199.5, 0.0], [np.nan, 1]])
    )
    assert inside.tolist() == [True, True, True, False, False]
    assert (row[:3].tolist(), col[:3].tolist()) == ([0, 1, 3], [0, 0, 4])
    full = s.image.read()
    with RegionReader(s.image) as rr:
        assert rr.levels == [(215, 170), (108, 85)]
        np.testing.assert_array_equal(rr.read(0, 30, 20, 90, 61), full[20:61, 30:90])
        np.testing.assert_array_equal(rr.read(1, 0, 0, 10, 10), full[::2, ::2][:10, :10])
        assert rr.read(0, 200, 160, 400, 400).shape == (10, 15, 3)  # clipped to the image


def test_dataset_tiles_on_load_caches_and_overrides(xenium, tmp_path, monkeypatch):
    root, truth, _ = xenium
    card = DatasetCard(
        name="xenium-tiles-test",
        title="test",
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
        reader_options={"tiling": SPEC},
    )
    monkeypatch.setitem(CATALOG, card.name, card)
    assert resolve_tiling(card) == TilingSpec.from_options(SPEC)
    manifest = prepare(card.name, tmp_path, root)
    assert manifest["slides"]["PB1"]["spots"] == 13 and manifest["slides"]["PB1"]["dropped"] == 5
    assert any(k.endswith("transcripts.parquet") for k in manifest["slides"]["PB1"]["files"])
    ds = Dataset.open(card.name, tmp_path)
    path = ds.slide_cache_path("PB1")
    assert path.exists()  # written by prepare
    t = ds.load_slide("PB1")  # from the cache
    assert t.platform == "xenium-pseudobulk" and t.spot_diameter_um == 10.0
    pd.testing.assert_frame_equal(frame(t), truth.kept.astype(np.float32).loc[t.spot_ids], check_names=False)
    assert (
        t.meta["pseudobulk"]["tiles"]["kept"] == 13 and t.adata.var["dropped_edge"].sum() == truth.edge.sum()
    )
    cells = Dataset.open(card.name, tmp_path, tiling=False)
    assert cells.slide_cache_path("PB1") != path and cells.load_slide("PB1").platform == "xenium"
    bigger = Dataset.open(card.name, tmp_path, tiling={"tile_px": 40, "tissue_min": None})
    assert bigger.tiling.tile_px == 40 and bigger.tiling.qc_min_px == 16  # merged over the card's
    assert bigger.load_slide("PB1").meta["pseudobulk"]["grid"]["n_cols"] == 2


def test_catalog_cards_declare_diffbulk_tiles():
    for name, agg in (
        ("hest-bowel", "transcripts"),
        ("hest-pancreas", "transcripts"),
        ("crunchdao-bowel", "cells"),
    ):
        spec = resolve_tiling(CATALOG[name])
        assert (spec.tile_px, spec.tile_mpp, spec.tile_um, spec.aggregate) == (224, 0.5, 112.0, agg)
    assert CATALOG["crunchdao-bowel"].reader == "crunchdao"
    assert resolve_tiling(CATALOG["her2st"]) is None
    assert resolve_tiling(CATALOG["hest-bowel"], {"tile_um": 55}).tile_um == pytest.approx(55.0)
    assert resolve_tiling(CATALOG["hest-bowel"], None) is None


def test_hest_bowel_card_end_to_end(tmp_path):
    src = tmp_path / "hest"
    truth = write_hest_xenium(src, "TENX111")
    prepare("hest-bowel", tmp_path / "root", src)
    t = Dataset.open("hest-bowel", tmp_path / "root").load_slide("TENX111")
    pd.testing.assert_frame_equal(
        frame(t)[GENES], truth.kept.astype(np.float32).loc[t.spot_ids], check_names=False
    )
    assert t.meta["pseudobulk"]["spec"]["aggregate"] == "transcripts"


def test_patch_store_cuts_exactly_the_tiles(xenium, tmp_path):
    """With the default crop (the spot diameter = tile side) a patch is the tile's pixels."""
    from stbench.data.patches import PatchSpec, PatchStore

    _, _, s = xenium
    t = tile_slide(s, SPEC)
    store = PatchStore(tmp_path, PatchSpec(out_px=SIDE)).build(t)
    img = t.image.read()
    for i, (r, c) in enumerate(t.adata.obs[["array_row", "array_col"]].to_numpy()):
        np.testing.assert_array_equal(store[i], img[r * SIDE : (r + 1) * SIDE, c * SIDE : (c + 1) * SIDE])
    assert not store.at_edge.any()
