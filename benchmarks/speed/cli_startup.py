"""CLI start-up: how long `stbench --help` and argument errors take, next to importing torch + lightning.

An argument error (a misspelled `--method.X` key, a value of the wrong type) is found from the
constructors' signatures read as source, before torch, lightning or any data is touched; this
measures that it stays so. Each case runs as a fresh process (`python -c` calling the console entry
point), `--repeats` times; the table shows min and median wall time, and the heavy modules each
case imported (`-X importtime`, a separate run).

Run: `python benchmarks/speed/cli_startup.py [--repeats 5]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ENTRY = "import sys; from stbench.cli import main; sys.exit(main(sys.argv[1:]))"
RUN = ["run", "--method", "patch-cnn", "--dataset", "synthetic"]
CASES: list[tuple[str, list[str], int]] = [
    ("stbench --help", ["-c", ENTRY, "--help"], 0),
    ("stbench run --help", ["-c", ENTRY, "run", "--help"], 0),
    ("--method.lrr 3e-4 (unknown key)", ["-c", ENTRY, *RUN, "--method.lrr", "3e-4"], 2),
    ("--trainer.max_epochs two (bad type)", ["-c", ENTRY, *RUN, "--trainer.max_epochs", "two"], 2),
    ("--data.batch_sise 8 (unknown key)", ["-c", ENTRY, *RUN, "--data.batch_sise", "8"], 2),
    ("--config bad.yaml (unknown key in file)", ["-c", ENTRY, *RUN, "--config", "BAD"], 2),
    ("stbench nope (unknown command)", ["-c", ENTRY, "nope"], 2),
    ("import torch", ["-c", "import torch"], 0),
    ("import torch, lightning", ["-c", "import torch, lightning"], 0),
    ("import baselines.patch_cnn.method", ["-c", "import baselines.patch_cnn.method"], 0),
]
HEAVY = ("torch", "lightning", "stbench.benchmark.runner", "baselines.patch_cnn.method")


def _time(args: list[str], expect: int, env: dict[str, str]) -> float:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if res.returncode != expect:
        raise SystemExit(f"{args}: exit {res.returncode}, expected {expect}: {res.stderr[-500:]}")
    return dt


def _heavy(args: list[str], env: dict[str, str]) -> str:
    res = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, env=env)
    seen = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if "|" in line}
    return ", ".join(m for m in HEAVY if m in seen) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bad = os.path.join(tmp, "bad.yaml")
        with open(bad, "w") as fh:
            fh.write("method:\n  lrr: 0.01\n")
        env = {**os.environ, "STBENCH_DATA": os.path.join(tmp, "data")}
        rows = []
        for label, args, expect in CASES:
            args = [bad if x == "BAD" else x for x in args]
            _time(args, expect, env)  # warm the page cache
            times = [_time(args, expect, env) for _ in range(max(3, a.repeats))]
            rows.append((label, min(times), statistics.median(times), _heavy(args, env)))
        if os.path.exists(os.path.join(tmp, "data")):
            print("WARNING: an argument error touched the data root")
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, {max(3, a.repeats)} runs each (fresh process)"
    )
    w = max(len(r[0]) for r in rows)
    print(f"{'case':<{w}}  {'min s':>7}  {'median s':>8}  heavy modules imported")
    for label, lo, med, heavy in rows:
        print(f"{label:<{w}}  {lo:7.2f}  {med:8.2f}  {heavy}")


if __name__ == "__main__":
    main()
