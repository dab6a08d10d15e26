"""Benchmark suites: a YAML grid of method x dataset x protocol x seed, run locally or as a SLURM array.

A suite is only a list of jobs (each the same job `stbench run` would make), so everything the runner
guarantees holds here too: a finished job (its row in results.jsonl) is skipped on re-run, an
unfinished one restarts from a clean folder, rows are appended atomically under a lock. On top of
that, each job is *claimed* with a non-blocking lock while it runs, so two launches on one output
folder (a re-submitted array, a second terminal) never run, or wipe, the same job twice.

The suite format is documented in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stbench.benchmark.job import OPTIONAL_SECTIONS, SECTIONS, Job
from stbench.benchmark.store import RESULTS, finished_job_ids, locked, read_results
from stbench.errors import StbenchError

TOP_KEYS = ("name", "description", "output", "grid", "sources", "fallback", "tolerance", "slurm")
ENTRY_KEYS = ("method", "config", "dataset", "protocol", "seeds", "folds", "overrides")
FALLBACK_KEYS = ("dataset", "protocol", "folds")
LAUNCHERS = ("local", "slurm")
# AutoExecutor's shared parameters; anything else in `slurm:` is a SLURM-specific one (slurm_<key>).
SUBMITIT_GENERIC = (
    "name",
    "timeout_min",
    "mem_gb",
    "nodes",
    "cpus_per_task",
    "gpus_per_node",
    "tasks_per_node",
    "stderr_to_stdout",
)


class SuiteError(StbenchError):
    """A bad suite file; the message starts with `file: key:` so the line to fix is obvious."""

    def __init__(self, file: str | Path | None, key: str, problem: str) -> None:
        self.file, self.key, self.problem = str(file) if file else "<suite>", key, problem
        super().__init__(f"{self.file}: {key}: {problem}")


@dataclass(frozen=True)
class GridEntry:
    """One `grid:` item; methods x datasets x protocols x folds x seeds."""

    index: int
    methods: tuple[str, ...]
    datasets: tuple[str, ...]
    protocols: tuple[str | None, ...]
    seeds: tuple[int, ...] | None
    folds: tuple[str, ...] | int | None  # names, the first n folds, or all
    config: str | Mapping[str, str] | None
    overrides: Mapping[str, Any]

    def config_for(self, method: str) -> str | None:
        if isinstance(self.config, Mapping):
            return self.config.get(method)
        return self.config

    def overrides_for(self, method: str) -> dict[str, Any]:
        if self.overrides and set(self.overrides) <= set(SECTIONS) | set(OPTIONAL_SECTIONS):
            return dict(self.overrides)
        return dict(self.overrides.get(method) or {})


@dataclass(frozen=True)
class Tolerance:
    """How much worse than the committed value a metric may get: absolute, or relative to it."""

    value: float
    relative: bool = False

    def allowed(self, committed: float) -> float:
        return self.value * abs(committed) if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"


@dataclass
class Plan:
    """The jobs of a suite on one data root, and which datasets were replaced by the fallback."""

    jobs: list[Job]
    datasets: dict[str, str]  # requested -> used
    notes: list[str] = field(default_factory=list)


@dataclass
class Suite:
    name: str
    grid: list[GridEntry]
    path: Path | None = None
    description: str = ""
    output: str | None = None
    sources: dict[str, Path] = field(default_factory=dict)
    fallback: dict[str, Any] | None = None
    tolerance: dict[str, Tolerance] = field(default_factory=dict)
    slurm: dict[str, Any] = field(default_factory=dict)

    def default_output(self) -> str:
        return self.output or f"outputs/{self.name}"

    def committed_results(self) -> Path | None:
        """benchmarks/results/<name>/results.jsonl beside benchmarks/suites/<file> (None without a file)."""
        return self.path.parent.parent / "results" / self.name / RESULTS if self.path else None

    def resolve_dataset(self, name: str, data_root: str | None = None) -> tuple[str, str | None]:
        """(dataset to use, note). Prepared or synthetic: itself. Else prepared from `sources` when that
        folder exists. Else the fallback, if the suite declares one; else an error saying how to fix it."""
        from stbench.data import paths
        from stbench.data.catalog import get_card

        card = get_card(name)
        if card.reader == "synthetic" or paths.manifest_path(name, data_root).exists():
            return name, None
        src = self.sources.get(name)
        if src is not None and src.exists():
            from stbench.data.prepare import prepare

            with locked(paths.dataset_dir(name, data_root) / "prepare"):
                if not paths.manifest_path(name, data_root).exists():
                    prepare(name, data_root, src)
            return name, f"prepared {name} from {src} under {paths.data_root(data_root)}"
        why = (
            f"its source {src} does not exist"
            if src is not None
            else f"the suite has no `sources: {{{name}: DIR}}`"
        )
        if self.fallback:
            fb = self.fallback["dataset"]
            return fb, (
                f"{name} is not prepared under {paths.data_root(data_root)} and {why}: running the "
                f"suite's fallback dataset {fb!r} instead"
            )
        raise SuiteError(
            self.path,
            "sources",
            f"dataset {name!r} is not prepared under "
            f"{paths.data_root(data_root)} and {why}; run `stbench data prepare {name} --source DIR` "
            f"({card.how_to_get}) or declare a `fallback:`",
        )

    def plan(self, data_root: str | None = None) -> Plan:
        used: dict[str, str] = {}
        notes: list[str] = []
        jobs: list[Job] = []
        seen: set[str] = set()
        for e in self.grid:
            for requested in e.datasets:
                if requested not in used:
                    used[requested], note = self.resolve_dataset(requested, data_root)
                    if note:
                        notes.append(note)
                for j in self._expand(e, requested, used[requested], data_root):
                    if j.job_id not in seen:  # overlapping entries run a job once
                        seen.add(j.job_id)
                        jobs.append(j)
        return Plan(jobs, used, notes)

    def _expand(self, e: GridEntry, requested: str, ds: str, data_root: str | None) -> list[Job]:
        from stbench.benchmark.runner import expand_jobs

        fell_back = ds != requested
        folds = e.folds
        if fell_back and not isinstance(folds, int):
            folds = self.fallback.get("folds")  # fold names of one dataset mean nothing on another
        out: list[Job] = []
        for protocol in e.protocols:
            if fell_back:
                protocol = self.fallback.get("protocol") or protocol
            for method in e.methods:
                try:
                    expanded = expand_jobs(
                        method,
                        ds,
                        protocol,
                        folds=None if isinstance(folds, int) else folds,
                        seeds=e.seeds,
                        config=e.config_for(method),
                        overrides=e.overrides_for(method),
                        data_root=data_root,
                        suite=self.name,
                    )
                except StbenchError as exc:
                    raise SuiteError(self.path, f"grid[{e.index}]", f"{method} on {ds}: {exc}") from exc
                if isinstance(folds, int):
                    keep = list(dict.fromkeys(j.fold for j in expanded))[:folds]
                    expanded = [j for j in expanded if j.fold in keep]
                out += expanded
        return out

    def jobs(self, data_root: str | None = None) -> list[Job]:
        return self.plan(data_root).jobs


# ----------------------------------------------------------------------------------------------------
# Loading and validation


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    if not path.is_file():
        raise SuiteError(path, "file", "suite file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SuiteError(path, "yaml", f"not valid YAML ({exc})") from exc
    return parse_suite(data, path)


def parse_suite(data: Any, path: str | Path | None = None) -> Suite:
    """Validate a decoded suite; every error names the file and the key (e.g. grid[1].method)."""
    path = Path(path) if path is not None else None
    if not isinstance(data, dict):
        raise SuiteError(path, "top level", f"a suite is a mapping with keys {list(TOP_KEYS)}")
    _no_unknown(path, "top level", data, TOP_KEYS)
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SuiteError(path, "name", f"required, letters/digits/_.- only (it names folders), got {name!r}")
    grid = data.get("grid")
    if not isinstance(grid, list) or not grid:
        raise SuiteError(path, "grid", "required: a non-empty list of entries")
    entries = [_entry(path, i, e) for i, e in enumerate(grid)]
    output = data.get("output")
    if output is not None and not isinstance(output, str):
        raise SuiteError(path, "output", f"must be a folder path, got {output!r}")
    return Suite(
        name=name,
        grid=entries,
        path=path.resolve() if path else None,
        description=str(data.get("description") or ""),
        output=output,
        sources=_sources(path, data.get("sources")),
        fallback=_fallback(path, data.get("fallback")),
        tolerance=parse_tolerance(data.get("tolerance"), path),
        slurm=_mapping(path, "slurm", data.get("slurm")),
    )


def _no_unknown(path: Path | None, key: str, d: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(d) - set(allowed), key=str)
    if unknown:
        raise SuiteError(path, key, f"unknown key(s) {unknown}; allowed: {list(allowed)}")


def _mapping(path: Path | None, key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SuiteError(path, key, f"must be a mapping, got {value!r}")
    return dict(value)


def _names(
    path: Path | None, key: str, value: Any, kind: str, valid: Sequence[str], allow_none: bool = False
) -> tuple[Any, ...]:
    if value is None and allow_none:
        return (None,)
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) for v in values):
        raise SuiteError(path, key, f"must be a {kind} name or a list of them, got {value!r}")
    for v in values:
        if v not in valid:
            raise SuiteError(path, key, f"unknown {kind} {v!r}; valid: {', '.join(sorted(valid))}")
    return tuple(dict.fromkeys(values))


def _valid(kind: str) -> list[str]:
    if kind == "method":
        from stbench.methods.registry import available_methods

        return list(available_methods())
    if kind == "dataset":
        from stbench.data.catalog import CATALOG

        return list(CATALOG)
    from stbench.data.protocols import PROTOCOLS

    return list(PROTOCOLS)


def _entry(path: Path | None, i: int, e: Any) -> GridEntry:
    key = f"grid[{i}]"
    if not isinstance(e, dict):
        raise SuiteError(path, key, f"each grid entry is a mapping with keys {list(ENTRY_KEYS)}")
    _no_unknown(path, key, e, ENTRY_KEYS)
    for required in ("method", "dataset"):
        if e.get(required) is None:
            raise SuiteError(path, f"{key}.{required}", "required")
    methods = _names(path, f"{key}.method", e["method"], "method", _valid("method"))
    datasets = _names(path, f"{key}.dataset", e["dataset"], "dataset", _valid("dataset"))
    protocols = _names(
        path, f"{key}.protocol", e.get("protocol"), "protocol", _valid("protocol"), allow_none=True
    )

    seeds = e.get("seeds")
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if seeds is not None and (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise SuiteError(
            path, f"{key}.seeds", f"must be an integer, a list of integers or null, got {seeds!r}"
        )

    folds = e.get("folds")
    if isinstance(folds, bool) or (isinstance(folds, int) and folds < 1):
        raise SuiteError(path, f"{key}.folds", f"an integer means the first n folds (n >= 1), got {folds!r}")
    if isinstance(folds, (str, list)):
        folds = [folds] if isinstance(folds, str) else folds
        if not folds or not all(isinstance(f, (str, int)) for f in folds):
            raise SuiteError(path, f"{key}.folds", f"must be fold names, an integer n or null, got {folds!r}")
        if len(datasets) > 1:
            raise SuiteError(
                path,
                f"{key}.folds",
                "fold names belong to one dataset; split the entry per dataset "
                "or use an integer (the first n folds of each)",
            )
        folds = tuple(str(f) for f in folds)
    elif folds is not None and not isinstance(folds, int):
        raise SuiteError(path, f"{key}.folds", f"must be fold names, an integer n or null, got {folds!r}")

    config = e.get("config")
    if isinstance(config, dict):
        config = {m: _config_path(path, c) for m, c in config.items()}
        stray = sorted(set(config) - set(methods))
        if stray:
            raise SuiteError(
                path, f"{key}.config", f"keys {stray} are not methods of this entry {list(methods)}"
            )
    elif config is not None and not isinstance(config, str):
        raise SuiteError(
            path, f"{key}.config", f"a config name/path or a mapping method -> config, got {config!r}"
        )
    else:
        config = _config_path(path, config)
    overrides = _mapping(path, f"{key}.overrides", e.get("overrides"))
    if overrides and not (
        set(overrides) <= set(SECTIONS) | set(OPTIONAL_SECTIONS) or set(overrides) <= set(methods)
    ):
        raise SuiteError(
            path,
            f"{key}.overrides",
            f"keys must be sections {list(SECTIONS)} (all methods) or "
            f"method names {list(methods)} (each mapping to sections), got {sorted(overrides)}",
        )
    for m in methods:  # config names resolve now, so a typo fails before anything runs
        _check_config(path, f"{key}.config", m, config.get(m) if isinstance(config, dict) else config)
    overrides = _typed_overrides(path, f"{key}.overrides", methods, overrides)
    return GridEntry(
        i, methods, datasets, protocols, tuple(seeds) if seeds else None, folds, config, overrides
    )


def _config_path(path: Path | None, config: Any) -> Any:
    """A config given as a relative YAML path is relative to the suite file; a bare name stays a name."""
    if isinstance(config, str) and Path(config).suffix in (".yaml", ".yml") and path is not None:
        p = Path(os.path.expandvars(config)).expanduser()
        return str(p if p.is_absolute() else (path.resolve().parent / p).resolve())
    return config


def _check_config(path: Path | None, key: str, method: str, config: str | None) -> None:
    from stbench.benchmark.job import load_config
    from stbench.methods.registry import get_method

    try:
        load_config(get_method(method), config)
    except StbenchError as exc:
        raise SuiteError(path, key, str(exc)) from exc


def _typed_overrides(
    path: Path | None, key: str, methods: Sequence[str], overrides: dict[str, Any]
) -> dict[str, Any]:
    """Overrides checked (keys) and typed (values) by each method's schema, as `stbench run` checks
    `--method.X`: a misspelled key fails at load time, naming the file and key."""
    from stbench.config_schema import check_config, schema_for

    shared = set(overrides) <= set(SECTIONS) | set(OPTIONAL_SECTIONS)
    out: dict[str, Any] = {}
    for m in methods:
        part = overrides if shared else overrides.get(m)
        if not part:
            continue
        if not isinstance(part, dict):
            raise SuiteError(path, f"{key}.{m}", f"must be a mapping of sections, got {part!r}")
        where = key if shared else f"{key}.{m}"
        try:
            typed = check_config(dict(part), schema_for(m), "")
        except StbenchError as exc:
            raise SuiteError(path, where, str(exc)) from exc
        if shared:
            if out and typed != out:  # one shared mapping cannot be typed two ways
                raise SuiteError(path, key, f"typed differently for {m}; give each method its own overrides")
            out = typed
        else:
            out[m] = typed
    return out if out or not overrides else dict(overrides)


def _sources(path: Path | None, value: Any) -> dict[str, Path]:
    out = {}
    for name, src in _mapping(path, "sources", value).items():
        _names(path, f"sources.{name}", name, "dataset", _valid("dataset"))
        if not isinstance(src, str):
            raise SuiteError(path, f"sources.{name}", f"must be a folder path, got {src!r}")
        p = Path(os.path.expandvars(src)).expanduser()
        if not p.is_absolute() and path is not None:
            p = path.resolve().parent / p  # relative to the suite file, whatever the working directory
        out[name] = p.resolve()
    return out


def _fallback(path: Path | None, value: Any) -> dict[str, Any] | None:
    fb = _mapping(path, "fallback", value)
    if not fb:
        return None
    _no_unknown(path, "fallback", fb, FALLBACK_KEYS)
    if "dataset" not in fb:
        raise SuiteError(path, "fallback.dataset", "required (e.g. synthetic)")
    _names(path, "fallback.dataset", fb["dataset"], "dataset", _valid("dataset"))
    if fb.get("protocol") is not None:
        _names(path, "fallback.protocol", fb["protocol"], "protocol", _valid("protocol"))
    folds = fb.get("folds")
    if folds is not None and not (isinstance(folds, list) and all(isinstance(f, str) for f in folds)):
        raise SuiteError(path, "fallback.folds", f"must be a list of fold names or null, got {folds!r}")
    return fb


def parse_tolerance(value: Any, path: str | Path | None = None) -> dict[str, Tolerance]:
    """`{pcc: 0.05, mse: "10%"}`: a number is an absolute margin, "N%" is relative to the committed value."""
    out = {}
    for metric, tol in _mapping(Path(path) if path else None, "tolerance", value).items():
        key = f"tolerance.{metric}"
        if isinstance(tol, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*%\s*", tol):
            out[str(metric)] = Tolerance(float(tol.strip().rstrip("%")) / 100, relative=True)
        elif isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol >= 0 and math.isfinite(tol):
            out[str(metric)] = Tolerance(float(tol))
        else:
            raise SuiteError(
                path, key, f"must be a number >= 0 (absolute) or a percentage like '10%', got {tol!r}"
            )
    return out


# ----------------------------------------------------------------------------------------------------
# Running


def clean_stale_temp(output: str | Path) -> list[Path]:
    """Remove temp files an interrupted append left beside results.jsonl (safe: taken under the store lock)."""
    out = Path(output)
    removed: list[Path] = []
    if not out.is_dir():
        return removed
    with locked(out / RESULTS):
        for p in out.glob(f".{RESULTS}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def _is_rank_zero() -> bool:
    from stbench.benchmark.runner import global_rank_from_env

    return global_rank_from_env() == 0


def _run_claimed(job: Job, output: Path, loggers: Sequence[str]) -> dict[str, Any] | None:
    """Run one job unless it is finished or claimed by another process; the row, or None."""
    from stbench.benchmark.runner import run_jobs

    rows = run_jobs([job], output, loggers=loggers)  # claims the job (rank 0) and re-checks "finished"
    return rows[0] if rows else None


def run_suite(
    suite: Suite,
    output: str | Path | None = None,
    launcher: str = "local",
    data_root: str | None = None,
    slurm: Mapping[str, Any] | None = None,
    progress: bool = False,
    loggers: Sequence[str] = ("csv",),
    wait: bool = True,
) -> list[dict[str, Any]]:
    """Run every unfinished job of the suite; return the rows this call wrote (rank 0)."""
    if launcher not in LAUNCHERS:
        raise StbenchError(f"unknown launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}")
    plan = suite.plan(_launch_root(launcher, data_root))
    return run_plan(
        suite, plan, output, launcher=launcher, slurm=slurm, progress=progress, loggers=loggers, wait=wait
    )


def _launch_root(launcher: str, data_root: str | None) -> str | None:
    """Array tasks may start on other nodes with another environment: pin the data root in their jobs."""
    if launcher != "slurm":
        return data_root
    from stbench.data import paths

    return str(paths.data_root(data_root))


def run_plan(
    suite: Suite,
    plan: Plan,
    output: str | Path | None = None,
    launcher: str = "local",
    slurm: Mapping[str, Any] | None = None,
    progress: bool = False,
    loggers: Sequence[str] = ("csv",),
    wait: bool = True,
) -> list[dict[str, Any]]:
    output = Path(output or suite.default_output())
    _say(plan.notes)
    if _is_rank_zero():
        output.mkdir(parents=True, exist_ok=True)
        clean_stale_temp(output)
    done = finished_job_ids(output)
    todo = [j for j in plan.jobs if j.job_id not in done]
    if launcher == "slurm":
        return _run_slurm(suite, todo, output, {**suite.slurm, **(slurm or {})}, loggers, wait)
    rows: list[dict[str, Any]] = []
    busy: list[str] = []
    with _progress(
        progress and _is_rank_zero(), len(plan.jobs), len(plan.jobs) - len(todo), suite.name
    ) as advance:
        for job in todo:
            row = _run_claimed(job, output, loggers)
            if row is not None:
                rows.append(row)
            elif _is_rank_zero() and job.job_id not in finished_job_ids(output):
                busy.append(job.job_id)
            advance(job.job_id)
    if busy:
        _say([f"{len(busy)} job(s) were running in another process and were left to it: {', '.join(busy)}"])
    return rows


@contextlib.contextmanager
def _progress(enabled: bool, total: int, completed: int, name: str) -> Iterator[Any]:
    if not enabled:
        yield lambda job_id: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]suite {task.fields[suite]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[job]}"),
    ) as bar:
        task = bar.add_task("suite", total=total, completed=completed, suite=name, job="")
        yield lambda job_id: bar.update(task, advance=1, job=job_id)


def _say(lines: Sequence[str]) -> None:
    if not lines or not _is_rank_zero():
        return
    from stbench.utils.table import console

    for line in lines:
        console().print(f"note: {line}", soft_wrap=True, markup=False, highlight=False)


# ---- SLURM through submitit ------------------------------------------------------------------------


def parse_slurm_time(value: Any) -> int:
    """SLURM time (minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]) or an int of minutes -> whole minutes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise StbenchError(f"slurm.time {value!r} is not a SLURM time (e.g. 90, 01:30:00, 1-00:00:00)")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # minutes
        seconds = a * 60
    return max(1, math.ceil(seconds / 60))


