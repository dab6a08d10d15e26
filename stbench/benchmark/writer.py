"""Rank-aware prediction writer: every spot predicted exactly once, whatever the number of ranks.

Under DDP, DistributedSampler pads each rank's share by repeating spots. Each rank writes its
(index, prediction) pairs to its own file; rank 0 merges them, keeps one prediction per global
spot index, and checks that every expected spot is there.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from stbench.errors import StbenchError
from stbench.utils.io import atomic_path


class SpotPredictionWriter(BasePredictionWriter):
    def __init__(self, out_dir: str | Path) -> None:
        super().__init__(write_interval="batch_and_epoch")
        self.out_dir = Path(out_dir)
        self._index: list[np.ndarray] = []
        self._pred: list[np.ndarray] = []

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        idx = prediction["index"].detach().cpu().numpy().astype(np.int64)
        pred = prediction["pred"].detach().float().cpu().numpy()
        if "mask" in prediction:  # padded whole-slide batches
            keep = prediction["mask"].detach().cpu().numpy().astype(bool)
            idx, pred = idx[keep], pred[keep]
        self._index.append(idx)
        self._pred.append(pred)

    def write_on_epoch_end(self, trainer: Any, pl_module: Any, predictions: Any, batch_indices: Any) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        index = np.concatenate(self._index) if self._index else np.zeros(0, np.int64)
        pred = np.concatenate(self._pred) if self._pred else np.zeros((0, 0), np.float32)
        with atomic_path(self.out_dir / f"rank{trainer.global_rank}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, index=index, pred=pred)
        self._index, self._pred = [], []


def gather_predictions(out_dir: Path, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Merge rank files: (sorted unique index, predictions, stats). A spot written twice (samplers
    that pad ranks by repeating spots) is kept once."""
    parts = sorted(Path(out_dir).glob("rank*.npz"))
    if not parts:
        raise StbenchError(f"no prediction files in {out_dir}")
    idx_list, pred_list = [], []
    for p in parts:
        with np.load(p) as z:
            idx_list.append(z["index"])
            pred_list.append(z["pred"])
    index = np.concatenate(idx_list)
    pred = np.concatenate([p for p in pred_list if p.size] or [np.zeros((0, 0), np.float32)])
    order = np.argsort(index, kind="stable")
    index, pred = index[order], pred[order]
    uniq, first = np.unique(index, return_index=True)
    stats = {
        "ranks": len(parts),
        "written": int(index.size),
        "unique": int(uniq.size),
        "duplicates": int(index.size - uniq.size),
    }
    missing = np.setdiff1d(expected, uniq)
    extra = np.setdiff1d(uniq, expected)
    if missing.size or extra.size:
        raise StbenchError(
            f"predictions cover the wrong spots: {missing.size} missing, {extra.size} unexpected "
            f"(global indices e.g. {missing[:5].tolist() or extra[:5].tolist()})"
        )
    return uniq, pred[first], stats


def clear_parts(out_dir: Path) -> None:
    for p in Path(out_dir).glob("*.npz"):  # expression (rank*) and tile (tiles-rank*) parts
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
