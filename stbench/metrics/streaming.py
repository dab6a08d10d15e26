"""Streaming (torchmetrics) versions of gene-wise PCC, MSE and MAE for logging during training.

States are float64 sums (n, sum x, sum y, sum x^2, sum y^2, sum xy per gene) reduced with "sum"
(the per-gene max |x| for the constant test with "max"), so a DDP sync gives exactly what one
process would have accumulated and any split of the spots into batches gives the same result as
the one-shot numpy metric (to float64 rounding). The one-pass formulas are safe here because the
sums are float64 and expression targets are O(1-10).

Test-set numbers in result rows are NOT computed with these: the runner gathers de-duplicated
predictions and calls `stbench.metrics.slide_metrics` once (DistributedSampler padding would count
a spot twice in any streaming metric).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from stbench.metrics.expression import CONSTANT_RTOL


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64)


class GenewisePCC(Metric):
    """Per-gene Pearson r across all spots seen (one slide per reset), averaged over non-constant genes.

    `compute()` returns the mean PCC (NaN when every gene is constant: only ever logged, result
    rows use None), or with `return_details=True` a dict with `pcc`, `per_gene` (NaN where
    excluded), `excluded`, `excluded_truth`, `excluded_pred`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, num_genes: int, *, rtol: float = CONSTANT_RTOL, return_details: bool = False, **kwargs
    ):
        super().__init__(**kwargs)
        self.num_genes, self.rtol, self.return_details = int(num_genes), float(rtol), return_details
        zeros = torch.zeros(self.num_genes, dtype=torch.float64)
        self.add_state("n", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("sum_t", "sum_p", "sum_tt", "sum_pp", "sum_tp"):
            self.add_state(name, default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("max_abs_t", default=zeros.clone(), dist_reduce_fx="max")
        self.add_state("max_abs_p", default=zeros.clone(), dist_reduce_fx="max")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: (spots, genes) for a batch of spots."""
        if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != self.num_genes:
            raise ValueError(
                f"expected (spots, {self.num_genes}) pred and target, got {tuple(pred.shape)}, {tuple(target.shape)}"
            )
        p, t = _f64(pred), _f64(target)
        self.n += t.shape[0]
        self.sum_t += t.sum(0)
        self.sum_p += p.sum(0)
        self.sum_tt += (t * t).sum(0)
        self.sum_pp += (p * p).sum(0)
        self.sum_tp += (t * p).sum(0)
        if t.shape[0]:
            self.max_abs_t = torch.maximum(self.max_abs_t, t.abs().amax(0))
            self.max_abs_p = torch.maximum(self.max_abs_p, p.abs().amax(0))

    def compute(self):  # noqa: ANN201 - tensor or dict, see class docstring
        n = self.n
        ss_t = (self.sum_tt - self.sum_t**2 / n).clamp_min(0)
        ss_p = (self.sum_pp - self.sum_p**2 / n).clamp_min(0)
        s_tp = self.sum_tp - self.sum_t * self.sum_p / n
        const_t = (torch.sqrt(ss_t / n) <= self.rtol * self.max_abs_t) | (ss_t == 0)
        const_p = (torch.sqrt(ss_p / n) <= self.rtol * self.max_abs_p) | (ss_p == 0)
        excluded = const_t | const_p
        r = torch.full_like(s_tp, float("nan"))
        ok = ~excluded
        r[ok] = (s_tp[ok] / torch.sqrt(ss_t[ok] * ss_p[ok])).clamp(-1.0, 1.0)
        mean = r[ok].mean() if ok.any() else torch.tensor(float("nan"), dtype=torch.float64)
        if not self.return_details:
            return mean
        return {
            "pcc": mean,
            "per_gene": r,
            "excluded": excluded.sum(),
            "excluded_truth": const_t.sum(),
            "excluded_pred": const_p.sum(),
        }


class _MeanError(Metric):
    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _error(self, diff: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        self.total += self._error(_f64(pred) - _f64(target)).sum()
        self.count += target.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class StreamingMSE(_MeanError):
    """`mse` over all spots x genes seen, float64 sums (DDP-exact)."""

    def _error(self, diff: torch.Tensor) -> torch.Tensor:
        return diff * diff


class StreamingMAE(_MeanError):
    """`mae` over all spots x genes seen, float64 sums (DDP-exact)."""

    def _error(self, diff: torch.Tensor) -> torch.Tensor:
        return diff.abs()
