"""The `stbench` command line.

Errors that stbench raises on purpose (bad data, unknown names, leakage) print one clear message
and exit with status 2; anything else is a bug and keeps its traceback. Argument errors (unknown or
misspelled `--method.X` / `--data.X` / `--trainer.X` keys, values of the wrong type) are found here,
from the constructors' signatures read as source (stbench.config_schema), before torch, lightning or
any data is touched, so they return in well under a second.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from jsonargparse import ArgumentParser

from stbench.errors import StbenchError, UnknownNameError


def _flag(p: ArgumentParser, name: str, help: str | None = None) -> None:
    """A boolean option that works bare (`--check`) and with a value (`--check false`); a dashed
    name also answers to its underscore spelling (`--dry-run` / `--dry_run`)."""
    alias = "--" + name[2:].replace("-", "_")
    names = [name] + ([alias] if alias != name else [])
    p.add_argument(*names, type=bool, nargs="?", const=True, default=False, help=help)


def _parser() -> ArgumentParser:
    # exit_on_error=False reaches every subcommand (jsonargparse copies it when one is added): main()
    # turns argument errors into one line.
    p = ArgumentParser(
        prog="stbench",
        description="Benchmark of histology-to-spatial-expression methods.",
        exit_on_error=False,
    )
    sub = p.add_subcommands(dest="command", required=True)

    ls = ArgumentParser(description="List registered things.")
    ls.add_argument("what", choices=["datasets", "protocols", "readers", "methods", "encoders"])
    sub.add_subcommand("list", ls, help="list datasets, protocols or readers")

    data = ArgumentParser(description="Prepare, describe and check datasets.")
    sub.add_subcommand("data", data, help="prepare, describe and check datasets")
    dsub = data.add_subcommands(dest="data_command", required=True)
    for name, helptext in (
        ("prepare", "fetch or link a dataset into the data root"),
        ("info", "one row per slide: slide, patient, spots, genes, image, mpp, spot size"),
        ("check", "list every problem found, each naming file, slide and field"),
    ):
        sp = ArgumentParser(description=helptext)
        sp.add_argument("dataset", type=str, help="dataset name (see `stbench list datasets`)")
        sp.add_argument(
            "--data-root",
            type=str | None,
            default=None,
            help="data root (default: $STBENCH_DATA or ~/.cache/stbench/data)",
        )
        if name == "prepare":
            sp.add_argument(
                "--source",
                type=str | None,
                default=None,
                help="local copy in the public layout (offline install); linked, not copied",
            )
            _flag(sp, "--copy", "copy --source instead of linking it")
        dsub.add_subcommand(name, sp, help=helptext)

    sp = ArgumentParser(description="Print every fold's train / validation / test slides.")
    sp.add_argument("dataset", type=str)
    sp.add_argument("--protocol", type=str | None, default=None, help="protocol (default: the dataset's)")
    sp.add_argument("--data-root", type=str | None, default=None)
    sub.add_subcommand("splits", sp, help="print the folds of a protocol on a dataset")

    rp = ArgumentParser(
        description="Train and test a method on every fold (and seed) of a protocol; print the "
        "table. Method, data and Trainer options pass through as --method.X, --data.X, --trainer.X."
    )
    rp.add_argument(
        "--method", type=str | None, default=None, help="method name (stbench list methods); required"
    )
    rp.add_argument("--dataset", type=str | None, default=None, help="required")
    rp.add_argument("--protocol", type=str | None, default=None, help="default: the dataset's")
    rp.add_argument(
        "--folds",
        type=list[str] | str | None,
        default=None,
        help="fold names or indices: B4, B4,C2, [B4,C2] or 0 (default: every fold)",
    )
    rp.add_argument(
        "--seeds",
        type=list[int] | int | str | None,
        default=None,
        help="0, 0,1 or [0,1] (default: the protocol's)",
    )
    rp.add_argument(
        "--config",
        type=str | None,
        default=None,
        help="config name in baselines/<method>/configs (e.g. tiny) or a YAML path; a file written by "
        "--print_config runs the same job again (default: the method's configs/default.yaml)",
    )
    rp.add_argument("--output", type=str, default="outputs/run", help="results.jsonl and per-job folders")
    rp.add_argument("--data-root", type=str | None, default=None)
    rp.add_argument(
        "--checkpoint",
        type=str | None,
        default=None,
        help="predict and evaluate with these trained weights (skips training)",
    )
    rp.add_argument("--logger", type=list[str], default=["csv"], help="csv, tensorboard, wandb or none")
    _flag(rp, "--progress", "show Lightning progress bars")
    sub.add_subcommand("run", rp, help="train + test a method on a dataset's folds")

    bp = ArgumentParser(
        description="Run a suite: a method x dataset x protocol x seed grid from a YAML file. "
        "Finished jobs are skipped, so re-running resumes."
    )
    bp.add_argument("suite", type=str, help="suite YAML, e.g. benchmarks/suites/ci.yaml")
    bp.add_argument("--output", type=str | None, default=None, help="default: the suite's `output`")
    bp.add_argument("--launcher", type=str, default="local", choices=["local", "slurm"])
    bp.add_argument("--data-root", type=str | None, default=None)
    _flag(bp, "--dry-run", "list the jobs (and which are finished) and exit")
    bp.add_argument(
        "--compare",
        type=str | None,
        default=None,
        help="committed results.jsonl: fail when a job is worse than it beyond the suite's tolerance",
    )
    _flag(bp, "--progress", "show progress bars")
    sub.add_subcommand("benchmark", bp, help="run a benchmark suite (local or SLURM)")

    ep = ArgumentParser(description="Image encoders (pathology foundation models, ImageNet CNNs).")
    sub.add_subcommand("encoders", ep, help="check that an encoder's weights resolve and load")
    esub = ep.add_subcommands(dest="encoders_command", required=True)
    ec = ArgumentParser(
        description="Resolve and load the weights, run one patch through, print dims and weights id."
    )
    ec.add_argument("name", type=str, help="encoder name (stbench list encoders)")
    ec.add_argument(
        "--weights",
        type=str,
        default="default",
        help="default (the official source), none (random init), a local file/dir, or a hub id",
    )
    esub.add_subcommand("check", ec, help="load an encoder and run one patch through it")

    lp = ArgumentParser(
        description="Regenerate the leaderboard (Markdown, CSV, LaTeX, HTML) from result rows only."
    )
    lp.add_argument("--results", type=str, default="benchmarks/results", help="results.jsonl file or folder")
    lp.add_argument("--out", type=str, default="benchmarks", help="where LEADERBOARD.md and friends go")
    lp.add_argument(
        "--predictions",
        type=list[str] | None,
        default=None,
        help="run folders whose predictions feed the HTML maps (not for committed boards)",
    )
    _flag(lp, "--check", "fail if the committed files differ")
    sub.add_subcommand("leaderboard", lp, help="regenerate or check the leaderboard")

    pl = ArgumentParser(
        description="Stack an expression method's out-of-fold test predictions from a run folder into "
        "one pseudo-label file (STMDiT PTPL conditioning); each slide comes from the job that held it out."
    )
    pl.add_argument("output", type=str, help="run folder with results.jsonl and jobs/ (stbench run --output)")
    pl.add_argument(
        "--method", type=str, required=True, help="the expression method whose predictions to use"
    )
    pl.add_argument("--dataset", type=str, required=True)
    pl.add_argument("--protocol", type=str | None, default=None, help="only this protocol's jobs")
    pl.add_argument("--seed", type=int | None, default=None, help="only this seed's jobs")
    pl.add_argument("--out", type=str, required=True, help="pseudo-label .h5ad to write")
    sub.add_subcommand("pseudolabels", pl, help="stack out-of-fold predictions into pseudo-labels")
    from stbench.benchmark.predict import add_subcommand as add_predict

    add_predict(sub)
    return p


PASS_THROUGH = ("method", "data", "trainer", "evaluation")


def _take_print_config(argv: list[str]) -> tuple[list[str], bool]:
    """jsonargparse reserves --print_config for itself; stbench's means "print the resolved jobs"."""
    out, found, i = [], False, 0
    while i < len(argv):
        a = argv[i]
        if a == "--print_config":
            found = True
            if i + 1 < len(argv) and argv[i + 1].lower() in ("true", "false"):
                found = argv[i + 1].lower() == "true"
                i += 1
        elif a.startswith("--print_config="):
            found = a.split("=", 1)[1].lower() == "true"
        else:
            out.append(a)
        i += 1
    return out, found


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Pull `--method.x V`, `--data.patch.out_px=V`, `--trainer.devices V` out of argv. Values stay
    text (`Raw`) until the schema types them by the parameter they land on."""
    from stbench.config_schema import Raw

    rest: list[str] = []
    over: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        head = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." in head and head.split(".", 1)[0] in PASS_THROUGH:
            if "=" in arg:
                value = arg.split("=", 1)[1]
            else:
                if i + 1 >= len(argv):
                    raise StbenchError(f"--{head} needs a value")
                value = argv[i + 1]
                i += 1
            node = over
            parts = head.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise StbenchError(f"--{head}: {'.'.join(parts[:-1])} was given a value already")
            node[parts[-1]] = Raw(value)
            i += 1
            continue
        rest.append(arg)
        i += 1
    return rest, over


def parse(argv: Sequence[str] | None = None) -> Any:
    """Parsed and validated arguments (`cfg.overrides` typed), or StbenchError; nothing heavy imported."""
    parser = _parser()
    args, overrides = split_overrides(list(argv) if argv is not None else sys.argv[1:])
    args, print_config = _take_print_config(args)
    try:
        cfg = parser.parse_args(args)
    except Exception as exc:  # jsonargparse's ArgumentError
        if type(exc).__name__ != "ArgumentError":
            raise
        msg = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        cmd = next((a for a in args if not a.startswith("-")), None)
        cmd = None if cmd is None or "invalid choice" in msg or '"command"' in msg else cmd
        raise StbenchError(f"{msg} (see `stbench {cmd + ' ' if cmd else ''}--help`)") from None
    cfg.print_config = print_config
    if cfg.command == "run":
        cfg.overrides = resolve_run(cfg.run, overrides)
    elif overrides:
        raise StbenchError(
            f"--{next(iter(overrides))}.X options belong to `stbench run`, not `stbench {cfg.command}`"
        )
    else:
        cfg.overrides = {}
    return cfg


def resolve_run(run: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """Fill `run` from a --config run file, check method/dataset/folds/seeds and every config and
    override key against the method's schema; return the typed overrides."""
    from stbench import config_schema
    from stbench.benchmark.job import load_config, read_run_section

    section = read_run_section(run.config) if run.config else {}
    for key in ("method", "dataset", "protocol", "folds", "seeds"):
        if getattr(run, key) is None and section.get(key) is not None:
            setattr(run, key, section[key])
    for key in ("method", "dataset"):
        if not getattr(run, key):
            raise StbenchError(f"--{key} is required (or a --config file written by --print_config)")
    run.folds = _split_list(run.folds, "--folds", str)
    run.seeds = _split_list(run.seeds, "--seeds", int)
    schema = config_schema.schema_for(run.method)
    if schema is None:
        from importlib.metadata import entry_points

        names = [ep.name for ep in entry_points(group="stbench.methods")]
        raise UnknownNameError("method", run.method, names)
    load_config(run.method, run.config)  # an unknown or mistyped key in the file fails here, named
    return config_schema.check_config(overrides, schema, "", flag=True)


