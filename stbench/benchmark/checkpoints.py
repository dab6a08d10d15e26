"""Checkpoints that are safe to reuse with `--checkpoint`.

Why: a checkpoint's weights only mean something for the method, gene panel (names AND order) and
target space it was trained in, and scoring it on a slide it was trained or validated on is
leakage. Every checkpoint a job writes therefore carries that provenance under `META_KEY`, and a
job run from a checkpoint refuses, before predicting anything, a file whose provenance does not fit
the run. Files are read with `torch.load(weights_only=True)`: a pickle that would run code is refused.

The weights are applied in `on_predict_start`, after Lightning has called the method's `setup`, so
methods that build their network there (probe-mlp, deepspot) load like any other.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.callbacks import Callback

from stbench.errors import StbenchError

META_KEY = "stbench"
META_FORMAT = 1


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (streamed: checkpoints can be GBs); a one-line error if unreadable."""
    p = Path(path)
    if not p.is_file():
        raise StbenchError(
            f"checkpoint {path} not found" if not p.exists() else f"checkpoint {path} is not a file"
        )
    digest = hashlib.sha256()
    try:
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise StbenchError(f"cannot read checkpoint {path}: {exc.strerror or type(exc).__name__}") from None
    return digest.hexdigest()


def fold_metadata(job: Any, dm: Any) -> dict[str, Any]:
    """What a checkpoint of this job must record to be checked later (plain types: weights_only loads it)."""
    return {
        "format": META_FORMAT,
        "method": job.method,
        "config_hash": job.config_hash,
        "dataset": job.dataset,
        "protocol": job.protocol,
        "fold": job.fold,
        "seed": int(job.seed),
        "genes": list(dm.genes),
        "gene_panel_hash": dm.panel.hash,
        "target": dm.transform.state_dict() if dm.transform is not None else None,
        "train_slides": list(dm.train_slides),
        "val_slides": list(dm.val_slides),
    }


class CheckpointMetadata(Callback):
    """Adds the job's provenance to every checkpoint the Trainer saves (reads nothing, changes no state)."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = copy.deepcopy(self.meta)


@dataclass
class LoadedCheckpoint:
    path: str
    raw: dict[str, Any]  # the whole file (a Lightning checkpoint, or a bare state dict)
    state_dict: dict[str, Any]

    @property
    def meta(self) -> dict[str, Any] | None:
        meta = self.raw.get(META_KEY)
        return meta if isinstance(meta, dict) else None

    @property
    def lightning(self) -> bool:
        return isinstance(self.raw.get("state_dict"), dict)


def read_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """The file's tensors and metadata, or a one-line StbenchError (missing, random bytes, code pickle)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise StbenchError(
            f"checkpoint {path} not found" if not p.exists() else f"checkpoint {path} is not a file"
        )
    try:  # weights_only: a pickle that would run code is refused, and so is any unreadable file
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - one clear message, not a traceback
        raise StbenchError(
            f"cannot read checkpoint {path} as plain tensors (torch.load(weights_only=True): "
            f"{type(exc).__name__}); pickles that would run code are refused"
        ) from None
    if not isinstance(obj, dict):
        raise StbenchError(f"checkpoint {path} holds a {type(obj).__name__}, not a checkpoint or state dict")
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise StbenchError(f"checkpoint {path} has no weights (no tensors under 'state_dict')")
    return LoadedCheckpoint(str(path), obj, sd)


def check_compatible(ckpt: LoadedCheckpoint, expected: dict[str, Any], test_slides: list[str]) -> None:
    """Refuse (one line naming every mismatch) a checkpoint from another method, panel or target, or
    one trained or validated on a slide this run tests on."""
    meta = ckpt.meta
    if meta is None:
        raise StbenchError(
            f"checkpoint {ckpt.path} carries no stbench metadata (method, gene panel, target, training "
            "slides), so its panel and leakage cannot be checked: it was written by an older stbench or "
            "another tool; retrain it with this version (see docs/cli.md, --checkpoint)"
        )
    problems = []
    if meta.get("method") != expected["method"]:
        problems.append(f"it is from method {meta.get('method')!r}, this run is {expected['method']!r}")
    seen = [*meta.get("train_slides", []), *meta.get("val_slides", [])]
    leaked = [s for s in test_slides if s in seen]
    if leaked:
        problems.append(
            f"it was trained/validated on slide(s) {', '.join(leaked)} that this run tests on "
            f"(fold {expected['fold']} of {expected['dataset']}): leakage"
        )
    panel = _panel_problem(list(meta.get("genes", [])), list(expected["genes"]))
    if panel:
        problems.append(panel)
    target = _target_problem(meta.get("target"), expected["target"])
    if target:
        problems.append(target)
    if problems:
        raise StbenchError(f"checkpoint {ckpt.path} does not fit this run: " + "; ".join(problems))