def submitit_parameters(slurm: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(cluster, AutoExecutor parameters) from the suite's `slurm:` mapping.

    `time` becomes timeout_min; shared keys (gpus_per_node, cpus_per_task, mem_gb, nodes, tasks_per_node,
    ...) pass as they are; any other key is SLURM-specific (partition -> slurm_partition, array_parallelism,
    account, qos, constraint, setup, additional_parameters). `cluster: local` runs the same array through
    submitit's local executor (tests, a workstation); `cluster: debug` runs it in-process.
    """
    params = dict(slurm)
    cluster = str(params.pop("cluster", "slurm"))
    out: dict[str, Any] = {}
    for k, v in params.items():
        if v is None:
            continue
        if k == "time":
            out["timeout_min"] = parse_slurm_time(v)
        elif k in SUBMITIT_GENERIC or k.startswith(("slurm_", "local_", "debug_")):
            out[k] = v
        else:
            out[f"slurm_{k}"] = v
    return cluster, out


def _quiet() -> None:
    """Lightning sets its loggers' level when imported, so import it before quietening them."""
    import lightning.pytorch  # noqa: F401

    from stbench.commands import quiet_lightning

    quiet_lightning()


def _array_task(job: Job, output: str, loggers: Sequence[str]) -> dict[str, Any] | None:
    """What one array task runs (module-level so submitit can pickle it; the Job is plain data)."""
    _quiet()
    rank = 0
    with contextlib.suppress(Exception):  # outside a submitit job (e.g. called directly) there is no env
        import submitit

        rank = submitit.JobEnvironment().global_rank
    if rank != 0:
        from stbench.benchmark.runner import run_jobs

        run_jobs([job], output, loggers=loggers)
        return None
    return _run_claimed(job, Path(output), loggers)


def _run_slurm(
    suite: Suite, todo: list[Job], output: Path, slurm: Mapping[str, Any], loggers: Sequence[str], wait: bool
) -> list[dict[str, Any]]:
    try:
        import submitit
    except ImportError as exc:
        raise StbenchError("--launcher slurm needs submitit: pip install 'submitit>=1.5'") from exc
    if not todo:
        return []
    cluster, params = submitit_parameters(slurm)
    folder = output / "submitit"
    try:
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
        executor.update_parameters(name=f"stbench-{suite.name}", **params)
    except (NameError, ValueError, AssertionError, TypeError) as exc:
        raise SuiteError(suite.path, "slurm", f"submitit refused the parameters {params}: {exc}") from exc
    n = len(todo)
    sjobs = executor.map_array(_array_task, todo, [str(output)] * n, [tuple(loggers)] * n)
    from stbench.utils.io import write_json_atomic

    write_json_atomic(
        folder / f"submitted-{sjobs[0].job_id.split('_')[0]}.json",
        {j.job_id: s.job_id for j, s in zip(todo, sjobs, strict=True)},
    )
    _say([f"submitted {n} job(s) to {cluster} as array {sjobs[0].job_id.split('_')[0]} (logs: {folder})"])
    if not wait:
        return []
    rows, failures = [], []
    for job, sj in zip(todo, sjobs, strict=True):
        try:
            row = sj.result()
        except Exception as exc:  # one failed task must not hide the others' results
            failures.append(
                f"{job.job_id} (array task {sj.job_id}, log {sj.paths.stderr}): "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}"
            )
            continue
        if row is not None:
            rows.append(row)
    if failures:
        raise StbenchError(
            f"{len(failures)} of {n} array task(s) failed (finished rows are kept; re-run to "
            "retry only these):\n" + "\n".join(f"  - {f}" for f in failures)
        )
    return rows


