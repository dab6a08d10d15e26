"""`stbench predict`: apply a trained job to a new H&E image that has no counts.

Why a separate path from `run`: a new slide has no fold, no targets and often no spot table; the
trained job fixes everything else (method, config, gene panel, target space, patch spec), so the
new slide only needs spot centres and the image scale.

- The job: `--run JOBDIR` (job.json, gene_panel.json, checkpoints/best.ckpt) or `--checkpoint FILE`
  (its job folder is found from `<job>/checkpoints/<file>`, else the checkpoint's own "stbench"
  metadata must carry the method and config). Weights load with `torch.load(weights_only=True)`.
  Methods without a checkpoint (the `mean` reference estimates in a stage) are rebuilt from the job's
  own dataset and fold, as `stbench run` built them.
- Supported: image-only spot methods (patch-cnn, stnet, ...) and references that read no input
  (`mean`). Refused, naming what is missing: frozen-encoder features, neighbours, spot graphs,
  whole-slide batches, library sizes, image generation, and any method that needs its training
  data while predicting (retrieval).
- Spots: `--spots CSV` (columns x, y in full-resolution px, or Space Ranger's pxl_col_in_fullres,
  pxl_row_in_fullres; optional spot_id/barcode) or `--grid SIZE_UM`: centres on a square grid of
  that pitch, kept where the cell is tissue (`TISSUE_MIN_FRACTION` of its low-res pixels are not
  background; background = the patch store's rule, min(R, G, B) >= 200 and saturation < 0.10).
- Patches are cut by the job's PatchSpec (requires.patch overridden by data.patch); a spec whose crop
  is the spot diameter uses the training dataset's spot diameter (`--spot-diameter` overrides).
- Output: an .h5ad with X = predictions in the job's target space, var = panel, obsm["spatial"],
  uns["spatial"] (low-res H&E + scalefactors) and provenance in uns["stbench"]. With `--counts`
  also layers["truth"] and `<out>.metrics.json` (stbench.metrics.report.slide_metrics).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stbench.errors import DataError, StbenchError

TISSUE_MIN_FRACTION = 0.5
MIN_CHANNEL, MAX_SATURATION = 200, 0.10  # = stbench.data.patches' background rule
X_COLUMNS = (("x", "y"), ("pxl_col_in_fullres", "pxl_row_in_fullres"))
ID_COLUMNS = ("spot_id", "barcode", "spot")
PREDICT_HOOKS = ("on_predict_start", "on_predict_epoch_start", "on_predict_batch_start", "predict_step")


@dataclass
class TrainedJob:
    """What predict needs from a trained job."""

    job: Any  # stbench.benchmark.job.Job
    jobdir: Path | None
    checkpoint: Path | None
    ckpt_meta: dict[str, Any]


# ---- the job ---------------------------------------------------------------------------------
def resolve_job(run: str | None, checkpoint: str | None) -> TrainedJob:
    """The trained job behind `--run DIR` or `--checkpoint FILE` (exactly one)."""
    from stbench.benchmark.job import Job

    if (run is None) == (checkpoint is None):
        raise StbenchError("give exactly one of --run JOBDIR or --checkpoint FILE")
    meta: dict[str, Any] = {}
    if run is not None:
        jobdir = Path(run)
        if not (jobdir / "job.json").exists():
            raise DataError("not a finished job folder (no job.json)", file=jobdir, field="--run")
        best = jobdir / "checkpoints" / "best.ckpt"
        ckpt = best if best.exists() else None
    else:
        ckpt = Path(checkpoint)
        if not ckpt.is_file():
            raise DataError("checkpoint file not found", file=ckpt, field="--checkpoint")
        jobdir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
        if jobdir is not None and not (jobdir / "job.json").exists():
            jobdir = None
    if ckpt is not None:
        meta = dict(_load_checkpoint(ckpt).get("stbench") or {})
    if jobdir is not None:
        d = json.loads((jobdir / "job.json").read_text())
    elif meta.get("method") and isinstance(meta.get("config"), dict):
        d = {"method": meta["method"], "config": meta["config"], "dataset": meta.get("dataset", "?")}
        d.update(protocol="?", fold="?", seed=0)
    else:
        raise DataError(
            "cannot tell which job made this checkpoint: no <job>/job.json beside checkpoints/ and no "
            "method + config in its metadata; pass --run <job folder>",
            file=ckpt,
            field="--checkpoint",
        )
    fields = {k: d[k] for k in ("method", "dataset", "protocol", "fold", "seed", "config") if k in d}
    fields.update({k: d[k] for k in ("config_name", "data_root") if d.get(k) is not None})
    return TrainedJob(Job(**fields), jobdir, ckpt, meta)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - one clear message, not a traceback
        raise DataError(
            f"cannot read checkpoint as plain tensors (torch.load(weights_only=True): {type(exc).__name__})",
            file=path,
            field="--checkpoint",
        ) from None
    if not isinstance(state, dict):
        raise DataError("checkpoint is not a state dict", file=path, field="--checkpoint")
    return state


def unsupported_inputs(method_cls: type) -> list[str]:
    """What `method_cls` consumes that a new slide without counts cannot provide (empty = fine)."""
    r = method_cls.requires
    out = []
    if method_cls.task != "expression":
        out.append(f"task {method_cls.task!r} (image generation)")
    if r.features:
        out.append(f"frozen features {list(r.features)}")
    if r.neighbours:
        out.append("neighbour spots")
    if r.graph is not None:
        out.append("a spot graph")
    if r.whole_slide:
        out.append("whole-slide batches")
    if r.totals:
        out.append("library sizes (counts)")
    # predict calls predict_expression directly: a method with its own predict hooks (BLEEP builds
    # its retrieval reference from the training spots there) would silently predict something else
    from stbench.methods.base import Method

    hooks = [h for h in PREDICT_HOOKS if getattr(method_cls, h, None) is not getattr(Method, h, None)]
    if hooks:
        out.append(f"its own predict hooks {hooks}, which stbench predict does not run")
    return out


def build_method(tj: TrainedJob, genes: list[str]) -> Any:
    """The job's method with its trained state: checkpoint weights, or (no checkpoint, no fit
    stage) its stages re-run on the job's own fold."""
    from stbench.methods.registry import get_method

    method_cls = get_method(tj.job.method)
    missing = unsupported_inputs(method_cls)
    if missing:
        raise StbenchError(
            f"stbench predict does not support method {tj.job.method!r}: it needs {', '.join(missing)}; "
            "supported are image-only spot methods (patch-cnn, stnet, ...) and `mean`"
        )
    method = method_cls(n_genes=len(genes), genes=genes, **tj.job.config.get("method", {}))
    if tj.checkpoint is not None:
        sd = _load_checkpoint(tj.checkpoint)
        sd = sd.get("state_dict", sd)
        missing_k, unexpected = method.load_state_dict(sd, strict=False)
        if missing_k or unexpected:
            raise DataError(
                f"checkpoint does not fit {type(method).__name__}: missing keys {list(missing_k)[:5]}, "
                f"unexpected keys {list(unexpected)[:5]}",
                file=tj.checkpoint,
                field="--checkpoint",
            )
    elif "fit" in method_cls.stages:
        raise DataError("the job has no checkpoints/best.ckpt", file=tj.jobdir, field="--run")
    else:
        _rerun_stages(tj, method)
    method.eval()
    return method


