"""10x Visium, Space Ranger `outs/` layout, one folder per slide.

    <root>/<slide>/outs/filtered_feature_bc_matrix.h5     10x HDF5 counts (barcodes x features)
    <root>/<slide>/outs/spatial/tissue_positions.csv      Space Ranger >= 2.0 (with header)
    <root>/<slide>/outs/spatial/tissue_positions_list.csv Space Ranger < 2.0 (no header)
    <root>/<slide>/outs/spatial/scalefactors_json.json    spot_diameter_fullres, tissue_*_scalef
    <root>/<slide>/<image>.tif|.tiff|.jpg                 full-resolution H&E (the Space Ranger input)
    <root>/patients.csv                                   optional: slide,patient

A slide folder may also be an outs folder itself. Positions have the columns barcode, in_tissue,
array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres; note x = pxl_col, y = pxl_row.
Only "Gene Expression" features are kept (antibody capture etc. dropped); var_names are gene
symbols made unique the scanpy way (a repeated symbol gets "-1", "-2", ...), Ensembl ids in
var["gene_id"]. The pixel scale comes from the spot: Visium spots are 55 um across, so
mpp = 55 / spot_diameter_fullres. The image is the largest image file in the slide folder (or
outs/, never spatial/, which holds only downscaled copies) unless option `images` maps the slide
to a path (relative to the root or absolute).

Options: images={slide: path}, mpp=<float> (overrides the scalefactors estimate).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from stbench.data.image import SlideImage
from stbench.data.readers.base import SlideReader, register_reader
from stbench.data.slide import Slide, make_adata
from stbench.errors import DataError

SPOT_DIAMETER_UM = 55.0
SPOT_SPACING_UM = 100.0
MATRIX_FILE = "filtered_feature_bc_matrix.h5"
IMAGE_SUFFIXES = (".tif", ".tiff", ".btf", ".jpg", ".jpeg", ".png", ".svs")
_POSITION_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]


# ---- 10x HDF5 (shared with the Xenium reader) ------------------------------------------------
def read_10x_h5(
    path: Path, slide: str | None = None, feature_type: str | None = "Gene Expression"
) -> tuple[sp.csr_matrix, list[str], pd.DataFrame]:
    """Read a 10x feature-barcode HDF5 (v3 layout, group `matrix`).

    Returns (counts as CSR barcodes x features, barcodes, var DataFrame indexed by unique gene
    symbol with columns gene_id, feature_type). `feature_type=None` keeps every feature.
    """
    try:
        with h5py.File(path, "r") as f:
            if "matrix" not in f:
                raise DataError(
                    "not a 10x v3 HDF5 matrix (no 'matrix' group)", file=path, slide=slide, field="matrix"
                )
            g = f["matrix"]
            for key in ("data", "indices", "indptr", "shape", "barcodes", "features"):
                if key not in g:
                    raise DataError(
                        f"10x HDF5 lacks matrix/{key}", file=path, slide=slide, field=f"matrix/{key}"
                    )
            n_feat, n_bc = (int(v) for v in g["shape"][:])
            mat = sp.csc_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=(n_feat, n_bc))
            barcodes = _decode(g["barcodes"][:])
            feats = g["features"]
            if "name" not in feats:
                raise DataError(
                    "10x HDF5 lacks matrix/features/name",
                    file=path,
                    slide=slide,
                    field="matrix/features/name",
                )
            names = _decode(feats["name"][:])
            ids = _decode(feats["id"][:]) if "id" in feats else list(names)
            types = (
                _decode(feats["feature_type"][:]) if "feature_type" in feats else ["Gene Expression"] * n_feat
            )
    except DataError:
        raise
    except Exception as exc:  # truncated file, not HDF5
        raise DataError(f"cannot read 10x HDF5: {exc}", file=path, slide=slide, field="matrix") from exc
    keep = (
        np.ones(n_feat, dtype=bool) if feature_type is None else np.array([t == feature_type for t in types])
    )
    if not keep.any():
        raise DataError(
            f"no features of type {feature_type!r}",
            file=path,
            slide=slide,
            field="matrix/features/feature_type",
        )
    counts = mat.T.tocsr()[:, np.where(keep)[0]]
    var = pd.DataFrame(
        {"gene_id": np.array(ids, dtype=object)[keep], "feature_type": np.array(types, dtype=object)[keep]},
        index=pd.Index(make_unique([n for n, k in zip(names, keep, strict=True) if k]), name="gene"),
    )
    return counts.astype(np.float32), barcodes, var


def make_unique(names: list[str]) -> list[str]:
    """Scanpy's `var_names_make_unique` rule: the 2nd, 3rd ... occurrence get "-1", "-2" ...."""
    seen: dict[str, int] = {}
    taken = set(names)
    out = []
    for n in names:
        if n not in seen:
            seen[n] = 0
            out.append(n)
            continue
        k = seen[n]
        while True:
            k += 1
            cand = f"{n}-{k}"
            if cand not in taken:
                break
        seen[n] = k
        taken.add(cand)
        out.append(cand)
    return out


