"""A small MLP head on frozen encoder features (inputs standardised with training statistics)."""

from __future__ import annotations

import torch
from torch import nn


class MLPHead(nn.Module):
    """(x - mean) / std -> [Linear -> GELU -> Dropout] x n_layers -> Linear(n_genes)."""

    def __init__(self, in_dim: int, n_genes: int, hidden: int = 256, n_layers: int = 1, dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(n_layers):
            layers += [nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout)]
            d = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, n_genes)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body((x.float() - self.mean) / self.std))
