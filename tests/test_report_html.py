"""The HTML report is self-contained (inline CSS, base64 PNG plots, no script or external URL) and
renders in headless Chromium: the screenshot is not blank and the first plot's pixels are on it.

Chromium is Debian's /usr/bin/chromium (`.ci/run` installs it). The render test is skipped only when
it is absent AND the CI variable is unset; in CI a missing browser fails the test."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stbench.benchmark.leaderboard import build_leaderboard, check_leaderboard
from stbench.benchmark.report_plots import top_variance_genes
from tests.fixtures.result_rows import result_rows, write_predictions, write_results

CHROMIUM = Path("/usr/bin/chromium")
IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')
BOX_FACE = np.array([0xCF, 0xE0, 0xF3])  # the box plot's box colour (report_plots.pcc_box_plot)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(results dir, run dir with predictions, leaderboard.html built with the predictions)."""
    base = tmp_path_factory.mktemp("report")
    rows = result_rows()
    write_results(base / "run" / "results.jsonl", rows)
    write_predictions(base / "run", [r for r in rows if r["fold"] == "B4" and r["seed"] == 0])
    paths = build_leaderboard(base / "run", base / "out", predictions_dirs=[base / "run"])
    return base / "run", base / "run", paths["html"]


def test_html_is_self_contained_with_the_plots(report: tuple[Path, Path, Path]) -> None:
    html = report[2].read_text()
    assert "<script" not in html and "<link" not in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing fetched from a network
    images = IMG.findall(html)
    assert [alt.split(",")[0] for alt, _ in images] == [
        "per-slice pcc",
        "spatial maps",
        "gene-gene correlation",
    ]
    for _, data in images:
        png = base64.b64decode(data)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        w, h = Image.open(io.BytesIO(png)).size
        assert w > 300 and h > 150
    assert "test slide B4" in html  # maps of one named test slide
    assert html.count("<img ") == len(images)


def test_report_with_predictions_is_reproducible(report: tuple[Path, Path, Path]) -> None:
    results, run, html = report
    assert check_leaderboard(results, html.parent, predictions_dirs=[run]) == []
    # without the predictions the report differs (maps need them): --check must use the same inputs
    assert [p.split(":")[0] for p in check_leaderboard(results, html.parent)] == ["leaderboard.html"]


def test_marker_genes_are_the_top_truth_variance_genes() -> None:
    truth = np.array([[0.0, 1.0, 5.0, 2.0], [0.0, 3.0, 1.0, 2.0], [0.0, 5.0, 3.0, 2.0]])
    assert top_variance_genes(truth, ["a", "b", "c", "d"], 3) == ["b", "c", "a"]  # ties broken by name


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {CHROMIUM} is missing: .ci/run must install Debian's chromium")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); CI installs it")


def test_html_renders_in_headless_chromium(report: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _require_chromium()
    shot = tmp_path / "shot.png"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        report[2].resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert img.shape[:2] == (2000, 1280)
    assert img.std() > 20, "the screenshot is blank"
    # the first plot (box plot) is on screen: its box colour appears, in a region with drawn content
    near = np.abs(img - BOX_FACE).max(axis=2) <= 6
    assert near.sum() > 500, "no box-plot pixels in the screenshot"
    ys, xs = np.nonzero(near)
    region = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    assert (region.min(axis=2) < 100).mean() > 0.01  # dark strokes (whiskers, points, medians) inside
    assert ys.min() > 200  # below the page header and the table, where the figure is placed


def test_protocol_marker_genes_are_mapped_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A protocol's figure genes (HINGE: KRT6A, GNAS, FXYD2) lead the spatial maps where every
    prediction has them; absent ones are skipped and the top-variance genes fill the rest."""
    from stbench.benchmark import report_plots
    from stbench.data.protocols import get_protocol

    assert get_protocol("hinge").marker_genes == ("KRT6A", "GNAS", "FXYD2")
    rows = [r for r in result_rows() if r["fold"] == "B4" and r["seed"] == 0]
    write_predictions(tmp_path, rows)
    predictions = report_plots.find_predictions([tmp_path])
    seen: list[list[str]] = []
    real = report_plots.spatial_maps
    monkeypatch.setattr(
        report_plots, "spatial_maps", lambda p, g, slide: seen.append(list(g)) or real(p, g, slide=slide)
    )
    entries = [(r["method"], [r]) for r in rows]
    report_plots.prediction_figures(entries, predictions, marker_genes=("GENE5", "ABSENT", "GENE7"))
    report_plots.prediction_figures(entries, predictions)
    assert seen[0][:2] == ["GENE5", "GENE7"] and len(seen[0]) == 3 and "ABSENT" not in seen[0]
    assert len(seen[1]) == 3 and seen[1] != seen[0]  # without markers: the top-variance genes only
