"""Cutaneous squamous cell carcinoma, ST platform (Ji et al., Cell 2020), GEO GSE144240.

Layout: the extracted GSE144240_RAW.tar, one flat folder (sub-folders are searched too). Per
section (slide id "P2_ST_rep1": patient P2, replicate 1; 4 patients x 3 replicates), with GEO's
"GSM<digits>_" prefix optional and files either plain or gzipped:

    GSM4284316_P2_ST_rep1_stdata.tsv[.gz]                   spots ("<x>x<y>" array ids) x genes
    GSM4284316_spot_data-selection-P2_ST_rep1.tsv[.gz]      x, y, new_x, new_y, pixel_x, pixel_y, selected
    GSM4284316_P2_ST_rep1.jpg                               full-resolution H&E (optional)

Files are matched by the slide id as a whole token (so P1_ST_rep1 never matches P10_ST_rep1);
any file with "spot" and "selection" in its name counts as the spot file. GEO ships the images
gzipped (`.jpg.gz`); decompress them once (`gunzip`), the reader never writes into the root.

Gene columns: the ST pipeline tables of this series carry gene symbols; plain Ensembl ids are
kept as they are; composite "ENSG..._SYMBOL" / "SYMBOL_ENSG..." names (other ST-pipeline
versions) are split, the symbol becomes the gene name and the id goes to var["gene_id"]. Columns
that end up with the same name are summed (one gene, several loci), never renamed.

Geometry: HEST-1k and the HINGE paper use 110 um between neighbouring spot centres and a
150 um spot diameter for this series; we take the same numbers so results stay comparable (note
the diameter then exceeds the spacing; both are options, `spot_spacing_um`, `spot_diameter_um`).
mpp is fitted per slide from the spot grid (pixel_x on new_x, pixel_y on new_y), as for Her2ST.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from stbench.data.image import SlideImage
from stbench.data.readers.base import SlideReader, register_reader
from stbench.data.readers.count_table import read_count_table
from stbench.data.readers.st_spots import grid_mpp, read_selection
from stbench.data.slide import Slide, make_adata
from stbench.errors import DataError

SPOT_SPACING_UM = 110.0
SPOT_DIAMETER_UM = 150.0
_COUNTS_RE = re.compile(r"^(?:GSM\d+_)?(?P<slide>.+?)_stdata\.tsv(?:\.gz)?$")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
_ENSG_RE = re.compile(r"^ENS[A-Z]*G\d+(?:\.\d+)?$")


@register_reader
class CsccReader(SlideReader):
    format = "cscc"
    platform = "st"

    def _files(self) -> list[Path]:
        if not hasattr(self, "_file_cache"):
            self._file_cache = sorted(p for p in self.root.rglob("*") if p.is_file())
        return self._file_cache

    def _matching(self, slide: str, pred: Callable[[str], bool]) -> list[Path]:
        token = re.compile(rf"(?<![A-Za-z0-9]){re.escape(slide)}(?![A-Za-z0-9])")
        return [p for p in self._files() if token.search(p.name) and pred(p.name.lower())]

    def _one(self, slide: str, pred: Callable[[str], bool], field: str, required: bool) -> Path | None:
        hits = self._matching(slide, pred)
        if len(hits) > 1:
            raise DataError(
                f"{len(hits)} candidate files: {[h.name for h in hits]}",
                file=self.root,
                slide=slide,
                field=field,
            )
        if not hits:
            if required:
                raise DataError(f"no {field} file for this slide", file=self.root, slide=slide, field=field)
            return None
        return hits[0]

    # ---- layout --------------------------------------------------------------------------
    def list_slides(self) -> list[str]:
        ids = {m["slide"] for p in self._files() if (m := _COUNTS_RE.match(p.name))}
        if not ids:
            raise DataError(
                "no *_stdata.tsv[.gz] counts file under the cSCC root", file=self.root, field="stdata"
            )
        return sorted(ids, key=_natural_key)

    def _required(self, slide: str, pred: Callable[[str], bool], field: str) -> Path:
        path = self._one(slide, pred, field, True)
        assert path is not None  # _one raises when a required file is absent
        return path

    def counts_file(self, slide: str) -> Path:
        return self._required(slide, lambda n: "_stdata.tsv" in n, "stdata")

    def selection_file(self, slide: str) -> Path:
        return self._required(
            slide, lambda n: "spot" in n and "selection" in n and ".tsv" in n, "spot_data-selection"
        )

    def image_file(self, slide: str) -> Path | None:
        img = self._one(slide, lambda n: n.endswith(_IMAGE_SUFFIXES), "image", False)
        if img is None:
            gz = self._one(
                slide, lambda n: n.endswith(tuple(s + ".gz" for s in _IMAGE_SUFFIXES)), "image", False
            )
            if gz is not None:
                raise DataError(
                    "the H&E image is still gzipped; run `gunzip` on it once",
                    file=gz,
                    slide=slide,
                    field="image",
                )
        return img

    def patient_of(self, slide: str) -> str:
        m = re.match(r"^(P\d+)_", slide)
        return m.group(1) if m else slide

    def slide_files(self, slide: str) -> list[Path]:
        img = self.image_file(slide)
        return [self.counts_file(slide), self.selection_file(slide)] + ([img] if img else [])

    # ---- reading -------------------------------------------------------------------------
    def read_slide(self, slide: str) -> Slide:
        cfile = self.counts_file(slide)
        sfile = self.selection_file(slide)
        counts, gene_ids = read_st_counts(cfile, slide)
        sel = read_selection(sfile, slide)
        if "selected" in sel.columns:
            sel = sel[sel["selected"].astype(float) == 1]
        ids = sel["x"].round().astype(int).astype(str) + "x" + sel["y"].round().astype(int).astype(str)
        sel = sel.set_index(ids)
        if not sel.index.is_unique:
            dup = sel.index[sel.index.duplicated()].unique()[:5].tolist()
            raise DataError(f"duplicate spots {dup}", file=sfile, slide=slide, field="x,y")
        common = [s for s in counts.index if s in sel.index]
        if not common:
            raise DataError(
                "no spot has both counts and a selected coordinate", file=sfile, slide=slide, field="x,y"
            )
        counts, sel = counts.loc[common], sel.loc[common]
        xy = sel[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
        obs = {"array_x": sel["x"].round().to_numpy(int), "array_y": sel["y"].round().to_numpy(int)}
        adata = make_adata(counts.to_numpy(dtype=np.float32), common, list(counts.columns), xy, obs)
        adata.var["gene_id"] = [gene_ids.get(g, "") for g in counts.columns]
        spacing = float(self.options.get("spot_spacing_um", SPOT_SPACING_UM))
        img = self.image_file(slide)
        return Slide(
            name=slide,
            patient=self.patient_of(slide),
            adata=adata,
            image=SlideImage(img) if img else None,
            mpp=grid_mpp(sel, spacing),
            spot_diameter_um=float(self.options.get("spot_diameter_um", SPOT_DIAMETER_UM)),
            platform="st",
            source=str(cfile),
            meta={"selection_file": str(sfile), "spot_spacing_um": spacing},
        )


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.name.endswith(".gz") else open(path)


def split_gene_name(name: str) -> tuple[str, str]:
    """(symbol, gene id) of a counts column: 'ENSG..._SYM' / 'SYM_ENSG...' / 'ENSG...' / 'SYM'."""
    name = name.strip()
    if _ENSG_RE.match(name):
        return name, name
    for sep in ("_", "|", " "):
        if sep in name:
            a, b = name.split(sep, 1)
            if _ENSG_RE.match(a) and b:
                return b, a
            if _ENSG_RE.match(b) and a:
                return a, b
    return name, ""


def read_st_counts(path: Path, slide: str) -> tuple[pd.DataFrame, dict[str, str]]:
    """ST-pipeline counts (spots x genes) via the shared fast parser. The header is also read on
    its own so a pandas fallback can never rename duplicate genes ("A", "A.1"); they are summed."""
    try:
        with _open_text(path) as fh:
            header = fh.readline().rstrip("\n\r").split("\t")
        df = read_count_table(path)
    except Exception as exc:
        raise DataError(f"cannot parse counts table: {exc}", file=path, slide=slide, field="counts") from exc
    genes = header[1:]
    if df.shape[0] == 0 or len(genes) == 0:
        raise DataError("counts table has no spots or no genes", file=path, slide=slide, field="counts")
    if df.shape[1] != len(genes):
        raise DataError(
            f"header names {len(genes)} genes but rows have {df.shape[1]} values",
            file=path,
            slide=slide,
            field="counts",
        )
    df.columns = pd.Index(genes)
    df.index = df.index.astype(str)
    if not df.index.is_unique:
        dup = df.index[df.index.duplicated()].unique()[:5].tolist()
        raise DataError(f"duplicate spot ids {dup}", file=path, slide=slide, field="spot id")
    non_numeric = [g for i, g in enumerate(genes) if not pd.api.types.is_numeric_dtype(df.iloc[:, i])]
    if non_numeric:
        raise DataError(
            f"non-numeric count columns {non_numeric[:5]}", file=path, slide=slide, field="counts"
        )
    values = df.to_numpy(dtype=np.float64)
    if np.isnan(values).any() or (values < 0).any():
        rows = df.index[(np.isnan(values) | (values < 0)).any(axis=1)][:5].tolist()
        raise DataError(f"NaN or negative counts at spots {rows}", file=path, slide=slide, field="counts")
    split = [split_gene_name(g) for g in genes]
    symbols = [s for s, _ in split]
    out = pd.DataFrame(values, index=df.index, columns=symbols)
    if not out.columns.is_unique:
        out = out.T.groupby(level=0, sort=False).sum().T
    ids: dict[str, str] = {}
    for s, i in split:
        if i and s not in ids:
            ids[s] = i
    return out, ids
