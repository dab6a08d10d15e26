"""`deepspace`: DeepSpaCE (Monjo et al. 2022, Sci Rep; github.com/tmonjo/DeepSpaCE).

ImageNet VGG16 whose last classifier layer is replaced by one output per gene, trained on spot
images with a Smooth-L1 loss, Adam (lr 1e-4, weight decay 1e-4), DeepSpaCE's augmentations and
early stopping on the validation loss. The head's bias starts at the training-target mean.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from baselines.deepspace.augment import GROUPS, augment
from baselines.deepspace.model import DeepSpaCENet
from stbench.methods.base import BatchRequirements, Method

LOSSES = ("smooth_l1", "mse")
TRAIN_SCOPES = ("all", "head")


def _build_encoder(name: str, weights: str, overrides: Mapping[str, Any] | None) -> Any:
    from stbench.encoders import build_encoder

    return build_encoder(name, weights=weights, arch_overrides=dict(overrides) if overrides else None)


def imagenet_classifier_state(encoder: Any, weights: str) -> dict[str, torch.Tensor] | None:
    """The fully connected `classifier.0` / `classifier.3` weights of the VGG checkpoint the zoo
    loaded the conv trunk from (the zoo keeps only the trunk); None for random init."""
    from stbench.encoders.weights import load_state_dict, parse_weights

    spec = encoder.spec
    source = parse_weights(weights, spec.hub_id, default_kind="torchvision")
    if source.kind == "none":
        return None
    if source.kind == "torchvision":
        from torchvision.models import get_weight

        # build_encoder has just fetched this very file into torch's hub cache.
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(get_weight(source.ref).url)
    elif source.kind == "local":
        path = Path(source.ref)
    else:
        raise ValueError(
            f"deepspace: VGG weights must be 'default', 'none' or a state-dict file, got {weights!r}"
        )
    state = load_state_dict(path)
    return {
        k[len("classifier.") :]: v
        for k, v in state.items()
        if k.startswith(("classifier.0.", "classifier.3."))
    }


class DeepSpaCE(Method):
    name = "deepspace"
    task = "expression"
    # DeepSpaCE crops 2.5 x (2 x radiusPixel) around the spot and resizes to 224 px (see README.md).
    requires = BatchRequirements(image=True, patch={"out_px": 224, "crop_um": 137.5})

    def __init__(
        self,
        n_genes: int,
        genes: Sequence[str] | None = None,
        encoder: str = "vgg16",
        weights: str = "default",
        encoder_overrides: Mapping[str, Any] | None = None,
        hidden: Sequence[int] = (4096, 4096),
        pool: int = 7,
        dropout: float = 0.5,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        loss: str = "smooth_l1",
        augment: Sequence[str] = GROUPS,
        train_scope: str = "all",
        early_stop_patience: int | None = 5,
    ) -> None:
        super().__init__(n_genes, genes, lr=lr, weight_decay=weight_decay)
        if loss not in LOSSES:
            raise ValueError(f"deepspace: loss must be one of {LOSSES}, got {loss!r}")
        if train_scope not in TRAIN_SCOPES:
            raise ValueError(f"deepspace: train_scope must be one of {TRAIN_SCOPES}, got {train_scope!r}")
        unknown = set(augment) - set(GROUPS)
        if unknown:
            raise ValueError(f"deepspace: unknown augmentation(s) {sorted(unknown)}; choose from {GROUPS}")
        self.save_hyperparameters()
        enc = _build_encoder(encoder, weights, encoder_overrides)
        self._weights_id = str(enc.weights_id)
        self.net = DeepSpaCENet(enc, n_genes, hidden=hidden, pool=pool, dropout=dropout)
        self.net.train()  # build_encoder returns eval mode; Lightning keeps submodule modes
        fc = imagenet_classifier_state(enc, weights)
        if fc is not None:
            self.net.classifier.load_state_dict(fc, strict=True)
        self.loss_name, self.augment_groups = loss, tuple(augment)
        self.train_scope, self.early_stop_patience = train_scope, early_stop_patience
        if train_scope == "head":  # DeepSpaCE `--transfer`: only the new last layer learns
            for p in self.net.parameters():
                p.requires_grad_(False)
            for p in self.net.head.parameters():
                p.requires_grad_(True)

    def on_fit_start(self) -> None:
        mean = torch.from_numpy(self.trainer.datamodule.train_target_mean()).float()
        with torch.no_grad():
            self.net.head.bias.copy_(mean)

    def predict_expression(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.net(batch["image"])

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        images = augment(batch["image"], self.augment_groups) if self.augment_groups else batch["image"]
        pred = self.net(images)
        if self.loss_name == "smooth_l1":  # DeepSpaCE: SmoothL1 per gene, averaged over genes
            return F.smooth_l1_loss(pred, batch["expression"])
        return F.mse_loss(pred, batch["expression"])

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

    def configure_callbacks(self) -> list[Any]:
        if self.early_stop_patience is None:
            return []
        from lightning.pytorch.callbacks import EarlyStopping

        return [EarlyStopping(monitor=self.monitor, mode="min", patience=int(self.early_stop_patience))]

    def weights_id(self) -> str:
        return self._weights_id
