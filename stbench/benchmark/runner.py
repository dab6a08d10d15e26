"""Run jobs: seed, build DataModule and Method, run the method's stages with a Lightning Trainer,
predict the test slides through the rank-aware writer, evaluate once on rank 0, append one row.

Rules this file enforces for every method alike:
- folds come from the protocol (same slides for every method), checked for leakage before use;
- checkpoint choice uses the validation split only (ModelCheckpoint on `method.monitor`);
- metrics are computed by stbench.metrics on gathered, de-duplicated predictions, never by a method;
- a finished job (its row in results.jsonl) is skipped on re-run; an unfinished one restarts clean.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L

from stbench.benchmark import checkpoints, provenance
from stbench.benchmark.job import Job, deep_merge, load_config, select_folds
from stbench.benchmark.store import append_row, claim, finished_job_ids
from stbench.benchmark.writer import SpotPredictionWriter, clear_parts, gather_predictions
from stbench.data.dataset import Dataset
from stbench.data.protocols import Protocol, get_protocol, target_for_counts, target_label
from stbench.data.splits import Fold
from stbench.errors import DataError
from stbench.methods.base import Method
from stbench.methods.registry import get_method
from stbench.utils.io import write_json_atomic

CONVENTIONS = {
    "pcc": "gene-wise Pearson over the spots of one test slide, mean over the panel's genes; genes constant "
    "in truth or prediction excluded and counted (pcc_excluded); then mean ± sd over slides and seeds",
    "pcc{k}": "same, over the k genes of highest training-set variance fixed before testing",
    "pcc{k}_posthoc": "mean of the k best per-gene PCCs on the test slide (Stem's post-hoc convention)",
    "pcc_partial": "per gene, Pearson of the OLS residuals of truth and prediction on [1, log(max(total, 1))] "
    "over one test slide's spots (total = the spot's counts over all genes of the slide); mean over genes "
    "with pcc's exclusion rules; then mean ± sd over slides and seeds",
    "pcc_pooled": "HEST-Bench's score: per gene, Pearson over the spots of all test slides of the fold stacked, "
    "np.mean over all genes (null when any gene is constant over the pooled spots, as HEST's np.mean of a "
    "NaN pearsonr); then mean ± sd over folds",
    "mse/mae": "over all spots x genes of the panel, in the protocol's target space",
}
IMAGE_CONVENTIONS = {
    "fid_<regime>": "Frechet distance between the feature Gaussians of the real and the generated test tiles "
    "(one generated tile per test spot and regime; encoder named in image_metrics.fid_encoder); "
    "regimes uni_ge / uni / ge / none = which conditions the sampler kept",
    "fid_delta": "fid_uni_ge - fid_uni (negative: the expression condition improves the tiles)",
    "oracle_auc": "mean over the k grid of the per-gene Pearson r between the test expression and an oracle "
    "regressor's predictions from the generated tiles (regressor fitted on training-split real tiles only); "
    "_ceiling = the same from the real test tiles; null anchor 0",
}
DEFAULT_PCC_K = (50, 200)


def global_rank_from_env() -> int:
    """Rank before a Trainer exists (DDP children are re-launched with these variables set)."""
    if "LOCAL_RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", 0))  # srun-launched ranks before Lightning sets LOCAL_RANK
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    local = int(os.environ.get("LOCAL_RANK", 0))
    world_local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return node * world_local + local


def open_dataset(name: str, data_root: str | None) -> Dataset:
    """Open a prepared dataset; the synthetic one is generated on first use (it is offline)."""
    from stbench.data import paths
    from stbench.data.catalog import get_card

    if get_card(name).reader == "synthetic" and not paths.manifest_path(name, data_root).exists():
        from stbench.benchmark.store import locked
        from stbench.data.prepare import prepare

        with locked(paths.dataset_dir(name, data_root) / "prepare"):
            if not paths.manifest_path(name, data_root).exists():
                prepare(name, data_root)
    return Dataset.open(name, data_root)


def plan(dataset: Dataset, protocol: Protocol) -> list[Fold]:
    """The protocol's folds on this dataset; unrunnable folds are reported, never silently dropped."""
    split_dir = dataset.raw / "splits"  # HEST-Bench tasks ship their folds as CSV files here
    folds, problems = protocol.folds(
        dataset.patients,
        dataset.has_image,
        eval_pool=dataset.card.eval_pool,
        groups=dataset.card.fold_groups,
        split_dir=split_dir if split_dir.is_dir() else None,
    )
    if not folds:
        raise DataError(
            f"protocol {protocol.name!r} has no runnable fold on {dataset.card.name}: " + "; ".join(problems),
            field="folds",
        )
    return folds


