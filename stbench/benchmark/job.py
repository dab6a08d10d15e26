"""A job = (method, config, dataset, protocol, fold, seed): the unit the runner executes and resumes.

Configuration precedence (later wins): the method's defaults < its config file (a name such as
`tiny` looked up in `baselines/<method>/configs/`, or a path) < command-line overrides. Only
options that can change results enter the config hash; where a job runs (devices, nodes,
strategy, progress bars, loggers) does not, so the same job on 1 or 8 GPUs has the same id.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
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
    # Content hash of `checkpoint`, taken when the job is made: it enters the job id, so another file
    # under the same name (or the trained job's own output) is never mistaken for this job.
    checkpoint_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.checkpoint and not self.checkpoint_sha256:
            from stbench.benchmark.checkpoints import file_sha256

            self.checkpoint_sha256 = file_sha256(self.checkpoint)

    @property
    def config_hash(self) -> str:
        cfg = copy.deepcopy(self.config)
        for k in LOGISTIC_TRAINER_KEYS:
            cfg.get("trainer", {}).pop(k, None)
        return stable_hash({"method": self.method, "config": cfg})

    @property
    def job_id(self) -> str:
        base = f"{self.method}__{self.dataset}__{self.protocol}__{self.fold}__s{self.seed}__{self.config_hash[:8]}"
        # Jobs without a checkpoint keep the id they always had.
        return (
            f"{base}__ckpt{self.checkpoint_sha256[:12]}"
            if self.checkpoint and self.checkpoint_sha256
            else base
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["checkpoint_sha256"] is None:  # job.json of a job without a checkpoint stays as it was
            d.pop("checkpoint_sha256")
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


# The `run:` section of a file written by `stbench run --print_config`: what the job runs on. With
# it, `stbench run --config FILE` runs the same job again (same config hash, same config_name).
RUN_KEYS = ("method", "config_name", "dataset", "protocol", "folds", "seeds")


def config_dir(method_cls: type | str) -> Path:
    if isinstance(method_cls, str):  # a registered name: found from source, nothing imported
        from stbench.config_schema import method_config_dir

        found = method_config_dir(method_cls)
        if found is None:
            raise StbenchError(f"unknown method {method_cls!r}")
        return found
    return Path(inspect.getfile(method_cls)).resolve().parent / "configs"


def _method_name(method_cls: type | str) -> str:
    return method_cls if isinstance(method_cls, str) else str(getattr(method_cls, "name", method_cls))


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise StbenchError(f"config {path}: not valid YAML{line}") from None


def read_run_section(config: str | None) -> dict[str, Any]:
    """The `run:` section of a config file (empty for a config name or a file without one)."""
    if not config or not Path(config).suffix or not Path(config).is_file():
        return {}
    data = _read_yaml(Path(config))
    run = data.get("run") if isinstance(data, dict) else None
    if run is None:
        return {}
    if not isinstance(run, dict):
        raise StbenchError(f"config {config}: run: must be a mapping with keys {list(RUN_KEYS)}")
    from stbench.config_schema import unknown_key

    for key in run:
        if key not in RUN_KEYS:
            raise unknown_key("the run section", str(key), list(RUN_KEYS), f"config {config}: run.{key}")
    return dict(run)


def load_config(method_cls: type | str, config: str | None) -> tuple[str, dict[str, Any]]:
    """(name, config dict) from a config name in the method's configs/ folder or a YAML path.

    No config means the method's own defaults, never an empty config: `configs/default.yaml`, else
    `configs/paper.yaml` (the paper's settings), else empty sections; the name says which ran.
    Every key is checked, and every value typed, against the constructor that receives it
    (stbench.config_schema): a misspelled key fails here, before any data is read."""
    from stbench.config_schema import check_config, schema_for

    if config is None:
        config = next((c for c in DEFAULT_CONFIGS if (config_dir(method_cls) / f"{c}.yaml").exists()), None)
        if config is None:
            return "default", {s: {} for s in SECTIONS}
    path = Path(config)
    if not path.suffix:
        path = config_dir(method_cls) / f"{config}.yaml"
    if not path.exists():
        avail = sorted(p.stem for p in config_dir(method_cls).glob("*.yaml"))
        raise StbenchError(
            f"config {config!r} not found ({path}); configs of {_method_name(method_cls)}: {avail}"
        )
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise StbenchError(f"config {path}: must be a mapping of sections {list(SECTIONS)}")
    run = read_run_section(str(path))
    data.pop("run", None)
    unknown = set(data) - set(SECTIONS) - set(OPTIONAL_SECTIONS)
    if unknown:
        raise StbenchError(
            f"config {path} has unknown sections {sorted(unknown)}; allowed: {SECTIONS + OPTIONAL_SECTIONS}"
        )
    out = {s: dict(data.get(s) or {}) for s in SECTIONS}
    out.update({s: dict(data[s]) for s in OPTIONAL_SECTIONS if data.get(s)})
    out = check_config(out, schema_for(method_cls), f"config {path}: ")
    return str(run.get("config_name") or path.stem), out


def select_folds(requested: Sequence[str] | None, names: Sequence[str], where: str) -> list[str]:
    """Fold names from `--folds`: names as printed by `stbench splits`, or an index into them
    (`0` = the first fold) where no fold has that name."""
    if not requested:
        return list(names)
    chosen, unknown = [], []
    for f in (str(x) for x in requested):
        if f in names:
            chosen.append(f)
        elif f.lstrip("-").isdigit() and -len(names) <= int(f) < len(names):
            chosen.append(names[int(f)])
        else:
            unknown.append(f)
    if unknown:
        raise StbenchError(f"unknown fold(s) {unknown} of {where}; folds: {list(names)} (or their index)")
    return list(dict.fromkeys(chosen))


def run_document(jobs: Sequence[Job]) -> dict[str, Any]:
    """What `--print_config` prints: a `run:` section naming the jobs and the resolved config
    sections; given back as `--config`, it runs the same jobs."""
    j = jobs[0]
    run = {
        "method": j.method,
        "config_name": j.config_name,
        "dataset": j.dataset,
        "protocol": j.protocol,
        "folds": list(dict.fromkeys(x.fold for x in jobs)),
        "seeds": sorted({x.seed for x in jobs}),
    }
    return {"run": run, **copy.deepcopy(j.config)}
