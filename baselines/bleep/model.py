"""BLEEP's networks, loss and retrieval as plain modules/functions (Xie et al., NeurIPS 2023).

Facts from the authors' code (github.com/bowang-lab/BLEEP: models.py, modules.py, BLEEP_inference.ipynb):
- image encoder = ResNet-50 with its classifier removed (global average pool, 2048-d), trainable;
- there is no separate expression network: the "expression encoder" is its projection head applied
  to the spot's expression vector directly;
- projection head: Linear(in, 256) -> GELU -> Linear(256, 256) -> Dropout(0.1), plus the first
  projection as a residual, then LayerNorm(256);
- loss: logits = spot_emb @ image_emb.T / T; soft targets = softmax(((img-img + spot-spot
  similarities) / 2) / T) row-wise; cross-entropy of rows (spots) and of columns (images), averaged;
- retrieval: L2-normalised embeddings (cosine similarity), top-k reference spots, average of their
  expression; "weighted" weighs the top-k by exp(-d), d = squared Euclidean distance between the
  raw (unnormalised) embeddings; "top1" takes the single most similar spot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RETRIEVAL_MODES = ("mean", "weighted", "top1")


class ProjectionHead(nn.Module):
    """Linear -> GELU -> Linear -> Dropout, residual from the first Linear, LayerNorm."""

    def __init__(self, in_dim: int, dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        h = self.dropout(self.fc(self.gelu(projected)))
        return self.layer_norm(h + projected)


class BLEEPNet(nn.Module):
    """Image encoder + image projection, and the expression projection, into one joint space."""

    def __init__(
        self, encoder: nn.Module, enc_dim: int, n_genes: int, dim: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.encoder = encoder  # images in [0, 1] -> (B, enc_dim); resizes and normalises itself
        self.image_projection = ProjectionHead(enc_dim, dim, dropout)
        self.spot_projection = ProjectionHead(n_genes, dim, dropout)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_projection(self.encoder(images))

    def embed_spots(self, expression: torch.Tensor) -> torch.Tensor:
        return self.spot_projection(expression.float())


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy against a probability vector: -sum_j t_ij log softmax(l_i)_j."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def bleep_loss(image_emb: torch.Tensor, spot_emb: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """BLEEP's symmetric contrastive loss with similarity-derived soft targets (scalar)."""
    logits = spot_emb @ image_emb.T / temperature
    sim = (image_emb @ image_emb.T + spot_emb @ spot_emb.T) / 2
    targets = F.softmax(sim / temperature, dim=-1)
    spots_loss = soft_cross_entropy(logits, targets)
    images_loss = soft_cross_entropy(logits.T, targets.T)
    return ((spots_loss + images_loss) / 2).mean()


@dataclass
class Reference:
    """The retrieval reference: embeddings and targets of training spots (never held-out ones)."""

    keys: torch.Tensor  # (N, dim) raw spot embeddings
    values: torch.Tensor  # (N, G) targets
    index: torch.Tensor  # (N,) global spot indices (provenance; tests check they are training spots)

    def __post_init__(self) -> None:
        self.unit_keys = F.normalize(self.keys, p=2, dim=-1)


def retrieve(
    query: torch.Tensor, ref: Reference, top_k: int = 50, mode: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, G) predictions and (B, k) reference rows used, for image embeddings `query` (B, dim)."""
    if mode not in RETRIEVAL_MODES:
        raise ValueError(f"retrieval must be one of {RETRIEVAL_MODES}, got {mode!r}")
    k = 1 if mode == "top1" else min(int(top_k), ref.keys.shape[0])
    sim = F.normalize(query, p=2, dim=-1) @ ref.unit_keys.T
    rows = sim.topk(k, dim=-1).indices  # (B, k), most similar first
    values = ref.values[rows]  # (B, k, G)
    if mode != "weighted":
        return values.mean(dim=1), rows
    d = ((ref.keys[rows] - query[:, None, :]) ** 2).sum(-1)  # (B, k) squared distances, raw embeddings
    # Weights proportional to exp(-d): the authors shift d by the best cosine match's distance before
    # exponentiating, a constant per row that cancels on normalising; softmax is the stable form.
    w = torch.softmax(-d, dim=1)
    return (w[..., None] * values).sum(dim=1), rows
