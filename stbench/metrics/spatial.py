"""Spatial metrics: SSIM of predicted vs true gene maps, and gene-gene co-expression agreement.

SSIM (`ssim`, HINGE supplement: per gene on the 2-D spatial maps, averaged per slice, then over
slices). Our declared computation, per gene:
  1. spots are placed on their array grid (`spot_grid`: integer (row, col) cells, one spot per
     cell); the map gets a background margin of (window - 1) / 2 cells;
  2. both maps are scaled by the TRUTH's range on that slide: v' = (v - min_t) / (max_t - min_t),
     so data_range = 1 and a prediction's absolute level and contrast count (a constant
     prediction gets a real, low SSIM; it is not excluded). Cells without a spot hold 0 (= the
     truth minimum) in both maps;
  3. SSIM map of Wang et al. (2004) as in skimage `structural_similarity` with its defaults:
     uniform 7 x 7 window, K1 = 0.01, K2 = 0.03, sample covariance (N / (N - 1));
  4. the gene's SSIM is the mean of the SSIM map over the cells that hold a spot.
Genes constant in truth (no range) are excluded and counted. Slide value = mean over genes.

Co-expression (`coexpr`): Pearson r between the upper triangles (i < j) of the gene-gene
correlation matrices (across the slide's spots) of the prediction and of the truth. Genes
constant in either are excluded from both matrices and counted. Computed in row blocks, so the
G x G matrices are never held in memory.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter

from stbench.metrics.expression import CONSTANT_RTOL, MetricResult, _centred, check_pair

SSIM_WINDOW = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03
_MAX_OFF_GRID = 0.35  # a spot further than this (in pitches) from its grid cell means a wrong pitch


def _grid_axis(v: np.ndarray, pitch: float) -> tuple[np.ndarray, float]:
    """Integer steps along one axis, anchored at the circular mean of the fractional offsets (so a
    single off-grid spot at the minimum cannot shift every cell), and the largest residual."""
    u = v / pitch
    phase = np.angle(np.mean(np.exp(2j * np.pi * u))) / (2 * np.pi)
    steps = np.rint(u - phase)
    return (steps - steps.min()).astype(np.int64), float(np.abs(u - phase - steps).max())


def spot_grid(coords: object, spacing: float | tuple[float, float] = 1.0) -> np.ndarray:
    """Integer (row, col) grid cells of spots from (x, y) positions and the spot pitch.

    `coords` are (x, y) per spot: array coordinates with spacing 1 (best: Her2ST `array_x`,
    `array_y`), or pixel centres with `spacing` = centre-to-centre distance in px per axis. For
    hexagonal Visium grids pass (array_col // 2, array_row). Raises if spots sit more than 0.35
    pitch off the grid (wrong spacing) or two spots share a cell.
    """
    xy = np.asarray(coords, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) == 0 or not np.isfinite(xy).all():
        raise ValueError(f"coords must be finite (spots, 2) x/y positions, got shape {xy.shape}")
    dx, dy = (spacing, spacing) if np.isscalar(spacing) else spacing
    if dx <= 0 or dy <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    cols, off_x = _grid_axis(xy[:, 0], dx)
    rows, off_y = _grid_axis(xy[:, 1], dy)
    off = max(off_x, off_y)
    if off > _MAX_OFF_GRID:
        raise ValueError(
            f"spots are up to {off:.2f} pitches off a grid of spacing {spacing}: wrong spacing, "
            "or a hexagonal grid (pass (array_col // 2, array_row) with spacing 1)"
        )
    cells = np.stack([rows, cols], axis=1)
    flat = rows * (cols.max() + 1) + cols
    if len(np.unique(flat)) != len(flat):
        raise ValueError(
            f"{len(flat) - len(np.unique(flat))} spots share a grid cell: spacing {spacing} too large"
        )
    return cells


def rasterise(
    values: object, cells: np.ndarray, *, margin: int = 0, fill: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """(genes, H, W) maps of (spots, genes) values on grid `cells` plus the (H, W) spot mask."""
    v = np.asarray(values, dtype=np.float64)
    v = v[:, None] if v.ndim == 1 else v
    cells = np.asarray(cells, dtype=np.int64)
    if cells.shape != (v.shape[0], 2) or (cells < 0).any():
        raise ValueError(f"cells must be non-negative (spots, 2) = ({v.shape[0]}, 2), got {cells.shape}")
    h, w = cells.max(axis=0) + 1 + 2 * margin
    maps = np.full((v.shape[1], h, w), fill, dtype=np.float64)
    mask = np.zeros((h, w), dtype=bool)
    rows, cols = cells[:, 0] + margin, cells[:, 1] + margin
    maps[:, rows, cols] = v.T
    mask[rows, cols] = True
    return maps, mask


def ssim_maps(
    x: np.ndarray,
    y: np.ndarray,
    *,
    window: int = SSIM_WINDOW,
    data_range: float = 1.0,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """SSIM map of each (.., H, W) pair (skimage defaults: uniform window, sample covariance).
    With `mask` (H, W), only the masked pixels are returned, as (.., n_masked)."""
    size = (1,) * (x.ndim - 2) + (window, window)

    def local_mean(a: np.ndarray) -> np.ndarray:
        out = uniform_filter(a, size)
        return out[..., mask] if mask is not None else out

    ux, uy = local_mean(x), local_mean(y)
    uxx, uyy, uxy = local_mean(x * x), local_mean(y * y), local_mean(x * y)
    cov = window * window / (window * window - 1.0)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    uxuy = ux * uy
    num = (2 * uxuy + c1) * (2 * cov * (uxy - uxuy) + c2)
    ux *= ux
    uy *= uy
    den = (ux + uy + c1) * (cov * (uxx - ux + uyy - uy) + c2)
    return num / den


def ssim_genes(
    truth: object, pred: object, cells: np.ndarray, *, window: int = SSIM_WINDOW, rtol: float = CONSTANT_RTOL
) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene SSIM (NaN where excluded) and the mask of genes excluded (constant in truth)."""
    t, p = check_pair(truth, pred)
    if window < 3 or window % 2 == 0:
        raise ValueError(f"SSIM window must be odd and >= 3, got {window}")
    pad = (window - 1) // 2
    g = t.shape[1]
    out = np.full(g, np.nan)
    const = np.zeros(g, dtype=bool)
    cells = np.asarray(cells, dtype=np.int64)
    if cells.shape != (t.shape[0], 2):
        raise ValueError(f"cells must be (spots, 2) = ({t.shape[0]}, 2), got {cells.shape}")
    h, w = cells.max(axis=0) + 1 + 2 * pad
    step = max(1, 262_144 // int(h * w))  # genes per block: ~2 MB per float64 map stack (cache-friendly)
    for j in range(0, g, step):
        blk = slice(j, min(j + step, g))
        tb, pb = t[:, blk].astype(np.float64), p[:, blk].astype(np.float64)
        _, _, ct = _centred(tb, rtol)
        lo, hi = tb.min(axis=0), tb.max(axis=0)
        rng = np.where(ct, 1.0, hi - lo)
        mt, mask = rasterise((tb - lo) / rng, cells, margin=pad)
        mp, _ = rasterise((pb - lo) / rng, cells, margin=pad)
        s = ssim_maps(mt, mp, window=window, mask=mask).mean(axis=1)
        s[ct] = np.nan
        out[blk], const[blk] = s, ct
    return out, const


def ssim(
    truth: object, pred: object, cells: np.ndarray, *, window: int = SSIM_WINDOW, rtol: float = CONSTANT_RTOL
) -> MetricResult:
    """`ssim`: mean over genes of the per-gene SSIM of the spatial maps (see module docstring)."""
    s, const = ssim_genes(truth, pred, cells, window=window, rtol=rtol)
    keep = ~const
    value = float(np.mean(s[keep])) if keep.any() else None
    return MetricResult(value, int(keep.sum()), int(const.sum()), int(const.sum()), 0)


def _standardised(x: np.ndarray, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    c, ss, const = _centred(x, rtol)
    z = c[:, ~const] / np.sqrt(ss[~const])
    return z, const


def coexpr(truth: object, pred: object, *, rtol: float = CONSTANT_RTOL, block: int = 512) -> MetricResult:
    """`coexpr`: Pearson r between the upper triangles of the predicted and true gene-gene
    correlation matrices; genes constant in truth or prediction are excluded (and counted).
    None when fewer than 3 genes remain or either triangle is constant."""
    t, p = check_pair(truth, pred)
    _, _, ct = _centred(t, rtol)
    _, _, cp = _centred(p, rtol)
    keep = ~(ct | cp)
    zt, _ = _standardised(t[:, keep], rtol)
    zp, _ = _standardised(p[:, keep], rtol)
    g = zt.shape[1]
    counts = (int(keep.sum()), int((~keep).sum()), int(ct.sum()), int(cp.sum()))
    if g < 3:
        return MetricResult(None, *counts)
    s_a = s_b = s_aa = s_bb = s_ab = 0.0
    m = 0
    for i0 in range(0, g - 1, block):
        i1 = min(i0 + block, g - 1)
        a = zt[:, i0:i1].T @ zt[:, i0 + 1 :]  # rows i, columns j = i0+1 .. g-1
        b = zp[:, i0:i1].T @ zp[:, i0 + 1 :]
        upper = np.arange(i0, i1)[:, None] < np.arange(i0 + 1, g)[None, :]
        a, b = a[upper], b[upper]
        s_a, s_b = s_a + a.sum(), s_b + b.sum()
        s_aa, s_bb, s_ab = s_aa + a @ a, s_bb + b @ b, s_ab + a @ b
        m += a.size
    var_a, var_b = s_aa - s_a * s_a / m, s_bb - s_b * s_b / m
    tiny = (rtol**2) * m
    if var_a <= tiny or var_b <= tiny:
        return MetricResult(None, *counts)
    r = (s_ab - s_a * s_b / m) / np.sqrt(var_a * var_b)
    return MetricResult(float(np.clip(r, -1.0, 1.0)), *counts)
