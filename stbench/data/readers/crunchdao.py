"""CrunchDAO Autoimmune Disease ML Challenge, Crunch 1 ("Broad-1"): one SpatialData zarr per section.

    <root>/<slide>.zarr/                     SpatialData store (zarr v2 .zgroup/.zattrs or v3 zarr.json)
      images/HE_original/<level>             H&E in its native pixels, (c, y, x) uint8, OME-NGFF multiscales
      images/HE_nuc_original/<level>         nucleus labels on HE_original, (1, y, x) int, value = cell_id
      tables/anucleus                        AnnData: X = log1p-normalised expression of 460 genes,
                                             layers["counts"] = raw counts, obs["cell_id"],
                                             var["gene_symbols"]
      tables/cell_id-group                   AnnData, obs: cell_id, group (train / validation / test)
      images/DAPI, HE_registered, ..., points/transcripts/points.parquet   (full release only)

The "min" release (crunch1_min) ships exactly the four elements above; the full one adds the DAPI,
registered images and the transcripts (x, y, feature_name, qv, cell_id in the Xenium frame).
The layout is read directly with `zarr` and `anndata.read_zarr`, so `spatialdata` is not needed.

A slide is nucleus-level: obs = the table's nuclei (ids = cell_id as str), X = layers["counts"]
(raw; X itself is log1p and never used as counts), obsm["spatial"] = centroid of the nucleus's
label in HE_nuc_original = position on HE_original in pixels (what the organisers' quickstarter
does with skimage regionprops; computed here chunk by chunk), image = HE_original. Nuclei without
a label are dropped and listed in meta["dropped_spots"]. obs["group"] comes from cell_id-group.
Pseudo-bulk tiling of this data uses aggregate="cells": the shipped transcripts live in the
Xenium frame and no transform to HE_original is part of the data.

mpp (um per HE_original pixel): option `mpp`; else from the OME-NGFF coordinate transformations
to the "global" system: HE_original -> global -> DAPI pixel, times the DAPI pixel size (option
dapi_mpp, default Xenium's 0.2125), when the store has a DAPI image; without one the global
system is taken to be the DAPI pixel frame. meta["mpp_source"] says which rule gave it; with no
usable transformation mpp is None (tiling then asks for option mpp).

Patient: CrunchDAO names sections <patient>_<state> (UC1_I and UC1_NI are the inflamed and
non-inflamed tissue of one ulcerative-colitis patient), so the patient id is the name up to the
first "_" (or "-"); `<root>/patients.csv` (slide,patient) overrides it.

Options (plain value or dict slide -> value): table, counts_layer, image, labels, group_table,
positions ("labels" | "obsm": use the table's obsm["spatial"] as HE_original pixels), mpp, dapi_mpp.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from stbench.data.image_regions import ZarrImage, _slice, is_zarr_node, ngff_multiscales, read_json_attrs
from stbench.data.readers.base import SlideReader, register_reader
from stbench.data.readers.visium import make_unique, read_patient_map
from stbench.data.slide import Slide, make_adata
from stbench.errors import DataError

DAPI_MPP = 0.2125
_POSITIONS = ("labels", "obsm")


@register_reader
class CrunchDAOReader(SlideReader):
    format = "crunchdao"
    platform = "xenium"

    def _opt(self, key: str, slide: str, default: Any = None) -> Any:
        v = self.options.get(key, default)
        return v.get(slide, default) if isinstance(v, dict) else v

    def list_slides(self) -> list[str]:
        if self.root.name.endswith(".zarr") and is_zarr_node(self.root):
            return [self.root.name[: -len(".zarr")]]
        ids = sorted(p.name[: -len(".zarr")] for p in self.root.glob("*.zarr") if is_zarr_node(p))
        if not ids:
            raise DataError("no <slide>.zarr SpatialData store under the root", file=self.root, field="root")
        return ids

    def store(self, slide: str) -> Path:
        if self.root.name == f"{slide}.zarr":
            return self.root
        return self.root / f"{slide}.zarr"

    def element(self, slide: str, kind: str, name: str) -> Path:
        return self.store(slide) / kind / name

    def slide_record(self, slide: str) -> dict[str, str]:
        """The slide's patients.csv entry, when there is one: part of its cache key."""
        patient = read_patient_map(self.root).get(slide)
        return {"patient": patient} if patient else {}

    def slide_files(self, slide: str) -> list[Path]:
        """The zarr metadata files of the elements read (chunks are too many to checksum)."""
        out = []
        names = [
            ("tables", self._opt("table", slide, "anucleus")),
            ("tables", self._opt("group_table", slide, "cell_id-group")),
            ("images", self._opt("image", slide, "HE_original")),
            ("images", self._opt("labels", slide, "HE_nuc_original")),
        ]
        for kind, name in names:
            d = self.element(slide, kind, name)
            for m in (".zattrs", "zarr.json", ".zmetadata"):
                if (d / m).exists():
                    out.append(d / m)
        return out

    # ---- reading ---------------------------------------------------------------------------
    def read_slide(self, slide: str) -> Slide:
        store = self.store(slide)
        if not is_zarr_node(store):
            raise DataError("SpatialData store not found", file=store, slide=slide, field="slide")
        table_name = self._opt("table", slide, "anucleus")
        tpath = self._require(self.element(slide, "tables", table_name), slide, f"tables/{table_name}")
        table = _read_table(tpath, slide)
        counts = self._counts(table, tpath, slide)
        symbols = table.var["gene_symbols"] if "gene_symbols" in table.var.columns else table.var_names
        genes = make_unique([str(g) for g in symbols])
        cell_ids = self._cell_ids(table, tpath, slide)
        image_name = self._opt("image", slide, "HE_original")
        ipath = self._require(self.element(slide, "images", image_name), slide, f"images/{image_name}")
        image = ZarrImage(ipath)
        w, h = image.size
        positions = self._opt("positions", slide, "labels")
        if positions not in _POSITIONS:
            raise DataError(f"option positions must be one of {_POSITIONS}", slide=slide, field="positions")
        if positions == "labels":
            lname = self._opt("labels", slide, "HE_nuc_original")
            lpath = self._require(self.element(slide, "images", lname), slide, f"images/{lname}")
            labels = ZarrImage(lpath)
            if labels.size != (w, h):
                raise DataError(
                    f"label image {labels.size} does not match {image_name} {(w, h)}",
                    file=lpath,
                    slide=slide,
                    field=lname,
                )
            xy, found = label_centroids(labels, cell_ids)
        else:
            if "spatial" not in table.obsm:
                raise DataError("table has no obsm['spatial']", file=tpath, slide=slide, field="obsm/spatial")
            xy = np.asarray(table.obsm["spatial"], dtype=np.float64)[:, :2]
            found = np.isfinite(xy).all(axis=1)
        obs: dict[str, Any] = {"cell_id": cell_ids}
        group = self._groups(slide, cell_ids)
        if group is not None:
            obs["group"] = group
        ids = [str(c) for c in cell_ids]
        meta: dict[str, Any] = {"store": str(store), "table": table_name, "positions": positions}
        if not found.all():
            meta["dropped_spots"] = {ids[i]: f"no nucleus label in {positions}" for i in np.where(~found)[0]}
        keep = np.where(found)[0]
        adata = make_adata(
            counts[keep],
            [ids[i] for i in keep],
            genes,
            xy[keep],
            {k: np.asarray(v)[keep] for k, v in obs.items()},
        )
        mpp, source = self._mpp(slide, ipath)
        meta["mpp_source"] = source
        if adata.n_obs == 0:
            raise DataError("no nucleus of the table has a label", file=tpath, slide=slide, field="cell_id")
        return Slide(
            name=slide,
            patient=read_patient_map(self.root).get(slide, patient_of(slide)),
            adata=adata,
            image=image,
            mpp=mpp,
            spot_diameter_um=None,
            platform="xenium",
            source=str(tpath),
            meta=meta,
        )

    def _counts(self, table: ad.AnnData, tpath: Path, slide: str) -> sp.csr_matrix:
        layer = self._opt("counts_layer", slide, "counts")
        if layer == "X":
            x = table.X
        elif layer in table.layers:
            x = table.layers[layer]
        else:
            raise DataError(
                f"no raw-count layer {layer!r} (layers: {list(table.layers)}); X is log1p-normalised, "
                "set counts_layer='X' only if it holds raw counts",
                file=tpath,
                slide=slide,
                field=f"layers/{layer}",
            )
        return sp.csr_matrix(x, dtype=np.float32)

    def _cell_ids(self, table: ad.AnnData, tpath: Path, slide: str) -> np.ndarray:
        attrs = table.uns.get("spatialdata_attrs", {}) if isinstance(table.uns, dict) else {}
        key = attrs.get("instance_key") or "cell_id"
        if key not in table.obs:
            raise DataError(f"table obs lacks the cell id column {key!r}", file=tpath, slide=slide, field=key)
        ids = pd.to_numeric(table.obs[key], errors="coerce").to_numpy()
        if not np.isfinite(ids).all() or (ids <= 0).any() or (ids != np.round(ids)).any():
            raise DataError(
                "cell ids must be positive integers (label values)", file=tpath, slide=slide, field=key
            )
        ids = ids.astype(np.int64)
        if len(np.unique(ids)) != len(ids):
            raise DataError("duplicate cell ids", file=tpath, slide=slide, field=key)
        return ids

    def _groups(self, slide: str, cell_ids: np.ndarray) -> np.ndarray | None:
        gpath = self.element(slide, "tables", self._opt("group_table", slide, "cell_id-group"))
        if not is_zarr_node(gpath):
            return None
        g = _read_table(gpath, slide).obs
        if "cell_id" not in g or "group" not in g:
            return None
        m = dict(zip(pd.to_numeric(g["cell_id"], errors="coerce"), g["group"].astype(str), strict=True))
        return np.array([m.get(int(c), "") for c in cell_ids], dtype=object)

    def _mpp(self, slide: str, ipath: Path) -> tuple[float | None, str]:
        given = self._opt("mpp", slide)
        if given:
            return float(given), "option mpp"
        dapi_mpp = float(self._opt("dapi_mpp", slide, DAPI_MPP))
        t_he = to_global(ipath)
        dapi = self.element(slide, "images", "DAPI")
        if t_he is not None and is_zarr_node(dapi) and (t_dapi := to_global(dapi)) is not None:
            m = np.linalg.inv(t_dapi) @ t_he
            return dapi_mpp * _scale(m), f"HE_original -> global -> DAPI px x {dapi_mpp} um"
        if t_he is not None and not np.allclose(t_he, np.eye(3)):
            return dapi_mpp * _scale(t_he), f"HE_original -> global (taken as DAPI px) x {dapi_mpp} um"
        return None, "unknown: set reader option mpp"


