"""Resolve and load encoder weights: hub id, local file/dir, or "none"; strict, fail-fast, no pickle.

Why: a benchmark number is only meaningful with the exact weights named in its row, so every load is
strict (missing/unexpected keys and shape mismatches are errors) and every failure to obtain weights
is one short message naming the model and how to get it, raised within seconds (no retry loops).
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch

from stbench.errors import StbenchError
from stbench.utils.io import sha256_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
ETAG_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"


class WeightsError(StbenchError):
    """Weights are absent, gated, unreadable, or do not match the architecture (names the keys)."""


@dataclass(frozen=True)
class WeightSource:
    """Where weights come from: kind is "none", "hub", "local" or "torchvision"; ref is the id/path."""

    kind: str
    ref: str


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def offline() -> bool:
    """Offline if HF_HUB_OFFLINE or STBENCH_OFFLINE is set (read at call time, not import time)."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("STBENCH_OFFLINE"))


@lru_cache(maxsize=8)
def hub_reachable(endpoint: str) -> bool:
    """One TCP connect (DNS included) bounded by PROBE_TIMEOUT_S.

    Why: huggingface_hub retries connection errors with backoff (about 20 s per file), so without
    this probe a machine without network would hang instead of failing fast.
    """
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 0.5)
    return bool(ok)


def hub_cache_dir() -> str | None:
    """The hub cache folder from the environment at call time (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def parse_weights(weights: str, default_hub_id: str | None, default_kind: str = "hub") -> WeightSource:
    """Turn the user's --weights value into a WeightSource.

    "default" -> the official source; "none" -> random init; an existing path -> local; "hf:org/name"
    or "org/name" -> a hub id.
    """
    w = (weights or "default").strip()
    if w == "none":
        return WeightSource("none", "none")
    if w == "default":
        if default_hub_id is None:
            raise WeightsError("this encoder has no default weights; pass a local path or 'none'")
        return WeightSource(default_kind, default_hub_id)
    if w.startswith("hf:"):
        return WeightSource("hub", w[3:].split("@")[0])
    path = Path(w).expanduser()
    if path.exists():
        return WeightSource("local", str(path.resolve()))
    if w.count("/") == 1 and not w.startswith((".", "/", "~")):
        return WeightSource("hub", w)
    raise WeightsError(f"weights {weights!r}: no such file or directory, and not a hub id (org/name)")


def _access_hint(repo_id: str, gated: bool) -> str:
    page = f"https://huggingface.co/{repo_id}"
    if gated:
        return (
            f"request access at {page}, then run `huggingface-cli login` or export HF_TOKEN; "
            "or pass a local copy with --weights PATH"
        )
    return f"download it from {page} when online, or pass a local copy with --weights PATH"


def hub_download(
    repo_id: str, filename: str, *, gated: bool, required: bool = True, label: str | None = None
) -> Path | None:
    """Fetch one file of a hub repo (from the cache when offline); fail fast with one clear message.

    Returns None when the file does not exist in the repo/cache and required is False.
    """
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    hint = _access_hint(repo_id, gated)
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    if offline():
        why = "offline mode is on (HF_HUB_OFFLINE=1) and there is no local copy"
        local_only = True
    else:
        local_only = not hub_reachable(endpoint)
        why = f"the hub ({endpoint}) is unreachable and there is no local copy"
    try:
        path = huggingface_hub.hf_hub_download(
            repo_id,
            filename,
            cache_dir=hub_cache_dir(),
            token=os.environ.get("HF_TOKEN") or None,
            local_files_only=local_only,
            etag_timeout=ETAG_TIMEOUT_S,
            endpoint=endpoint,
        )
        return Path(path)
    except hf_errors.GatedRepoError:
        raise WeightsError(f"hub model {repo_id} is gated and this token has no access: {hint}") from None
    except hf_errors.RepositoryNotFoundError:
        raise WeightsError(
            f"hub model {repo_id} not found (absent, private or gated without a token): {hint}"
        ) from None
    except (hf_errors.EntryNotFoundError, hf_errors.LocalEntryNotFoundError) as exc:
        if not required:
            return None
        if isinstance(exc, hf_errors.EntryNotFoundError) and not isinstance(
            exc, hf_errors.LocalEntryNotFoundError
        ):
            why = "file not in the repository"
        raise WeightsError(f"hub model {repo_id}: cannot get {label or filename} ({why}): {hint}") from None
    except (OSError, ValueError, hf_errors.HfHubHTTPError) as exc:
        raise WeightsError(
            f"hub model {repo_id}: cannot get {filename} ({type(exc).__name__}): {hint}"
        ) from None


def hub_weights(repo_id: str, *, gated: bool, need_config: bool = False) -> tuple[Path | None, Path, str]:
    """(config.json or None, weights file, revision) of a hub repo, trying safetensors first."""
    # config.json is optional here (CONCH's repo has none); families that need it check for it.
    # Its download goes first so a gated/absent repo fails on it with the access message.
    config = hub_download(repo_id, "config.json", gated=gated, required=need_config)
    for name in WEIGHT_FILES[:-1]:
        path = hub_download(repo_id, name, gated=gated, required=False)
        if path is not None:
            return config, path, _revision_of(path)
    # the last candidate is required: its failure carries the reason (offline, unreachable, absent)
    label = f"its weights ({', '.join(WEIGHT_FILES)})"
    path = hub_download(repo_id, WEIGHT_FILES[-1], gated=gated, required=True, label=label)
    assert path is not None
    return config, path, _revision_of(path)


def _revision_of(path: Path) -> str:
    """The snapshot folder name of a cached hub file is its commit hash."""
    parts = path.parts
    if "snapshots" in parts:
        return parts[parts.index("snapshots") + 1][:12]
    return file_sha(path)


def file_sha(path: Path) -> str:
    return sha256_file(path)[:12]


def local_weights(path: Path) -> tuple[Path | None, Path]:
    """(config.json or None, weights file) of a local file or directory."""
    if path.is_file():
        config = path.parent / "config.json"
        return (config if config.exists() else None), path
    for name in WEIGHT_FILES:
        if (path / name).exists():
            config = path / "config.json"
            return (config if config.exists() else None), path / name
    raise WeightsError(f"no weights file ({', '.join(WEIGHT_FILES)}) in directory {path}")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint without executing pickle code (safetensors or torch.load(weights_only=True))."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one clear message
        raise WeightsError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise WeightsError(f"checkpoint {path} is not a state dict (got {type(obj).__name__})")
    return obj


def _preview(keys: list[str], n: int = 8) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def strict_load(module: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str) -> None:
    """Load every tensor or fail naming the missing, unexpected and wrongly shaped keys."""
    own = module.state_dict()
    # BatchNorm's step counter is not a weight; old torchvision files predate it (torch fills it in)
    missing = sorted(k for k in set(own) - set(state) if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} (checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_preview(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_preview(shapes)}")
    if problems:
        raise WeightsError(f"checkpoint does not match {what}: " + "; ".join(problems))
    module.load_state_dict(state, strict=False)  # every weight checked above; only BN counters may be absent
