"""DDP on CPU (2 processes, gloo) predicts exactly like one process, and DDP training completes.

Runs the real CLI in subprocesses: Lightning's DDP launcher re-executes the command line, which
must be `stbench`, not pytest. The test slide P0S0 has 131 spots, so DistributedSampler must pad
one rank with a repeated spot; the writer has to drop it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

pytestmark = pytest.mark.slow

STBENCH = str(Path(sys.executable).parent / "stbench")
BASE = [
    "run",
    "--method",
    "patch-cnn",
    "--config",
    "tiny",
    "--dataset",
    "synthetic",
    "--folds",
    "[P0S0]",
    "--seeds",
    "[0]",
]


def _run(args: list[str], data_root: Path) -> None:
    res = subprocess.run(
        [STBENCH, *args, "--data-root", str(data_root)], capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _row(out: Path) -> dict:
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    return rows[0]


def _predictions(out: Path, row: dict) -> ad.AnnData:
    return ad.read_h5ad(out / "jobs" / row["job_id"] / "predictions" / "P0S0.h5ad")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp")
    data_root = root / "data"
    out = root / "train"
    _run([*BASE, "--trainer.max_epochs", "1", "--output", str(out)], data_root)
    ckpt = out / "jobs" / _row(out)["job_id"] / "checkpoints" / "best.ckpt"
    assert ckpt.exists()
    return data_root, ckpt


def test_ddp_predictions_equal_single_process(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data_root, ckpt = trained
    one, two = tmp_path / "one", tmp_path / "two"
    _run([*BASE, "--checkpoint", str(ckpt), "--output", str(one)], data_root)
    _run(
        [
            *BASE,
            "--checkpoint",
            str(ckpt),
            "--output",
            str(two),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
        ],
        data_root,
    )
    r1, r2 = _row(one), _row(two)
    assert r2["provenance"]["hardware"]["devices"] == 2
    # every spot exactly once: 131 spots over 2 ranks (66 + 65: Lightning's predict sampler does not
    # repeat spots; a padding sampler's duplicates would be dropped, see test_writer.py)
    assert r1["predictions"] == {"ranks": 1, "written": 131, "unique": 131, "duplicates": 0}
    assert r2["predictions"]["ranks"] == 2 and r2["predictions"]["unique"] == 131
    assert r2["predictions"]["written"] - r2["predictions"]["duplicates"] == 131
    p1, p2 = _predictions(one, r1), _predictions(two, r2)
    assert p1.n_obs == 131 and p1.obs_names.is_unique
    assert list(p1.obs_names) == list(p2.obs_names)
    np.testing.assert_allclose(p1.X, p2.X, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(p1.layers["truth"], p2.layers["truth"])
    for key, v in r1["metrics"].items():
        if isinstance(v, float):
            assert r2["metrics"][key] == pytest.approx(v, abs=1e-5), key
        else:
            assert r2["metrics"][key] == v, key


def test_ddp_training_completes_through_cli(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data_root, _ = trained
    out = tmp_path / "ddp-train"
    _run(
        [
            *BASE,
            "--trainer.max_epochs",
            "1",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
            "--output",
            str(out),
        ],
        data_root,
    )
    row = _row(out)
    assert row["predictions"]["unique"] == 131 and row["metrics"]["mse"] > 0
    assert (out / "jobs" / row["job_id"] / "checkpoints" / "best.ckpt").exists()


def test_bf16_mixed_runs_through_cli(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data_root, _ = trained
    out = tmp_path / "bf16"
    _run(
        [*BASE, "--trainer.max_epochs", "1", "--trainer.precision", "bf16-mixed", "--output", str(out)],
        data_root,
    )
    row = _row(out)
    assert row["provenance"]["hardware"]["precision"] == "bf16-mixed"
    assert row["predictions"]["unique"] == 131 and np.isfinite(row["metrics"]["mse"])
