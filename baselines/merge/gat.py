"""Graph attention (GAT, Velickovic et al. 2018) and graph-wise LayerNorm in plain torch.

Written here instead of depending on torch_geometric. Semantics follow the GATConv defaults MERGE
uses: shared linear map without bias, per-head source/destination attention vectors, LeakyReLU
(0.2), softmax over each node's incoming edges INCLUDING a self loop (added here; existing self
loops are dropped first), heads concatenated (or averaged), then a bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def with_self_loops(edge_index: torch.Tensor, n: int) -> torch.Tensor:
    """(2, E) edges (source, target) without self loops, plus exactly one self loop per node."""
    keep = edge_index[0] != edge_index[1]
    loops = torch.arange(n, device=edge_index.device).expand(2, n)
    return torch.cat([edge_index[:, keep], loops], dim=1)


def edge_softmax(scores: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    """Softmax of (E, H) edge scores over the edges sharing a target node."""
    h = scores.shape[1]
    idx = target[:, None].expand(-1, h)
    peak = scores.new_full((n, h), float("-inf")).scatter_reduce(0, idx, scores.detach(), "amax")
    ex = (scores - peak.index_select(0, target)).exp()
    denom = ex.new_zeros(n, h).index_add(0, target, ex)
    return ex / denom.index_select(0, target)


class GATLayer(nn.Module):
    def __init__(
        self, in_dim: int, out_dim: int, heads: int = 1, concat: bool = True, negative_slope: float = 0.2
    ) -> None:
        super().__init__()
        self.heads, self.out_dim, self.concat = heads, out_dim, concat
        self.negative_slope = negative_slope
        self.lin = nn.Linear(in_dim, heads * out_dim, bias=False)
        self.att_src = nn.Parameter(torch.empty(1, heads, out_dim))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_dim))
        self.bias = nn.Parameter(torch.zeros(heads * out_dim if concat else out_dim))
        nn.init.xavier_uniform_(self.lin.weight)
        nn.init.xavier_uniform_(self.att_src)
        nn.init.xavier_uniform_(self.att_dst)

    @property
    def dim(self) -> int:
        return self.heads * self.out_dim if self.concat else self.out_dim

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, in_dim); edge_index (2, E) messages source -> target. Returns (N, dim), and with
        `return_attention` also the edges used (self loops added) and their (E', heads) weights."""
        n, heads, c = x.shape[0], self.heads, self.out_dim
        edges = with_self_loops(edge_index, n)
        src, dst = edges[0], edges[1]
        h = self.lin(x)  # (N, heads * c); kept 2-D: gathers/scatters on 2-D tensors are much faster
        hh = h.view(n, heads, c)
        a_src = (hh * self.att_src).sum(-1)  # (N, heads)
        a_dst = (hh * self.att_dst).sum(-1)
        scores = F.leaky_relu(a_src.index_select(0, src) + a_dst.index_select(0, dst), self.negative_slope)
        alpha = edge_softmax(scores, dst, n)  # (E', heads)
        msg = h.index_select(0, src).view(-1, heads, c) * alpha[..., None]
        out = h.new_zeros(n, heads * c).index_add(0, dst, msg.reshape(-1, heads * c))
        out = out if self.concat else out.view(n, heads, c).mean(1)
        out = out + self.bias
        return (out, edges, alpha) if return_attention else out


class GraphLayerNorm(nn.Module):
    """LayerNorm over a whole graph (torch_geometric's default "graph" mode): one mean and one
    (population) standard deviation over all nodes and channels, then a per-channel affine map."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean()
        return x / (x.pow(2).mean().sqrt() + self.eps) * self.weight + self.bias


def drop_edges(edge_index: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Drop each directed edge independently with probability p (DropEdge) while training."""
    if not training or p <= 0 or edge_index.shape[1] == 0:
        return edge_index
    keep = torch.rand(edge_index.shape[1], device=edge_index.device) >= p
    return edge_index[:, keep]
