"""`pcc_pooled` as HEST-Bench computes it: the test slides of a fold concatenated, one Pearson per gene
over the pooled spots, np.mean over genes (a constant gene gives NaN there, None here). Checked against
an independent numpy computation, on evaluate_fold with a stub DataModule and through the runner."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from stbench.benchmark.evaluate import evaluate_fold
from stbench.metrics import describe, pcc, pcc_pooled, pooled_metrics


def _hest_reference(truths: list[np.ndarray], preds: list[np.ndarray]) -> float:
    """Independent: np.concatenate, per-gene np.corrcoef, np.mean (NaN propagates, as in HEST)."""
    t, p = np.concatenate(truths), np.concatenate(preds)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        r = [np.corrcoef(t[:, j], p[:, j])[0, 1] for j in range(t.shape[1])]
    return float(np.mean(r))


def _slides(seed: int, sizes: tuple[int, ...], g: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    truths, preds = [], []
    for i, n in enumerate(sizes):
        t = 1.5 * i + rng.gamma(2.0, 1.0, size=(n, g))  # slides differ in level
        truths.append(t)
        preds.append(0.8 * i + t + rng.normal(scale=1.2, size=(n, g)))
    return truths, preds


def test_pooled_equals_numpy_concatenate_corrcoef_mean_on_three_slides():
    truths, preds = _slides(0, (70, 110, 45), 30)
    res = pcc_pooled(truths, preds)
    ref = _hest_reference(truths, preds)
    assert abs(res.value - ref) < 1e-9
    assert (res.n, res.excluded) == (30, 0)
    per_slide = np.mean([pcc(t, p).value for t, p in zip(truths, preds, strict=True)])
    assert abs(res.value - per_slide) > 0.01  # pooling is a different number


def test_one_constant_gene_makes_the_hest_mean_undefined():
    truths, preds = _slides(1, (60, 60), 12)
    for p in preds:
        p[:, 3] = 0.25  # predicted constant over every pooled spot
    assert np.isnan(_hest_reference(truths, preds))  # HEST's np.mean of a NaN pearsonr
    res = pcc_pooled(truths, preds)
    assert res.value is None and (res.n, res.excluded, res.excluded_pred) == (11, 1, 1)
    row = pooled_metrics(truths, preds)
    assert row["pcc_pooled"] is None and row["pcc_pooled_excluded"] == 1
    assert describe(row, "pcc_pooled") == "n/a (1 of 12 genes constant; HEST's mean over genes is undefined)"
    # the per-slide `pcc` keeps its own rule: exclude and count, average the rest
    assert pcc(truths[0], preds[0]).value is not None
    # constant within one slide only is not constant over the pooled spots
    truths, preds = _slides(2, (60, 60), 12)
    truths[0][:, 5] = 1.0
    assert abs(pcc_pooled(truths, preds).value - _hest_reference(truths, preds)) < 1e-9


def test_one_slide_fold_is_the_slide_gene_mean_under_the_hest_rule():
    truths, preds = _slides(3, (90,), 15)
    assert pcc_pooled(truths, preds).value == pytest.approx(pcc(truths[0], preds[0]).value, abs=1e-12)
    preds[0][:, 0] = 1.0
    assert pcc(truths[0], preds[0]).value is not None and pcc_pooled(truths, preds).value is None


def _stub_fold(tmp_path: Path) -> tuple[SimpleNamespace, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Two test slides; raw counts hold 12 genes, the panel 5 of them (so totals != panel sums)."""
    rng = np.random.default_rng(7)
    genes = [f"g{j}" for j in range(5)]
    slides, targets, tables, all_totals = {}, {}, [], {}
    for name, n in (("S1", 40), ("S2", 55)):
        counts = rng.poisson(rng.gamma(2.0, 4.0, size=(n, 1)) * np.ones((1, 12))).astype(np.float32)
        ids = [f"{name}_{i}" for i in range(n)]
        obs = pd.DataFrame({"array_x": np.arange(n) % 8, "array_y": np.arange(n) // 8}, index=ids)
        adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(12)]))
        adata.obsm["spatial"] = rng.uniform(0, 100, size=(n, 2))
        slides[name] = SimpleNamespace(adata=adata, name=name, image=None, mpp=1.0, spot_diameter_px=55.0)
        targets[name] = pd.DataFrame(np.log1p(counts[:, :5]), index=ids, columns=genes)
        tables.append(pd.DataFrame({"slide": name, "spot_id": ids}))
        all_totals[name] = counts.sum(axis=1).astype(np.float64)
    table = pd.concat(tables, ignore_index=True)
    order = rng.permutation(len(table))  # gathered predictions arrive in any order
    truth_all = np.concatenate([targets[s].to_numpy() for s in ("S1", "S2")])
    pred_all = truth_all + rng.normal(scale=0.8, size=truth_all.shape)
    dm = SimpleNamespace(
        spot_table=table,
        panel=SimpleNamespace(top_k=lambda k: genes[:k]),
        test_slides=["S1", "S2"],
        targets=lambda s: targets[s],
        slides=slides,
        genes=genes,
        transform=None,
    )
    return dm, table.index.to_numpy()[order], pred_all[order], all_totals


