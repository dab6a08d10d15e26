"""`probe-ridge`: HEST-Bench's linear probe on frozen encoder features.

Protocol (verified in mahmoodlab/HEST, src/hest/bench/benchmark.py and trainer.py; see README.md):
StandardScaler then PCA to 256 components, both fitted on the training spots' features only; Ridge
with alpha = 100 / (D * G) where D = 256 (the dimension after PCA) and G = number of genes, no
intercept; targets log1p of raw counts. No training loop. By default the fit uses HEST's numerics
(sklearn PCA svd_solver='auto' with random_state = seed, HEST's default seed 1; float32 PCA output
into Ridge(solver='lsqr')); `pca_solver: exact` + `solver: closed-form` is the exact float64 minimiser.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from baselines.probe_ridge.model import RidgeProbe
from stbench.data.features import feature_key, provider_weights_id
from stbench.methods.base import BatchRequirements, Method
from stbench.methods.toolkit.arrays import training_arrays


class ProbeRidge(Method):
    name = "probe-ridge"
    task = "expression"
    # "encoder" = the feature named by this method's `encoder` hyper-parameter (see features_for).
    requires = BatchRequirements(image=False, features=("encoder",), patch={"out_px": 224, "crop_um": 112.0})
    stages = ("fit_probe",)

    def __init__(
        self,
        n_genes: int,
        genes: Sequence[str] | None = None,
        encoder: str = "resnet50-trunc",
        weights: str = "default",
        pca_dim: int = 256,
        alpha: float | None = None,
        standardize: bool = True,
        fit_intercept: bool = False,
        solver: str = "lsqr",
        seed: int = 1,
        pca_solver: str = "auto",
    ) -> None:
        super().__init__(n_genes, genes)
        self.save_hyperparameters()
        self.encoder = encoder
        self.weights = weights
        self.feature_key = feature_key(encoder)
        self.pca_dim, self.alpha = pca_dim, alpha
        self.standardize, self.fit_intercept = standardize, fit_intercept
        self.solver, self.seed, self.pca_solver = solver, seed, pca_solver
        self.model = RidgeProbe()
        self.fit_info: dict[str, Any] = {}
        self._weights_id: str | None = None

    def run_stage_fit_probe(self, datamodule: Any, trainer: Any = None) -> None:
        """Collect training spots' features and targets (validation spots excluded), solve."""
        x, y = training_arrays(datamodule, self.feature_key)
        self.fit_info = self.model.fit(
            x,
            y,
            self.pca_dim,
            self.alpha,
            self.standardize,
            self.fit_intercept,
            self.solver,
            self.seed,
            self.pca_solver,
        )
        self._weights_id = provider_weights_id(datamodule, self.feature_key)

    def predict_expression(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model(batch["features"][self.feature_key]).float()

    def weights_id(self) -> str:
        return self._weights_id or str(self.weights)
