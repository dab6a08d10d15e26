"""Leakage closure (issue 14): every input that defines a slide is in its cache key, and a bring-your-own
dataset can declare `counts: normalized` (the protocol's transform is skipped and the row says so)."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from stbench.cli import main
from stbench.data import catalog
from stbench.data.catalog import DatasetCard
from stbench.data.dataset import Dataset
from stbench.data.prepare import prepare
from stbench.data.protocols import get_protocol
from stbench.errors import DataError
from tests.fixtures.anndata_layout import write_anndata
from tests.test_cli_splits import _fold_rows

NAME = "byo-test"


def _card(**kw) -> DatasetCard:
    base = dict(
        name=NAME,
        title="bring-your-own test dataset",
        reader="anndata",
        platform="other",
        tissue="test",
        n_slides=None,
        n_patients=None,
        source_url="local",
        how_to_get="--source DIR",
        access="local",
        licence="test",
        citation="test",
        default_protocol="lopo",
        reader_options={"counts_layer": {"tumour_b": "counts"}},
    )
    return DatasetCard(**{**base, **kw})


@pytest.fixture
def byo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Four slides: tumour_a, tumour_b (P1), tumour_d (P2; tumour_a's files), normal_c (no image)."""
    src = tmp_path / "src"
    src.mkdir()
    write_anndata(src)
    table = src / "slides.csv"
    df = pd.read_csv(table, dtype=str, keep_default_na=False)
    extra = df[df["slide"] == "tumour_a"].assign(slide="tumour_d", patient="P2")
    pd.concat([df, extra]).to_csv(table, index=False)
    monkeypatch.setitem(catalog.CATALOG, NAME, _card())
    root = tmp_path / "root"
    prepare(NAME, root, src)
    return src, root


def _edit(table: Path, slide: str, **values: str) -> None:
    df = pd.read_csv(table, dtype=str, keep_default_na=False)
    for k, v in values.items():
        df.loc[df["slide"] == slide, k] = v
    df.to_csv(table, index=False)


def _lopo_tests(root: Path) -> dict[str, list[str]]:
    ds = Dataset.open(NAME, root)
    folds, _ = get_protocol("lopo").folds(ds.patients, ds.has_image)
    return {f.name: sorted(f.test) for f in folds}


def test_editing_a_patient_in_slides_csv_moves_the_lopo_folds(
    byo: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src, root = byo
    assert main(["splits", NAME, "--protocol", "lopo", "--data-root", str(root)]) == 0
    before = sorted(r[3] for r in _fold_rows(capsys.readouterr().out))
    assert before == ["tumour_a tumour_b", "tumour_d"]
    ds = Dataset.open(NAME, root)
    key_a, key_b = ds.slide_cache_path("tumour_a"), ds.slide_cache_path("tumour_b")
    assert ds.load_slide("tumour_b").patient == "P1"

    _edit(src / "slides.csv", "tumour_b", patient="P2")  # a corrected patient column
    assert main(["splits", NAME, "--protocol", "lopo", "--data-root", str(root)]) == 0
    after = sorted(r[3] for r in _fold_rows(capsys.readouterr().out))
    assert after == ["tumour_a", "tumour_b tumour_d"]
    assert _lopo_tests(root) == {"patient-P1": ["tumour_a"], "patient-P2": ["tumour_b", "tumour_d"]}
    ds = Dataset.open(NAME, root)
    assert ds.patients["tumour_b"] == "P2" and ds.manifest["slides"]["tumour_b"]["record"]["patient"] == "P2"
    assert ds.slide_cache_path("tumour_b") != key_b and ds.load_slide("tumour_b").patient == "P2"
    assert ds.slide_cache_path("tumour_a") == key_a  # an unedited row keeps its parse


def test_every_slides_csv_field_and_file_edit_re_reads_the_slide(byo: tuple[Path, Path]) -> None:
    src, root = byo
    ds = Dataset.open(NAME, root)
    key = ds.slide_cache_path("tumour_a")
    assert ds.load_slide("tumour_a").mpp == 0.5
    _edit(src / "slides.csv", "tumour_a", mpp="0.25")
    ds = Dataset.open(NAME, root)
    assert ds.slide_cache_path("tumour_a") != key
    assert ds.load_slide("tumour_a").mpp == 0.25 and ds.summary_rows()[1]["mpp"] == 0.25

    h5 = src / "h5ad" / "tumour_a.h5ad"  # counts edited in place after prepare
    key = ds.slide_cache_path("tumour_a")
    a = ad.read_h5ad(h5)
    a.X = np.asarray(a.X) + 1
    a.write_h5ad(h5)
    os.utime(h5, ns=(os.stat(h5).st_atime_ns, os.stat(h5).st_mtime_ns + 10**9))
    ds = Dataset.open(NAME, root)
    assert ds.slide_cache_path("tumour_a") != key
    np.testing.assert_array_equal(ds.load_slide("tumour_a").counts(), np.asarray(a.X))
    assert [p.field for p in ds.verify() if p.slide in ("tumour_a", "tumour_d")] == ["sha256", "sha256"]


def test_normalised_values_need_the_declaration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_anndata(src)  # tumour_b's X holds log1p(normalize_total) values
    monkeypatch.setitem(catalog.CATALOG, NAME, _card(reader_options={}))
    with pytest.raises(DataError, match="counts: normalized") as e:
        prepare(NAME, tmp_path / "raw-root", src)
    assert "tumour_b.h5ad" in str(e.value) and "slide=tumour_b" in str(e.value)
    with pytest.raises(ValueError, match="counts must be one of"):
        _card(counts="log")

    monkeypatch.setitem(catalog.CATALOG, NAME, _card(reader_options={}, counts="normalized"))
    root = tmp_path / "root"
    prepare(NAME, root, src)
    ds = Dataset.open(NAME, root)
    assert ds.card.reader_kwargs() == {"counts": "normalized"}
    assert not np.allclose(ds.load_slide("tumour_b").counts(), np.round(ds.load_slide("tumour_b").counts()))
    proto = get_protocol("loso")
    assert proto.target_spec("raw") == {"method": "normalize_log1p", "target_sum": 1e4}
    assert proto.target_spec(ds.card.counts)["method"] == "none"

    from stbench.benchmark.runner import expand_jobs, run_jobs

    jobs = expand_jobs("mean", NAME, protocol="loso", folds=["tumour_b"], data_root=str(root))
    (row,) = run_jobs(jobs, tmp_path / "out")
    assert row["target"] == "none (counts: normalized)"
    # the truth is the declared values themselves, untransformed
    job = tmp_path / "out" / "jobs" / row["job_id"]
    assert row["test_slides"] == ["tumour_b"] and job.exists()


def test_rows_record_the_target_that_ran(byo: tuple[Path, Path], tmp_path: Path) -> None:
    """loso's default is normalize_log1p; raw log1p stays a declared variant (data.target)."""
    from stbench.benchmark.runner import expand_jobs, run_jobs

    _, root = byo
    rows = {}
    for name, over in (("default", None), ("log1p", {"data": {"target": "log1p"}})):
        jobs = expand_jobs(
            "mean", NAME, protocol="loso", folds=["tumour_b"], data_root=str(root), overrides=over
        )
        (rows[name],) = run_jobs(jobs, tmp_path / name)
    assert rows["default"]["target"] == "normalize_log1p" and rows["log1p"]["target"] == "log1p"
    assert rows["default"]["metrics"]["mse"] != rows["log1p"]["metrics"]["mse"]
