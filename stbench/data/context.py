"""Spatial context of a spot: tile grids around it and spot graphs within its slide.

Why here and not in methods: TRIPLEX, DeepSpot, Hist2ST and MERGE all look beyond the spot, and
the one rule that must hold for every one of them - context never reaches into another slide, and
never reads targets - is easiest to guarantee (and test) once, in the data layer.

Tile grids. A request `"<encoder>:grid=G"` means G x G tiles, each the size of the spot's crop,
centred on the spot (the centre tile is the spot itself): the neighbourhood view. `"<encoder>:sub=S"`
means S x S sub-tiles that tile the spot's own crop window. Both are cut from the slide's image
only (no other slide, no expression). They are served as a *derived slide* whose "spots" are the
tile centres (`<spot>@<r>,<c>`), so the ordinary patch and feature stores cache them with their
own keys. Tile t = r * G + c with r the row from the top (y) and c the column from the left (x).

Spot graphs. `spot_graph` builds symmetric edge lists without self loops over ONE slide's spots:
k nearest neighbours, a radius in micrometres, or adjacency on the array grid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from stbench.errors import DataError

TILE_MODES = ("grid", "sub")
GRAPH_KINDS = ("knn", "radius", "grid")
_REQUEST = re.compile(r"^(?P<base>[^:]+)(?::(?P<mode>grid|sub)=(?P<n>\d+))?$")


@dataclass(frozen=True)
class TileGrid:
    """`mode` "grid" (G x G spot-sized tiles around the spot) or "sub" (S x S tiles inside it)."""

    mode: str
    n: int

    def __post_init__(self) -> None:
        if self.mode not in TILE_MODES:
            raise DataError(f"tile mode must be one of {TILE_MODES}, got {self.mode!r}", field="features")
        if self.n < 1:
            raise DataError(f"tile grid size must be >= 1, got {self.n}", field="features")

    @property
    def n_tiles(self) -> int:
        return self.n * self.n

    @property
    def suffix(self) -> str:
        return f":{self.mode}={self.n}"

    def tile_crop(self, spot_crop: float) -> float:
        """Side of one tile in full-resolution pixels, given the spot's crop side."""
        return spot_crop if self.mode == "grid" else spot_crop / self.n

    def offsets(self, spot_crop: float) -> np.ndarray:
        """(n_tiles, 2) offsets (dx, dy) in full-res px of the tile centres from the spot centre."""
        step = self.tile_crop(spot_crop)
        half = (self.n - 1) / 2.0
        rows, cols = np.meshgrid(np.arange(self.n), np.arange(self.n), indexing="ij")
        return np.stack([(cols.ravel() - half) * step, (rows.ravel() - half) * step], axis=1)


def parse_feature_request(request: str) -> tuple[str, TileGrid | None]:
    """ "encoder" -> ("encoder", None); "encoder:grid=5" -> ("encoder", TileGrid("grid", 5))."""
    m = _REQUEST.match(str(request).strip())
    if m is None:
        raise DataError(
            f"bad feature request {request!r}: use NAME, NAME:grid=G or NAME:sub=S", field="features"
        )
    if m["mode"] is None:
        return m["base"], None
    return m["base"], TileGrid(m["mode"], int(m["n"]))


def tile_grid_slide(slide: Any, grid: TileGrid, spot_crop: float) -> Any:
    """A Slide whose spots are the tile centres of every spot (spot-major, then tile order)."""
    from stbench.data.slide import Slide, make_adata

    coords = np.asarray(slide.coords, dtype=np.float64)
    offsets = grid.offsets(spot_crop)
    centres = (coords[:, None, :] + offsets[None, :, :]).reshape(-1, 2)
    ids = [f"{s}@{t // grid.n},{t % grid.n}" for s in slide.spot_ids for t in range(grid.n_tiles)]
    adata = make_adata(np.zeros((len(ids), 1), np.float32), ids, ["_tile"], centres)
    return Slide(
        name=slide.name,
        patient=slide.patient,
        adata=adata,
        image=slide.image,
        mpp=slide.mpp,
        spot_diameter_um=slide.spot_diameter_um,
        platform=slide.platform,
        source=slide.source,
        meta={"tile_grid": f"{grid.mode}={grid.n}", "tile_crop_px": grid.tile_crop(spot_crop)},
    )


def spot_graph(
    coords: np.ndarray,
    spec: dict[str, Any],
    *,
    mpp: float | None = None,
    array_coords: np.ndarray | None = None,
    slide: str | None = None,
) -> np.ndarray:
    """(2, E) int64 edges (i, j) over one slide's spots: symmetric, no self loops, sorted.

    `{"kind": "knn", "k": 8}`: i-j when j is among i's k nearest (or vice versa), in pixels.
    `{"kind": "radius", "radius_um": 150}`: centres closer than the radius (needs `mpp`).
    `{"kind": "grid", "radius": 1, "metric": "chebyshev"|"manhattan"}`: array-grid neighbours."""
    from scipy.spatial import cKDTree

    kind = spec.get("kind")
    if kind not in GRAPH_KINDS:
        raise DataError(f"graph kind must be one of {GRAPH_KINDS}, got {kind!r}", slide=slide, field="graph")
    n = len(coords)
    if n < 2:
        return np.zeros((2, 0), dtype=np.int64)
    if kind == "knn":
        k = int(spec.get("k", 8))
        if k < 1:
            raise DataError(f"graph k must be >= 1, got {k}", slide=slide, field="graph")
        kk = min(k + 1, n)
        _, idx = cKDTree(coords).query(coords, k=kk)
        src = np.repeat(np.arange(n), kk)
        pairs = np.stack([src, np.asarray(idx).reshape(-1)])
    elif kind == "radius":
        if not mpp or "radius_um" not in spec:
            raise DataError("radius graph needs radius_um and the slide's mpp", slide=slide, field="graph")
        pairs = cKDTree(coords).query_pairs(float(spec["radius_um"]) / float(mpp), output_type="ndarray").T
    else:
        if array_coords is None:
            raise DataError("grid graph needs array coordinates", slide=slide, field="array_coords")
        p = 1 if spec.get("metric", "chebyshev") == "manhattan" else np.inf
        r = float(spec.get("radius", 1)) + 1e-9
        pairs = cKDTree(array_coords.astype(np.float64)).query_pairs(r, p=p, output_type="ndarray").T
    pairs = pairs[:, pairs[0] != pairs[1]]
    both = np.concatenate([pairs, pairs[::-1]], axis=1)
    both = np.unique(both, axis=1) if both.size else both.reshape(2, 0)
    return both.astype(np.int64)
