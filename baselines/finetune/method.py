"""`finetune`: a registry encoder plus a linear head, trained end to end on spot patches.

Two learning rates: the pretrained encoder moves slowly (`encoder_lr`), the new head fast (`lr`).
The head's bias starts at the training-target mean (training spots only), as in patch-cnn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from baselines.finetune.model import EncoderRegressor
from stbench.methods.base import BatchRequirements, Method


def _build_encoder(name: str, weights: str) -> Any:
    """Indirection so tests can substitute a tiny encoder; the real one comes from the registry."""
    from stbench.encoders import build_encoder

    return build_encoder(name, weights=weights)


class Finetune(Method):
    name = "finetune"
    task = "expression"
    requires = BatchRequirements(image=True, patch={"out_px": 224, "crop_um": 112.0})

    def __init__(
        self,
        n_genes: int,
        genes: Sequence[str] | None = None,
        encoder: str = "resnet50-trunc",
        weights: str = "default",
        lr: float = 1e-3,
        encoder_lr: float = 1e-5,
        weight_decay: float = 1e-4,
        dropout: float = 0.1,
        cosine_schedule: bool = True,
    ) -> None:
        super().__init__(n_genes, genes, lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        enc = _build_encoder(encoder, weights)
        enc.train()  # the zoo returns encoders in eval mode (for extraction); here BatchNorm must train
        self.encoder_name, self.weights = encoder, weights
        self._weights_id = str(getattr(enc, "weights_id", weights))
        self.encoder_lr, self.cosine_schedule = encoder_lr, cosine_schedule
        self.net = EncoderRegressor(enc, int(enc.spec.dim), n_genes, dropout)

    def on_fit_start(self) -> None:
        mean = torch.from_numpy(self.trainer.datamodule.train_target_mean()).float()
        with torch.no_grad():
            self.net.head.bias.copy_(mean)

    def predict_expression(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.net(batch["image"])

    def configure_optimizers(self) -> Any:
        groups = [
            {"params": list(self.net.encoder.parameters()), "lr": self.encoder_lr},
            {"params": list(self.net.head.parameters()), "lr": self.lr},
        ]
        opt = torch.optim.AdamW(groups, weight_decay=self.weight_decay)
        if not self.cosine_schedule or not self.trainer or not self.trainer.max_epochs:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def weights_id(self) -> str:
        return self._weights_id
