"""`--checkpoint` reuses weights only where they mean what the run assumes.

Why: a checkpoint's weights are tied to its method, gene panel (names and order), target space and
training slides. Applied elsewhere they give numbers that look fine and are wrong (a panel that
shares 34 of 274 genes, a test slide it was trained on). Every checkpoint a job writes records
that provenance; a run from a checkpoint refuses a mismatch with one line naming it, before it
predicts. A round trip (train, then reload) must give the trained job's predictions exactly, also
for methods that build their network in setup() (probe-mlp, deepspot).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest
import torch

import stbench.benchmark.runner as runner
from stbench.benchmark.checkpoints import META_KEY, LoadedCheckpoint, check_compatible
from stbench.benchmark.job import Job
from stbench.errors import StbenchError

pytestmark = pytest.mark.usefixtures("one_thread")

FOLD = "P0S0"
ONE_EPOCH = {"trainer": {"max_epochs": 1}}


def _jobs(method: str, root: Path, ckpt: Path | None = None, fold: str = FOLD, **kw: Any) -> list[Job]:
    config = kw.pop("config", "tiny")
    return runner.expand_jobs(
        method, "synthetic", folds=[fold], seeds=[0], config=config, data_root=str(root),
        checkpoint=str(ckpt) if ckpt is not None else None, **kw,
    )  # fmt: skip


def _run(method: str, root: Path, out: Path, ckpt: Path | None = None, **kw: Any) -> dict[str, Any]:
    rows = runner.run_jobs(_jobs(method, root, ckpt, **kw), out)
    assert len(rows) == 1, rows
    return rows[0]


def _pred(out: Path, row: dict[str, Any]) -> np.ndarray:
    (slide,) = row["test_slides"]
    return np.asarray(ad.read_h5ad(out / "jobs" / row["job_id"] / "predictions" / f"{slide}.h5ad").X)


def _ckpt(out: Path, row: dict[str, Any]) -> Path:
    return out / row["checkpoint"]["path"]


@pytest.fixture(scope="module")
def trained(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """patch-cnn tiny, one epoch, fold P0S0: the checkpoint every refusal test starts from."""
    out = tmp_path_factory.mktemp("ckpt-train")
    return out, _run("patch-cnn", synthetic_root, out, overrides=ONE_EPOCH)


def _expect_refusal(method: str, root: Path, out: Path, ckpt: Path, **kw: Any) -> str:
    before = (out / "results.jsonl").read_text() if (out / "results.jsonl").exists() else ""
    with pytest.raises(StbenchError) as err:
        runner.run_jobs(_jobs(method, root, ckpt, **kw), out)
    msg = str(err.value)
    assert "\n" not in msg and str(ckpt) in msg
    after = (out / "results.jsonl").read_text() if (out / "results.jsonl").exists() else ""
    assert after == before  # nothing scored
    return msg


# ---- what a checkpoint records ------------------------------------------------------------------
def test_checkpoint_records_method_panel_target_and_training_slides(trained) -> None:
    out, row = trained
    meta = torch.load(_ckpt(out, row), map_location="cpu", weights_only=True)[META_KEY]
    assert meta["method"] == "patch-cnn" and meta["config_hash"] == row["config_hash"]
    assert (
        meta["genes"] == json.loads((out / "jobs" / row["job_id"] / "gene_panel.json").read_text())["genes"]
    )
    assert meta["gene_panel_hash"] == row["gene_panel_hash"] and len(meta["genes"]) == row["n_genes"]
    assert meta["target"]["method"] == row["target"] and meta["target"]["target_sum"] > 0
    assert meta["train_slides"] == row["train_slides"] and meta["dataset"] == "synthetic"
    assert FOLD not in meta["train_slides"] + meta["val_slides"]


# ---- round trips ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["patch-cnn", "probe-mlp", "deepspot"])
def test_round_trip_gives_the_trained_predictions(method, trained, synthetic_root, tmp_path) -> None:
    """Reloading into the SAME output: a new job (the id carries the file's hash), not the trained row."""
    if method == "patch-cnn":
        out, row = trained
        out = tmp_path / "out"
        import shutil

        shutil.copytree(trained[0], out)
    else:
        out = tmp_path / "out"
        row = _run(method, synthetic_root, out, overrides=ONE_EPOCH)
    ckpt = _ckpt(out, row)
    again = _run(method, synthetic_root, out, ckpt, overrides=ONE_EPOCH)
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert again["job_id"] == f"{row['job_id']}__ckpt{sha[:12]}"
    assert again["checkpoint"]["from"] == str(ckpt) and again["checkpoint"]["sha256"] == sha
    assert again["checkpoint"]["trained_on"] == row["train_slides"]
    np.testing.assert_allclose(_pred(out, again), _pred(out, row), atol=1e-6, rtol=0)
    assert again["metrics"]["mse"] == pytest.approx(row["metrics"]["mse"], abs=1e-6)


def test_job_without_checkpoint_keeps_its_id_and_job_json() -> None:
    job = Job("patch-cnn", "synthetic", "loso", FOLD, 0)
    assert job.job_id == f"patch-cnn__synthetic__loso__{FOLD}__s0__{job.config_hash[:8]}"
    assert "checkpoint_sha256" not in job.to_dict()


def test_file_changed_after_planning_is_refused(trained, synthetic_root, tmp_path) -> None:
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(_ckpt(*trained).read_bytes())
    jobs = _jobs("patch-cnn", synthetic_root, ckpt, overrides=ONE_EPOCH)
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")
    with pytest.raises(StbenchError, match="changed since job"):
        runner.run_jobs(jobs, tmp_path / "out")


# ---- refusals -------------------------------------------------------------------------------------
def test_checkpoint_trained_on_the_test_slide_is_refused(trained, synthetic_root, tmp_path) -> None:
    out, row = trained
    fold = row["train_slides"][0]  # LOSO: the fold named after a training slide tests that slide
    msg = _expect_refusal(
        "patch-cnn", synthetic_root, tmp_path, _ckpt(out, row), fold=fold, overrides=ONE_EPOCH
    )
    assert f"slide(s) {fold} that this run tests on" in msg and "leakage" in msg


def test_checkpoint_of_another_panel_is_refused(trained, synthetic_root, tmp_path) -> None:
    out, row = trained
    ov = {**ONE_EPOCH, "data": {"gene_n": 20}}
    msg = _expect_refusal("patch-cnn", synthetic_root, tmp_path, _ckpt(out, row), overrides=ov)
    found = re.search(
        r"another gene panel \((\d+) genes in the checkpoint, (\d+) in this run's panel; (\d+) shared", msg
    )
    assert found and int(found[1]) == row["n_genes"] and int(found[2]) < row["n_genes"], msg


def test_same_size_panel_in_another_order_is_refused(trained, synthetic_root, tmp_path) -> None:
    """Same genes, same shapes, so the weights would load without error and score the wrong genes:
    here the panel is ordered by variance of raw counts instead of log counts."""
    out, row = trained
    ov = {**ONE_EPOCH, "data": {"gene_kwargs": {"order_on": "raw"}}}
    msg = _expect_refusal("patch-cnn", synthetic_root, tmp_path / "o", _ckpt(out, row), overrides=ov)
    assert "another gene panel" in msg and "the same genes in another order; first difference" in msg


def test_checkpoint_of_another_target_is_refused(trained, synthetic_root, tmp_path) -> None:
    out, row = trained
    ov = {**ONE_EPOCH, "data": {"target": "log2p1"}}
    msg = _expect_refusal("patch-cnn", synthetic_root, tmp_path, _ckpt(out, row), overrides=ov)
    assert f"another target transform ({row['target']} target_sum=" in msg and "log2p1" in msg


def test_checkpoint_of_another_method_is_refused(trained, synthetic_root, tmp_path) -> None:
    out, row = trained
    msg = _expect_refusal("mean", synthetic_root, tmp_path, _ckpt(out, row), config=None)
    assert "from method 'patch-cnn', this run is 'mean'" in msg


def test_checkpoint_without_metadata_is_refused(trained, synthetic_root, tmp_path) -> None:
    out, row = trained
    state = torch.load(_ckpt(out, row), map_location="cpu", weights_only=True)
    state.pop(META_KEY)
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    msg = _expect_refusal("patch-cnn", synthetic_root, tmp_path / "o", old, overrides=ONE_EPOCH)
    assert "carries no stbench metadata" in msg


def test_checkpoint_of_another_shape_is_one_line(trained, synthetic_root, tmp_path) -> None:
    out, row = trained
    state = torch.load(_ckpt(out, row), map_location="cpu", weights_only=True)
    key = next(k for k, v in state["state_dict"].items() if v.ndim == 2)
    state["state_dict"][key] = torch.zeros(3, 3)
    bad = tmp_path / "shape.ckpt"
    torch.save(state, bad)
    msg = _expect_refusal("patch-cnn", synthetic_root, tmp_path / "o", bad, overrides=ONE_EPOCH)
    assert "does not fit" in msg and key in msg
    assert not list((tmp_path / "o").glob("jobs/*/predictions/*.h5ad"))


def test_missing_file_is_refused_when_jobs_are_made(synthetic_root, tmp_path) -> None:
    with pytest.raises(StbenchError, match=r"checkpoint .*nope\.ckpt not found"):
        _jobs("patch-cnn", synthetic_root, tmp_path / "nope.ckpt")


def test_random_bytes_exit_2_with_one_line(synthetic_root, tmp_path) -> None:
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    stbench = str(Path(sys.executable).parent / "stbench")
    args = [
        "run",
        "--method",
        "patch-cnn",
        "--config",
        "tiny",
        "--dataset",
        "synthetic",
        "--folds",
        f"[{FOLD}]",
    ]
    res = subprocess.run(
        [stbench, *args, "--checkpoint", str(junk), "--output", str(tmp_path / "o"), "--data-root", str(synthetic_root)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "cannot read checkpoint" in ln]
    assert len(lines) == 1 and str(junk) in lines[0] and "weights_only" in lines[0]


# ---- message wording, without a run ---------------------------------------------------------------
def _meta(**kw: Any) -> dict[str, Any]:
    base = {
        "method": "m", "genes": ["A", "B", "C"], "target": {"method": "log1p", "target_sum": 1e4, "scale": None},
        "train_slides": ["S1"], "val_slides": ["S2"], "fold": "f", "dataset": "d",
    }  # fmt: skip
    return {**base, **kw}


def test_every_mismatch_is_named_in_one_line() -> None:
    ck = LoadedCheckpoint("x.ckpt", {META_KEY: _meta()}, {})
    run = _meta(
        method="n", genes=["A", "D"], target={"method": "log1p", "target_sum": 1e4, "scale": "zscore"}
    )
    with pytest.raises(StbenchError) as err:
        check_compatible(ck, run, ["S2", "S9"])
    msg = str(err.value)
    assert "\n" not in msg
    assert "from method 'm', this run is 'n'" in msg
    assert "slide(s) S2 that this run tests on" in msg  # validation slides count as seen
    assert "3 genes in the checkpoint, 2 in this run's panel; 1 shared; first difference at position 1" in msg
    assert "log1p+zscore" in msg
    check_compatible(ck, _meta(), ["S9"])  # the same fold's own test slide passes
