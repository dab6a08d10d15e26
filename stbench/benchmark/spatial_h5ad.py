"""`uns["spatial"]` for prediction files, in scanpy's Visium layout, so they plot over the H&E as-is.

Why: `scanpy.pl.spatial` and squidpy read `uns["spatial"][library_id]` = {"images": {"lowres": ...},
"scalefactors": {"tissue_lowres_scalef", "tissue_hires_scalef", "spot_diameter_fullres"}, "metadata"}
and `obsm["spatial"]` in full-resolution pixels; a user should not have to build it.

The low-res image is at most `LOWRES_MAX_SIDE` px on its long side (Space Ranger's lowres is 600),
read without decoding more than needed: a JPEG through PIL's `draft` (decodes at 1/2, 1/4 or 1/8
scale), a TIFF or zarr pyramid at its coarsest level that is still large enough. Only the lowres
image is stored; `tissue_hires_scalef` is the scale a 2000 px hires image would have (Visium's),
recorded for tools that read it. A slide without an image gets scalefactors and no `images`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

LOWRES_MAX_SIDE = 600
HIRES_MAX_SIDE = 2000


def lowres_image(image: Any, max_side: int = LOWRES_MAX_SIDE) -> tuple[np.ndarray, float]:
    """(uint8 (h, w, 3) image, scale = low-res px per full-res px) of a `SlideImage`."""
    from PIL import Image

    from stbench.data.patches import _to_rgb_uint8

    w0, h0 = image.size
    scale = min(1.0, max_side / max(w0, h0))
    size = (max(1, round(w0 * scale)), max(1, round(h0 * scale)))
    arr = _coarse_pixels(image, size)
    small = Image.fromarray(_to_rgb_uint8(arr))
    if small.size != size:
        small = small.resize(size, Image.BILINEAR, reducing_gap=3.0)
    return np.asarray(small, dtype=np.uint8), scale


def _coarse_pixels(image: Any, size: tuple[int, int]) -> np.ndarray:
    """The smallest decode of `image` that is at least `size` (w, h), as (H, W, C)."""
    from stbench.data.image_regions import RegionReader, ZarrImage

    if isinstance(image, ZarrImage) or image.is_tiff:
        with RegionReader(image) as rr:
            level = 0
            for i, (w, h) in enumerate(rr.levels):
                if w >= size[0] and h >= size[1]:
                    level = i
            w, h = rr.levels[level]
            return np.asarray(rr.read(level, 0, 0, w, h))
    from PIL import Image

    from stbench.data.image import _MAX_PIXELS

    Image.MAX_IMAGE_PIXELS = _MAX_PIXELS
    with Image.open(image.path) as im:
        im.draft("RGB", size)  # JPEG: decode at a reduced DCT scale (no-op for other formats)
        return np.asarray(im.convert("RGB"))


def spatial_entry(
    image: Any | None,
    *,
    mpp: float | None,
    spot_diameter_px: float | None,
    metadata: dict[str, Any] | None = None,
    max_side: int = LOWRES_MAX_SIDE,
) -> dict[str, Any]:
    """One library's `uns["spatial"]` entry (scanpy's Visium layout; see the module docstring)."""
    meta: dict[str, Any] = {k: v for k, v in (metadata or {}).items() if v is not None}
    if mpp is not None:
        meta["mpp"] = float(mpp)
    scalef: dict[str, Any] = {"spot_diameter_fullres": float(spot_diameter_px or 1.0)}
    entry: dict[str, Any] = {"scalefactors": scalef, "metadata": meta}
    if image is None:
        scalef.update(tissue_lowres_scalef=1.0, tissue_hires_scalef=1.0)
        return entry
    small, scale = lowres_image(image, max_side)
    w0, h0 = image.size
    scalef.update(
        tissue_lowres_scalef=float(scale),
        tissue_hires_scalef=float(min(1.0, HIRES_MAX_SIDE / max(w0, h0))),
    )
    entry["images"] = {"lowres": small}
    meta.update(source_image=str(Path(image.path)), fullres_width=int(w0), fullres_height=int(h0))
    return entry


def slide_spatial(slide: Any, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """`uns["spatial"]` = {slide.name: entry} for a `Slide` (lazy image, mpp, spot diameter)."""
    meta = {"platform": getattr(slide, "platform", None), **(metadata or {})}
    entry = spatial_entry(slide.image, mpp=slide.mpp, spot_diameter_px=slide.spot_diameter_px, metadata=meta)
    return {slide.name: entry}


def prediction_adata(
    pred: np.ndarray,
    obs: Any,
    spatial: np.ndarray,
    genes: list[str],
    provenance: dict[str, Any],
    uns_spatial: dict[str, Any] | None,
    truth: np.ndarray | None = None,
) -> Any:
    """The prediction AnnData: X = predictions, layers["truth"] when known, var = the panel,
    obsm["spatial"] in full-res px, uns["spatial"] and uns["stbench"] (provenance; None dropped,
    since h5ad cannot store it)."""
    import anndata as ad
    import pandas as pd

    a = ad.AnnData(X=pred, obs=obs, var=pd.DataFrame(index=pd.Index(list(genes), name="gene")))
    if truth is not None:
        a.layers["truth"] = truth
    a.obsm["spatial"] = np.asarray(spatial, dtype=np.float64)
    a.uns["stbench"] = {k: v for k, v in provenance.items() if v is not None}
    if uns_spatial:
        a.uns["spatial"] = uns_spatial
    for col in a.obs.columns:
        if a.obs[col].dtype == object:
            a.obs[col] = a.obs[col].astype(str)
    return a


def transform_provenance(transform: Any) -> dict[str, Any]:
    """The target transform as provenance: its method and its full state as JSON (center/spread
    included), so a reader can tell which space X is in and invert it."""
    import json

    if transform is None:
        return {}
    state = transform.state_dict()
    return {"target_transform": str(state.get("method")), "target_transform_state": json.dumps(state)}


def job_provenance(job: Any) -> dict[str, Any]:
    """Which job made a prediction file: the fields every prediction .h5ad (a run's, `stbench
    predict`'s) carries in uns["stbench"]."""
    return {
        "job_id": job.job_id,
        "method": job.method,
        "dataset": job.dataset,
        "protocol": job.protocol,
        "fold": job.fold,
        "seed": job.seed,
        "config_name": job.config_name,
        "config_hash": job.config_hash,
        "weights": weights_of(dict(job.config.get("method", {}))),
    }


def weights_of(method_config: dict[str, Any]) -> str:
    """Pretrained weights named by a job's method config ("encoder"/"weights" keys), else "none"
    (trained from scratch); the result row's `weights` field is the method's own account."""
    named = [f"{k}={method_config[k]}" for k in sorted(method_config) if "weights" in k or k == "encoder"]
    return ", ".join(str(x) for x in named) or "none"
