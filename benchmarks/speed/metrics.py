"""Metric speed: stbench's vectorised metrics on 20,000 genes x 5,000 spots vs per-item scipy loops.

The reference is what evaluation notebooks usually do: one `scipy.stats.pearsonr` call per gene
(per spot for spot-wise PCC). The full loop takes a while, so by default it runs on a subset of
`--loop-items` genes / spots and is extrapolated linearly (marked "extrapolated" in the table);
`--full-loop` runs it on everything. The loop's r values are also compared to the vectorised ones
on the subset (max |difference| printed), so the speed-up is for the same numbers.

Run: `python benchmarks/speed/metrics.py [--genes 20000] [--spots 5000] [--loop-items 1000]
[--full-loop] [--seed 0]`. Data are synthetic (log1p of Poisson counts, float32, as predictions
are stored); timings are the best of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import numpy as np
from scipy import stats

from stbench.metrics import (
    coexpr,
    genewise_pcc,
    mae,
    mse,
    pcc_spot,
    rvd,
    slide_metrics,
    spot_grid,
    ssim,
)
from stbench.metrics.clustering import ari


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = np.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def make_data(spots: int, genes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rate = rng.gamma(0.6, 2.0, size=genes).astype(np.float32)
    truth = np.log1p(rng.poisson(rate, size=(spots, genes)).astype(np.float32))
    pred = truth + rng.normal(0, 0.5, size=truth.shape).astype(np.float32)
    return truth, pred


def loop_pearson(a: np.ndarray, b: np.ndarray, axis: int, items: np.ndarray) -> np.ndarray:
    take = (lambda x, i: x[:, i]) if axis == 1 else (lambda x, i: x[i])
    out = np.full(len(items), np.nan)
    for k, i in enumerate(items):
        x, y = take(a, i).astype(np.float64), take(b, i).astype(np.float64)  # as the vectorised code
        if np.ptp(x) > 0 and np.ptp(y) > 0:
            out[k] = stats.pearsonr(x, y)[0]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--spots", type=int, default=5_000)
    ap.add_argument("--loop-items", type=int, default=1_000, help="genes/spots timed in the scipy loop")
    ap.add_argument("--full-loop", action="store_true", help="run the scipy loop on every gene/spot")
    ap.add_argument("--coexpr-genes", type=int, default=2_000, help="genes for coexpr (cost ~ G^2)")
    ap.add_argument("--ari-genes", type=int, default=300, help="genes for ARI (a declared set, e.g. HMHVG)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    truth, pred = make_data(args.spots, args.genes, args.seed)
    print(
        f"data: {args.spots} spots x {args.genes} genes, float32; {platform.processor() or platform.machine()}, "
        f"numpy {np.__version__}"
    )
    rows: list[tuple[str, float, str, str, str]] = []  # name, vectorised s, loop s, ratio, note

    def loop_row(name: str, axis: int, vec_s: float, vec_r: np.ndarray) -> None:
        n_items = truth.shape[axis]
        k = n_items if args.full_loop else min(args.loop_items, n_items)
        items = (
            np.random.default_rng(1).choice(n_items, k, replace=False) if k < n_items else np.arange(n_items)
        )
        loop_s, ref = best_of(lambda: loop_pearson(truth, pred, axis, items), 1)
        total = loop_s * n_items / k
        ok = ~np.isnan(ref)
        diff = float(np.max(np.abs(ref[ok] - vec_r[items][ok]))) if ok.any() else 0.0
        how = "measured" if k == n_items else f"extrapolated from {k}"
        rows.append((name, vec_s, f"{total:.2f}", f"{total / vec_s:.1f}x", f"{how}; max|dr| = {diff:.1e}"))

    s, corr = best_of(lambda: genewise_pcc(truth, pred), args.repeats)
    loop_row("pcc (gene-wise)", 1, s, corr.r)
    s, _ = best_of(lambda: pcc_spot(truth, pred), args.repeats)
    spot_r = genewise_pcc(truth.T, pred.T).r
    loop_row("pcc_spot (spot-wise)", 0, s, spot_r)
    for name, fn in (("mse", mse), ("mae", mae), ("rvd", rvd)):
        s, _ = best_of(lambda fn=fn: fn(truth, pred), args.repeats)
        rows.append((name, s, "-", "-", ""))

    side = int(np.ceil(np.sqrt(args.spots)))
    cells = spot_grid(np.array([[i % side, i // side] for i in range(args.spots)], dtype=float))
    s, _ = best_of(lambda: ssim(truth, pred, cells), 1)
    rows.append(("ssim (7x7 window)", s, "-", "-", f"{side}x{side} grid"))

    g = min(args.coexpr_genes, args.genes)
    s, _ = best_of(lambda: coexpr(truth[:, :g], pred[:, :g]), 1)
    rows.append((f"coexpr ({g} genes)", s, "-", "-", "G x G: cost grows with G^2"))
    labels = (np.arange(args.spots) * 5 // args.spots).astype(str)
    ga = min(args.ari_genes, args.genes)
    s, _ = best_of(lambda: ari(pred[:, :ga], labels), 1)
    rows.append((f"ari ({ga} genes, k=5)", s, "-", "-", "exact PCA-20 (full SVD) + k-means, n_init=10"))

    genes = [f"g{j}" for j in range(args.genes)]
    fixed = {50: genes[:50], 200: genes[:200]}
    metrics = ["pcc", "pcc_k", "pcc_posthoc", "pcc_spot", "mse", "mae", "rvd", "ssim"]
    s, _ = best_of(
        lambda: slide_metrics(truth, pred, genes, fixed_genes=fixed, grid=cells, metrics=metrics), 1
    )
    rows.append(("slide_metrics (all but coexpr/ari)", s, "-", "-", ", ".join(metrics)))

    try:
        import torch

        from stbench.metrics import GenewisePCC

        def streamed() -> object:
            m = GenewisePCC(args.genes)
            for a in range(0, args.spots, 512):
                m.update(torch.from_numpy(pred[a : a + 512]), torch.from_numpy(truth[a : a + 512]))
            return m.compute()

        s, _ = best_of(streamed, 1)
        rows.append(("GenewisePCC (torchmetrics, 512-spot batches)", s, "-", "-", "float64 sums"))
    except ImportError:
        pass

    width = max(len(r[0]) for r in rows)
    print(f"\n{'metric':<{width}}  {'vectorised s':>12}  {'scipy loop s':>12}  {'ratio':>8}  note")
    print("-" * (width + 60))
    for name, vec_s, loop_s, ratio, note in rows:
        print(f"{name:<{width}}  {vec_s:>12.2f}  {loop_s:>12}  {ratio:>8}  {note}")


if __name__ == "__main__":
    main()
