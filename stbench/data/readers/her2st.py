"""Her2ST (Andersson et al., Nat Commun 2021), layout of github.com/almaan/her2st.

    data/ST-cnts/<slide>.tsv.gz                 spots (rows, "<x>x<y>" array ids) x genes, raw counts
    data/ST-spotfiles/<slide>_selection.tsv     x, y, new_x, new_y, pixel_x, pixel_y, selected
    data/ST-imgs/<patient>/<slide>/*.jpg        full-resolution H&E (optional per slide)
    data/ST-pat/lbl/<slide>_labeled_coordinates.tsv   pathologist labels (some slides)

A spot is kept when it has counts and a selection row with selected == 1 (both files are needed
to place it on the image). The patient is the slide's letter (A1..A6 -> A). The pixel scale is
measured per slide from the spot grid: spots are 200 um apart, so mpp = 200 / (pixels per array
step), fitted by least squares of pixel_x on new_x (and pixel_y on new_y).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from stbench.data.image import SlideImage
from stbench.data.readers.base import SlideReader, register_reader
from stbench.data.readers.count_table import read_count_table
from stbench.data.readers.st_spots import grid_mpp, read_selection
from stbench.data.slide import Slide, make_adata
from stbench.errors import DataError

SPOT_SPACING_UM = 200.0
SPOT_DIAMETER_UM = 100.0
_SLIDE_RE = re.compile(r"^([A-Z])(\d+)$")


@register_reader
class Her2STReader(SlideReader):
    format = "her2st"
    platform = "st"

    def __init__(self, root: str | Path, **options: object) -> None:
        super().__init__(root, **options)
        # Accept either the repository root or its data/ folder.
        self.data = self.root / "data" if (self.root / "data").is_dir() else self.root

    # ---- layout --------------------------------------------------------------------------
    def counts_file(self, slide: str) -> Path:
        return self.data / "ST-cnts" / f"{slide}.tsv.gz"

    def selection_file(self, slide: str) -> Path:
        return self.data / "ST-spotfiles" / f"{slide}_selection.tsv"

    def label_file(self, slide: str) -> Path:
        return self.data / "ST-pat" / "lbl" / f"{slide}_labeled_coordinates.tsv"

    def image_file(self, slide: str) -> Path | None:
        folder = self.data / "ST-imgs" / slide[0] / slide
        if not folder.is_dir():
            return None
        jpgs = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif"))
        return jpgs[0] if jpgs else None

    def list_slides(self) -> list[str]:
        cnts = self.data / "ST-cnts"
        if not cnts.is_dir():
            raise DataError("Her2ST counts folder is missing", file=cnts, field="ST-cnts")
        names = [p.name[: -len(".tsv.gz")] for p in cnts.glob("*.tsv.gz")]
        return sorted(n for n in names if _SLIDE_RE.match(n))

    def patient_of(self, slide: str) -> str:
        return slide[0]

    def slide_files(self, slide: str) -> list[Path]:
        files = [self.counts_file(slide), self.selection_file(slide)]
        img = self.image_file(slide)
        if img is not None:
            files.append(img)
        if self.label_file(slide).exists():
            files.append(self.label_file(slide))
        return files

    # ---- reading -------------------------------------------------------------------------
    def read_slide(self, slide: str) -> Slide:
        cfile = self._require(self.counts_file(slide), slide, "ST-cnts")
        sfile = self._require(self.selection_file(slide), slide, "ST-spotfiles")
        counts = _read_counts(cfile, slide)
        sel = read_selection(sfile, slide)
        sel = sel[sel["selected"] == 1] if "selected" in sel.columns else sel
        sel_ids = sel["x"].astype(int).astype(str) + "x" + sel["y"].astype(int).astype(str)
        sel = sel.set_index(sel_ids)
        if not sel.index.is_unique:
            dup = sel.index[sel.index.duplicated()].unique()[:5].tolist()
            raise DataError(f"duplicate spots {dup}", file=sfile, slide=slide, field="x,y")
        common = [s for s in counts.index if s in sel.index]
        dropped = {s: "no selected coordinate in the spot file" for s in counts.index if s not in sel.index}
        dropped.update({s: "no counts row" for s in sel.index if s not in counts.index})
        if not common:
            raise DataError(
                "no spot has both counts and a selected coordinate", file=sfile, slide=slide, field="x,y"
            )
        counts = counts.loc[common]
        sel = sel.loc[common]
        xy = sel[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
        obs = {"array_x": sel["x"].to_numpy(int), "array_y": sel["y"].to_numpy(int)}
        labels = self._read_labels(slide, sel)
        if labels is not None:
            obs["label"] = labels
        adata = make_adata(counts.to_numpy(dtype=np.float32), common, list(counts.columns), xy, obs)
        img_path = self.image_file(slide)
        parsed = Slide(
            name=slide,
            patient=self.patient_of(slide),
            adata=adata,
            image=SlideImage(img_path) if img_path else None,
            mpp=grid_mpp(sel, SPOT_SPACING_UM),
            spot_diameter_um=SPOT_DIAMETER_UM,
            platform="st",
            source=str(cfile),
            meta={"selection_file": str(sfile), "dropped_spots": dropped},
        )
        return parsed.drop_empty_spots(str(self.options.get("empty_spots", "drop")))

    def _read_labels(self, slide: str, sel: pd.DataFrame) -> np.ndarray | None:
        """Pathologist labels, matched by rounded array coordinates (the file keys by pixel)."""
        path = self.label_file(slide)
        if not path.exists():
            return None
        lbl = pd.read_csv(path, sep="\t")
        if not {"x", "y", "label"} <= set(lbl.columns):
            raise DataError("label file needs columns x, y, label", file=path, slide=slide, field="label")
        lbl = lbl.dropna(subset=["x", "y"])
        key = lbl["x"].round().astype(int).astype(str) + "x" + lbl["y"].round().astype(int).astype(str)
        lut = dict(zip(key, lbl["label"].astype(str), strict=False))
        return np.array([lut.get(s, "unlabelled") for s in sel.index], dtype=object)


def _read_counts(path: Path, slide: str) -> pd.DataFrame:
    try:
        df = read_count_table(path)
    except Exception as exc:
        raise DataError(f"cannot parse counts table: {exc}", file=path, slide=slide, field="counts") from exc
    if df.shape[0] == 0:
        raise DataError("counts table has no spots", file=path, slide=slide, field="counts")
    df.index = df.index.astype(str)
    if not df.index.is_unique:
        dup = df.index[df.index.duplicated()].unique()[:5].tolist()
        raise DataError(f"duplicate spot ids {dup}", file=path, slide=slide, field="spot id")
    non_numeric = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if non_numeric:
        raise DataError(
            f"non-numeric count columns {non_numeric[:5]}", file=path, slide=slide, field="counts"
        )
    values = df.to_numpy(dtype=np.float64)
    if np.isnan(values).any():
        rows = df.index[np.isnan(values).any(axis=1)][:5].tolist()
        raise DataError(f"NaN counts at spots {rows}", file=path, slide=slide, field="counts")
    if (values < 0).any():
        rows = df.index[(values < 0).any(axis=1)][:5].tolist()
        raise DataError(f"negative counts at spots {rows}", file=path, slide=slide, field="counts")
    return df
