"""Provenance of a result row: code version, packages, hardware, time and memory."""

from __future__ import annotations

import platform
import resource
import subprocess
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = (
    "torch",
    "torchvision",
    "lightning",
    "torchmetrics",
    "numpy",
    "scipy",
    "scikit-learn",
    "anndata",
    "scanpy",
    "timm",
    "pandas",
)


@lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """Commit of the stbench checkout that ran (or 'unknown' for an installed wheel)."""
    here = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except Exception:
        return {"git_commit": "unknown", "git_dirty": None}
    return {"git_commit": commit, "git_dirty": dirty}


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "absent"
    return out


def hardware(trainer_opts: dict[str, Any]) -> dict[str, Any]:
    import torch

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "gpus": gpus,
        "python": platform.python_version(),
        "accelerator": str(trainer_opts.get("accelerator", "auto")),
        "devices": trainer_opts.get("devices", 1),
        "num_nodes": trainer_opts.get("num_nodes", 1),
        "strategy": str(trainer_opts.get("strategy", "auto")),
        "precision": str(trainer_opts.get("precision", "32-true")),
    }


def peak_memory_mb() -> float:
    """Peak resident memory of this process (and peak CUDA allocation when on GPU)."""
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if torch.cuda.is_available():
        rss = max(rss, torch.cuda.max_memory_allocated() / 2**20)
    return round(rss, 1)
