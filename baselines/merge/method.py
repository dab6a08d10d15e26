"""`merge`: MERGE as an stbench Method (see README.md for the paper settings and deviations).

One batch = one slide (whole_slide=True) with its spatial k-NN graph (k = 8, served by the
DataModule, local row indices, never across slides). The model adds the hierarchical cluster edges
of that slide, computed from the batch's own coordinates and frozen features (never targets), and
runs the GAT over the slide's real rows. One optimiser step per slide, as in the reference code.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from baselines.merge.graph import hierarchical_edges, symmetric_unique
from baselines.merge.model import MERGENet
from stbench.data.features import encoder_dim, feature_key, provider_weights_id
from stbench.methods.base import BatchRequirements, Method, scored_rows

# "slide": z-score each channel of the frozen features over the slide's own spots (features only,
# never targets) - removes a slide's stain/scanner offset, which a GAT trained on 2-3 slides
# otherwise extrapolates from (README.md, "Deviations").
FEATURE_NORMS = ("none", "slide")
SPATIAL_K = 8  # spatial graph: 8 nearest spots (reference: kneighbors_graph(n_neighbors=8))


class MERGE(Method):
    name = "merge"
    task = "expression"
    requires = BatchRequirements(
        image=False,
        features=("encoder",),
        whole_slide=True,
        graph={"kind": "knn", "k": SPATIAL_K},
        patch={"out_px": 224},
    )

    def __init__(
        self,
        n_genes: int,
        genes: Sequence[str] | None = None,
        encoder: str = "resnet18",
        weights: str = "default",
        encoder_overrides: dict[str, Any] | None = None,
        hidden: Sequence[int] = (448, 384, 256),
        heads: int = 8,
        drop_edge: float = 0.2,
        hierarchical: bool = True,
        spatial_clusters: int = 5,
        feature_clusters: int = 5,
        kmeans_init: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        warmup_every: int = 40,
        feature_norm: str = "none",
        graph: bool = True,
    ) -> None:
        super().__init__(n_genes, genes, lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        self.encoder, self.weights = encoder, weights
        self.feature_key = feature_key(encoder)
        self.net = MERGENet(encoder_dim(encoder, encoder_overrides), n_genes, tuple(hidden), heads, drop_edge)
        self.hierarchical = hierarchical
        self.spatial_clusters, self.feature_clusters = int(spatial_clusters), int(feature_clusters)
        self.kmeans_init = int(kmeans_init)
        self.warmup_steps, self.warmup_every = max(1, int(warmup_steps)), max(1, int(warmup_every))
        self._edge_cache: dict[str, torch.Tensor] = {}
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"merge: feature_norm must be one of {FEATURE_NORMS}, got {feature_norm!r}")
        self.feature_norm = feature_norm
        # graph=False (ablations/no_edges): no spatial or cluster edges; the GAT keeps only each
        # node's self loop, i.e. a per-spot network with the same parameters.
        self.use_graph = bool(graph)
        self._weights_id: str | None = None

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and self._weights_id is None:
            self._weights_id = provider_weights_id(dm, self.feature_key)

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        with torch.no_grad():
            self.net.out.bias.copy_(torch.from_numpy(dm.train_target_mean()).float())

    # ---- graph ---------------------------------------------------------------------------------
    def slide_graph(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, features of rows, edges among rows renumbered 0..n-1): spatial k-NN + cluster edges."""
        n_all = batch["index"].shape[0]
        mask = batch.get("mask")
        rows = torch.nonzero(mask).flatten() if mask is not None else torch.arange(n_all, device=self.device)
        raw = batch["features"][self.feature_key][rows].float()
        x = raw
        if self.feature_norm == "slide" and len(rows) > 1:
            x = (raw - raw.mean(0)) / (raw.std(0) + 1e-6)
        local = torch.full((n_all,), -1, dtype=torch.long, device=rows.device)
        local[rows] = torch.arange(len(rows), device=rows.device)
        edges = batch.get("edge_index", torch.zeros(2, 0, dtype=torch.long, device=rows.device))
        edges = local[edges.long()]
        edges = edges[:, (edges >= 0).all(0)]
        if not self.use_graph:
            return rows, x, edges[:, :0]
        if self.hierarchical and len(rows) > 1:
            extra = self._cluster_edges(batch, rows, raw)  # MERGE clusters the raw features.to(edges.device)
            edges = symmetric_unique(torch.cat([edges, extra], dim=1))
        return rows, x, edges

    def _cluster_edges(self, batch: dict[str, Any], rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Cluster edges depend only on the slide's rows and their frozen features: computed once per
        (rows, features), cached (keyed by their bytes, so a changed input is never served stale)."""
        h = hashlib.sha256(f"{batch['slide'][0]}|".encode())
        h.update(batch["index"][rows].cpu().numpy().tobytes())
        h.update(x.detach().cpu().numpy().tobytes())
        key = h.hexdigest()
        if key not in self._edge_cache:
            coords = batch["coords"][rows].float()
            self._edge_cache[key] = hierarchical_edges(
                coords, x, self.spatial_clusters, self.feature_clusters, n_init=self.kmeans_init
            )
        return self._edge_cache[key]

    # ---- hooks ---------------------------------------------------------------------------------
    def predict_expression(self, batch: dict[str, Any]) -> torch.Tensor:
        rows, x, edges = self.slide_graph(batch)
        pred = self.net(x, edges)
        out = pred.new_zeros(batch["index"].shape[0], self.n_genes)
        out[rows] = pred
        return out

    def _real(self, batch: dict[str, Any], pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch.get("mask")
        target = batch["expression"].float()
        return (pred[mask], target[mask]) if mask is not None else (pred, target)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        pred, target = self._real(batch, self.predict_expression(batch))
        return F.mse_loss(pred, target)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rows = scored_rows(batch)
        pred, target = self.predict_expression(batch).float(), batch["expression"].float()
        if rows is not None:
            pred, target = pred[rows], target[rows]
        n = int(target.shape[0])
        self.log("val/mse", F.mse_loss(pred, target), sync_dist=True, batch_size=n, prog_bar=True)
        self.log("val/mae", F.l1_loss(pred, target), sync_dist=True, batch_size=n)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        steps, every = self.warmup_steps, self.warmup_every
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: min(1.0, math.floor(e / every + 1) / steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def weights_id(self) -> str:
        return self._weights_id or str(self.weights)
