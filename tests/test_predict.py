"""`stbench predict`: a trained job applied to a new H&E image (no counts), written for scanpy."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest

from stbench.cli import main

matplotlib.use("Agg")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    """patch-cnn tiny, one epoch, on the harness fold; (row, job folder, JPEG copy of its test slide)."""
    from method_harness import run_method
    from PIL import Image

    from stbench.data.dataset import Dataset

    out = tmp_path_factory.mktemp("predict-run")
    row = run_method("patch-cnn", synthetic_root, out, overrides={"trainer": {"max_epochs": 1}})
    slide = Dataset.open("synthetic", synthetic_root).load_slide(row["test_slides"][0])
    jpeg = out / "new_slide.jpg"
    Image.fromarray(slide.image.read()[..., :3]).save(jpeg, quality=95)
    return row, out / "jobs" / row["job_id"], jpeg


def test_grid_prediction_plots_with_scanpy(trained: tuple[dict, Path, Path], tmp_path: Path) -> None:
    import matplotlib.pyplot as plt
    import scanpy as sc

    row, jobdir, jpeg = trained
    out = tmp_path / "pred.h5ad"
    rc = main(["predict", "--run", str(jobdir), "--image", str(jpeg), "--mpp", "1.0", "--grid", "100",
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    a = ad.read_h5ad(out)
    panel = json.loads((jobdir / "gene_panel.json").read_text())["genes"]
    assert list(a.var_names) == panel and a.n_obs > 10 and np.isfinite(a.X).all()
    assert a.uns["stbench"]["job_id"] == row["job_id"] and a.uns["stbench"]["method"] == "patch-cnn"
    centres = np.asarray(a.obsm["spatial"])
    assert np.allclose(np.diff(np.unique(centres[:, 0])) % 100, 0)  # a 100 µm grid at 1 µm/px
    ax = sc.pl.spatial(a, color=a.var_names[0], show=False)  # one library: library_id inferred
    assert len(ax[0].images) == 1
    plt.close("all")


def test_spots_of_the_test_slide_reproduce_the_run(
    trained: tuple[dict, Path, Path], tmp_path: Path, synthetic_root: Path
) -> None:
    from stbench.data.dataset import Dataset

    row, jobdir, _ = trained
    run_pred = ad.read_h5ad(jobdir / "predictions" / f"{row['test_slides'][0]}.h5ad")
    xy = np.asarray(run_pred.obsm["spatial"])
    spots = tmp_path / "spots.csv"
    pd.DataFrame({"spot_id": run_pred.obs_names, "x": xy[:, 0], "y": xy[:, 1]}).to_csv(spots, index=False)
    image = Dataset.open("synthetic", synthetic_root).load_slide(row["test_slides"][0]).image.path
    out = tmp_path / "same.h5ad"
    assert main(["predict", "--run", str(jobdir), "--image", str(image), "--mpp", "1", "--spots", str(spots),
                 "--out", str(out)]) == 0  # fmt: skip
    a = ad.read_h5ad(out)
    assert list(a.obs_names) == list(run_pred.obs_names)
    assert np.asarray(run_pred.X).std(axis=0).max() > 1e-3  # image-dependent: the check means something
    assert np.abs(np.asarray(a.X) - np.asarray(run_pred.X)).max() <= 1e-5


def test_counts_give_metrics_and_checkpoint_finds_its_job(
    trained: tuple[dict, Path, Path], tmp_path: Path, synthetic_root: Path
) -> None:
    from stbench.data.dataset import Dataset

    row, jobdir, _ = trained
    slide = Dataset.open("synthetic", synthetic_root).load_slide(row["test_slides"][0])
    spots = tmp_path / "spots.csv"
    pd.DataFrame({"spot_id": slide.spot_ids, "x": slide.coords[:, 0], "y": slide.coords[:, 1]}).to_csv(
        spots, index=False
    )
    counts = tmp_path / "counts.csv"
    pd.DataFrame(slide.counts(), index=slide.spot_ids, columns=slide.genes).to_csv(counts)
    out = tmp_path / "with_counts.h5ad"
    ckpt = jobdir / "checkpoints" / "best.ckpt"
    assert main(["predict", "--checkpoint", str(ckpt), "--image", str(slide.image.path), "--mpp", "1",
                 "--spots", str(spots), "--counts", str(counts), "--out", str(out)]) == 0  # fmt: skip
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())["metrics"]
    a = ad.read_h5ad(out)
    run_pred = ad.read_h5ad(jobdir / "predictions" / f"{row['test_slides'][0]}.h5ad")
    assert np.abs(np.asarray(a.layers["truth"]) - np.asarray(run_pred.layers["truth"])).max() <= 1e-5
    assert metrics["pcc"] == pytest.approx(row["per_slide"][row["test_slides"][0]]["pcc"], abs=1e-5)


def test_mean_reference_is_rebuilt_from_its_fold(synthetic_root: Path, tmp_path: Path) -> None:
    from method_harness import run_method

    row = run_method("mean", synthetic_root, tmp_path / "run", config=None)
    jobdir = tmp_path / "run" / "jobs" / row["job_id"]
    run_pred = ad.read_h5ad(jobdir / "predictions" / f"{row['test_slides'][0]}.h5ad")
    image = Path(run_pred.uns["spatial"][row["test_slides"][0]]["metadata"]["source_image"])
    out = tmp_path / "mean.h5ad"
    assert main(["predict", "--run", str(jobdir), "--image", str(image), "--mpp", "1", "--grid", "150",
                 "--out", str(out)]) == 0  # fmt: skip
    a = ad.read_h5ad(out)
    assert np.abs(np.asarray(a.X) - np.asarray(run_pred.X)[0]).max() <= 1e-6


def _fake_job(tmp_path: Path, method: str) -> Path:
    jobdir = tmp_path / "jobs" / "x"
    jobdir.mkdir(parents=True)
    job = {"method": method, "dataset": "synthetic", "protocol": "loso", "fold": "P0S0", "seed": 0,
           "config": {"method": {}, "data": {}, "trainer": {}}}  # fmt: skip
    (jobdir / "job.json").write_text(json.dumps(job))
    return jobdir


@pytest.mark.parametrize(
    ("method", "named"),
    [
        ("probe-ridge", "frozen features"),
        ("histogene", "whole-slide"),
        ("bleep", "predict hooks"),
        ("depth", "library sizes"),
    ],
)
def test_unsupported_methods_are_refused_before_reading_pixels(
    tmp_path: Path, capsys: pytest.CaptureFixture, method: str, named: str
) -> None:
    jobdir = _fake_job(tmp_path, method)
    rc = main(["predict", "--run", str(jobdir), "--image", str(tmp_path / "absent.jpg"), "--grid", "100",
               "--out", str(tmp_path / "o.h5ad")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert method in err and named in err and "absent.jpg" not in err


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ([], "--spots CSV or --grid"),
        (["--grid", "100", "--spots", "s.csv"], "--spots CSV or --grid"),
        (["--grid", "100"], "--mpp"),  # a JPEG has no scale
    ],
)
def test_argument_errors_are_one_line(
    trained: tuple[dict, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, extra: list, says: str
) -> None:
    _, jobdir, jpeg = trained
    rc = main(
        ["predict", "--run", str(jobdir), "--image", str(jpeg), "--out", str(tmp_path / "o.h5ad"), *extra]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and says in err


def test_mpp_is_read_from_tiff_metadata(tmp_path: Path) -> None:
    import tifffile

    from stbench.benchmark.predict import mpp_from_file

    rgb = np.zeros((64, 64, 3), np.uint8)
    tifffile.imwrite(
        tmp_path / "res.tif", rgb, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER"
    )
    tifffile.imwrite(tmp_path / "svs.tif", rgb, description="Aperio Image Library |AppMag = 20|MPP = 0.4990")
    assert mpp_from_file(tmp_path / "res.tif") == pytest.approx(0.25)
    assert mpp_from_file(tmp_path / "svs.tif") == pytest.approx(0.499)
    assert mpp_from_file(tmp_path / "absent.jpg") is None


def test_grid_keeps_tissue_cells_only() -> None:
    from stbench.benchmark.predict import tissue_grid

    low = np.full((100, 200, 3), 240, np.uint8)  # glass
    low[:, :100] = (180, 90, 150)  # stained tissue on the left half
    cells = tissue_grid(low, 0.5, (400, 200), 50.0)  # full res 400 x 200, 50 px cells
    assert len(cells) == 4 * 4 and (cells[:, 0] < 200).all()
    assert cells[0, :2].tolist() == [24.5, 24.5]  # cell centre in pixel-index coordinates


def test_squidpy_reads_run_and_predict_files(trained: tuple[dict, Path, Path], tmp_path: Path) -> None:
    """Moran's I of the predicted genes (X, not the truth) on the run's file and a predict file."""
    sq = pytest.importorskip("squidpy")
    row, jobdir, jpeg = trained
    out = tmp_path / "grid.h5ad"
    assert main(["predict", "--run", str(jobdir), "--image", str(jpeg), "--mpp", "1", "--grid", "80",
                 "--out", str(out)]) == 0  # fmt: skip
    for path in (jobdir / "predictions" / f"{row['test_slides'][0]}.h5ad", out):
        a = ad.read_h5ad(path)
        sq.gr.spatial_neighbors(a, coord_type="generic", n_neighs=6)
        sq.gr.spatial_autocorr(a, mode="moran", genes=list(a.var_names[:5]), n_perms=None)
        assert np.isfinite(a.uns["moranI"]["I"]).all()
