"""Result rows in `results.jsonl`, appended safely from concurrent processes.

Each append takes an exclusive lock, re-reads the file, adds the row (once per job id) and
atomically replaces the file, so a crash or SIGKILL at any moment leaves either the old or the
new complete file, never a torn line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stbench.errors import StbenchError
from stbench.utils.io import write_text_atomic

RESULTS = "results.jsonl"
CLAIMS = ".claims"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise StbenchError(f"{path}:{n}: not a JSON result row ({exc})") from exc
    return rows


def finished_job_ids(output: Path) -> set[str]:
    return {r["job_id"] for r in read_results(Path(output) / RESULTS)}


def append_row(output: Path, row: dict[str, Any]) -> bool:
    """Append `row` unless its job id is already there; return whether it was written."""
    path = Path(output) / RESULTS
    with locked(path):
        rows = read_results(path)
        if any(r["job_id"] == row["job_id"] for r in rows):
            return False
        rows.append(row)
        write_text_atomic(
            path, "".join(json.dumps(r, sort_keys=True, default=_json_default) + "\n" for r in rows)
        )
    return True


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


@contextlib.contextmanager
def claim(output: str | Path, job_id: str) -> Iterator[bool]:
    """Yield True if this process now owns `job_id`, False if another live process runs it.

    flock is released by the kernel when its holder dies, so a SIGKILLed run never leaves a stale claim.
    """
    path = Path(output) / CLAIMS / f"{job_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
