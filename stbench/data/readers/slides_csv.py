"""The `slides.csv` index shared by bring-your-own readers (anndata, he-tiles): one row per slide, one
strict parse (trimmed strings, required columns, unique non-empty slide ids), errors naming the file,
slide and field."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pandas as pd

from stbench.errors import DataError


class SlidesCsvMixin:
    """For a SlideReader whose `root` holds `slides.csv`; subclasses set `required_columns`."""

    root: Path
    required_columns: ClassVar[tuple[str, ...]] = ("slide",)

    @property
    def table_file(self) -> Path:
        return self.root / "slides.csv"

    def table(self) -> pd.DataFrame:
        path = self._require(self.table_file, None, "slides.csv")  # type: ignore[attr-defined]
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        except Exception as exc:
            raise DataError(f"cannot parse slides.csv: {exc}", file=path, field="slides.csv") from exc
        df.columns = [c.strip() for c in df.columns]
        missing = [c for c in self.required_columns if c not in df.columns]
        if missing:
            raise DataError(f"slides.csv lacks columns {missing}", file=path, field=",".join(missing))
        df = df.apply(lambda col: col.str.strip())
        if (df["slide"] == "").any():
            raise DataError("empty slide id in slides.csv", file=path, field="slide")
        if not df["slide"].is_unique:
            dup = df["slide"][df["slide"].duplicated()].unique()[:5].tolist()
            raise DataError(f"duplicate slide ids {dup}", file=path, field="slide")
        return df.set_index("slide", drop=False)

    def list_slides(self) -> list[str]:
        return sorted(self.table()["slide"].tolist())

    def _row(self, slide: str) -> pd.Series:
        df = self.table()
        if slide not in df.index:
            raise DataError(
                f"slide not listed in slides.csv (listed: {df.index.tolist()[:10]})",
                file=self.table_file,
                slide=slide,
                field="slide",
            )
        return df.loc[slide]

    def slide_record(self, slide: str) -> dict[str, str]:
        """Every field of the slide's slides.csv row (patient included): part of its cache key."""
        return {str(k): str(v) for k, v in self._row(slide).items()}

    def _path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.root / p
