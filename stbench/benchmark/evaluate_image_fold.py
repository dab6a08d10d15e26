"""Evaluate one image-generation fold (`task = image`) on rank 0: real tiles, training pairs and test
expression assembled from the DataModule, scored by `evaluate_images`, results written to the job.

What comes from where (and why it cannot leak):
- real test tiles: the patch store of the test slides, cut exactly like the tiles the method's latents
  were made from (the same crop, `latent_px` output), so FID compares like with like;
- test expression: the DataModule's targets of the test spots (the condition the generator was given
  and the truth the oracle's per-gene Pearson is scored against);
- oracle training pairs: the TRAINING spots only (validation spots and every val/test slide
  excluded), featurized chunk by chunk so no full tile array of the training split is ever in memory.

The job's `evaluation:` config section chooses encoders (FID: `h0-mini`; oracle: `uni2-h`; optional
`mlp_encoder: midnight`), their weights (`*_weights`, "none" = seeded random init, named so in the
row) and architecture overrides (`*_overrides`: a dict, or "tiny" = the zoo's test size), the k grid,
the bootstrap size and the headline regime.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stbench.benchmark.evaluate import tissue_labels
from stbench.benchmark.evaluate_images import ImageEvalConfig, TrainPairs, evaluate_images
from stbench.benchmark.image_features import build_featurizer
from stbench.benchmark.results import IMAGE_METRICS
from stbench.data.patches import PatchSpec, PatchStore
from stbench.errors import StbenchError
from stbench.utils.io import write_json_atomic, write_text_atomic

# Result-row headline metrics (the full set goes to image_metrics.json and the row's `image_metrics`).
HEADLINE = IMAGE_METRICS
_CONFIG_FIELDS = {
    "ks",
    "n_components",
    "integration",
    "headline_regime",
    "n_boot",
    "confidence",
    "batch_size",
    "device",
    "mlp",
    "tissue_min_count",
}
ROLES = ("fid", "oracle", "mlp")
DEFAULTS = {"fid_encoder": "h0-mini", "oracle_encoder": "uni2-h", "mlp_encoder": None}


def _overrides(name: str, value: Any) -> dict[str, Any] | None:
    if value in (None, {}):
        return None
    if value == "tiny":
        from stbench.encoders.registry import get_spec

        return dict(get_spec(name).tiny)
    if not isinstance(value, Mapping):
        raise StbenchError(f"evaluation overrides must be a mapping or 'tiny', got {value!r}")
    return dict(value)


def featurizers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """{role: Featurizer} for fid / oracle (/ mlp when `mlp_encoder` is set) from `evaluation:`."""
    out = {}
    for role in ROLES:
        name = cfg.get(f"{role}_encoder", DEFAULTS[f"{role}_encoder"])
        if not name:
            continue
        out[role] = build_featurizer(
            str(name),
            str(cfg.get(f"{role}_weights", "default")),
            arch_overrides=_overrides(str(name), cfg.get(f"{role}_overrides")),
            batch_size=int(cfg.get("batch_size", 32)),
            device=str(cfg.get("device", "cpu")),
        )
    return out


def eval_config(cfg: Mapping[str, Any], seed: int) -> ImageEvalConfig:
    known = {k: v for k, v in cfg.items() if k in _CONFIG_FIELDS}
    if "ks" in known:
        known["ks"] = tuple(int(k) for k in known["ks"])
    return ImageEvalConfig(seed=seed, **known)


def _slide_tiles(dm: Any, store: PatchStore, slide: str) -> tuple[np.ndarray, dict[str, int]]:
    """The slide's memory-mapped patches (opened once) and spot id -> row."""
    patches = store.build(dm.slides[slide])
    return patches.patches, patches.spot_index()


def _take(tiles: tuple[np.ndarray, dict[str, int]], spot_ids: list[str]) -> np.ndarray:
    patches, pos = tiles
    return np.asarray(patches[np.array([pos[s] for s in spot_ids], dtype=np.int64)])


def _train_features(
    dm: Any, store: PatchStore, fns: Mapping[str, Any], chunk: int = 512
) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """{role: features (n, d)}, targets (n, G) and ids of the training spots; each chunk of tiles is
    read once and passed through every regressor's featurizer."""
    table = dm.spot_table
    train = table[table["split"] == "train"]
    feats: dict[str, list[np.ndarray]] = {role: [] for role in fns}
    targets, ids = [], []
    for slide, rows in train.groupby("slide", sort=False):
        spot_ids = rows["spot_id"].astype(str).tolist()
        targets.append(dm.targets(slide).loc[spot_ids].to_numpy(np.float64))
        ids += [f"{slide}/{s}" for s in spot_ids]
        tiles = _slide_tiles(dm, store, slide)
        for start in range(0, len(spot_ids), chunk):
            batch = _take(tiles, spot_ids[start : start + chunk])
            for role, fn in fns.items():
                feats[role].append(fn(batch))
    return {role: np.concatenate(f) for role, f in feats.items()}, np.concatenate(targets), ids


def evaluate_image_fold(
    dm: Any,
    index: np.ndarray,
    tiles: Mapping[str, np.ndarray],
    jobdir: Path,
    job: Any,
    spec: PatchSpec,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """(per_slide, headline metrics, full image metrics) of one fold; writes image_metrics.json,
    per_tissue_fid.csv and oracle_curves.csv into `jobdir`."""
    cfg = dict(job.config.get("evaluation", {}))
    table = dm.spot_table.loc[index]
    slides = table["slide"].astype(str).to_numpy()
    spot_ids = table["spot_id"].astype(str).to_numpy()
    store = PatchStore(dm.cache_dir, spec)
    real, expr, labels_all, per_slide = [], [], [], {}
    for slide in dm.test_slides:
        rows = np.flatnonzero(slides == slide)
        ids = spot_ids[rows].tolist()
        real.append(_take(_slide_tiles(dm, store, slide), ids))
        expr.append(dm.targets(slide).loc[ids].to_numpy(np.float64))
        labels_all.append(tissue_labels(dm.slides[slide].adata.obs.loc[ids]))
        per_slide[slide] = {"n_spots": len(ids)}
    labels = None if any(x is None for x in labels_all) else [x for part in labels_all for x in part]
    fns = featurizers(cfg)
    regressors = {role: fn for role, fn in fns.items() if role in ("oracle", "mlp")}
    train, train_expr, train_ids = _train_features(dm, store, regressors)
    result = evaluate_images(
        np.concatenate(real),
        dict(tiles),
        TrainPairs(expression=train_expr, features=train, spot_ids=train_ids),
        np.concatenate(expr),
        test_spot_ids=[f"{a}/{b}" for a, b in zip(slides, spot_ids, strict=True)],
        tissue_labels=labels,
        fid_featurizer=fns["fid"],
        oracle_featurizer=fns["oracle"],
        mlp_featurizer=fns.get("mlp"),
        config=eval_config(cfg, job.seed),
    )
    full = dict(result.metrics)
    write_json_atomic(jobdir / "image_metrics.json", full)
    write_text_atomic(jobdir / "per_tissue_fid.csv", result.per_tissue.to_csv(index=False))
    write_text_atomic(jobdir / "oracle_curves.csv", result.curves.to_csv(index=False))
    headline = {k: full[k] for k in HEADLINE if k in full and not isinstance(full[k], str)}
    if "fid_uni_ge" not in headline or "fid_uni" not in headline:
        headline.pop("fid_delta", None)  # undefined without both regimes (no-GE baselines), not null
    return per_slide, headline, full