# ----------------------------------------------------------------------------------------------------
# Comparison with committed results


def compare_to_committed(
    rows: Sequence[Mapping[str, Any]],
    committed_rows: Sequence[Mapping[str, Any]],
    tolerance: Mapping[str, Tolerance | float | str],
) -> list[str]:
    """Problems that should fail CI: a metric worse than committed by more than its tolerance, a committed
    job not run, a run job without a committed row, a number that became null. Rows match by job id
    (method, dataset, protocol, fold, seed and config hash), so only identical jobs are compared."""
    from stbench.benchmark.results import LOWER_IS_BETTER

    tol = {
        k: v if isinstance(v, Tolerance) else next(iter(parse_tolerance({k: v}).values()))
        for k, v in tolerance.items()
    }
    problems: list[str] = []
    new = _by_id(rows, "new", problems)
    old = _by_id(committed_rows, "committed", problems)
    for jid in old:
        if jid not in new:
            problems.append(f"{jid}: in the committed results but not run")
    for jid in new:
        if jid not in old:
            problems.append(f"{jid}: no committed result (commit the new rows if the change is intended)")
    for jid, crow in old.items():
        if jid not in new:
            continue
        nm, cm = new[jid].get("metrics") or {}, crow.get("metrics") or {}
        for metric, t in tol.items():
            c, v = cm.get(metric), nm.get(metric)
            if metric not in cm:
                continue  # the committed row never had it: nothing to degrade from
            if c is None:
                continue  # committed null (e.g. pcc of a constant predictor): a number now is not worse
            if v is None:
                problems.append(
                    f"{jid}: {metric} was {c:.4f}, now null ({metric}_excluded = "
                    f"{nm.get(metric + '_excluded')})"
                )
                continue
            lower = metric in LOWER_IS_BETTER
            worse = (v - c) if lower else (c - v)
            if worse > t.allowed(c) + 1e-12:
                problems.append(
                    f"{jid}: {metric} {c:.4f} -> {v:.4f}, worse by {worse:.4f} > tolerance {t} "
                    f"({'lower' if lower else 'higher'} is better)"
                )
    return problems