def expand_jobs(
    method: str,
    dataset: str,
    protocol: str | None = None,
    folds: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    data_root: str | None = None,
    suite: str | None = None,
    checkpoint: str | None = None,
) -> list[Job]:
    method_cls = get_method(method)
    ds = open_dataset(dataset, data_root)
    proto = get_protocol(protocol or ds.card.default_protocol)
    all_folds = plan(ds, proto)
    names = [f.name for f in all_folds]
    chosen = select_folds(folds, names, f"protocol {proto.name} on {dataset}")
    cfg_name, cfg = load_config(method_cls, config)
    cfg = deep_merge(cfg, overrides or {})
    return [
        Job(
            method=method,
            dataset=dataset,
            protocol=proto.name,
            fold=f,
            seed=int(s),
            config=cfg,
            config_name=cfg_name,
            suite=suite,
            data_root=data_root,
            checkpoint=checkpoint,
        )
        for f in chosen
        for s in (seeds if seeds else proto.seeds)
    ]


def run_jobs(
    jobs: Sequence[Job],
    output: str | Path,
    *,
    loggers: Sequence[str] = ("csv",),
    progress: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every unfinished job in order; return the rows written by this call (rank 0 only)."""
    output = Path(output)
    rows = []
    for job in jobs:
        if job.job_id in finished_job_ids(output):
            continue
        if global_rank_from_env() == 0:
            # Rank 0 owns the job for its whole run: a second process on the same output leaves it
            # alone instead of wiping its folder (DDP children follow rank 0 and take no claim).
            with claim(output, job.job_id) as mine:
                if not mine or job.job_id in finished_job_ids(output):
                    continue
                row = run_job(job, output, loggers=loggers, progress=progress)
        else:
            row = run_job(job, output, loggers=loggers, progress=progress)
        if row is not None:
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def job_data_config(
    job: Job, ds: Dataset, proto: Protocol, reqs: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The DataModule options and patch settings of a job, as every path that rebuilds its data
    (a run, `stbench predict`) must resolve them: the config's `data` section, HEST-Bench's shipped
    gene list, the method's patch requirements, and a declared-normalised dataset's target."""
    data_cfg = dict(job.config.get("data", {}))
    hest_genes = ds.raw / "var_50genes.json"
    if proto.name == "hest" and hest_genes.exists() and "gene_rule" not in data_cfg:
        # HEST-Bench ships each task's 50 genes: use that list, not a re-derived one.
        data_cfg.update(gene_rule="list", gene_kwargs={"gene_list": str(hest_genes)})
    patch_cfg = {**reqs.patch, **data_cfg.pop("patch", {})}
    if ds.card.counts != "raw":  # values declared normalised: the protocol's transform is skipped
        data_cfg["target"] = target_for_counts(data_cfg.get("target", proto.target), ds.card.counts)
    return data_cfg, patch_cfg


def run_job(
    job: Job, output: str | Path, *, loggers: Sequence[str] = ("csv",), progress: bool = False
) -> dict[str, Any] | None:
    from stbench.data.datamodule import STDataModule
    from stbench.data.patches import PatchSpec

    started = time.time()
    started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    output = Path(output)
    jobdir = output / "jobs" / job.job_id
    if global_rank_from_env() == 0 and jobdir.exists():
        shutil.rmtree(jobdir)  # an unfinished earlier attempt: restart it from a clean state
    L.seed_everything(job.seed, workers=True, verbose=False)

    method_cls = get_method(job.method)
    ds = open_dataset(job.dataset, job.data_root)
    proto = get_protocol(job.protocol)
    fold = next(f for f in plan(ds, proto) if f.name == job.fold)
    reqs = method_cls.requires
    data_cfg, patch_cfg = job_data_config(job, ds, proto, reqs)
    patch_spec = PatchSpec(**patch_cfg) if reqs.image else None
    # Frozen-encoder features (probes): extracted once per (encoder, weights, preprocessing, patches)
    # into the dataset's cache and shared by every job and method that asks for the same ones.
    from stbench.data.features import features_for

    feature_fns = features_for(
        method_cls, job.config.get("method", {}), ds.cache, patch_cfg, progress=progress
    )
    image_task = method_cls.task == "image"
    hidden: tuple[str, ...] = ()
    if image_task:  # latent-diffusion generators read VAE latents of the real tiles (training only)
        from stbench.data.latents import LATENT_REQUESTS, latents_for

        latent_fns = latents_for(
            method_cls, job.config.get("method", {}), ds.cache, patch_cfg, progress=progress
        )
        feature_fns = {**(feature_fns or {}), **(latent_fns or {})} or None
        hidden = tuple(LATENT_REQUESTS)
    slides = [*fold.train, *fold.val, *fold.test]
    dm = STDataModule(
        lambda: ds.load_slides(slides),
        fold,
        protocol=proto,
        patch_spec=patch_spec,
        cache_dir=ds.cache,
        seed=job.seed,
        whole_slide=reqs.whole_slide,
        neighbours=reqs.neighbours,
        include_counts=reqs.counts,
        include_totals=reqs.totals,
        graph=reqs.graph,
        features=feature_fns,
        vocabulary=method_cls.gene_vocabulary(job.config.get("method", {})),
        predict_condition=image_task,
        predict_hidden_features=hidden,
        **data_cfg,
    )
    dm.prepare_data()
    dm.setup("fit")
    # A given checkpoint is read and checked (method, panel, target, leakage) before anything is
    # built or predicted; its weights are applied once the network exists (see checkpoints.py).
    loaded = checkpoints.open_for_job(job, dm) if job.checkpoint else None
    method = method_cls(n_genes=dm.n_genes, genes=dm.genes, **job.config.get("method", {}))

    trainer_cfg = dict(job.config.get("trainer", {}))
    trainer, ckpt_cb = _trainer(
        trainer_cfg,
        jobdir,
        method,
        job,
        loggers,
        progress,
        meta=checkpoints.fold_metadata(job, dm),
        loaded=loaded,
    )
    ckpt_path = None
    if not job.checkpoint:
        for stage in method.stages:
            if stage == "fit":
                trainer.fit(method, datamodule=dm)
                if ckpt_cb is not None and ckpt_cb.best_model_path:
                    ckpt_path = ckpt_cb.best_model_path
            else:
                getattr(method, f"run_stage_{stage}")(dm, trainer)

    pred_dir = jobdir / "predictions" / "parts"
    if trainer.is_global_zero:
        clear_parts(pred_dir)
    trainer.strategy.barrier()
    trainer.predict(method, datamodule=dm, ckpt_path=ckpt_path, return_predictions=False)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return None

    test_rows = dm.spot_table.index[dm.spot_table["split"] == "test"].to_numpy()
    image_metrics = None
    if image_task:
        from stbench.benchmark.evaluate_image_fold import evaluate_image_fold
        from stbench.benchmark.image_writer import gather_tiles

        index, tiles, stats = gather_tiles(pred_dir, test_rows)
        shutil.rmtree(pred_dir, ignore_errors=True)
        ks: list[int] = []
        tile_spec = PatchSpec(**{**patch_cfg, "out_px": int(method.tile_px)})
        per_slide, metrics, image_metrics = evaluate_image_fold(dm, index, tiles, jobdir, job, tile_spec)
    else:
        from stbench.benchmark.evaluate import evaluate_fold

        index, pred, stats = gather_predictions(pred_dir, test_rows)
        shutil.rmtree(pred_dir, ignore_errors=True)
        ks = _pcc_ks(proto, dm.n_genes)
        per_slide, metrics = evaluate_fold(dm, index, pred, jobdir, job, ks)
    dm.panel.save(jobdir / "gene_panel.json")
    row = {
        "schema": 1,
        "job_id": job.job_id,
        "task": method_cls.task,
        "kind": method_cls.kind,
        "suite": job.suite,
        "method": job.method,
        "config_name": job.config_name,
        "dataset": job.dataset,
        "protocol": job.protocol,
        "fold": job.fold,
        "seed": job.seed,
        "config": job.config,
        "config_hash": job.config_hash,
        "gene_set": _describe_panel(dm),
        "gene_panel_hash": dm.panel.hash,
        "n_genes": dm.n_genes,
        "target": target_label(dm.transform.method, ds.card.counts) if dm.transform is not None else None,
        "pcc_k_genes": {str(k): list(dm.panel.top_k(k)) for k in ks},
        "weights": method.weights_id(),
        "checkpoint": {
            "chosen_on": method.monitor if ckpt_path else None,
            "path": os.path.relpath(ckpt_path, output) if ckpt_path else None,
            "from": job.checkpoint,
            **(_checkpoint_provenance(job, loaded) if loaded is not None else {}),
        },
        "test_slides": list(fold.test),
        "train_slides": list(fold.train),
        "metrics": metrics,
        "per_slide": per_slide,
        "predictions": stats,
        "conventions": IMAGE_CONVENTIONS if image_task else CONVENTIONS,
        "provenance": {
            **provenance.git_state(),
            "stbench_version": __import__("stbench").__version__,
            "packages": provenance.package_versions(),
            "hardware": provenance.hardware(trainer_cfg),
            "wall_time_s": round(time.time() - started, 2),
            "peak_memory_mb": provenance.peak_memory_mb(),
            "started_at": started_at,
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    if image_metrics is not None:
        row["image_metrics"] = image_metrics
    write_json_atomic(jobdir / "job.json", job.to_dict())
    append_row(output, row)
    return row


def _pcc_ks(proto: Protocol, n_genes: int) -> list[int]:
    ks = sorted({int(m[3:]) for m in proto.metrics if re.fullmatch(r"pcc\d+", m)} or set(DEFAULT_PCC_K))
    return [k for k in ks if k <= n_genes]


def _describe_panel(dm: Any) -> str:
    p = dm.panel
    params = ", ".join(f"{k}={v}" for k, v in sorted(p.params.items()) if k in ("n", "k", "on", "pool"))
    # No gene count here: it can differ between folds, and rows of one benchmark must share a label.
    return f"{p.rule}{' ' + params if params else ''} (selected on training slides only)"


def _trainer(
    cfg: dict[str, Any],
    jobdir: Path,
    method: Method,
    job: Job,
    loggers: Sequence[str],
    progress: bool,
    *,
    meta: dict[str, Any] | None = None,
    loaded: checkpoints.LoadedCheckpoint | None = None,
) -> tuple[L.Trainer, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    parts = jobdir / "predictions" / "parts"
    if method.task == "image":
        from stbench.benchmark.image_writer import TilePredictionWriter

        callbacks: list[Any] = [TilePredictionWriter(parts)]
    else:
        callbacks = [SpotPredictionWriter(parts)]
    if loaded is not None:  # first: the weights are in place before any other predict hook
        callbacks.insert(0, checkpoints.ApplyCheckpoint(loaded))
    ckpt_cb = None
    if "fit" in method.stages and not job.checkpoint:
        ckpt_cb = ModelCheckpoint(
            dirpath=jobdir / "checkpoints",
            monitor=method.monitor,
            mode="min",
            save_top_k=1,
            filename="best",
            auto_insert_metric_name=False,
        )
        callbacks.append(ckpt_cb)
        if meta is not None:  # provenance that --checkpoint checks later; no state, no RNG
            callbacks.append(checkpoints.CheckpointMetadata(meta))
    opts = {
        "accelerator": "auto",
        "devices": 1,
        "max_epochs": 1,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": progress,
        "enable_model_summary": False,
        "log_every_n_steps": 10,
        "default_root_dir": str(jobdir),
        # Multi-threaded CPU kernels accumulate scatter/gather gradients (every graph method's
        # `h[src]`) in thread order; without this a job's metrics change run to run. "warn": an
        # op with no deterministic kernel (some CUDA ones) warns instead of failing the run.
        "deterministic": "warn",
        **cfg,
    }
    opts["callbacks"] = callbacks + list(opts.pop("callbacks", []))
    opts["logger"] = _loggers(loggers, jobdir, job)
    trainer = L.Trainer(**opts)
    # What a method's own stage needs to build a Trainer like this one (see `stage_trainer`).
    trainer.stbench_options = {k: v for k, v in opts.items() if k not in ("callbacks", "logger")}
    return trainer, ckpt_cb


def stage_trainer(trainer: Any, **overrides: Any) -> L.Trainer:
    """A Trainer for a method's extra stage (DiffBulk's pre-training) on the job's accelerator,
    devices, strategy, precision and determinism, without the job's checkpointing, prediction writer
    or loggers (the stage saves what it produces itself)."""
    base = dict(getattr(trainer, "stbench_options", {}))
    for key in ("max_epochs", "check_val_every_n_epoch", "limit_train_batches", "limit_val_batches"):
        base.pop(key, None)
    opts = {
        **base,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": str(trainer.default_root_dir),
        **overrides,
    }
    return L.Trainer(**opts)


def _loggers(names: Sequence[str], jobdir: Path, job: Job) -> list[Any] | bool:
    from stbench.benchmark.loggers import make_loggers

    return make_loggers(names, jobdir / "logs", job) or False


def _checkpoint_provenance(job: Job, loaded: checkpoints.LoadedCheckpoint) -> dict[str, Any]:
    """What the row says about the checkpoint it predicted with (only rows of --checkpoint jobs)."""
    meta = loaded.meta or {}
    return {
        "sha256": job.checkpoint_sha256,
        "trained_job": {
            k: meta.get(k) for k in ("method", "config_hash", "dataset", "protocol", "fold", "seed")
        },
        "trained_on": list(meta.get("train_slides", [])),
    }


def _load_weights(method: Method, checkpoint: str) -> None:
    """Read a checkpoint safely (weights_only) and load its weights, without the fold checks."""
    checkpoints.apply_weights(method, checkpoints.read_checkpoint(checkpoint))
