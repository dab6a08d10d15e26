"""`stnet`: ST-Net (He et al. 2020, Nat Biomed Eng; github.com/bryanhe/ST-Net).

DenseNet-121 (ImageNet) fine-tuned end to end on 224-px full-resolution windows centred on each
spot, a linear output per gene whose weights start at zero and whose bias starts at the training-
target mean (as `stnet/cmd/run_spatial.py` does), inputs normalised with channel statistics of the
training patches, SGD with momentum, and test-time averaging over the 8 dihedral transforms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from baselines.stnet.model import StNetNet, dihedral_mean
from stbench.methods.base import BatchRequirements, Method

OPTIMIZERS = ("sgd", "adam")
REDUCTIONS = ("sum", "mean")
PIXEL_STATS = ("train", "imagenet")


def _build_encoder(name: str, weights: str, overrides: Mapping[str, Any] | None) -> Any:
    from stbench.encoders import build_encoder

    return build_encoder(name, weights=weights, arch_overrides=dict(overrides) if overrides else None)


class StNet(Method):
    name = "stnet"
    task = "expression"
    # ST-Net's window: 224 x 224 full-resolution pixels around the spot centre, not resized.
    requires = BatchRequirements(image=True, patch={"out_px": 224, "crop_px": 224})

    def __init__(
        self,
        n_genes: int,
        genes: Sequence[str] | None = None,
        encoder: str = "densenet121",
        weights: str = "default",
        encoder_overrides: Mapping[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 1e-6,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        loss_reduction: str = "sum",
        tta: bool = True,
        pixel_stats: str = "train",
        zero_init_head: bool = True,
    ) -> None:
        super().__init__(n_genes, genes, lr=lr, weight_decay=weight_decay)
        for value, valid, what in (
            (optimizer, OPTIMIZERS, "optimizer"),
            (loss_reduction, REDUCTIONS, "loss_reduction"),
            (pixel_stats, PIXEL_STATS, "pixel_stats"),
        ):
            if value not in valid:
                raise ValueError(f"stnet: {what} must be one of {valid}, got {value!r}")
        self.save_hyperparameters()
        enc = _build_encoder(encoder, weights, encoder_overrides)
        self._weights_id = str(enc.weights_id)
        self.net = StNetNet(enc, n_genes)
        self.net.train()  # build_encoder returns eval mode; Lightning keeps submodule modes
        self.optimizer_name, self.momentum = optimizer, momentum
        self.loss_reduction, self.tta = loss_reduction, tta
        self.pixel_stats, self.zero_init_head = pixel_stats, zero_init_head

    # ---- initialisation from the training spots only -------------------------------------------
    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        mean = torch.from_numpy(dm.train_target_mean()).float()
        with torch.no_grad():
            self.net.head.bias.copy_(mean)
            if self.zero_init_head:
                self.net.head.weight.zero_()
            if self.pixel_stats == "train":
                self.net.set_pixel_stats(*self._training_pixel_stats(dm))

    @staticmethod
    def _training_pixel_stats(dm: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std over every pixel of every training patch (never val/test)."""
        s1 = torch.zeros(3, dtype=torch.float64)
        s2 = torch.zeros(3, dtype=torch.float64)
        n = 0
        for batch in dm.reference_dataloader():
            x = batch["image"].double().transpose(0, 1).reshape(3, -1)
            s1 += x.sum(1)
            s2 += (x * x).sum(1)
            n += x.shape[1]
        if n == 0:
            raise RuntimeError("stnet: no training patches to estimate the pixel statistics from")
        mean = s1 / n
        std = (s2 / n - mean * mean).clamp_min(0.0).sqrt()
        return mean.float(), std.float()

    # ---- prediction and loss -------------------------------------------------------------------
    def predict_expression(self, batch: dict[str, Any]) -> torch.Tensor:
        images = batch["image"]
        if self.tta and not self.training:
            return dihedral_mean(self.net, images)
        return self.net(images)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """ST-Net's objective: squared error averaged over genes, SUMMED over the batch (its lr of
        1e-6 is on this scale); `loss_reduction: mean` averages over the batch instead."""
        per_spot = ((self.predict_expression(batch) - batch["expression"]) ** 2).mean(dim=1)
        return per_spot.sum() if self.loss_reduction == "sum" else per_spot.mean()

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def weights_id(self) -> str:
        return self._weights_id
