"""The Slide: one tissue section with its expression, coordinates and lazy image.

Conventions (scanpy/squidpy): `adata.X` holds raw counts (float32, spots x genes), `obs_names`
are spot ids unique within the slide, `obsm["spatial"]` holds full-resolution pixel centres
(x, y) of the slide image, obs columns `slide` and `patient` say where each spot comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

from stbench.data.image import SlideImage
from stbench.errors import DataError

PLATFORMS = ("st", "visium", "visium-hd", "xenium", "xenium-pseudobulk", "synthetic", "other")


@dataclass
class Slide:
    """One tissue section.

    `mpp` is micrometres per pixel of `image` at full resolution (None when there is no image and
    no known scale); `spot_diameter_um` is the capture-area diameter (ST 100, Visium 55; for
    Xenium pseudo-spots the tile side); `source` names the file the counts came from, so later
    errors can point at it.
    """

    name: str
    patient: str
    adata: ad.AnnData
    image: SlideImage | None = None
    mpp: float | None = None
    spot_diameter_um: float | None = None
    platform: str = "other"
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise DataError(
                f"unknown platform {self.platform!r}; one of {PLATFORMS}", slide=self.name, field="platform"
            )
        self.adata.obs["slide"] = self.name
        self.adata.obs["patient"] = self.patient

    # ---- shape ---------------------------------------------------------------------------
    @property
    def n_spots(self) -> int:
        return int(self.adata.n_obs)

    @property
    def n_genes(self) -> int:
        return int(self.adata.n_vars)

    @property
    def genes(self) -> list[str]:
        return list(self.adata.var_names)

    @property
    def spot_ids(self) -> list[str]:
        return list(self.adata.obs_names)

    @property
    def coords(self) -> np.ndarray:
        """(n_spots, 2) float64 full-resolution pixel centres (x, y)."""
        return np.asarray(self.adata.obsm["spatial"], dtype=np.float64)

    @property
    def has_image(self) -> bool:
        return self.image is not None

    @property
    def spot_diameter_px(self) -> float | None:
        if self.spot_diameter_um is None or self.mpp is None:
            return None
        return self.spot_diameter_um / self.mpp

    def counts(self) -> np.ndarray:
        """Dense float32 raw counts (spots x genes)."""
        x = self.adata.X
        return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)

    # ---- validation ----------------------------------------------------------------------
    def validate(self, *, check_image_bounds: bool = True) -> Slide:
        """Raise DataError naming file, slide and field for any inconsistency; return self."""
        a, f = self.adata, self.source
        if a.n_obs == 0:
            raise DataError("slide has no spots", file=f, slide=self.name, field="obs")
        if a.n_vars == 0 and self.meta.get("expression") != "none":  # H&E-only tiles (he_tiling.py)
            raise DataError("slide has no genes", file=f, slide=self.name, field="var")
        if not a.obs_names.is_unique:
            dup = a.obs_names[a.obs_names.duplicated()].unique()[:5].tolist()
            raise DataError(f"duplicate spot ids {dup}", file=f, slide=self.name, field="obs_names")
        if not a.var_names.is_unique:
            dup = a.var_names[a.var_names.duplicated()].unique()[:5].tolist()
            raise DataError(f"duplicate gene names {dup}", file=f, slide=self.name, field="var_names")
        if "spatial" not in a.obsm:
            raise DataError(
                "no spot coordinates (obsm['spatial'])", file=f, slide=self.name, field="obsm/spatial"
            )
        xy = np.asarray(a.obsm["spatial"], dtype=np.float64)
        if xy.shape != (a.n_obs, 2) or not np.isfinite(xy).all():
            raise DataError(
                "spot coordinates must be finite (n_spots, 2)", file=f, slide=self.name, field="obsm/spatial"
            )
        x = a.X
        data = x.data if sp.issparse(x) else np.asarray(x)
        if np.isnan(data).any():
            bad = _first_bad_spots(a, np.isnan)
            raise DataError(f"NaN counts at spots {bad}", file=f, slide=self.name, field="counts")
        if (data < 0).any():
            bad = _first_bad_spots(a, lambda v: v < 0)
            raise DataError(f"negative counts at spots {bad}", file=f, slide=self.name, field="counts")
        if self.mpp is not None and not (self.mpp > 0):
            raise DataError(f"mpp must be > 0, got {self.mpp}", file=f, slide=self.name, field="mpp")
        if check_image_bounds and self.image is not None:
            w, h = self.image.size
            out = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h)
            if out.any():
                ids = a.obs_names[out][:5].tolist()
                raise DataError(
                    f"{int(out.sum())} spot centre(s) outside the {w}x{h} image, e.g. {ids}",
                    file=self.image.path,
                    slide=self.name,
                    field="obsm/spatial",
                )
        return self

    def drop_empty_spots(self, policy: str = "drop") -> Slide:
        """Spots whose counts sum to 0 cannot be normalised. policy "drop": remove them and record
        each in `meta["dropped_spots"]` (never a silent drop); "error": raise naming them; "keep"."""
        if policy == "keep":
            return self
        x = self.adata.X
        totals = np.asarray(x.sum(axis=1)).ravel()
        empty = totals <= 0
        if not empty.any():
            return self
        ids = self.adata.obs_names[empty].tolist()
        if policy == "error":
            raise DataError(
                f"{len(ids)} spot(s) without counts (total 0), e.g. {ids[:5]}",
                file=self.source,
                slide=self.name,
                field="counts",
            )
        if policy != "drop":
            raise DataError(
                f"empty_spots policy must be drop, error or keep, got {policy!r}",
                slide=self.name,
                field="empty_spots",
            )
        self.adata = self.adata[~empty].copy()
        self.meta.setdefault("dropped_spots", {}).update({s: "no counts (total 0)" for s in ids})
        if self.adata.n_obs == 0:
            raise DataError(
                "slide is empty after dropping spots without counts",
                file=self.source,
                slide=self.name,
                field="counts",
            )
        return self

    # ---- scanpy interop ------------------------------------------------------------------
    def to_scanpy(self, max_side: int = 2000) -> ad.AnnData:
        """AnnData with `uns['spatial'][slide]` filled (downscaled image + scalefactors),
        so `scanpy.pl.spatial(adata, library_id=slide.name)` draws spots on the H&E."""
        a = self.adata.copy()
        if self.image is None:
            return a
        from PIL import Image

        img = self.image.read()
        h, w = img.shape[:2]
        scale = min(1.0, max_side / max(h, w))
        small = np.asarray(
            Image.fromarray(img[..., :3]).resize((max(1, int(w * scale)), max(1, int(h * scale))))
        )
        diam = self.spot_diameter_px or 1.0
        a.uns["spatial"] = {
            self.name: {
                "images": {"hires": small},
                "scalefactors": {"tissue_hires_scalef": scale, "spot_diameter_fullres": diam},
                "metadata": {"mpp": self.mpp, "platform": self.platform},
            }
        }
        return a

    def summary(self) -> dict[str, Any]:
        size = self.image.size if self.image is not None else None
        return {
            "slide": self.name,
            "patient": self.patient,
            "platform": self.platform,
            "spots": self.n_spots,
            "genes": self.n_genes,
            "image": f"{size[0]}x{size[1]}" if size else "-",
            "mpp": round(self.mpp, 4) if self.mpp else None,
            "spot_diameter_um": self.spot_diameter_um,
            "dropped": len(self.meta.get("dropped_spots", {})),
        }


def _first_bad_spots(a: ad.AnnData, pred: Any) -> list[str]:
    x = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    rows = np.where(pred(x).any(axis=1))[0][:5]
    return a.obs_names[rows].tolist()


def make_adata(
    counts: np.ndarray | sp.spmatrix,
    spot_ids: list[str],
    genes: list[str],
    coords_xy: np.ndarray,
    obs: dict[str, Any] | None = None,
) -> ad.AnnData:
    """Build the canonical AnnData (float32 CSR counts, obsm['spatial'])."""
    import pandas as pd

    x = sp.csr_matrix(counts, dtype=np.float32)
    obs_df = pd.DataFrame(obs or {}, index=pd.Index([str(s) for s in spot_ids], name="spot"))
    var_df = pd.DataFrame(index=pd.Index([str(g) for g in genes], name="gene"))
    a = ad.AnnData(X=x, obs=obs_df, var=var_df)
    a.obsm["spatial"] = np.asarray(coords_xy, dtype=np.float64).reshape(-1, 2)
    return a
