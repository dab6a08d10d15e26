"""Training curves through Lightning loggers: CSV (default), TensorBoard and offline W&B."""

from __future__ import annotations

from pathlib import Path

import pytest

from stbench.benchmark.runner import expand_jobs, run_jobs
from stbench.errors import StbenchError

pytestmark = pytest.mark.slow


def test_csv_tensorboard_and_offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    jobs = expand_jobs(
        "patch-cnn",
        "synthetic",
        folds=["P0S0"],
        seeds=[0],
        config="tiny",
        overrides={"trainer": {"max_epochs": 1}},
        data_root=str(tmp_path / "data"),
        suite="ci",
    )
    (row,) = run_jobs(jobs, tmp_path / "out", loggers=["csv", "tensorboard", "wandb"])
    logs = tmp_path / "out" / "jobs" / row["job_id"] / "logs"
    csv = (logs / "csv" / "metrics.csv").read_text()
    assert "train/loss" in csv and "val/mse" in csv
    assert list((logs / "tensorboard").glob("events.out.tfevents.*"))
    runs = list((logs / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_unknown_logger_is_named(tmp_path: Path) -> None:
    jobs = expand_jobs("mean", "synthetic", folds=["P0S0"], seeds=[0], data_root=str(tmp_path / "data"))
    with pytest.raises(StbenchError, match="unknown logger 'mlflow'"):
        run_jobs(jobs, tmp_path / "out", loggers=["mlflow"])
