"""Her2ST reader on a generated copy of the public layout, including every kind of bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from stbench.data.readers.her2st import Her2STReader
from stbench.errors import DataError
from tests.fixtures.her2st_layout import write_her2st


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    return write_her2st(tmp_path / "her2st", sections=("A1", "A2", "B1"), with_image=("B1",), labels=("A1",))


def test_reads_public_layout(layout: Path) -> None:
    r = Her2STReader(layout)
    assert r.list_slides() == ["A1", "A2", "B1"]
    s = r.read_slide("B1").validate()
    assert (s.name, s.patient, s.platform, s.n_spots, s.n_genes) == ("B1", "B", "st", 25, 12)
    assert s.spot_diameter_um == 100.0
    # 290 px per 200 um array step -> 0.6897 um/px
    assert s.mpp == pytest.approx(200 / 290, rel=1e-6)
    # spot "2x3" sits at (100.25, 120.75) in the fixture
    i = s.spot_ids.index("2x3")
    np.testing.assert_allclose(s.coords[i], [100.25, 120.75])
    img = s.image.read()
    x, y = s.coords[i].round().astype(int)
    assert img[y, x].tolist() != [235, 235, 235]  # a drawn spot marker, so x is the column
    assert list(s.adata.obs["slide"].unique()) == ["B1"]
    assert list(s.adata.obs["patient"].unique()) == ["B"]


def test_counts_equal_file(layout: Path) -> None:
    s = Her2STReader(layout).read_slide("A1")
    with gzip.open(layout / "data/ST-cnts/A1.tsv.gz", "rt") as f:
        genes = f.readline().rstrip("\n").split("\t")[1:]
        first = f.readline().rstrip("\n").split("\t")
    assert s.genes == genes
    row = s.spot_ids.index(first[0])
    np.testing.assert_array_equal(s.counts()[row], np.array(first[1:], dtype=np.float32))


def test_labels_and_no_image(layout: Path) -> None:
    s = Her2STReader(layout).read_slide("A1")
    assert not s.has_image
    assert set(s.adata.obs["label"]) == {"invasive cancer", "connective tissue"}


def test_scanpy_spatial_plot(layout: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    a = Her2STReader(layout).read_slide("B1").to_scanpy(max_side=200)
    a.obs["total"] = np.asarray(a.X.sum(1)).ravel()
    ax = sc.pl.spatial(a, color="total", library_id="B1", show=False)
    assert ax is not None


# ---- bad input: every error names the problem, the file, the slide and the field --------------
def _expect(exc: pytest.ExceptionInfo[DataError], *words: str) -> None:
    msg = str(exc.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_missing_counts_file(layout: Path) -> None:
    (layout / "data/ST-spotfiles/A2_selection.tsv").unlink()
    with pytest.raises(DataError) as exc:
        Her2STReader(layout).read_slide("A2")
    _expect(exc, "missing", "A2_selection.tsv", "slide=A2", "field=ST-spotfiles")


def test_missing_column(layout: Path) -> None:
    p = layout / "data/ST-spotfiles/A1_selection.tsv"
    p.write_text(p.read_text().replace("pixel_x", "px_x"))
    with pytest.raises(DataError) as exc:
        Her2STReader(layout).read_slide("A1")
    _expect(exc, "lacks columns ['pixel_x']", "slide=A1", "field=pixel_x")


def test_spots_outside_image(layout: Path) -> None:
    p = layout / "data/ST-spotfiles/B1_selection.tsv"
    lines = p.read_text().splitlines()
    cells = lines[1].split("\t")
    cells[4] = "99999.0"
    lines[1] = "\t".join(cells)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as exc:
        Her2STReader(layout).read_slide("B1").validate()
    _expect(exc, "outside the", "image", "slide=B1", "field=obsm/spatial", "B1_HE.jpg")


def _rewrite_counts(layout: Path, slide: str, edit) -> None:
    p = layout / f"data/ST-cnts/{slide}.tsv.gz"
    with gzip.open(p, "rt") as f:
        lines = f.read().splitlines()
    lines = edit(lines)
    with gzip.open(p, "wt") as f:
        f.write("\n".join(lines) + "\n")


def test_spots_without_counts_recorded_or_error(layout: Path) -> None:
    def zero_first(lines: list[str]) -> list[str]:
        cells = lines[1].split("\t")
        lines[1] = "\t".join([cells[0]] + ["0"] * (len(cells) - 1))
        return lines

    _rewrite_counts(layout, "A1", zero_first)
    s = Her2STReader(layout).read_slide("A1")
    assert s.n_spots == 24 and s.meta["dropped_spots"] == {"2x3": "no counts (total 0)"}
    with pytest.raises(DataError) as exc:
        Her2STReader(layout, empty_spots="error").read_slide("A1")
    _expect(exc, "without counts", "2x3", "slide=A1", "field=counts", "A1.tsv.gz")


def test_selected_spot_without_counts_row_is_recorded(layout: Path) -> None:
    _rewrite_counts(layout, "A1", lambda lines: lines[:1] + lines[2:])
    s = Her2STReader(layout).read_slide("A1")
    assert s.n_spots == 24 and s.meta["dropped_spots"] == {"2x3": "no counts row"}


def test_duplicate_spot_ids(layout: Path) -> None:
    _rewrite_counts(layout, "A1", lambda lines: lines + [lines[1]])
    with pytest.raises(DataError) as exc:
        Her2STReader(layout).read_slide("A1")
    _expect(exc, "duplicate spot ids", "2x3", "slide=A1", "A1.tsv.gz")


@pytest.mark.parametrize(("value", "word"), [("NaN", "NaN counts"), ("-3", "negative counts")])
def test_nan_or_negative_counts(layout: Path, value: str, word: str) -> None:
    def poison(lines: list[str]) -> list[str]:
        cells = lines[3].split("\t")
        cells[2] = value
        lines[3] = "\t".join(cells)
        return lines

    _rewrite_counts(layout, "A2", poison)
    with pytest.raises(DataError) as exc:
        Her2STReader(layout).read_slide("A2")
    _expect(exc, word, "slide=A2", "field=counts", "A2.tsv.gz")


def test_empty_slide_after_matching(layout: Path) -> None:
    p = layout / "data/ST-spotfiles/A1_selection.tsv"
    lines = p.read_text().splitlines()
    p.write_text("\n".join([lines[0]] + [ln[:-1] + "0" for ln in lines[1:]]) + "\n")  # selected = 0
    with pytest.raises(DataError) as exc:
        Her2STReader(layout).read_slide("A1")
    _expect(exc, "no spot has both counts and a selected coordinate", "slide=A1")


def test_unreadable_image(layout: Path) -> None:
    img = next((layout / "data/ST-imgs/B/B1").iterdir())
    img.write_bytes(b"not a jpeg")
    with pytest.raises(DataError) as exc:
        Her2STReader(layout).read_slide("B1").validate()
    _expect(exc, "cannot read image header", "field=image", img.name)


def test_unparseable_counts(layout: Path) -> None:
    (layout / "data/ST-cnts/A2.tsv.gz").write_bytes(b"garbage, not gzip")
    with pytest.raises(DataError) as exc:
        Her2STReader(layout).read_slide("A2")
    _expect(exc, "cannot parse counts table", "slide=A2", "A2.tsv.gz")
