"""Hist2ST's graph module: GraphSAGE-style layers over the spot graph, jumping knowledge by an LSTM.

The authors' layer (policy "mean", their `gcn=True` branch) is h'_i = L2norm(ReLU(W . mean_{j in N(i)} h_j)),
W without bias; their adjacency (4 nearest array-grid neighbours within 2 grid units) has no self
loops. `self_loops=True` averages over N(i) plus i itself (GraphSAGE's GCN variant), so a spot
without neighbours keeps its own features instead of the authors' 0/0 = NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POLICIES = ("mean", "max")


def aggregate(h: torch.Tensor, edge_index: torch.Tensor, policy: str, self_loops: bool) -> torch.Tensor:
    """Mean or max of each node's neighbours' rows of h (N, D) over edges (2, E) (src -> dst);
    nodes without any neighbour get zeros."""
    n = h.shape[0]
    src, dst = edge_index[0], edge_index[1]
    if self_loops:
        loop = torch.arange(n, device=h.device)
        src, dst = torch.cat([src, loop]), torch.cat([dst, loop])
    index = dst.unsqueeze(1).expand(-1, h.shape[1])
    if policy == "mean":
        total = h.new_zeros(h.shape).index_add_(0, dst, h[src])
        deg = torch.bincount(dst, minlength=n).clamp(min=1).to(h.dtype)
        return total / deg.unsqueeze(1)
    out = h.new_zeros(h.shape).scatter_reduce(0, index, h[src], reduce="amax", include_self=False)
    return out


class SAGELayer(nn.Module):
    """One GraphSAGE-style layer (see module docstring)."""

    def __init__(self, dim_in: int, dim_out: int, policy: str = "mean", self_loops: bool = True) -> None:
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy, self.self_loops = policy, self_loops
        self.weight = nn.Linear(dim_in, dim_out, bias=False)
        nn.init.xavier_uniform_(self.weight.weight)

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        agg = aggregate(h, edge_index, self.policy, self.self_loops)
        return F.normalize(F.relu(self.weight(agg)), p=2, dim=1)


class GraphModule(nn.Module):
    """`depth` SAGE layers; their outputs, as a sequence per node, go through a 2-layer LSTM
    (jumping knowledge) whose outputs are averaged over the sequence."""

    def __init__(self, dim: int, depth: int, policy: str = "mean", self_loops: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SAGELayer(dim, dim, policy, self_loops) for _ in range(depth))
        self.jk = nn.LSTM(dim, dim, num_layers=2)

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        outs = []
        for layer in self.layers:
            h = layer(h, edge_index)
            outs.append(h)
        seq, _ = self.jk(torch.stack(outs))  # (depth, N, dim): sequence axis first
        return seq.mean(0)
