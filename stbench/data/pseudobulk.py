"""Xenium pseudo-bulk tiling (DiffBulk): a cell/transcript-level slide -> a tile-level slide.

The slide image is cut into a grid of non-overlapping square tiles of side `TilingSpec.tile_um`
(default 224 px x 0.5 um/px = 112 um, DiffBulk's 224 px at 20x), anchored at the image's top-left
corner. Every decoded transcript (or every cell's count vector) is summed into the tile its
position falls in, so a tile is a "pseudo-spot" that every spot-based method can use: obs = tiles,
X = raw summed counts (log1p is the protocol's target transform, never applied here),
obsm["spatial"] = tile centre, spot_diameter_um = tile side, platform "xenium-pseudobulk".

Coordinates. Transcripts of a Xenium output are in microns and go through the slide's
meta["um_to_px"] (the reader's 3x3 affine: um -> morphology px -> H&E px through the inverse of
the 10x alignment matrix); HEST's transcripts already carry he_x/he_y, their position on the WSI
after HEST's non-rigid DAPI -> H&E registration, and are used as they are. Positions are in the
pixel-index frame of `Slide.coords` (the centre of pixel i is at i); in the continuous frame where
pixel i covers [i, i + 1), tile (r, c) covers [c*s, (c+1)*s) x [r*s, (r+1)*s) with s = tile side
in full-resolution pixels, so a point p belongs to column floor((p_x + 0.5) / s). The tile centre
stored in obsm["spatial"] is (c + 0.5) * s - 0.5, which makes the patch store crop exactly the tile.

Every transcript gets exactly one fate, counted per gene and recorded (see docs/pseudobulk.md):
"control" (negative-control probes/codewords, blank/unassigned/deprecated codewords, intergenic,
rows with is_gene False or no name), "low_qv" (qv < qv_min; 10x counts qv >= 20 in its cell
matrix), "edge" (outside every whole tile: the partial tiles along the right/bottom border, points
outside the image, non-finite coordinates), "filtered" (inside a tile that a filter removed), or
kept. Tiles without any kept transcript are not tiles of the slide (the grid extends over the
whole image, mostly outside the Xenium region); their number is recorded.

Filters, each recorded per tile (statistic + pass flag) and applied (kept tiles only):
  tissue     fraction of tile pixels that are neither background (min(R,G,B) >= 200 and
             saturation < 0.10: glass, washed-out or over-exposed areas) nor dark (max(R,G,B) < 50:
             pen marks, folds, black scan borders), must be >= tissue_min (0.5). Needs an 8-bit RGB
             H&E; on any other image (e.g. the Xenium DAPI morphology image) it is not applied and
             meta["pseudobulk"]["tissue_filter"] says so.
  variance   population variance over the slide's genes of log1p(tile counts) must be
             >= variance_min (0.01): removes flat profiles (empty or uniform tiles).
  min_counts summed counts of the tile must be >= min_counts (10).
Removed tiles are listed with their statistics in meta["pseudobulk"]["removed_tiles"] and, with a
reason, in meta["dropped_spots"].

Efficiency. Transcripts are streamed by parquet row-group batches (pyarrow) or CSV chunks and
binned with vectorised numpy; (tile, gene) pairs are accumulated sparsely. The image is never
decoded whole: tile statistics are computed one row of tiles at a time through `RegionReader`, at
the coarsest pyramid level that keeps >= qc_min_px pixels per tile side.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from stbench.data.image_regions import RegionReader
from stbench.data.readers.xenium import CONTROL_PREFIXES
from stbench.data.slide import Slide, make_adata
from stbench.errors import DataError

PSEUDOBULK_VERSION = 1
PLATFORM = "xenium-pseudobulk"
AGGREGATES = ("transcripts", "cells")
FILTERS = ("tissue", "variance", "min_counts")
REASONS = ("control", "low_qv", "edge", "filtered")
_BATCH_ROWS = 1 << 20  # transcripts per streamed batch (~50 MB of columns)
_F_CAP = np.int64(1 << 24)  # feature ids < 16.7M: (tile, feature) pairs are packed into one int64


# ---- parameters -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TilingSpec:
    """Tiling parameters (docs/pseudobulk.md explains every default). The tile side in um is
    tile_px * tile_mpp; `TilingSpec.from_options({"tile_um": 55})` keeps tile_px and sets tile_mpp."""

    tile_px: int = 224
    tile_mpp: float = 0.5
    aggregate: str = "transcripts"
    qv_min: float = 20.0
    tissue_min: float | None = 0.5
    background_min_channel: int = 200
    background_max_saturation: float = 0.10
    dark_max_channel: int = 50
    variance_min: float | None = 0.01
    min_counts: float | None = 10.0
    qc_min_px: int = 64

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> DataError:
            return DataError(f"tiling {name} {why}, got {getattr(self, name)!r}", field=name)

        if not (isinstance(self.tile_px, int | np.integer) and self.tile_px >= 1):
            raise bad("tile_px", "must be a positive integer")
        for name in ("tile_mpp",):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise bad(name, "must be > 0")
        if self.aggregate not in AGGREGATES:
            raise bad("aggregate", f"must be one of {AGGREGATES}")
        if self.tissue_min is not None and not 0 <= self.tissue_min <= 1:
            raise bad("tissue_min", "must be in [0, 1] or None")
        if not 0 <= self.background_min_channel <= 255 or not 0 <= self.dark_max_channel <= 255:
            raise bad("background_min_channel", "and dark_max_channel must be in [0, 255]")
        if not 0 <= self.background_max_saturation <= 1:
            raise bad("background_max_saturation", "must be in [0, 1]")
        for name in ("variance_min", "min_counts", "qv_min"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise bad(name, "must be >= 0 or None")
        if self.qc_min_px < 1:
            raise bad("qc_min_px", "must be >= 1")

    @property
    def tile_um(self) -> float:
        return float(self.tile_px) * float(self.tile_mpp)

    def key(self) -> dict[str, Any]:
        """JSON-able description hashed into cache keys (includes the algorithm version)."""
        return {**asdict(self), "version": PSEUDOBULK_VERSION}

    @classmethod
    def from_options(cls, options: TilingSpec | dict[str, Any] | None = None) -> TilingSpec:
        """A spec from a dict of fields (plus `tile_um`); unknown keys are a DataError naming them."""
        if isinstance(options, TilingSpec):
            return options
        opts = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(opts) - known - {"tile_um"})
        if unknown:
            raise DataError(
                f"unknown tiling option(s) {unknown}; valid: {sorted(known | {'tile_um'})}",
                field=",".join(unknown),
            )
        tile_um = opts.pop("tile_um", None)
        if tile_um is not None:
            if "tile_mpp" in opts:
                raise DataError("give tile_um or tile_mpp, not both", field="tile_um,tile_mpp")
            opts["tile_mpp"] = float(tile_um) / int(opts.get("tile_px", cls.tile_px))
        return cls(**opts)


# ---- the grid ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileGrid:
    """Whole tiles of side `side_px` (full-resolution px) anchored at the image's top-left corner."""

    side_px: float
    n_cols: int
    n_rows: int

    @classmethod
    def for_image(cls, size: tuple[int, int], side_px: float) -> TileGrid:
        w, h = size
        # 1e-6 tolerates a side like 39.99999999 px (mpp measured from an alignment matrix)
        return cls(float(side_px), int(math.floor(w / side_px + 1e-6)), int(math.floor(h / side_px + 1e-6)))

    @property
    def n_tiles(self) -> int:
        return self.n_rows * self.n_cols

    def locate(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, col, inside) of pixel-index positions (x, y); row/col are 0 where not inside."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        with np.errstate(invalid="ignore"):
            u = np.floor((xy[:, 0] + 0.5) / self.side_px)
            v = np.floor((xy[:, 1] + 0.5) / self.side_px)
            inside = (
                np.isfinite(u) & np.isfinite(v) & (u >= 0) & (v >= 0) & (u < self.n_cols) & (v < self.n_rows)
            )
        col = np.where(inside, u, 0).astype(np.int64)
        row = np.where(inside, v, 0).astype(np.int64)
        return row, col, inside

    def centre(self, row: np.ndarray, col: np.ndarray) -> np.ndarray:
        s = self.side_px
        return np.column_stack([(np.asarray(col) + 0.5) * s - 0.5, (np.asarray(row) + 0.5) * s - 0.5])


