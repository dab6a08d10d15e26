"""Evaluate one fold on rank 0: per-slide metrics on de-duplicated predictions, saved predictions.

Truth comes from the DataModule's targets (never from predict batches, which carry none), in the
protocol's target space, aligned to predictions by the global spot index. The library sizes behind
`pcc_partial` come from the test slide's own counts (all genes), never from the method. The fold's
`pcc_pooled` (HEST-Bench's score) pools the spots of all its test slides.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stbench.data.genes import spot_totals
from stbench.metrics.expression import log_library_size
from stbench.metrics.report import pooled_metrics, slide_metrics
from stbench.metrics.spatial import spot_grid
from stbench.utils.io import atomic_path, write_text_atomic

UNLABELLED = {"unlabelled", "undetermined", "nan", ""}


def evaluate_fold(
    dm: Any, index: np.ndarray, pred: np.ndarray, jobdir: Path, job: Any, ks: Sequence[int]
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    table = dm.spot_table.loc[index]
    fixed = {k: list(dm.panel.top_k(k)) for k in ks}
    per_slide: dict[str, dict[str, Any]] = {}
    truths: list[np.ndarray] = []
    preds: list[np.ndarray] = []
    for slide_name in dm.test_slides:
        rows = np.flatnonzero(table["slide"].to_numpy() == slide_name)
        spot_ids = table["spot_id"].to_numpy()[rows].tolist()
        truth = dm.targets(slide_name).loc[spot_ids].to_numpy(np.float32)
        p = pred[rows].astype(np.float32)
        slide = dm.slides[slide_name]
        obs = slide.adata.obs.loc[spot_ids]
        totals = pd.Series(spot_totals(slide), index=slide.adata.obs_names).loc[spot_ids]
        per_slide[slide_name] = slide_metrics(
            truth,
            p,
            dm.genes,
            fixed_genes=fixed or None,
            grid=_grid(obs),
            labels=tissue_labels(obs),
            log_totals=log_library_size(totals.to_numpy()),
            seed=job.seed,
        )
        truths.append(truth)
        preds.append(p)
        _save_predictions(
            jobdir / "predictions" / f"{slide_name}.h5ad",
            p,
            truth,
            obs,
            slide.adata[spot_ids].obsm["spatial"],
            dm.genes,
            job,
            slide=slide,
            transform=dm.transform,
        )
    frame = pd.DataFrame.from_dict(per_slide, orient="index")
    frame.index.name = "slide"
    write_text_atomic(jobdir / "per_slide.csv", frame.to_csv())
    metrics = _mean_over_slides(per_slide)
    metrics.update(pooled_metrics(truths, preds))
    return per_slide, metrics


def _grid(obs: pd.DataFrame) -> np.ndarray | None:
    """Spot grid cells for SSIM from array coordinates; None (SSIM skipped) when there are none."""
    for cx, cy in (("array_x", "array_y"), ("array_col", "array_row")):
        if cx in obs.columns and cy in obs.columns:
            try:
                return spot_grid(np.stack([obs[cx].to_numpy(float), obs[cy].to_numpy(float)], axis=1), 1.0)
            except ValueError:
                return None
    return None


def tissue_labels(obs: pd.DataFrame) -> list[str] | None:
    if "label" not in obs.columns:
        return None
    labels = obs["label"].astype(str).tolist()
    return labels if len({x for x in labels if x.lower() not in UNLABELLED}) >= 2 else None


def _mean_over_slides(per_slide: dict[str, dict[str, Any]]) -> dict[str, Any]:
    keys = sorted({k for m in per_slide.values() for k in m})
    out: dict[str, Any] = {}
    for k in keys:
        vals = [m.get(k) for m in per_slide.values()]
        nums = [float(v) for v in vals if v is not None and not (isinstance(v, float) and np.isnan(v))]
        if k.endswith(("_n", "_excluded", "_excluded_truth", "_excluded_pred")) or k in (
            "n_spots",
            "n_genes",
        ):
            out[k] = int(sum(nums)) if nums else None
        else:
            out[k] = float(np.mean(nums)) if nums else None
    return out


def _save_predictions(
    path: Path,
    pred: np.ndarray,
    truth: np.ndarray,
    obs: pd.DataFrame,
    spatial: np.ndarray,
    genes: Sequence[str],
    job: Any,
    slide: Any | None = None,
    transform: Any | None = None,
) -> None:
    """One test slide's predictions as an .h5ad that scanpy/squidpy plot directly: X and
    layers["truth"] as scored, obsm["spatial"], uns["spatial"][slide] (low-res H&E + scalefactors,
    when `slide` is given) and provenance in uns["stbench"]."""
    from stbench.benchmark.spatial_h5ad import (
        job_provenance,
        prediction_adata,
        slide_spatial,
        transform_provenance,
    )

    keep = [c for c in ("slide", "patient", "label", "array_x", "array_y") if c in obs.columns]
    provenance = {
        **job_provenance(job),
        "space": "protocol target space (X = prediction, layers['truth'] = truth)",
        **transform_provenance(transform),
    }
    uns_spatial = slide_spatial(slide, {"dataset": job.dataset}) if slide is not None else None
    a = prediction_adata(pred, obs[keep].copy(), spatial, list(genes), provenance, uns_spatial, truth=truth)
    with atomic_path(path) as tmp:
        a.write_h5ad(tmp)
