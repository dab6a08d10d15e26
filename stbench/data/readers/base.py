"""Reader contract: one class per public on-disk format, registered by name.

A reader is built on a dataset root (the folder laid out exactly as the public source ships it)
and turns each slide of it into a `Slide`. It never modifies the root.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from stbench.data.slide import Slide
from stbench.errors import DataError, UnknownNameError


class SlideReader(ABC):
    """Base class of readers. Subclasses set `format` and implement `list_slides`/`read_slide`."""

    format: ClassVar[str]
    platform: ClassVar[str] = "other"

    def __init__(self, root: str | Path, **options: Any) -> None:
        self.root = Path(root)
        self.options = options
        if not self.root.exists():
            raise DataError(f"{self.format} dataset root does not exist", file=self.root, field="root")

    @abstractmethod
    def list_slides(self) -> list[str]:
        """Slide ids present under the root (sorted)."""

    @abstractmethod
    def read_slide(self, slide_id: str) -> Slide:
        """Read one slide; raise DataError naming file/slide/field on any problem."""

    def slide_files(self, slide_id: str) -> list[Path]:
        """Files a slide is read from (checksummed at prepare time). Default: none declared."""
        return []

    def slide_record(self, slide_id: str) -> dict[str, str]:
        """Values that define the slide but are no file of `slide_files` (its row of an index table,
        its entry of a patient map). They join the slide cache key and the manifest, so editing one
        (a corrected patient) re-reads the slide and refreshes the splits. Default: none."""
        return {}

    def read_all(self, slides: list[str] | None = None) -> list[Slide]:
        return [self.read_slide(s) for s in (slides or self.list_slides())]

    def check(self, slides: list[str] | None = None) -> list[DataError]:
        """Every problem found, one DataError each (never stops at the first)."""
        problems: list[DataError] = []
        try:
            ids = slides or self.list_slides()
        except DataError as exc:
            return [exc]
        for sid in ids:
            try:
                self.read_slide(sid).validate()
            except DataError as exc:
                problems.append(exc)
        return problems

    def _require(self, path: Path, slide: str | None, field: str) -> Path:
        if not path.exists():
            raise DataError("required file is missing", file=path, slide=slide, field=field)
        return path


READERS: dict[str, type[SlideReader]] = {}


def register_reader(cls: type[SlideReader]) -> type[SlideReader]:
    READERS[cls.format] = cls
    return cls


def get_reader(fmt: str) -> type[SlideReader]:
    import stbench.data.readers  # noqa: F401  (registers every built-in reader)

    if fmt not in READERS:
        raise UnknownNameError("reader", fmt, list(READERS))
    return READERS[fmt]
