"""Whole-slide batches (one batch = one slide, padded and masked): positions, masks, validation.

Shared by HisToGene and Hist2ST, hence in the toolkit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from stbench.methods.base import Method, scored_rows


def slide_positions(batch: dict[str, Any]) -> torch.Tensor:
    """(N, 2) array (col, row) positions of a whole-slide batch; HisToGene needs them."""
    if "array_coords" not in batch:
        raise ValueError(
            "this method needs array coordinates (batch['array_coords']); this dataset's slides lack "
            "array_col/array_row (or array_x/array_y) in obs"
        )
    return batch["array_coords"]


def slide_mask(batch: dict[str, Any]) -> torch.Tensor:
    n = batch["image"].shape[0]
    mask = batch.get("mask")
    return torch.ones(n, dtype=torch.bool, device=batch["image"].device) if mask is None else mask.bool()


def log_masked_validation(method: Method, batch: dict[str, Any]) -> None:
    """val/mse and val/mae over the scored rows of a whole-slide batch (validation spots; never
    padding or the training spots served as their context)."""
    rows = scored_rows(batch)
    mask = slide_mask(batch) if rows is None else rows
    pred = method.predict_expression(batch).float()[mask]
    target = batch["expression"].float()[mask]
    n = int(mask.sum())
    method.log("val/mse", F.mse_loss(pred, target), sync_dist=True, batch_size=n, prog_bar=True)
    method.log("val/mae", F.l1_loss(pred, target), sync_dist=True, batch_size=n)
