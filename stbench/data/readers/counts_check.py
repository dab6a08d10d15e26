"""Refuse expression values that look already normalised before stbench normalises them again.

A protocol's target transform (log1p, normalize_total + log1p, ...) assumes raw counts. An AnnData
whose X holds log-normalised values would be transformed twice with no visible error, so readers of
user-supplied matrices (anndata, hest) call `check_counts`. Non-integer values that look normalised
(maximum below 30 with most values non-integer: a log scale; or every spot summing to the same
total: normalize_total) are refused even with `allow_non_integer=True`; the error names the file and
suggests the dataset declaration `counts: normalized`, which skips the transform and is recorded in
each result row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from stbench.errors import DataError

LOG_SCALE_MAX = 30.0  # log1p of 1e13 is 30: no raw-count matrix with large values stays below it
MANY_NON_INTEGER = 0.5  # share of non-zero entries that are not whole numbers
CONSTANT_SUM_RTOL = 1e-3  # spread of per-spot sums, relative to their median
DECLARATION = (
    "declare the dataset's values normalised with `counts: normalized` (DatasetCard(counts="
    "'normalized')): the protocol's target transform is then skipped and the row records it"
)


def normalised_signs(counts: sp.csr_matrix | np.ndarray) -> list[str]:
    """Why `counts` looks normalised or log-transformed (empty when it does not)."""
    m = sp.csr_matrix(counts)
    data = np.asarray(m.data, dtype=np.float64)
    if not data.size:
        return []
    non_int = float(np.mean(np.abs(data - np.round(data)) > 1e-3))
    if non_int == 0.0:
        return []
    signs = []
    top = float(data.max())
    if top < LOG_SCALE_MAX and non_int > MANY_NON_INTEGER:
        signs.append(
            f"maximum {top:.3g} < {LOG_SCALE_MAX:g} with {non_int:.0%} non-integer values: log scale?"
        )
    sums = np.asarray(m.sum(axis=1)).ravel()
    sums = sums[sums > 0]
    if sums.size >= 2:
        med = float(np.median(sums))
        if med > 0 and float(sums.max() - sums.min()) <= CONSTANT_SUM_RTOL * med:
            signs.append(f"every spot sums to {med:.6g}: normalised to a constant total?")
    return signs


def check_counts(
    counts: sp.csr_matrix,
    *,
    file: str | Path,
    slide: str,
    field: str,
    declared: str = "raw",
    allow_non_integer: bool = False,
) -> None:
    """Raise DataError unless `counts` can be raw counts (or are declared normalised)."""
    data = np.asarray(sp.csr_matrix(counts).data, dtype=np.float64)
    if not np.isfinite(data).all():
        raise DataError("expression values contain NaN or infinity", file=file, slide=slide, field=field)
    if declared == "normalized":
        return
    signs = normalised_signs(counts)
    if signs:
        raise DataError(
            f"values are not whole numbers and look already normalised or log-transformed "
            f"({'; '.join(signs)}); stbench would normalise them again. Pass raw counts, or {DECLARATION}",
            file=file,
            slide=slide,
            field=field,
        )
    if not allow_non_integer and data.size and (np.abs(data - np.round(data)) > 1e-3).any():
        raise DataError(
            "counts are not whole numbers (normalised data?); pass raw counts, set "
            f"allow_non_integer=True for fractional counts (e.g. ambient-corrected), or {DECLARATION}",
            file=file,
            slide=slide,
            field=field,
        )