def _decode(arr: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(arr).ravel()]


def find_largest_image(folders: list[Path]) -> Path | None:
    """Largest image file directly inside any of `folders` (the full-resolution one)."""
    cands = [
        p
        for d in folders
        if d.is_dir()
        for p in d.iterdir()
        if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
    ]
    return max(cands, key=lambda p: (p.stat().st_size, p.name)) if cands else None


# ---- reader ---------------------------------------------------------------------------------
@register_reader
class VisiumReader(SlideReader):
    format = "visium"
    platform = "visium"

    def slide_dir(self, slide: str) -> Path:
        return self.root if self._root_is_slide() else self.root / slide

    def outs_dir(self, slide: str) -> Path:
        d = self.slide_dir(slide)
        return d / "outs" if (d / "outs").is_dir() else d

    def _root_is_slide(self) -> bool:
        return _is_outs(self.root) or _is_outs(self.root / "outs")

    def list_slides(self) -> list[str]:
        if self._root_is_slide():
            return [self.root.parent.name if self.root.name == "outs" else self.root.name]
        ids = [d.name for d in self.root.iterdir() if d.is_dir() and (_is_outs(d) or _is_outs(d / "outs"))]
        if not ids:
            raise DataError(
                f"no slide folder with outs/{MATRIX_FILE} under the Visium root", file=self.root, field="root"
            )
        return sorted(ids)

    def matrix_file(self, slide: str) -> Path:
        return self.outs_dir(slide) / MATRIX_FILE

    def positions_file(self, slide: str) -> Path:
        spatial = self.outs_dir(slide) / "spatial"
        new = spatial / "tissue_positions.csv"
        return new if new.exists() else spatial / "tissue_positions_list.csv"

    def scalefactors_file(self, slide: str) -> Path:
        return self.outs_dir(slide) / "spatial" / "scalefactors_json.json"

    def image_file(self, slide: str) -> Path | None:
        mapping = self.options.get("images") or {}
        if slide in mapping:
            p = Path(mapping[slide])
            p = p if p.is_absolute() else self.root / p
            return self._require(p, slide, "image")
        d = self.slide_dir(slide)
        return find_largest_image([d, self.outs_dir(slide)] if d != self.outs_dir(slide) else [d])

    def patient_of(self, slide: str) -> str:
        return read_patient_map(self.root).get(slide, slide)

    def slide_record(self, slide: str) -> dict[str, str]:
        """The slide's patients.csv entry, when there is one: part of its cache key."""
        patient = read_patient_map(self.root).get(slide)
        return {"patient": patient} if patient else {}

    def slide_files(self, slide: str) -> list[Path]:
        files = [self.matrix_file(slide), self.positions_file(slide), self.scalefactors_file(slide)]
        img = self.image_file(slide)
        return files + ([img] if img is not None else [])

    def read_slide(self, slide: str) -> Slide:
        if not self.slide_dir(slide).is_dir():
            raise DataError("slide folder not found", file=self.slide_dir(slide), slide=slide, field="slide")
        mfile = self._require(self.matrix_file(slide), slide, MATRIX_FILE)
        pfile = self._require(self.positions_file(slide), slide, "spatial/tissue_positions.csv")
        counts, barcodes, var = read_10x_h5(mfile, slide)
        pos = read_positions(pfile, slide).set_index("barcode")
        missing = [b for b in barcodes if b not in pos.index]
        if missing:
            raise DataError(
                f"{len(missing)} matrix barcodes have no position, e.g. {missing[:3]}",
                file=pfile,
                slide=slide,
                field="barcode",
            )
        pos = pos.loc[barcodes]
        xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
        obs = {c: pos[c].to_numpy(int) for c in ("in_tissue", "array_row", "array_col")}
        adata = make_adata(counts, barcodes, list(var.index), xy, obs)
        adata.var["gene_id"] = var["gene_id"].to_numpy()
        scale = self._scalefactors(slide)
        mpp = self.options.get("mpp")
        if mpp is None:
            diam = scale.get("spot_diameter_fullres")
            if not diam or not np.isfinite(diam) or diam <= 0:
                raise DataError(
                    "spot_diameter_fullres missing or not positive (needed for mpp)",
                    file=self.scalefactors_file(slide),
                    slide=slide,
                    field="spot_diameter_fullres",
                )
            mpp = SPOT_DIAMETER_UM / float(diam)
        img = self.image_file(slide)
        return Slide(
            name=slide,
            patient=self.patient_of(slide),
            adata=adata,
            image=SlideImage(img) if img is not None else None,
            mpp=float(mpp),
            spot_diameter_um=SPOT_DIAMETER_UM,
            platform="visium",
            source=str(mfile),
            meta={"positions_file": str(pfile), "scalefactors": scale},
        )

    def _scalefactors(self, slide: str) -> dict[str, float]:
        path = self.scalefactors_file(slide)
        if not path.exists():
            if self.options.get("mpp") is not None:
                return {}
            raise DataError(
                "required file is missing", file=path, slide=slide, field="scalefactors_json.json"
            )
        try:
            return json.loads(path.read_text())
        except Exception as exc:
            raise DataError(
                f"cannot parse scalefactors: {exc}", file=path, slide=slide, field="scalefactors_json.json"
            ) from exc


