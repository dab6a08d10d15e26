"""Target normalisation: raw panel counts -> the values methods regress and metrics compare.

Two steps. (1) A per-spot transform with no fitted state:

    log1p            y = ln(1 + x)
    log2p1           y = log2(1 + x)                             (HINGE / Stem code)
    normalize_log1p  y = ln(1 + x * target_sum / total)          (scanpy normalize_total + log1p;
                     total = library size over ALL genes of the spot, not only the panel;
                     DeepSpot's convention, the default of loso and lopo)
    normalize_log1p_panel
                     y = ln(1 + x * target_sum / panel_total)    (normalize_total over the PANEL
                     genes only, then log1p: TRIPLEX's convention; HisToGene and Hist2ST also
                     normalise the library size over their selected genes before the log)
    stnet            y = ln((1 + x) / (total + n_total_genes))  (ST-Net `--norm`: total and gene
                     count of the whole measured transcriptome, before the panel filter)
    none             y = x

(2) An optional per-gene scale step fitted on TRAINING spots only: "zscore" (y - mean) / std,
"minmax" (y - min) / (max - min); a constant gene (std or range 0) is only shifted. `inverse`
undoes step (2), so predictions can be compared on the step-(1) scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stbench.utils.io import stable_hash

METHODS = ("log1p", "log2p1", "normalize_log1p", "normalize_log1p_panel", "stnet", "none")
SCALES = (None, "zscore", "minmax")
_NEEDS_TOTALS = ("normalize_log1p", "stnet")


@dataclass
class TargetTransform:
    """Counts -> targets. `fit` only on training spots; its statistics are saved with the run."""

    method: str = "log1p"
    target_sum: float = 1e4
    scale: str | None = None
    center: np.ndarray | None = field(default=None, repr=False)  # mean (zscore) or min (minmax)
    spread: np.ndarray | None = field(default=None, repr=False)  # std (zscore) or max-min (minmax)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown target transform {self.method!r}; one of {METHODS}")
        if self.scale not in SCALES:
            raise ValueError(f"unknown scale {self.scale!r}; one of {SCALES}")
        if not self.target_sum > 0:
            raise ValueError(f"target_sum must be > 0, got {self.target_sum}")

    @property
    def needs_totals(self) -> bool:
        return self.method in _NEEDS_TOTALS

    @property
    def fitted(self) -> bool:
        return self.scale is None or self.center is not None

    # ---- step 1 ------------------------------------------------------------------------------
    def _base(self, counts: np.ndarray, totals: np.ndarray | None, n_total_genes: int | None) -> np.ndarray:
        x = np.asarray(counts, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"counts must be (spots, genes), got shape {x.shape}")
        if self.method == "none":
            return x
        if self.method == "log1p":
            return np.log1p(x)
        if self.method == "log2p1":
            return np.log2(1.0 + x)
        if self.method == "normalize_log1p_panel":
            return np.log1p(x * _size_factor(self.target_sum, x.sum(axis=1))[:, None])
        if totals is None:
            raise ValueError(
                f"target transform {self.method!r} needs per-spot totals over ALL genes "
                "(stbench.data.genes.spot_totals(slide)), not only the panel"
            )
        t = np.asarray(totals, dtype=np.float64).reshape(-1)
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"totals has {t.shape[0]} spots, counts {x.shape[0]}")
        if self.method == "normalize_log1p":
            return np.log1p(x * _size_factor(self.target_sum, t)[:, None])
        if n_total_genes is None or n_total_genes < 1:
            raise ValueError("target transform 'stnet' needs n_total_genes (genes measured in the slide)")
        return np.log((1.0 + x) / (t[:, None] + float(n_total_genes)))

    # ---- fit / transform ---------------------------------------------------------------------
    def fit(
        self,
        train_counts: Sequence[np.ndarray],
        train_totals: Sequence[np.ndarray] | None = None,
        train_n_total_genes: Sequence[int] | None = None,
    ) -> TargetTransform:
        """Fit the scale step on the training slides' panel counts (one array per slide)."""
        if self.scale is None:
            return self
        if not len(train_counts):
            raise ValueError("fit needs at least one training slide")
        k = len(train_counts)
        totals = list(train_totals) if train_totals is not None else [None] * k
        ngenes = list(train_n_total_genes) if train_n_total_genes is not None else [None] * k
        if len(totals) != k or len(ngenes) != k:
            raise ValueError(
                "train_counts, train_totals and train_n_total_genes must have one entry per slide"
            )
        y = np.concatenate(
            [self._base(c, t, g) for c, t, g in zip(train_counts, totals, ngenes, strict=True)], axis=0
        )
        if self.scale == "zscore":
            center, spread = y.mean(axis=0), y.std(axis=0)
        else:
            center, spread = y.min(axis=0), y.max(axis=0) - y.min(axis=0)
        self.center, self.spread = center, np.where(spread > 0, spread, 1.0)
        return self

    def transform(
        self, counts: np.ndarray, totals: np.ndarray | None = None, n_total_genes: int | None = None
    ) -> np.ndarray:
        y = self._base(counts, totals, n_total_genes)
        if self.scale is not None:
            if self.center is None or self.spread is None:
                raise RuntimeError(f"scale {self.scale!r} is not fitted: call fit() on training slides first")
            if y.shape[1] != self.center.shape[0]:
                raise ValueError(f"fitted on {self.center.shape[0]} genes, got {y.shape[1]}")
            y = (y - self.center) / self.spread
        return y.astype(np.float32)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Undo the scale step only (back to the step-1 scale, e.g. log1p)."""
        y = np.asarray(y, dtype=np.float64)
        if self.scale is not None:
            if self.center is None or self.spread is None:
                raise RuntimeError("transform is not fitted")
            y = y * self.spread + self.center
        return y.astype(np.float32)

    # ---- convenience on slides ---------------------------------------------------------------
    def fit_slides(self, slides: Sequence[Any], panel: Any) -> TargetTransform:
        from stbench.data.genes import panel_matrix, spot_totals

        return self.fit(
            [panel_matrix(s, panel) for s in slides],
            [spot_totals(s) for s in slides],
            [s.n_genes for s in slides],
        )

    def transform_slide(self, slide: Any, panel: Any) -> np.ndarray:
        from stbench.data.genes import panel_matrix, spot_totals

        return self.transform(panel_matrix(slide, panel), spot_totals(slide), slide.n_genes)

    # ---- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target_sum": float(self.target_sum),
            "scale": self.scale,
            "center": None if self.center is None else [float(v) for v in self.center],
            "spread": None if self.spread is None else [float(v) for v in self.spread],
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> TargetTransform:
        t = cls(method=d["method"], target_sum=float(d.get("target_sum", 1e4)), scale=d.get("scale"))
        if d.get("center") is not None:
            t.center = np.asarray(d["center"], dtype=np.float64)
            t.spread = np.asarray(d["spread"], dtype=np.float64)
        return t

    @property
    def hash(self) -> str:
        return stable_hash(self.state_dict())


def _size_factor(target_sum: float, totals: np.ndarray) -> np.ndarray:
    """target_sum / total per spot; 0 for an empty spot (its values stay 0, as in scanpy)."""
    t = np.asarray(totals, dtype=np.float64)
    return np.divide(target_sum, t, out=np.zeros_like(t), where=t > 0)
