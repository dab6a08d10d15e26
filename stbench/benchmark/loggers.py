"""Training-curve loggers: CSV by default; TensorBoard and Weights & Biases on request.

W&B runs offline unless the user configured it (WANDB_API_KEY or WANDB_MODE=online), and runs are
grouped by suite / method / dataset so a sweep's folds and seeds sit together.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stbench.errors import StbenchError

LOGGERS = ("csv", "tensorboard", "wandb")


def make_loggers(names: Sequence[str], log_dir: Path, job: Any) -> list[Any]:
    from lightning.pytorch import loggers as pl_loggers

    out: list[Any] = []
    for name in names:
        if name == "none":
            continue
        if name == "csv":
            out.append(pl_loggers.CSVLogger(save_dir=str(log_dir), name="csv", version=""))
        elif name == "tensorboard":
            out.append(pl_loggers.TensorBoardLogger(save_dir=str(log_dir), name="tensorboard", version=""))
        elif name == "wandb":
            online = bool(os.environ.get("WANDB_API_KEY")) or os.environ.get("WANDB_MODE") == "online"
            group = "/".join(x for x in (job.suite or "adhoc", job.method, job.dataset) if x)
            out.append(
                pl_loggers.WandbLogger(
                    project=os.environ.get("WANDB_PROJECT", "stbench"),
                    group=group,
                    name=f"{job.fold}-s{job.seed}",
                    save_dir=str(log_dir),
                    offline=not online,
                    job_type=job.protocol,
                    config={"job_id": job.job_id, **job.config},
                )
            )
        else:
            raise StbenchError(f"unknown logger {name!r}; one of {LOGGERS} or none")
    return out
