"""HisToGene (Pang et al. 2021): flattened spot patches + array-position embeddings -> ViT over a slide.

Every spot of a slide is one token: its patch flattened (3 * P * P values) through one Linear layer,
plus learned embeddings of its array column and row. A pre-norm transformer mixes all spots of the
slide (padding rows are masked out of attention), and LayerNorm + Linear maps each token to genes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Sequential):
    """Linear -> GELU -> dropout -> Linear -> dropout (the ViT MLP)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )


class MaskedAttention(nn.Module):
    """Multi-head self-attention (bias-free qkv projection, output projection + dropout) whose keys
    are restricted to the real rows of each sequence, so padding never changes real outputs."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N): True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MaskedAttention(dim, heads, dim_head, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.ff(self.norm2(x))


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
