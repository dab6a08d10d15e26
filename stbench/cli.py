"""The `stbench` command line.

Errors that stbench raises on purpose (bad data, unknown names, leakage) print one clear message
and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from jsonargparse import ArgumentParser

from stbench.errors import StbenchError


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="stbench", description="Benchmark of histology-to-spatial-expression methods.")
    sub = p.add_subcommands(dest="command", required=True)

    ls = ArgumentParser(description="List registered things.")
    ls.add_argument("what", choices=["datasets", "protocols", "readers"])
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
            sp.add_argument("--copy", type=bool, default=False, help="copy --source instead of linking it")
        dsub.add_subcommand(name, sp, help=helptext)

    sp = ArgumentParser(description="Print every fold's train / validation / test slides.")
    sp.add_argument("dataset", type=str)
    sp.add_argument("--protocol", type=str | None, default=None, help="protocol (default: the dataset's)")
    sp.add_argument("--data-root", type=str | None, default=None)
    sub.add_subcommand("splits", sp, help="print the folds of a protocol on a dataset")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    cfg = parser.parse_args(list(argv) if argv is not None else None)
    try:
        return _dispatch(cfg)
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
    if cfg.command == "splits":
        return commands.splits(cfg.splits.dataset, cfg.splits.protocol, cfg.splits.data_root)
    raise AssertionError(cfg.command)


if __name__ == "__main__":
    raise SystemExit(main())
