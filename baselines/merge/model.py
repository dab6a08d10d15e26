"""MERGE's GNN (ags3927/MERGE utils/model.py GATNet, re-implemented): four GAT layers over one slide.

GAT(in -> 448 x 8 heads, concat) -> ReLU -> graph LayerNorm -> GAT(-> 384 x 8) -> ReLU -> LN ->
GAT(-> 256 x 8) -> ReLU -> LN -> GAT(-> n_genes, 1 head). DropEdge (p = 0.2) on the input graph
while training. Every node of the slide predicts its own expression vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from baselines.merge.gat import GATLayer, GraphLayerNorm, drop_edges


class MERGENet(nn.Module):
    def __init__(
        self,
        in_dim: int,
        n_genes: int,
        hidden: Sequence[int] = (448, 384, 256),
        heads: int = 8,
        drop_edge: float = 0.2,
    ) -> None:
        super().__init__()
        self.drop_edge = drop_edge
        self.layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        d = in_dim
        for h in hidden:
            layer = GATLayer(d, h, heads)
            self.layers.append(layer)
            self.norms.append(GraphLayerNorm(layer.dim))
            d = layer.dim
        self.out = GATLayer(d, n_genes, 1)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """x (N, in_dim) features of the real spots of ONE slide; edge_index (2, E) local rows."""
        edges = drop_edges(edge_index, self.drop_edge, self.training)
        h = x.float()
        for layer, norm in zip(self.layers, self.norms, strict=True):
            h = norm(F.relu(layer(h, edges)))
        return self.out(h, edges)
