"""`histogene`: HisToGene (Pang et al. 2021) - a ViT over all spots of a slide, trained with MSE.

Whole-slide batches: one batch = one slide = one sequence (the DataModule pads and masks; the mask
keeps padding out of attention). Array positions come from `batch["array_coords"]` (col, row),
clamped to the embedding tables' range [0, n_pos - 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from baselines.histogene.model import HisToGeneNet
from stbench.methods.base import BatchRequirements, Method
from stbench.methods.toolkit.whole_slide import log_masked_validation, slide_mask, slide_positions


class HisToGene(Method):
    name = "histogene"
    task = "expression"
    requires = BatchRequirements(image=True, whole_slide=True, patch={"out_px": 112})

    def __init__(
        self,
        n_genes: int,
        genes: Sequence[str] | None = None,
        patch_px: int = 112,
        dim: int = 1024,
        depth: int = 4,
        heads: int = 16,
        dim_head: int = 64,
        mlp_dim: int = 2048,
        dropout: float = 0.1,
        n_pos: int = 64,
        pixel_scale: float = 255.0,
        mean_init: bool = False,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(n_genes, genes, lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        self.net = HisToGeneNet(n_genes, patch_px, dim, depth, heads, dim_head, mlp_dim, dropout, n_pos)
        self.pixel_scale = float(pixel_scale)
        self.mean_init = mean_init

    def on_fit_start(self) -> None:
        if self.mean_init:  # stbench convention (off in the paper config): start as the mean predictor
            mean = torch.from_numpy(self.trainer.datamodule.train_target_mean()).float()
            with torch.no_grad():
                self.net.gene_head[-1].bias.copy_(mean)

    def predict_expression(self, batch: dict[str, Any]) -> torch.Tensor:
        image = batch["image"] * self.pixel_scale  # the authors feed raw 0..255 intensities
        mask = slide_mask(batch)
        out = self.net(image.unsqueeze(0), slide_positions(batch).unsqueeze(0), mask.unsqueeze(0))
        return out.squeeze(0)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        mask = slide_mask(batch)
        return F.mse_loss(self.predict_expression(batch)[mask], batch["expression"][mask])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        log_masked_validation(self, batch)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
