"""Rectangles of a slide image at any pyramid level, without decoding the whole slide.

Why: a Xenium H&E whole-slide image is 50,000-100,000 px on a side (10-30 GB decoded), and the
pseudo-bulk tiler needs per-tile image statistics. `RegionReader` reads one band of tiles at a
time, at the coarsest pyramid level that still gives enough pixels per tile:

- TIFF (pyramidal or not, tiled or striped): through tifffile's zarr view (`aszarr`), which
  decodes only the TIFF tiles/strips a rectangle touches. Level i = `series[0].levels[page + i]`.
- OME-NGFF zarr image groups (SpatialData `images/<name>`, e.g. CrunchDAO's `HE_original`) and
  plain zarr arrays: `ZarrImage`, sliced lazily; level i = the i-th `multiscales` dataset.
- Other formats (JPEG, PNG): decoded once per reader (PIL cannot crop without decoding); fine for
  the spot-based datasets that ship them, whose images are ~10,000 px on a side.

Every region comes back as (h, w, C) in the image's own dtype, clipped to the image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stbench.data.image import SlideImage, _to_hwc
from stbench.errors import DataError

_NGFF_AXES = {"c": "C", "y": "Y", "x": "X", "z": "Z", "t": "T"}


def is_zarr_node(path: str | Path) -> bool:
    """A zarr v2 (.zarray/.zgroup) or v3 (zarr.json) node on disk."""
    p = Path(path)
    return p.is_dir() and any((p / m).exists() for m in (".zarray", ".zgroup", "zarr.json"))


def open_slide_image(path: str | Path, page: int = 0) -> SlideImage:
    """The right `SlideImage` kind for a path: `ZarrImage` for a zarr node, else `SlideImage`."""
    return ZarrImage(Path(path), page=page) if is_zarr_node(path) else SlideImage(Path(path), page=page)


def ngff_multiscales(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """`multiscales` of an OME-NGFF group: top level (NGFF 0.4, zarr v2) or under "ome" (0.5, v3)."""
    ms = attrs.get("multiscales")
    if ms is None and isinstance(attrs.get("ome"), dict):
        ms = attrs["ome"].get("multiscales")
    return list(ms or [])


def _zarr():
    try:
        import zarr
    except ImportError as exc:  # pragma: no cover - zarr ships with the data extras
        raise DataError(
            "reading zarr images needs the `zarr` package (pip install zarr)", field="zarr"
        ) from exc
    return zarr


@dataclass
class ZarrImage(SlideImage):
    """A slide image stored as zarr: an OME-NGFF multiscale group (page = pyramid level) or an array.

    Axes come from the group's `multiscales[0].axes` (NGFF names c/y/x); a bare array is read as
    (c, y, x) when its first axis has at most 4 entries, else (y, x[, c])."""

    @property
    def is_tiff(self) -> bool:
        return False

    def open_level(self, level: int = 0) -> tuple[Any, str]:
        """(zarr array, tifffile-style axes string such as "CYX") of pyramid level `page + level`."""
        zarr = _zarr()
        if not is_zarr_node(self.path):
            raise DataError("zarr image not found", file=self.path, field="image")
        try:
            node = zarr.open(str(self.path), mode="r")
        except Exception as exc:
            raise DataError(f"cannot open zarr image: {exc}", file=self.path, field="image") from exc
        if isinstance(node, zarr.Array):
            if self.page + level != 0:
                raise DataError("a zarr array has only one level", file=self.path, field="image_page")
            return node, _guess_axes(node.shape)
        ms = ngff_multiscales(node.attrs.asdict())
        if not ms:
            raise DataError(
                "zarr group is not an OME-NGFF image (no multiscales)", file=self.path, field="multiscales"
            )
        datasets = ms[0].get("datasets") or [{"path": "0"}]
        i = self.page + level
        if i >= len(datasets):
            raise DataError(
                f"level {i} requested but the image has {len(datasets)}", file=self.path, field="image_page"
            )
        try:
            arr = node[str(datasets[i]["path"])]
        except Exception as exc:
            raise DataError(f"missing multiscale dataset: {exc}", file=self.path, field="datasets") from exc
        names = [a["name"] if isinstance(a, dict) else str(a) for a in ms[0].get("axes", [])]
        axes = "".join(_NGFF_AXES.get(n.lower(), "Q") for n in names) if names else _guess_axes(arr.shape)
        if len(axes) != arr.ndim or "Y" not in axes or "X" not in axes:
            raise DataError(
                f"unsupported image axes {names} for shape {arr.shape}", file=self.path, field="axes"
            )
        return arr, axes

    def n_levels(self) -> int:
        zarr = _zarr()
        node = zarr.open(str(self.path), mode="r")
        if isinstance(node, zarr.Array):
            return 1
        return max(1, len(ngff_multiscales(node.attrs.asdict())[0].get("datasets", [])) - self.page)

    def _read_size(self) -> tuple[int, int]:
        arr, axes = self.open_level(0)
        return int(arr.shape[axes.index("X")]), int(arr.shape[axes.index("Y")])

    def read(self) -> np.ndarray:
        arr, axes = self.open_level(0)
        out = _to_hwc(np.asarray(arr[...]), axes)
        self._size = (out.shape[1], out.shape[0])
        return out


def _guess_axes(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        return "CYX" if shape[0] <= 4 else "YXC"
    raise DataError(f"cannot infer the axes of a zarr image of shape {shape}", field="axes")


def _slice(arr: Any, axes: str, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """arr[..., y0:y1, x0:x1, ...] as (h, w, C): index 0 on every axis that is not Y, X or a channel."""
    index = []
    kept = ""
    for ax in axes:
        if ax == "Y":
            index.append(slice(y0, y1))
        elif ax == "X":
            index.append(slice(x0, x1))
        elif ax in "CS":
            index.append(slice(None))
        else:
            index.append(0)
            continue
        kept += ax
    return _to_hwc(np.asarray(arr[tuple(index)]), kept)


class RegionReader:
    """Reads rectangles of one `SlideImage` at any of its pyramid levels; use as a context manager.

    `levels[i]` is the (width, height) of level i (level 0 = the image's full resolution);
    `read(level, x0, y0, x1, y1)` returns pixels [y0, y1) x [x0, x1) of that level, clipped."""

    def __init__(self, image: SlideImage) -> None:
        self.image = image
        self._tiff: Any = None
        self._arrays: dict[int, tuple[Any, str]] = {}
        self._decoded: np.ndarray | None = None
        self.levels: list[tuple[int, int]] = self._levels()

    def _levels(self) -> list[tuple[int, int]]:
        img = self.image
        if isinstance(img, ZarrImage):
            out = []
            for i in range(img.n_levels()):
                arr, axes = img.open_level(i)
                self._arrays[i] = (arr, axes)
                out.append((int(arr.shape[axes.index("X")]), int(arr.shape[axes.index("Y")])))
            return out
        if img.is_tiff:
            import tifffile

            try:
                self._tiff = tifffile.TiffFile(img.path)
                series = self._tiff.series[0]
                levels = series.levels[img.page :]
            except Exception as exc:
                raise DataError(f"cannot read image header: {exc}", file=img.path, field="image") from exc
            return [(int(lv.shape[lv.axes.index("X")]), int(lv.shape[lv.axes.index("Y")])) for lv in levels]
        return [img.size]

    def __enter__(self) -> RegionReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._tiff is not None:
            self._tiff.close()
            self._tiff = None
        self._arrays.clear()
        self._decoded = None

    def downsample(self, level: int) -> float:
        """Level-0 pixels per pixel of `level` (along x)."""
        return self.levels[0][0] / self.levels[level][0]

    def read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        w, h = self.levels[level]
        x0, x1 = max(0, int(x0)), min(w, int(x1))
        y0, y1 = max(0, int(y0)), min(h, int(y1))
        if x1 <= x0 or y1 <= y0:
            return np.zeros((0, 0, 1), dtype=np.uint8)
        img = self.image
        try:
            if isinstance(img, ZarrImage):
                arr, axes = self._arrays[level]
                return _slice(arr, axes, x0, y0, x1, y1)
            if self._tiff is not None:
                if level not in self._arrays:
                    self._arrays[level] = self._tiff_level(level)
                arr, axes = self._arrays[level]
                return _slice(arr, axes, x0, y0, x1, y1)
            if self._decoded is None:
                self._decoded = img.read()
            return self._decoded[y0:y1, x0:x1]
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot read image region: {exc}", file=img.path, field="image") from exc

    def _tiff_level(self, level: int) -> tuple[Any, str]:
        series = self._tiff.series[0]
        lv = series.levels[self.image.page + level]
        try:
            import zarr

            store = series.aszarr(level=self.image.page + level)
            return zarr.open(store, mode="r"), lv.axes
        except ImportError:  # pragma: no cover - without zarr: decode this level once
            return lv.asarray(), lv.axes


def read_json_attrs(node_dir: Path) -> dict[str, Any]:
    """Attributes of a zarr v2 (.zattrs) or v3 (zarr.json) node, without opening a store."""
    v2 = node_dir / ".zattrs"
    if v2.exists():
        return json.loads(v2.read_text())
    v3 = node_dir / "zarr.json"
    if v3.exists():
        return dict(json.loads(v3.read_text()).get("attributes", {}))
    return {}
