"""TRIPLEX's network as plain nn.Modules (Chung et al., CVPR 2024; NEXGEM/TRIPLEX, CVPR release).

Three views of a spot, one head per view plus a fused head:
- target:    a trainable ResNet trunk on the spot patch; its last feature map (7 x 7 at 224 px) is
             a set of tokens.
- neighbour: frozen features of the G x G tiles centred on the spot (G = 5), a transformer with a
             learned relative-position bias over the tile grid.
- global:    frozen features of EVERY spot of the slide, one transformer layer, a positional
             encoding generator (depthwise conv on the spots' array grid, added back), the
             remaining layers.
- fusion:    the spot's global token is the query of one cross-attention stack, applied once to
             the target tokens and once to the neighbour tokens (same weights); sum, LayerNorm.
Outputs: fused head on the fusion token, target head on the mean target token, neighbour head
on the mean neighbour token, global head on the global token. `context=False` (the spot-only
ablation, configs/ablations/spot_only.yaml) keeps the target branch alone: fused and target heads
both read its mean token.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from baselines.triplex.blocks import CrossLayer, SelfStack

BRANCHES = ("target", "neighbour", "global")


class TargetEncoder(nn.Module):
    """ResNet trunk (stem + 4 stages, no pooling, no fc) of an stbench `Encoder`: image -> tokens.

    The Encoder's own preprocessing (resize to its input size, channel normalisation) is kept, so
    pretrained weights see the inputs they were trained on. `stages` < 4 stops after an earlier
    stage (tiny CPU configs only: layer4 holds most of a ResNet-18's weights)."""

    def __init__(self, encoder: Any, emb_dim: int, stages: int = 4) -> None:
        super().__init__()
        net = getattr(getattr(encoder, "net", None), "net", None)
        if net is None or not hasattr(net, "layer4"):
            raise ValueError(
                f"TRIPLEX's target branch needs a torchvision ResNet encoder, got {encoder.spec.name}"
            )
        if not 1 <= stages <= 4:
            raise ValueError(f"target stages must be 1..4, got {stages}")
        blocks = [net.layer1, net.layer2, net.layer3, net.layer4][:stages]
        self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, *blocks)
        norms = [m for m in blocks[-1].modules() if isinstance(m, nn.BatchNorm2d)]
        self.channels = int(norms[-1].num_features)
        self.input_px = int(encoder.input_px)
        self.resize = str(encoder.spec.resize)
        self.register_buffer("mean", torch.tensor(encoder.spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(encoder.spec.std).view(1, 3, 1, 1), persistent=False)
        self.proj = nn.Identity() if self.channels == emb_dim else nn.Linear(self.channels, emb_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, h * w, emb_dim) tokens."""
        x = images.float()
        if x.shape[-2:] != (self.input_px, self.input_px):
            x = F.interpolate(x, size=(self.input_px, self.input_px), mode=self.resize, antialias=True)
            x = x.clamp(0.0, 1.0)
        fmap = self.trunk((x - self.mean) / self.std)
        return self.proj(fmap.flatten(2).transpose(1, 2))


class NeighbourEncoder(nn.Module):
    def __init__(
        self, in_dim: int, dim: int, depth: int, heads: int, mlp_dim: int, dropout: float, grid: int
    ) -> None:
        super().__init__()
        self.proj = nn.Identity() if in_dim == dim else nn.Linear(in_dim, dim)
        self.layers = SelfStack(dim, depth, heads, mlp_dim, dropout, grid=grid)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tiles: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, G*G, in_dim) tile features (row-major) -> (B, G*G, dim) tokens."""
        return self.norm(self.layers(self.proj(tiles), mask))


class PositionalConv(nn.Module):
    """Positional encoding generator on the array grid: scatter the spot tokens into a dense
    (dim, rows, cols) map, depthwise k x k conv, read the conv back at each spot and add it to the
    token (empty grid cells stay zero, so only real spots contribute)."""

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (N, dim); pos (N, 2) integer (col, row) array coordinates of the same slide."""
        pos = (pos - pos.min(0).values).long()
        cols, rows = int(pos[:, 0].max()) + 1, int(pos[:, 1].max()) + 1
        flat = pos[:, 1] * cols + pos[:, 0]
        n, d = x.shape
        dense = x.new_zeros(rows * cols, d).index_add(0, flat, x)
        count = x.new_zeros(rows * cols).index_add(0, flat, x.new_ones(n)).clamp_min(1.0)
        dense = (dense / count[:, None]).t().reshape(1, d, rows, cols)
        out = self.conv(dense).reshape(d, rows * cols).t()
        return x + out[flat]


class GlobalEncoder(nn.Module):
    def __init__(
        self, in_dim: int, dim: int, depth: int, heads: int, mlp_dim: int, dropout: float, kernel_size: int
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError("the global encoder needs depth >= 1")
        self.proj = nn.Identity() if in_dim == dim else nn.Linear(in_dim, dim)
        self.first = SelfStack(dim, 1, heads, mlp_dim, dropout)
        self.pos = PositionalConv(dim, kernel_size)
        self.rest = SelfStack(dim, depth - 1, heads, mlp_dim, dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """feats (N, in_dim) of every real spot of ONE slide; pos (N, 2) -> (N, dim)."""
        x = self.first(self.proj(feats).unsqueeze(0))
        x = self.pos(x[0], pos).unsqueeze(0)
        return self.norm(self.rest(x))[0]


class FusionEncoder(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CrossLayer(dim, heads, mlp_dim, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            q = layer(q, kv, mask)
        return q

    def forward(
        self, target: torch.Tensor, neighbour: torch.Tensor, glob: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        q = glob.unsqueeze(1)  # (B, 1, dim): the global token asks both local views
        fused = self._attend(q, target, None) + self._attend(q, neighbour, mask)
        return self.norm(fused[:, 0])


class TRIPLEXNet(nn.Module):
    """All branches and the four heads. `encode_global` runs once per slide; `forward` per spot chunk."""

    def __init__(
        self,
        n_genes: int,
        target_encoder: Any,
        feature_dim: int,
        emb_dim: int = 512,
        depth: tuple[int, int, int] = (1, 5, 4),  # fusion, global, neighbour
        heads: tuple[int, int, int] = (4, 8, 4),
        mlp_ratio: tuple[float, float, float] = (4.0, 4.0, 4.0),
        dropout: tuple[float, float, float] = (0.4, 0.3, 0.3),
        kernel_size: int = 3,
        grid: int = 5,
        target_stages: int = 4,
        context: bool = True,
    ) -> None:
        super().__init__()
        self.grid, self.context, self.emb_dim = grid, context, emb_dim
        mlp = [int(emb_dim * r) for r in mlp_ratio]
        self.target = TargetEncoder(target_encoder, emb_dim, target_stages)
        self.neighbour = NeighbourEncoder(feature_dim, emb_dim, depth[2], heads[2], mlp[2], dropout[2], grid)
        self.global_ = GlobalEncoder(
            feature_dim, emb_dim, depth[1], heads[1], mlp[1], dropout[1], kernel_size
        )
        self.fusion = FusionEncoder(emb_dim, depth[0], heads[0], mlp[0], dropout[0])
        self.fc = nn.Linear(emb_dim, n_genes)
        self.fc_target = nn.Linear(emb_dim, n_genes)
        self.fc_neighbour = nn.Linear(emb_dim, n_genes)
        self.fc_global = nn.Linear(emb_dim, n_genes)

    def heads(self) -> list[nn.Linear]:
        return [self.fc, self.fc_target, self.fc_neighbour, self.fc_global]

    def encode_global(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if not self.context:  # spot-only ablation: no global branch to run
            return feats.new_zeros(len(feats), self.emb_dim)
        return self.global_(feats, pos)

    def forward(
        self,
        images: torch.Tensor,
        tiles: torch.Tensor,
        glob: torch.Tensor,
        tile_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W); tiles (B, G*G, D) frozen tile features; glob (B, emb) the spots' rows
        of `encode_global`; tile_mask (B, G*G) valid tiles or None -> {"fused", *BRANCHES}: (B, G)."""
        t = self.target(images)
        if not self.context:  # spot-only ablation: the target tokens alone feed the fused head
            return {"fused": self.fc(t.mean(1)), "target": self.fc_target(t.mean(1))}
        n = self.neighbour(tiles, tile_mask)
        fused = self.fusion(t, n, glob, tile_mask)
        return {
            "fused": self.fc(fused),
            "target": self.fc_target(t.mean(1)),
            "neighbour": self.fc_neighbour(n.mean(1)),
            "global": self.fc_global(glob),
        }


def triplex_loss(out: dict[str, torch.Tensor], y: torch.Tensor, alpha: float = 0.3) -> torch.Tensor:
    """MSE(fused, y) + sum over branches of (1 - alpha) MSE(branch, y) + alpha MSE(fused, branch).

    As in the reference training step, the distillation term is not detached: it pulls the fused
    and the branch outputs towards each other."""
    loss = F.mse_loss(out["fused"], y)
    for b in (b for b in BRANCHES if b in out):  # the spot-only ablation has the target branch only
        loss = loss + (1.0 - alpha) * F.mse_loss(out[b], y) + alpha * F.mse_loss(out["fused"], out[b])
    return loss
