"""`depth`: the library-size reference. Per gene, target ~ a + b * log(total counts of the spot),
fitted by OLS on the training spots (validation spots excluded), predicted from each test spot's
own total.

Why: gene-wise PCC on log1p(raw counts) is dominated by sequencing depth, so a predictor that sees
nothing but depth scores high. Its row says how much of a method's PCC depth alone explains. It
reads the test spot's library size, which no image method may do: it is a reference, never ranked.
"""

from __future__ import annotations

from typing import Any

import torch

from baselines.depth.model import DepthLinear
from stbench.methods.base import BatchRequirements, Method


class DepthReference(Method):
    name = "depth"
    task = "expression"
    kind = "reference"
    requires = BatchRequirements(image=False, totals=True)
    stages = ("estimate",)

    def __init__(self, n_genes: int, genes: list[str] | None = None) -> None:
        super().__init__(n_genes, genes)
        self.save_hyperparameters()
        self.model = DepthLinear(n_genes)

    def run_stage_estimate(self, datamodule: Any, trainer: Any) -> None:
        """OLS per gene over the train loader (training spots only, no validation, no test)."""
        for batch in datamodule.train_dataloader():
            self.model.accumulate(_totals(batch), batch["expression"])
        self.model.finish()

    def predict_expression(self, batch: dict[str, Any]) -> torch.Tensor:
        totals = _totals(batch)
        return self.model(totals).to(device=totals.device, dtype=torch.float32)


def _totals(batch: dict[str, Any]) -> torch.Tensor:
    if "totals" not in batch:
        raise KeyError("depth needs batch['totals']: the DataModule serves it only with include_totals=True")
    return batch["totals"]
