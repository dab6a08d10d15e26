"""Training and prediction throughput (spots/s) and peak memory of each method's tiny config on CPU.

Each method runs as ONE real job of the runner (`runner.run_job`, its `tiny` config, one fold, seed
0) in a fresh worker process, so peak memory (Linux VmHWM of that process) belongs to that method
alone. `Trainer.fit` and `Trainer.predict` are timed by wrapping them; the method's other stages
(feature extraction happens in DataModule setup, retrieval references in predict) are reported as
they fall. Throughput:

  train spots/s    training spots x epochs run / fit seconds (validation passes included, as a
                   user pays them)
  predict spots/s  test spots / predict seconds
  setup s          DataModule prepare + setup: patch stores, frozen-feature extraction, targets
  peak MB          the worker's resident-memory high-water mark

The reference row is `mean` (no training): its numbers are the runner's floor on the same fold.
Timings on a shared 2-CPU machine are noisy; compare orders of magnitude and ratios.

Run: python benchmarks/speed/training_throughput.py [--dataset her2st|synthetic] [--fold B4]
     [--methods stnet bleep ...] [--data-root DIR] [--out FILE.md]
Her2ST needs `stbench data prepare her2st --source ../shared/data/her2st` under the data root first
(the script prepares it from ../shared/data/her2st when that exists).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_METHODS = (
    "mean",
    "patch-cnn",
    "stnet",
    "deepspace",
    "histogene",
    "hist2st",
    "bleep",
    "triplex",
    "merge",
    "deepspot",
    "hinge",
    "stem",
    "stflow",
)


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_one(method: str, dataset: str, fold: str, data_root: str, output: str) -> dict[str, Any]:
    """Run one job with timers around the Trainer's fit and predict and the DataModule's setup."""
    import lightning as L

    import stbench.benchmark.runner as runner
    from stbench.data.datamodule import STDataModule

    times: dict[str, float] = {"fit": 0.0, "predict": 0.0, "setup": 0.0}
    counts: dict[str, int] = {}

    def timed(key: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[key] += time.perf_counter() - t0

        return wrapper

    fit, predict = L.Trainer.fit, L.Trainer.predict
    prepare, setup = STDataModule.prepare_data, STDataModule.setup

    def fit_and_count(self: Any, model: Any, *a: Any, **kw: Any) -> Any:
        out = timed("fit", fit)(self, model, *a, **kw)
        counts["epochs"] = int(self.current_epoch)
        return out

    def setup_and_count(self: Any, *a: Any, **kw: Any) -> Any:
        out = timed("setup", setup)(self, *a, **kw)
        t = self.spot_table
        counts["train"] = int((t["split"] == "train").sum())
        counts["test"] = int((t["split"] == "test").sum())
        return out

    L.Trainer.fit = fit_and_count  # type: ignore[method-assign]
    L.Trainer.predict = timed("predict", predict)  # type: ignore[method-assign]
    STDataModule.prepare_data = timed("setup", prepare)  # type: ignore[method-assign]
    STDataModule.setup = setup_and_count  # type: ignore[method-assign]
    config = None if method == "mean" else "tiny"
    jobs = runner.expand_jobs(method, dataset, folds=[fold], seeds=[0], config=config, data_root=data_root)
    t0 = time.perf_counter()
    row = runner.run_jobs(jobs, output)[0]
    wall = time.perf_counter() - t0
    epochs = counts.get("epochs", 0)
    return {
        "method": method,
        "dataset": dataset,
        "fold": fold,
        "train_spots": counts.get("train", 0),
        "epochs": epochs,
        "fit_s": round(times["fit"], 2),
        "train_spots_per_s": round(counts.get("train", 0) * epochs / times["fit"], 1)
        if times["fit"]
        else None,
        "predict_spots_per_s": round(counts.get("test", 0) / times["predict"], 1)
        if times["predict"]
        else None,
        "setup_s": round(times["setup"], 2),
        "job_wall_s": round(wall, 2),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "pcc": row["metrics"].get("pcc"),
        "weights": row.get("weights"),
    }


def _prepare(dataset: str, data_root: str) -> None:
    from stbench.data.dataset import Dataset
    from stbench.data.prepare import prepare

    try:
        Dataset.open(dataset, data_root)
        return
    except Exception:  # noqa: BLE001 - not prepared yet
        pass
    source = REPO.parent / "shared" / "data" / "her2st" if dataset == "her2st" else None
    prepare(dataset, data_root, source)


def _table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("method", "method"),
        ("train_spots", "train spots"),
        ("epochs", "epochs"),
        ("train_spots_per_s", "train spots/s"),
        ("predict_spots_per_s", "predict spots/s"),
        ("setup_s", "setup s"),
        ("job_wall_s", "job s"),
        ("peak_rss_mb", "peak MB"),
    ]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r.get(k)) if "error" not in r or k == "method" else "-" for k, _ in cols]
        if "error" in r:
            cells[-1] = f"failed: {r['error'][:60]}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="her2st")
    ap.add_argument("--fold", default=None, help="default: B4 on her2st, P0S0 on synthetic")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--output", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    fold = args.fold or ("B4" if args.dataset == "her2st" else "P0S0")
    if args.one:
        print("RESULT " + json.dumps(measure_one(args.one, args.dataset, fold, args.data_root, args.output)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data_root or str(Path(tmp) / "data")
        _prepare(args.dataset, data_root)
        rows = []
        for m in args.methods:
            cmd = [sys.executable, __file__, "--one", m, "--dataset", args.dataset, "--fold", fold]
            cmd += ["--data-root", data_root, "--output", str(Path(tmp) / f"out-{m}")]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                rows.append({"method": m, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                rows.append(json.loads(lines[-1][len("RESULT ") :]))
            print(json.dumps(rows[-1]), flush=True)
    table = _table(rows)
    print(f"\n{args.dataset} fold {fold}, tiny configs, CPU ({os.cpu_count()} cores)\n")
    print(table)
    if args.out:
        Path(args.out).write_text(f"{args.dataset} fold {fold}, tiny configs, CPU\n\n{table}\n")


if __name__ == "__main__":
    main()