# ---- aggregation ---------------------------------------------------------------------------
@dataclass
class _Aggregate:
    genes: list[str]
    tile_lin: np.ndarray  # (n,) sorted linear tile index row * n_cols + col
    counts: sp.csr_matrix  # (n, G) int64
    totals: np.ndarray  # (G,) every row / count of the gene in the input
    dropped: dict[str, np.ndarray]  # reason -> (G,)
    control_by_feature: dict[str, int]
    n_input: int  # input rows (transcripts) or summed counts of all features
    units: str
    source: dict[str, Any]
    n_cells: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _PairCounter:
    """Counts of packed (tile, feature) keys, merged now and then so memory stays ~ distinct pairs."""

    def __init__(self) -> None:
        self.keys: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []
        self.size = 0

    def add(self, keys: np.ndarray, weights: np.ndarray | None = None) -> None:
        if keys.size == 0:
            return
        if weights is None:
            u, c = np.unique(keys, return_counts=True)
        else:
            u, inv = np.unique(keys, return_inverse=True)
            c = np.bincount(inv, weights=weights)
        self.keys.append(u)
        self.counts.append(c.astype(np.int64))
        self.size += u.size
        if self.size > 2_000_000:  # bounds the merge (sort) to ~150 MB
            self._merge()

    def _merge(self) -> None:
        if len(self.keys) <= 1:
            return
        k, c = np.concatenate(self.keys), np.concatenate(self.counts)
        u, inv = np.unique(k, return_inverse=True)
        self.keys, self.counts = [u], [np.bincount(inv, weights=c).astype(np.int64)]
        self.size = u.size

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._merge()
        if not self.keys:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return self.keys[0], self.counts[0]


