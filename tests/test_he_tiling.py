"""H&E-only tiling for TCGA-SKCM: the tile grid, STMDiT's filters keeping / dropping the designed tiles
of a generated whole-slide TIFF (exact ids, centres and counts), statistics equal to those of the patch
store's patches, pseudo-labels as the only expression, and the `he-tiles` reader behind the tcga-skcm card."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stbench.data.catalog import get_card
from stbench.data.he_tiling import he_only_slide, tile_grid, tile_statistics
from stbench.data.image import SlideImage
from stbench.data.patches import PatchSpec, PatchStore
from stbench.data.pseudolabels import PseudoLabels, write_pseudolabels
from stbench.data.readers import get_reader
from stbench.data.readers.he_tiles import HETilesReader
from stbench.data.spot_filters import PASS_COLUMNS, STAT_COLUMNS, STMDIT_FILTERS, spot_filter, spot_statistics
from stbench.errors import DataError
from tests.fixtures.he_tiles_layout import ALL_WHITE, KEPT, MPP, SIZE, TILE_PX, write_he_tiff, write_he_tiles

KEPT_IDS = [f"r{r}_c{c}" for r, c in KEPT]
KEPT_XY = np.array([[(c + 0.5) * TILE_PX - 0.5, (r + 0.5) * TILE_PX - 0.5] for r, c in KEPT])
GENES = ["MLANA", "PMEL", "CD74"]


@pytest.fixture(scope="module")
def tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_he_tiff(tmp_path_factory.mktemp("he") / "slide.tif")


def test_tile_grid_centres() -> None:
    xy = tile_grid(SIZE, 55.0, MPP)  # 256 px tiles on a 1600 x 1080 image: 6 x 4 whole tiles
    assert xy.shape == (24, 2)
    np.testing.assert_array_equal(xy[:7], [[127.5 + 256 * c, 127.5] for c in range(6)] + [[127.5, 383.5]])
    np.testing.assert_array_equal(xy[-1], [5 * 256 + 127.5, 3 * 256 + 127.5])
    side = 10 / 0.3  # non-integer side: 3 whole tiles across 100 px, 1 down 50 px
    np.testing.assert_allclose(
        tile_grid((100, 50), 10, 0.3), [[(c + 0.5) * side - 0.5, side / 2 - 0.5] for c in range(3)]
    )
    assert tile_grid((63, 500), 55.0, 55 / 64).shape == (0, 2)
    with pytest.raises(DataError) as exc:
        tile_grid(SIZE, 55.0, 0.0)
    assert exc.value.field == "mpp"


def test_filters_keep_exactly_the_tissue_tiles(tiff: Path) -> None:
    s = he_only_slide("TCGA-XX-0001-01Z", "TCGA-XX-0001", tiff, MPP)
    assert s.spot_ids == KEPT_IDS
    np.testing.assert_array_equal(s.coords, KEPT_XY)
    assert s.n_genes == 0 and s.adata.X.shape == (12, 0)
    assert (s.mpp, s.spot_diameter_um, s.platform, s.patient) == (MPP, 55.0, "other", "TCGA-XX-0001")
    assert s.image is not None and s.image.path == tiff and s.source == str(tiff)
    obs = s.adata.obs
    assert set(STAT_COLUMNS) | set(PASS_COLUMNS) <= set(obs.columns)
    assert obs[list(PASS_COLUMNS)].to_numpy().all()
    assert (obs["foreground_fraction"] == 1.0).all() and (obs["laplacian_var"] > 1000).all()
    assert obs[["array_row", "array_col"]].to_numpy().tolist() == [list(rc) for rc in KEPT]
    m = s.meta
    assert m["expression"] == "none" and m["measured_expression"] is False
    assert m["spot_filters"] == asdict(STMDIT_FILTERS)
    assert m["spot_filters"]["min_foreground"] == 0.55 and m["spot_filters"]["min_laplacian_var"] == 20.0
    assert m["he_tiles"]["tiles"] == {
        "grid": 24,
        "kept": 12,
        "removed": 12,
        # W x6 + half-glass H; blurred B x4; W x5 measured + grey G (a tile failing two counts twice)
        "removed_by": {"foreground": 7, "blur": 4, "tissue": 6},
        "all_white": 1,
    }
    assert m["he_tiles"]["side_px"] == 256.0 and m["he_tiles"]["grid"]["n_cols"] == 6


def test_skipping_all_white_tiles_changes_no_decision(tiff: Path) -> None:
    full = tile_statistics(SlideImage(tiff), 55.0, MPP, white_gray=None)
    quick = tile_statistics(SlideImage(tiff), 55.0, MPP)
    assert not full["all_white"].any() and quick.index[quick["all_white"]].tolist() == ["r3_c5"]
    assert ALL_WHITE == [(3, 5)] and full.loc["r3_c5", "foreground_fraction"] == 0.0
    assert quick.loc["r3_c5", list(STAT_COLUMNS)].isna().tolist() == [False, True, True]
    measured = ~quick["all_white"]
    pd.testing.assert_frame_equal(quick[measured], full[measured])
    keep_full, _ = spot_filter(full[list(STAT_COLUMNS)])
    keep_quick, _ = spot_filter(quick[list(STAT_COLUMNS)])
    np.testing.assert_array_equal(keep_full, keep_quick)
    assert full.index[keep_full].tolist() == KEPT_IDS


@pytest.mark.parametrize("filter_px", [100, 256])
def test_statistics_equal_the_patch_stores_patches(tiff: Path, tmp_path: Path, filter_px: int) -> None:
    """The filters see exactly the patch a method is later given (same crop, same resampling), also
    when the tile is resampled (256 -> 100 px) and reads neighbouring pixels at its border."""
    s = he_only_slide("S", "P", tiff, MPP, filters=None, filter_px=filter_px)
    assert s.n_spots == 24 and s.meta["spot_filters"] is None and "pass_blur" not in s.adata.obs
    store = PatchStore(tmp_path, PatchSpec(out_px=filter_px), workers=1).build(s)
    expected = spot_statistics(np.asarray(store.patches), index=pd.Index(store.spot_ids))
    np.testing.assert_array_equal(s.adata.obs[list(STAT_COLUMNS)].to_numpy(), expected.to_numpy())


@pytest.fixture(scope="module")
def labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pseudo-labels for the kept tiles of slide S plus one extra tile (as a predictor would write)."""
    ids = [*KEPT_IDS, "r0_c5"]
    values = np.arange(len(ids) * 3, dtype=np.float32).reshape(-1, 3) / 10
    return write_pseudolabels(
        tmp_path_factory.mktemp("pl") / "tcga.h5ad",
        values,
        ["S"] * len(ids),
        ids,
        GENES,
        info={"method": "deepspot", "dataset": "tcga-skcm", "space": "log1p"},
    )


