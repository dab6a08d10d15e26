"""Lazy slide-image handle: knows its path and size without decoding pixels."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stbench.errors import DataError

# Whole-slide H&E JPEGs are far above PIL's decompression-bomb default; they are trusted inputs.
_MAX_PIXELS = 2_000_000_000

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".ome.tif", ".ome.tiff")


@dataclass
class SlideImage:
    """A slide image on disk, decoded only when `read()` is called.

    `page` picks the TIFF series level (0 = full resolution); `channel_axis_last` is always true
    for what `read()` returns (H, W, C) uint8/uint16.
    """

    path: Path
    page: int = 0
    _size: tuple[int, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def is_tiff(self) -> bool:
        return self.path.name.lower().endswith(TIFF_SUFFIXES)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, read from the header only."""
        if self._size is None:
            self._size = self._read_size()
        return self._size

    def _read_size(self) -> tuple[int, int]:
        if not self.path.exists():
            raise DataError("image file not found", file=self.path, field="image")
        try:
            if self.is_tiff:
                import tifffile

                with tifffile.TiffFile(self.path) as tf:
                    shape = tf.series[0].levels[self.page].shape
                    axes = tf.series[0].levels[self.page].axes
                h = shape[axes.index("Y")]
                w = shape[axes.index("X")]
                return int(w), int(h)
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = _MAX_PIXELS
            with Image.open(self.path) as im:
                return im.size
        except DataError:
            raise
        except Exception as exc:  # corrupt header, unsupported format
            raise DataError(f"cannot read image header: {exc}", file=self.path, field="image") from exc

    def read(self) -> np.ndarray:
        """Decode the full image as (H, W, C). Called once per patch extraction, never per patch."""
        try:
            if self.is_tiff:
                import tifffile

                with tifffile.TiffFile(self.path) as tf:
                    level = tf.series[0].levels[self.page]
                    arr = level.asarray()
                    axes = level.axes
                arr = _to_hwc(arr, axes)
            else:
                from PIL import Image

                Image.MAX_IMAGE_PIXELS = _MAX_PIXELS
                with Image.open(self.path) as im:
                    # convert() copies the whole slide; only pay for it when the mode differs
                    arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot decode image: {exc}", file=self.path, field="image") from exc
        self._size = (arr.shape[1], arr.shape[0])
        return arr


def _to_hwc(arr: np.ndarray, axes: str) -> np.ndarray:
    """Reorder a TIFF array to (H, W, C), dropping singleton Z/T axes."""
    keep = []
    for _i, ax in enumerate(axes):
        if ax in "YXCS":
            keep.append(ax)
        else:
            arr = np.take(arr, 0, axis=len(keep))
    order = [keep.index("Y"), keep.index("X")]
    chan = [i for i, ax in enumerate(keep) if ax in "CS"]
    arr = np.transpose(arr, order + chan)
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr
