"""DeepSpot's deep-set network as a plain module (Nonchev et al., 2025).

Facts from the authors' code (github.com/ratschlab/DeepSpot, deepspot/spot/model.py):
- ONE phi network (an ensemble of `n_ensemble` members, median over members) is shared by the spot,
  its sub-spots and its neighbours; a member is Linear(D, 512) -> Dropout(p) -> ReLU;
- set pooling: the spot's phi output as is, SUM over sub-spots, MAX over neighbours; the three
  512-d vectors are concatenated (context "spot_subspot_neighbors"; the other contexts drop parts);
- rho: an ensemble of Dropout(p) -> ReLU -> Linear(3 * 512, G) -> Dropout(0.1), mean over members.
Defaults there: p = 0.3, n_ensemble = 10, hidden (phi2rho_size) = 512.
"""

from __future__ import annotations

import torch
from torch import nn

CONTEXTS = ("spot", "spot_subspot", "spot_neighbors", "spot_subspot_neighbors")


class PhiEnsemble(nn.Module):
    """Per-element embedding: median over members of Linear -> Dropout -> ReLU."""

    def __init__(self, in_dim: int, hidden: int = 512, n_ensemble: int = 10, dropout: float = 0.3) -> None:
        super().__init__()
        self.members = nn.ModuleList(
            nn.Sequential(nn.Linear(in_dim, hidden), nn.Dropout(dropout), nn.ReLU())
            for _ in range(n_ensemble)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., hidden)."""
        out = torch.stack([m(x) for m in self.members], dim=-2)  # (..., n_ensemble, hidden)
        return out.median(dim=-2).values  # lower median for an even count, as torch.median does


class RhoEnsemble(nn.Module):
    """Set summary -> genes: mean over members of Dropout -> ReLU -> Linear -> Dropout(0.1)."""

    def __init__(
        self, in_dim: int, n_genes: int, n_ensemble: int = 10, dropout: float = 0.3, out_dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList(
            nn.Sequential(nn.Dropout(dropout), nn.ReLU(), nn.Linear(in_dim, n_genes), nn.Dropout(out_dropout))
            for _ in range(n_ensemble)
        )

    @property
    def heads(self) -> list[nn.Linear]:
        return [m[2] for m in self.members]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members], dim=1).mean(dim=1)


class DeepSpotNet(nn.Module):
    """(spot (B, D), sub-spots (B, S, D), neighbours (B, N, D)) -> (B, G)."""

    def __init__(
        self,
        in_dim: int,
        n_genes: int,
        hidden: int = 512,
        n_ensemble_phi: int = 10,
        n_ensemble_rho: int = 10,
        dropout_phi: float = 0.3,
        dropout_rho: float = 0.3,
        out_dropout: float = 0.1,
        context: str = "spot_subspot_neighbors",
    ) -> None:
        super().__init__()
        if context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
        self.context = context
        self.use_sub = "subspot" in context
        self.use_neighbours = "neighbors" in context
        parts = 1 + int(self.use_sub) + int(self.use_neighbours)
        self.phi = PhiEnsemble(in_dim, hidden, n_ensemble_phi, dropout_phi)
        self.rho = RhoEnsemble(parts * hidden, n_genes, n_ensemble_rho, dropout_rho, out_dropout)

    def forward(
        self, spot: torch.Tensor, sub: torch.Tensor | None = None, neighbours: torch.Tensor | None = None
    ) -> torch.Tensor:
        parts = [self.phi(spot)]
        if self.use_sub:
            parts.append(self.phi(sub).sum(dim=1))  # sum over the bag of sub-spots
        if self.use_neighbours:
            parts.append(self.phi(neighbours).max(dim=1).values)  # max over the bag of neighbours
        return self.rho(torch.cat(parts, dim=-1))
