"""`patch-cnn`: a small CNN trained from scratch on spot patches to regress the panel's targets.

The head's bias starts at the training-target mean (computed from training spots only), so the
network starts as the mean predictor and learns the image-dependent part on top of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from baselines.patch_cnn.model import PatchCNNNet
from stbench.methods.base import BatchRequirements, Method


class PatchCNN(Method):
    name = "patch-cnn"
    task = "expression"
    requires = BatchRequirements(image=True, patch={"out_px": 224})

    def __init__(
        self,
        n_genes: int,
        genes: Sequence[str] | None = None,
        channels: Sequence[int] = (32, 64, 128, 256),
        dropout: float = 0.2,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        cosine_schedule: bool = True,
    ) -> None:
        super().__init__(n_genes, genes, lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        self.net = PatchCNNNet(n_genes, channels, dropout)
        self.cosine_schedule = cosine_schedule

    def on_fit_start(self) -> None:
        mean = torch.from_numpy(self.trainer.datamodule.train_target_mean()).float()
        with torch.no_grad():
            self.net.head.bias.copy_(mean)

    def predict_expression(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.net(batch["image"])

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if not self.cosine_schedule or not self.trainer or not self.trainer.max_epochs:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
