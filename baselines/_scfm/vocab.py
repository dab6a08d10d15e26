"""Gene symbol -> backbone gene id, with a report of what did not map.

CellFM's `gene_info.csv` (and `expand_gene_info.csv`) has one gene per row and no id column: the
symbol column is `HGNC_gene` and a gene's id is its row order + 1 (id 0 is the padding row of the
embedding table). A JSON vocabulary may instead give ids explicitly ({symbol: id}, scGPT style) or be
a plain list of symbols (ids = order + 1).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stbench.errors import DataError

SYMBOL_COLUMNS = ("HGNC_gene", "gene_symbol", "symbol", "gene_name", "gene", "feature_name", "name")
UNMAPPED = -1  # id given to unmapped genes: indexing an embedding with it fails instead of reading padding


@dataclass
class VocabMatch:
    """Outcome of mapping dataset symbols: ids (UNMAPPED where no match) and how each gene matched."""

    symbols: list[str]
    ids: np.ndarray
    exact: int = 0
    case_insensitive: list[tuple[str, str]] = field(default_factory=list)  # (dataset symbol, vocab symbol)
    unmapped: list[str] = field(default_factory=list)

    @property
    def mapped_mask(self) -> np.ndarray:
        return self.ids != UNMAPPED

    def summary(self, limit: int = 20) -> str:
        n = len(self.symbols)
        head = ", ".join(self.unmapped[:limit]) + (" ..." if len(self.unmapped) > limit else "")
        return (
            f"{n - len(self.unmapped)}/{n} genes mapped ({self.exact} exact, "
            f"{len(self.case_insensitive)} case-insensitive); {len(self.unmapped)} unmapped"
            + (f": {head}" if self.unmapped else "")
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "n_genes": len(self.symbols),
            "n_mapped": len(self.symbols) - len(self.unmapped),
            "n_exact": self.exact,
            "case_insensitive": [list(p) for p in self.case_insensitive],
            "unmapped": list(self.unmapped),
        }


class GeneVocab:
    """Symbol -> id (pad_id = padding, never a gene). Exact match first, then case-insensitive."""

    def __init__(self, ids: dict[str, int], *, pad_id: int = 0, source: str | None = None) -> None:
        if pad_id in set(ids.values()):
            bad = next(s for s, i in ids.items() if i == pad_id)
            raise DataError(f"gene {bad!r} has the padding id {pad_id}", file=source, field=bad)
        self.ids, self.pad_id, self.source = dict(ids), pad_id, source
        self._folded: dict[str, str | None] = {}
        for sym in self.ids:  # a case-folded key shared by two genes is ambiguous -> no fallback
            key = sym.casefold()
            self._folded[key] = None if key in self._folded else sym

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self.ids

    @property
    def symbols(self) -> list[str]:
        return sorted(self.ids, key=self.ids.__getitem__)

    @property
    def max_id(self) -> int:
        return max(self.ids.values(), default=self.pad_id)

    @classmethod
    def from_symbols(cls, symbols: Iterable[str], *, source: str | None = None) -> GeneVocab:
        """ids = order + 1 (CellFM convention); duplicate or empty symbols are errors."""
        ids: dict[str, int] = {}
        for i, raw in enumerate(symbols):
            sym = str(raw).strip()
            if not sym:
                raise DataError(f"empty gene symbol at row {i + 1}", file=source, field=f"row {i + 1}")
            if sym in ids:
                raise DataError(
                    f"duplicate gene symbol {sym!r} (rows {ids[sym]} and {i + 1})", file=source, field=sym
                )
            ids[sym] = i + 1
        return cls(ids, source=source)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        symbol_column: str | None = None,
        id_column: str | None = None,
        pad_id: int = 0,
    ) -> GeneVocab:
        """A CSV/TSV with a symbol column (ids = row order + 1, or `id_column`), or a JSON dict/list."""
        path = Path(path)
        if not path.is_file():
            raise DataError("vocabulary file not found", file=path)
        if path.suffix.lower() == ".json":
            return cls._from_json(path, pad_id)
        with open(path, newline="", encoding="utf-8") as f:
            sample = f.read(4096)
            f.seek(0)
            delimiter = (
                "\t"
                if path.suffix.lower() in (".tsv", ".txt") or sample.count("\t") > sample.count(",")
                else ","
            )
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = reader.fieldnames or []
            if not columns:
                raise DataError("vocabulary CSV has no header", file=path)
            col = symbol_column or next((c for c in SYMBOL_COLUMNS if c in columns), columns[0])
            for need in (col, id_column):
                if need is not None and need not in columns:
                    raise DataError(
                        f"vocabulary has no column {need!r} (columns: {columns})", file=path, field=need
                    )
            rows = list(reader)
        if id_column is None:
            return cls.from_symbols((r[col] for r in rows), source=str(path))
        ids: dict[str, int] = {}
        for i, r in enumerate(rows):
            try:
                ids[r[col].strip()] = int(r[id_column])
            except (TypeError, ValueError):
                raise DataError(
                    f"non-integer id {r[id_column]!r} at row {i + 1}", file=path, field=id_column
                ) from None
        return cls(ids, pad_id=pad_id, source=str(path))

    @classmethod
    def _from_json(cls, path: Path, pad_id: int = 0) -> GeneVocab:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"vocabulary JSON is not valid: {e}", file=path) from None
        if isinstance(data, list):
            return cls.from_symbols(data, source=str(path))
        if isinstance(data, dict) and all(isinstance(v, int) for v in data.values()):
            return cls({str(k): v for k, v in data.items()}, pad_id=pad_id, source=str(path))
        raise DataError("vocabulary JSON must be a list of symbols or a {symbol: int id} object", file=path)

    def match(self, symbols: Sequence[str]) -> VocabMatch:
        """Map dataset symbols, recording exact, case-insensitive and unmapped genes."""
        out = VocabMatch(
            symbols=[str(s) for s in symbols], ids=np.full(len(symbols), UNMAPPED, dtype=np.int64)
        )
        for i, sym in enumerate(out.symbols):
            key = sym.strip()
            if key in self.ids:
                out.ids[i] = self.ids[key]
                out.exact += 1
            elif (hit := self._folded.get(key.casefold())) is not None:
                out.ids[i] = self.ids[hit]
                out.case_insensitive.append((sym, hit))
            else:
                out.unmapped.append(sym)
        return out

    def map(self, symbols: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """(ids int64 with UNMAPPED = -1 where no match, unmapped symbols in input order)."""
        m = self.match(symbols)
        return m.ids, m.unmapped

    def report(self, symbols: Sequence[str]) -> str:
        return self.match(symbols).summary()

    def __repr__(self) -> str:
        return f"GeneVocab({len(self)} genes, pad_id={self.pad_id}, source={self.source!r})"