class _Features:
    """Global feature ids for names met while streaming, with per-feature tallies that grow."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        kinds = ("total", "control", "not_gene", "low_qv", "edge")
        self.tally: dict[str, np.ndarray] = {k: np.zeros(0, np.int64) for k in kinds}

    def ids(self, names: list[Any]) -> np.ndarray:
        out = np.empty(len(names), dtype=np.int64)
        for i, n in enumerate(names):
            s = "" if n is None else (n.decode() if isinstance(n, bytes) else str(n))
            if s not in self.index:
                self.index[s] = len(self.names)
                self.names.append(s)
            out[i] = self.index[s]
        return out

    def is_control(self) -> np.ndarray:
        return np.array([n == "" or n.startswith(CONTROL_PREFIXES) for n in self.names], dtype=bool)

    def count(self, kind: str, f: np.ndarray) -> None:
        add = np.bincount(f, minlength=len(self.names)).astype(np.int64)
        cur = self.tally[kind]
        if cur.size < add.size:
            cur = np.concatenate([cur, np.zeros(add.size - cur.size, np.int64)])
        cur[: add.size] += add
        self.tally[kind] = cur

    def get(self, kind: str) -> np.ndarray:
        cur = self.tally[kind]
        return np.concatenate([cur, np.zeros(len(self.names) - cur.size, np.int64)])


@dataclass(frozen=True)
class TranscriptSource:
    """Where a slide's transcripts are and how their columns map to slide-image pixels."""

    path: Path
    x: str
    y: str
    um_to_px: np.ndarray | None  # None: the columns are slide-image pixels already (HEST he_x/he_y)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": str(self.path), "columns": [self.x, self.y]}
        if self.um_to_px is None:
            d["coordinates"] = "slide-image pixels (HEST he_x/he_y, non-rigid registration)"
        else:
            d["coordinates"] = "um mapped by meta['um_to_px']"
            d["um_to_px"] = self.um_to_px.tolist()
        return d