def job_datamodule(job: Any) -> Any:
    """The job's DataModule, built as `run_job` builds it (image-free methods only: no features)."""
    import lightning as L

    from stbench.benchmark.runner import job_data_config, open_dataset, plan
    from stbench.data.datamodule import STDataModule
    from stbench.data.patches import PatchSpec
    from stbench.data.protocols import get_protocol
    from stbench.methods.registry import get_method

    L.seed_everything(job.seed, workers=True, verbose=False)
    method_cls = get_method(job.method)
    ds = open_dataset(job.dataset, job.data_root)
    proto = get_protocol(job.protocol)
    fold = next(f for f in plan(ds, proto) if f.name == job.fold)
    reqs = method_cls.requires
    data_cfg, patch_cfg = job_data_config(job, ds, proto, reqs)
    slides = [*fold.train, *fold.val, *fold.test]
    dm = STDataModule(
        lambda: ds.load_slides(slides),
        fold,
        protocol=proto,
        patch_spec=PatchSpec(**patch_cfg) if reqs.image else None,
        cache_dir=ds.cache,
        seed=job.seed,
        include_counts=reqs.counts,
        vocabulary=method_cls.gene_vocabulary(job.config.get("method", {})),
        **data_cfg,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _rerun_stages(tj: TrainedJob, method: Any) -> None:
    dm = job_datamodule(tj.job)
    if list(dm.genes) != list(method.genes or []):
        raise DataError("the job's fold now gives another gene panel", file=tj.jobdir, field="gene_panel")
    for stage in method.stages:
        getattr(method, f"run_stage_{stage}")(dm, None)


def job_panel(tj: TrainedJob) -> list[str]:
    """The trained gene panel, in order (gene_panel.json, else the checkpoint's metadata)."""
    from stbench.data.genes import GenePanel

    if tj.jobdir is not None and (tj.jobdir / "gene_panel.json").exists():
        return list(GenePanel.load(tj.jobdir / "gene_panel.json").genes)
    genes = tj.ckpt_meta.get("genes") or (tj.ckpt_meta.get("panel") or {}).get("genes")
    if genes:
        return [str(g) for g in genes]
    raise DataError("no gene panel: no gene_panel.json in the job folder", file=tj.jobdir, field="gene_panel")


def job_transform(tj: TrainedJob) -> Any:
    """The job's fitted target transform: from the checkpoint's metadata, else from the job's
    target spec when it needs no fitting, else refitted on the job's own training spots."""
    from stbench.data.normalize import TargetTransform

    state = tj.ckpt_meta.get("target") or tj.ckpt_meta.get("target_transform")
    if isinstance(state, dict) and "method" in state:
        return TargetTransform.from_state_dict(state)
    from stbench.benchmark.runner import job_data_config, open_dataset
    from stbench.data.datamodule import _target_spec
    from stbench.data.protocols import get_protocol
    from stbench.methods.registry import get_method

    proto = get_protocol(tj.job.protocol)
    ds = open_dataset(tj.job.dataset, tj.job.data_root)
    data_cfg, _ = job_data_config(tj.job, ds, proto, get_method(tj.job.method).requires)
    spec = _target_spec(data_cfg.get("target"), proto)
    if spec.get("scale") is None:
        return TargetTransform(**spec)
    return job_datamodule(tj.job).transform


# ---- the new slide ---------------------------------------------------------------------------
def mpp_from_file(path: Path) -> float | None:
    """µm per pixel from TIFF metadata (Aperio "MPP = ", OME PhysicalSizeX, resolution tags)."""
    import re

    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            desc = page.description or ""
            m = re.search(r"MPP\s*=\s*([0-9.]+)", desc) or re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', desc)
            if m:
                return float(m.group(1))
            tags = page.tags
            if "XResolution" in tags and "ResolutionUnit" in tags:
                num, den = tags["XResolution"].value
                unit = int(tags["ResolutionUnit"].value)
                per = {3: 1e4, 2: 25400.0}.get(unit)
                if per and num:
                    return per * den / num
    except Exception:  # noqa: BLE001 - not a TIFF or no metadata: the caller asks for --mpp
        return None
    return None


def read_spots(path: Path) -> tuple[list[str], np.ndarray]:
    """(spot ids, (n, 2) full-res px centres) from a CSV (see the module docstring)."""
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read spots CSV: {exc}", file=path, field="--spots") from None
    cols = next(((cx, cy) for cx, cy in X_COLUMNS if cx in df.columns and cy in df.columns), None)
    if cols is None:
        raise DataError(
            f"spots CSV needs columns x, y (got {list(df.columns)[:8]})", file=path, field="--spots"
        )
    xy = df[list(cols)].to_numpy(dtype=np.float64)
    if len(xy) == 0 or not np.isfinite(xy).all():
        raise DataError("spot coordinates must be finite and at least one", file=path, field="--spots")
    idc = next((c for c in ID_COLUMNS if c in df.columns), None)
    ids = df[idc].astype(str).tolist() if idc else [f"spot{i}" for i in range(len(df))]
    return ids, xy


def tissue_grid(lowres: np.ndarray, scale: float, size: tuple[int, int], pitch_px: float) -> np.ndarray:
    """(n, 4) [x, y, col, row] centres of the square grid of pitch `pitch_px` (full-res px) over a
    (w, h) image, kept where >= TISSUE_MIN_FRACTION of the cell's low-res pixels are tissue."""
    rgb = lowres[..., :3].astype(np.float32)
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    tissue = ~((mn >= MIN_CHANNEL) & (sat < MAX_SATURATION))
    w, h = size
    out = []
    for row in range(int(h // pitch_px)):
        for col in range(int(w // pitch_px)):
            x0, y0 = col * pitch_px, row * pitch_px
            a = tissue[int(y0 * scale) : max(int(y0 * scale) + 1, int((y0 + pitch_px) * scale)),
                       int(x0 * scale) : max(int(x0 * scale) + 1, int((x0 + pitch_px) * scale))]  # fmt: skip
            if a.size and a.mean() >= TISSUE_MIN_FRACTION:
                out.append((x0 + pitch_px / 2 - 0.5, y0 + pitch_px / 2 - 0.5, col, row))
    return np.asarray(out, dtype=np.float64).reshape(-1, 4)


def read_counts(path: Path, spot_ids: list[str]) -> tuple[Any, list[str]]:
    """(spots x genes raw counts, genes) aligned to `spot_ids`, from a CSV (index = spot id) or .h5ad."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    try:
        if path.suffix == ".h5ad":
            a = ad.read_h5ad(path)
            x = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
            df = pd.DataFrame(x, index=a.obs_names.astype(str), columns=a.var_names.astype(str))
        else:
            df = pd.read_csv(path, index_col=0)
            df.index = df.index.astype(str)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read counts: {exc}", file=path, field="--counts") from None
    absent = [s for s in spot_ids if s not in df.index]
    if absent:
        raise DataError(
            f"{len(absent)} spot(s) without counts, e.g. {absent[:5]}", file=path, field="--counts"
        )
    return df.loc[spot_ids].to_numpy(np.float32), [str(g) for g in df.columns]


# ---- the command -----------------------------------------------------------------------------
def predict(
    *,
    run: str | None,
    checkpoint: str | None,
    image: str,
    out: str,
    mpp: float | None = None,
    spots: str | None = None,
    grid: float | None = None,
    counts: str | None = None,
    spot_diameter: float | None = None,
    library_id: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Write the prediction .h5ad (and metrics with `counts`); return a short summary."""
    from stbench.data.catalog import get_card
    from stbench.data.image_regions import open_slide_image
    from stbench.methods.registry import get_method

    if (spots is None) == (grid is None):
        raise StbenchError("give exactly one of --spots CSV or --grid SIZE_UM")
    if grid is not None and not grid > 0:
        raise StbenchError(f"--grid must be > 0 µm, got {grid}")
    tj = resolve_job(run, checkpoint)
    method_cls = get_method(tj.job.method)
    missing = unsupported_inputs(method_cls)
    if missing:  # before any pixel is read
        build_method(tj, [])
    genes = job_panel(tj)
    img = open_slide_image(Path(image))
    size = img.size
    mpp = mpp if mpp is not None else mpp_from_file(img.path)
    if mpp is None or not mpp > 0:
        raise DataError(
            "no image scale: pass --mpp (µm per full-resolution pixel)", file=image, field="--mpp"
        )
    if spot_diameter is None:
        try:
            spot_diameter = get_card(tj.job.dataset).spot_diameter_um
        except StbenchError:
            spot_diameter = None
    name = library_id or Path(image).stem
    obs_extra: dict[str, Any] = {}
    if spots is not None:
        ids, xy = read_spots(Path(spots))
    else:
        from stbench.benchmark.spatial_h5ad import lowres_image

        lowres, scale = lowres_image(img)
        cells = tissue_grid(lowres, scale, size, float(grid) / float(mpp))
        if not len(cells):
            raise DataError(f"no tissue found on a {grid} µm grid", file=image, field="--grid")
        xy = cells[:, :2]
        ids = [f"{int(c)}x{int(r)}" for c, r in cells[:, 2:]]
        obs_extra = {"array_col": cells[:, 2].astype(np.int64), "array_row": cells[:, 3].astype(np.int64)}
    raw = all_genes = None
    if counts is not None:
        raw, all_genes = read_counts(Path(counts), ids)
    slide = _new_slide(name, ids, xy, img, mpp, spot_diameter, raw, all_genes, obs_extra)
    method = build_method(tj, genes)
    pred = _predict_spots(method, tj, slide, batch_size, device, cache_dir)
    truth, metrics = None, None
    if raw is not None:
        truth, metrics = _truth_and_metrics(tj, slide, raw, all_genes, genes, pred)
    _write(tj, slide, pred, truth, genes, Path(out), obs_extra)
    summary = {"out": str(out), "spots": int(slide.n_spots), "genes": len(genes), "method": tj.job.method}
    if metrics is not None:
        mpath = Path(out).with_suffix(".metrics.json")
        from stbench.utils.io import write_json_atomic

        write_json_atomic(mpath, {"slide": name, "job_id": tj.job.job_id, "metrics": metrics})
        summary["metrics"] = str(mpath)
    return summary


def _new_slide(
    name: str,
    ids: list[str],
    xy: np.ndarray,
    img: Any,
    mpp: float,
    spot_diameter: float | None,
    raw: np.ndarray | None,
    genes: list[str] | None,
    obs: dict[str, Any],
) -> Any:
    from stbench.data.slide import Slide, make_adata

    if raw is None:
        adata = make_adata(np.zeros((len(ids), 0), np.float32), ids, [], xy, obs)
        meta = {"expression": "none"}
    else:
        adata, meta = make_adata(raw, ids, list(genes or []), xy, obs), {}
    slide = Slide(name, "predict", adata, image=img, mpp=mpp, spot_diameter_um=spot_diameter, meta=meta)
    slide.source = str(img.path)
    return slide.validate()


def _predict_spots(
    method: Any, tj: TrainedJob, slide: Any, batch_size: int, device: str, cache: str | None
) -> np.ndarray:
    """(n, G) float32 predictions, in spot order, batches built as the DataModule builds them."""
    import torch

    reqs = type(method).requires
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    method.to(dev)
    patches = None
    tmp = None
    if reqs.image:
        from stbench.data.patches import PatchSpec, PatchStore

        spec = PatchSpec(**{**reqs.patch, **tj.job.config.get("data", {}).get("patch", {})})
        if cache is None:
            tmp = tempfile.TemporaryDirectory(prefix="stbench-predict-")
            cache = tmp.name
        store = PatchStore(Path(cache), spec).build(slide)
        pos = store.spot_index()
        patches = np.asarray(store.patches[np.array([pos[s] for s in slide.spot_ids])])
    coords = slide.coords.astype(np.float32)
    out = []
    try:
        with torch.no_grad():
            for i in range(0, slide.n_spots, batch_size):
                rows = np.arange(i, min(i + batch_size, slide.n_spots))
                batch: dict[str, Any] = {
                    "coords": torch.from_numpy(coords[rows]).to(dev),
                    "slide": [slide.name] * len(rows),
                    "spot_id": [slide.spot_ids[r] for r in rows],
                    "index": torch.from_numpy(rows.astype(np.int64)).to(dev),
                }
                if patches is not None:
                    img = torch.from_numpy(np.ascontiguousarray(patches[rows])).permute(0, 3, 1, 2)
                    batch["image"] = img.float().div_(255.0).to(dev)
                out.append(method.predict_expression(batch).float().cpu().numpy())
    except RuntimeError as exc:
        if "Trainer" in str(exc) or "datamodule" in str(exc):
            raise StbenchError(
                f"stbench predict does not support method {tj.job.method!r}: it reads its training data "
                "while predicting (e.g. a retrieval reference)"
            ) from None
        raise
    finally:
        if tmp is not None:
            tmp.cleanup()
    return np.concatenate(out).astype(np.float32)


def _truth_and_metrics(
    tj: TrainedJob, slide: Any, raw: np.ndarray, all_genes: list[str], genes: list[str], pred: np.ndarray
) -> tuple[np.ndarray, dict[str, Any]]:
    from stbench.metrics.expression import log_library_size
    from stbench.metrics.report import slide_metrics

    col = {g: i for i, g in enumerate(all_genes)}
    absent = [g for g in genes if g not in col]
    if absent:
        raise DataError(
            f"{len(absent)} panel gene(s) missing from the counts, e.g. {absent[:5]}", field="--counts"
        )
    totals = raw.sum(axis=1).astype(np.float64)
    panel_counts = raw[:, [col[g] for g in genes]]
    truth = np.asarray(job_transform(tj).transform(panel_counts, totals, len(all_genes)), dtype=np.float32)
    ks = [k for k in (50, 200) if k <= len(genes)]
    metrics = slide_metrics(
        truth,
        pred,
        genes,
        fixed_genes={k: genes[:k] for k in ks} or None,
        log_totals=log_library_size(totals),
        seed=tj.job.seed,
    )
    return truth, {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in metrics.items()}


def _write(
    tj: TrainedJob,
    slide: Any,
    pred: np.ndarray,
    truth: np.ndarray | None,
    genes: list[str],
    out: Path,
    obs: dict,
) -> None:
    import pandas as pd

    from stbench.benchmark.spatial_h5ad import (
        job_provenance,
        prediction_adata,
        slide_spatial,
        transform_provenance,
    )
    from stbench.utils.io import atomic_path

    provenance = {
        **job_provenance(tj.job),
        "checkpoint": str(tj.checkpoint) if tj.checkpoint else None,
        "image": str(slide.image.path),
        "space": "the job's target space (X = prediction"
        + (", layers['truth'] = truth)" if truth is not None else ")"),
    }
    try:  # what space X is in; a job whose dataset is not here still gets its predictions
        provenance.update(transform_provenance(job_transform(tj)))
    except StbenchError:
        provenance["target_transform"] = "unknown (the job's dataset is not available here)"
    frame = pd.DataFrame({"slide": slide.name, **obs}, index=pd.Index(slide.spot_ids, name="spot"))
    uns = slide_spatial(slide, {"dataset": "stbench predict"})
    a = prediction_adata(pred, frame, slide.coords, genes, provenance, uns, truth=truth)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        a.write_h5ad(tmp)


def add_subcommand(sub: Any) -> None:
    """Register `stbench predict` on the CLI's subcommands (argument parsing only; no heavy import)."""
    from jsonargparse import ArgumentParser

    pp = ArgumentParser(
        description="Apply a trained job to a new H&E image (no counts needed); write an .h5ad that "
        "scanpy.pl.spatial / squidpy read directly. Image-only spot methods and `mean` only."
    )
    pp.add_argument("--run", type=str | None, default=None, help="a job folder (outputs/.../jobs/<job_id>)")
    pp.add_argument("--checkpoint", type=str | None, default=None, help="a checkpoint file instead of --run")
    pp.add_argument(
        "--image", type=str, required=True, help="the H&E image (any format the data layer reads)"
    )
    pp.add_argument(
        "--mpp", type=float | None, default=None, help="µm per full-res pixel (else from the file)"
    )
    pp.add_argument("--spots", type=str | None, default=None, help="CSV of spot centres: x, y [, spot_id]")
    pp.add_argument(
        "--grid", type=float | None, default=None, help="tile the tissue on a grid of this pitch (µm)"
    )
    pp.add_argument(
        "--counts", type=str | None, default=None, help="counts of the spots (CSV/h5ad): adds metrics"
    )
    pp.add_argument("--out", type=str, required=True, help="the .h5ad to write")
    pp.add_argument(
        "--spot-diameter", type=float | None, default=None, help="µm (default: the training dataset's)"
    )
    pp.add_argument(
        "--library-id", type=str | None, default=None, help="uns['spatial'] key (default: image stem)"
    )
    pp.add_argument("--batch-size", type=int, default=64)
    pp.add_argument("--device", type=str, default="cpu", help="cpu, cuda, or auto")
    pp.add_argument(
        "--cache-dir", type=str | None, default=None, help="keep the patch store here (default: temp)"
    )
    sub.add_subcommand("predict", pp, help="apply a trained job to a new H&E image")


def run_command(args: Any) -> int:
    """`stbench predict` (parsed arguments from `add_subcommand`)."""
    from stbench.commands import quiet_lightning
    from stbench.utils.table import console

    quiet_lightning()
    summary = predict(
        run=args.run,
        checkpoint=args.checkpoint,
        image=args.image,
        out=args.out,
        mpp=args.mpp,
        spots=args.spots,
        grid=args.grid,
        counts=args.counts,
        spot_diameter=args.spot_diameter,
        library_id=args.library_id,
        batch_size=args.batch_size,
        device=args.device,
        cache_dir=args.cache_dir,
    )
    line = (
        f"wrote {summary['out']}: {summary['spots']} spots x {summary['genes']} genes ({summary['method']})"
    )
    if "metrics" in summary:
        line += f"; metrics in {summary['metrics']}"
    console().print(line, markup=False, highlight=False)
    return 0
