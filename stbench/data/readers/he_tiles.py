"""H&E-only cohorts (TCGA-SKCM): whole-slide images listed in a `slides.csv`, tiled into spots.

    <root>/slides.csv    slide, image, mpp, patient, pseudolabels (optional); paths relative to root

`mpp` is micrometres per full-resolution pixel (TCGA SVS: the Aperio header's MPP, ~0.25 at 40x);
`pseudolabels` names a pseudo-label file (`stbench pseudolabels` or `write_pseudolabels`) holding
this slide's tiles. Every slide becomes `he_tiling.he_only_slide`: tiles passing STMDiT's spot
filters, no measured expression (0 genes, meta["expression"] = "none") unless pseudo-labels are given.

Options: tile_um (default 55), filter_px (256), filters (a dict of SpotFilterParams fields merged over
the paper's thresholds; False or None keeps every tile), genes (a list: the pseudo-label genes to use).
"""

from __future__ import annotations

import math
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pandas as pd

from stbench.data.readers.base import SlideReader, register_reader
from stbench.data.readers.slides_csv import SlidesCsvMixin
from stbench.data.slide import Slide
from stbench.data.spot_filters import STMDIT_FILTERS, SpotFilterParams
from stbench.errors import DataError

REQUIRED_COLUMNS = ("slide", "image", "mpp", "patient")
OPTIONAL_COLUMNS = ("pseudolabels",)


@register_reader
class HETilesReader(SlidesCsvMixin, SlideReader):
    format = "he-tiles"
    platform = "other"
    required_columns = REQUIRED_COLUMNS

    def _row(self, slide: str) -> pd.Series:
        row = super()._row(slide)
        for col in ("image", "patient"):
            if not row[col]:
                raise DataError(f"empty {col}", file=self.table_file, slide=slide, field=col)
        return row

    def slide_files(self, slide: str) -> list[Path]:
        row = self._row(slide)
        files = [self._path(row["image"])]
        if row.get("pseudolabels"):
            files.append(self._path(row["pseudolabels"]))
        return files

    def filters(self) -> SpotFilterParams | None:
        """The reader option `filters` as SpotFilterParams (None = keep every tile)."""
        opt = self.options.get("filters", {})
        if opt is None or opt is False:
            return None
        if opt is True:
            return STMDIT_FILTERS
        valid = {f.name for f in fields(SpotFilterParams)}
        unknown = sorted(set(opt) - valid) if isinstance(opt, dict) else None
        if unknown is None or unknown:
            raise DataError(
                f"filters must be a dict of {sorted(valid)}, True, False or None, got {opt!r}",
                field="filters",
            )
        return replace(STMDIT_FILTERS, **opt)

    def read_slide(self, slide: str) -> Slide:
        # imported here: he_tiling -> pseudobulk -> readers.xenium imports this package
        from stbench.data.he_tiling import DEFAULT_TILE_UM, FILTER_PX, he_only_slide

        row = self._row(slide)
        image = self._require(self._path(row["image"]), slide, "image")
        pseudo = (
            self._require(self._path(row["pseudolabels"]), slide, "pseudolabels")
            if row.get("pseudolabels")
            else None
        )
        genes = self.options.get("genes")
        s = he_only_slide(
            slide,
            row["patient"],
            image,
            self._mpp(row, slide),
            tile_um=float(self.options.get("tile_um", DEFAULT_TILE_UM)),
            filters=self.filters(),
            genes=list(genes) if genes is not None and pseudo is not None else None,
            expression=pseudo,
            filter_px=int(self.options.get("filter_px", FILTER_PX)),
        )
        s.meta["slides_csv"] = str(self.table_file)
        return s

    def _mpp(self, row: pd.Series, slide: str) -> float:
        v: Any = row["mpp"]
        try:
            f = float(v)
        except ValueError:
            f = math.nan
        if not math.isfinite(f) or f <= 0:
            raise DataError(
                f"mpp must be a positive number (um per full-resolution pixel), got {v!r}",
                file=self.table_file,
                slide=slide,
                field="mpp",
            )
        return f