def transcript_source(slide: Slide) -> TranscriptSource:
    """The transcripts file of a slide read by the `xenium` (um + meta["um_to_px"]) or `hest`
    (transcripts/<id>_transcripts.parquet with he_x/he_y) reader."""
    meta = slide.meta
    if meta.get("hest_transcripts"):
        return TranscriptSource(Path(meta["hest_transcripts"]), "he_x", "he_y", None)
    if meta.get("transcripts_file"):
        path = Path(meta["transcripts_file"])
        if "um_to_px" not in meta:
            raise DataError(
                "no alignment from Xenium microns to slide-image pixels (meta['um_to_px']); read the "
                "slide with the xenium reader, which records it",
                file=path,
                slide=slide.name,
                field="um_to_px",
            )
        m = np.asarray(meta["um_to_px"], dtype=np.float64)
        if m.shape != (3, 3) or not np.isfinite(m).all() or abs(np.linalg.det(m)) < 1e-12:
            raise DataError(
                f"meta['um_to_px'] must be an invertible 3x3 matrix, got shape {m.shape}",
                file=path,
                slide=slide.name,
                field="um_to_px",
            )
        return TranscriptSource(path, "x_location", "y_location", m)
    raise DataError(
        "slide has no transcripts file (aggregate='transcripts' needs a Xenium output or a HEST "
        "Xenium sample with transcripts/<id>_transcripts.parquet); use aggregate='cells'",
        file=slide.source,
        slide=slide.name,
        field="transcripts",
    )


def _iter_transcripts(src: TranscriptSource, slide: str) -> Iterator[dict[str, Any]]:
    """Batches {feature: list of names + codes, x, y, qv?, is_gene?} streamed from parquet or CSV."""
    required = ["feature_name", src.x, src.y]
    optional = ["qv", "is_gene"]
    path = src.path
    if not path.exists():
        raise DataError("transcripts file is missing", file=path, slide=slide, field="transcripts")
    try:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.compute as pc
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path, read_dictionary=["feature_name"])
            names = pf.schema_arrow.names
            _check_columns(required, names, path, slide)
            cols = required + [c for c in optional if c in names]
            # one row group at a time: a single iter_batches over the whole file keeps every
            # decoded batch alive in Arrow's pool (RSS grew to the file's size in a 20M-row test)
            batches = (
                b
                for g in range(pf.num_row_groups)
                for b in pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=[g], columns=cols)
            )
            for batch in batches:
                feat = batch.column("feature_name")
                if not pa.types.is_dictionary(feat.type):
                    feat = pc.dictionary_encode(feat)
                codes = feat.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
                out = {"names": feat.dictionary.to_pylist(), "codes": codes}
                for c in cols[1:]:
                    arr = batch.column(c)
                    if c == "is_gene":
                        out[c] = arr.fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
                    else:
                        out[c] = arr.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
                yield out
        else:
            head = pd.read_csv(path, nrows=0)
            _check_columns(required, list(head.columns), path, slide)
            cols = required + [c for c in optional if c in head.columns]
            for chunk in pd.read_csv(path, usecols=cols, chunksize=_BATCH_ROWS):
                codes, uniques = pd.factorize(chunk["feature_name"], use_na_sentinel=True)
                out = {"names": list(uniques), "codes": codes.astype(np.int64)}
                for c in cols[1:]:
                    s = chunk[c]
                    out[c] = (
                        s.fillna(False).astype(bool).to_numpy() if c == "is_gene" else s.to_numpy(np.float64)
                    )
                yield out
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"cannot read transcripts: {exc}", file=path, slide=slide, field="transcripts"
        ) from exc


def _check_columns(required: list[str], present: list[str], path: Path, slide: str) -> None:
    missing = [c for c in required if c not in present]
    if missing:
        raise DataError(
            f"transcripts lack column(s) {missing} (have {present[:12]})",
            file=path,
            slide=slide,
            field=",".join(missing),
        )