def test_evaluate_fold_reports_hest_pooled_and_partial_from_the_slides_totals(tmp_path: Path):
    dm, index, pred, totals = _stub_fold(tmp_path)
    job = SimpleNamespace(
        job_id="j", method="m", dataset="d", protocol="hest", fold="f", seed=0,
        config_name="c", config_hash="h", config={},
    )  # fmt: skip
    per_slide, metrics = evaluate_fold(dm, index, pred, tmp_path, job, ks=[])
    table = dm.spot_table.loc[index]
    truths, preds = [], []
    for s in ("S1", "S2"):
        rows = np.flatnonzero(table["slide"].to_numpy() == s)
        ids = table["spot_id"].to_numpy()[rows]
        truths.append(dm.targets(s).loc[ids].to_numpy(np.float32))
        preds.append(pred[rows].astype(np.float32))
        pos = [int(i.split("_")[1]) for i in ids]
        z = np.log(np.maximum(totals[s][pos], 1.0))
        d = np.column_stack([np.ones_like(z), z])
        t64, p64 = truths[-1].astype(np.float64), preds[-1].astype(np.float64)
        rt = t64 - d @ np.linalg.lstsq(d, t64, rcond=None)[0]
        rp = p64 - d @ np.linalg.lstsq(d, p64, rcond=None)[0]
        ref = np.mean([np.corrcoef(rt[:, j], rp[:, j])[0, 1] for j in range(5)])
        assert abs(per_slide[s]["pcc_partial"] - ref) < 1e-9
        assert not np.allclose(totals[s][pos], np.expm1(t64).sum(axis=1))  # all genes != panel sums
    assert abs(metrics["pcc_pooled"] - _hest_reference(truths, preds)) < 1e-9
    assert metrics["pcc_pooled_n"] == 5 and metrics["pcc_pooled_excluded"] == 0
    assert metrics["pcc_partial"] == pytest.approx(np.mean([per_slide[s]["pcc_partial"] for s in per_slide]))
    assert "pcc_pooled" not in per_slide["S1"]


def test_runner_row_of_a_two_slide_hest_fold_carries_the_hest_pooled_pcc(tmp_path: Path):
    """End to end: `hest` protocol, one fold testing on two slides; the row's pcc_pooled equals the
    numpy computation on the saved predictions (X = prediction, layers['truth'])."""
    from stbench.benchmark.runner import expand_jobs, run_jobs
    from stbench.data.prepare import prepare
    from tests.fixtures.hest_layout import SAMPLES, write_hest

    ids = tuple(SAMPLES)[:3]
    src = tmp_path / "task"
    write_hest(src, ids=ids, n_genes=10)
    (src / "splits").mkdir()
    (src / "splits" / "train_0.csv").write_text(f"sample_id\n{ids[2]}\n")
    (src / "splits" / "test_0.csv").write_text(f"sample_id\n{ids[0]}\n{ids[1]}\n")
    (src / "var_50genes.json").write_text(json.dumps({"genes": ["G3", "G1", "G5", "G2"]}))
    prepare("hest-bench-idc", tmp_path / "data", src)
    jobs = expand_jobs("depth", "hest-bench-idc", protocol="hest", data_root=str(tmp_path / "data"))
    (row,) = run_jobs(jobs, tmp_path / "out")
    assert sorted(row["test_slides"]) == sorted(ids[:2])
    saved = [
        ad.read_h5ad(tmp_path / "out" / "jobs" / row["job_id"] / "predictions" / f"{s}.h5ad")
        for s in row["test_slides"]
    ]
    truths = [np.asarray(a.layers["truth"], dtype=np.float64) for a in saved]
    preds = [np.asarray(a.X, dtype=np.float64) for a in saved]
    ref = _hest_reference(truths, preds)
    assert np.isfinite(ref) and abs(row["metrics"]["pcc_pooled"] - ref) < 1e-9
    assert row["metrics"]["pcc_pooled_n"] == 4
    for s in row["test_slides"]:  # depth is linear in log(max(total, 1)): nothing beyond depth
        assert row["per_slide"][s]["pcc_partial"] is None
        assert row["per_slide"][s]["pcc_partial_excluded_pred"] == 4
