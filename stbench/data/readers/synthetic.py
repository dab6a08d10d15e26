"""Reader of the synthetic dataset written by `stbench.data.synthetic.generate_synthetic`.

    <root>/dataset.json                  format "synthetic", slides -> patients, generator parameters
    <root>/genes.tsv                     the known gene model (role, weights, dispersion)
    <root>/slides/<slide>/meta.json      patient, mpp, spot_diameter_um, spot_spacing_um, stain batch
    <root>/slides/<slide>/spots.tsv      spot, array_row, array_col, pixel_x, pixel_y
    <root>/slides/<slide>/counts.tsv.gz  raw counts, spots x genes
    <root>/slides/<slide>/image.tif      RGB H&E-like image (optional for reading)
    <root>/slides/<slide>/truth.tsv      ground-truth morphology per spot (not part of the Slide)
    <root>/slides/<slide>/expected.tsv.gz noise-free expected counts (not part of the Slide)

The ground truth stays out of `Slide.adata` on purpose, so no method can read it by accident;
analyses and tests get it through `read_truth` / `read_expected` / `gene_model`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stbench.data.image import SlideImage
from stbench.data.readers.base import SlideReader, register_reader
from stbench.data.readers.count_table import read_count_table
from stbench.data.slide import Slide, make_adata
from stbench.errors import DataError

_SPOT_COLUMNS = ("spot", "array_row", "array_col", "pixel_x", "pixel_y")
_META_FIELDS = ("patient", "mpp", "spot_diameter_um")


@register_reader
class SyntheticReader(SlideReader):
    format = "synthetic"
    platform = "synthetic"

    # ---- layout --------------------------------------------------------------------------
    def slide_dir(self, slide: str) -> Path:
        return self.root / "slides" / slide

    def list_slides(self) -> list[str]:
        folder = self.root / "slides"
        if not folder.is_dir():
            raise DataError(
                "synthetic slides folder is missing (run generate_synthetic)", file=folder, field="slides"
            )
        return sorted(p.name for p in folder.iterdir() if (p / "meta.json").is_file())

    def slide_files(self, slide: str) -> list[Path]:
        d = self.slide_dir(slide)
        files = [d / "meta.json", d / "spots.tsv", d / "counts.tsv.gz"]
        if (d / "image.tif").exists():
            files.append(d / "image.tif")
        return files

    def meta(self, slide: str) -> dict[str, Any]:
        path = self._require(self.slide_dir(slide) / "meta.json", slide, "meta.json")
        try:
            meta = json.loads(path.read_text())
        except ValueError as exc:
            raise DataError(f"cannot parse meta.json: {exc}", file=path, slide=slide, field="meta") from exc
        missing = [k for k in _META_FIELDS if k not in meta]
        if missing:
            raise DataError(f"meta.json lacks {missing}", file=path, slide=slide, field=",".join(missing))
        return meta

    def patient_of(self, slide: str) -> str:
        return str(self.meta(slide)["patient"])

    # ---- reading -------------------------------------------------------------------------
    def read_slide(self, slide: str) -> Slide:
        d = self.slide_dir(slide)
        if not d.is_dir():
            raise DataError(
                f"unknown synthetic slide; present: {self.list_slides()}", file=d, slide=slide, field="slide"
            )
        meta = self.meta(slide)
        sfile = self._require(d / "spots.tsv", slide, "spots.tsv")
        cfile = self._require(d / "counts.tsv.gz", slide, "counts.tsv.gz")
        spots = _read_spots(sfile, slide)
        try:
            counts = read_count_table(cfile)
        except Exception as exc:
            raise DataError(
                f"cannot parse counts table: {exc}", file=cfile, slide=slide, field="counts"
            ) from exc
        counts.index = counts.index.astype(str)
        missing = [s for s in counts.index if s not in spots.index]
        if missing:
            raise DataError(
                f"{len(missing)} counted spot(s) without coordinates, e.g. {missing[:5]}",
                file=sfile,
                slide=slide,
                field="spot",
            )
        spots = spots.loc[counts.index]
        obs = {"array_row": spots["array_row"].to_numpy(int), "array_col": spots["array_col"].to_numpy(int)}
        xy = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64)
        adata = make_adata(counts.to_numpy(np.float32), list(counts.index), list(counts.columns), xy, obs)
        image = d / "image.tif"
        return Slide(
            name=slide,
            patient=str(meta["patient"]),
            adata=adata,
            image=SlideImage(image) if image.exists() else None,
            mpp=float(meta["mpp"]),
            spot_diameter_um=float(meta["spot_diameter_um"]),
            platform="synthetic",
            source=str(cfile),
            meta={
                "spot_spacing_um": meta.get("spot_spacing_um"),
                "stain": meta.get("stain"),
                "truth_file": str(d / "truth.tsv"),
            },
        )

    # ---- ground truth (for tests and analyses, never for methods) ------------------------
    def read_truth(self, slide: str) -> pd.DataFrame:
        """Per-spot morphology features (raw and z-scored), hidden field and library size."""
        path = self._require(self.slide_dir(slide) / "truth.tsv", slide, "truth.tsv")
        df = pd.read_csv(path, sep="\t", index_col=0)
        df.index = df.index.astype(str)
        return df

    def read_expected(self, slide: str) -> pd.DataFrame:
        """Noise-free expected counts (spots x genes)."""
        path = self._require(self.slide_dir(slide) / "expected.tsv.gz", slide, "expected.tsv.gz")
        df = pd.read_csv(path, sep="\t", index_col=0)
        df.index = df.index.astype(str)
        return df

    def gene_model(self) -> pd.DataFrame:
        """genes.tsv: role, marker feature, base log-mean, weights, nonlinearity, dispersion per gene."""
        path = self._require(self.root / "genes.tsv", None, "genes.tsv")
        return pd.read_csv(path, sep="\t", index_col=0, keep_default_na=False)


def _read_spots(path: Path, slide: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, sep="\t", dtype={"spot": str})
    except Exception as exc:
        raise DataError(f"cannot parse spot file: {exc}", file=path, slide=slide, field="spots") from exc
    missing = [c for c in _SPOT_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"spot file lacks columns {missing}", file=path, slide=slide, field=",".join(missing))
    if df[list(_SPOT_COLUMNS)].isna().any(axis=None):
        raise DataError("spot file has empty cells", file=path, slide=slide, field="spots")
    df = df.set_index("spot")
    if not df.index.is_unique:
        dup = df.index[df.index.duplicated()].unique()[:5].tolist()
        raise DataError(f"duplicate spots {dup}", file=path, slide=slide, field="spot")
    return df