def _aggregate_transcripts(slide: Slide, grid: TileGrid, spec: TilingSpec) -> _Aggregate:
    src = transcript_source(slide)
    feats = _Features()
    pairs = _PairCounter()
    n_input = 0
    has_qv = False
    for b in _iter_transcripts(src, slide.name):
        lut = feats.ids(b["names"])
        codes = b["codes"]
        null = codes < 0
        if null.any():  # missing names count as a nameless (control) feature
            codes = codes.copy()
            codes[null] = len(lut)
            lut = np.append(lut, feats.ids([None]))
        f = lut[codes]
        n_input += f.size
        feats.count("total", f)
        control = feats.is_control()[f]
        feats.count("control", f[control])
        if "is_gene" in b:  # XOA >= 2: a gene-named row flagged as not a gene is dropped too
            not_gene = ~b["is_gene"] & ~control
            feats.count("not_gene", f[not_gene])
            control |= not_gene
        rest = ~control
        if "qv" in b:
            has_qv = True
            with np.errstate(invalid="ignore"):
                low = rest & ~(b["qv"] >= spec.qv_min)  # NaN qv counts as low quality
            feats.count("low_qv", f[low])
            rest &= ~low
        x, y = b[src.x][rest], b[src.y][rest]
        xy = np.column_stack([x, y])
        if src.um_to_px is not None:
            h = np.column_stack([xy, np.ones(len(xy))]) @ src.um_to_px.T
            xy = h[:, :2] / h[:, 2:3]
        row, col, inside = grid.locate(xy)
        fr = f[rest]
        feats.count("edge", fr[~inside])
        lin = row[inside] * grid.n_cols + col[inside]
        pairs.add(lin * _F_CAP + fr[inside])
    keys, n = pairs.result()
    lin, fid = keys // _F_CAP, keys % _F_CAP
    is_control = feats.is_control()
    total = feats.get("total")
    # panel: the slide's genes first (reader order), then any other gene feature by name
    gene_feat = np.where(~is_control & (total > 0))[0]
    known = [g for g in slide.genes if not g.startswith(CONTROL_PREFIXES)]
    seen = set(known)
    genes = known + sorted(feats.names[i] for i in gene_feat if feats.names[i] not in seen)
    col_of = np.full(len(feats.names), -1, dtype=np.int64)
    for j, g in enumerate(genes):
        if g in feats.index:
            col_of[feats.index[g]] = j
    if (col_of[fid] < 0).any():  # cannot happen: kept rows are non-control features
        raise DataError("internal: kept transcript of a non-panel feature", slide=slide.name, field="genes")
    tiles, rows = np.unique(lin, return_inverse=True)
    counts = sp.csr_matrix(
        (n.astype(np.int64), (rows, col_of[fid])), shape=(tiles.size, len(genes)), dtype=np.int64
    )

    def per_gene(v: np.ndarray) -> np.ndarray:
        out = np.zeros(len(genes), np.int64)
        ok = col_of >= 0
        np.add.at(out, col_of[ok], v[: len(col_of)][ok])
        return out

    dropped = {
        "control": per_gene(feats.get("not_gene")),
        "low_qv": per_gene(feats.get("low_qv")),
        "edge": per_gene(feats.get("edge")),
    }
    ctrl = feats.get("control")
    control_by_feature = {feats.names[i]: int(ctrl[i]) for i in np.where(ctrl > 0)[0]}
    source = src.describe()
    source["qv_filter"] = f"qv >= {spec.qv_min}" if has_qv else "not applied: no qv column"
    agg = _Aggregate(
        genes=genes,
        tile_lin=tiles,
        counts=counts,
        totals=per_gene(total),
        dropped=dropped,
        control_by_feature=control_by_feature,
        n_input=int(n_input),
        units="transcripts",
        source=source,
    )
    if slide.meta.get("cells_file") and slide.n_spots:  # a cell-level Xenium slide: count cells too
        r, c, inside = grid.locate(slide.coords)
        pos = np.searchsorted(tiles, r[inside] * grid.n_cols + c[inside])
        ok = (pos < tiles.size) & (
            tiles[np.minimum(pos, tiles.size - 1)] == r[inside] * grid.n_cols + c[inside]
        )
        agg.n_cells = np.bincount(pos[ok], minlength=tiles.size) if tiles.size else np.zeros(0, np.int64)
    return agg


