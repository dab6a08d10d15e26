"""10x Xenium, Xenium Onboard Analysis output folder ("outs"), one per slide.

    cell_feature_matrix.h5              10x HDF5 counts (cells x features); only "Gene Expression"
                                        features are kept (negative-control probes/codewords, blank
                                        and unassigned codewords are dropped)
    cells.parquet | cells.csv.gz        cell_id, x_centroid, y_centroid (um), transcript_counts, ...
    transcripts.parquet | .csv.gz       one row per decoded transcript (see `read_transcripts`)
    morphology_focus.ome.tif | morphology_focus/morphology_focus_0000.ome.tif | morphology_mip.ome.tif
                                        DAPI, level 0 at 0.2125 um/px (`pixel_size` of experiment.xenium)
    experiment.xenium                   optional JSON; its `pixel_size` overrides 0.2125
    <any>.tif/.jpg + *alignment*.csv    optional post-Xenium H&E and its 3x3 affine (10x
                                        "imagealignment.csv"): H&E pixel -> morphology pixel

The dataset root is a folder with one Xenium output per sub-folder (slide id = sub-folder
name), or a single output folder (slide id = its name).

A slide is cell-level: obs = cells (ids as strings), X = counts of the matrix, obsm["spatial"] =
cell centroid in pixels of the slide image. With an H&E (found in the slide folder or given by
option) the centroid goes um -> morphology px (/ mpp) -> H&E px (inverse alignment) and mpp is
option `he_mpp` or, by default, measured from the alignment's scale (morphology mpp x sqrt|det|).
Without one, the DAPI morphology image is the slide image and coordinates are um / 0.2125.
meta["um_to_px"] is the 3x3 affine from Xenium microns to slide-image pixels, so transcripts
(`read_transcripts`, in um) land on the same image. spot_diameter_um is None: cells are not
capture spots (pseudo-bulk tiles set their own side later).

The patient is read from an optional `<root>/patients.csv` (slide,patient), else the slide id.

Options (a plain value applies to every slide, a dict maps slide -> value): he_image, alignment,
he_mpp, use_he (default True), morphology ("focus" | "mip"), morphology_mpp,
morphology_origin_um ((x, y) um at the image's top-left corner; (0, 0) for real outputs; set it for
crops whose image was cut out of the full one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stbench.data.image import SlideImage
from stbench.data.readers.base import SlideReader, register_reader
from stbench.data.readers.visium import read_10x_h5, read_patient_map
from stbench.data.slide import Slide, make_adata
from stbench.errors import DataError

MORPHOLOGY_MPP = 0.2125
CONTROL_PREFIXES = ("NegControl", "BLANK", "Unassigned", "DeprecatedCodeword", "Intergenic")
UNASSIGNED = "UNASSIGNED"
_MARKERS = (
    "cell_feature_matrix.h5",
    "cells.parquet",
    "cells.csv.gz",
    "transcripts.parquet",
    "transcripts.csv.gz",
    "experiment.xenium",
)
_IMAGE_SUFFIXES = (".tif", ".tiff", ".btf", ".jpg", ".jpeg", ".png", ".svs")
_MORPHOLOGY = {
    "focus": ("morphology_focus.ome.tif", "morphology_focus/morphology_focus_0000.ome.tif"),
    "mip": ("morphology_mip.ome.tif",),
}


def is_xenium_outs(d: Path) -> bool:
    return d.is_dir() and any((d / m).exists() for m in _MARKERS)


def first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).exists()), None)


# ---- transcripts --------------------------------------------------------------------------------
def read_transcripts(root: str | Path, qv_min: float = 20.0) -> pd.DataFrame:
    """Decoded gene transcripts of one Xenium output folder, controls removed.

    Columns feature_name, x_um, y_um, cell_id ("UNASSIGNED" when in no cell, whatever the XOA
    version wrote: -1, "UNASSIGNED" or empty), qv, overlaps_nucleus (bool); feature_name and
    cell_id are pandas categoricals of strings (10^8 rows fit in memory). Keeps qv >= qv_min
    (10x's own threshold for the cell matrix is 20) and drops every feature whose name starts with
    one of CONTROL_PREFIXES (negative controls, blank/unassigned/deprecated codewords, intergenic).
    """
    root = Path(root)
    path = first_existing(root, ("transcripts.parquet", "transcripts.csv.gz", "transcripts.csv"))
    if path is None:
        raise DataError(
            "required file is missing",
            file=root / "transcripts.parquet",
            slide=root.name,
            field="transcripts",
        )
    want = ["feature_name", "x_location", "y_location", "cell_id", "qv", "overlaps_nucleus"]
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.ParquetFile(path).schema_arrow.names
            cols = [c for c in want + ["is_gene"] if c in names]
            dict_cols = [c for c in ("feature_name", "cell_id") if c in cols]  # -> categoricals
            df = pq.read_table(path, columns=cols, read_dictionary=dict_cols).to_pandas()
        else:
            df = pd.read_csv(path)
    except Exception as exc:
        raise DataError(
            f"cannot read transcripts: {exc}", file=path, slide=root.name, field="transcripts"
        ) from exc
    missing = [c for c in want if c not in df.columns]
    if missing:
        raise DataError(
            f"transcripts lack columns {missing}", file=path, slide=root.name, field=",".join(missing)
        )
    qv = df["qv"].to_numpy(np.float64)
    feature = _categorical_str(df["feature_name"])
    control = np.array([str(c).startswith(CONTROL_PREFIXES) for c in feature.cat.categories], dtype=bool)
    codes = feature.cat.codes.to_numpy()
    keep = ~control[codes] & (qv >= qv_min)
    if "is_gene" in df.columns:
        keep &= df["is_gene"].astype(bool).to_numpy()
    cell = _categorical_str(df["cell_id"])
    unassigned = [c for c in cell.cat.categories if c in _UNASSIGNED_VALUES]
    if unassigned:
        cell = cell.cat.add_categories([UNASSIGNED]) if UNASSIGNED not in cell.cat.categories else cell
        cell = cell.where(~cell.isin(unassigned), UNASSIGNED).cat.remove_unused_categories()
    out = pd.DataFrame(
        {
            "feature_name": feature[keep].cat.remove_unused_categories().array,
            "x_um": df["x_location"].to_numpy(np.float64)[keep],
            "y_um": df["y_location"].to_numpy(np.float64)[keep],
            "cell_id": cell[keep].cat.remove_unused_categories().array,
            "qv": qv[keep],
            "overlaps_nucleus": df["overlaps_nucleus"].astype(bool).to_numpy()[keep],
        }
    )
    return out


_UNASSIGNED_VALUES = {"-1", "", "UNASSIGNED", "nan", "None"}


def _as_str(s: pd.Series) -> pd.Series:
    """Strings from str / bytes (older XOA parquet stores names as binary) / int columns."""
    return s.map(lambda v: v.decode() if isinstance(v, bytes) else str(v)).astype(str)


def _categorical_str(s: pd.Series) -> pd.Series:
    """A categorical of strings, decoding only the distinct values (transcript tables have 10^7-10^8
    rows but a few hundred genes / 10^5 cells): str, bytes, ints and categoricals alike."""
    codes, uniques = pd.factorize(s, use_na_sentinel=False)
    labels = [v.decode() if isinstance(v, bytes) else str(v) for v in uniques]
    # distinct raw values may decode to the same string (b"A" and "A"); merge them
    merged, inverse = np.unique(np.array(labels, dtype=object), return_inverse=True)
    return pd.Series(pd.Categorical.from_codes(inverse[codes], categories=list(merged)), index=s.index)


# ---- reader ---------------------------------------------------------------------------------
@register_reader
class XeniumReader(SlideReader):
    format = "xenium"
    platform = "xenium"

    def _opt(self, key: str, slide: str, default: Any = None) -> Any:
        v = self.options.get(key, default)
        if isinstance(v, dict):
            return v.get(slide, default)
        return v

    def list_slides(self) -> list[str]:
        if is_xenium_outs(self.root):
            return [self.root.name]
        ids = sorted(d.name for d in self.root.iterdir() if is_xenium_outs(d))
        if not ids:
            raise DataError(
                "no Xenium output folder (cells.parquet / cell_feature_matrix.h5) under the root",
                file=self.root,
                field="root",
            )
        return ids

    def slide_dir(self, slide: str) -> Path:
        return self.root if is_xenium_outs(self.root) and slide == self.root.name else self.root / slide

    def matrix_file(self, slide: str) -> Path:
        return self.slide_dir(slide) / "cell_feature_matrix.h5"

    def cells_file(self, slide: str) -> Path:
        d = self.slide_dir(slide)
        return first_existing(d, ("cells.parquet", "cells.csv.gz", "cells.csv")) or d / "cells.parquet"

    def morphology_file(self, slide: str) -> Path | None:
        kind = self._opt("morphology", slide, "focus")
        if kind not in _MORPHOLOGY:
            raise DataError(
                f"option morphology must be one of {sorted(_MORPHOLOGY)}", slide=slide, field="morphology"
            )
        d = self.slide_dir(slide)
        return first_existing(d, _MORPHOLOGY[kind]) or first_existing(d, ("morphology.ome.tif",))

    def he_image_file(self, slide: str) -> Path | None:
        if not self._opt("use_he", slide, True):
            return None
        given = self._opt("he_image", slide)
        if given:
            return self._require(self._resolve(given, slide), slide, "he_image")
        d = self.slide_dir(slide)
        cands = sorted(
            p
            for p in d.iterdir()
            if p.is_file()
            and p.name.lower().endswith(_IMAGE_SUFFIXES)
            and not p.name.lower().startswith("morphology")
        )
        if len(cands) > 1:
            raise DataError(
                f"several candidate H&E images {[p.name for p in cands]}; set option he_image",
                file=d,
                slide=slide,
                field="he_image",
            )
        return cands[0] if cands else None

    def alignment_file(self, slide: str) -> Path | None:
        given = self._opt("alignment", slide)
        if given:
            return self._require(self._resolve(given, slide), slide, "alignment")
        d = self.slide_dir(slide)
        cands = sorted(p for p in d.glob("*alignment*.csv") if p.is_file())
        if len(cands) > 1:
            raise DataError(
                f"several alignment files {[p.name for p in cands]}; set option alignment",
                file=d,
                slide=slide,
                field="alignment",
            )
        return cands[0] if cands else None

    def _resolve(self, p: str | Path, slide: str) -> Path:
        p = Path(p)
        if p.is_absolute():
            return p
        return (self.slide_dir(slide) / p) if (self.slide_dir(slide) / p).exists() else self.root / p

    def morphology_mpp(self, slide: str) -> float:
        given = self._opt("morphology_mpp", slide)
        if given:
            return float(given)
        exp = self.slide_dir(slide) / "experiment.xenium"
        if exp.exists():
            try:
                return float(json.loads(exp.read_text()).get("pixel_size", MORPHOLOGY_MPP))
            except Exception as exc:
                raise DataError(
                    f"cannot parse experiment.xenium: {exc}", file=exp, slide=slide, field="pixel_size"
                ) from exc
        return MORPHOLOGY_MPP

    def slide_record(self, slide: str) -> dict[str, str]:
        """The slide's patients.csv entry, when there is one: part of its cache key."""
        patient = read_patient_map(self.root).get(slide)
        return {"patient": patient} if patient else {}

    def slide_files(self, slide: str) -> list[Path]:
        files = [self.matrix_file(slide), self.cells_file(slide)]
        tx = first_existing(self.slide_dir(slide), ("transcripts.parquet", "transcripts.csv.gz"))
        # transcripts feed pseudo-bulk tiles, so a changed file must invalidate cached tiles
        for p in (self.he_image_file(slide), self.alignment_file(slide), self.morphology_file(slide), tx):
            if p is not None:
                files.append(p)
        return files

    def transcripts(self, slide: str, qv_min: float = 20.0) -> pd.DataFrame:
        return read_transcripts(self.slide_dir(slide), qv_min=qv_min)

    def read_slide(self, slide: str) -> Slide:
        if not self.slide_dir(slide).is_dir():
            raise DataError("slide folder not found", file=self.slide_dir(slide), slide=slide, field="slide")
        mfile = self._require(self.matrix_file(slide), slide, "cell_feature_matrix.h5")
        cfile = self._require(self.cells_file(slide), slide, "cells.parquet")
        counts, barcodes, var = read_10x_h5(mfile, slide)
        cells = read_cells(cfile, slide)
        missing = [b for b in barcodes if b not in cells.index]
        if missing:
            raise DataError(
                f"{len(missing)} matrix cells missing from the cells table, e.g. {missing[:3]}",
                file=cfile,
                slide=slide,
                field="cell_id",
            )
        cells = cells.loc[barcodes]
        xy_um = cells[["x_centroid", "y_centroid"]].to_numpy(np.float64)

        m_mpp = self.morphology_mpp(slide)
        ox, oy = (float(v) for v in self._opt("morphology_origin_um", slide, (0.0, 0.0)))
        um_to_morph = np.array([[1 / m_mpp, 0, -ox / m_mpp], [0, 1 / m_mpp, -oy / m_mpp], [0, 0, 1]])
        he = self.he_image_file(slide)
        meta: dict[str, Any] = {"cells_file": str(cfile), "morphology_mpp": m_mpp}
        if he is not None:
            afile = self.alignment_file(slide)
            if afile is None:
                raise DataError(
                    "H&E image present but no alignment CSV (3x3 H&E px -> morphology px); "
                    "set option alignment, or use_he=False",
                    file=he,
                    slide=slide,
                    field="alignment",
                )
            he_to_morph = read_alignment(afile, slide)
            um_to_px = np.linalg.inv(he_to_morph) @ um_to_morph
            he_mpp = self._opt("he_mpp", slide)
            mpp = float(he_mpp) if he_mpp else m_mpp * float(np.sqrt(abs(np.linalg.det(he_to_morph[:2, :2]))))
            image: Path | None = he
            meta.update(coordinate_system="he", alignment_file=str(afile))
        else:
            um_to_px, mpp, image = um_to_morph, m_mpp, self.morphology_file(slide)
            meta["coordinate_system"] = "morphology"
        xy = apply_affine(um_to_px, xy_um)
        meta["um_to_px"] = um_to_px.tolist()
        tfile = first_existing(self.slide_dir(slide), ("transcripts.parquet", "transcripts.csv.gz"))
        if tfile is not None:
            meta["transcripts_file"] = str(tfile)
        obs = {"x_um": xy_um[:, 0], "y_um": xy_um[:, 1]}
        for c in ("transcript_counts", "total_counts", "cell_area", "nucleus_area"):
            if c in cells.columns:
                obs[c] = cells[c].to_numpy()
        adata = make_adata(counts, barcodes, list(var.index), xy, obs)
        adata.var["gene_id"] = var["gene_id"].to_numpy()
        return Slide(
            name=slide,
            patient=read_patient_map(self.root).get(slide, slide),
            adata=adata,
            image=SlideImage(image) if image is not None else None,
            mpp=mpp,
            spot_diameter_um=None,
            platform="xenium",
            source=str(mfile),
            meta=meta,
        )


def read_cells(path: Path, slide: str | None = None) -> pd.DataFrame:
    """cells.parquet / cells.csv.gz indexed by cell_id as str (older XOA: integer ids)."""
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as exc:
        raise DataError(f"cannot read cells table: {exc}", file=path, slide=slide, field="cells") from exc
    missing = [c for c in ("cell_id", "x_centroid", "y_centroid") if c not in df.columns]
    if missing:
        raise DataError(
            f"cells table lacks columns {missing}", file=path, slide=slide, field=",".join(missing)
        )
    df.index = pd.Index(_as_str(df["cell_id"]), name="cell_id")
    if not df.index.is_unique:
        dup = df.index[df.index.duplicated()].unique()[:3].tolist()
        raise DataError(f"duplicate cell ids {dup}", file=path, slide=slide, field="cell_id")
    if df[["x_centroid", "y_centroid"]].isna().any(axis=None):
        raise DataError("empty cell centroids", file=path, slide=slide, field="x_centroid,y_centroid")
    return df


def read_alignment(path: Path, slide: str | None = None) -> np.ndarray:
    """The 3x3 affine of a 10x image-alignment CSV (no header), H&E px -> morphology px."""
    try:
        m = np.loadtxt(path, delimiter=",", dtype=np.float64)
    except Exception as exc:
        raise DataError(
            f"alignment must be a 3x3 numeric matrix (keypoint CSVs are not supported): {exc}",
            file=path,
            slide=slide,
            field="alignment",
        ) from exc
    if m.shape != (3, 3) or not np.isfinite(m).all() or abs(np.linalg.det(m)) < 1e-12:
        raise DataError(
            f"alignment must be an invertible 3x3 matrix, got shape {m.shape}",
            file=path,
            slide=slide,
            field="alignment",
        )
    return m


def apply_affine(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    h = np.column_stack([xy, np.ones(len(xy))]) @ np.asarray(m, dtype=np.float64).T
    return h[:, :2] / h[:, 2:3]
