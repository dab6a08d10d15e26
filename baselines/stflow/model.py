"""STFlow's denoiser: a spatial transformer over one slide's spots that predicts clean expression.

Structure (the authors' `stflow/model/{denoiser,transformer,fa}.py`, rewritten here):
- token_i = Linear(histology features_i) + MLP(sinusoidal(t));
- each layer, spot i attends to its k nearest spots j (k = 8) only. The attention score of (i, j)
  per head is an MLP of [q_i, k_j, e_ij, g_j - g_i]: queries/keys from the tokens, e_ij a pairwise
  feature of the relative position (frame-averaged, so invariant to rotating / reflecting the
  slide), and g_j - g_i the difference of the current expression estimates (the noisy x_t in the
  first layer) - the only way expression enters, as in the authors' code. Messages are the values
  v_j and the pairwise features e_ij; a SwiGLU MLP mixes them back into the token (residual);
- a SwiGLU FFN (residual), then a per-layer gene head (ReLU'd: log1p targets are >= 0) whose output
  is the next layer's expression estimate; the prediction is the mean of the layers' outputs.

Every SwiGLU is timm's `SwiGLUPacked` layout: fc1 -> SiLU(first half) * second half -> dropout ->
LayerNorm(hidden / 2) -> fc2 -> dropout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FRAME_SIGNS = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])  # 2-D frames


class SwiGLU(nn.Module):
    """Gated MLP: fc1 (in -> hidden), SiLU(a) * b on its halves, LayerNorm(hidden/2), fc2 (-> out)."""

    def __init__(self, d_in: int, hidden: int, d_out: int, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden % 2:
            raise ValueError(f"SwiGLU hidden width must be even, got {hidden}")
        self.fc1 = nn.Linear(d_in, hidden)
        self.norm = nn.LayerNorm(hidden // 2)
        self.fc2 = nn.Linear(hidden // 2, d_out)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.drop(self.fc2(self.norm(self.drop(F.silu(a) * b))))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (cos || sin, max period 10^4), then Linear-SiLU-Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256, max_period: float = 10_000.0) -> None:
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.freq_dim % 2:
            emb = F.pad(emb, (0, 1))
        return self.mlp(emb)


# ---- the spot graph ------------------------------------------------------------------------------
def neighbour_table(
    edge_index: torch.Tensor, coords: torch.Tensor, n: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) neighbour indices and validity: each spot's k nearest among its graph neighbours.

    On a symmetric k-NN graph (the DataModule's `{"kind": "knn", "k": k}`) these are exactly the
    spot's own k nearest spots, i.e. the authors' directed k-NN; spots with fewer than k graph
    neighbours get invalid slots (index = the spot itself, never attended)."""
    device = coords.device
    idx = torch.arange(n, device=device)[:, None].repeat(1, k)
    valid = torch.zeros(n, k, dtype=torch.bool, device=device)
    if edge_index.numel() == 0 or k == 0:
        return idx, valid
    src, dst = edge_index[0].long(), edge_index[1].long()
    dist = (coords[dst] - coords[src]).norm(dim=-1)
    order = torch.argsort(dist, stable=True)
    order = order[torch.argsort(src[order], stable=True)]  # by source, nearest first
    src, dst = src[order], dst[order]
    starts = torch.zeros(n + 1, dtype=torch.long, device=device)
    starts[1:] = torch.cumsum(torch.bincount(src, minlength=n), 0)
    rank = torch.arange(src.numel(), device=device) - starts[src]
    keep = rank < k
    idx[src[keep], rank[keep]] = dst[keep]
    valid[src[keep], rank[keep]] = True
    return idx, valid


