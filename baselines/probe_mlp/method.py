"""`probe-mlp`: a small MLP trained with Lightning on cached frozen-encoder features.

The network is built in `setup` (the feature dimension is known only once the DataModule serves
features); input standardisation and the output bias come from training spots only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from baselines.probe_mlp.model import MLPHead
from stbench.data.features import feature_key, provider_weights_id
from stbench.methods.base import BatchRequirements, Method
from stbench.methods.toolkit.arrays import training_arrays


class ProbeMLP(Method):
    name = "probe-mlp"
    task = "expression"
    requires = BatchRequirements(image=False, features=("encoder",), patch={"out_px": 224, "crop_um": 112.0})

    def __init__(
        self,
        n_genes: int,
        genes: Sequence[str] | None = None,
        encoder: str = "resnet50-trunc",
        weights: str = "default",
        hidden: int = 256,
        n_layers: int = 1,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__(n_genes, genes, lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        self.encoder, self.weights = encoder, weights
        self.feature_key = feature_key(encoder)
        self.hidden, self.n_layers, self.dropout = hidden, n_layers, dropout
        self.net: MLPHead | None = None
        self._weights_id: str | None = None

    def setup(self, stage: str) -> None:
        """Build the head from the served feature dim; on fit, set train statistics (once)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or self.net is not None:
            return
        self.init_from_datamodule(dm, fit_stats=stage == "fit")

    def init_from_datamodule(self, dm: Any, fit_stats: bool = True) -> None:
        x, y = training_arrays(dm, self.feature_key)
        self.net = MLPHead(x.shape[1], self.n_genes, self.hidden, self.n_layers, self.dropout)
        if fit_stats:
            with torch.no_grad():
                self.net.mean.copy_(torch.from_numpy(x.mean(0)).float())
                self.net.std.copy_(torch.from_numpy(x.std(0)).float().clamp_min(1e-6))
                self.net.head.bias.copy_(torch.from_numpy(y.mean(0)).float())
        self._weights_id = provider_weights_id(dm, self.feature_key)

    def predict_expression(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.net is None:
            raise RuntimeError("probe-mlp: the head is built in setup(); run it through a Trainer")
        return self.net(batch["features"][self.feature_key])

    def weights_id(self) -> str:
        return self._weights_id or str(self.weights)
