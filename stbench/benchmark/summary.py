"""The table `stbench run` prints: one line per fold and seed, then mean ± sd over them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stbench.benchmark.results import IMAGE_METRICS, row_kind
from stbench.benchmark.store import RESULTS, read_results
from stbench.metrics.report import describe
from stbench.utils.table import print_rows

COLUMNS = ("pcc", "pcc_partial", "pcc_pooled", "pcc50", "pcc200", "pcc_spot", "mse", "mae", "ssim")
IMAGE_COLUMNS = IMAGE_METRICS[:7]  # FID per regime, delta, oracle AUC and its ceiling
CAPTIONS = {
    "expression": "pcc = gene-wise PCC per test slide, mean over genes (constant genes excluded; n/a = all "
    "excluded, e.g. a constant predictor); pcc_partial = the same given log library size; pcc_pooled "
    "= over the fold's test spots pooled; pcc{k} = k genes fixed by training variance; mse/mae in the "
    "protocol's target space; (reference) = a yardstick row, not a method",
    "image": "fid_<regime> = FID of generated vs real test tiles (regimes: conditions kept by the sampler); "
    "fid_delta = fid_uni_ge - fid_uni; oracle_auc = mean per-gene PCC over the k grid of a training-split "
    "oracle on generated tiles (_ceiling: on real tiles); encoders in the row's image_metrics",
}


def _name(row: dict[str, Any]) -> str:
    return row["method"] + (" (reference)" if row_kind(row) == "reference" else "")


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    columns = IMAGE_COLUMNS if any(r.get("task") == "image" for r in rows) else COLUMNS
    cols = [c for c in columns if any(c in r["metrics"] for r in rows)]
    out = []
    for r in sorted(rows, key=lambda r: (r["method"], r["fold"], r["seed"])):
        out.append(
            {
                "method": _name(r),
                "fold": r["fold"],
                "seed": r["seed"],
                "genes": r["n_genes"],
                **{c: describe(r["metrics"], c) for c in cols},
                "weights": r["weights"],
            }
        )
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_method.setdefault(_name(r), []).append(r)
    for method, rs in sorted(by_method.items()):
        agg: dict[str, Any] = {"method": method, "fold": f"mean ± sd ({len(rs)})", "seed": "", "genes": ""}
        for c in cols:
            vals = [r["metrics"].get(c) for r in rs if r["metrics"].get(c) is not None]
            agg[c] = (
                f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0.0:.3f}"
                if vals
                else "n/a"
            )
        agg["weights"] = rs[0]["weights"]
        out.append(agg)
    return out


def print_summary(output: Path, job_ids: set[str] | None = None) -> None:
    rows = [r for r in read_results(output / RESULTS) if job_ids is None or r["job_id"] in job_ids]
    if not rows:
        return
    r0 = rows[0]
    print_rows(
        summary_rows(rows),
        title=f"{r0['dataset']} / protocol {r0['protocol']} / genes: {r0['gene_set']}",
        caption=CAPTIONS.get(r0.get("task", "expression"), CAPTIONS["expression"]),
    )
