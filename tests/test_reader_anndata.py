"""Bring-your-own AnnData reader (slides.csv + h5ad files)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from stbench.data.readers import get_reader
from stbench.data.readers.anndata_reader import AnnDataReader
from stbench.errors import DataError
from tests.fixtures._spot_images import colours_at
from tests.fixtures.anndata_layout import write_anndata


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("anndata")
    return root, write_anndata(root)


def test_registered_and_lists_slides(dataset):
    root, _ = dataset
    assert get_reader("anndata") is AnnDataReader
    assert AnnDataReader(root).list_slides() == ["normal_c", "tumour_a", "tumour_b"]


@pytest.mark.parametrize("slide", ["tumour_a", "tumour_b"])
def test_slides_with_images(dataset, slide):
    root, truth = dataset
    s = (
        AnnDataReader(root, counts_layer="counts" if slide == "tumour_b" else None)
        .read_slide(slide)
        .validate()
    )
    assert (s.n_spots, s.n_genes) == (24, 8)
    got = pd.DataFrame(s.counts(), index=s.spot_ids, columns=s.genes)
    pd.testing.assert_frame_equal(got, truth.counts[slide], check_names=False)
    np.testing.assert_allclose(s.coords, truth.pixel_xy[slide])
    assert colours_at(s.image.read(), s.coords) == [truth.colour[slide][i] for i in s.spot_ids]
    assert s.mpp == 0.5 and s.patient == "P1"
    assert (s.spot_diameter_um, s.platform) == ((55.0, "visium") if slide == "tumour_a" else (None, "other"))
    assert "region" in s.adata.obs.columns


def test_minimal_row_defaults(dataset):
    root, truth = dataset
    s = AnnDataReader(root).read_slide("normal_c").validate()
    assert s.image is None and s.mpp is None and s.spot_diameter_um is None
    assert s.patient == "normal_c" and s.platform == "other"
    np.testing.assert_array_equal(s.counts(), truth.counts["normal_c"].to_numpy())


def test_normalised_x_is_refused_without_the_layer(dataset):
    root, _ = dataset
    with pytest.raises(DataError, match="whole numbers") as e:
        AnnDataReader(root).read_slide("tumour_b")
    assert e.value.slide == "tumour_b" and e.value.field == "X" and e.value.file.endswith("tumour_b.h5ad")
    assert "counts: normalized" in e.value.problem and "log scale" in e.value.problem
    # allow_non_integer admits fractional counts, never values that look log-normalised (issue 14)
    with pytest.raises(DataError, match="look already normalised") as e:
        AnnDataReader(root, allow_non_integer=True).read_slide("tumour_b")
    assert e.value.file.endswith("tumour_b.h5ad") and e.value.field == "X"
    s = AnnDataReader(root, counts="normalized").read_slide("tumour_b")
    assert not np.allclose(s.counts(), np.round(s.counts()))


def _one_slide(root, x: np.ndarray) -> None:
    """slides.csv + one h5ad whose X is `x` (spots on a line)."""
    n = x.shape[0]
    a = ad.AnnData(X=x.astype(np.float32), obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]))
    a.var_names = [f"G{j}" for j in range(x.shape[1])]
    a.obsm["spatial"] = np.stack([np.arange(n) * 50.0, np.zeros(n)], axis=1)
    a.write_h5ad(root / "one.h5ad")
    pd.DataFrame([{"slide": "one", "h5ad": "one.h5ad"}]).to_csv(root / "slides.csv", index=False)


def test_constant_library_size_is_refused_and_fractional_counts_pass(tmp_path) -> None:
    rng = np.random.default_rng(3)
    raw = rng.poisson(40.0, size=(30, 6)).astype(np.float64) + 1
    _one_slide(tmp_path, raw / raw.sum(1, keepdims=True) * 1e4)  # normalize_total, no log: max > 30
    with pytest.raises(DataError, match="every spot sums to 10000") as e:
        AnnDataReader(tmp_path, allow_non_integer=True).read_slide("one")
    assert "counts: normalized" in str(e.value) and e.value.file.endswith("one.h5ad")
    _one_slide(tmp_path, raw + 0.25)  # fractional counts (ambient-corrected): large, varying totals
    with pytest.raises(DataError, match="not whole numbers"):
        AnnDataReader(tmp_path).read_slide("one")
    s = AnnDataReader(tmp_path, allow_non_integer=True).read_slide("one")
    np.testing.assert_allclose(s.counts(), raw + 0.25, rtol=1e-6)
    _one_slide(tmp_path, raw)  # whole numbers: always read
    np.testing.assert_array_equal(AnnDataReader(tmp_path).read_slide("one").counts(), raw)


def test_missing_column_missing_file_and_unknown_slide(tmp_path):
    write_anndata(tmp_path)
    table = tmp_path / "slides.csv"
    df = pd.read_csv(table, dtype=str, keep_default_na=False)
    df.drop(columns=["h5ad"]).to_csv(table, index=False)
    with pytest.raises(DataError) as e:
        AnnDataReader(tmp_path).list_slides()
    assert e.value.field == "h5ad" and e.value.file == str(table)
    df.to_csv(table, index=False)
    (tmp_path / "h5ad" / "tumour_a.h5ad").unlink()
    problems = {
        p.slide: p for p in AnnDataReader(tmp_path, counts_layer=None).check(["tumour_a", "normal_c"])
    }
    assert list(problems) == ["tumour_a"] and problems["tumour_a"].field == "h5ad"
    with pytest.raises(DataError, match="not listed") as e:
        AnnDataReader(tmp_path).read_slide("nope")
    assert e.value.slide == "nope"


def test_bad_mpp_platform_and_missing_spatial(tmp_path):
    write_anndata(tmp_path)
    table = tmp_path / "slides.csv"
    df = pd.read_csv(table, dtype=str, keep_default_na=False)
    df.loc[df["slide"] == "tumour_a", "mpp"] = "-1"
    df.loc[df["slide"] == "normal_c", "platform"] = "visium-sd"
    df.to_csv(table, index=False)
    h5 = tmp_path / "h5ad" / "tumour_b.h5ad"
    a = ad.read_h5ad(h5)
    del a.obsm["spatial"]
    a.write_h5ad(h5)
    problems = {p.slide: p for p in AnnDataReader(tmp_path, counts_layer={"tumour_b": "counts"}).check()}
    assert problems["tumour_a"].field == "mpp" and problems["tumour_a"].file == str(table)
    assert problems["normal_c"].field == "platform"
    assert problems["tumour_b"].field == "obsm/spatial" and problems["tumour_b"].file == str(h5)


def test_duplicate_slide_ids(tmp_path):
    write_anndata(tmp_path)
    table = tmp_path / "slides.csv"
    df = pd.read_csv(table, dtype=str, keep_default_na=False)
    pd.concat([df, df.iloc[:1]]).to_csv(table, index=False)
    with pytest.raises(DataError, match="duplicate slide ids") as e:
        AnnDataReader(tmp_path).list_slides()
    assert e.value.field == "slide"
