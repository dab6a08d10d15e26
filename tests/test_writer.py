"""The prediction writer's merge keeps each spot once and refuses missing or foreign spots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stbench.benchmark.writer import SpotPredictionWriter, gather_predictions
from stbench.errors import StbenchError


class _Trainer:
    def __init__(self, rank: int) -> None:
        self.global_rank = rank


def _write(out: Path, rank: int, index: list[int], pred: np.ndarray, mask: list[bool] | None = None) -> None:
    w = SpotPredictionWriter(out)
    batch = {"index": torch.tensor(index), "pred": torch.from_numpy(pred)}
    if mask is not None:
        batch["mask"] = torch.tensor(mask)
    w.write_on_batch_end(_Trainer(rank), None, batch, None, None, 0)
    w.write_on_epoch_end(_Trainer(rank), None, [], [])


def test_padding_duplicates_are_dropped_once(tmp_path: Path) -> None:
    preds = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    # DistributedSampler(pad) style: 7 spots over 2 ranks -> rank 1 repeats spot 0
    _write(tmp_path, 0, [0, 2, 4, 6], preds[[0, 2, 4, 6]])
    _write(tmp_path, 1, [1, 3, 5, 0], preds[[1, 3, 5, 0]])
    index, pred, stats = gather_predictions(tmp_path, np.arange(7))
    assert stats == {"ranks": 2, "written": 8, "unique": 7, "duplicates": 1}
    np.testing.assert_array_equal(index, np.arange(7))
    np.testing.assert_array_equal(pred, preds)


def test_masked_padding_rows_are_ignored(tmp_path: Path) -> None:
    _write(tmp_path, 0, [3, 4, -1], np.ones((3, 2), np.float32), mask=[True, True, False])
    index, _, stats = gather_predictions(tmp_path, np.array([3, 4]))
    assert index.tolist() == [3, 4] and stats["written"] == 2


def test_missing_or_foreign_spots_fail(tmp_path: Path) -> None:
    _write(tmp_path, 0, [0, 1], np.zeros((2, 2), np.float32))
    with pytest.raises(StbenchError, match="1 missing"):
        gather_predictions(tmp_path, np.arange(3))
    with pytest.raises(StbenchError, match="1 unexpected"):
        gather_predictions(tmp_path, np.array([0]))