def patient_of(slide: str) -> str:
    """UC1_I and UC1_NI -> UC1 (CrunchDAO's <patient>_<tissue state> names)."""
    return re.split(r"[_-]", slide, maxsplit=1)[0] or slide


def _read_table(path: Path, slide: str) -> ad.AnnData:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ad.read_zarr(str(path))
    except Exception as exc:
        raise DataError(f"cannot read AnnData table: {exc}", file=path, slide=slide, field="table") from exc


def label_centroids(labels: ZarrImage, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean pixel position (x, y) of each label value in `ids` and whether it occurs, reading the
    label image in row bands (a whole-slide label image is 1-4 GB as int32)."""
    arr, axes = labels.open_level(0)
    h, w = int(arr.shape[axes.index("Y")]), int(arr.shape[axes.index("X")])
    order = np.argsort(ids)
    sorted_ids = ids[order]
    n = len(ids)
    sx, sy, cnt = np.zeros(n), np.zeros(n), np.zeros(n)
    chunk = getattr(arr, "chunks", None)
    ch = int(chunk[axes.index("Y")]) if chunk else 1024
    step = max(ch, (1 << 24) // max(w, 1) // ch * ch)
    for y0 in range(0, h, step):
        block = _slice(arr, axes, 0, y0, w, min(h, y0 + step))[..., 0]
        ys, xs = np.nonzero(block)
        if ys.size == 0:
            continue
        lab = block[ys, xs].astype(np.int64)
        pos = np.searchsorted(sorted_ids, lab)
        pos_c = np.minimum(pos, n - 1)
        ok = sorted_ids[pos_c] == lab
        p = pos_c[ok]
        sx += np.bincount(p, weights=xs[ok], minlength=n)
        sy += np.bincount(p, weights=ys[ok] + y0, minlength=n)
        cnt += np.bincount(p, minlength=n)
    found_sorted = cnt > 0
    xy_sorted = np.column_stack([sx, sy]) / np.maximum(cnt, 1)[:, None]
    xy = np.empty((n, 2))
    found = np.empty(n, dtype=bool)
    xy[order], found[order] = xy_sorted, found_sorted
    xy[~found] = np.nan
    return xy, found


# ---- OME-NGFF coordinate transformations (as spatialdata writes them) ------------------------
def to_global(element: Path, system: str = "global") -> np.ndarray | None:
    """3x3 (x, y) affine from an image element's pixels to `system`, None when absent/unparsable."""
    ms = ngff_multiscales(read_json_attrs(element))
    if not ms:
        return None
    for t in ms[0].get("coordinateTransformations", []) or []:
        out = t.get("output")
        if isinstance(out, dict) and out.get("name") == system:
            try:
                return _xy_matrix(t)
            except (KeyError, ValueError, IndexError, TypeError):
                return None
    return None


def _axes(spec: Any) -> list[str]:
    if not isinstance(spec, dict):
        return []
    return [a["name"] if isinstance(a, dict) else str(a) for a in spec.get("axes", [])]


def _xy_matrix(t: dict[str, Any]) -> np.ndarray:
    kind = t.get("type")
    ax_in = _axes(t.get("input")) or None
    ax_out = _axes(t.get("output")) or ax_in
    if kind == "identity":
        return np.eye(3)
    if kind == "sequence":
        m = np.eye(3)
        for sub in t["transformations"]:
            m = _xy_matrix(sub) @ m
        return m
    if kind in ("scale", "translation"):
        v = list(t[kind])
        axes = ax_in or (["c", "y", "x"] if len(v) == 3 else ["y", "x"])
        vx, vy = v[axes.index("x")], v[axes.index("y")]
        if kind == "scale":
            return np.array([[vx, 0, 0], [0, vy, 0], [0, 0, 1]], dtype=np.float64)
        return np.array([[1, 0, vx], [0, 1, vy], [0, 0, 1]], dtype=np.float64)
    if kind == "affine":
        a = np.asarray(t["affine"], dtype=np.float64)
        axes_in = ax_in or ["x", "y"]
        axes_out = ax_out or axes_in
        ix, iy = axes_in.index("x"), axes_in.index("y")
        ox, oy = axes_out.index("x"), axes_out.index("y")
        return np.array(
            [[a[ox, ix], a[ox, iy], a[ox, -1]], [a[oy, ix], a[oy, iy], a[oy, -1]], [0, 0, 1]],
            dtype=np.float64,
        )
    raise ValueError(f"unsupported transformation {kind!r}")


def _scale(m: np.ndarray) -> float:
    return float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
