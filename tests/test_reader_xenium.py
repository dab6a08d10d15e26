"""Xenium reader: generated outputs (with and without H&E) and the real crop in ../shared/data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stbench.data.readers import get_reader
from stbench.data.readers.xenium import CONTROL_PREFIXES, XeniumReader, apply_affine, read_transcripts
from stbench.errors import DataError
from tests.conftest import XENIUM_CROP
from tests.fixtures._spot_images import colours_at
from tests.fixtures.xenium_layout import GENES, HE_MPP, PIXEL_SIZE, write_xenium

REAL = XENIUM_CROP


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("xenium")
    return root, write_xenium(root)


def test_registered_and_lists_outputs(dataset):
    root, _ = dataset
    assert get_reader("xenium") is XeniumReader
    assert XeniumReader(root).list_slides() == ["XR1", "XR2"]
    assert XeniumReader(root / "XR2").list_slides() == ["XR2"]  # a single output folder


def test_cells_on_the_he_through_the_alignment(dataset):
    root, truth = dataset
    s = XeniumReader(root).read_slide("XR1").validate()
    assert s.n_spots == 20 and s.genes == GENES  # 4 control features dropped
    got = pd.DataFrame(s.counts(), index=s.spot_ids, columns=s.genes)
    pd.testing.assert_frame_equal(got, truth.counts["XR1"].astype(np.float32), check_names=False)
    np.testing.assert_allclose(s.coords, truth.image_xy["XR1"], atol=1e-6)
    assert s.image.path.name == "XR1_he_image.ome.tif"
    assert colours_at(s.image.read(), s.coords) == [truth.colour["XR1"][c] for c in s.spot_ids]
    assert s.mpp == pytest.approx(HE_MPP)  # measured from the alignment's scale
    assert s.spot_diameter_um is None and s.platform == "xenium" and s.patient == "pt1"
    assert s.meta["coordinate_system"] == "he"
    np.testing.assert_allclose(
        apply_affine(np.array(s.meta["um_to_px"]), truth.um_xy["XR1"]), truth.image_xy["XR1"], atol=1e-6
    )
    assert XeniumReader(root, he_mpp={"XR1": 0.5}).read_slide("XR1").mpp == 0.5


def test_without_he_the_dapi_is_the_image(dataset):
    root, truth = dataset
    s = XeniumReader(root).read_slide("XR2").validate()  # XOA 1.0 style: int ids, csv.gz
    assert s.spot_ids == [str(i) for i in range(1, 21)] and s.patient == "XR2"
    np.testing.assert_array_equal(s.counts(), truth.counts["XR2"].to_numpy(np.float32))
    np.testing.assert_allclose(s.coords, truth.um_xy["XR2"] / PIXEL_SIZE, atol=1e-6)
    assert s.image.path.name == "morphology_focus.ome.tif" and s.mpp == PIXEL_SIZE
    dapi = s.image.read()[..., 0]
    assert (dapi[np.round(s.coords[:, 1]).astype(int), np.round(s.coords[:, 0]).astype(int)] == 4000).all()
    s1 = XeniumReader(root, use_he=False).read_slide("XR1").validate()  # ignore the H&E
    assert s1.image.path.name == "morphology_focus.ome.tif" and s1.meta["coordinate_system"] == "morphology"
    xy = np.round(s1.coords).astype(int)
    assert (s1.image.read()[xy[:, 1], xy[:, 0], 0] == 4000).all()


@pytest.mark.parametrize("slide", ["XR1", "XR2"])
def test_read_transcripts_matches_the_matrix(dataset, slide):
    root, truth = dataset
    tx = read_transcripts(root / slide)
    assert list(tx.columns) == ["feature_name", "x_um", "y_um", "cell_id", "qv", "overlaps_nucleus"]
    assert len(tx) == truth.n_kept_transcripts[slide] < truth.n_transcripts[slide]
    assert not tx["feature_name"].str.startswith(CONTROL_PREFIXES).any() and (tx["qv"] >= 20).all()
    assert tx["overlaps_nucleus"].dtype == bool
    assert (tx["cell_id"] == "UNASSIGNED").sum() == 5  # "UNASSIGNED" (XR1) and -1 (XR2) alike
    per_cell = pd.crosstab(tx["cell_id"], tx["feature_name"]).drop(index="UNASSIGNED")
    want = truth.counts[slide]
    pd.testing.assert_frame_equal(
        per_cell.reindex(index=want.index, columns=GENES, fill_value=0),
        want,
        check_names=False,
        check_dtype=False,
    )
    assert len(read_transcripts(root / slide, qv_min=0)) == len(tx) + 2 * 20  # low-qv rows come back


def test_he_without_alignment_is_an_error(tmp_path):
    write_xenium(tmp_path)
    (tmp_path / "XR1" / "XR1_he_imagealignment.csv").unlink()
    with pytest.raises(DataError, match="alignment") as e:
        XeniumReader(tmp_path).read_slide("XR1")
    assert e.value.slide == "XR1" and e.value.field == "alignment"


def test_bad_alignment_cells_and_ambiguous_images_are_reported(tmp_path):
    write_xenium(tmp_path)
    (tmp_path / "XR1" / "XR1_he_imagealignment.csv").write_text("1,0,0\n0,1,0\n")
    cfile = tmp_path / "XR2" / "cells.csv.gz"
    pd.read_csv(cfile).drop(columns=["y_centroid"]).to_csv(cfile, index=False)
    problems = {p.slide: p for p in XeniumReader(tmp_path).check()}
    assert problems["XR1"].field == "alignment" and problems["XR1"].file.endswith("imagealignment.csv")
    assert problems["XR2"].field == "y_centroid" and problems["XR2"].file == str(cfile)
    (tmp_path / "XR1" / "other.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="he_image") as e:
        XeniumReader(tmp_path).read_slide("XR1")
    assert e.value.field == "he_image"


def test_matrix_cell_missing_from_cells_table(tmp_path):
    write_xenium(tmp_path)
    cfile = tmp_path / "XR1" / "cells.parquet"
    pd.read_parquet(cfile).iloc[1:].to_parquet(cfile, index=False)
    with pytest.raises(DataError, match="missing from the cells table") as e:
        XeniumReader(tmp_path).read_slide("XR1")
    assert e.value.field == "cell_id" and e.value.file == str(cfile)
    with pytest.raises(DataError) as e:
        read_transcripts(tmp_path / "nowhere")
    assert e.value.field == "transcripts"


# ---- the real 10x Xenium crop -----------------------------------------------------------------
real = pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/xenium-crop is absent")


@pytest.mark.real_data
@real
def test_real_crop_cells_genes_and_totals():
    r = XeniumReader(REAL)
    assert r.list_slides() == ["xenium-crop"]
    s = r.read_slide("xenium-crop")
    # The matrix has 30 features: 27 "Gene Expression" + NegControlProbe_00003, BLANK_0070,
    # BLANK_0464; the reader keeps the 27 genes.
    assert s.n_spots == 526 and s.n_genes == 27
    assert not any(g.startswith(CONTROL_PREFIXES) for g in s.genes)
    x = s.counts()
    assert x.sum() == 45_726
    # cells.parquet's transcript_counts is exactly the per-cell sum over the 27 genes
    np.testing.assert_array_equal(x.sum(axis=1), s.adata.obs["transcript_counts"].to_numpy())
    assert s.mpp == 0.2125 and s.image.path.name == "morphology_focus.ome.tif"
    np.testing.assert_allclose(s.coords, s.adata.obs[["x_um", "y_um"]].to_numpy() / 0.2125)
    s.validate(check_image_bounds=False)


@pytest.mark.real_data
@real
def test_real_crop_transcripts_are_a_subsample_of_the_matrix():
    raw = pd.read_parquet(REAL / "transcripts.parquet")
    assert len(raw) == 5_260 and raw["feature_name"].nunique() == 30
    tx = read_transcripts(REAL)
    # every qv is >= 20 here, so only the 3 control rows go; 27 genes remain
    assert len(tx) == 5_257 and tx["feature_name"].nunique() == 27
    assert (tx["cell_id"] == "UNASSIGNED").sum() == 9
    # The crop's transcript table is a subsample (5,248 assigned gene transcripts vs 45,726
    # matrix counts), so per-cell counts never equal the matrix; they must never exceed it.
    # 19 of them belong to 3 cells that the crop's cell table and matrix do not contain.
    s = XeniumReader(REAL).read_slide("xenium-crop")
    assigned = tx[tx["cell_id"] != "UNASSIGNED"]
    assert len(assigned) == 5_248
    outside = assigned[~assigned["cell_id"].isin(s.spot_ids)]
    assert len(outside) == 19 and outside["cell_id"].nunique() == 3
    per_cell = pd.crosstab(assigned["cell_id"], assigned["feature_name"])
    per_cell = per_cell.reindex(index=s.spot_ids, columns=s.genes, fill_value=0).to_numpy()
    assert per_cell.sum() == 5_229
    assert (per_cell <= s.counts()).all()
    assert (per_cell.sum(axis=1) < s.counts().sum(axis=1)).all()


@pytest.mark.real_data
@real
def test_real_crop_image_needs_its_crop_geometry():
    """The crop's DAPI is 237 x 237 px although its OME header says 0.2125 um/px: it is the
    8x-downsampled (1.7 um/px) cut starting near (1000, 1000) um, while cells sit at 995-1405 um.
    With real-output defaults the cells fall outside the image and validate() says so; with the
    crop geometry as options, nuclei (bright DAPI) sit under the cell centroids."""
    with pytest.raises(DataError, match="outside the 237x237 image") as e:
        XeniumReader(REAL).read_slide("xenium-crop").validate()
    assert e.value.field == "obsm/spatial" and e.value.file.endswith("morphology_focus.ome.tif")

    def contrast(origin):
        s = XeniumReader(REAL, morphology_mpp=1.7, morphology_origin_um=origin).read_slide("xenium-crop")
        img = s.image.read()[..., 0].astype(float)
        xy = np.round(s.coords).astype(int)
        inside = (xy >= 0).all(axis=1) & (xy[:, 0] < 237) & (xy[:, 1] < 237)
        return img[xy[inside, 1], xy[inside, 0]].mean() / img.mean(), int(inside.sum())

    aligned, n_inside = contrast((1000.0, 1000.0))
    shifted, _ = contrast((1020.0, 1020.0))
    assert n_inside == 512  # 14 cells have centroids just outside the cut
    assert aligned > 1.5 and shifted < 1.2


def test_read_transcripts_decodes_old_binary_names_and_integer_cells(tmp_path):
    """XOA 1.x parquet stores feature_name as binary and cell_id as int (-1 = no cell)."""
    pd.DataFrame(
        {
            "transcript_id": [1, 2, 3, 4],
            "cell_id": [7, -1, 7, 8],
            "overlaps_nucleus": [1, 0, 0, 1],
            "feature_name": [b"CD3E", b"CD3E", b"BLANK_0001", b"KRT5"],
            "x_location": [1.0, 2.0, 3.0, 4.0],
            "y_location": [5.0, 6.0, 7.0, 8.0],
            "z_location": 0.0,
            "qv": [30.0, 40.0, 40.0, 10.0],
        }
    ).to_parquet(tmp_path / "transcripts.parquet")
    tx = read_transcripts(tmp_path)
    assert tx["feature_name"].tolist() == ["CD3E", "CD3E"]
    assert tx["cell_id"].tolist() == ["7", "UNASSIGNED"]
    assert tx["overlaps_nucleus"].tolist() == [True, False]
    assert read_transcripts(tmp_path, qv_min=0)["feature_name"].tolist() == ["CD3E", "CD3E", "KRT5"]
