"""Bring your own data: h5ad files listed in a `slides.csv`.

    <root>/slides.csv    slide, h5ad, image (optional), mpp (optional), patient (optional),
                         spot_diameter_um (optional), platform (optional); paths relative to root

Each h5ad holds raw counts in X (or in the layer named by option `counts_layer`, one name for
all slides or a {slide: layer} dict) and full-resolution pixel centres (x, y) of its image in
obsm["spatial"] (key set by option `spatial_key`). Counts must be whole numbers unless option
`allow_non_integer=True` (fractional counts, e.g. ambient-corrected); values that look normalised
or log-transformed are refused even then (stbench.data.readers.counts_check), since they would be
normalised twice, unless the card declares `counts="normalized"`. Every field of a slide's
slides.csv row is part of its cache key (`slide_record`). A missing patient means the slide is its
own patient; a missing platform is "other".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from stbench.data.image import SlideImage
from stbench.data.readers.base import SlideReader, register_reader
from stbench.data.readers.counts_check import check_counts
from stbench.data.readers.slides_csv import SlidesCsvMixin
from stbench.data.slide import Slide, make_adata
from stbench.errors import DataError

REQUIRED_COLUMNS = ("slide", "h5ad")
OPTIONAL_COLUMNS = ("image", "mpp", "patient", "spot_diameter_um", "platform")


@register_reader
class AnnDataReader(SlidesCsvMixin, SlideReader):
    format = "anndata"
    platform = "other"
    required_columns = REQUIRED_COLUMNS

    def slide_files(self, slide: str) -> list[Path]:
        row = self._row(slide)
        files = [self._path(row["h5ad"])]
        if row.get("image"):
            files.append(self._path(row["image"]))
        return files

    def read_slide(self, slide: str) -> Slide:
        row = self._row(slide)
        if not row["h5ad"]:
            raise DataError("empty h5ad path", file=self.table_file, slide=slide, field="h5ad")
        path = self._require(self._path(row["h5ad"]), slide, "h5ad")
        try:
            src = ad.read_h5ad(path)
        except Exception as exc:
            raise DataError(f"cannot read h5ad: {exc}", file=path, slide=slide, field="h5ad") from exc
        layer = self.options.get("counts_layer")
        if isinstance(layer, dict):
            layer = layer.get(slide)
        if layer and layer not in src.layers:
            raise DataError(
                f"no layer {layer!r} (layers: {list(src.layers)})",
                file=path,
                slide=slide,
                field=f"layers/{layer}",
            )
        x = src.layers[layer] if layer else src.X
        if x is None:
            raise DataError("h5ad has no X matrix", file=path, slide=slide, field="X")
        counts = sp.csr_matrix(x, dtype=np.float32)
        check_counts(
            counts,
            file=path,
            slide=slide,
            field=f"layers/{layer}" if layer else "X",
            declared=self.options.get("counts", "raw"),
            allow_non_integer=bool(self.options.get("allow_non_integer", False)),
        )
        key = self.options.get("spatial_key", "spatial")
        if key not in src.obsm:
            raise DataError(
                f"no spot coordinates (obsm[{key!r}])", file=path, slide=slide, field=f"obsm/{key}"
            )
        xy = np.asarray(src.obsm[key], dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] < 2:
            raise DataError(
                f"obsm[{key!r}] must be (n_spots, 2), got {xy.shape}",
                file=path,
                slide=slide,
                field=f"obsm/{key}",
            )
        obs = {c: src.obs[c].to_numpy() for c in src.obs.columns if c not in ("slide", "patient")}
        adata = make_adata(counts, list(src.obs_names), [str(g) for g in src.var_names], xy[:, :2], obs)
        image = self._path(row["image"]) if row.get("image") else None
        if image is not None:
            self._require(image, slide, "image")
        return Slide(
            name=slide,
            patient=row.get("patient") or slide,
            adata=adata,
            image=SlideImage(image) if image is not None else None,
            mpp=self._float(row, "mpp", slide),
            spot_diameter_um=self._float(row, "spot_diameter_um", slide),
            platform=row.get("platform") or "other",
            source=str(path),
            meta={"slides_csv": str(self.table_file)},
        )

    def _float(self, row: pd.Series, col: str, slide: str) -> float | None:
        v: Any = row.get(col, "")
        if v in ("", None):
            return None
        try:
            f = float(v)
        except ValueError:
            f = math.nan
        if not math.isfinite(f) or f <= 0:
            raise DataError(
                f"{col} must be a positive number, got {v!r}", file=self.table_file, slide=slide, field=col
            )
        return f
