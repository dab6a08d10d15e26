"""`deepspot`: DeepSpot's deep-set network on frozen pathology-encoder features of a spot, its
sub-spots and its neighbourhood.

Inputs come from the feature store (computed once, cached): the spot tile ("encoder"), the S x S
sub-tiles of the spot's crop ("encoder:sub=3", DeepSpot's 9 mini-tiles) and the G x G grid of
spot-sized tiles around it ("encoder:grid=3"; the centre tile is the spot itself and is left out of
the neighbour bag, as DeepSpot's neighbours exclude the spot). The network is built in `setup`
once the feature dimension is known; the target scaler and output bias come from training spots
only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from baselines.deepspot.model import CONTEXTS, DeepSpotNet
from stbench.data.features import feature_key, provider_weights_id
from stbench.methods.base import BatchRequirements, Method
from stbench.methods.toolkit.arrays import training_arrays

SUB = 3  # 3 x 3 = 9 non-overlapping sub-spots ("n_mini_tiles = 9" in the authors' notebooks)
GRID = 3  # 3 x 3 spot-sized tiles: the 8 around the spot = neighbour radius 1 on a tile grid
NORMALIZE = ("standard", "none")


class DeepSpot(Method):
    name = "deepspot"
    task = "expression"
    # Spot tile = the spot's diameter (the authors' crop_tile), resized by the encoder to its input.
    requires = BatchRequirements(
        image=False, features=("encoder", f"encoder:sub={SUB}", f"encoder:grid={GRID}"), patch={"out_px": 224}
    )

    def __init__(
        self,
        n_genes: int,
        genes: Sequence[str] | None = None,
        encoder: str = "uni",
        weights: str = "default",
        encoder_overrides: dict[str, Any] | None = None,
        hidden: int = 512,
        n_ensemble: int = 10,
        dropout: float = 0.3,
        out_dropout: float = 0.1,
        context: str = "spot_subspot_neighbors",
        normalize: str = "standard",
        lr: float = 1e-4,
        weight_decay: float = 1e-6,
    ) -> None:
        super().__init__(n_genes, genes, lr=lr, weight_decay=weight_decay)
        if context not in CONTEXTS:
            raise ValueError(f"deepspot: context must be one of {CONTEXTS}, got {context!r}")
        if normalize not in NORMALIZE:
            raise ValueError(f"deepspot: normalize must be one of {NORMALIZE}, got {normalize!r}")
        self.save_hyperparameters()
        self.encoder, self.weights, self.encoder_overrides = encoder, weights, encoder_overrides
        base = feature_key(encoder)
        self.keys = {"spot": base, "sub": f"{base}:sub={SUB}", "grid": f"{base}:grid={GRID}"}
        self.hidden, self.n_ensemble = hidden, n_ensemble
        self.dropout, self.out_dropout = dropout, out_dropout
        self.context, self.normalize = context, normalize
        self.net: DeepSpotNet | None = None
        # Target scaler (DeepSpot's normalize="standard"), fitted on training spots only.
        self.register_buffer("y_mean", torch.zeros(n_genes))
        self.register_buffer("y_std", torch.ones(n_genes))
        self._weights_id: str | None = None

    # ---- construction --------------------------------------------------------------------------
    def build(self, in_dim: int) -> DeepSpotNet:
        self.net = DeepSpotNet(
            in_dim,
            self.n_genes,
            self.hidden,
            self.n_ensemble,
            self.n_ensemble,
            self.dropout,
            self.dropout,
            self.out_dropout,
            self.context,
        )
        return self.net

    def setup(self, stage: str) -> None:
        """Build the net from the served feature dim; on fit, fit the target scaler (once)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or self.net is not None:
            return
        self.init_from_datamodule(dm, fit_stats=stage == "fit")

    def init_from_datamodule(self, dm: Any, fit_stats: bool = True) -> None:
        x, y = training_arrays(dm, self.keys["spot"])
        self.build(x.shape[1])
        if fit_stats:
            self.fit_target_stats(y)
        self._weights_id = provider_weights_id(dm, self.keys["spot"])

    def fit_target_stats(self, y: np.ndarray) -> None:
        """Scaler and output bias from training targets: the net starts as the mean predictor."""
        mean = torch.from_numpy(y.mean(0)).float()
        with torch.no_grad():
            if self.normalize == "standard":
                self.y_mean.copy_(mean)
                self.y_std.copy_(torch.from_numpy(y.std(0)).float().clamp_min(1e-6))
                bias = torch.zeros_like(mean)  # zero in standardised space = the training mean
            else:
                bias = mean
            for head in self.net.rho.heads:
                head.bias.copy_(bias)

    # ---- forward ---------------------------------------------------------------------------------
    def standardized(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.net is None:
            raise RuntimeError("deepspot: the network is built in setup(); run it through a Trainer")
        f = batch["features"]
        spot = f[self.keys["spot"]].float()
        b, d = spot.shape
        sub = f[self.keys["sub"]].float().view(b, SUB * SUB, d) if self.net.use_sub else None
        neighbours = None
        if self.net.use_neighbours:
            grid = f[self.keys["grid"]].float().view(b, GRID * GRID, d)
            centre = (GRID // 2) * GRID + GRID // 2
            neighbours = torch.cat([grid[:, :centre], grid[:, centre + 1 :]], dim=1)
        return self.net(spot, sub, neighbours)

    def predict_expression(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.y_mean + self.y_std * self.standardized(batch)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """MSE in the scaler's space (DeepSpot trains on standardised targets)."""
        target = (batch["expression"].float() - self.y_mean) / self.y_std
        return F.mse_loss(self.standardized(batch), target)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def weights_id(self) -> str:
        return self._weights_id or str(self.weights)
