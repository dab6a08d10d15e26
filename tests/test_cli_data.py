"""`stbench list / data prepare / data info / data check` on generated layouts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stbench.cli import main
from stbench.data.catalog import CATALOG
from tests.fixtures.her2st_layout import write_her2st

EXPECTED_DATASETS = {
    "her2st",
    "cscc",
    "kidney",
    "hest-bowel",
    "hest-pancreas",
    "crunchdao-bowel",
    "tupro",
    "tcga-skcm",
    "synthetic",
}


def test_catalog_has_the_named_datasets() -> None:
    assert set(CATALOG) >= EXPECTED_DATASETS
    assert any(n.startswith("hest-bench-") for n in CATALOG)
    for card in CATALOG.values():
        assert (
            card.source_url and card.how_to_get and card.licence and card.citation and card.default_protocol
        )


def test_list_datasets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "datasets"]) == 0
    out = capsys.readouterr().out
    for name in EXPECTED_DATASETS:
        assert name in out


def test_unknown_dataset_suggests(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "info", "her2s"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'her2s'" in err and "Did you mean 'her2st'" in err


def test_info_before_prepare_says_how(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "info", "her2st", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not prepared" in err and "stbench data prepare her2st" in err and "--source" in err


def test_download_failure_points_to_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import stbench.data.prepare as prep

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(prep.urllib.request, "urlopen", offline)
    assert main(["data", "prepare", "cscc", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "download of https://www.ncbi.nlm.nih.gov" in err and "--source" in err
    assert not (tmp_path / "cscc" / "manifest.json").exists()


def test_gated_dataset_without_download_says_how(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "prepare", "kidney", "--data-root", str(tmp_path)]) == 2
    assert "cannot be downloaded automatically" in capsys.readouterr().err


def test_prepare_info_check_on_generated_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_her2st(tmp_path / "src", sections=("A1", "B1", "B2"), with_image=("B1",))
    root = tmp_path / "root"
    assert main(["data", "prepare", "her2st", "--source", str(src), "--data-root", str(root)]) == 0
    assert "3 slides (1 with an image)" in capsys.readouterr().out
    assert (root / "her2st" / "raw").is_symlink()
    assert main(["data", "info", "her2st", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "3 slides, 1 with an image" in out and "B1" in out and "25" in out
    assert main(["data", "check", "her2st", "--data-root", str(root)]) == 0
    assert "no problems found" in capsys.readouterr().out
    # a changed file is found by check, naming file, slide and field
    img = next((src / "data/ST-imgs/B/B1").iterdir())
    img.write_bytes(b"corrupted")
    assert main(["data", "check", "her2st", "--data-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "sha256 differs" in out and "B1" in out and img.name in out


def test_prepare_lists_every_bad_slide_and_writes_no_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_her2st(tmp_path / "src", sections=("A1", "A2", "A3"), with_image=())
    (src / "data/ST-spotfiles/A1_selection.tsv").unlink()
    (src / "data/ST-cnts/A3.tsv.gz").write_bytes(b"junk")
    root = tmp_path / "root"
    assert main(["data", "prepare", "her2st", "--source", str(src), "--data-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "slide=A1" in err and "slide=A3" in err
    assert not (root / "her2st" / "manifest.json").exists()
    assert main(["data", "check", "her2st", "--data-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "A1_selection.tsv" in out and "A3.tsv.gz" in out


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "stbench"
    res = subprocess.run([str(exe), "list", "readers"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for fmt in ("her2st", "cscc", "visium", "hest", "xenium", "anndata", "synthetic"):
        assert fmt in res.stdout


def test_print_config_resolves_without_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "run",
        "--method",
        "patch-cnn",
        "--config",
        "tiny",
        "--dataset",
        "synthetic",
        "--data-root",
        str(tmp_path),
        "--trainer.max_epochs",
        "3",
        "--method.lr",
        "0.01",
        "--output",
        str(tmp_path / "out"),
    ]
    assert main([*args, "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "max_epochs: 3" in out and "lr: 0.01" in out and "out_px: 32" in out and "config_name: tiny" in out
    assert not (tmp_path / "out").exists()
