"""What each CLI command does (kept apart from argument parsing so tests can call it directly)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stbench.utils.table import console, print_rows


def list_things(what: str) -> int:
    if what == "datasets":
        from stbench.data.catalog import CATALOG

        print_rows([c.summary() for c in CATALOG.values()], title="datasets")
    elif what == "protocols":
        from stbench.data.protocols import PROTOCOLS

        print_rows(
            [{"protocol": p.name, "description": p.description} for p in PROTOCOLS.values()],
            title="protocols",
        )
    elif what == "encoders":
        from stbench.encoders import list_encoders

        print_rows(
            [
                {
                    "encoder": e.name,
                    "arch": e.arch,
                    "dim": e.dim,
                    "token": e.token,
                    "source": e.source,
                    "hub_id": e.hub_id or "-",
                    "gated": e.gated,
                    "input_px": e.input_px,
                    "licence": e.licence,
                }
                for e in list_encoders()
            ],
            title="encoders",
        )
    elif what == "methods":
        from stbench.methods.registry import available_methods

        print_rows(
            [
                {
                    "method": n,
                    "task": c.task,
                    "kind": c.kind,
                    "image": c.requires.image,
                    "stages": " ".join(c.stages),
                    "class": f"{c.__module__}:{c.__qualname__}",
                }
                for n, c in available_methods().items()
            ],
            title="methods",
            caption="kind reference = a yardstick (mean, depth): shown beside methods, never ranked",
        )
    else:
        from stbench.data.readers import READERS

        print_rows(
            [{"reader": k, "class": v.__name__, "platform": v.platform} for k, v in sorted(READERS.items())],
            title="readers",
        )
    return 0


def data_prepare(dataset: str, data_root: str | None, source: str | None, copy: bool) -> int:
    from stbench.data import paths
    from stbench.data.prepare import prepare

    manifest = prepare(dataset, data_root, source, copy=copy, progress=console().is_terminal)
    n = len(manifest["slides"])
    n_img = sum(e["has_image"] for e in manifest["slides"].values())
    console().print(
        f"prepared {dataset}: {n} slides ({n_img} with an image) under "
        f"{paths.dataset_dir(dataset, data_root)}"
    )
    return 0


def data_info(dataset: str, data_root: str | None) -> int:
    from stbench.data.dataset import Dataset

    ds = Dataset.open(dataset, data_root)
    rows = ds.summary_rows()
    n_img = sum(ds.has_image.values())
    print_rows(
        rows,
        title=f"{dataset}: {len(rows)} slides, {n_img} with an image",
        caption=f"spots = spots with both counts and coordinates; mpp = um per full-resolution pixel; "
        f"data root {ds.data_root}",
    )
    return 0


def data_check(dataset: str, data_root: str | None) -> int:
    from stbench.data.dataset import Dataset

    problems = Dataset.check(dataset, data_root)
    if not problems:
        console().print(f"{dataset}: no problems found")
        return 0
    out = console()
    out.print(f"{dataset}: {len(problems)} problem(s)")
    for p in problems:  # one line each, never wrapped, so paths stay copy-pasteable
        out.print(
            f"  - slide={p.slide or '-'} field={p.field or '-'} file={p.file or '-'}: {p.problem}",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
    return 1


def splits(dataset: str, protocol: str | None, data_root: str | None) -> int:
    from stbench.data.dataset import Dataset
    from stbench.data.protocols import get_protocol

    ds = Dataset.open(dataset, data_root)
    proto = get_protocol(protocol or ds.card.default_protocol)
    split_dir = Path(ds.raw) / "splits" if (Path(ds.raw) / "splits").is_dir() else None
    folds, problems = proto.folds(
        ds.patients,
        ds.has_image,
        eval_pool=ds.card.eval_pool,
        groups=ds.card.fold_groups,
        split_dir=split_dir,
    )
    rows = [
        {
            "fold": f.name,
            "train": " ".join(f.train),
            "val": " ".join(f.val) or f"{f.val_fraction:.0%} of train spots",
            "test": " ".join(f.test),
            "notes": "; ".join(f.notes),
        }
        for f in folds
    ]
    if rows:
        print_rows(rows, title=f"{dataset} / protocol {proto.name}: {len(folds)} fold(s)")
    for p in problems:  # excluded slides and unrunnable folds, each named
        console().print(f"note: {p}", soft_wrap=True, markup=False, highlight=False)
    return 0 if folds else 1


def quiet_lightning() -> None:
    """Lightning's banners (GPU available, tips) drown the table; warnings still show."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (it resets its loggers to INFO on import; import first)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def run(args: Any, overrides: dict[str, Any], print_config: bool = False) -> int:
    import yaml

    quiet_lightning()
    from stbench.benchmark.runner import expand_jobs, run_jobs
    from stbench.benchmark.summary import print_summary

    jobs = expand_jobs(
        args.method,
        args.dataset,
        args.protocol,
        args.folds,
        args.seeds,
        args.config,
        overrides,
        args.data_root,
        checkpoint=args.checkpoint,
    )
    if print_config:  # a file `stbench run --config FILE` runs again as the same jobs
        from stbench.benchmark.job import run_document

        print(yaml.safe_dump(run_document(jobs), sort_keys=False), end="")
        return 0
    run_jobs(jobs, args.output, loggers=args.logger, progress=args.progress)
    from stbench.benchmark.runner import global_rank_from_env

    if global_rank_from_env() == 0:
        print_summary(Path(args.output), {j.job_id for j in jobs})
    return 0


