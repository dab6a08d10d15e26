"""Encoder + linear head, trained end to end (the fine-tuned "†" rows of DiffBulk's Table I)."""

from __future__ import annotations

import torch
from torch import nn


class EncoderRegressor(nn.Module):
    """encoder(images in [0, 1], its own preprocessing) -> dropout -> Linear(dim, n_genes)."""

    def __init__(self, encoder: nn.Module, dim: int, n_genes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, n_genes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.encoder(images).float()))
