"""Stem's denoiser: a DiT whose tokens are genes (Zhu et al., ICLR 2025).

Facts from the authors' code (SichenZhu/Stem, `Stem/models.py`):
- token g = learned gene embedding e_g (a (G, H) table) + MLP(x_g) with MLP = Linear(1, H) -> SiLU
  -> Linear(H, H); there is NO positional embedding, so the genes are a set and the table is the
  only thing that tells them apart (the network is permutation-equivariant over genes);
- condition c = TimestepMLP(sinusoid_256(t)) + CondMLP(h), where h is the 1536-d UNI || CONCH
  feature and CondMLP = Linear(D, D) -> SiLU -> Linear(D, H) (its hidden width is D, not H);
- DiT blocks with adaLN-Zero: LayerNorm without affine (eps 1e-6), shift/scale/gate for attention
  and MLP from SiLU -> Linear(H, 6H) of c, zero-initialised so every block starts as the identity;
  attention with a biased qkv projection; MLP ratio 4 with tanh-GELU;
- final layer: adaLN (shift, scale) + Linear(H, 2) per token = (eps, variance interpolation v),
  modulation and linear zero-initialised, so the initial output is exactly 0;
- init: xavier-uniform linears with zero biases, N(0, 0.02) for the timestep and condition MLPs,
  the gene table uniform(+-1/sqrt(H)) (kaiming-uniform with a = sqrt(5) on a (G, H) table).
- script sizes: depth 12, hidden 384, 6 heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FREQ_DIM = 256


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_sinusoid(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) step indices -> (B, dim) [cos | sin] features with geometrically spaced frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class GeneTokens(nn.Module):
    """Gene identity (learned table) + value MLP: the only per-gene information the DiT gets."""

    def __init__(self, n_genes: int, hidden: int) -> None:
        super().__init__()
        self.gene_embed = nn.Parameter(torch.empty(n_genes, hidden).uniform_(-(hidden**-0.5), hidden**-0.5))
        self.value_mlp = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, G) -> (B, G, H)
        return self.value_mlp(x.unsqueeze(-1)) + self.gene_embed


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, h))


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated (and outputs gated) by the condition."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # -> (B, C, G)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale)).transpose(1, 2)


class StemDiT(nn.Module):
    """(x_t (B, G), t (B,), histology feature (B, D)) -> (B, 2, G): channel 0 = eps, 1 = v."""

    def __init__(
        self,
        n_genes: int,
        cond_dim: int,
        hidden: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.n_genes, self.cond_dim = n_genes, cond_dim
        self.tokens = GeneTokens(n_genes, hidden)
        self.time_embed = nn.Sequential(nn.Linear(FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.cond_embed = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, hidden))
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for seq in (self.time_embed, self.cond_embed):
            nn.init.normal_(seq[0].weight, std=0.02)
            nn.init.normal_(seq[2].weight, std=0.02)
        zero = [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final.adaLN_modulation[-1],
            self.final.linear,
        ]
        for lin in zero:  # adaLN-Zero: identity blocks and a zero output at initialisation
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x)
        c = self.time_embed(timestep_sinusoid(t)) + self.cond_embed(cond)
        for block in self.blocks:
            h = block(h, c)
        return self.final(h, c)


def parameter_count(
    n_genes: int, cond_dim: int = 1536, hidden: int = 384, depth: int = 12, mlp_ratio: float = 4.0
) -> int:
    """Closed form of `StemDiT`'s size (checked against the module in tests)."""
    inner = int(hidden * mlp_ratio)
    tokens = n_genes * hidden + 2 * hidden + hidden * hidden + hidden
    time = FREQ_DIM * hidden + hidden + hidden * hidden + hidden
    cond = cond_dim * cond_dim + cond_dim + cond_dim * hidden + hidden
    block = (3 * hidden * hidden + 3 * hidden) + (hidden * hidden + hidden) + (hidden * inner + inner)
    block += (inner * hidden + hidden) + (hidden * 6 * hidden + 6 * hidden)
    final = (hidden * 2 * hidden + 2 * hidden) + (2 * hidden + 2)
    return tokens + time + cond + depth * block + final
