"""`mean`: predicts every spot as the per-gene mean of the training spots (validation spots excluded).

It has no gene-wise PCC (a constant prediction has zero variance, so every gene is excluded: the
tables show n/a), but its MSE/MAE are the bar a learning method must clear.
"""

from __future__ import annotations

from typing import Any

import torch

from baselines.mean.model import GeneMean
from stbench.methods.base import BatchRequirements, Method


class MeanPredictor(Method):
    name = "mean"
    task = "expression"
    kind = "reference"
    requires = BatchRequirements(image=False)
    stages = ("estimate",)

    def __init__(self, n_genes: int, genes: list[str] | None = None) -> None:
        super().__init__(n_genes, genes)
        self.save_hyperparameters()
        self.model = GeneMean(n_genes)

    def run_stage_estimate(self, datamodule: Any, trainer: Any) -> None:
        """Average the training targets (the train loader: training spots only, no validation)."""
        total = torch.zeros(self.n_genes, dtype=torch.float64)
        count = 0
        for batch in datamodule.train_dataloader():
            total += batch["expression"].double().sum(0)
            count += batch["expression"].shape[0]
        self.model.fit(total.float(), count)

    def predict_expression(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model(int(batch["index"].numel())).to(batch["coords"].device)
