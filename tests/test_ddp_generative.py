"""Generative methods sample under DDP exactly as in one process (2 processes, gloo, CPU).

HINGE, Stem and STFlow draw their sampling noise from generators seeded by the spots' global
indices (stbench.methods.sampling), never from the global RNG, so the rank that holds a spot, the
batch it shares and DistributedSampler's padding must not change its prediction. Runs the real CLI
(Lightning's DDP launcher re-executes the command line). Synthetic slide P0S0 (131 spots).
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


def _base(method: str) -> list[str]:
    return [
        "run",
        "--method",
        method,
        "--config",
        "tiny",
        "--dataset",
        "synthetic",
        "--folds",
        "[P0S0]",
        "--seeds",
        "[0]",
    ]


def _run(args: list[str], data_root: Path) -> dict:
    out = Path(args[args.index("--output") + 1])
    res = subprocess.run(
        [STBENCH, *args, "--data-root", str(data_root)], capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    return rows[0]


@pytest.mark.parametrize("method", ["hinge", "stem", "stflow"])
def test_sampled_predictions_are_the_same_on_two_ranks(
    method: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp(f"ddp-{method}")
    data_root = root / "data"
    base = _base(method)
    train = _run(
        [
            *base,
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.check_val_every_n_epoch",
            "1",
            "--output",
            str(root / "t"),
        ],
        data_root,
    )
    ckpt = root / "t" / "jobs" / train["job_id"] / "checkpoints" / "best.ckpt"
    assert ckpt.exists()
    r1 = _run([*base, "--checkpoint", str(ckpt), "--output", str(root / "one")], data_root)
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    r2 = _run([*base, "--checkpoint", str(ckpt), *ddp, "--output", str(root / "two")], data_root)
    assert r2["provenance"]["hardware"]["devices"] == 2
    assert r1["predictions"]["unique"] == r2["predictions"]["unique"] == 131
    p1, p2 = (
        ad.read_h5ad(root / name / "jobs" / r["job_id"] / "predictions" / "P0S0.h5ad")
        for name, r in (("one", r1), ("two", r2))
    )
    assert list(p1.obs_names) == list(p2.obs_names)
    np.testing.assert_allclose(p1.X, p2.X, atol=1e-5, rtol=0)
    assert r2["metrics"]["pcc"] == pytest.approx(r1["metrics"]["pcc"], abs=1e-5)


def test_two_stage_method_trains_under_ddp_and_predicts_like_one_process(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """DiffBulk's stage I runs under its own Trainer built like the job's (2 gloo ranks here), then
    stage II under the job's Trainer; the stage I file is written once, and a 2-rank prediction of
    the trained checkpoint equals the 1-rank one (per-spot seeded feature noise)."""
    root = tmp_path_factory.mktemp("ddp-diffbulk")
    data_root = root / "data"
    base = [*_base("diffbulk"), "--method.stage1_steps", "6"]
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    fit = ["--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1"]
    train = _run([*base, *fit, *ddp, "--output", str(root / "t")], data_root)
    job = root / "t" / "jobs" / train["job_id"]
    assert (job / "stage1" / "stage1.safetensors").exists()
    assert train["weights"] == "fm=none; stage1=trained in job (6 steps, power EMA 0.1)"
    ckpt = job / "checkpoints" / "best.ckpt"
    r1 = _run([*base, "--checkpoint", str(ckpt), "--output", str(root / "one")], data_root)
    r2 = _run([*base, "--checkpoint", str(ckpt), *ddp, "--output", str(root / "two")], data_root)
    p1, p2 = (
        ad.read_h5ad(root / name / "jobs" / r["job_id"] / "predictions" / "P0S0.h5ad")
        for name, r in (("one", r1), ("two", r2))
    )
    np.testing.assert_allclose(p1.X, p2.X, atol=1e-5, rtol=0)
    assert r1["weights"] == r2["weights"] == "fm=none; stage1=from the loaded checkpoint"


def test_generated_tiles_are_the_same_on_two_ranks(tmp_path_factory: pytest.TempPathFactory) -> None:
    """STMDiT (task image) trains under DDP, and a 2-rank generation of the trained checkpoint gives
    the same tiles as one process (per-spot seeded noise): identical FID per regime and oracle AUC."""
    root = tmp_path_factory.mktemp("ddp-stmdit")
    data_root = root / "data"
    base = [*_base("stmdit"), "--method.sample_steps", "3", "--evaluation.n_boot", "0"]
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    fit = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    train = _run([*base, *fit, *ddp, "--output", str(root / "t")], data_root)
    assert train["task"] == "image" and train["provenance"]["hardware"]["devices"] == 2
    ckpt = root / "t" / "jobs" / train["job_id"] / "checkpoints" / "best.ckpt"
    r1 = _run([*base, "--checkpoint", str(ckpt), "--output", str(root / "one")], data_root)
    r2 = _run([*base, "--checkpoint", str(ckpt), *ddp, "--output", str(root / "two")], data_root)
    assert r1["predictions"]["unique"] == r2["predictions"]["unique"] == 131
    assert r2["predictions"]["ranks"] == 2
    for key in ("fid_uni_ge", "fid_uni", "fid_ge", "fid_none", "oracle_auc"):
        assert r2["metrics"][key] == pytest.approx(r1["metrics"][key], rel=1e-6, abs=1e-9), key