def test_pseudolabels_are_the_only_expression(tiff: Path, labels: Path) -> None:
    pl = PseudoLabels.load(labels)
    s = he_only_slide("S", "P", tiff, MPP, expression=pl)
    assert s.genes == GENES and s.spot_ids == KEPT_IDS
    np.testing.assert_array_equal(s.counts(), np.arange(36, dtype=np.float32).reshape(12, 3) / 10)
    assert s.meta["expression"] == pl.source and pl.source.startswith("pseudolabels:deepspot@")
    assert s.meta["measured_expression"] is False and s.meta["expression_space"] == "log1p"
    assert s.source == str(labels)
    assert s.validate() is s
    sub = he_only_slide("S", "P", tiff, MPP, genes=["CD74", "MLANA"], expression=labels)
    np.testing.assert_array_equal(sub.counts(), s.counts()[:, [2, 0]])


def test_expression_errors_name_file_slide_and_field(tiff: Path, labels: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        he_only_slide("OTHER", "P", tiff, MPP, expression=labels)
    assert (exc.value.file, exc.value.slide, exc.value.field) == (str(labels), "OTHER", "obs/slide")
    with pytest.raises(DataError) as exc:
        he_only_slide("S", "P", tiff, MPP, genes=["MLANA", "SOX10"], expression=labels)
    assert exc.value.field == "var" and "['SOX10']" in exc.value.problem
    partial = write_pseudolabels(
        tmp_path / "partial.h5ad", np.ones((2, 1)), ["S", "S"], KEPT_IDS[:2], ["A"], info={"method": "m"}
    )
    with pytest.raises(DataError) as exc:
        he_only_slide("S", "P", tiff, MPP, expression=partial)
    assert (exc.value.slide, exc.value.field) == ("S", "obs_names") and "10 of 12" in exc.value.problem
    negative = write_pseudolabels(
        tmp_path / "neg.h5ad", -np.ones((12, 1)), ["S"] * 12, KEPT_IDS, ["A"], info={"space": "zscore"}
    )
    with pytest.raises(DataError) as exc:
        he_only_slide("S", "P", tiff, MPP, expression=negative)
    assert exc.value.field == "X" and "12 negative" in exc.value.problem
    with pytest.raises(DataError) as exc:
        he_only_slide("S", "P", tiff, MPP, genes=["A"])
    assert exc.value.field == "genes" and "no measured expression" in exc.value.problem


def test_images_without_usable_tiles_are_refused(tmp_path: Path) -> None:
    import tifffile

    glass = tmp_path / "glass.tif"
    tifffile.imwrite(glass, np.full((600, 600, 3), 245, np.uint8), photometric="rgb")
    with pytest.raises(DataError) as exc:
        he_only_slide("G", "P", glass, MPP)
    assert exc.value.field == "spot_filters" and "4 all white" in exc.value.problem
    with pytest.raises(DataError) as exc:
        he_only_slide("G", "P", glass, 0.05)  # 55 um = 1100 px > 600 px
    assert exc.value.field == "tile_um" and exc.value.file == str(glass)
    deep = tmp_path / "uint16.tif"
    tifffile.imwrite(deep, np.full((300, 300, 3), 4000, np.uint16), photometric="rgb")
    with pytest.raises(DataError) as exc:
        he_only_slide("D", "P", deep, MPP)
    assert exc.value.field == "image" and "8-bit RGB" in exc.value.problem


def test_zero_gene_he_only_slide_validates(tiff: Path) -> None:
    """An H&E-only slide (meta expression "none") has no genes and is valid; any other 0-gene slide is not."""
    slide = he_only_slide("S", "P", tiff, MPP).validate()
    assert slide.adata.n_vars == 0
    slide.meta["expression"] = "measured"
    with pytest.raises(DataError, match="no genes"):
        slide.validate()


# ---- the reader and the card ----------------------------------------------------------------------
def _cohort(root: Path, labels: Path, both: bool = True) -> Path:
    """Two TCGA-like slides; both (or only the first) with pseudo-labels."""
    pl = PseudoLabels.load(labels)
    ids = KEPT_IDS
    for i, name in enumerate(("TCGA-AA-0001-01Z", "TCGA-BB-0002-01Z")):
        if i == 1 and not both:
            continue
        write_pseudolabels(
            root / "pl" / f"{name}.h5ad",
            pl.lookup(["S"] * 12, ids, GENES) + i,
            [name] * 12,
            ids,
            GENES,
            info={"method": "deepspot", "space": "log1p"},
        )
    return write_he_tiles(
        root,
        {
            "TCGA-AA-0001-01Z": {"pseudolabels": "pl/TCGA-AA-0001-01Z.h5ad"},
            "TCGA-BB-0002-01Z": {"pseudolabels": "pl/TCGA-BB-0002-01Z.h5ad" if both else ""},
        },
    )


def test_reader_tiles_each_listed_slide(tmp_path: Path, labels: Path) -> None:
    root = _cohort(tmp_path / "tcga", labels, both=False)
    assert get_reader("he-tiles") is HETilesReader
    reader = HETilesReader(root)
    assert reader.list_slides() == ["TCGA-AA-0001-01Z", "TCGA-BB-0002-01Z"]
    a = reader.read_slide("TCGA-AA-0001-01Z")
    assert a.patient == "TCGA-AA-0001" and a.genes == GENES and a.spot_ids == KEPT_IDS
    assert a.meta["expression"].startswith("pseudolabels:deepspot@") and a.meta["slides_csv"].endswith(
        "slides.csv"
    )
    b = reader.read_slide("TCGA-BB-0002-01Z")
    assert b.n_genes == 0 and b.meta["expression"] == "none" and b.spot_ids == KEPT_IDS
    np.testing.assert_array_equal(b.coords, KEPT_XY)
    assert reader.slide_files("TCGA-AA-0001-01Z") == [
        root / "images" / "TCGA-AA-0001-01Z.tif",
        root / "pl" / "TCGA-AA-0001-01Z.h5ad",
    ]
    assert reader.slide_files("TCGA-BB-0002-01Z") == [root / "images" / "TCGA-BB-0002-01Z.tif"]
    everything = HETilesReader(root, filters=False).read_slide("TCGA-BB-0002-01Z")
    assert everything.n_spots == 24 and everything.meta["spot_filters"] is None
    sharpest = float(np.median(b.adata.obs["laplacian_var"]))  # a stricter blur threshold: half survive
    strict = HETilesReader(root, filters={"min_laplacian_var": sharpest}).read_slide("TCGA-BB-0002-01Z")
    assert strict.spot_ids == b.adata.obs_names[b.adata.obs["laplacian_var"] >= sharpest].tolist()
    assert strict.n_spots == 6 and strict.meta["spot_filters"]["min_laplacian_var"] == sharpest


def test_reader_errors_name_file_slide_and_field(tmp_path: Path, labels: Path) -> None:
    root = _cohort(tmp_path / "tcga", labels, both=False)
    table = pd.read_csv(root / "slides.csv", dtype=str, keep_default_na=False)
    table.loc[1, "mpp"] = "abc"
    table.to_csv(root / "slides.csv", index=False)
    with pytest.raises(DataError) as exc:
        HETilesReader(root).read_slide("TCGA-BB-0002-01Z")
    e = exc.value
    assert (e.file, e.slide, e.field) == (str(root / "slides.csv"), "TCGA-BB-0002-01Z", "mpp")
    with pytest.raises(DataError) as exc:
        HETilesReader(root).read_slide("TCGA-ZZ")
    assert exc.value.field == "slide"
    with pytest.raises(DataError) as exc:
        HETilesReader(root, filters={"min_blur": 3}).read_slide("TCGA-AA-0001-01Z")
    assert exc.value.field == "filters"
    table.drop(columns="patient").to_csv(root / "slides.csv", index=False)
    with pytest.raises(DataError) as exc:
        HETilesReader(root).list_slides()
    assert exc.value.field == "patient"


def test_tcga_skcm_card_prepares_with_pseudolabels(tmp_path: Path, labels: Path) -> None:
    from stbench.data.dataset import Dataset
    from stbench.data.prepare import prepare

    card = get_card("tcga-skcm")
    assert card.reader == "he-tiles" and "slides.csv" in card.how_to_get and "mpp" in card.how_to_get
    src = _cohort(tmp_path / "tcga", labels, both=True)
    manifest = prepare("tcga-skcm", tmp_path / "root", src)
    assert {e["spots"] for e in manifest["slides"].values()} == {12}
    ds = Dataset.open("tcga-skcm", tmp_path / "root")
    s = ds.load_slide("TCGA-BB-0002-01Z")  # from the parsed-slide cache
    assert s.meta["expression"].startswith("pseudolabels:") and s.meta["measured_expression"] is False
    np.testing.assert_allclose(s.counts(), np.arange(36, dtype=np.float32).reshape(12, 3) / 10 + 1)
