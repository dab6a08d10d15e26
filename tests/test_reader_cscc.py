"""cSCC (GSE144240) reader on a generated folder in the GEO layout."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pandas as pd
import pytest

from stbench.data.readers import get_reader
from stbench.data.readers.cscc import CsccReader, split_gene_name
from stbench.errors import DataError
from tests.fixtures._spot_images import colours_at
from tests.fixtures.cscc_layout import PIXELS_PER_STEP, write_cscc

SLIDES = ["P2_ST_rep1", "P2_ST_rep2", "P10_ST_rep1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cscc")
    return root, write_cscc(root)


def test_registered_and_lists_slides_in_natural_order(dataset):
    root, _ = dataset
    assert get_reader("cscc") is CsccReader
    assert CsccReader(root).list_slides() == SLIDES


@pytest.mark.parametrize("slide", SLIDES)
def test_reads_counts_coords_scale_and_patient(dataset, slide):
    root, truth = dataset
    s = CsccReader(root).read_slide(slide).validate()
    want = truth.counts[slide]
    assert s.n_spots == 37  # 40 spots, 3 not selected; counts-only / selection-only spots dropped
    assert s.genes == [f"GENE{i}" for i in range(11)]  # duplicated GENE0 column summed, not renamed
    got = pd.DataFrame(s.counts(), index=s.spot_ids, columns=s.genes)
    pd.testing.assert_frame_equal(got, want.loc[s.spot_ids, s.genes].astype(np.float32), check_names=False)
    np.testing.assert_allclose(s.coords, truth.pixel_xy[slide].loc[s.spot_ids].to_numpy())
    assert colours_at(s.image.read(), s.coords) == [truth.colour[slide][i] for i in s.spot_ids]
    assert s.mpp == pytest.approx(110.0 / PIXELS_PER_STEP, rel=0.01)
    assert s.spot_diameter_um == 150.0
    assert s.patient == slide.split("_")[0]
    assert s.platform == "st"
    assert set(s.adata.obs["slide"]) == {slide}


def test_ensembl_symbol_columns_are_split(dataset):
    root, _ = dataset
    s = CsccReader(root).read_slide("P2_ST_rep1")  # written with "ENSG..._SYMBOL" headers
    assert s.adata.var.loc["GENE3", "gene_id"] == "ENSG00000010003"
    assert split_gene_name("ENSG00000141510_TP53") == ("TP53", "ENSG00000141510")
    assert split_gene_name("TP53_ENSG00000141510.4") == ("TP53", "ENSG00000141510.4")
    assert split_gene_name("ENSG00000141510") == ("ENSG00000141510", "ENSG00000141510")
    assert split_gene_name("HLA-A") == ("HLA-A", "")


def test_options_override_geometry(dataset):
    root, _ = dataset
    s = CsccReader(root, spot_spacing_um=150.0, spot_diameter_um=110.0).read_slide("P2_ST_rep2")
    assert s.mpp == pytest.approx(150.0 / PIXELS_PER_STEP, rel=0.01)
    assert s.spot_diameter_um == 110.0


def test_missing_spot_file_names_slide_and_field(tmp_path):
    write_cscc(tmp_path, slides=("P5_ST_rep1",))
    next(tmp_path.glob("*spot_data-selection*")).unlink()
    with pytest.raises(DataError) as e:
        CsccReader(tmp_path).read_slide("P5_ST_rep1")
    assert e.value.slide == "P5_ST_rep1" and e.value.field == "spot_data-selection"


def test_missing_pixel_column_names_file_and_field(tmp_path):
    write_cscc(tmp_path, slides=("P5_ST_rep1",))
    spot = next(tmp_path.glob("*spot_data-selection*"))
    pd.read_csv(spot, sep="\t").drop(columns=["pixel_y"]).to_csv(spot, sep="\t", index=False)
    problems = CsccReader(tmp_path).check()
    assert len(problems) == 1
    assert problems[0].field == "pixel_y" and problems[0].file == str(spot)


def test_gzipped_image_asks_to_decompress(tmp_path):
    write_cscc(tmp_path, slides=("P9_ST_rep3",))
    jpg = next(tmp_path.glob("*.jpg"))
    with open(jpg, "rb") as src, gzip.open(str(jpg) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    jpg.unlink()
    with pytest.raises(DataError, match="gunzip") as e:
        CsccReader(tmp_path).read_slide("P9_ST_rep3")
    assert e.value.field == "image"


def test_slide_tokens_do_not_collide(tmp_path):
    write_cscc(tmp_path, slides=("P1_ST_rep1", "P10_ST_rep1"))
    r = CsccReader(tmp_path)
    assert r.counts_file("P1_ST_rep1").name.endswith("_P1_ST_rep1_stdata.tsv.gz")
    assert r.read_slide("P1_ST_rep1").patient == "P1"


def test_duplicate_genes_summed_on_the_pandas_fallback_too(tmp_path):
    from stbench.data.readers.cscc import read_st_counts

    path = tmp_path / "GSM1_P2_ST_rep1_stdata.tsv"
    path.write_text("\tA\tB\tA\n1x1\t1.0\t2\t3\n2x1\t0\t1\t4.0\n")  # decimals: not the fast path
    df, ids = read_st_counts(path, "P2_ST_rep1")
    assert list(df.columns) == ["A", "B"] and ids == {}
    assert df.loc["1x1"].tolist() == [4.0, 2.0] and df.loc["2x1"].tolist() == [4.0, 1.0]
