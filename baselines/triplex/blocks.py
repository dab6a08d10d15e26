"""Transformer pieces of TRIPLEX, written from the paper and the authors' module description.

Pre-norm layers (LayerNorm -> attention -> residual, LayerNorm -> GELU MLP -> residual); queries,
keys and values without bias; an output projection with dropout (dropped when there is a single
head, as in the reference code); no dropout on the attention weights. The neighbour branch adds a
learned per-head bias indexed by the |row|, |column| offset between two tiles of the grid
(LeViT-style). Cross-attention normalises queries and keys/values with the SAME LayerNorm, as the
reference code does (it matters for the parameter count).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


def key_mask_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, N) bool "key is valid" -> (B, 1, 1, N) additive bias (0 or a large negative)."""
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    bias = bias.masked_fill(~mask.bool(), torch.finfo(dtype).min)
    return bias[:, None, None, :]


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Multi-head attention; self-attention when `kv` is None. `grid` = G adds the relative-offset
    bias of a G x G token grid (tokens in row-major order)."""

    def __init__(
        self, dim: int, heads: int, dropout: float = 0.0, cross: bool = False, grid: int | None = None
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.cross = cross
        if cross:
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout)) if heads != 1 else nn.Identity()
        self.grid = grid
        if grid is not None:
            points = list(itertools.product(range(grid), range(grid)))
            offsets: dict[tuple[int, int], int] = {}
            idx = [
                offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets))
                for a in points
                for b in points
            ]
            self.rel_bias = nn.Parameter(torch.zeros(heads, len(offsets)))
            self.register_buffer(
                "rel_index",
                torch.tensor(idx, dtype=torch.long).view(len(points), len(points)),
                persistent=False,
            )

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, kv: torch.Tensor | None = None, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.cross:
            q, (k, v) = self.to_q(x), self.to_kv(kv).chunk(2, dim=-1)
        else:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = self._split(q), self._split(k), self._split(v)
        bias = key_mask_bias(key_mask, q.dtype)
        if self.grid is not None:
            rel = self.rel_bias[:, self.rel_index].unsqueeze(0)  # (1, heads, N, N)
            bias = rel if bias is None else rel + bias
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        b, h, n, d = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))


class SelfLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float, grid: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout, grid=grid)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask=key_mask)
        return x + self.ff(self.norm2(x))


class CrossLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # shared by queries and keys/values (reference code)
        self.attn = Attention(dim, heads, dropout, cross=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mlp_dim, dropout)

    def forward(
        self, q: torch.Tensor, kv: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = q + self.attn(self.norm1(q), self.norm1(kv), key_mask=key_mask)
        return q + self.ff(self.norm2(q))


class SelfStack(nn.Sequential):
    """`depth` self-attention layers sharing one key mask."""

    def __init__(
        self, dim: int, depth: int, heads: int, mlp_dim: int, dropout: float, grid: int | None = None
    ) -> None:
        super().__init__(*[SelfLayer(dim, heads, mlp_dim, dropout, grid) for _ in range(depth)])

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, key_mask)
        return x
