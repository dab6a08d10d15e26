"""`triplex`: TRIPLEX as an stbench Method (see README.md for the paper settings and deviations).

Batching: one batch = one slide (whole_slide=True), because the global branch attends over every
spot of the slide. Training walks the slide's spots in shuffled chunks of `train_spots_per_step`
(the reference batch size, 128) with one optimiser step per chunk (manual optimisation), so an
epoch sees every training spot once, as in the reference; the global branch is re-run for each
step (its gradient flows, as in the reference). Prediction encodes the slide once and runs the
target/neighbour/fusion part in chunks of `predict_chunk` spots. Context never leaves the batch,
and a batch never holds two slides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from baselines.triplex.model import TRIPLEXNet, triplex_loss
from stbench.data.features import encoder_dim, feature_key, provider_weights_id
from stbench.methods.base import BatchRequirements, Method

GRID = 5  # neighbour view: 5 x 5 spot-sized tiles centred on the spot (the reference setting)


def grid_positions(batch: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
    """(n, 2) integer (col, row) grid positions of `rows`: the array coordinates when the dataset has
    them, else pixel centres snapped to the median nearest-neighbour spacing."""
    if "array_coords" in batch:
        return batch["array_coords"][rows].long()
    xy = batch["coords"][rows].double()
    if len(xy) < 2:
        return torch.zeros_like(xy, dtype=torch.long)
    d = torch.cdist(xy, xy)
    d.fill_diagonal_(float("inf"))
    step = d.min(1).values.median().clamp_min(1e-6)
    return torch.round((xy - xy.min(0).values) / step).long()


class TRIPLEX(Method):
    name = "triplex"
    task = "expression"
    requires = BatchRequirements(
        image=True, features=("encoder", f"encoder:grid={GRID}"), whole_slide=True, patch={"out_px": 224}
    )

    def __init__(
        self,
        n_genes: int,
        genes: Sequence[str] | None = None,
        encoder: str = "resnet18",
        weights: str = "default",
        encoder_overrides: dict[str, Any] | None = None,
        target_encoder: str = "resnet18",
        target_weights: str | None = None,
        target_overrides: dict[str, Any] | None = None,
        target_stages: int = 4,
        emb_dim: int = 512,
        fusion_depth: int = 1,
        global_depth: int = 5,
        neighbour_depth: int = 4,
        fusion_heads: int = 4,
        global_heads: int = 8,
        neighbour_heads: int = 4,
        fusion_mlp_ratio: float = 4.0,
        global_mlp_ratio: float = 4.0,
        neighbour_mlp_ratio: float = 4.0,
        fusion_dropout: float = 0.4,
        global_dropout: float = 0.3,
        neighbour_dropout: float = 0.3,
        kernel_size: int = 3,
        alpha: float = 0.3,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        lr_step_size: int = 50,
        lr_gamma: float = 0.9,
        train_spots_per_step: int = 128,
        predict_chunk: int = 512,
        context: bool = True,
    ) -> None:
        super().__init__(n_genes, genes, lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        self.automatic_optimization = False  # several optimiser steps per slide batch
        from stbench.encoders import build_encoder

        self.encoder, self.weights = encoder, weights
        self.feature_key = feature_key(encoder)
        self.grid_key = f"{self.feature_key}:grid={GRID}"
        t_weights = target_weights if target_weights is not None else weights
        t_over = target_overrides if target_overrides is not None else encoder_overrides
        kw = {"arch_overrides": dict(t_over)} if t_over else {}
        backbone = build_encoder(target_encoder, t_weights, **kw)
        self._target_weights_id = str(backbone.weights_id)
        self.net = TRIPLEXNet(
            n_genes,
            backbone,
            encoder_dim(encoder, encoder_overrides),
            emb_dim,
            depth=(fusion_depth, global_depth, neighbour_depth),
            heads=(fusion_heads, global_heads, neighbour_heads),
            mlp_ratio=(fusion_mlp_ratio, global_mlp_ratio, neighbour_mlp_ratio),
            dropout=(fusion_dropout, global_dropout, neighbour_dropout),
            kernel_size=kernel_size,
            grid=GRID,
            target_stages=target_stages,
            context=context,
        )
        self.alpha = alpha
        self.lr_step_size, self.lr_gamma = lr_step_size, lr_gamma
        self.train_spots_per_step, self.predict_chunk = int(train_spots_per_step), int(predict_chunk)
        self._feature_weights_id: str | None = None
        self.train()  # build_encoder returns the backbone in eval mode; Lightning keeps module modes

    # ---- setup -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and self._feature_weights_id is None:
            self._feature_weights_id = provider_weights_id(dm, self.feature_key)

    def on_fit_start(self) -> None:
        """Every head starts at the training-target mean (training spots only)."""
        mean = torch.from_numpy(self.trainer.datamodule.train_target_mean()).float()
        with torch.no_grad():
            for head in self.net.heads():
                head.bias.copy_(mean)

    # ---- slide -> inputs ---------------------------------------------------------------------
    def _slide_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Real rows of a (possibly padded) whole-slide batch and their inputs."""
        n = batch["index"].shape[0]
        mask = batch.get("mask")
        rows = torch.nonzero(mask).flatten() if mask is not None else torch.arange(n, device=self.device)
        feats = batch["features"]
        tiles = feats[self.grid_key][rows]
        return {
            "rows": rows,
            "global": feats[self.feature_key][rows].float(),
            "pos": grid_positions(batch, rows),
            "tiles": tiles.view(len(rows), GRID * GRID, -1).float(),
            "images": batch["image"][rows],
        }

    def _outputs(self, x: dict[str, Any], glob: torch.Tensor, sel: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(x["images"][sel], x["tiles"][sel], glob[sel])

    # ---- Lightning hooks -----------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        x = self._slide_inputs(batch)
        y = batch["expression"][x["rows"]].float()
        order = torch.randperm(len(x["rows"]), device=y.device)
        losses = []
        for sel in order.split(self.train_spots_per_step):
            glob = self.net.encode_global(x["global"], x["pos"])  # whole slide, every step
            loss = triplex_loss(self._outputs(x, glob, sel), y[sel], self.alpha)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            losses.append(loss.detach() * len(sel))
        mean_loss = torch.stack(losses).sum() / len(order)
        self.log("train/loss", mean_loss, prog_bar=True, batch_size=len(order))
        return mean_loss

    def on_train_epoch_end(self) -> None:
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Validation MSE over real rows only (whole-slide batches may be padded)."""
        mask = batch.get("mask")
        pred, target = self.predict_expression(batch).float(), batch["expression"].float()
        if mask is not None:
            pred, target = pred[mask], target[mask]
        n = int(target.shape[0])
        self.log("val/mse", F.mse_loss(pred, target), sync_dist=True, batch_size=n, prog_bar=True)
        self.log("val/mae", F.l1_loss(pred, target), sync_dist=True, batch_size=n)

    def predict_expression(self, batch: dict[str, Any]) -> torch.Tensor:
        """Fused-head predictions for every real row; padded rows get zeros (masked downstream)."""
        x = self._slide_inputs(batch)
        glob = self.net.encode_global(x["global"], x["pos"])
        idx = torch.arange(len(x["rows"]), device=glob.device)
        parts = [self._outputs(x, glob, sel)["fused"] for sel in idx.split(self.predict_chunk)]
        out = torch.zeros(batch["index"].shape[0], self.n_genes, device=glob.device, dtype=glob.dtype)
        if parts:
            out[x["rows"]] = torch.cat(parts)
        return out

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay, foreach=True)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.lr_step_size, gamma=self.lr_gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # ---- provenance --------------------------------------------------------------------------
    def weights_id(self) -> str:
        """Trainable target backbone's start weights and the frozen feature encoder's weights."""
        feats = self._feature_weights_id or str(self.weights)
        if feats == self._target_weights_id:
            return feats
        return f"target:{self._target_weights_id}+features:{feats}"
