"""Rank-aware writer of generated tiles (`task = image`): every test spot's tiles kept exactly once.

Why not the expression writer: a generated tile is ~200 KB per regime, so tiles go to disk batch by
batch (uint8, one file per rank and batch) instead of accumulating in memory until the epoch ends.
Rank 0 then merges the files, keeps one copy per global spot index (DDP pads ranks by repeating
spots; a spot's tiles do not depend on its rank, see stbench/methods/sampling.py) and checks that
every expected spot is there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from stbench.errors import StbenchError
from stbench.utils.io import atomic_path

PREFIX = "tiles-rank"


def to_uint8_tiles(images: Any) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] (or uint8) -> (B, H, W, 3) uint8, the tiles' on-disk layout."""
    t = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"generated images must be (B, 3, H, W), got {tuple(t.shape)}")
    if t.dtype != torch.uint8:
        t = (t.float() * 255.0).round().clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(t.permute(0, 2, 3, 1).numpy())


class TilePredictionWriter(BasePredictionWriter):
    """Writes `predict_step` outputs {"index": (B,), "tiles": {regime: (B, 3, H, W)}} batch by batch."""

    def __init__(self, out_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self._count = 0

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
        index = prediction["index"].detach().cpu().numpy().astype(np.int64)
        tiles = {f"tiles/{regime}": to_uint8_tiles(t) for regime, t in prediction["tiles"].items()}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        name = f"{PREFIX}{trainer.global_rank}-{self._count:06d}.npz"
        self._count += 1
        with atomic_path(self.out_dir / name) as tmp, open(tmp, "wb") as f:
            np.savez(f, index=index, **tiles)


def gather_tiles(
    out_dir: Path, expected: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, int]]:
    """Merge the batch files: (sorted unique index, {regime: (n, H, W, 3) uint8}, stats)."""
    parts = sorted(Path(out_dir).glob(f"{PREFIX}*.npz"))
    if not parts:
        raise StbenchError(f"no generated tiles in {out_dir}")
    index_parts: list[np.ndarray] = []
    tile_parts: dict[str, list[np.ndarray]] = {}
    for p in parts:
        with np.load(p) as z:
            index_parts.append(z["index"])
            regimes = sorted(k.split("/", 1)[1] for k in z.files if k.startswith("tiles/"))
            if tile_parts and sorted(tile_parts) != regimes:
                raise StbenchError(f"{p.name} holds regimes {regimes}, other batches {sorted(tile_parts)}")
            for r in regimes:
                tile_parts.setdefault(r, []).append(z[f"tiles/{r}"])
    index = np.concatenate(index_parts)
    order = np.argsort(index, kind="stable")
    uniq, first = np.unique(index[order], return_index=True)
    keep = order[first]
    missing, extra = np.setdiff1d(expected, uniq), np.setdiff1d(uniq, expected)
    if missing.size or extra.size:
        raise StbenchError(
            f"generated tiles cover the wrong spots: {missing.size} missing, {extra.size} unexpected "
            f"(global indices e.g. {missing[:5].tolist() or extra[:5].tolist()})"
        )
    tiles = {r: np.concatenate(chunks)[keep] for r, chunks in tile_parts.items()}
    stats = {
        "ranks": len({p.name.split("-")[1] for p in parts}),
        "written": int(index.size),
        "unique": int(uniq.size),
        "duplicates": int(index.size - uniq.size),
    }
    return uniq, tiles, stats
