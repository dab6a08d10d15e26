"""STMDiT's image-based spot filters (paper, Appendix A.3), computed per spot patch, applied on request.

Why here: the filters decide which spots a protocol trains and evaluates on, so they belong to the
data layer, computed once per patch store and reported, never applied silently. The statistics are
always recorded (a table with one row per spot); dropping happens only where a protocol or method
calls `apply_spot_filters` (or uses the `keep` column itself).

The three filters, with the paper's thresholds as defaults (all on the spot-centred RGB uint8 patch):
- foreground: fraction of pixels with grey < `white_gray` (210) must be >= `min_foreground` (0.55);
- blur: variance of the Laplacian of the grey patch must be >= `min_laplacian_var` (20);
- HSV tissue: fraction of pixels with S > `hsv_s_min` (15) and V < `hsv_v_max` (240) must be
  >= `min_tissue` (0.30).
Conventions (the authors' code is not public; these follow OpenCV, which such thresholds usually
come from): grey = Pillow "L" = ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B rounded to 0..255 (as
cv2.COLOR_RGB2GRAY); Laplacian = the 4-neighbour kernel [[0,1,0],[1,-4,1],[0,1,0]] (cv2.Laplacian
with ksize=1) over every pixel with mirrored borders (cv2's default BORDER_REFLECT_101), variance over
all pixels; HSV on OpenCV's 8-bit scale: V = max(R, G, B), S = round(255 * (V - min) / V) (0 when V = 0).
The Laplacian variance depends on the patch resolution: compute it on the patches the protocol
declares (the paper: spot-diameter crops at 256 px). `patches.laplacian_variance` is a different
statistic (interior pixels only) used for the patch store's own quality record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stbench.errors import DataError
from stbench.utils.io import stable_hash, write_text_atomic

if TYPE_CHECKING:
    from stbench.data.patches import PatchStore, SlidePatches
    from stbench.data.slide import Slide

STAT_COLUMNS = ("foreground_fraction", "laplacian_var", "tissue_fraction")
PASS_COLUMNS = ("pass_foreground", "pass_blur", "pass_tissue")
_FILE = "spot_filters-{key}.csv"


@dataclass(frozen=True)
class SpotFilterParams:
    """Thresholds of STMDiT's spot filters (defaults = the paper's)."""

    white_gray: int = 210
    min_foreground: float = 0.55
    min_laplacian_var: float = 20.0
    hsv_s_min: int = 15
    hsv_v_max: int = 240
    min_tissue: float = 0.30

    def stats_key(self) -> str:
        """Hash of the parameters the statistics depend on (not the pass/fail thresholds)."""
        return stable_hash({"white_gray": self.white_gray, "s": self.hsv_s_min, "v": self.hsv_v_max, "v1": 1})


STMDIT_FILTERS = SpotFilterParams()


# ---- per-patch statistics ----------------------------------------------------------------------
def gray(patch: np.ndarray) -> np.ndarray:
    """(H, W) uint8 luma of an (H, W, 3) uint8 patch (Pillow "L", = cv2 RGB2GRAY)."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(patch[..., :3])).convert("L"))


def foreground_fraction(patch: np.ndarray, white_gray: int = 210) -> float:
    """Fraction of pixels darker than `white_gray` on the grey patch (not glass / white)."""
    return float(np.count_nonzero(gray(patch) < white_gray)) / (patch.shape[0] * patch.shape[1])


