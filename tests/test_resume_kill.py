"""Acceptance criterion 4: SIGKILL a `stbench benchmark` run mid-way, re-run it, and find every job's row
exactly once, the rows from before the kill unchanged byte for byte, and no corrupted or leftover file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from stbench.benchmark.store import RESULTS

STBENCH = Path(sys.executable).with_name("stbench")
TIMEOUT_S = 240


def _cmd(suite: Path, out: Path) -> list[str]:
    return [str(STBENCH), "benchmark", str(suite), "--output", str(out)]


def _rows_text(out: Path) -> list[str]:
    path = out / RESULTS
    if not path.exists():
        return []
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "torn last line"
    return text.splitlines(keepends=True)


def _in_flight(out: Path, finished: set[str], slow: str) -> list[str]:
    jobs = out / "jobs"
    if not jobs.is_dir():
        return []
    return [p.name for p in jobs.iterdir() if p.name.startswith(slow) and p.name not in finished]


@pytest.mark.slow
def test_sigkill_mid_suite_then_rerun(tmp_path: Path) -> None:
    env = {**os.environ, "STBENCH_DATA": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"}
    suite = tmp_path / "kill.yaml"
    # Fast mean jobs first (rows appear quickly), then patch-cnn jobs that last seconds: killed in flight.
    suite.write_text(
        yaml.safe_dump(
            {
                "name": "kill",
                "grid": [
                    {"method": "mean", "dataset": "synthetic", "protocol": "loso", "seeds": [0, 1]},
                    {
                        "method": "patch-cnn",
                        "config": "tiny",
                        "dataset": "synthetic",
                        "protocol": "loso",
                        "seeds": [0],
                        "folds": 2,
                        "overrides": {"trainer": {"max_epochs": 3, "limit_train_batches": 4}},
                    },
                ],
            }
        )
    )
    out = tmp_path / "out"
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed below, after the kill
    proc = subprocess.Popen(
        _cmd(suite, out), env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )  # own process group: the kill takes any children too
    deadline = time.time() + TIMEOUT_S
    in_flight: list[str] = []
    try:
        while time.time() < deadline:
            assert proc.poll() is None, (
                f"run ended before it could be killed:\n{(tmp_path / 'first.log').read_text()}"
            )
            finished = {json.loads(line)["job_id"] for line in _rows_text(out)}
            in_flight = _in_flight(out, finished, "patch-cnn__")
            if finished and in_flight:
                break  # kill at once: a job seen in flight must not get the chance to finish
            time.sleep(0.1)
        else:
            pytest.fail(
                f"no row + job in flight within {TIMEOUT_S}s:\n{(tmp_path / 'first.log').read_text()}"
            )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL

    before = _rows_text(out)  # every line parses: nothing torn
    rows_before = [json.loads(line) for line in before]
    k = len(rows_before)
    assert 1 <= k < 10, k  # 8 mean jobs + 2 patch-cnn jobs; at least one was lost in flight
    done_before = {r["job_id"] for r in rows_before}
    killed = [p.name for p in (out / "jobs").iterdir() if p.name not in done_before]
    assert killed, "no job was in flight at the kill"  # its half-done folder is left behind

    rerun = subprocess.run(
        _cmd(suite, out), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr

    after = _rows_text(out)
    rows = [json.loads(line) for line in after]
    counts = Counter(r["job_id"] for r in rows)
    assert len(counts) == 10 and set(counts.values()) == {1}, counts  # every job exactly once
    assert after[:k] == before  # rows from before the kill are byte-identical, in place
    assert {r["method"] for r in rows[k:]} <= {"mean", "patch-cnn"} and killed[0] in counts

    from stbench.benchmark.results import read_rows

    assert len(read_rows([out / RESULTS])) == 10  # the strict leaderboard reader accepts the file
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name == "parts"]
    assert leftovers == []
    import anndata as ad

    for r in rows:  # every job folder is complete and readable, including the one killed in flight
        job_dir = out / "jobs" / r["job_id"]
        assert json.loads((job_dir / "job.json").read_text())["job_id"] == r["job_id"]
        (slide,) = r["test_slides"]
        pred = ad.read_h5ad(job_dir / "predictions" / f"{slide}.h5ad")
        assert pred.n_obs == r["metrics"]["n_spots"] and pred.n_vars == r["n_genes"]
        assert "truth" in pred.layers and "spatial" in pred.obsm