def _panel_problem(theirs: list[str], ours: list[str]) -> str | None:
    if theirs == ours:
        return None
    shared = len(set(theirs) & set(ours))
    first = next(
        (i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), min(len(theirs), len(ours))
    )
    at = (
        f"first difference at position {first}: {_at(theirs, first)} vs {_at(ours, first)}"
        if first < max(len(theirs), len(ours))
        else ""
    )
    what = "the same genes in another order" if shared == len(theirs) == len(ours) else f"{shared} shared"
    return (
        f"another gene panel ({len(theirs)} genes in the checkpoint, {len(ours)} in this run's panel; "
        f"{what}; {at})"
    )


def _at(genes: list[str], i: int) -> str:
    return repr(genes[i]) if i < len(genes) else "(end)"


def _target_problem(theirs: dict[str, Any] | None, ours: dict[str, Any] | None) -> str | None:
    if theirs is None or ours is None:
        return None if theirs is ours else f"another target transform ({_label(theirs)} vs {_label(ours)})"
    for key in ("method", "scale", "target_sum"):
        if theirs.get(key) != ours.get(key):
            return (
                f"another target transform ({_label(theirs)} in the checkpoint, {_label(ours)} in this run)"
            )
    for key in ("center", "spread"):  # a scaled target is fitted on training spots: other spots, other space
        a, b = theirs.get(key), ours.get(key)
        if (a is None) != (b is None) or (
            a is not None and (len(a) != len(b) or not np.allclose(a, b, rtol=1e-6, atol=1e-9))
        ):
            return f"another target transform ({_label(ours)} fitted on other training spots: {key} differs)"
    return None


def _label(t: dict[str, Any] | None) -> str:
    if t is None:
        return "none"
    scale = f"+{t['scale']}" if t.get("scale") else ""
    return f"{t.get('method')}{scale} target_sum={t.get('target_sum')}"


def apply_weights(method: Any, ckpt: LoadedCheckpoint) -> None:
    """Load the weights into the built method, the way Lightning restores a checkpoint (its
    `on_load_checkpoint` first); any key or shape mismatch is one line naming the keys."""
    if ckpt.lightning:
        try:
            method.on_load_checkpoint(ckpt.raw)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise StbenchError(f"checkpoint {ckpt.path}: {str(exc).splitlines()[0]}") from None
    try:
        missing, unexpected = method.load_state_dict(ckpt.state_dict, strict=False)
    except RuntimeError as exc:  # size mismatches: torch lists them one per line
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        more = f" (+{len(lines) - 2} more)" if len(lines) > 2 else ""
        raise StbenchError(
            f"checkpoint {ckpt.path} does not fit {type(method).__name__}: {'; '.join(lines[:2])}{more}"
        ) from None
    if missing or unexpected:
        raise StbenchError(
            f"checkpoint {ckpt.path} does not fit {type(method).__name__}: missing keys "
            f"{list(missing)[:10]}, unexpected keys {list(unexpected)[:10]}"
        )


class ApplyCheckpoint(Callback):
    """Loads a checked checkpoint once the method's network exists: Lightning has run its `setup`
    by `on_predict_start`, and callbacks run before the method's own hook (BLEEP embeds there)."""

    def __init__(self, ckpt: LoadedCheckpoint) -> None:
        self.ckpt = ckpt

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        apply_weights(pl_module, self.ckpt)


def open_for_job(job: Any, dm: Any) -> LoadedCheckpoint:
    """Read `job.checkpoint` and refuse it unless it is the file the job id names and fits this fold."""
    if job.checkpoint_sha256 and file_sha256(job.checkpoint) != job.checkpoint_sha256:
        raise StbenchError(
            f"checkpoint {job.checkpoint} changed since job {job.job_id} was planned (sha256 differs); re-run"
        )
    ckpt = read_checkpoint(job.checkpoint)
    check_compatible(ckpt, fold_metadata(job, dm), list(dm.test_slides))
    return ckpt