def _aggregate_cells(slide: Slide, grid: TileGrid) -> _Aggregate:
    x = sp.csr_matrix(slide.adata.X)
    if x.nnz and (np.abs(x.data - np.round(x.data)) > 1e-6).any():
        raise DataError(
            "aggregate='cells' sums raw counts, but the slide's X holds non-integers (normalised?)",
            file=slide.source,
            slide=slide.name,
            field="counts",
        )
    names = slide.genes
    control = np.array([g.startswith(CONTROL_PREFIXES) for g in names], dtype=bool)
    row, col, inside = grid.locate(slide.coords)
    lin = row * grid.n_cols + col
    tiles, rows = np.unique(lin[inside], return_inverse=True)
    ind = sp.csr_matrix((np.ones(rows.size), (rows, np.where(inside)[0])), shape=(tiles.size, slide.n_spots))
    counts = sp.csr_matrix(ind @ x[:, ~control])
    counts.data = np.rint(counts.data)
    counts = counts.astype(np.int64)
    col_tot = np.rint(np.asarray(x.sum(axis=0)).ravel()).astype(np.int64)
    edge = np.rint(np.asarray(x[~inside].sum(axis=0)).ravel()).astype(np.int64)
    genes = [g for g, c in zip(names, control, strict=True) if not c]
    return _Aggregate(
        genes=genes,
        tile_lin=tiles,
        counts=counts,
        totals=col_tot[~control],
        dropped={
            "control": np.zeros(len(genes), np.int64),
            "low_qv": np.zeros(len(genes), np.int64),
            "edge": edge[~control],
        },
        control_by_feature={g: int(v) for g, v, c in zip(names, col_tot, control, strict=True) if c and v},
        n_input=int(col_tot.sum()),
        units="counts",
        source={
            "file": slide.source,
            "obs": int(slide.n_spots),
            "coordinates": "obsm['spatial'] of the cells",
        },
        n_cells=np.bincount(rows, minlength=tiles.size),
        extra={"cells_outside_grid": int((~inside).sum())},
    )


