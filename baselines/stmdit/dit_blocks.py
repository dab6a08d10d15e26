"""PixArt-Sigma / PixCell building blocks, written from the public architecture (PixArt-alpha/PixArt-sigma
`diffusion/model/nets/PixArt{,_blocks}.py`, PixCell's copy of them, and diffusers' PixArtTransformer2DModel).

Facts this file follows (checked in those sources; the numbers are theirs):
- timestep embedding: 256 sinusoidal frequencies exp(-ln(1e4) k / 128), [cos, sin] order, then
  Linear(256, D) -> SiLU -> Linear(D, D).
- adaLN-single: ONE global SiLU -> Linear(D, 6D) on the timestep embedding; every block adds its own
  learned table (6, D) (init randn / sqrt(D)); rows = shift_msa, scale_msa, gate_msa, shift_mlp,
  scale_mlp, gate_mlp; modulate(x) = x * (1 + scale) + shift.
- block: x += gate_msa * SelfAttn(mod(LN(x))); x += CrossAttn(x, cond) (no norm, no gate);
  x += gate_mlp * MLP(mod(LN(x))). LayerNorms have no affine, eps 1e-6. MLP: fc1 -> GELU(tanh) -> fc2,
  ratio 4. Self-attention uses one fused qkv Linear (rows [q; k; v]); cross-attention q_linear and a
  fused kv_linear (rows [k; v]); softmax scale 1/sqrt(head_dim); biases everywhere.
- caption projection: Linear(C, D) -> GELU(tanh) -> Linear(D, D); the null ("unconditional") token lives
  in the INPUT space (C) and goes through the same projection (PixArt `y_embedding`, PixCell
  `uncond_embedding`, both init randn / sqrt(C)).
- final layer: LN (no affine) modulated by its own table (2, D) (rows shift, scale) + the raw timestep
  embedding (no SiLU), then Linear(D, p*p*C_out).
- 2-D sin-cos positions on the patch grid: rows/cols = arange(n) / (n / base_size) / interpolation;
  channel halves = [sincos(col), sincos(row)], each [sin, cos] with omega_k = 1e4^(-k / (D/4)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) = [sin(pos*omega), cos(pos*omega)], computed in float64."""
    if dim % 2:
        raise ValueError(f"sin-cos dimension must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64).reshape(-1, 1) * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, base_size: int, interpolation: float) -> torch.Tensor:
    """(grid_h * grid_w, dim) positional table in row-major patch order (token n = row * grid_w + col)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos needs a hidden size divisible by 4, got {dim}")
    rows = torch.arange(grid_h, dtype=torch.float32) / (grid_h / base_size) / interpolation
    cols = torch.arange(grid_w, dtype=torch.float32) / (grid_w / base_size) / interpolation
    col_of = cols.repeat(grid_h)  # n -> col
    row_of = rows.repeat_interleave(grid_w)  # n -> row
    return torch.cat([sincos_1d(dim // 2, col_of), sincos_1d(dim // 2, row_of)], dim=1).float()


class PatchEmbed(nn.Module):
    """Conv(C, D, kernel = stride = p) -> (B, N, D) tokens in row-major order."""

    def __init__(self, in_channels: int, hidden: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar (possibly fractional) timesteps -> D via 256 sinusoidal frequencies and a 2-layer MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def frequencies(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(self.max_period) * k / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        if self.freq_dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.frequencies(t).to(self.mlp[0].weight.dtype))


class Mlp(nn.Module):
    """fc1 -> act -> fc2 (timm Mlp naming, which PixArt checkpoints use)."""

    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim if out is None else out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Condition (B, T, C) -> (B, T, D) through the caption MLP; dropped samples use the null token.

    The null token is in the input space (C), as in PixArt/PixCell. `learn_null` makes it a trainable
    parameter (STMDiT's "learned null token"); False keeps it a fixed random buffer like PixCell's.
    """

    def __init__(self, in_dim: int, hidden: int, n_tokens: int = 1, learn_null: bool = True) -> None:
        super().__init__()
        self.y_proj = Mlp(in_dim, hidden, hidden)
        null = torch.randn(n_tokens, in_dim) / in_dim**0.5
        if learn_null:
            self.y_embedding = nn.Parameter(null)
        else:
            self.register_buffer("y_embedding", null)
        self.in_dim, self.n_tokens = in_dim, n_tokens

    def substitute(self, y: torch.Tensor | None, keep: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(B, T, C) inputs with the null token where keep is False (y None = every sample dropped)."""
        null = self.y_embedding.unsqueeze(0).expand(batch, -1, -1)
        if y is None:
            return null
        if keep is None:
            return y
        return torch.where(keep.view(-1, 1, 1), y.to(null.dtype), null)

    def forward(self, y: torch.Tensor | None, keep: torch.Tensor | None, batch: int) -> torch.Tensor:
        return self.y_proj(self.substitute(y, keep, batch))


def _heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.view(b, n, n_heads, d // n_heads).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (rows [q; k; v])."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"hidden {dim} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = self.n_heads
        out = F.scaled_dot_product_attention(_heads(q, h), _heads(k, h), _heads(v, h))
        return self.proj(_merge(out))


class CrossAttention(nn.Module):
    """Queries from x, keys/values from condition tokens (fused kv_linear, rows [k; v]).

    kv_mask (B, M) bool, True = key may be attended to (each sample needs at least one True).
    """

    def __init__(self, dim: int, n_heads: int, cond_dim: int | None = None) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"hidden {dim} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim if cond_dim is None else cond_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, kv_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.n_heads
        k, v = self.kv_linear(cond).chunk(2, dim=-1)
        mask = None if kv_mask is None else kv_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            _heads(self.q_linear(x), h), _heads(k, h), _heads(v, h), attn_mask=mask
        )
        return self.proj(_merge(out))


class DiTBlock(nn.Module):
    """PixArt block; with `ge_cross_attn` a second cross-attention over GE tokens follows the UNI one.

    The GE cross-attention is residual and ungated like PixArt's cross-attention, with its output
    projection zero-initialised so a new block starts as the no-GE block.
    """

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 4.0, ge_cross_attn: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, n_heads)
        self.cross_attn = CrossAttention(dim, n_heads)
        self.ge_cross_attn = CrossAttention(dim, n_heads) if ge_cross_attn else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t6: torch.Tensor,
        ge: torch.Tensor | None = None,
        ge_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, _, d = x.shape
        mod = self.scale_shift_table[None] + t6.view(b, 6, d)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(x, y)
        if self.ge_cross_attn is not None:
            if ge is None:
                raise ValueError("this block has a GE cross-attention but no GE tokens were given")
            x = x + self.ge_cross_attn(x, ge, ge_mask)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """LN (no affine) modulated by table (2, D) + timestep embedding, then Linear(D, p*p*C_out)."""

    def __init__(self, dim: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
