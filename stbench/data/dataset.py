"""A prepared dataset: its card, its manifest, and its slides (parsed once, then cached).

Parsed slides are cached as .h5ad under `<data root>/<name>/cache/slides/`, keyed by every input
that defines the slide: the sha256 of the files it came from (recorded by `prepare`), each file's
current size and modification time (so a file edited after prepare is re-read, and `stbench data
check` reports it), the slide's record (every field of its slides.csv row, its patients.csv entry:
`SlideReader.slide_record`), the reader and its options (the `counts` declaration included). A
changed input gives a new key, so stale parses are never reused. `Dataset.open` compares each
slide's record with the one in the manifest and re-reads the slides whose record changed, so the
patients the splits group by are the current ones (a corrected patient column moves the folds).

Pseudo-bulk tiling (stbench.data.pseudobulk): a card with `pseudobulk` set (hest-bowel,
hest-pancreas, crunchdao-bowel) turns every slide into tiles right after reading; the tiling
parameters join the cache key. Override, in increasing precedence: the card's
`reader_options["tiling"]` (a dict merged over `card.pseudobulk`, True = defaults, False/None =
no tiling; this is how a plain `xenium` card gets tiled) and `Dataset.open(name, tiling=...)`
(same values). The "tiling" option is never passed to the reader.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import anndata as ad

from stbench.data import paths
from stbench.data.catalog import DatasetCard, get_card
from stbench.data.image_regions import open_slide_image
from stbench.data.pseudobulk import TilingSpec, tile_slide
from stbench.data.readers import SlideReader, get_reader
from stbench.data.slide import Slide
from stbench.errors import DataError
from stbench.utils.io import atomic_path, sha256_file, stable_hash, write_json_atomic

# Bump when a reader's output for the same files changes, so cached parses are rebuilt.
SLIDE_CACHE_VERSION = 1
_UNSET: Any = object()


def resolve_tiling(card: DatasetCard, override: Any = _UNSET) -> TilingSpec | None:
    """The tiling a dataset's slides get: card.pseudobulk, then reader_options["tiling"], then
    `override`; each layer is a dict (merged over the previous one), True (keep / use defaults)
    or False/None (no tiling)."""
    spec: dict[str, Any] | None = dict(card.pseudobulk) if card.pseudobulk is not None else None
    for layer in (card.reader_options.get("tiling", _UNSET), override):
        if layer is _UNSET:
            continue
        if layer is None or layer is False:
            spec = None
        elif layer is True:
            spec = spec if spec is not None else {}
        elif isinstance(layer, TilingSpec):
            spec = layer.key()
            spec.pop("version")
        elif isinstance(layer, dict):
            base = dict(spec or {})
            if "tile_um" in layer:  # the tile side given in um replaces an inherited scale, and back
                base.pop("tile_mpp", None)
            if "tile_mpp" in layer:
                base.pop("tile_um", None)
            spec = {**base, **layer}
        else:
            raise DataError(
                f"tiling must be a dict, True, False or None, got {type(layer).__name__}", field="tiling"
            )
    return TilingSpec.from_options(spec) if spec is not None else None


class Dataset:
    def __init__(
        self,
        card: DatasetCard,
        data_root: str | Path | None = None,
        manifest: dict[str, Any] | None = None,
        tiling: Any = _UNSET,
    ) -> None:
        self.card = card
        self.tiling = resolve_tiling(card, tiling)
        self.data_root = paths.data_root(data_root)
        self.raw = paths.raw_dir(card.name, self.data_root)
        self.cache = paths.cache_dir(card.name, self.data_root)
        self.manifest = manifest if manifest is not None else {"slides": {}}
        self._reader: SlideReader | None = None

    @classmethod
    def open(cls, name: str, data_root: str | Path | None = None, tiling: Any = _UNSET) -> Dataset:
        card = get_card(name)
        mpath = paths.manifest_path(name, data_root)
        if not mpath.exists():
            raise DataError(
                f"dataset {name!r} is not prepared under {paths.data_root(data_root)}; run "
                f"`stbench data prepare {name}` (offline: add --source DIR). {card.how_to_get}",
                file=mpath,
                field="manifest",
            )
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(
                f"manifest is not valid JSON ({exc}); re-run `stbench data prepare {name}`",
                file=mpath,
                field="manifest",
            ) from exc
        ds = cls(card, data_root, manifest, tiling=tiling)
        ds._refresh_records(mpath)
        return ds

    def _refresh_records(self, manifest_path: Path) -> None:
        """Re-read every slide whose record (slides.csv row, patient map entry) differs from the
        manifest's, update its entry (patient, spots, ...) and rewrite the manifest.

        A slide whose record cannot be read (dropped from slides.csv) is left for `verify`."""
        if not self.raw.exists():
            return
        changed: dict[str, dict[str, str]] = {}
        for sid, entry in self.manifest["slides"].items():
            try:
                record = self.reader.slide_record(sid)
            except DataError:
                continue
            if record != entry.get("record", {}):
                changed[sid] = record
        from stbench.data.prepare import _relative

        for sid, record in changed.items():
            entry = self.manifest["slides"][sid]
            # as prepare does for one slide: its files now (the row may name another h5ad or image)
            entry["files"] = {
                _relative(f, self.raw): sha256_file(f) for f in self.reader.slide_files(sid) if f.exists()
            }
            slide = self.load_slide(sid)  # the record is in the key: a fresh parse
            entry.update(slide.summary(), has_image=slide.has_image, record=record)
        if changed:  # on a read-only data root the refreshed entries still hold in memory
            with contextlib.suppress(OSError):
                write_json_atomic(manifest_path, self.manifest)

    # ---- metadata (from the manifest: no parsing) ----------------------------------------
    @property
    def reader(self) -> SlideReader:
        if self._reader is None:
            self._reader = get_reader(self.card.reader)(self.raw, **self.card.reader_kwargs())
        return self._reader

    @property
    def slide_ids(self) -> list[str]:
        return sorted(self.manifest["slides"])

    @property
    def patients(self) -> dict[str, str]:
        return {s: str(e["patient"]) for s, e in sorted(self.manifest["slides"].items())}

    @property
    def has_image(self) -> dict[str, bool]:
        return {s: bool(e["has_image"]) for s, e in sorted(self.manifest["slides"].items())}

    def summary_rows(self) -> list[dict[str, Any]]:
        keys = ("slide", "patient", "spots", "genes", "image", "mpp", "spot_diameter_um", "dropped")
        return [{k: e.get(k) for k in keys} for _, e in sorted(self.manifest["slides"].items())]

    def _check_known(self, slide: str) -> dict[str, Any]:
        if slide not in self.manifest["slides"]:
            from stbench.errors import UnknownNameError

            raise UnknownNameError(f"slide of {self.card.name}", slide, self.slide_ids)
        return self.manifest["slides"][slide]

    # ---- slides --------------------------------------------------------------------------
    def slide_cache_path(self, slide: str) -> Path:
        entry = self._check_known(slide)
        files = entry.get("files", {})
        inputs: dict[str, Any] = {
            "files": files,
            "stamps": {rel: self._stamp(rel) for rel in sorted(files)},
            "reader": self.card.reader,
            "options": self.card.reader_kwargs(),
            "version": SLIDE_CACHE_VERSION,
        }
        record = self.reader.slide_record(slide) if self.raw.exists() else entry.get("record", {})
        if record:  # readers without records keep their keys
            inputs["record"] = record
        if self.tiling is not None:  # untiled keys stay what they were before tiling existed
            inputs["tiling"] = self.tiling.key()
        return self.cache / "slides" / f"{slide}-{stable_hash(inputs)}.h5ad"

    def _stamp(self, rel: str) -> list[int] | None:
        """Size and modification time of a slide file now (None when missing): an edit re-reads."""
        p = Path(rel) if Path(rel).is_absolute() else self.raw / rel
        try:
            st = p.stat()
        except OSError:
            return None
        return [int(st.st_size), int(st.st_mtime_ns)]

    def load_slide(self, slide: str) -> Slide:
        path = self.slide_cache_path(slide)
        if path.exists():
            return self._from_cache(path)
        parsed = self.reader.read_slide(slide)
        if self.tiling is not None:
            # cells may sit just outside a cropped image: only the tiles must lie inside it
            parsed = tile_slide(parsed.validate(check_image_bounds=False), self.tiling)
        parsed = parsed.validate()
        self._to_cache(parsed, path)
        return parsed

    def load_slides(self, slides: list[str] | None = None, image_only: bool = False) -> list[Slide]:
        ids = slides or self.slide_ids
        if image_only:
            ids = [s for s in ids if self.has_image.get(s)]
        return [self.load_slide(s) for s in ids]

    def _to_cache(self, slide: Slide, path: Path) -> None:
        a = slide.adata.copy()
        image = None
        if slide.image is not None:
            image = str(slide.image.path)
        a.uns["stbench"] = {
            "name": slide.name,
            "patient": slide.patient,
            "platform": slide.platform,
            "mpp": slide.mpp if slide.mpp is not None else -1.0,
            "spot_diameter_um": slide.spot_diameter_um if slide.spot_diameter_um is not None else -1.0,
            "image": image or "",
            "image_page": slide.image.page if slide.image else 0,
            "source": slide.source or "",
            "meta": json.dumps(slide.meta, default=str),
        }
        for col in a.obs.columns:  # h5ad wants plain strings, not mixed objects
            if a.obs[col].dtype == object:
                a.obs[col] = a.obs[col].astype(str)
        with atomic_path(path) as tmp:
            a.write_h5ad(tmp)

    def _from_cache(self, path: Path) -> Slide:
        a = ad.read_h5ad(path)
        m = a.uns.pop("stbench")
        image = open_slide_image(Path(m["image"]), page=int(m["image_page"])) if m["image"] else None
        return Slide(
            name=str(m["name"]),
            patient=str(m["patient"]),
            adata=a,
            image=image,
            mpp=float(m["mpp"]) if float(m["mpp"]) > 0 else None,
            spot_diameter_um=float(m["spot_diameter_um"]) if float(m["spot_diameter_um"]) > 0 else None,
            platform=str(m["platform"]),
            source=str(m["source"]) or None,
            meta=json.loads(m["meta"]),
        )

    # ---- checks --------------------------------------------------------------------------
    @classmethod
    def check(cls, name: str, data_root: str | Path | None = None) -> list[DataError]:
        """Every problem of a dataset under the data root, prepared or not (prepare may have failed)."""
        card = get_card(name)
        if paths.manifest_path(name, data_root).exists():
            return cls.open(name, data_root).verify()
        raw = paths.raw_dir(name, data_root)
        if not raw.exists():
            return [
                DataError(
                    f"dataset {name!r} has no files under the data root; run `stbench data "
                    f"prepare {name}` (offline: --source DIR)",
                    file=raw,
                    field="raw",
                )
            ]
        return cls(card, data_root).reader.check()

    def verify(self) -> list[DataError]:
        """Every problem: files changed or missing since prepare, then each slide re-validated.

        A slide whose files still match their recorded sha256 has a cached parse that was validated
        when it was written, so only slides without a valid cache are parsed again.
        """
        problems: list[DataError] = []
        for sid, entry in sorted(self.manifest["slides"].items()):
            changed = False
            for rel, digest in entry.get("files", {}).items():
                p = Path(rel) if Path(rel).is_absolute() else self.raw / rel
                if not p.exists():
                    problems.append(
                        DataError("file listed in the manifest is missing", file=p, slide=sid, field="files")
                    )
                    changed = True
                elif sha256_file(p) != digest:
                    problems.append(
                        DataError(
                            "file changed since `stbench data prepare` (sha256 differs); re-run prepare",
                            file=p,
                            slide=sid,
                            field="sha256",
                        )
                    )
                    changed = True
            if changed:
                continue
            try:
                slide = self.load_slide(sid)
                if slide.image is not None:
                    slide.validate()  # image header and spot bounds (the image may have been replaced)
            except DataError as exc:
                problems.append(exc)
        for sid in sorted(set(self._reader_slides()) - set(self.manifest["slides"])):
            problems.append(
                DataError(
                    "slide present on disk but not prepared; re-run prepare",
                    slide=sid,
                    file=self.raw,
                    field="manifest",
                )
            )
        return problems

    def _reader_slides(self) -> list[str]:
        try:
            return self.reader.list_slides()
        except DataError:
            return []
