"""`stbench data prepare`: put a dataset's public files under the data root and record a manifest.

With --source DIR the local copy is linked (or copied with --copy) after its layout is checked;
without it the card's public downloads are fetched (git clone or HTTP with checksum). Every slide
is then parsed once, validated, cached, and summarised in `manifest.json` with the sha256 of every
file it came from and its record (slides.csv row, patients.csv entry), so later runs detect a
changed or corrupted input.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import subprocess
import tarfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from stbench import __version__
from stbench.data import paths
from stbench.data.catalog import DatasetCard, Download, get_card
from stbench.data.readers import get_reader
from stbench.errors import DataError
from stbench.utils.io import sha256_file, write_json_atomic

MANIFEST_VERSION = 1


def prepare(
    name: str,
    data_root: str | Path | None = None,
    source: str | Path | None = None,
    *,
    copy: bool = False,
    synthetic_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Make `name` ready under the data root; return the manifest."""
    card = get_card(name)
    raw = paths.raw_dir(name, data_root)
    raw.parent.mkdir(parents=True, exist_ok=True)
    if card.reader == "synthetic":
        # The card's generator options (reader_options['generate']: the context variant), then the caller's.
        gen = {**card.reader_options.get("generate", {}), **(synthetic_options or {})}
        origin = _generate_synthetic(raw, gen)
    elif source is not None:
        origin = _link_source(card, Path(source), raw, copy=copy)
    else:
        origin = _download(card, raw)
    return write_manifest(card, data_root, origin, progress=progress)


def write_manifest(
    card: DatasetCard, data_root: str | Path | None, origin: dict[str, Any], progress: bool = False
) -> dict[str, Any]:
    from stbench.data.dataset import Dataset

    raw = paths.raw_dir(card.name, data_root)
    reader = get_reader(card.reader)(raw, **card.reader_kwargs())
    slides: dict[str, Any] = {}
    ids = reader.list_slides()
    if not ids:
        raise DataError(f"no slides found for {card.name}", file=raw, field="layout")
    ds = Dataset(card, data_root, manifest={"slides": {}})
    problems: list[DataError] = []
    for sid in _progress(ids, progress, f"checksumming and parsing {card.name}"):
        files = {_relative(p, raw): sha256_file(p) for p in reader.slide_files(sid) if p.exists()}
        entry: dict[str, Any] = {"files": files}
        record = reader.slide_record(sid)
        if record:  # slides.csv row / patients.csv entry: Dataset.open re-reads the slide if it changes
            entry["record"] = record
        ds.manifest["slides"][sid] = entry
        try:
            slide = ds.load_slide(sid)  # parses, validates and caches under the files' hashes
        except DataError as exc:
            problems.append(exc)
            continue
        entry.update(slide.summary())
        entry["has_image"] = slide.has_image
        slides[sid] = entry
    if problems:
        # Nothing is recorded for a dataset with bad slides: every problem is listed at once.
        raise DataError(
            f"{len(problems)} problem(s) in {card.name}; fix them (see `stbench data check {card.name}`):\n"
            + "\n".join(f"  - {p}" for p in problems),
            file=raw,
            field="slides",
        )
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "dataset": card.name,
        "reader": card.reader,
        "reader_options": card.reader_options,
        "origin": origin,
        "prepared_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "stbench_version": __version__,
        "slides": slides,
    }
    write_json_atomic(paths.manifest_path(card.name, data_root), manifest)
    return manifest


def _relative(p: Path, root: Path) -> str:
    """Path of a slide file relative to the raw folder (absolute when it lives elsewhere)."""
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


def _progress(items: list[str], enabled: bool, description: str):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=description)


def _link_source(card: DatasetCard, source: Path, raw: Path, copy: bool) -> dict[str, Any]:
    source = source.expanduser().resolve()
    if not source.exists():
        raise DataError(f"--source for {card.name} does not exist", file=source, field="source")
    reader = get_reader(card.reader)(source, **card.reader_kwargs())
    if not reader.list_slides():
        raise DataError(
            f"no {card.name} slides found in --source (expected the {card.reader} layout; "
            f"see `stbench data info {card.name}` docs)",
            file=source,
            field="layout",
        )
    _remove(raw)
    if copy:
        tmp = raw.with_name(raw.name + ".partial")
        _remove(tmp)
        shutil.copytree(source, tmp, symlinks=False)
        tmp.rename(raw)
    else:
        raw.symlink_to(source, target_is_directory=True)
    return {"kind": "copy" if copy else "link", "source": str(source)}


def _download(card: DatasetCard, raw: Path) -> dict[str, Any]:
    if not card.downloads:
        raise DataError(
            f"{card.name} cannot be downloaded automatically ({card.access}). How to get it: "
            f"{card.how_to_get}",
            field="source",
        )
    tmp = raw.with_name(raw.name + ".partial")
    _remove(tmp)
    tmp.mkdir(parents=True)
    for item in card.downloads:
        try:
            _fetch(item, tmp)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(
                f"download of {item.url} failed ({exc}). On an offline machine, get the files as "
                f"described and pass --source: {card.how_to_get}",
                field="download",
            ) from exc
    # A git download lands in tmp/<filename>; use it as the root when it is the only item.
    root = (
        tmp / card.downloads[0].filename
        if len(card.downloads) == 1 and card.downloads[0].kind == "git"
        else tmp
    )
    _remove(raw)
    root.rename(raw)
    _remove(tmp)
    return {"kind": "download", "urls": [d.url for d in card.downloads]}


def _fetch(item: Download, into: Path) -> None:
    target = into / item.filename
    if item.kind == "git":
        subprocess.run(
            ["git", "clone", "--depth", "1", item.url, str(target)],
            check=True,
            capture_output=True,
            timeout=3600,
        )
        return
    with urllib.request.urlopen(item.url, timeout=60) as resp, open(target, "wb") as out:
        shutil.copyfileobj(resp, out)
    if item.sha256 is not None:
        got = sha256_file(target)
        if got != item.sha256:
            raise DataError(
                f"checksum mismatch: expected {item.sha256}, got {got}", file=target, field="sha256"
            )
    if item.extract:
        if tarfile.is_tarfile(target):
            with tarfile.open(target) as tf:
                tf.extractall(into, filter="data")
        elif zipfile.is_zipfile(target):
            with zipfile.ZipFile(target) as zf:
                zf.extractall(into)
        target.unlink()


def _generate_synthetic(raw: Path, options: dict[str, Any]) -> dict[str, Any]:
    from stbench.data.synthetic import generate_synthetic

    tmp = raw.with_name(raw.name + ".partial")
    _remove(tmp)
    generate_synthetic(tmp, **options)
    _remove(raw)
    tmp.rename(raw)
    return {"kind": "generated", "options": options}


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.exists():
        shutil.rmtree(p)
