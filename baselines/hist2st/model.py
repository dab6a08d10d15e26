"""Hist2ST (Zeng et al. 2022): convmixer spot features -> transformer over the slide -> GNN over the
spot graph -> gene regression head, plus ZINB heads on raw counts and a distillation weight head.

Shapes: one slide at a time (the GNN runs on one graph): images (N, 3, P, P), positions (N, 2),
mask (N,) real rows, edge_index (2, E) local rows. Padded rows never reach the convolutions (so
they cannot move BatchNorm statistics) and are masked out of attention; they have no edges.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baselines.hist2st.graph import GraphModule
from baselines.hist2st.zinb import DispAct, MeanAct
from stbench.methods.toolkit.transformer import TransformerBlock

BN_STATS = ("running", "slide")


class SlideBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, with `slide_stats` on, also normalises with the current batch's statistics
    in eval mode (running averages untouched). Whole-slide batches make every training-time
    normalisation a per-slide one; this keeps evaluation the same (the batch is one slide)."""

    slide_stats: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.slide_stats:
            return super().forward(x)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class ConvMixerBlock(nn.Module):
    """Two depthwise k x k convs (BN, GELU) with a residual, then a pointwise conv (GELU, BN)."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(2):
            layers += [
                nn.Conv2d(channels, channels, kernel_size, groups=channels, padding="same"),
                SlideBatchNorm2d(channels),
                nn.GELU(),
            ]
        self.depthwise = nn.Sequential(*layers)
        self.pointwise = nn.Sequential(
            nn.Conv2d(channels, channels, 1), nn.GELU(), SlideBatchNorm2d(channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x) + x)


def token_dim(patch_px: int, patch_size: int, channels: int) -> int:
    """Spot-token width: the (P / patch_size)^2 grid of a 1x1 conv down to channels / 8 maps, flattened."""
    if channels % 8:
        raise ValueError(f"channels must be a multiple of 8, got {channels}")
    return (patch_px // patch_size) ** 2 * (channels // 8)


class Hist2STNet(nn.Module):
    """Returns (regression (N, G), (zinb mean, dispersion, dropout) each (N, G) or None, features (N, dim))."""

    def __init__(
        self,
        n_genes: int,
        patch_px: int = 112,
        patch_size: int = 7,
        kernel_size: int = 5,
        channels: int = 32,
        depth1: int = 2,
        depth2: int = 8,
        depth3: int = 4,
        heads: int = 16,
        dim_head: int = 64,
        mlp_dim: int | None = None,
        dropout: float = 0.2,
        n_pos: int = 64,
        policy: str = "mean",
        self_loops: bool = True,
        zinb: bool = True,
        distill: bool = True,
        bn_stats: str = "running",
    ) -> None:
        super().__init__()
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
        dim = token_dim(patch_px, patch_size, channels)
        self.patch_px, self.n_pos, self.dim = patch_px, n_pos, dim
        self.patch_embedding = nn.Conv2d(3, channels, patch_size, stride=patch_size)
        self.dropout = nn.Dropout(dropout)
        self.mixer = nn.Sequential(*(ConvMixerBlock(channels, kernel_size) for _ in range(depth1)))
        self.down = nn.Sequential(nn.Conv2d(channels, channels // 8, 1), nn.Flatten())
        self.x_embed = nn.Embedding(n_pos, dim)
        self.y_embed = nn.Embedding(n_pos, dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, dim_head, mlp_dim or dim, dropout) for _ in range(depth2)
        )
        self.graph = GraphModule(dim, depth3, policy, self_loops)
        self.gene_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n_genes))
        self.zinb_heads = (
            nn.ModuleDict(
                {
                    "mean": nn.Sequential(nn.Linear(dim, n_genes), MeanAct()),
                    "disp": nn.Sequential(nn.Linear(dim, n_genes), DispAct()),
                    "pi": nn.Sequential(nn.Linear(dim, n_genes), nn.Sigmoid()),
                }
            )
            if zinb
            else None
        )
        # Weight of each augmented view in self-distillation (softmax over views, per spot).
        self.coef = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1)) if distill else None
        for m in self.modules():
            if isinstance(m, SlideBatchNorm2d):
                m.slide_stats = bn_stats == "slide"

    def spot_features(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, P, P) real spots -> (n, dim) convmixer features."""
        if images.shape[-1] != self.patch_px or images.shape[-2] != self.patch_px:
            raise ValueError(
                f"Hist2ST was built for {self.patch_px}-px patches, got {tuple(images.shape[-2:])}: "
                "set the method's patch_px to the data's patch out_px"
            )
        return self.down(self.mixer(self.dropout(self.patch_embedding(images))))

    def forward(
        self,
        images: torch.Tensor,
        positions: torch.Tensor,
        edge_index: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, torch.Tensor]:
        n = images.shape[0]
        if mask is None:
            mask = torch.ones(n, dtype=torch.bool, device=images.device)
        if bool(mask.all()):
            feats = self.spot_features(images)
        else:  # padding rows stay zero and never enter the convolutions (BatchNorm statistics)
            feats = images.new_zeros(n, self.dim)
            feats[mask] = self.spot_features(images[mask])
        pos = positions.long().clamp(0, self.n_pos - 1)  # array coords beyond the table share the last row
        g = (feats + self.x_embed(pos[:, 0]) + self.y_embed(pos[:, 1])).unsqueeze(0)
        for block in self.blocks:
            g = block(g, mask.unsqueeze(0))
        h = self.graph(g.squeeze(0), edge_index)
        extra = None
        if self.zinb_heads is not None:
            extra = (self.zinb_heads["mean"](h), self.zinb_heads["disp"](h), self.zinb_heads["pi"](h))
        return self.gene_head(h), extra, h