# ---- image statistics ----------------------------------------------------------------------
def _tissue_stats(
    slide: Slide, grid: TileGrid, rows: np.ndarray, cols: np.ndarray, spec: TilingSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(tissue, background, dark) fractions per tile, NaN when not measured, plus how they were."""
    n = rows.size
    nan = np.full(n, np.nan)
    if spec.tissue_min is None:
        return nan, nan.copy(), nan.copy(), {"applied": False, "reason": "disabled (tissue_min=None)"}
    tissue, bg, dark = nan.copy(), nan.copy(), nan.copy()
    with RegionReader(slide.image) as rr:
        level = 0
        for i in range(1, len(rr.levels)):
            if grid.side_px / rr.downsample(i) >= spec.qc_min_px:
                level = i
        dx = rr.levels[0][0] / rr.levels[level][0]
        dy = rr.levels[0][1] / rr.levels[level][1]
        sx, sy = grid.side_px / dx, grid.side_px / dy
        info: dict[str, Any] = {"level": level, "downsample": [dx, dy], "tile_px_at_level": [sx, sy]}
        for r in np.unique(rows):
            sel = np.where(rows == r)[0]
            cs = cols[sel]
            j0, j1 = math.ceil(r * sy - 0.5), math.ceil((r + 1) * sy - 0.5)
            i0, i1 = math.ceil(cs.min() * sx - 0.5), math.ceil((cs.max() + 1) * sx - 0.5)
            band = rr.read(level, i0, j0, i1, j1)
            if not (band.ndim == 3 and band.shape[2] in (3, 4) and band.dtype == np.uint8):
                reason = (
                    f"not applied: the slide image is not 8-bit RGB (dtype {band.dtype}, "
                    f"{band.shape[2] if band.ndim == 3 else 1} channel(s)); the thresholds are for H&E"
                )
                return nan, nan.copy(), nan.copy(), {"applied": False, "reason": reason}
            rgb = band[..., :3].astype(np.int16)
            mn, mx = rgb.min(axis=2), rgb.max(axis=2)
            sat = (mx - mn) / np.maximum(mx, 1)
            is_bg = (mn >= spec.background_min_channel) & (sat < spec.background_max_saturation)
            is_dark = mx < spec.dark_max_channel
            cum_bg = np.concatenate([[0], np.cumsum(is_bg.sum(axis=0))])
            cum_dk = np.concatenate([[0], np.cumsum(is_dark.sum(axis=0))])
            for k, c in zip(sel, cs, strict=True):
                a = math.ceil(c * sx - 0.5) - i0
                b = min(math.ceil((c + 1) * sx - 0.5) - i0, band.shape[1])
                npx = max(1, (b - a) * band.shape[0])
                bg[k] = (cum_bg[b] - cum_bg[a]) / npx
                dark[k] = (cum_dk[b] - cum_dk[a]) / npx
        tissue = 1.0 - bg - dark
        info.update(applied=True, reason=f"tissue_fraction >= {spec.tissue_min}")
    return tissue, bg, dark, info


# ---- the tiler -----------------------------------------------------------------------------
def tile_slide(slide: Slide, spec: TilingSpec | dict[str, Any] | None = None) -> Slide:
    """The tile-level pseudo-bulk Slide of a cell/transcript-level Xenium slide (see module doc)."""
    spec = TilingSpec.from_options(spec)
    if slide.image is None:
        raise DataError(
            "pseudo-bulk tiling needs the slide image (the tile grid and the tissue filter are "
            "defined on it)",
            file=slide.source,
            slide=slide.name,
            field="image",
        )
    if slide.mpp is None or not slide.mpp > 0:
        raise DataError(
            "pseudo-bulk tiling needs the image scale (mpp) to turn the tile side into pixels",
            file=slide.source,
            slide=slide.name,
            field="mpp",
        )
    side_px = spec.tile_um / slide.mpp
    grid = TileGrid.for_image(slide.image.size, side_px)
    if grid.n_tiles == 0:
        raise DataError(
            f"a {spec.tile_um:g} um tile ({side_px:.1f} px) is larger than the {slide.image.size} image",
            file=slide.image.path,
            slide=slide.name,
            field="tile_um",
        )
    agg = (
        _aggregate_transcripts(slide, grid, spec)
        if spec.aggregate == "transcripts"
        else _aggregate_cells(slide, grid)
    )
    rows, cols = agg.tile_lin // grid.n_cols, agg.tile_lin % grid.n_cols
    counts = agg.counts
    total = np.asarray(counts.sum(axis=1)).ravel().astype(np.float64)
    g = max(1, len(agg.genes))
    logc = counts.astype(np.float64)
    logc.data = np.log1p(logc.data)
    mean = np.asarray(logc.sum(axis=1)).ravel() / g
    var = np.maximum(np.asarray(logc.multiply(logc).sum(axis=1)).ravel() / g - mean**2, 0.0)
    tissue, bg, dark, tissue_info = _tissue_stats(slide, grid, rows, cols, spec)
    passes = {
        "tissue": (tissue >= spec.tissue_min) if tissue_info["applied"] else np.ones(rows.size, bool),
        "variance": var >= spec.variance_min if spec.variance_min is not None else np.ones(rows.size, bool),
        "min_counts": total >= spec.min_counts if spec.min_counts is not None else np.ones(rows.size, bool),
    }
    keep = passes["tissue"] & passes["variance"] & passes["min_counts"]
    ids = np.array([f"r{r}_c{c}" for r, c in zip(rows, cols, strict=True)], dtype=object)
    unit_col = "n_transcripts" if agg.units == "transcripts" else "total_counts"
    table = pd.DataFrame(
        {
            "array_row": rows,
            "array_col": cols,
            "x0_px": cols * grid.side_px,
            "y0_px": rows * grid.side_px,
            unit_col: total,
            "tissue_fraction": tissue,
            "background_fraction": bg,
            "dark_fraction": dark,
            "log1p_variance": var,
            "pass_tissue": passes["tissue"],
            "pass_variance": passes["variance"],
            "pass_min_counts": passes["min_counts"],
        },
        index=pd.Index(ids, name="tile"),
    )
    if agg.n_cells is not None:
        table.insert(5, "n_cells", agg.n_cells.astype(np.int64))
    filtered = np.asarray(counts[~keep].sum(axis=0)).ravel().astype(np.int64)
    if not keep.any():
        raise DataError(
            f"no tile of {slide.name} passes the filters ({rows.size} candidate tiles; "
            f"{_removed_counts(passes)}); relax tissue_min / variance_min / min_counts",
            file=slide.source,
            slide=slide.name,
            field="pseudobulk",
        )
    kept = table[keep]
    x = counts[keep].astype(np.float32)
    adata = make_adata(
        x,
        list(kept.index),
        agg.genes,
        grid.centre(kept["array_row"], kept["array_col"]),
        {c: kept[c].to_numpy() for c in kept.columns},
    )
    kept_per_gene = np.asarray(counts[keep].sum(axis=0)).ravel().astype(np.int64)
    adata.var["total"] = agg.totals
    adata.var["kept"] = kept_per_gene
    for reason in ("control", "low_qv", "edge"):
        adata.var[f"dropped_{reason}"] = agg.dropped[reason]
    adata.var["dropped_filtered"] = filtered
    removed = table[~keep]
    meta = {k: v for k, v in slide.meta.items() if k != "dropped_spots"}
    if slide.meta.get("dropped_spots"):
        meta["source_dropped_spots"] = slide.meta["dropped_spots"]
    meta["dropped_spots"] = {str(t): _reasons(rw, spec, unit_col) for t, rw in removed.iterrows()}
    by_reason = {
        "control": int(sum(agg.control_by_feature.values()) + agg.dropped["control"].sum()),
        "low_qv": int(agg.dropped["low_qv"].sum()),
        "edge": int(agg.dropped["edge"].sum()),
        "filtered": int(filtered.sum()),
    }
    meta["pseudobulk"] = {
        "spec": spec.key(),
        "tile_um": spec.tile_um,
        "side_px": float(grid.side_px),
        "grid": {"n_rows": grid.n_rows, "n_cols": grid.n_cols, "origin_px": [0.0, 0.0]},
        "aggregate": spec.aggregate,
        "units": agg.units,
        "source": {**agg.source, "platform": slide.platform, "n_obs": int(slide.n_spots), **agg.extra},
        "tiles": {
            "grid": grid.n_tiles,
            "empty": int(grid.n_tiles - rows.size),
            "candidates": int(rows.size),
            "kept": int(keep.sum()),
            "removed": int((~keep).sum()),
            "removed_by": _removed_counts(passes),
        },
        agg.units: {
            "input": agg.n_input,
            "kept": int(kept_per_gene.sum()),
            "dropped": by_reason,
            "control_by_feature": agg.control_by_feature,
        },
        "tissue_filter": tissue_info,
        "removed_tiles": {"tile": [str(t) for t in removed.index]}
        | {c: [_plain(v) for v in removed[c].to_numpy()] for c in removed.columns},
    }
    return Slide(
        name=slide.name,
        patient=slide.patient,
        adata=adata,
        image=slide.image,
        mpp=slide.mpp,
        spot_diameter_um=spec.tile_um,
        platform=PLATFORM,
        source=agg.source.get("file") or slide.source,
        meta=meta,
    )


def _removed_counts(passes: dict[str, np.ndarray]) -> dict[str, int]:
    """Tiles failing each filter (a tile failing two is counted under both)."""
    return {f"{k}": int((~v).sum()) for k, v in passes.items()}


def _reasons(row: pd.Series, spec: TilingSpec, unit_col: str) -> str:
    out = []
    if not row["pass_tissue"]:
        out.append(f"tissue_fraction {row['tissue_fraction']:.3f} < {spec.tissue_min}")
    if not row["pass_variance"]:
        out.append(f"log1p variance {row['log1p_variance']:.4g} < {spec.variance_min}")
    if not row["pass_min_counts"]:
        out.append(f"{unit_col} {row[unit_col]:g} < {spec.min_counts}")
    return "; ".join(out)


def _plain(v: Any) -> Any:
    """numpy scalar -> JSON-able Python value (NaN -> None)."""
    if isinstance(v, np.bool_ | bool):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating | float):
        return None if not math.isfinite(float(v)) else float(v)
    return v
