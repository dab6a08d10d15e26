"""A job = (method, config, dataset, protocol, fold, seed): the unit the runner executes and resumes.

Configuration precedence (later wins): the method's defaults < its config file (a name such as
`tiny` looked up in `baselines/<method>/configs/`, or a path) < command-line overrides. Only
options that can change results enter the config hash; where a job runs (devices, nodes,
strategy, progress bars, loggers) does not, so the same job on 1 or 8 GPUs has the same id.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stbench.errors import StbenchError
from stbench.utils.io import stable_hash

# Trainer options that say where/how a job runs, not what it computes.
LOGISTIC_TRAINER_KEYS = {
    "devices",
    "num_nodes",
    "strategy",
    "accelerator",
    "enable_progress_bar",
    "logger",
    "log_every_n_steps",
    "default_root_dir",
    "enable_model_summary",
}
SECTIONS = ("method", "data", "trainer")
# Present only when a config has it, so configs without it keep their hashes (and their job ids).
OPTIONAL_SECTIONS = ("evaluation",)  # image-generation scoring: feature encoders, k grid, bootstrap


@dataclass
class Job:
    method: str
    dataset: str
    protocol: str
    fold: str
    seed: int
    config: dict[str, Any] = field(default_factory=lambda: {s: {} for s in SECTIONS})
    config_name: str = "default"
    suite: str | None = None
    data_root: str | None = None
    checkpoint: str | None = None  # predict-only from a trained checkpoint (skips training stages)

    @property
    def config_hash(self) -> str:
        cfg = copy.deepcopy(self.config)
        for k in LOGISTIC_TRAINER_KEYS:
            cfg.get("trainer", {}).pop(k, None)
        return stable_hash({"method": self.method, "config": cfg})

    @property
    def job_id(self) -> str:
        return f"{self.method}__{self.dataset}__{self.protocol}__{self.fold}__s{self.seed}__{self.config_hash[:8]}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(job_id=self.job_id, config_hash=self.config_hash)
        return d


# Looked up in this order when no --config is given.
DEFAULT_CONFIGS = ("default", "paper")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = (
            deep_merge(out[k], v)
            if isinstance(v, dict) and isinstance(out.get(k), dict)
            else copy.deepcopy(v)
        )
    return out


def config_dir(method_cls: type) -> Path:
    return Path(inspect.getfile(method_cls)).resolve().parent / "configs"


def load_config(method_cls: type, config: str | None) -> tuple[str, dict[str, Any]]:
    """(name, config dict) from a config name in the method's configs/ folder or a YAML path.

    No config means the method's own defaults, never an empty config: `configs/default.yaml`, else
    `configs/paper.yaml` (the paper's settings), else empty sections; the name says which ran."""
    if config is None:
        config = next((c for c in DEFAULT_CONFIGS if (config_dir(method_cls) / f"{c}.yaml").exists()), None)
        if config is None:
            return "default", {s: {} for s in SECTIONS}
    path = Path(config)
    if not path.suffix:
        path = config_dir(method_cls) / f"{config}.yaml"
    if not path.exists():
        avail = sorted(p.stem for p in config_dir(method_cls).glob("*.yaml"))
        raise StbenchError(f"config {config!r} not found ({path}); configs of {method_cls.name}: {avail}")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - set(SECTIONS) - set(OPTIONAL_SECTIONS)
    if unknown:
        raise StbenchError(
            f"config {path} has unknown sections {sorted(unknown)}; allowed: {SECTIONS + OPTIONAL_SECTIONS}"
        )
    out = {s: dict(data.get(s) or {}) for s in SECTIONS}
    out.update({s: dict(data[s]) for s in OPTIONAL_SECTIONS if data.get(s)})
    return path.stem, out