def read_patient_map(root: Path) -> dict[str, str]:
    """slide -> patient from an optional `<root>/patients.csv` (columns slide, patient)."""
    path = root / "patients.csv"
    if not path.exists():
        return {}
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise DataError(f"cannot parse patients.csv: {exc}", file=path, field="patients.csv") from exc
    missing = [c for c in ("slide", "patient") if c not in df.columns]
    if missing:
        raise DataError(f"patients.csv lacks columns {missing}", file=path, field=",".join(missing))
    return {s.strip(): p.strip() for s, p in zip(df["slide"], df["patient"], strict=True) if p.strip()}


def _is_outs(d: Path) -> bool:
    return (d / MATRIX_FILE).is_file()


def read_positions(path: Path, slide: str | None = None) -> pd.DataFrame:
    """tissue_positions.csv (header) or tissue_positions_list.csv (no header), same six columns."""
    try:
        with open(path) as fh:
            first = fh.readline()
        has_header = first.split(",")[0].strip() == "barcode"
        df = pd.read_csv(path, header=0 if has_header else None, dtype={0: str} if not has_header else None)
    except Exception as exc:
        raise DataError(
            f"cannot parse tissue positions: {exc}", file=path, slide=slide, field="positions"
        ) from exc
    if not has_header:
        if df.shape[1] != len(_POSITION_COLUMNS):
            raise DataError(
                f"expected {len(_POSITION_COLUMNS)} columns, found {df.shape[1]}",
                file=path,
                slide=slide,
                field="positions",
            )
        df.columns = _POSITION_COLUMNS
    missing = [c for c in _POSITION_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(
            f"tissue positions lack columns {missing}", file=path, slide=slide, field=",".join(missing)
        )
    df["barcode"] = df["barcode"].astype(str)
    if df[["pxl_row_in_fullres", "pxl_col_in_fullres"]].isna().any(axis=None):
        raise DataError("empty pixel coordinates", file=path, slide=slide, field="pxl_row_in_fullres")
    if not df["barcode"].is_unique:
        dup = df["barcode"][df["barcode"].duplicated()].head(3).tolist()
        raise DataError(f"duplicate barcodes {dup}", file=path, slide=slide, field="barcode")
    return df
