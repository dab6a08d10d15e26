"""Aggregation, bootstrap confidence intervals, paired tests and the significance marks papers print.

* `aggregate`: mean +- sd over slides (and seeds); sd is the SAMPLE sd (ddof = 1) unless asked
  otherwise; missing values (None / NaN, e.g. a constant predictor's PCC) are left out and counted,
  never averaged as 0.
* `bootstrap_ci`: spot-level percentile bootstrap of one slide's metric. Resample b draws
  `rng.integers(0, n_spots, n_spots)` from `np.random.default_rng(seed)` (in order b = 0..B-1),
  the metric is recomputed on those rows of truth and prediction, and the CI is the
  (alpha/2, 1 - alpha/2) percentiles (numpy's linear interpolation) of the defined replicates.
  Replicates where the metric is undefined (None) are counted in `n_undefined`, never used as 0.
* `paired_ttest`: scipy.stats.ttest_rel on fold scores, one-sided by default (H1: a > b), as
  DiffBulk. For error metrics (lower is better) pass alternative="less".
* `wilcoxon_test`: scipy.stats.wilcoxon signed-rank on per-slice scores (zero differences dropped,
  scipy's "wilcox" method), two-sided by default, one-sided on request, as HINGE.
* `significance_mark` ("**" p < 0.05, "*" p < 0.1: DiffBulk's table marks) and
  `significance_mark_stars` ("***" < 0.001, "**" < 0.01, "*" < 0.05, else "ns": HINGE's figures).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stbench.metrics.expression import MetricResult, check_pair

ALTERNATIVES = ("two-sided", "greater", "less")


def _is_missing(v: object) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and math.isnan(v))


def _value(v: object) -> float | None:
    v = v.value if isinstance(v, MetricResult) else v
    return None if _is_missing(v) else float(v)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Aggregate:
    mean: float | None
    sd: float | None  # None when fewer than ddof + 1 values
    n: int  # values averaged
    n_missing: int  # None / NaN values left out

    def __str__(self) -> str:
        if self.mean is None:
            return "n/a"
        return f"{self.mean:.3f} ± {self.sd:.3f}" if self.sd is not None else f"{self.mean:.3f}"


def aggregate(values: Iterable[object], *, ddof: int = 1) -> Aggregate:
    """Mean +- sd over per-slide (and per-seed) values; missing values are counted, not averaged."""
    vals = list(values)
    kept = [_value(v) for v in vals]
    x = np.array([v for v in kept if v is not None], dtype=np.float64)
    missing = len(vals) - x.size
    if x.size == 0:
        return Aggregate(None, None, 0, missing)
    sd = float(np.std(x, ddof=ddof)) if x.size > ddof else None
    return Aggregate(float(np.mean(x)), sd, int(x.size), missing)


def aggregate_rows(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None, *, ddof: int = 1
) -> dict[str, Aggregate]:
    """`aggregate` for every numeric key of result rows (or the given keys; absent counts as missing)."""
    if keys is None:
        seen: dict[str, None] = {}
        for row in rows:
            for key, v in row.items():
                if _is_missing(v) or (isinstance(v, (int, float, np.number)) and not isinstance(v, bool)):
                    seen.setdefault(key, None)
        keys = list(seen)
    return {key: aggregate((row.get(key) for row in rows), ddof=ddof) for key in keys}


@dataclass(frozen=True)
class BootstrapCI:
    estimate: float | None  # metric on the full slide
    low: float | None
    high: float | None
    confidence: float
    n_boot: int
    n_undefined: int  # replicates where the metric was undefined (excluded from the percentiles)
    seed: int


def bootstrap_ci(
    truth: object,
    pred: object,
    metric: Callable[[np.ndarray, np.ndarray], object],
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Percentile CI of `metric(truth, pred)` (a float, None or MetricResult) by resampling spots."""
    t, p = check_pair(truth, pred)
    if n_boot < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < confidence < 1, got {n_boot}, {confidence}")
    rng = np.random.default_rng(seed)
    n = t.shape[0]
    reps = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        reps.append(_value(metric(t[idx], p[idx])))
    defined = np.array([v for v in reps if v is not None], dtype=np.float64)
    alpha = 1.0 - confidence
    low = high = None
    if defined.size:
        low, high = (float(v) for v in np.percentile(defined, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
    return BootstrapCI(_value(metric(t, p)), low, high, confidence, n_boot, n_boot - defined.size, seed)


@dataclass(frozen=True)
class PairedTest:
    test: str
    statistic: float
    pvalue: float
    n: int
    alternative: str
    mark: str  # significance_mark(pvalue): DiffBulk's "**" / "*" / ""
    note: str = ""  # set when the test is degenerate and its limiting value is reported


def _paired(a: Sequence[object], b: Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}")
    missing = [
        i
        for i, (x, y) in enumerate(zip(a, b, strict=True))
        if _is_missing(_value(x)) or _is_missing(_value(y))
    ]
    if missing:
        raise ValueError(
            f"paired scores are missing (None/NaN) at positions {missing}; a paired test needs every pair"
        )
    if len(a) < 2:
        raise ValueError("a paired test needs at least 2 pairs")
    return np.array([_value(x) for x in a]), np.array([_value(y) for y in b])


def _check_alt(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")


def paired_ttest(a: Sequence[object], b: Sequence[object], *, alternative: str = "greater") -> PairedTest:
    """Paired t-test of fold scores of method a against method b (scipy.stats.ttest_rel).

    Differences with no spread (equal up to 1e-12 relative) make t undefined; the limiting value
    is reported instead of scipy's rounding noise: p = 1 when all differences are 0, otherwise
    t = +-inf and p = 0 or 1 depending on the direction, with `note` saying so."""
    from scipy import stats

    _check_alt(alternative)
    x, y = _paired(a, b)
    d = x - y
    if np.ptp(d) <= 1e-12 * max(np.abs(d).max(), np.abs(x).max(), np.abs(y).max()):
        return _degenerate_t(float(np.mean(d)), len(d), alternative)
    res = stats.ttest_rel(x, y, alternative=alternative)
    p = float(res.pvalue)
    return PairedTest("paired t-test", float(res.statistic), p, len(x), alternative, significance_mark(p))


def _degenerate_t(d: float, n: int, alternative: str) -> PairedTest:
    if d == 0:
        return PairedTest("paired t-test", 0.0, 1.0, n, alternative, "", "all differences are zero")
    t = math.copysign(math.inf, d)
    agrees = alternative == "two-sided" or (alternative == "greater") == (d > 0)
    p = 0.0 if agrees else 1.0
    return PairedTest(
        "paired t-test", t, p, n, alternative, significance_mark(p), "constant non-zero differences"
    )


def wilcoxon_test(a: Sequence[object], b: Sequence[object], *, alternative: str = "two-sided") -> PairedTest:
    """Wilcoxon signed-rank test of per-slice scores of a against b (scipy.stats.wilcoxon).
    All differences zero: no evidence either way, p = 1 (scipy would fail)."""
    from scipy import stats

    _check_alt(alternative)
    x, y = _paired(a, b)
    if np.all(x == y):
        return PairedTest(
            "wilcoxon signed-rank", 0.0, 1.0, len(x), alternative, "", "all differences are zero"
        )
    res = stats.wilcoxon(x, y, alternative=alternative)
    return PairedTest(
        "wilcoxon signed-rank",
        float(res.statistic),
        float(res.pvalue),
        len(x),
        alternative,
        significance_mark(float(res.pvalue)),
    )


def significance_mark(p: float | None) -> str:
    """DiffBulk's marks: "**" p < 0.05, "*" p < 0.1, "" otherwise (and for a missing p)."""
    if _is_missing(p):
        return ""
    return "**" if p < 0.05 else "*" if p < 0.1 else ""


def significance_mark_stars(p: float | None) -> str:
    """HINGE's marks: "***" p < 0.001, "**" p < 0.01, "*" p < 0.05, "ns" otherwise ("" if missing)."""
    if _is_missing(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "ns"