def _by_id(rows: Sequence[Mapping[str, Any]], what: str, problems: list[str]) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        if r["job_id"] in out:
            problems.append(f"{r['job_id']}: appears twice in the {what} rows")
        out[r["job_id"]] = r
    return out


def check_against_committed(
    suite: Suite, output: str | Path, plan: Plan, committed: str | Path | None = None
) -> tuple[list[str], list[str]]:
    """(problems, notes) for the suite's rows in `output` against committed rows (default: the suite's
    benchmarks/results/<name>/results.jsonl). Committed rows of a dataset the run replaced by the
    fallback are not compared (a note says so): they cannot match."""
    committed = Path(committed) if committed else suite.committed_results()
    if committed is None or not committed.exists():
        return [f"no committed results at {committed}"], []
    ids = {j.job_id for j in plan.jobs}
    rows = [r for r in read_results(Path(output) / RESULTS) if r["job_id"] in ids]
    ran = set(plan.datasets.values())
    cold = [r for r in read_results(committed) if r.get("suite") in (None, suite.name)]
    skipped = sorted({r["dataset"] for r in cold if r["dataset"] not in ran})
    notes = [
        f"committed rows on {d} not compared: this run used the fallback dataset instead"
        for d in skipped
        if d in plan.datasets and plan.datasets[d] != d
    ]
    notes += [
        f"committed rows on {d} not compared: the suite no longer runs it"
        for d in skipped
        if d not in plan.datasets
    ]
    cold = [r for r in cold if r["dataset"] in ran]
    return compare_to_committed(rows, cold, suite.tolerance), notes


