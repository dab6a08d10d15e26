"""Training arrays for methods that fit in closed form (or seed a network) from frozen features."""

from __future__ import annotations

from typing import Any

import numpy as np


def training_arrays(datamodule: Any, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(features, targets) of every training spot, float64, in global-index order."""
    xs, ys, idx = [], [], []
    for b in datamodule.train_dataloader():
        xs.append(b["features"][key].double().numpy())
        ys.append(b["expression"].double().numpy())
        idx.append(b["index"].numpy())
    order = np.argsort(np.concatenate(idx), kind="stable")
    return np.concatenate(xs)[order], np.concatenate(ys)[order]
