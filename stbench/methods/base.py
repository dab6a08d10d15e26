"""`stbench.Method`: the one interface every benchmarked method implements.

A Method is a LightningModule that declares what its batches must carry and implements its
training hooks plus ONE evaluation entry point, `predict_expression(batch) -> (B, G)` in the
protocol's target space (or `generate_images(batch)` for image-generation methods). The framework
alone computes metrics, on predictions gathered across ranks, identically for every method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F

TASKS = ("expression", "image")
# "method": a method under benchmark (ranked). "reference": a yardstick (the training mean, the
# library-size predictor) shown beside the methods of its section, with no rank, bold or significance mark.
KINDS = ("method", "reference")


@dataclass(frozen=True)
class BatchRequirements:
    """What the DataModule must put in each batch for this method (see docs/data-model.md)."""

    image: bool = True  # spot patches under batch["image"]
    features: tuple[str, ...] = ()  # frozen-encoder features, batch["features"][name]
    coords: bool = False  # full-resolution pixel centres (always present; declared for clarity)
    whole_slide: bool = False  # one batch = one slide (HisToGene-style)
    neighbours: int | None = None  # k nearest spots of the same slide
    patch: dict[str, Any] = field(default_factory=dict)  # PatchSpec overrides (out_px, crop_um, ...)
    counts: bool = (
        False  # raw panel counts + library sizes (batch["counts"], batch["totals"]); never at predict
    )
    graph: dict[str, Any] | None = None  # whole-slide spot graph, batch["edge_index"] (see data/context.py)
    # Library size of each spot (its count over ALL genes), batch["totals"], served at predict too
    # (never the counts). It is read from the test spot's counts, so only reference methods (the
    # `depth` predictor) should declare it: an image method that reads it is not image-only.
    totals: bool = False


class Method(L.LightningModule):
    """Base class of every method. Subclasses set `name` (registry key) and implement hooks.

    Constructed by the runner after the DataModule is set up, with the fold's gene panel:
    `n_genes` and `genes` are always passed; everything else comes from the method's config.
    """

    name: ClassVar[str] = ""
    task: ClassVar[str] = "expression"
    kind: ClassVar[str] = "method"  # one of KINDS
    requires: ClassVar[BatchRequirements] = BatchRequirements()
    # Ordered stages; "fit" is Lightning's Trainer.fit. Any other stage S calls `run_stage_S(dm)`.
    stages: ClassVar[tuple[str, ...]] = ("fit",)
    # Metric monitored on validation for checkpoint choice (never the test fold).
    monitor: ClassVar[str] = "val/mse"

    def __init__(
        self, n_genes: int, genes: Sequence[str] | None = None, lr: float = 1e-3, weight_decay: float = 0.0
    ) -> None:
        super().__init__()
        self.n_genes = int(n_genes)
        self.genes = list(genes) if genes is not None else None
        self.lr = lr
        self.weight_decay = weight_decay

    @classmethod
    def gene_vocabulary(cls, config: dict[str, Any]) -> list[str] | None:
        """Gene symbols this method can model with `config` (e.g. a foundation model's vocabulary),
        or None = any gene. Protocols that declare `use_vocabulary` (HINGE's) select the panel
        among these genes only, on training slides, before any method sees data."""
        return None

    # ---- the evaluation entry point ----------------------------------------------------------
    def predict_expression(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, G) predictions in the protocol's target space. Generative methods average their
        samples here (number of samples = a hyper-parameter)."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict_expression")

    def generate_images(self, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement generate_images")

    # ---- default Lightning hooks ---------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Default training objective: MSE of predict_expression against the targets."""
        return F.mse_loss(self.predict_expression(batch), batch["expression"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=_batch_size(batch))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        pred = self.predict_expression(batch).float()
        target = batch["expression"].float()
        rows = scored_rows(batch)
        if rows is not None:  # whole-slide batches: padding and context rows are not scored
            pred, target = pred[rows], target[rows]
        n = int(target.shape[0])
        self.log("val/mse", F.mse_loss(pred, target), sync_dist=True, batch_size=n, prog_bar=True)
        self.log("val/mae", F.l1_loss(pred, target), sync_dist=True, batch_size=n)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        pred = self.predict_expression(batch).float()
        out = {"index": batch["index"], "pred": pred}
        if "mask" in batch:  # whole-slide batches are padded; the mask says which rows are real
            out["mask"] = batch["mask"]
        return out

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return None
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    # ---- provenance ----------------------------------------------------------------------------
    def weights_id(self) -> str:
        """Which pretrained weights this run used; `none` = random init / trained from scratch."""
        return "none"


def scored_rows(batch: dict[str, Any]) -> torch.Tensor | None:
    """Rows of a batch whose targets a validation metric may score: `score_mask` (validation spots
    served inside their whole training slide), else `mask` (real rows of a padded slide), else None
    (every row)."""
    rows = batch.get("score_mask", batch.get("mask"))
    return None if rows is None else rows.bool()


def _batch_size(batch: dict[str, Any]) -> int:
    return int(batch["index"].numel()) if "index" in batch else 1