def laplacian_var(patch: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the grey patch, mirrored borders (cv2 default)."""
    g = gray(patch).astype(np.int32)
    if min(g.shape) < 2:
        return 0.0
    p = np.pad(g, 1, mode="reflect")  # numpy "reflect" = OpenCV BORDER_REFLECT_101 (edge not repeated)
    lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * g
    flat = lap.ravel().astype(np.int64)
    n = flat.size
    mean = float(flat.sum()) / n
    return float(np.dot(flat, flat)) / n - mean * mean


def hsv_sv(patch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV 8-bit saturation and value planes: V = max, S = round(255 (V - min) / V), 0 if V = 0."""
    rgb = patch[..., :3].astype(np.int32)
    v = rgb.max(axis=-1)
    mn = rgb.min(axis=-1)
    s = np.where(v > 0, (255 * (v - mn) * 2 + np.maximum(v, 1)) // (2 * np.maximum(v, 1)), 0)
    return s, v


def tissue_fraction(patch: np.ndarray, s_min: int = 15, v_max: int = 240) -> float:
    """Fraction of pixels with saturation > s_min and value < v_max (stained tissue)."""
    s, v = hsv_sv(patch)
    return float(np.count_nonzero((s > s_min) & (v < v_max))) / s.size


def spot_statistics(
    patches: np.ndarray, params: SpotFilterParams = STMDIT_FILTERS, index: Any = None
) -> pd.DataFrame:
    """One row per patch of (N, H, W, 3) uint8 `patches`: the three filter statistics."""
    patches = np.asarray(patches) if not isinstance(patches, np.ndarray) else patches
    if patches.ndim != 4 or patches.shape[-1] < 3:
        raise DataError(f"patches must be (N, H, W, 3), got {patches.shape}", field="patches")
    rows = np.zeros((len(patches), 3), dtype=np.float64)
    for i in range(len(patches)):
        p = np.asarray(patches[i])
        if p.dtype != np.uint8:
            raise DataError(f"patches must be uint8, got {p.dtype}", field="patches")
        rows[i] = (
            foreground_fraction(p, params.white_gray),
            laplacian_var(p),
            tissue_fraction(p, params.hsv_s_min, params.hsv_v_max),
        )
    return pd.DataFrame(rows, columns=list(STAT_COLUMNS), index=index)


def spot_filter(
    stats: pd.DataFrame | np.ndarray, params: SpotFilterParams = STMDIT_FILTERS
) -> tuple[np.ndarray, pd.DataFrame]:
    """(keep mask, table): the table is the statistics plus one pass column per filter and `keep`.
    `stats` is a `spot_statistics` table or the (N, H, W, 3) patches themselves."""
    table = stats.copy() if isinstance(stats, pd.DataFrame) else spot_statistics(stats, params)
    missing = [c for c in STAT_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"spot filter statistics lack columns {missing}", field="spot_filters")
    table["pass_foreground"] = table["foreground_fraction"] >= params.min_foreground
    table["pass_blur"] = table["laplacian_var"] >= params.min_laplacian_var
    table["pass_tissue"] = table["tissue_fraction"] >= params.min_tissue
    table["keep"] = table["pass_foreground"] & table["pass_blur"] & table["pass_tissue"]
    return table["keep"].to_numpy(dtype=bool), table


# ---- slides ------------------------------------------------------------------------------------
def slide_spot_filter(
    patches: SlidePatches, params: SpotFilterParams = STMDIT_FILTERS, cache: bool = True
) -> tuple[np.ndarray, pd.DataFrame]:
    """`spot_filter` on a patch store, indexed by spot id. The statistics are cached next to the
    store (`spot_filters-<key>.csv`, written atomically) so a protocol re-run does not recompute."""
    file = Path(patches.path) / _FILE.format(key=params.stats_key())
    stats = None
    if cache and file.exists():
        try:
            got = pd.read_csv(file, index_col="spot", dtype={"spot": str}, keep_default_na=False)
            if list(got.index) == patches.spot_ids and all(c in got.columns for c in STAT_COLUMNS):
                stats = got[list(STAT_COLUMNS)]
        except (ValueError, OSError, KeyError):
            stats = None
    if stats is None:
        stats = spot_statistics(patches.patches, params, index=pd.Index(patches.spot_ids, name="spot"))
        if cache:
            write_text_atomic(file, stats.to_csv())
    return spot_filter(stats, params)


def apply_spot_filters(
    slide: Slide, patch_store: PatchStore, params: SpotFilterParams = STMDIT_FILTERS
) -> tuple[Slide, pd.DataFrame]:
    """The slide restricted to the spots that pass (dropped ones recorded in
    `meta["dropped_spots"]` with the failed filters, never silently) and the full table. A DataError
    if no spot passes. For protocols/methods that ask for STMDiT's filters; nothing calls it by default."""
    keep, table = slide_spot_filter(patch_store.build(slide), params)
    table = table.reindex(slide.spot_ids)
    keep = table["keep"].to_numpy(dtype=bool)
    if keep.all():
        return slide, table
    if not keep.any():
        raise DataError(
            f"no spot passes the spot filters ({asdict(params)})",
            file=slide.source,
            slide=slide.name,
            field="spot_filters",
        )
    dropped = {}
    for sid, row in table.loc[~table["keep"]].iterrows():
        failed = [n.removeprefix("pass_") for n in PASS_COLUMNS if not row[n]]
        dropped[str(sid)] = "spot filter: " + ", ".join(failed)
    slide.adata = slide.adata[keep].copy()
    slide.meta.setdefault("dropped_spots", {}).update(dropped)
    return slide, table
