"""Runner overhead per job: what `run_job` costs around the model, with `mean` on the synthetic dataset.

`mean` does no training (one pass over the training targets), so nearly all of a job's wall time
is the runner's own work. The script runs the real `runner.run_job` and times its phases by
wrapping the functions it calls (nothing is re-implemented, so the breakdown follows the runner
as it changes):

  dataset open      runner.open_dataset + runner.plan (manifest, protocol folds)
  DataModule setup  STDataModule.prepare_data + setup (of which: loading the cached slides)
  method stages     Trainer.fit and the method's run_stage_* (mean: averaging the training targets)
  Trainer creation  runner._trainer (callbacks, loggers, accelerator detection)
  predict           Trainer.predict + gathering the rank files
  evaluate          evaluate_fold (of which: the metrics, and writing the predictions .h5ad)
  provenance        git state, package versions, hardware, peak memory
  row write         append_row (lock, re-read, atomic replace) + job.json + gene panel
  other             the rest of run_job (seeding, method construction, bookkeeping)

The reference is bare numpy on the same arrays: the training-set mean per gene broadcast to the
test spots, then MSE, MAE and gene-wise PCC (constant genes excluded), the best of 20 runs. The
ratio says how many times the bare computation a job costs. The first job of a process also pays
one-off costs (lazy imports, accelerator probing); it is reported apart from the warm median.

Run: `python benchmarks/speed/runner_overhead.py [--repeats 5] [--fold P0S0] [--data-root DIR]`
(synthetic data are generated on first use; a temporary data root is used unless --data-root).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

PHASES = (
    ("dataset open", 0),
    ("DataModule setup", 0),
    ("load slides (cached)", 1),
    ("method stages", 0),
    ("Trainer creation", 0),
    ("predict", 0),
    ("evaluate", 0),
    ("metrics", 1),
    ("save predictions .h5ad", 1),
    ("provenance", 0),
    ("row write", 0),
)


class Timers:
    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self.captured: dict[str, Any] = {}

    def wrap(self, owner: Any, attr: str, phase: str, capture: str | None = None) -> Callable[[], None]:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.t[phase] += time.perf_counter() - t0
                if capture:
                    self.captured[capture] = args

        setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, original)


@contextlib.contextmanager
def instrumented(timers: Timers) -> Iterator[None]:
    import lightning as L

    from stbench.benchmark import evaluate, provenance, runner
    from stbench.data import datamodule
    from stbench.data.dataset import Dataset
    from stbench.methods.registry import get_method

    method_cls = get_method("mean")
    undo = [
        timers.wrap(runner, "open_dataset", "dataset open"),
        timers.wrap(runner, "plan", "dataset open"),
        timers.wrap(datamodule.STDataModule, "prepare_data", "DataModule setup"),
        timers.wrap(datamodule.STDataModule, "setup", "DataModule setup"),
        timers.wrap(Dataset, "load_slides", "load slides (cached)"),
        timers.wrap(L.Trainer, "fit", "method stages"),
        timers.wrap(runner, "_trainer", "Trainer creation"),
        timers.wrap(L.Trainer, "predict", "predict"),
        timers.wrap(runner, "gather_predictions", "predict"),
        timers.wrap(evaluate, "evaluate_fold", "evaluate", capture="evaluate_fold"),
        timers.wrap(evaluate, "slide_metrics", "metrics"),
        timers.wrap(evaluate, "_save_predictions", "save predictions .h5ad"),
        timers.wrap(runner, "append_row", "row write"),
        timers.wrap(runner, "write_json_atomic", "row write"),
    ]
    undo += [
        timers.wrap(method_cls, a, "method stages") for a in dir(method_cls) if a.startswith("run_stage_")
    ]
    undo += [
        timers.wrap(provenance, a, "provenance")
        for a in ("git_state", "package_versions", "hardware", "peak_memory_mb")
    ]
    from stbench.data.genes import GenePanel

    undo.append(timers.wrap(GenePanel, "save", "row write"))
    try:
        yield
    finally:
        for u in reversed(undo):
            u()


def run_once(job: Any, output: Path) -> tuple[float, Timers]:
    from stbench.benchmark import runner

    timers = Timers()
    with instrumented(timers):
        t0 = time.perf_counter()
        runner.run_job(job, output, loggers=("csv",))
        total = time.perf_counter() - t0
    return total, timers


def numpy_reference(dm: Any, repeats: int = 20) -> float:
    """Seconds for the bare computation: training mean per gene, broadcast, MSE, MAE, gene-wise PCC."""
    table = dm.spot_table
    train_parts = []
    for slide in dm.train_slides:
        ids = table.loc[(table["slide"] == slide) & (table["split"] == "train"), "spot_id"]
        train_parts.append(dm.targets(slide).loc[ids].to_numpy(np.float32))
    train = np.concatenate(train_parts)
    truth = np.concatenate([dm.targets(s).to_numpy(np.float32) for s in dm.test_slides])

    def compute() -> tuple[float, float, float]:
        pred = np.broadcast_to(train.mean(0), truth.shape)
        err = pred - truth
        mse, mae = float(np.mean(err * err)), float(np.mean(np.abs(err)))
        tc, pc = truth - truth.mean(0), pred - pred.mean(0)
        num = (tc * pc).sum(0)
        den = np.sqrt((tc * tc).sum(0) * (pc * pc).sum(0))
        ok = den > 0  # constant genes excluded (here: all of them, the prediction is constant)
        pcc = float(np.mean(num[ok] / den[ok])) if ok.any() else float("nan")
        return mse, mae, pcc

    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        compute()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="jobs to time (the first is reported as cold)")
    ap.add_argument("--fold", default=None, help="synthetic LOSO fold (default: the first)")
    ap.add_argument(
        "--data-root", default=None, help="default: a temporary folder (synthetic generated there)"
    )
    args = ap.parse_args()
    import lightning  # noqa: F401 - configures its loggers on import; quieten them afterwards

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    with tempfile.TemporaryDirectory(prefix="stbench-overhead-") as tmp:
        root = args.data_root or str(Path(tmp) / "data")
        from stbench.benchmark.runner import expand_jobs, open_dataset

        t0 = time.perf_counter()
        open_dataset("synthetic", root)  # generation is a one-off, not per-job overhead
        gen = time.perf_counter() - t0
        job = expand_jobs(
            "mean", "synthetic", "loso", folds=[args.fold] if args.fold else None, seeds=[0], data_root=root
        )[0]
        runs = [run_once(job, Path(tmp) / f"out{i}") for i in range(max(2, args.repeats))]
        dm = runs[-1][1].captured["evaluate_fold"][0]
        ref = numpy_reference(dm)

    cold_total, cold = runs[0]
    warm = runs[1:]
    warm_total = statistics.median(t for t, _ in warm)
    rows = []
    accounted_cold = accounted_warm = 0.0
    for phase, level in PHASES:
        w = statistics.median(tm.t.get(phase, 0.0) for _, tm in warm)
        c = cold.t.get(phase, 0.0)
        if level == 0:
            accounted_cold += c
            accounted_warm += w
        rows.append(((" - " if level else "") + phase, c, w))
    rows.append(("other", cold_total - accounted_cold, warm_total - accounted_warm))

    n_spots, n_genes = len(dm.spot_table[dm.spot_table["split"] == "test"]), dm.n_genes
    print(
        f"runner overhead per job: mean on synthetic, fold {job.fold}, {n_spots} test spots x {n_genes} genes, "
        f"{len(warm)} warm job(s); CPU threads {os.cpu_count()}; synthetic generation (once) {gen:.2f} s"
    )
    print()
    print(f"| {'phase':<26} | {'cold ms':>9} | {'warm ms':>9} | {'warm %':>6} |")
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 11}|{'-' * 8}|")
    for name, c, w in rows:
        print(f"| {name:<26} | {c * 1e3:>9.1f} | {w * 1e3:>9.1f} | {100 * w / warm_total:>5.1f}% |")
    print(f"| {'run_job total':<26} | {cold_total * 1e3:>9.1f} | {warm_total * 1e3:>9.1f} | {100:>5.1f}% |")
    print()
    print(f"bare numpy (mean prediction + MSE, MAE, gene-wise PCC, best of 20): {ref * 1e3:.3f} ms")
    print(f"ratio run_job / numpy: warm {warm_total / ref:,.0f}x, cold {cold_total / ref:,.0f}x")


if __name__ == "__main__":
    main()
