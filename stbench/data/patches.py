"""Patch store: one uint8 patch per spot at a declared physical scale, cached on disk by key.

Why a store: decoding a whole-slide JPEG costs seconds, cropping a spot costs microseconds, so each
slide image is decoded once per extraction and every later epoch reads patches from a read-only
memory map (`patches.npy`, shape (N, out_px, out_px, 3), uint8).

Conventions (also written into every store's `index.json`):

- Coordinates. `slide.coords` are spot centres in full-resolution pixel *indices* (scanpy/numpy:
  the centre of pixel i is at coordinate i, as `imshow` draws it). In the continuous frame where
  pixel i covers [i, i + 1), a spot at c sits at c + 0.5. The crop window of side s (full-res px)
  is [c + 0.5 - s/2, c + 0.5 + s/2) on each axis, sub-pixel exact. Output pixel j samples the
  continuous point x0 + (j + 0.5) * s / out_px, so the patch's geometric centre (out_px / 2) is the
  spot centre: for odd out_px the middle pixel, for even out_px the corner shared by the middle
  2 x 2 pixels.
- Resampling. Pillow `Image.resize(..., BILINEAR, box=window)` on a window cut with a margin, so
  sub-pixel boxes are honoured, upsampling is plain bilinear interpolation and downsampling is
  antialiased (the triangle filter widens with the scale) exactly as if the whole slide were resized.
- Edges. `edge="pad"`: the part of the window outside the image is white (255) and the spot is
  flagged `at_edge`; the centre convention still holds. `edge="shift"`: the window is moved inside
  the image (the spot is flagged `at_edge` and the shift in full-res px is recorded in
  `quality.csv`; the centre convention then does not hold for that spot). A window larger than the
  image is centred and padded on that axis.
- Quality (recorded per spot, never used to drop anything here; see `SlidePatches.flags`):
  `background_fraction` = fraction of pixels that are bright and grey, i.e. min(R, G, B) >= 200 and
  saturation (max - min) / max < 0.10 (glass is ~(218, 209, 226) to (245, 243, 243) on Her2ST,
  stained tissue has saturation > 0.1); padding counts as background. `blur` = variance of the
  4-neighbour Laplacian of the grey patch (Pillow "L": 0.299 R + 0.587 G + 0.114 B, 0..255) on
  the resampled patch, so it is comparable only between stores of the same spec.
- Images that are not 8-bit RGB are converted: 1 channel is repeated, alpha dropped, and other
  integer/float images scaled linearly so the image's 99.9th percentile maps to 255.

On disk: `<cache_dir>/<slide>-<key>/` holds `patches.npy`, `quality.csv` (spot_id, x, y, at_edge,
shift_x, shift_y, background_fraction, blur) and `index.json` (spec, slide, image, mpp, crop size,
conventions, timings). The key hashes the spec, the crop size in px, the slide name, the resolved
image path, its size and mtime, and the spot ids and coordinates. `patches.npy` is filled through
`open_memmap` under a temp name and renamed; `quality.csv` and then `index.json` follow, atomically.
A store counts as built only when all three exist and agree in shape, so a killed extraction is
redone, and its leftover temp file is ignored and removed. Builders of one key take a file lock,
so DDP ranks sharing a cache extract a slide once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stbench.errors import DataError
from stbench.utils.io import stable_hash, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    import pandas as pd

    from stbench.data.slide import Slide

STORE_VERSION = 1
EDGE_MODES = ("pad", "shift")
BACKGROUND_MIN_CHANNEL = 200
BACKGROUND_MAX_SATURATION = 0.10
PAD_VALUE = 255
_PATCHES = "patches.npy"
_INDEX = "index.json"
_QUALITY = "quality.csv"


@dataclass(frozen=True)
class PatchSpec:
    """What a patch is: `out_px` output side, crop side in micrometres (`crop_um`) or full-res
    pixels (`crop_px`) - at most one; neither means the slide's spot diameter - and the edge rule."""

    out_px: int = 224
    crop_um: float | None = None
    crop_px: int | None = None
    edge: str = "pad"

    def __post_init__(self) -> None:
        if int(self.out_px) != self.out_px or self.out_px < 1:
            raise DataError(f"out_px must be a positive integer, got {self.out_px!r}", field="out_px")
        if self.crop_um is not None and self.crop_px is not None:
            raise DataError("give crop_um or crop_px, not both", field="crop_um,crop_px")
        for name in ("crop_um", "crop_px"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise DataError(f"{name} must be > 0, got {value!r}", field=name)
        if self.edge not in EDGE_MODES:
            raise DataError(f"edge must be one of {EDGE_MODES}, got {self.edge!r}", field="edge")

    def crop_size_px(self, slide: Slide) -> float:
        """Crop side in full-resolution pixels of `slide`'s image."""
        if self.crop_px is not None:
            return float(self.crop_px)
        if slide.mpp is None or not slide.mpp > 0:
            why = f"crop_um={self.crop_um}" if self.crop_um is not None else "a spot-diameter crop"
            raise DataError(
                f"{why} needs the image scale (mpp)", file=slide.source, slide=slide.name, field="mpp"
            )
        if self.crop_um is not None:
            return float(self.crop_um) / float(slide.mpp)
        if slide.spot_diameter_um is None:
            raise DataError(
                "no crop size given and the slide has no spot diameter",
                file=slide.source,
                slide=slide.name,
                field="spot_diameter_um",
            )
        return float(slide.spot_diameter_um) / float(slide.mpp)

    def key(self) -> dict[str, Any]:
        """Stable, JSON-able description (hashed into store keys; includes the store format version)."""
        return {**asdict(self), "resample": "pil-bilinear-box", "version": STORE_VERSION}


class SlidePatches:
    """An opened store: read-only memory-mapped patches plus per-spot edge and quality records."""

    def __init__(self, path: Path, index: dict[str, Any], quality: pd.DataFrame, patches: np.ndarray) -> None:
        self.path = Path(path)
        self.index = index
        self.key: str = index["key"]
        self.patches = patches
        self.spot_ids: list[str] = [str(s) for s in quality["spot_id"]]
        self.at_edge = quality["at_edge"].to_numpy(dtype=bool)
        self.background_fraction = quality["background_fraction"].to_numpy(dtype=np.float32)
        self.blur = quality["blur"].to_numpy(dtype=np.float32)
        self.quality = quality

    @property
    def crop_size_px(self) -> float:
        return float(self.index["crop_size_px"])

    def __len__(self) -> int:
        return int(self.patches.shape[0])

    def __getitem__(self, i: Any) -> np.ndarray:
        return self.patches[i]

    def __repr__(self) -> str:
        return f"SlidePatches({self.index['slide']!r}, n={len(self)}, key={self.key!r})"

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get the path, not a pickled copy of every patch; they re-map the file.
        return {k: v for k, v in self.__dict__.items() if k != "patches"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.patches = np.load(self.path / _PATCHES, mmap_mode="r")

    def spot_index(self) -> dict[str, int]:
        """spot id -> row in `patches`."""
        return {s: i for i, s in enumerate(self.spot_ids)}

    def flags(
        self, background_max: float = 0.9, blur_min: float | None = None, exclude_edge: bool = False
    ) -> pd.DataFrame:
        """Per-spot quality flags (index = spot id). `keep` is False for spots whose background
        fraction exceeds `background_max`, whose blur is below `blur_min` (when given) or, with
        `exclude_edge`, whose window left the image. Callers decide what to do and report counts."""
        import pandas as pd

        df = pd.DataFrame(
            {
                "at_edge": self.at_edge,
                "background_fraction": self.background_fraction,
                "blur": self.blur,
            },
            index=pd.Index(self.spot_ids, name="spot"),
        )
        df["is_background"] = df["background_fraction"] > background_max
        df["is_blurry"] = (df["blur"] < blur_min) if blur_min is not None else False
        df["keep"] = ~(df["is_background"] | df["is_blurry"] | (df["at_edge"] & exclude_edge))
        return df


class PatchStore:
    """Builds and opens `SlidePatches` under `cache_dir`, one directory per key."""

    def __init__(
        self, cache_dir: str | Path, spec: PatchSpec | None = None, workers: int | None = None
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.spec = spec or PatchSpec()
        self.workers = workers if workers is not None else min(4, os.cpu_count() or 1)  # not in the key

    # ---- keys ----------------------------------------------------------------------------
    def key(self, slide: Slide) -> str:
        """Hash of everything the patches depend on: spec, crop size, slide, image file, coordinates."""
        image = _require_image(slide)
        if not image.path.exists():
            raise DataError("image file not found", file=image.path, slide=slide.name, field="image")
        st = image.path.stat()
        return stable_hash(
            {
                "spec": self.spec.key(),
                "crop_size_px": round(self.spec.crop_size_px(slide), 6),
                "slide": slide.name,
                "image": str(image.path.resolve()),
                "image_page": image.page,
                "image_bytes": st.st_size,
                "image_mtime_ns": st.st_mtime_ns,
                "spots": _spots_hash(slide),
            }
        )

    def path(self, slide: Slide, key: str | None = None) -> Path:
        """The store's directory: `<cache_dir>/<slide>-<key>`."""
        return self.cache_dir / f"{_safe(slide.name)}-{key or self.key(slide)}"

    # ---- public --------------------------------------------------------------------------
    def build(self, slide: Slide, progress: bool = False) -> SlidePatches:
        """Open the store for `slide`, extracting it first if it is missing or incomplete."""
        key = self.key(slide)
        path = self.path(slide, key)
        found = _try_open(path)
        if found is not None:
            return found
        with _lock(path.with_name(f".{path.name}.lock")):
            found = _try_open(path)  # another process may have finished while we waited
            if found is not None:
                return found
            _extract(slide, self.spec, path, key, progress, self.workers)
        opened = _try_open(path)
        if opened is None:  # pragma: no cover - only if the disk lies
            raise DataError(
                "patch store incomplete right after writing", file=path, slide=slide.name, field="patches"
            )
        return opened

    def open(self, slide: Slide) -> SlidePatches:
        """Open an already built store; DataError if it was never built (or is incomplete)."""
        path = self.path(slide)
        found = _try_open(path)
        if found is None:
            raise DataError(
                "patch store not built for this spec (call PatchStore.build)",
                file=path,
                slide=slide.name,
                field="patches",
            )
        return found


# ---- extraction ------------------------------------------------------------------------------
def _extract(slide: Slide, spec: PatchSpec, path: Path, key: str, progress: bool, workers: int) -> None:
    """Decode once, cut every spot, write patches to a temp file, rename; index.json goes last."""
    import pandas as pd

    image = _require_image(slide)
    coords = slide.coords
    if coords.shape != (slide.n_spots, 2) or not np.isfinite(coords).all():
        raise DataError(
            "spot coordinates must be finite (n_spots, 2)",
            file=slide.source,
            slide=slide.name,
            field="obsm/spatial",
        )
    crop = spec.crop_size_px(slide)
    t0 = time.perf_counter()
    arr = _to_rgb_uint8(image.read())
    t_decode = time.perf_counter() - t0
    path.mkdir(parents=True, exist_ok=True)
    (path / _INDEX).unlink(missing_ok=True)  # never look complete while being rewritten
    for leftover in path.glob(".*.tmp"):  # from a killed build; we hold the lock, so it is stale
        leftover.unlink(missing_ok=True)
    n, out = slide.n_spots, spec.out_px
    fd, tmp_name = tempfile.mkstemp(prefix=f".{_PATCHES}.", suffix=".tmp", dir=path)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, out, out, 3))
        at_edge, shift, background, blur = _cut_all(
            arr, coords, crop, spec, mm, workers, progress, slide.name
        )
        mm.flush()
        del mm
        os.replace(tmp, path / _PATCHES)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    quality = pd.DataFrame(
        {
            "spot_id": slide.spot_ids,
            "x": coords[:, 0],
            "y": coords[:, 1],
            "at_edge": at_edge,
            "shift_x": shift[:, 0],
            "shift_y": shift[:, 1],
            "background_fraction": background,
            "blur": blur,
        }
    )
    write_text_atomic(path / _QUALITY, quality.to_csv(index=False))
    h, w = arr.shape[:2]
    write_json_atomic(
        path / _INDEX,
        {
            "key": key,
            "version": STORE_VERSION,
            "slide": slide.name,
            "patient": slide.patient,
            "image": str(image.path),
            "image_size": [w, h],
            "mpp": slide.mpp,
            "spot_diameter_um": slide.spot_diameter_um,
            "spec": asdict(spec),
            "crop_size_px": crop,
            "crop_size_um": crop * slide.mpp if slide.mpp else None,
            "out_px": out,
            "out_mpp": crop * slide.mpp / out if slide.mpp else None,
            "n_spots": n,
            "shape": [n, out, out, 3],
            "dtype": "uint8",
            "n_at_edge": int(at_edge.sum()),
            "seconds_decode": round(t_decode, 3),
            "seconds_total": round(time.perf_counter() - t0, 3),
            "conventions": {
                "coords": "pixel-index frame: pixel i centre at i; window [c+0.5-s/2, c+0.5+s/2) continuous",
                "resample": "PIL resize BILINEAR with sub-pixel box (antialiased when downsampling)",
                "edge": spec.edge,
                "pad_value": PAD_VALUE,
                "background": f"min(RGB) >= {BACKGROUND_MIN_CHANNEL} and (max-min)/max < "
                f"{BACKGROUND_MAX_SATURATION}",
                "blur": "variance of 4-neighbour Laplacian of the PIL L (0.299R+0.587G+0.114B) patch",
            },
        },
    )


def _cut_all(
    arr: np.ndarray,
    coords: np.ndarray,
    crop: float,
    spec: PatchSpec,
    dest: np.ndarray,
    workers: int,
    progress: bool,
    label: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut every spot into `dest[i]`; return (at_edge, shift, background, blur) per spot.

    Pillow's resize releases the GIL, so threads share the one decoded image without copies; each
    thread writes its own rows of `dest`."""
    n = len(coords)
    at_edge = np.zeros(n, dtype=bool)
    shift = np.zeros((n, 2), dtype=np.float64)
    background = np.zeros(n, dtype=np.float32)
    blur = np.zeros(n, dtype=np.float32)

    def one(i: int) -> tuple[bool, tuple, float, float]:
        im, edge_i, shift_i = _cut(arr, coords[i], crop, spec.out_px, spec.edge)
        patch = np.asarray(im)
        dest[i] = patch
        return edge_i, shift_i, background_fraction(patch), laplacian_variance(im)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = _progress(pool.map(one, range(n)), progress, f"patches {label}", n)
        for i, (edge_i, shift_i, bg_i, blur_i) in enumerate(results):
            at_edge[i], shift[i], background[i], blur[i] = edge_i, shift_i, bg_i, blur_i
    return at_edge, shift, background, blur


def _cut(arr: np.ndarray, centre: np.ndarray, s: float, out: int, edge: str) -> tuple[Any, bool, tuple]:
    """One patch (a Pillow RGB image): window of side `s` around `centre`, resampled to out x out."""
    from PIL import Image

    h, w = arr.shape[:2]
    x0 = float(centre[0]) + 0.5 - s / 2.0
    y0 = float(centre[1]) + 0.5 - s / 2.0
    at_edge = x0 < 0 or y0 < 0 or x0 + s > w or y0 + s > h
    sx = sy = 0.0
    if at_edge and edge == "shift":
        nx, ny = _shift_inside(x0, s, w), _shift_inside(y0, s, h)
        sx, sy, x0, y0 = nx - x0, ny - y0, nx, ny
    margin = int(math.ceil(max(1.0, s / out))) + 1  # the bilinear filter's reach, in source pixels
    ix0, iy0 = math.floor(x0) - margin, math.floor(y0) - margin
    ix1, iy1 = math.ceil(x0 + s) + margin, math.ceil(y0 + s) + margin
    if ix0 >= 0 and iy0 >= 0 and ix1 <= w and iy1 <= h:
        region = arr[iy0:iy1, ix0:ix1]
    else:
        region = np.full((iy1 - iy0, ix1 - ix0, 3), PAD_VALUE, dtype=np.uint8)
        cx0, cy0, cx1, cy1 = max(ix0, 0), max(iy0, 0), min(ix1, w), min(iy1, h)
        if cx1 > cx0 and cy1 > cy0:
            region[cy0 - iy0 : cy1 - iy0, cx0 - ix0 : cx1 - ix0] = arr[cy0:cy1, cx0:cx1]
    box = (x0 - ix0, y0 - iy0, x0 - ix0 + s, y0 - iy0 + s)
    im = Image.fromarray(np.ascontiguousarray(region))
    return im.resize((out, out), Image.Resampling.BILINEAR, box=box), bool(at_edge), (sx, sy)


def _shift_inside(start: float, s: float, size: int) -> float:
    if s >= size:
        return (size - s) / 2.0  # cannot fit: centre it, the rest is padded
    return min(max(start, 0.0), size - s)


# ---- quality ---------------------------------------------------------------------------------
def background_fraction(patch: np.ndarray) -> float:
    """Fraction of bright, grey pixels (glass or padding); see the module docstring."""
    r, g, b = patch[..., 0], patch[..., 1], patch[..., 2]
    mx = np.maximum(np.maximum(r, g), b).astype(np.int16)
    mn = np.minimum(np.minimum(r, g), b).astype(np.int16)
    grey = (mx - mn) < BACKGROUND_MAX_SATURATION * mx
    return float(np.count_nonzero((mn >= BACKGROUND_MIN_CHANNEL) & grey)) / mn.size


def laplacian_variance(patch: np.ndarray | Any) -> float:
    """Variance of the 4-neighbour Laplacian of the grey patch: low = flat or blurred.

    Accepts an (H, W, 3) uint8 array or a Pillow RGB image; integer arithmetic, so it is exact."""
    from PIL import Image

    im = patch if isinstance(patch, Image.Image) else Image.fromarray(np.ascontiguousarray(patch[..., :3]))
    if im.width < 3 or im.height < 3:
        return 0.0
    g = np.asarray(im.convert("L")).astype(np.int16)
    lap = g[1:-1, :-2] + g[1:-1, 2:]
    lap += g[:-2, 1:-1]
    lap += g[2:, 1:-1]
    lap -= 4 * g[1:-1, 1:-1]
    flat = lap.ravel().astype(np.int64)
    n = flat.size
    mean = float(flat.sum()) / n
    return float(np.dot(flat, flat)) / n - mean * mean


# ---- helpers ---------------------------------------------------------------------------------
def _require_image(slide: Slide) -> Any:
    if slide.image is None:
        raise DataError(
            "slide has no image, so it has no patches", file=slide.source, slide=slide.name, field="image"
        )
    return slide.image


def _spots_hash(slide: Slide) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(slide.coords, dtype="<f8").tobytes())
    h.update("\n".join(slide.spot_ids).encode())
    return h.hexdigest()[:16]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", name) or "slide"


def _to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """(H, W, C) of any dtype -> (H, W, 3) uint8 (see the module docstring)."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] >= 4:
        arr = arr[..., :3]
    if arr.dtype != np.uint8:
        a = arr.astype(np.float32)
        top = float(np.percentile(a[:: max(1, a.shape[0] // 512), :: max(1, a.shape[1] // 512)], 99.9))
        arr = np.clip(a * (255.0 / top if top > 0 else 1.0), 0, 255).round().astype(np.uint8)
    return arr


def _try_open(path: Path) -> SlidePatches | None:
    """The store at `path` if complete (index.json written last, shapes agree), else None."""
    index_file, quality_file, patches_file = path / _INDEX, path / _QUALITY, path / _PATCHES
    if not (index_file.exists() and quality_file.exists() and patches_file.exists()):
        return None
    import pandas as pd

    try:
        index = json.loads(index_file.read_text())
        quality = pd.read_csv(quality_file, dtype={"spot_id": str}, keep_default_na=False)
        patches = np.load(patches_file, mmap_mode="r")
    except (ValueError, OSError):
        return None
    if list(patches.shape) != index.get("shape") or len(quality) != patches.shape[0]:
        return None
    quality["at_edge"] = quality["at_edge"].astype(str).str.lower().isin(("true", "1"))
    return SlidePatches(path, index, quality, patches)


@contextlib.contextmanager
def _lock(lock_file: Path) -> Iterator[None]:
    """Exclusive inter-process lock, so DDP ranks sharing a cache extract a slide once."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no lock, atomic renames still protect readers
        yield
        return
    with open(lock_file, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _progress(it: Iterator[Any], on: bool, label: str, total: int) -> Iterator[Any]:
    if not on:
        return it
    try:
        from rich.progress import track
    except ImportError:  # pragma: no cover
        return it
    return track(it, description=label, total=total)
