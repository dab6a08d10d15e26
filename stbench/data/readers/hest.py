"""HEST-1k (Jaume et al., NeurIPS 2024), layout of the Hugging Face dataset MahmoodLab/hest.

    st/<id>.h5ad          AnnData: raw counts in X, obsm["spatial"] = full-resolution pixel (x, y)
    wsis/<id>.tif         pyramidal TIFF of the H&E (optional here; level 0 = full resolution)
    patches/<id>.h5       img (N, 224, 224, 3) uint8 at 0.5 um/px, coords (N, 2) = level-0 top-left
                          corner of each patch, barcode (N, 1); recorded in meta["hest_patches"]
    metadata/<id>.json    pixel_size_um_estimated, pixel_size_um_embedded, spot_diameter and
                          inter_spot_dist (um), st_technology, patient, dataset_title, organ, ...
    transcripts/<id>_transcripts.parquet   Xenium samples only; recorded in meta["hest_transcripts"];
                          pseudo-bulk tiling sums its rows by he_x/he_y (WSI pixels after HEST's
                          non-rigid registration), see stbench/data/pseudobulk.py

HEST-Bench task folders (bench_data/<TASK>/adata/<id>.h5ad + patches/, no metadata, no WSI) read
too: `adata/` stands in for `st/`, and mpp/patient fall back to None/the sample id.

mpp = pixel_size_um_estimated (HEST's own measurement from the spot grid), else
pixel_size_um_embedded (the scanner's value). HEST's `patient` ("Patient 1") is only unique within
one source study, so the patient id is "<dataset_title> / <patient>" (raw value in
meta["patient_raw"]); a sample without a patient is its own patient.

Options: counts_layer=<name> (counts from a layer instead of X); ids=[...] (read only these
samples of a full HEST-1k download); allow_non_integer=True (fractional counts). Counts must be
whole numbers, and values that look normalised or log-transformed are refused
(stbench.data.readers.counts_check) unless the card declares `counts="normalized"`.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

from stbench.data.image import SlideImage
from stbench.data.readers.base import SlideReader, register_reader
from stbench.data.readers.counts_check import check_counts
from stbench.data.readers.visium import make_unique
from stbench.data.slide import Slide, make_adata
from stbench.errors import DataError

TECHNOLOGY_TO_PLATFORM = {
    "visium": "visium",
    "visium hd": "visium-hd",
    "xenium": "xenium",
    "spatial transcriptomics": "st",
}


@register_reader
class HestReader(SlideReader):
    format = "hest"
    platform = "other"

    @property
    def st_dir(self) -> Path:
        st = self.root / "st"
        return st if st.is_dir() or not (self.root / "adata").is_dir() else self.root / "adata"

    def h5ad_file(self, slide: str) -> Path:
        return self.st_dir / f"{slide}.h5ad"

    def wsi_file(self, slide: str) -> Path | None:
        for suffix in (".tif", ".tiff", ".btf"):
            p = self.root / "wsis" / f"{slide}{suffix}"
            if p.exists():
                return p
        return None

    def patches_file(self, slide: str) -> Path:
        return self.root / "patches" / f"{slide}.h5"

    def metadata_file(self, slide: str) -> Path:
        return self.root / "metadata" / f"{slide}.json"

    def transcripts_file(self, slide: str) -> Path:
        return self.root / "transcripts" / f"{slide}_transcripts.parquet"

    def list_slides(self) -> list[str]:
        if not self.st_dir.is_dir():
            raise DataError(
                "HEST folder st/ (or HEST-Bench adata/) is missing", file=self.root / "st", field="st"
            )
        ids = sorted(p.name[: -len(".h5ad")] for p in self.st_dir.glob("*.h5ad"))
        wanted = self.options.get("ids")
        if wanted:  # a named subset of the 1,000+ samples (e.g. one organ's Xenium sections)
            missing = [i for i in wanted if i not in ids]
            if missing:
                raise DataError(
                    f"samples {missing[:5]} not in st/", file=self.st_dir, slide=missing[0], field="ids"
                )
            ids = sorted(wanted)
        if not ids:
            raise DataError("no <id>.h5ad in the HEST st/ folder", file=self.st_dir, field="st")
        return ids

    def slide_files(self, slide: str) -> list[Path]:
        files = [self.h5ad_file(slide)]
        # transcripts (Xenium samples) feed pseudo-bulk tiles: checksummed so changes invalidate them
        for p in (
            self.wsi_file(slide),
            self.metadata_file(slide),
            self.patches_file(slide),
            self.transcripts_file(slide),
        ):
            if p is not None and p.exists():
                files.append(p)
        return files

    def metadata(self, slide: str) -> dict[str, Any]:
        path = self.metadata_file(slide)
        if not path.exists():
            return {}
        try:
            meta = json.loads(path.read_text())
        except Exception as exc:
            raise DataError(
                f"cannot parse metadata JSON: {exc}", file=path, slide=slide, field="metadata"
            ) from exc
        if not isinstance(meta, dict):
            raise DataError("metadata JSON is not an object", file=path, slide=slide, field="metadata")
        return meta

    def read_slide(self, slide: str) -> Slide:
        path = self._require(self.h5ad_file(slide), slide, "st/<id>.h5ad")
        try:
            with warnings.catch_warnings():  # repeated gene symbols are made unique below
                warnings.filterwarnings("ignore", message="Variable names are not unique")
                src = ad.read_h5ad(path)
        except Exception as exc:
            raise DataError(f"cannot read h5ad: {exc}", file=path, slide=slide, field="h5ad") from exc
        layer = self.options.get("counts_layer")
        counts = _counts(src, layer, path, slide)
        check_counts(
            counts,
            file=path,
            slide=slide,
            field=f"layers/{layer}" if layer else "X",
            declared=self.options.get("counts", "raw"),
            allow_non_integer=bool(self.options.get("allow_non_integer", False)),
        )
        if "spatial" not in src.obsm:
            raise DataError(
                "no spot coordinates (obsm['spatial'])", file=path, slide=slide, field="obsm/spatial"
            )
        xy = np.asarray(src.obsm["spatial"], dtype=np.float64)[:, :2]
        obs = {c: src.obs[c].to_numpy() for c in src.obs.columns if c not in ("slide", "patient")}
        adata = make_adata(counts, list(src.obs_names), make_unique([str(g) for g in src.var_names]), xy, obs)
        meta = self.metadata(slide)
        mpp = _number(meta.get("pixel_size_um_estimated")) or _number(meta.get("pixel_size_um_embedded"))
        tech = str(meta.get("st_technology") or "").strip().lower()
        extra: dict[str, Any] = {"hest_metadata": meta, "patient_raw": meta.get("patient")}
        if self.patches_file(slide).exists():
            extra["hest_patches"] = str(self.patches_file(slide))
        if self.transcripts_file(slide).exists():
            extra["hest_transcripts"] = str(self.transcripts_file(slide))
        inter = _number(meta.get("inter_spot_dist"))
        if inter:
            extra["spot_spacing_um"] = inter
        wsi = self.wsi_file(slide)
        return Slide(
            name=slide,
            patient=self.patient_of(slide, meta),
            adata=adata,
            image=SlideImage(wsi) if wsi else None,
            mpp=mpp,
            spot_diameter_um=_number(meta.get("spot_diameter")),
            platform=TECHNOLOGY_TO_PLATFORM.get(tech, "other"),
            source=str(path),
            meta=extra,
        )

    def patient_of(self, slide: str, meta: dict[str, Any]) -> str:
        patient = str(meta.get("patient") or "").strip()
        if not patient or patient.lower() == "nan":
            return slide
        title = str(meta.get("dataset_title") or "").strip()
        return f"{title} / {patient}" if title else patient


def _number(v: Any) -> float | None:
    """A positive finite float, else None (HEST uses null/NaN/"" for unknown values)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _counts(src: ad.AnnData, layer: str | None, path: Path, slide: str) -> sp.csr_matrix:
    if layer:
        if layer not in src.layers:
            raise DataError(
                f"no layer {layer!r} (layers: {list(src.layers)})",
                file=path,
                slide=slide,
                field=f"layers/{layer}",
            )
        x = src.layers[layer]
    else:
        x = src.X
    if x is None:
        raise DataError("h5ad has no X matrix", file=path, slide=slide, field="X")
    return sp.csr_matrix(x, dtype=np.float32)
