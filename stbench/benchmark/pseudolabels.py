"""`stbench pseudolabels`: select a run folder's finished jobs and stack their out-of-fold predictions.

Why here and not in stbench.data.pseudolabels: reading result rows is the benchmark's schema
(stbench.benchmark.results), and stbench.data never imports stbench.benchmark. The stacking and the
file layout stay in stbench.data.pseudolabels.
"""

from __future__ import annotations

from pathlib import Path

from stbench.benchmark.results import RESULTS_FILE, read_rows
from stbench.data.pseudolabels import stack_pseudolabels
from stbench.errors import DataError


def collect_pseudolabels(
    output_dir: str | Path,
    method: str,
    dataset: str,
    protocol: str | None = None,
    seed: int | None = None,
    out: str | Path | None = None,
) -> Path:
    """Stack the test-slide predictions of every finished job of `method` on `dataset` (optionally one
    protocol / seed) in the run folder `output_dir` into one pseudo-label file; return its path.
    Default `out`: <output_dir>/pseudolabels/<method>__<dataset>.h5ad."""
    output_dir = Path(output_dir)
    results = output_dir / RESULTS_FILE
    if not results.is_file():
        raise DataError("no finished jobs: results.jsonl not found", file=results, field="results")
    rows = [
        r
        for r in read_rows([results])
        if r["method"] == method
        and r["dataset"] == dataset
        and (protocol is None or r["protocol"] == protocol)
        and (seed is None or int(r["seed"]) == int(seed))
    ]
    if not rows:
        wanted = f"method {method!r}, dataset {dataset!r}" + (f", protocol {protocol!r}" if protocol else "")
        wanted += f", seed {seed}" if seed is not None else ""
        raise DataError(f"no finished job matches ({wanted})", file=results, field="method")
    return stack_pseudolabels(rows, output_dir, results, method, dataset, protocol, seed, out)
