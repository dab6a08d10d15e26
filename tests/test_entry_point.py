"""A method from a package outside stbench, found only through the `stbench.methods` entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PKG = Path(__file__).parent / "fixtures" / "external_method"
BIN = Path(sys.executable).parent


def test_external_package_method_runs_with_stbench_run(tmp_path: Path) -> None:
    site = tmp_path / "site"
    src = tmp_path / "pkg"
    shutil.copytree(PKG, src)  # build outside the repository: setuptools writes build/ and egg-info
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    assert list(site.glob("stbench_ext_colour-*.dist-info/entry_points.txt"))
    env = {**os.environ, "PYTHONPATH": str(site)}

    listed = subprocess.run(
        [str(BIN / "stbench"), "list", "methods"], capture_output=True, text=True, env=env, timeout=300
    )
    assert (
        listed.returncode == 0
        and "colour-linear" in listed.stdout
        and "stbench_ext_colour.method" in listed.stdout
    )

    out = tmp_path / "out"
    run = subprocess.run(
        [
            str(BIN / "stbench"),
            "run",
            "--method",
            "colour-linear",
            "--dataset",
            "synthetic",
            "--folds",
            "[P0S0]",
            "--trainer.max_epochs",
            "2",
            "--output",
            str(out),
            "--data-root",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    row = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert row["method"] == "colour-linear" and row["predictions"]["unique"] == 131
    assert row["metrics"]["mse"] > 0 and "colour-linear" in run.stdout

    # without the package on the path the name is unknown, and the error lists the valid methods
    missing = subprocess.run(
        [
            str(BIN / "stbench"),
            "run",
            "--method",
            "colour-linear",
            "--dataset",
            "synthetic",
            "--data-root",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and "unknown method 'colour-linear'" in missing.stderr
    assert "mean" in missing.stderr and "patch-cnn" in missing.stderr