def frame_coordinates(rel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(n, 4, k, 2): each spot's neighbour offsets, centred on their mean, in the 4 sign choices of
    the principal axes of their covariance (frame averaging over E(2) for 2-D coordinates)."""
    m = valid.unsqueeze(-1).to(rel.dtype)
    centre = (rel * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)
    x = (rel - centre) * m
    cov = (x.transpose(1, 2) @ x).detach()
    _, vecs = torch.linalg.eigh(cov)  # (n, 2, 2), columns = principal axes
    proj = x @ vecs  # (n, k, 2) coordinates on the axes
    return proj.unsqueeze(1) * FRAME_SIGNS.to(rel)[None, :, None, :]


# ---- layers ----------------------------------------------------------------------------------------
class KNNAttention(nn.Module):
    """Attention of each spot over its k nearest spots with pairwise position and expression terms."""

    def __init__(
        self, d_model: int, d_edge: int, n_genes: int, heads: int, dropout: float, attn_dropout: float
    ) -> None:
        super().__init__()
        if d_model % heads or d_edge % heads:
            raise ValueError(f"hidden sizes {d_model}, {d_edge} must be divisible by heads={heads}")
        self.heads, self.d_head, self.d_edge_head = heads, d_model // heads, d_edge // heads
        self.qkv = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 3 * d_model))
        self.edge = SwiGLU(2 + 1, d_edge, d_edge, dropout)  # frame coordinates + distance
        self.score = SwiGLU(2 * self.d_head + self.d_edge_head + n_genes, d_model, 1, dropout)
        self.out = SwiGLU(d_model + d_edge, d_model, d_model, dropout)
        self.attn_drop = nn.Dropout(attn_dropout)

    def forward(
        self,
        genes: torch.Tensor,
        tokens: torch.Tensor,
        coords: torch.Tensor,
        nbr: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        n, k = nbr.shape
        h = self.heads
        q, key, v = (z.view(n, h, -1) for z in self.qkv(tokens).chunk(3, dim=-1))
        rel = coords[nbr] - coords[:, None]  # (n, k, 2)
        frames = frame_coordinates(rel, valid)  # (n, 4, k, 2)
        dist = rel.norm(dim=-1)[:, None, :, None].expand(n, frames.shape[1], k, 1)
        edge = self.edge(torch.cat([frames, dist], dim=-1)).mean(1)  # (n, k, d_edge)
        edge_h = edge.view(n, k, h, self.d_edge_head)
        diff = (genes[nbr] - genes[:, None])[:, :, None].expand(n, k, h, genes.shape[-1])
        msg = torch.cat([q[:, None].expand(n, k, h, self.d_head), key[nbr], edge_h, diff], dim=-1)
        logits = self.score(msg).squeeze(-1)  # (n, k, h)
        logits = logits.masked_fill(~valid[..., None], torch.finfo(logits.dtype).min)
        attn = self.attn_drop(torch.softmax(logits, dim=1) * valid[..., None])
        ctx = torch.einsum("nkh,nkhd->nhd", attn, v[nbr]).reshape(n, -1)
        ctx_edge = torch.einsum("nkh,nkhd->nhd", attn, edge_h).reshape(n, -1)
        return self.out(torch.cat([ctx, ctx_edge], dim=-1))


class STFlowBlock(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_edge: int,
        n_genes: int,
        heads: int,
        dropout: float,
        attn_dropout: float,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.attn = KNNAttention(d_model, d_edge, n_genes, heads, dropout, attn_dropout)
        self.ffn = SwiGLU(d_model, int(d_model * mlp_ratio), d_model, dropout)
        self.gene_head = nn.Sequential(
            nn.Linear(d_model, d_model), nn.GELU(), nn.LayerNorm(d_model), nn.Dropout(dropout),
            nn.Linear(d_model, n_genes), nn.Dropout(dropout),
        )  # fmt: skip

    def forward(
        self,
        genes: torch.Tensor,
        tokens: torch.Tensor,
        coords: torch.Tensor,
        nbr: torch.Tensor,
        valid: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokens + self.attn(genes, tokens, coords, nbr, valid)
        tokens = tokens + self.ffn(tokens)
        return self.gene_head(tokens), tokens


class STFlowNet(nn.Module):
    """x1_hat = f(x_t, histology features, coords, t) over one or more disjoint spot graphs."""

    def __init__(
        self,
        in_dim: int,
        n_genes: int,
        hidden: int = 128,
        edge_hidden: int = 128,
        layers: int = 4,
        heads: int = 4,
        dropout: float = 0.2,
        attn_dropout: float = 0.2,
        mlp_ratio: float = 4.0,
        n_neighbors: int = 8,
        freq_dim: int = 256,
    ) -> None:
        super().__init__()
        self.n_genes, self.n_neighbors = n_genes, n_neighbors
        self.image_proj = nn.Linear(in_dim, hidden)
        self.time_embed = TimestepEmbedder(hidden, freq_dim)
        self.blocks = nn.ModuleList(
            STFlowBlock(hidden, edge_hidden, n_genes, heads, dropout, attn_dropout, mlp_ratio)
            for _ in range(layers)
        )
        # ReLU on every layer's genes (the authors' default for log1p targets); a buffer so a
        # checkpoint carries the choice the method made from its training targets.
        self.register_buffer("relu_out", torch.tensor(True))

    def forward(
        self,
        x_t: torch.Tensor,
        features: torch.Tensor,
        coords: torch.Tensor,
        t: torch.Tensor | float,
        edge_index: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, G) predicted clean expression. `t`: scalar or (N,) per row; `edge_index` (2, E) over
        real rows only; `mask` (N,) marks real rows (padding rows give zeros and affect nothing)."""
        n_all = x_t.shape[0]
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            t = torch.full((n_all,), float(t), device=x_t.device)
        if mask is not None:
            keep = torch.nonzero(mask.bool(), as_tuple=True)[0]
            local = torch.full((n_all,), -1, dtype=torch.long, device=x_t.device)
            local[keep] = torch.arange(keep.numel(), device=x_t.device)
            edge_index = local[edge_index.long()]
            if edge_index.numel() and bool((edge_index < 0).any()):
                raise ValueError(
                    "edge_index links a padding row (mask False); edges must join real rows only"
                )
            x_t, features, coords, t = x_t[keep], features[keep], coords[keep], t[keep]
        nbr, valid = neighbour_table(edge_index, coords.float(), x_t.shape[0], self.n_neighbors)
        tokens = self.image_proj(features) + self.time_embed(t)
        genes, outs, relu = x_t, [], bool(self.relu_out)
        for blk in self.blocks:
            genes, tokens = blk(genes, tokens, coords.float(), nbr, valid)
            if relu:
                genes = F.relu(genes)
            outs.append(genes)
        out = torch.stack(outs).mean(0)
        if mask is None:
            return out
        full = out.new_zeros(n_all, out.shape[-1])
        full[keep] = out
        return full
