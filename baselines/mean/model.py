"""The training-set mean per gene, as a plain module (the floor every method must beat)."""

from __future__ import annotations

import torch
from torch import nn


class GeneMean(nn.Module):
    def __init__(self, n_genes: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_genes))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def fit(self, total: torch.Tensor, count: int) -> None:
        if count == 0:
            raise ValueError("no training spots to average")
        self.mean.copy_(total / count)
        self.fitted.fill_(True)

    def forward(self, batch_size: int) -> torch.Tensor:
        if not bool(self.fitted):
            raise RuntimeError("GeneMean used before fit")
        return self.mean.unsqueeze(0).expand(batch_size, -1)
