"""HINGE's condition network: c = MLP_t(sinusoid(t)) + MLP_h(histology) + MLP_m(visibility mask).

The paper names histology and timestep; the authors' code adds the visibility-mask vector (which
genes are currently revealed). Each MLP is Linear -> SiLU -> Linear with weights drawn from
N(0, 0.02) and zero biases, and the three outputs (width D, the backbone's width) are summed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

FREQ_DIM = 256
MAX_PERIOD = 10_000.0


def timestep_embedding(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = MAX_PERIOD) -> torch.Tensor:
    """(B,) timesteps -> (B, dim): cos of the `dim/2` geometric frequencies first, then sin."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().unsqueeze(1) * freqs.unsqueeze(0)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


def mlp(in_dim: int, dim: int, std: float = 0.02) -> nn.Sequential:
    """Linear(in, D) -> SiLU -> Linear(D, D), weights N(0, std), biases 0."""
    net = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
    for lin in (net[0], net[2]):
        nn.init.normal_(lin.weight, std=std)
        nn.init.zeros_(lin.bias)
    return net


class ConditionNet(nn.Module):
    """(t (B,), histology (B, H), visible (B, G) bool) -> c (B, D)."""

    def __init__(
        self, dim: int, hist_dim: int, n_genes: int, use_visibility: bool = True, init_std: float = 0.02
    ) -> None:
        super().__init__()
        self.t_mlp = mlp(FREQ_DIM, dim, init_std)
        self.h_mlp = mlp(hist_dim, dim, init_std)
        self.m_mlp = mlp(n_genes, dim, init_std) if use_visibility else None

    def forward(self, t: torch.Tensor, hist: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
        dtype = self.h_mlp[0].weight.dtype
        c = self.t_mlp(timestep_embedding(t).to(dtype)) + self.h_mlp(hist.to(dtype))
        if self.m_mlp is not None:
            vis = visible if visible is not None else torch.ones(hist.shape[0], self.m_mlp[0].in_features)
            c = c + self.m_mlp(vis.to(device=hist.device, dtype=dtype))
        return c
