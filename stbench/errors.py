"""Errors that name what is wrong and where (file, slide, field), so bad input is fixable."""

from __future__ import annotations

from pathlib import Path


class StbenchError(Exception):
    """Base class of every error stbench raises on purpose."""


class DataError(StbenchError):
    """Bad or missing input data. The message names the file, slide and field when known."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        slide: str | None = None,
        field: str | None = None,
    ) -> None:
        self.problem = message
        self.file = str(file) if file is not None else None
        self.slide = slide
        self.field = field
        where = [f"{k}={v}" for k, v in (("file", self.file), ("slide", slide), ("field", field)) if v]
        super().__init__(f"{message} [{', '.join(where)}]" if where else message)


class LeakageError(StbenchError):
    """A split puts a test slide or test patient on the training/validation side."""


class UnknownNameError(StbenchError, KeyError):
    """An unknown dataset, reader, protocol or gene name; the message suggests the closest ones."""

    def __init__(self, kind: str, name: str, valid: list[str]) -> None:
        import difflib

        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        self.kind, self.name, self.valid = kind, name, valid
        msg = f"unknown {kind} {name!r}.{hint} Valid: {', '.join(sorted(valid))}"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]