# ----------------------------------------------------------------------------------------------------
# The `stbench benchmark` command


def benchmark(
    suite_path: str | Path,
    *,
    output: str | None = None,
    launcher: str = "local",
    data_root: str | None = None,
    dry_run: bool = False,
    progress: bool = False,
    slurm: Mapping[str, Any] | None = None,
    loggers: Sequence[str] = ("csv",),
    compare: str | Path | None = None,
) -> int:
    """Load, plan (list with --dry-run), run, print one table per dataset/protocol; with --compare FILE
    (committed rows, e.g. benchmarks/results/ci/results.jsonl) return 1 when a job got worse."""
    from stbench.benchmark.summary import print_summary
    from stbench.utils.table import print_rows

    _quiet()
    suite = load_suite(suite_path)
    out = Path(output or suite.default_output())
    if launcher not in LAUNCHERS:
        raise StbenchError(f"unknown launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}")
    plan = suite.plan(_launch_root(launcher, data_root))
    if dry_run:
        _say(plan.notes)
        done = finished_job_ids(out)
        print_rows(
            [
                {
                    "job_id": j.job_id,
                    "method": j.method,
                    "config": j.config_name,
                    "dataset": j.dataset,
                    "protocol": j.protocol,
                    "fold": j.fold,
                    "seed": j.seed,
                    "status": "finished" if j.job_id in done else "to run",
                }
                for j in plan.jobs
            ],
            title=f"suite {suite.name}: {len(plan.jobs)} job(s), {sum(j.job_id in done for j in plan.jobs)} "
            f"finished, output {out}",
        )
        return 0
    run_plan(suite, plan, out, launcher=launcher, slurm=slurm, progress=progress, loggers=loggers)
    if not _is_rank_zero():
        return 0
    groups: dict[tuple[str, str], set[str]] = {}
    for j in plan.jobs:
        groups.setdefault((j.dataset, j.protocol), set()).add(j.job_id)
    for ids in groups.values():
        print_summary(out, ids)
    if compare is None:
        return 0
    from stbench.utils.table import console

    problems, notes = check_against_committed(suite, out, plan, compare)
    _say(notes)
    for p in problems:
        console().print(f"regression: {p}", soft_wrap=True, markup=False, highlight=False)
    if not problems:
        tol = ", ".join(f"{k} {v}" for k, v in suite.tolerance.items())
        console().print(
            f"all {len(plan.jobs)} job(s) within tolerance ({tol}) of {compare}",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
    return 1 if problems else 0