def _split_list(value: Any, option: str, kind: type) -> list[Any] | None:
    """`B4`, `B4,C2`, `[B4,C2]` or a parsed list -> a list of `kind`."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.strip().strip("[]").split(",") if v.strip()]
    elif not isinstance(value, list):
        value = [value]
    try:
        return [kind(v) for v in value]
    except (TypeError, ValueError):
        raise StbenchError(f"{option}: expected a list of {kind.__name__}, got {value!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _dispatch(parse(argv))
    except StbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _dispatch(cfg: Any) -> int:
    from stbench import commands

    if cfg.command == "list":
        return commands.list_things(cfg.list.what)
    if cfg.command == "data":
        d = cfg.data
        sub = getattr(d, d.data_command)
        if d.data_command == "prepare":
            return commands.data_prepare(sub.dataset, sub.data_root, sub.source, sub.copy)
        if d.data_command == "info":
            return commands.data_info(sub.dataset, sub.data_root)
        return commands.data_check(sub.dataset, sub.data_root)
    if cfg.command == "run":
        return commands.run(cfg.run, cfg.overrides, cfg.print_config)
    if cfg.command == "benchmark":
        return commands.benchmark(cfg.benchmark, cfg.print_config)
    if cfg.command == "encoders":
        return commands.encoders_check(cfg.encoders.check.name, cfg.encoders.check.weights)
    if cfg.command == "leaderboard":
        return commands.leaderboard(cfg.leaderboard)
    if cfg.command == "splits":
        return commands.splits(cfg.splits.dataset, cfg.splits.protocol, cfg.splits.data_root)
    if cfg.command == "pseudolabels":
        return commands.pseudolabels(cfg.pseudolabels)
    if cfg.command == "predict":
        return commands.predict(cfg.predict)
    raise AssertionError(cfg.command)


if __name__ == "__main__":
    raise SystemExit(main())