def encoders_check(name: str, weights: str) -> int:
    from stbench.encoders import check_encoder

    info = check_encoder(name, weights)
    print_rows([info], title=f"encoder {name}: weights {weights}")
    return 0


def leaderboard(args: Any) -> int:
    from stbench.benchmark.leaderboard import build_leaderboard, check_leaderboard

    if args.check:
        problems = check_leaderboard(Path(args.results), Path(args.out), args.predictions)
        if problems:
            out = console()
            out.print(
                f"leaderboard differs from a regeneration from {args.results} ({len(problems)} file(s)); "
                "run `stbench leaderboard` and commit:"
            )
            for p in problems:
                out.print(p, markup=False, highlight=False, soft_wrap=True)
            return 1
        console().print(f"leaderboard in {args.out} matches the rows in {args.results}")
        return 0
    written = build_leaderboard(Path(args.results), Path(args.out), args.predictions)
    console().print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def benchmark(args: Any, print_config: bool = False) -> int:
    from stbench.benchmark.suite import benchmark as run_benchmark

    quiet_lightning()
    if print_config:
        import yaml

        from stbench.benchmark.suite import load_suite

        jobs = [j.to_dict() for j in load_suite(args.suite).jobs(args.data_root)]
        console().print(yaml.safe_dump(jobs, sort_keys=False), markup=False, highlight=False)
        return 0
    return run_benchmark(
        args.suite,
        output=args.output,
        launcher=args.launcher,
        data_root=args.data_root,
        dry_run=args.dry_run,
        progress=args.progress,
        compare=args.compare,
    )


def pseudolabels(args: Any) -> int:
    from stbench.benchmark.pseudolabels import collect_pseudolabels
    from stbench.data.pseudolabels import PseudoLabels

    out = collect_pseudolabels(
        args.output, args.method, args.dataset, protocol=args.protocol, seed=args.seed, out=args.out
    )
    pl = PseudoLabels.load(out)
    console().print(
        f"wrote {out}: {len(pl.obs)} spots x {len(pl.genes)} genes, {len(pl.slides)} slide(s) from "
        f"{len(pl.info.get('jobs', {}))} job(s) (out-of-fold); source {pl.source}",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )
    return 0


def predict(args: Any) -> int:
    from stbench.benchmark.predict import run_command

    return run_command(args)
