"""`hist2st`: Hist2ST (Zeng et al. 2022) - convmixer + transformer + GNN over one slide's spot graph.

Training objective (the authors' code): MSE of the regression head on the protocol's targets
  + zinb * ZINB negative log-likelihood of the raw panel counts (mean scaled by the spot's size factor
    = its panel count total / the slide's median)
  + lamb * self-distillation: `bake` augmented views of the slide are predicted, combined per spot
    by a softmax over learned view weights, and pulled towards the prediction of the original view
    (MSE; gradients flow into both sides, as in the authors' code).
Prediction = the regression head on the un-augmented slide, in the protocol's target space.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from baselines.hist2st.augment import slide_view
from baselines.hist2st.model import Hist2STNet
from baselines.hist2st.zinb import zinb_nll
from stbench.methods.base import BatchRequirements, Method
from stbench.methods.toolkit.whole_slide import log_masked_validation, slide_mask, slide_positions

SIZE_FACTORS = ("panel", "library")

# The authors' graph: each spot's 4 array-grid neighbours (square ST grid; 4 nearest within 2 units).
GRID_4 = {"kind": "grid", "radius": 1, "metric": "manhattan"}


def size_factors(batch: dict[str, Any], mask: torch.Tensor, source: str) -> torch.Tensor:
    """(N,) per-spot count total / median over the slide's real rows (1 for padding)."""
    n = batch["counts"].sum(1) if source == "panel" else batch["totals"].float()
    med = torch.quantile(n[mask].float(), 0.5) if bool(mask.any()) else n.new_tensor(1.0)  # = np.median
    sf = n / med.clamp(min=1e-8) if float(med) > 0 else torch.ones_like(n)
    return torch.where(mask, sf, torch.ones_like(sf))


def train_count_mean(dm: Any, floor: float = 1e-3) -> np.ndarray:
    """(G,) mean over TRAINING spots (validation excluded) of raw panel counts / the spot's size
    factor (panel total / its slide's median): where the ZINB mean head starts under mean_init."""
    table = dm.spot_table
    parts = []
    for slide in dm.train_slides:
        rows = table.loc[(table["slide"] == slide) & (table["split"] == "train"), "row"].to_numpy()
        counts = dm.raw_counts(slide).to_numpy(np.float64)[rows]
        lib = counts.sum(1)
        med = np.median(lib) if len(lib) else 0.0
        parts.append(counts / (lib / med if med > 0 else np.ones_like(lib))[:, None].clip(min=1e-8))
    return np.maximum(np.concatenate(parts).mean(0), floor)


class Hist2ST(Method):
    name = "hist2st"
    task = "expression"
    requires = BatchRequirements(
        image=True, whole_slide=True, counts=True, graph=GRID_4, patch={"out_px": 112}
    )

    def __init__(
        self,
        n_genes: int,
        genes: Sequence[str] | None = None,
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
        zinb: float = 0.25,
        bake: int = 5,
        lamb: float = 0.5,
        size_factor: str = "panel",
        bn_stats: str = "running",
        pixel_scale: float = 255.0,
        mean_init: bool = False,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        lr_step: int = 50,
        lr_gamma: float = 0.9,
        graph: bool = True,
    ) -> None:
        super().__init__(n_genes, genes, lr=lr, weight_decay=weight_decay)
        if size_factor not in SIZE_FACTORS:
            raise ValueError(f"size_factor must be one of {SIZE_FACTORS}, got {size_factor!r}")
        self.save_hyperparameters()
        self.net = Hist2STNet(
            n_genes, patch_px, patch_size, kernel_size, channels, depth1, depth2, depth3, heads, dim_head,
            mlp_dim, dropout, n_pos, policy, self_loops, zinb=zinb > 0, distill=bake > 0, bn_stats=bn_stats,
        )  # fmt: skip
        self.zinb_weight, self.bake, self.lamb = float(zinb), int(bake), float(lamb)
        self.size_factor = size_factor
        self.pixel_scale = float(pixel_scale)
        self.mean_init = mean_init
        self.lr_step, self.lr_gamma = lr_step, lr_gamma
        # graph=False (ablations/no_graph): the GNN sees no edges, so with self loops each layer
        # transforms the spot's own token only (the ablation of the graph, same parameters).
        if not graph and not self_loops:
            raise ValueError("hist2st: graph=False needs self_loops=True (a node with no edges gets zeros)")
        self.use_graph = bool(graph)

    def on_fit_start(self) -> None:
        if self.mean_init:  # stbench convention (off in the paper config): start as the mean predictor
            mean = torch.from_numpy(self.trainer.datamodule.train_target_mean()).float()
            with torch.no_grad():
                self.net.gene_head[-1].bias.copy_(mean)
                if self.net.zinb_heads is not None:  # ZINB mean starts at the mean normalised count
                    log_mu = torch.from_numpy(np.log(train_count_mean(self.trainer.datamodule)))
                    self.net.zinb_heads["mean"][0].bias.copy_(log_mu.float())

    def _forward(self, batch: dict[str, Any], images: torch.Tensor | None = None) -> tuple[Any, ...]:
        images = batch["image"] if images is None else images
        edges = batch.get("edge_index")
        if edges is None:
            raise ValueError("Hist2ST needs the spot graph (batch['edge_index']); declare requires.graph")
        if not self.use_graph:
            edges = edges[:, :0]
        return self.net(images * self.pixel_scale, slide_positions(batch), edges, slide_mask(batch))

    def predict_expression(self, batch: dict[str, Any]) -> torch.Tensor:
        return self._forward(batch)[0]

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The three terms (unweighted) and their weighted sum under "loss"."""
        mask = slide_mask(batch)
        pred, extra, _ = self._forward(batch)
        out = {"mse": F.mse_loss(pred[mask], batch["expression"][mask])}
        total = out["mse"]
        if extra is not None and self.zinb_weight > 0:
            mean, disp, pi = (t[mask].float() for t in extra)  # lgamma in float32 under autocast
            sf = size_factors(batch, mask, self.size_factor)[mask]
            out["zinb"] = zinb_nll(batch["counts"][mask], mean, disp, pi, sf).mean()
            total = total + self.zinb_weight * out["zinb"]
        if self.bake > 0:
            preds, weights = [], []
            for _ in range(self.bake):
                p, _, h = self._forward(batch, slide_view(batch["image"]))
                preds.append(p)
                weights.append(self.net.coef(h))
            w = torch.softmax(torch.stack(weights), dim=0)  # (bake, N, 1): softmax over views per spot
            distilled = (torch.stack(preds) * w).sum(0)
            out["distill"] = F.mse_loss(distilled[mask], pred[mask])
            total = total + self.lamb * out["distill"]
        out["loss"] = total
        return out

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.losses(batch)["loss"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        parts = self.losses(batch)
        n = int(slide_mask(batch).sum())
        for k, v in parts.items():
            self.log(f"train/{k}", v, prog_bar=k == "loss", batch_size=n)
        return parts["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        log_masked_validation(self, batch)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.lr_step, gamma=self.lr_gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
