"""Print rows (list of dicts) as a table; wide enough when piped, so logs stay readable."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table


def console() -> Console:
    c = Console()
    return c if c.is_terminal else Console(width=200, no_color=True)


def print_rows(rows: Sequence[dict[str, Any]], title: str | None = None, caption: str | None = None) -> None:
    table = Table(title=title, caption=caption, show_lines=False)
    cols = list(rows[0].keys()) if rows else []
    for c in cols:
        table.add_column(str(c), overflow="fold")
    for r in rows:
        table.add_row(*["-" if r.get(c) is None else str(r.get(c)) for c in cols])
    console().print(table)
