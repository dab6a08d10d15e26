"""HisToGene (Pang et al. 2021): flattened spot patches + array-position embeddings -> ViT over a slide.

Every spot of a slide is one token: its patch flattened (3 * P * P values) through one Linear layer,
plus learned embeddings of its array column and row. A pre-norm transformer mixes all spots of the
slide (padding rows are masked out of attention; the block is stbench.methods.toolkit.transformer,
shared with Hist2ST), and LayerNorm + Linear maps each token to genes.
"""

from __future__ import annotations

import torch
from torch import nn

from stbench.methods.toolkit.transformer import TransformerBlock


class HisToGeneNet(nn.Module):
    """(B, N, 3, P, P) patches + (B, N, 2) array positions (+ (B, N) mask) -> (B, N, n_genes)."""

    def __init__(
        self,
        n_genes: int,
        patch_px: int = 112,
        dim: int = 1024,
        depth: int = 4,
        heads: int = 16,
        dim_head: int = 64,
        mlp_dim: int = 2048,
        dropout: float = 0.1,
        n_pos: int = 64,
    ) -> None:
        super().__init__()
        self.patch_px, self.n_pos = patch_px, n_pos
        self.patch_embedding = nn.Linear(3 * patch_px * patch_px, dim)
        self.x_embed = nn.Embedding(n_pos, dim)
        self.y_embed = nn.Embedding(n_pos, dim)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, dim_head, mlp_dim, dropout) for _ in range(depth)
        )
        self.gene_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n_genes))

    def forward(
        self, patches: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, n = patches.shape[:2]
        if patches.shape[-1] != self.patch_px or patches.shape[-2] != self.patch_px:
            raise ValueError(
                f"HisToGene was built for {self.patch_px}-px patches, got {tuple(patches.shape[-2:])}: "
                "set the method's patch_px to the data's patch out_px"
            )
        pos = positions.long().clamp(0, self.n_pos - 1)  # array coords beyond the table share the last row
        x = self.patch_embedding(patches.reshape(b, n, -1))
        x = self.emb_dropout(x + self.x_embed(pos[..., 0]) + self.y_embed(pos[..., 1]))
        for block in self.blocks:
            x = block(x, mask)
        return self.gene_head(x)
