"""Visium (Space Ranger outs) reader on generated outs folders, old and new position files."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

from stbench.data.readers import get_reader
from stbench.data.readers.visium import VisiumReader, make_unique
from stbench.errors import DataError
from tests.fixtures._spot_images import colours_at
from tests.fixtures.visium_layout import SPOT_DIAMETER_FULLRES, write_visium


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("visium")
    return root, write_visium(root, n_slides=3)


def test_registered_and_lists_slides(dataset):
    root, _ = dataset
    assert get_reader("visium") is VisiumReader
    assert VisiumReader(root).list_slides() == ["S1", "S2", "S3"]


@pytest.mark.parametrize("slide", ["S1", "S2", "S3"])
def test_reads_counts_coords_scale_and_patient(dataset, slide):
    root, truth = dataset
    s = VisiumReader(root).read_slide(slide).validate()
    want = truth.counts[slide]
    assert s.n_spots == 30  # the 6 out-of-tissue positions are not in the filtered matrix
    assert s.genes == truth.genes  # antibody capture dropped, repeated symbol made unique
    assert list(s.adata.var["gene_id"][:2]) == ["ENSG00000000000", "ENSG00000000001"]
    got = pd.DataFrame(s.counts(), index=s.spot_ids, columns=s.genes)
    pd.testing.assert_frame_equal(got, want.astype(np.float32), check_names=False)
    # x is the column, y the row: a swap would put the spots off their dots
    np.testing.assert_allclose(s.coords, truth.pixel_xy[slide].loc[s.spot_ids, ["x", "y"]].to_numpy())
    assert colours_at(s.image.read(), s.coords) == [truth.colour[slide][b] for b in s.spot_ids]
    assert s.image.path.parent.name == slide and "lowres" not in s.image.path.name
    assert s.mpp == pytest.approx(55.0 / SPOT_DIAMETER_FULLRES)
    assert s.spot_diameter_um == 55.0 and s.platform == "visium"
    assert s.patient == truth.patients[slide]
    assert set(s.adata.obs["in_tissue"]) == {1}


def test_patients_default_to_slide_without_csv(tmp_path):
    write_visium(tmp_path, n_slides=1)
    (tmp_path / "patients.csv").unlink()
    assert VisiumReader(tmp_path).read_slide("S1").patient == "S1"


def test_single_outs_folder_and_image_option(tmp_path):
    write_visium(tmp_path, n_slides=1)
    r = VisiumReader(tmp_path / "S1" / "outs", images={"S1": str(tmp_path / "S1" / "image.tif")})
    assert r.list_slides() == ["S1"]
    s = r.read_slide("S1")
    assert s.n_spots == 30 and s.image.path.name == "image.tif"


def test_make_unique_matches_anndata_rule():
    from anndata.utils import make_index_unique

    for names in (["A", "B", "A", "A", "A-1"], ["A", "A", "B"], ["X", "X-1", "X", "X-2", "X"]):
        with warnings.catch_warnings():  # anndata warns about "-1"-like collisions
            warnings.simplefilter("ignore", UserWarning)
            expected = list(make_index_unique(pd.Index(names)))
        assert make_unique(names) == expected
    assert make_unique(["A", "B", "A", "A", "A-1"]) == ["A", "B", "A-2", "A-3", "A-1"]


def test_missing_positions_file_names_slide_and_field(tmp_path):
    write_visium(tmp_path, n_slides=1)
    (tmp_path / "S1" / "outs" / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(DataError) as e:
        VisiumReader(tmp_path).read_slide("S1")
    assert e.value.slide == "S1" and "tissue_positions" in e.value.field
    assert "tissue_positions" in e.value.file


def test_barcode_without_position_is_reported(tmp_path):
    write_visium(tmp_path, n_slides=1)
    pfile = tmp_path / "S1" / "outs" / "spatial" / "tissue_positions.csv"
    pos = pd.read_csv(pfile)
    pos[pos["in_tissue"] == 1].iloc[1:].to_csv(pfile, index=False)
    with pytest.raises(DataError, match="no position") as e:
        VisiumReader(tmp_path).read_slide("S1")
    assert e.value.field == "barcode" and e.value.file == str(pfile)


def test_missing_position_column_and_bad_scalefactors(tmp_path):
    write_visium(tmp_path, n_slides=2)
    pfile = tmp_path / "S1" / "outs" / "spatial" / "tissue_positions.csv"
    pd.read_csv(pfile).drop(columns=["pxl_col_in_fullres"]).to_csv(pfile, index=False)
    sfile = tmp_path / "S2" / "outs" / "spatial" / "scalefactors_json.json"
    sfile.write_text(json.dumps({"tissue_hires_scalef": 0.5}))
    problems = {p.slide: p for p in VisiumReader(tmp_path).check()}
    assert problems["S1"].field == "pxl_col_in_fullres"
    assert problems["S2"].field == "spot_diameter_fullres" and problems["S2"].file == str(sfile)


def test_missing_matrix_is_not_a_slide_and_empty_root_errors(tmp_path):
    write_visium(tmp_path, n_slides=2)
    (tmp_path / "S2" / "outs" / "filtered_feature_bc_matrix.h5").unlink()
    assert VisiumReader(tmp_path).list_slides() == ["S1"]
    shutil.rmtree(tmp_path / "S1")
    with pytest.raises(DataError) as e:
        VisiumReader(tmp_path).list_slides()
    assert e.value.field == "root"
