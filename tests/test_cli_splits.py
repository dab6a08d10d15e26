"""`stbench splits`: six LOSO folds on the real image sections, HINGE's fixed pool A1..H1."""

from __future__ import annotations

from pathlib import Path

import pytest

from stbench.cli import main
from stbench.data.prepare import prepare
from tests.conftest import HER2ST_IMAGE_SLIDES
from tests.fixtures.her2st_layout import ALL_SECTIONS, write_her2st

POOL = ["A1", "B1", "C1", "D1", "E1", "F1", "G1", "H1"]


def _fold_rows(out: str) -> list[list[str]]:
    """Rows of the printed fold table: [fold, train, val, test, notes]."""
    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 5 and cells[0] and cells[0] != "fold":
            rows.append(cells)
    return rows


@pytest.mark.real_data
def test_loso_on_real_image_sections(her2st_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["splits", "her2st", "--protocol", "loso", "--data-root", str(her2st_root)]) == 0
    out = capsys.readouterr().out
    assert "6 fold(s)" in out
    rows = _fold_rows(out)
    assert sorted(r[3] for r in rows) == sorted(HER2ST_IMAGE_SLIDES)
    for _fold, train, val, test, _ in rows:
        assert test not in train.split() and val == "10% of train spots"
        assert sorted(train.split() + [test]) == sorted(HER2ST_IMAGE_SLIDES)


@pytest.mark.real_data
def test_hinge_on_six_image_copy_names_missing_pool_images(
    her2st_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["splits", "her2st", "--protocol", "hinge", "--data-root", str(her2st_root)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "8 of 8 pool section(s) excluded (no image)" in out
    assert ", ".join(POOL) in out


def test_hinge_on_full_layout_uses_fixed_pool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stbench.data.dataset import Dataset
    from stbench.data.protocols import get_protocol

    src = write_her2st(tmp_path / "full", sections=ALL_SECTIONS, with_image=ALL_SECTIONS, grid=3, n_genes=8)
    root = tmp_path / "root"
    prepare("her2st", root, src)
    assert main(["splits", "her2st", "--protocol", "hinge", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "her2st / protocol hinge: 8 fold(s)" in out
    assert [r[3] for r in _fold_rows(out)] == POOL
    ds = Dataset.open("her2st", root)
    folds, problems = get_protocol("hinge").folds(ds.patients, ds.has_image, eval_pool=ds.card.eval_pool)
    assert problems == [] and [f.test for f in folds] == [(p,) for p in POOL]
    for f in folds:
        assert len(f.train) == 35 and f.test[0] not in f.train and f.val_fraction == pytest.approx(0.1)
        # slice-level protocol (as in the HINGE paper): same-patient training slides are declared
        assert any(f"patient {f.test[0][0]} has test slide(s) {f.test[0]}" in n for n in f.notes)
