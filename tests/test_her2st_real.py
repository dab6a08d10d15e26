"""Her2ST as users get it (../shared/data/her2st): prepare, info, splits, scanpy interop."""

from __future__ import annotations

from pathlib import Path

import pytest

from stbench.cli import main
from stbench.data.dataset import Dataset
from tests.conftest import HER2ST_IMAGE_SLIDES

pytestmark = pytest.mark.real_data


def test_info_lists_36_sections_six_with_image(her2st_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "info", "her2st", "--data-root", str(her2st_root)]) == 0
    out = capsys.readouterr().out
    assert "36 slides, 6 with an image" in out
    ds = Dataset.open("her2st", her2st_root)
    assert len(ds.slide_ids) == 36
    rows = {r["slide"]: r for r in ds.summary_rows()}
    with_image = {s: rows[s]["spots"] for s, has in ds.has_image.items() if has}
    assert with_image == HER2ST_IMAGE_SLIDES
    for s in HER2ST_IMAGE_SLIDES:
        assert rows[s]["mpp"] == pytest.approx(0.688, abs=0.002)  # 200 um / ~290 px
        assert rows[s]["spot_diameter_um"] == 100.0
        assert rows[s]["image"].startswith("92")  # ~9,300 x 9,900 px
    assert set(ds.patients.values()) == set("ABCDEFGH")


def test_check_passes_and_cached_slides_match_reader(her2st_root: Path) -> None:
    ds = Dataset.open("her2st", her2st_root)
    assert ds.verify() == []
    cached = ds.load_slide("C3")
    fresh = ds.reader.read_slide("C3")
    assert cached.spot_ids == fresh.spot_ids and cached.genes == fresh.genes
    assert (cached.counts() == fresh.counts()).all()
    assert cached.image.path == fresh.image.path and cached.mpp == fresh.mpp


def test_real_oddities_are_recorded(her2st_root: Path) -> None:
    ds = Dataset.open("her2st", her2st_root)
    b4 = ds.load_slide("B4")
    assert b4.meta["dropped_spots"] and set(b4.meta["dropped_spots"].values()) <= {
        "no counts row",
        "no selected coordinate in the spot file",
    }
    d5 = ds.load_slide("D5")
    assert "no counts (total 0)" in d5.meta["dropped_spots"].values()
    a1 = ds.load_slide("A1")
    assert "invasive cancer" in set(a1.adata.obs["label"])
