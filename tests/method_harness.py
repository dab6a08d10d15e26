"""Run a registered method through the real runner on the synthetic dataset and score it against
the `mean` predictor on the same fold (shared by every baseline's fit + test test).

The synthetic dataset (4 slides, 2 patients, 12 x 12 spots, 50 genes; LOSO folds P0S0 ... ) has
image-dependent genes, so a method that learns from pixels beats the training-mean predictor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import stbench.benchmark.runner as runner

SYNTHETIC_FOLD = "P0S0"


def run_method(
    method: str,
    data_root: Path,
    output: Path,
    *,
    config: str | None = "tiny",
    overrides: dict[str, Any] | None = None,
    fold: str = SYNTHETIC_FOLD,
    seed: int = 0,
) -> dict[str, Any]:
    """One job (fold, seed) of `method` with its named config; returns the result row."""
    jobs = runner.expand_jobs(
        method, "synthetic", folds=[fold], seeds=[seed], config=config, overrides=overrides,
        data_root=str(data_root),
    )  # fmt: skip
    rows = runner.run_jobs(jobs, output)
    assert len(rows) == 1, rows
    return rows[0]


def mean_baseline(data_root: Path, output: Path, fold: str = SYNTHETIC_FOLD) -> dict[str, Any]:
    """The `mean` predictor's row on the same fold (the floor every method must clear)."""
    return run_method("mean", data_root, output, config=None, fold=fold)
