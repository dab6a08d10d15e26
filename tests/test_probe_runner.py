"""Criterion 3 through the real runner: probe-ridge runs, and a second run reuses cached features
(counted encoder forwards = 0). Skipped until runner.py builds `features=` with `features_for`."""

from __future__ import annotations

from pathlib import Path

import pytest
from encoder_standin import StandInEncoder

import stbench.benchmark.runner as runner
import stbench.encoders
from baselines.probe_ridge.method import ProbeRidge
from stbench.methods.registry import register_method


def test_probe_ridge_second_run_reuses_features(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register_method(ProbeRidge)
    built: list[StandInEncoder] = []

    def build(name: str, weights: str = "default") -> StandInEncoder:
        built.append(StandInEncoder(name=name, weights_id="file:c0ffee000000"))
        return built[-1]

    monkeypatch.setattr(stbench.encoders, "build_encoder", build)
    data = str(tmp_path / "data")
    overrides = {"method": {"encoder": "resnet50-trunc", "pca_dim": 32}, "data": {"patch": {"out_px": 32}}}
    rows = []
    for out in ("run1", "run2"):
        jobs = runner.expand_jobs(
            "probe-ridge", "synthetic", folds=["P0S0"], seeds=[0], overrides=overrides, data_root=data
        )
        rows += runner.run_jobs(jobs, tmp_path / out)
    first, second = built[0].calls, sum(e.calls for e in built[1:])  # each run builds its encoder
    assert first > 0 and second == 0, (first, second)
    assert rows[0]["weights"] == rows[1]["weights"] == "file:c0ffee000000"
    assert rows[0]["metrics"]["pcc"] == pytest.approx(rows[1]["metrics"]["pcc"], abs=1e-6)
