"""Spot files of the original ST platform (Her2ST, cSCC): coordinates and the grid's pixel scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stbench.errors import DataError

SELECTION_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


def read_selection(path: Path, slide: str) -> pd.DataFrame:
    try:
        sel = pd.read_csv(path, sep="\t")
    except Exception as exc:
        raise DataError(f"cannot parse spot file: {exc}", file=path, slide=slide, field="selection") from exc
    missing = [c for c in SELECTION_COLUMNS if c not in sel.columns]
    if missing:
        raise DataError(f"spot file lacks columns {missing}", file=path, slide=slide, field=",".join(missing))
    bad = sel[list(SELECTION_COLUMNS)].isna().any(axis=1)
    if bad.any():
        raise DataError(
            f"{int(bad.sum())} spot rows with empty coordinates",
            file=path,
            slide=slide,
            field="pixel_x,pixel_y",
        )
    return sel


def grid_mpp(sel: pd.DataFrame, spacing_um: float) -> float | None:
    """Micrometres per pixel: `spacing_um` per array step / fitted pixels per array step."""
    ax = sel["new_x"] if "new_x" in sel.columns else sel["x"]
    ay = sel["new_y"] if "new_y" in sel.columns else sel["y"]
    steps = []
    for a, p in ((ax, sel["pixel_x"]), (ay, sel["pixel_y"])):
        a = a.to_numpy(float)
        if len(a) > 1 and np.ptp(a) > 0:
            steps.append(abs(np.polyfit(a, p.to_numpy(float), 1)[0]))
    if not steps or not np.mean(steps) > 0:
        return None
    return spacing_um / float(np.mean(steps))
