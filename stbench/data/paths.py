"""Where datasets live: --data-root, else $STBENCH_DATA, else ~/.cache/stbench/data."""

from __future__ import annotations

import os
from pathlib import Path


def data_root(explicit: str | Path | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("STBENCH_DATA")
    if env:
        return Path(env).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "stbench" / "data"


def dataset_dir(name: str, root: str | Path | None = None) -> Path:
    return data_root(root) / name


def raw_dir(name: str, root: str | Path | None = None) -> Path:
    """The dataset's files in their public layout (a symlink to --source, or the download)."""
    return dataset_dir(name, root) / "raw"


def cache_dir(name: str, root: str | Path | None = None) -> Path:
    """Everything derived (parsed slides, patch stores, features), keyed by input hashes."""
    return dataset_dir(name, root) / "cache"


def manifest_path(name: str, root: str | Path | None = None) -> Path:
    return dataset_dir(name, root) / "manifest.json"
