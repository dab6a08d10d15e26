"""Latent store: VAE latents of every spot patch (STMDiT / PixCell), computed once and memory-mapped.

Why a store: the SD3 VAE encoder costs far more per tile than a DiT training step on its latents,
and a latent-diffusion method reads every tile hundreds of times; so, like frozen-encoder features
(stbench/data/features.py), latents are extracted once per (VAE weights, VAE convention, patches,
precision, storage dtype) and every later epoch, job and method reads them from disk.

On disk: `<cache_dir>/latents/<slide>-<vae name>-<key>/`
  mean.npy      (n_spots, C, h, w) scaled posterior mean `(mean - shift) * scale`, rows in the patch
                store's spot order
  std.npy       (n_spots, C, h, w) scaled posterior std `std * scale` (PixCell trains on a fresh
                sample mean + std * eps each time a tile is loaded; std lets a method do the same)
  index.json    key, VAE weights id and convention, patch-store key, shape, dtype, timings: written
                last, the `done` marker
  .mean.partial.npy / .std.partial.npy + chunks/<i>.done: filled chunk by chunk and flushed before
                each chunk's marker, so a killed extraction resumes from the missing chunks; the two
                files are renamed, then index.json is written (atomic).
Storage dtype (part of the key): float32 by default, float16 as an option (PixCell stores fp16;
scaled latents are O(1), so its relative error is <= 2**-11, and it halves the disk). Why float32 is
the default: the DataModule keeps FeatureFn arrays as float32, so float32 latents in spot order reach
it as a read-only memory map (page cache, no copy), while float16 ones are upcast into a float32 copy
in RAM: C*h*w*4 bytes per spot and key (64 KiB at 256 px; ~8 GB for 125k spots).

How a method asks for latents (the `features=` contract of STDataModule):
  requires = BatchRequirements(image=False, features=("encoder", "latents"))   # + "latents_std"
and hyper-parameters `vae` (a `load_vae` source; default "default" = SD3.5's gated VAE, "tiny" for
tests), `latent_px` (tile side fed to the VAE, default 256 -> 32 x 32 latents) and `latent_dtype`.
The runner passes `{**features_for(...), **latents_for(...)}` as `STDataModule(features=...)`;
batches then carry `batch["features"]["latents"]` (and `["latents_std"]`) as (B, C*h*w) float32
rows (the DataModule's FeatureFn contract is 2-D), which `unflatten_latents(x, C)` turns into
(B, C, h, w). `provider_weights_id(dm, "latents")` names the VAE weights for the result row.
The crop follows the method's `requires.patch` and the job's `data.patch` (as for encoder features);
only the output side is `latent_px`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stbench.data.features import _init_defaults, _progress, weights_key
from stbench.data.patches import PatchSpec, PatchStore, SlidePatches, _lock, _safe
from stbench.errors import DataError
from stbench.utils.io import stable_hash, write_json_atomic

if TYPE_CHECKING:
    import torch

    from stbench.data.slide import Slide

LATENT_STORE_VERSION = 1
LATENT_KEY = "latents"
LATENT_STD_KEY = "latents_std"
LATENT_REQUESTS = {LATENT_KEY: "mean", LATENT_STD_KEY: "std"}
DEFAULT_LATENT_PX = 256
DEFAULT_CHUNK = 256
STORAGE_DTYPES = ("float16", "float32")
PARTS = ("mean", "std")
_INDEX = "index.json"
_CHUNKS = "chunks"


def _final(part: str) -> str:
    return f"{part}.npy"


def _partial(part: str) -> str:
    return f".{part}.partial.npy"


@dataclass
class SlideLatents:
    """Finished latents of one slide: read-only memory maps of the scaled mean and std."""

    path: Path
    index: dict[str, Any]
    mean: np.ndarray  # (n, C, h, w), mmap_mode="r"
    std: np.ndarray
    spot_ids: list[str]

    @property
    def key(self) -> str:
        return str(self.index["key"])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one spot's latents."""
        return tuple(int(s) for s in self.mean.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    def aligned(self, spot_ids: Sequence[str], part: str = "mean") -> np.ndarray:
        """(n, C, h, w) rows of `part` in the order of `spot_ids`; DataError if a spot is missing."""
        arr = self.mean if part == "mean" else self.std
        if list(spot_ids) == self.spot_ids:
            return np.asarray(arr)
        pos = {s: i for i, s in enumerate(self.spot_ids)}
        missing = [s for s in spot_ids if s not in pos]
        if missing:
            raise DataError(
                f"{len(missing)} spots have no latents (first: {missing[0]!r})",
                file=self.path,
                slide=self.index.get("slide"),
                field="spot_ids",
            )
        return np.asarray(arr[np.array([pos[s] for s in spot_ids], dtype=np.int64)])


def unflatten_latents(x: torch.Tensor, channels: int = 16) -> torch.Tensor:
    """(B, C*h*w) rows served by the DataModule -> (B, C, h, w) latents (square tiles)."""
    b, d = x.shape
    side = math.isqrt(d // channels) if d % channels == 0 else 0
    if side * side * channels != d:
        raise ValueError(f"{d} values per row are not {channels} square latent channels")
    return x.reshape(b, channels, side, side)


def vae_weights_key(vae: Any) -> str:
    """`vae.weights_id`, or a hash of the parameters for random VAEs (two "none" VAEs differ)."""
    return weights_key(vae)


class LatentStore:
    """Extracts, caches and opens `SlideLatents` under `<cache_dir>/latents/`."""

    def __init__(
        self, cache_dir: str | Path, dtype: str = "float32", chunk_size: int = DEFAULT_CHUNK
    ) -> None:
        if dtype not in STORAGE_DTYPES:
            raise DataError(
                f"latent dtype must be one of {STORAGE_DTYPES}, got {dtype!r}", field="latent_dtype"
            )
        if chunk_size < 1:
            raise DataError(f"chunk_size must be >= 1, got {chunk_size}", field="chunk_size")
        self.cache_dir = Path(cache_dir)
        self.root = self.cache_dir / "latents"
        self.dtype = dtype
        self.chunk_size = int(chunk_size)  # not in the key: scheduling only

    # ---- keys ----------------------------------------------------------------------------
    def key(self, patches: SlidePatches, vae: Any, precision: str = "fp32") -> str:
        return stable_hash(
            {
                "version": LATENT_STORE_VERSION,
                "weights": vae_weights_key(vae),
                "vae": vae.describe(),
                "precision": precision,
                "dtype": self.dtype,
                "patches": patches.key,
            }
        )

    def path(self, patches: SlidePatches, vae: Any, precision: str = "fp32") -> Path:
        slide = _safe(str(patches.index.get("slide", "slide")))
        return self.root / f"{slide}-{_safe(vae.name)}-{self.key(patches, vae, precision)}"

    def n_chunks(self, n: int) -> int:
        return max(1, -(-n // self.chunk_size))

    # ---- public --------------------------------------------------------------------------
    def open(self, patches: SlidePatches, vae: Any, precision: str = "fp32") -> SlideLatents | None:
        """The finished latents, or None if not (completely) extracted."""
        return _try_open(self.path(patches, vae, precision), patches)

    def extract(
        self,
        patches: SlidePatches,
        vae: Any,
        batch_size: int = 16,
        device: str | None = None,
        precision: str = "fp32",
        progress: bool = False,
    ) -> SlideLatents:
        """Open the slide's latents, encoding the missing chunks first. Processes sharing the cache
        (DDP ranks) take a lock, so one extracts and the others open the result."""
        if precision not in ("fp32", "bf16"):
            raise DataError(f"VAE precision must be fp32 or bf16, got {precision!r}", field="precision")
        found = self.open(patches, vae, precision)
        if found is not None:
            return found
        path = self.path(patches, vae, precision)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _lock(path.with_name(f".{path.name}.lock")):
            found = self.open(patches, vae, precision)
            if found is not None:
                return found
            t0 = time.perf_counter()
            self._fill(path, patches, vae, batch_size, device or _default_device(), precision, progress)
            return self._assemble(path, patches, vae, precision, time.perf_counter() - t0)

    # ---- internals -----------------------------------------------------------------------
    def _fill(
        self,
        path: Path,
        patches: SlidePatches,
        vae: Any,
        batch_size: int,
        device: str,
        precision: str,
        progress: bool,
    ) -> None:
        n = len(patches)
        px = int(patches.patches.shape[1])
        try:
            shape = (n, *vae.latent_shape(px))
        except ValueError as exc:
            raise DataError(str(exc), file=patches.path, field="latent_px") from None
        dtype = np.dtype(self.dtype)
        (path / _CHUNKS).mkdir(parents=True, exist_ok=True)
        for part in PARTS:  # killed between the renames and index.json: take the file back
            if not (path / _partial(part)).exists() and (path / _final(part)).exists():
                os.replace(path / _final(part), path / _partial(part))
        outs = {p: _open_partial(path / _partial(p), shape, dtype) for p in PARTS}
        if any(v is None for v in outs.values()):
            for marker in (path / _CHUNKS).glob("*.done"):  # markers without their rows mean nothing
                marker.unlink()
            for p in PARTS:
                tmp = path / f"{_partial(p)}.{os.getpid()}.tmp"
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
                del mm
                os.replace(tmp, path / _partial(p))
            outs = {p: _open_partial(path / _partial(p), shape, dtype) for p in PARTS}
        done = {int(p.stem) for p in (path / _CHUNKS).glob("*.done")}
        todo = [c for c in range(self.n_chunks(n)) if c not in done]
        label = f"latents {patches.index.get('slide', '')} {vae.name}"
        with _vae_ready(vae, device) as model:
            for c in _progress(todo, progress, label):
                lo, hi = c * self.chunk_size, min(n, (c + 1) * self.chunk_size)
                mean, std = _encode(model, patches.patches, lo, hi, batch_size, device, precision)
                for p, arr in (("mean", mean), ("std", std)):
                    outs[p][lo:hi] = arr
                    outs[p].flush()
                (path / _CHUNKS / f"{c}.done").touch()
        del outs

    def _assemble(
        self, path: Path, patches: SlidePatches, vae: Any, precision: str, seconds: float
    ) -> SlideLatents:
        shape = None
        for p in PARTS:
            arr = np.load(path / _partial(p), mmap_mode="r")
            shape = [int(s) for s in arr.shape]
            del arr
            os.replace(path / _partial(p), path / _final(p))
        write_json_atomic(
            path / _INDEX,
            {
                "key": self.key(patches, vae, precision),
                "version": LATENT_STORE_VERSION,
                "slide": patches.index.get("slide"),
                "vae": vae.name,
                "weights_id": str(vae.weights_id),
                "weights_key": vae_weights_key(vae),
                "convention": vae.describe(),
                "precision": precision,
                "patch_store": str(patches.path),
                "patch_key": patches.key,
                "shape": shape,
                "dtype": self.dtype,
                "chunk_size": self.chunk_size,
                "seconds_compute": round(float(seconds), 3),
            },
        )
        opened = _try_open(path, patches)
        if opened is None:  # pragma: no cover - only if the disk lies
            raise DataError("latent store incomplete right after writing", file=path, field="latents")
        return opened


# ---- providers for STDataModule(features={name: fn}) ------------------------------------------
def latent_provider(
    vae: Any | Callable[[], Any],
    store: LatentStore,
    patch_store: PatchStore,
    *,
    part: str = "mean",
    batch_size: int = 16,
    device: str | None = None,
    precision: str = "fp32",
    progress: bool = False,
) -> Callable[[Slide], np.ndarray]:
    """A `Slide -> (n_spots, C*h*w)` float32 FeatureFn serving the scaled posterior `part` ("mean" or
    "std") of each spot's `patch_store` patch. `vae` is a LatentVAE or a zero-argument builder
    (called once, on first use, so a job that finds every latent cached may still build it: cheap)."""
    if part not in PARTS:
        raise DataError(f"latent part must be one of {PARTS}, got {part!r}", field="features")
    built: list[Any] = []

    def model() -> Any:
        if not built:
            built.append(vae() if callable(vae) and not hasattr(vae, "encode_moments") else vae)
        return built[0]

    def provide(slide: Slide) -> np.ndarray:
        patches = patch_store.build(slide)
        lat = store.extract(
            patches, model(), batch_size=batch_size, device=device, precision=precision, progress=progress
        )
        arr = lat.aligned(slide.spot_ids, part)
        return np.ascontiguousarray(arr.reshape(len(arr), -1), dtype=np.float32)

    provide.part = part  # type: ignore[attr-defined]
    provide.weights_ids = lambda: [str(model().weights_id)]  # type: ignore[attr-defined]
    provide.latent_shape = lambda: model().latent_shape(patch_store.spec.out_px)  # type: ignore[attr-defined]
    return provide


def latents_for(
    method_cls: Any,
    method_config: dict[str, Any],
    cache_dir: str | Path,
    patch_config: dict[str, Any] | None = None,
    *,
    batch_size: int = 16,
    device: str | None = None,
    precision: str = "fp32",
    progress: bool = False,
    build: Callable[[str], Any] | None = None,
) -> dict[str, Callable[[Slide], np.ndarray]] | None:
    """The latent FeatureFns `method_cls` asks for (`"latents"` / `"latents_std"` in
    `requires.features`), keyed by those names; None when it asks for none. The VAE comes from the
    method's `vae` hyper-parameter through `build(source)` (default: stbench.encoders.vae.load_vae),
    built once and shared by both keys; tiles are `latent_px` px cut with the job's patch spec."""
    wanted = [str(w).strip() for w in getattr(getattr(method_cls, "requires", None), "features", ()) or ()]
    wanted = [w for w in wanted if w in LATENT_REQUESTS]
    if not wanted:
        return None
    defaults = _init_defaults(method_cls)
    source = str(method_config.get("vae", defaults.get("vae", "default")))
    px = int(method_config.get("latent_px", defaults.get("latent_px", DEFAULT_LATENT_PX)))
    dtype = str(method_config.get("latent_dtype", defaults.get("latent_dtype", "float32")))
    base = {**dict(getattr(method_cls.requires, "patch", {}) or {}), **dict(patch_config or {})}
    spec = PatchSpec(**{**base, "out_px": px})
    if build is None:
        from stbench.encoders.vae import load_vae

        build = load_vae
    shared: list[Any] = []

    def vae() -> Any:
        if not shared:
            shared.append(build(source))
        return shared[0]

    store, pstore = LatentStore(cache_dir, dtype=dtype), PatchStore(cache_dir, spec)
    return {
        key: latent_provider(
            vae,
            store,
            pstore,
            part=LATENT_REQUESTS[key],
            batch_size=batch_size,
            device=device,
            precision=precision,
            progress=progress,
        )
        for key in wanted
    }


# ---- internals -------------------------------------------------------------------------------
def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _open_partial(file: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    if not file.exists():
        return None
    try:
        arr = np.load(file, mmap_mode="r+")
    except (ValueError, OSError):
        return None
    return arr if arr.shape == shape and arr.dtype == dtype else None


@contextlib.contextmanager
def _vae_ready(vae: Any, device: str) -> Any:
    was_training = bool(getattr(vae, "training", False))
    vae.eval()
    vae.to(device)
    try:
        yield vae
    finally:
        vae.train(was_training)


def _encode(
    vae: Any, patches: np.ndarray, lo: int, hi: int, batch_size: int, device: str, precision: str
) -> tuple[np.ndarray, np.ndarray]:
    """Rows lo:hi of uint8 NHWC patches -> scaled (mean, std), float32 (hi - lo, C, h, w) each."""
    import torch

    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    means, stds = [], []
    for s in range(lo, hi, batch_size):
        e = min(hi, s + batch_size)
        x = torch.from_numpy(np.array(patches[s:e])).to(device).permute(0, 3, 1, 2).float() / 255.0
        ctx = (
            torch.autocast(dev_type, dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), ctx:
            mean, std = vae.encode_moments(x)
        means.append(mean.float().cpu().numpy())
        stds.append(std.float().cpu().numpy())
    mean, std = np.concatenate(means), np.concatenate(stds)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise DataError(f"VAE produced non-finite latents in rows {lo}:{hi}", field="latents")
    return mean, std


def _try_open(path: Path, patches: SlidePatches) -> SlideLatents | None:
    if not all((path / f).exists() for f in (_INDEX, _final("mean"), _final("std"))):
        return None
    try:
        index = json.loads((path / _INDEX).read_text())
        mean = np.load(path / _final("mean"), mmap_mode="r")
        std = np.load(path / _final("std"), mmap_mode="r")
    except (ValueError, OSError):
        return None
    if list(mean.shape) != index.get("shape") or mean.shape != std.shape or mean.shape[0] != len(patches):
        return None
    return SlideLatents(path, index, mean, std, list(patches.spot_ids))
