"""H&E-only tiling (TCGA-SKCM, STMDiT's out-of-distribution cohort): a whole-slide image -> a Slide
whose spots are the image's tissue tiles.

Why: a cohort without spatial expression can still be evaluated by an image generator (FID on real
vs generated tiles, conditioned on UNI of the real tile and on pseudo-labels), but only if its tiles
are spots of an ordinary `Slide`, selected by the same rules as the training spots. So:

- Grid: non-overlapping square tiles of side `tile_um` (default 55 um, the Visium spot diameter STMDiT
  is trained on; the paper does not state its TCGA tile size), anchored at the image's top-left corner,
  whole tiles only - the convention of `pseudobulk.TileGrid`: tile (r, c) covers full-resolution
  pixels [c s, (c+1) s) x [r s, (r+1) s), its centre (c + 0.5) s - 0.5 is stored in obsm["spatial"],
  and spot_diameter_um = tile_um, so the patch store's spot-diameter crop is exactly the tile.
- Filters: STMDiT's spot filters (`spot_filters`, paper Appendix A.3: foreground >= 55 % pixels with
  grey < 210, Laplacian variance >= 20, >= 30 % HSV tissue pixels) on the tile resampled to
  `filter_px` (256, the paper's patch size) exactly as the patch store resamples it, so a kept tile
  keeps passing when a method's patches are cut later. Each statistic and pass flag is recorded per
  tile in obs, the thresholds and per-filter removal counts in meta. Tiles whose whole window is
  glass (every channel >= the white level) provably have foreground 0 and are dropped without
  computing the other two statistics (most of a WSI; counted as `all_white`).
- Expression: none is measured. Without `expression` the AnnData has zero genes and
  meta["expression"] = "none"; with pseudo-labels, X holds them (in their producer's target space, not
  counts) and meta["expression"] = their source ("pseudolabels:<method>@<sha12>"). meta also says
  measured_expression = False, so no evaluator can take either for measured data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from stbench.data.image import SlideImage
from stbench.data.image_regions import RegionReader, open_slide_image
from stbench.data.patches import _cut
from stbench.data.pseudobulk import TileGrid
from stbench.data.pseudolabels import PseudoLabels
from stbench.data.slide import Slide, make_adata
from stbench.data.spot_filters import (
    STAT_COLUMNS,
    STMDIT_FILTERS,
    SpotFilterParams,
    spot_filter,
    spot_statistics,
)
from stbench.errors import DataError

DEFAULT_TILE_UM = 55.0
FILTER_PX = 256
EXPRESSION_NONE = "none"
HE_TILES_VERSION = 1


def _check_scale(tile_um: float, mpp: float, slide: str | None = None, file: Any = None) -> float:
    """Tile side in full-resolution pixels; a DataError for a non-positive tile size or scale."""
    for name, v in (("tile_um", tile_um), ("mpp", mpp)):
        if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise DataError(
                f"{name} must be a positive number, got {v!r}", file=file, slide=slide, field=name
            )
    return float(tile_um) / float(mpp)


def tile_grid(image_size: tuple[int, int], tile_um: float, mpp: float) -> np.ndarray:
    """(n, 2) float64 centres (x, y) of the whole non-overlapping tiles of an image of `image_size`
    (w, h) px, row-major from the top-left; empty when a tile is larger than the image."""
    grid = TileGrid.for_image(image_size, _check_scale(tile_um, mpp))
    rows, cols = np.divmod(np.arange(grid.n_tiles), max(grid.n_cols, 1))
    return grid.centre(rows, cols).reshape(-1, 2)


def tile_ids(rows: np.ndarray, cols: np.ndarray) -> list[str]:
    """Spot ids of tiles, "r<row>_c<col>" (as pseudo-bulk tiles), stable for a given grid."""
    return [f"r{int(r)}_c{int(c)}" for r, c in zip(rows, cols, strict=True)]


def tile_statistics(
    image: SlideImage,
    tile_um: float,
    mpp: float,
    filter_px: int = FILTER_PX,
    white_gray: int | None = STMDIT_FILTERS.white_gray,
    params: SpotFilterParams = STMDIT_FILTERS,
) -> pd.DataFrame:
    """Spot-filter statistics of every tile, one band of tiles at a time (the image is never decoded
    whole). With `white_gray` set, all-white windows are not measured: foreground 0, others NaN,
    column all_white True. Index = tile ids; columns array_row, array_col, the statistics, all_white."""
    grid = TileGrid.for_image(image.size, _check_scale(tile_um, mpp, file=image.path))
    s, out = grid.side_px, int(filter_px)
    margin = int(math.ceil(max(1.0, s / out))) + 1  # as patches._cut: the bilinear filter's reach
    stats = np.full((grid.n_tiles, 3), np.nan)
    white = np.zeros(grid.n_tiles, dtype=bool)
    w, h = image.size
    with RegionReader(image) as rr:
        for r in range(grid.n_rows):
            by0 = max(0, math.floor(r * s) - margin)
            by1 = min(h, math.ceil((r + 1) * s) + margin)
            bx1 = min(w, math.ceil(grid.n_cols * s) + margin)
            band = rr.read(0, 0, by0, bx1, by1)
            if band.dtype != np.uint8 or band.ndim != 3 or band.shape[2] not in (3, 4):
                raise DataError(
                    f"H&E tiling needs an 8-bit RGB image (the filter thresholds are for H&E), got dtype "
                    f"{band.dtype} with {band.shape[2] if band.ndim == 3 else 1} channel(s)",
                    file=image.path,
                    field="image",
                )
            band = np.ascontiguousarray(band[..., :3])
            low = band.min(axis=2) if white_gray is not None else None
            patches, where = [], []
            for c in range(grid.n_cols):
                k = r * grid.n_cols + c
                centre = grid.centre(np.array([r]), np.array([c]))[0] - (0.0, by0)
                if low is not None and _all_white(low, centre, s, margin, white_gray):
                    white[k] = True
                    stats[k, 0] = 0.0
                    continue
                im, _, _ = _cut(band, centre, s, out, "pad")
                patches.append(np.asarray(im))
                where.append(k)
            if patches:
                stats[where] = spot_statistics(np.stack(patches), params).to_numpy()
    rows, cols = np.divmod(np.arange(grid.n_tiles), max(grid.n_cols, 1))
    table = pd.DataFrame(stats, columns=list(STAT_COLUMNS), index=pd.Index(tile_ids(rows, cols), name="tile"))
    table.insert(0, "array_row", rows)
    table.insert(1, "array_col", cols)
    table["all_white"] = white
    return table


def _all_white(low: np.ndarray, centre: np.ndarray, s: float, margin: int, white_gray: int) -> bool:
    """True when every pixel `patches._cut` reads for this tile has min(R, G, B) >= white_gray: each
    resampled pixel is then a convex mix of such pixels (padding is 255), so its grey is >= white_gray
    and the foreground fraction is exactly 0 (the tile fails the foreground filter)."""
    fx, fy = centre[0] + 0.5 - s / 2.0, centre[1] + 0.5 - s / 2.0
    ix0, iy0 = math.floor(fx) - margin, math.floor(fy) - margin
    ix1, iy1 = math.ceil(fx + s) + margin, math.ceil(fy + s) + margin
    win = low[max(0, iy0) : max(0, iy1), max(0, ix0) : max(0, ix1)]
    return bool(win.size) and int(win.min()) >= white_gray


def he_only_slide(
    name: str,
    patient: str,
    image_path: str | Path,
    mpp: float,
    tile_um: float = DEFAULT_TILE_UM,
    filters: SpotFilterParams | None = STMDIT_FILTERS,
    genes: Sequence[str] | None = None,
    expression: PseudoLabels | str | Path | None = None,
    *,
    filter_px: int = FILTER_PX,
    image_page: int = 0,
) -> Slide:
    """A Slide of an H&E-only image: spots = tiles passing STMDiT's spot filters (`filters=None`: every
    tile, statistics still recorded), X = nothing (0 genes) or the given pseudo-labels (see module doc)."""
    image = open_slide_image(Path(image_path), page=image_page)
    side_px = _check_scale(tile_um, mpp, slide=name, file=image_path)
    grid = TileGrid.for_image(image.size, side_px)
    if grid.n_tiles == 0:
        raise DataError(
            f"a {tile_um:g} um tile ({side_px:.1f} px) is larger than the {image.size} image",
            file=image.path,
            slide=name,
            field="tile_um",
        )
    if genes is not None and expression is None:
        raise DataError(
            "genes given without expression: H&E-only tiles have no measured expression; pass "
            "expression= (pseudo-labels) to condition on predicted genes",
            slide=name,
            field="genes",
        )
    params = filters if filters is not None else STMDIT_FILTERS
    table = tile_statistics(
        image, tile_um, mpp, filter_px, params.white_gray if filters is not None else None, params
    )
    tiles: dict[str, Any] = {"grid": grid.n_tiles}
    if filters is not None:
        keep, table = spot_filter(table, filters)
        table = table.drop(columns="keep")
        measured = ~table["all_white"].to_numpy()
        tiles.update(
            kept=int(keep.sum()),
            removed=int((~keep).sum()),
            removed_by={
                "foreground": int((~table["pass_foreground"]).sum()),
                "blur": int((~table["pass_blur"] & measured).sum()),
                "tissue": int((~table["pass_tissue"] & measured).sum()),
            },
            all_white=int((~measured).sum()),
        )
        if not keep.any():
            raise DataError(
                f"no tile passes the spot filters ({grid.n_tiles} tiles; removed by {tiles['removed_by']}, "
                f"{tiles['all_white']} all white)",
                file=image.path,
                slide=name,
                field="spot_filters",
            )
        table = table[keep]
    else:
        tiles.update(kept=grid.n_tiles, removed=0)
    table = table.drop(columns="all_white")
    ids = list(table.index)
    coords = grid.centre(table["array_row"].to_numpy(), table["array_col"].to_numpy())
    meta: dict[str, Any] = {
        "measured_expression": False,
        "spot_filters": asdict(filters) if filters is not None else None,
        "he_tiles": {
            "version": HE_TILES_VERSION,
            "tile_um": float(tile_um),
            "side_px": float(side_px),
            "filter_px": int(filter_px),
            "grid": {"n_rows": grid.n_rows, "n_cols": grid.n_cols, "origin_px": [0.0, 0.0]},
            "tiles": tiles,
            "image": str(image.path),
        },
    }
    if expression is None:
        x: Any = sp.csr_matrix((len(ids), 0), dtype=np.float32)
        gene_list: list[str] = []
        meta.update(expression=EXPRESSION_NONE, expression_space="")
        source = str(image.path)
    else:
        pl = expression if isinstance(expression, PseudoLabels) else PseudoLabels.load(expression)
        gene_list = [str(g) for g in genes] if genes is not None else list(pl.genes)
        x = pl.lookup([name] * len(ids), ids, gene_list)
        negative = int((x < 0).sum())
        if negative:
            raise DataError(
                f"{negative} negative pseudo-label value(s) (space {pl.info.get('space') or '?'}); a Slide's X "
                "must be >= 0: use pseudo-labels of a protocol with a non-negative target (e.g. log1p)",
                file=pl.path,
                slide=name,
                field="X",
            )
        meta.update(expression=pl.source, expression_space=str(pl.info.get("space", "")))
        source = str(pl.path)
    adata = make_adata(x, ids, gene_list, coords, {c: table[c].to_numpy() for c in table.columns})
    return Slide(
        name=name,
        patient=patient,
        adata=adata,
        image=image,
        mpp=float(mpp),
        spot_diameter_um=float(tile_um),
        platform="other",
        source=source,
        meta=meta,
    )
