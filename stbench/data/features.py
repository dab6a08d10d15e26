"""Feature store: frozen-encoder embeddings of every spot patch, computed once and memory-mapped.

Why a store: a foundation-model forward pass costs 100-1000x a linear probe step, so features are
extracted once per (encoder, weights, preprocessing, patches) and every later job, epoch and method
reads them from disk.

On disk: `<cache_dir>/features/<slide>-<encoder>-<key>/`
  features.npy    float32 (n_spots, D), rows in the patch store's spot order; written last (rename)
  index.json      key, encoder, weights id, preprocessing, patch-store key, shape, timings: the
                  `done` marker; a store counts as finished only when it exists and agrees in shape
  .partial.npy    float32 memmap filled chunk by chunk while extracting (renamed to features.npy)
  chunks/<i>.done one empty marker per finished chunk, written after the chunk's rows are flushed:
                  the progress record. A killed extraction resumes from the missing chunks; markers
                  are per-chunk files, so ranks writing disjoint chunks never race on one file.

Features are stored as float32 whatever the autocast precision (bf16 outputs are upcast exactly).
The key hashes the encoder name, `encoder.weights_id`, the encoder's preprocessing (input size,
mean/std, token, architecture, dim), the effective precision and the patch-store key, so changing
any of them extracts anew and never reads stale features.

DDP sharding: `extract_shard(..., rank=r, world_size=w)` computes chunks r, r + w, ...; after a
barrier, rank 0 calls `assemble`. `extract` is the single-process composition of the two.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stbench.data.context import TileGrid, parse_feature_request, tile_grid_slide
from stbench.data.patches import PatchSpec, PatchStore, SlidePatches, _lock, _safe
from stbench.errors import DataError
from stbench.utils.io import stable_hash, write_json_atomic

if TYPE_CHECKING:
    from stbench.data.slide import Slide

FEATURE_STORE_VERSION = 1
FEATURE_DTYPE = np.float32
DEFAULT_CHUNK = 512
_FEATURES = "features.npy"
_PARTIAL = ".partial.npy"
_INDEX = "index.json"
_CHUNKS = "chunks"
_PREPROCESS_FIELDS = ("name", "arch", "dim", "input_px", "mean", "std", "mpp", "token")


@dataclass
class SlideFeatures:
    """Finished features of one slide: a read-only memory map plus the spot ids of its rows."""

    path: Path
    index: dict[str, Any]
    array: np.ndarray  # (n_spots, D) float32, mmap_mode="r"
    spot_ids: list[str]

    @property
    def key(self) -> str:
        return str(self.index["key"])

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def aligned(self, spot_ids: Sequence[str]) -> np.ndarray:
        """Rows in the order of `spot_ids` (e.g. `slide.spot_ids`); DataError if a spot is missing."""
        if list(spot_ids) == self.spot_ids:
            return np.asarray(self.array)
        pos = {s: i for i, s in enumerate(self.spot_ids)}
        missing = [s for s in spot_ids if s not in pos]
        if missing:
            raise DataError(
                f"{len(missing)} spots have no features (first: {missing[0]!r})",
                file=self.path,
                slide=self.index.get("slide"),
                field="spot_ids",
            )
        return np.asarray(self.array[np.array([pos[s] for s in spot_ids], dtype=np.int64)])


def preprocessing_spec(encoder: Any) -> dict[str, Any]:
    """What of the encoder changes its output besides weights (hashed into the key)."""
    spec = getattr(encoder, "spec", None)
    out = {}
    for f in _PREPROCESS_FIELDS:
        v = getattr(spec, f, None)
        out[f] = list(v) if isinstance(v, tuple) else v
    return out


def weights_key(encoder: Any) -> str:
    """`encoder.weights_id`, except for random init ("none"): then a hash of the actual parameters,
    because two random inits share the id "none" but not their features (cached on the encoder)."""
    wid = str(getattr(encoder, "weights_id", "none"))
    if wid != "none":
        return wid
    cached = getattr(encoder, "_stbench_state_hash", None)
    if cached is None:
        import hashlib

        h = hashlib.sha256()
        for name, t in sorted(encoder.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch_uint8()).numpy().tobytes())
        cached = h.hexdigest()[:16]
        with contextlib.suppress(AttributeError):
            object.__setattr__(encoder, "_stbench_state_hash", cached)
    return f"none:{cached}"


def torch_uint8() -> Any:
    import torch

    return torch.uint8


def resolve_precision(precision: str, device: str) -> str:
    """ "auto" = bf16 on CUDA, fp32 elsewhere (CPU autocast in bf16 is slow and changes numbers)."""
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    if precision not in ("bf16", "fp16", "fp32"):
        raise DataError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}", field="precision")
    return precision


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class FeatureStore:
    """Extracts, caches and opens `SlideFeatures` under `<cache_dir>/features/`."""

    def __init__(self, cache_dir: str | Path, chunk_size: int = DEFAULT_CHUNK) -> None:
        if chunk_size < 1:
            raise DataError(f"chunk_size must be >= 1, got {chunk_size}", field="chunk_size")
        self.root = Path(cache_dir) / "features"
        self.chunk_size = int(chunk_size)  # not in the key: it changes scheduling, not values

    # ---- keys ----------------------------------------------------------------------------
    def key(self, patches: SlidePatches, encoder: Any, precision: str = "fp32") -> str:
        return stable_hash(
            {
                "version": FEATURE_STORE_VERSION,
                "encoder": preprocessing_spec(encoder)["name"],
                "weights_id": weights_key(encoder),
                "preprocessing": preprocessing_spec(encoder),
                "precision": precision,
                "patches": patches.key,
                "dtype": np.dtype(FEATURE_DTYPE).name,
            }
        )

    def path(self, patches: SlidePatches, encoder: Any, precision: str = "fp32") -> Path:
        name = _safe(str(preprocessing_spec(encoder)["name"] or "encoder"))
        slide = _safe(str(patches.index.get("slide", "slide")))
        return self.root / f"{slide}-{name}-{self.key(patches, encoder, precision)}"

    def n_chunks(self, n: int) -> int:
        return max(1, -(-n // self.chunk_size))

    # ---- public --------------------------------------------------------------------------
    def extract(
        self,
        slide: Slide | None,
        patches: SlidePatches,
        encoder: Any,
        batch_size: int = 64,
        progress: bool = False,
        device: str | None = None,
        precision: str = "auto",
    ) -> SlideFeatures:
        """Open the slide's features, computing the missing chunks first (single process)."""
        device = device or _default_device()
        prec = resolve_precision(precision, device)
        found = self.open(patches, encoder, prec)
        if found is not None:
            return found
        path = self.path(patches, encoder, prec)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Processes sharing a cache (DDP ranks each running DataModule.setup) extract a slide once:
        # the others wait here, then open the finished store.
        with _lock(path.with_name(f".{path.name}.extract.lock")):
            found = self.open(patches, encoder, prec)
            if found is not None:
                return found
            self.extract_shard(patches, encoder, 0, 1, batch_size, progress, device, prec)
            return self.assemble(patches, encoder, prec)

    def open(self, patches: SlidePatches, encoder: Any, precision: str = "fp32") -> SlideFeatures | None:
        """The finished features, or None if not (completely) extracted."""
        return _try_open(self.path(patches, encoder, precision), patches)

    def pending_chunks(self, patches: SlidePatches, encoder: Any, precision: str = "fp32") -> list[int]:
        """Chunks without a `done` marker (all of them before the first run)."""
        path = self.path(patches, encoder, precision)
        done = {int(p.stem) for p in (path / _CHUNKS).glob("*.done")} if (path / _CHUNKS).is_dir() else set()
        return [c for c in range(self.n_chunks(len(patches))) if c not in done]

    def extract_shard(
        self,
        patches: SlidePatches,
        encoder: Any,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 64,
        progress: bool = False,
        device: str | None = None,
        precision: str = "fp32",
    ) -> list[int]:
        """Compute this rank's unfinished chunks (r, r + w, ...); return the chunk ids computed."""
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} outside world size {world_size}", field="rank")
        device = device or _default_device()
        path = self.path(patches, encoder, precision)
        if _try_open(path, patches) is not None:
            return []
        n, dim = len(patches), _encoder_dim(encoder)
        (path / _CHUNKS).mkdir(parents=True, exist_ok=True)
        with _lock(path.with_name(f".{path.name}.lock")):  # one rank creates the partial file
            if not (path / _PARTIAL).exists() and (path / _FEATURES).exists():
                os.replace(path / _FEATURES, path / _PARTIAL)  # killed between rename and index.json
            if not (path / _PARTIAL).exists():
                for marker in (path / _CHUNKS).glob("*.done"):  # markers without their rows mean nothing
                    marker.unlink()
                tmp = path / f"{_PARTIAL}.{os.getpid()}.tmp"
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=FEATURE_DTYPE, shape=(n, dim))
                del mm
                os.replace(tmp, path / _PARTIAL)
        mine = [c for c in self.pending_chunks(patches, encoder, precision) if c % world_size == rank]
        if not mine:
            return []
        out = np.load(path / _PARTIAL, mmap_mode="r+")
        if out.shape != (n, dim):
            raise DataError(
                f"partial features have shape {out.shape}, expected {(n, dim)}", file=path / _PARTIAL
            )
        t0 = time.perf_counter()
        label = f"features {patches.index.get('slide', '')} {preprocessing_spec(encoder)['name']}"
        with _encoder_ready(encoder, device) as enc:
            for c in _progress(mine, progress, label):
                lo, hi = c * self.chunk_size, min(n, (c + 1) * self.chunk_size)
                out[lo:hi] = _embed(enc, patches.patches, lo, hi, batch_size, device, precision, dim)
                out.flush()
                (path / _CHUNKS / f"{c}.done").touch()
        del out
        _add_seconds(path, rank, time.perf_counter() - t0)
        return mine

    def assemble(self, patches: SlidePatches, encoder: Any, precision: str = "fp32") -> SlideFeatures:
        """Rank 0 after every shard finished: rename the partial file and write the `done` index."""
        path = self.path(patches, encoder, precision)
        found = _try_open(path, patches)
        if found is not None:
            return found
        pending = self.pending_chunks(patches, encoder, precision)
        if pending or not (path / _PARTIAL).exists():
            raise DataError(
                f"cannot assemble features: chunks {pending} are not finished", file=path, field="chunks"
            )
        arr = np.load(path / _PARTIAL, mmap_mode="r")
        shape = [int(s) for s in arr.shape]
        del arr
        os.replace(path / _PARTIAL, path / _FEATURES)
        seconds = sum(json.loads(p.read_text()) for p in path.glob(".seconds.*.json"))
        write_json_atomic(
            path / _INDEX,
            {
                "key": self.key(patches, encoder, precision),
                "version": FEATURE_STORE_VERSION,
                "slide": patches.index.get("slide"),
                "encoder": preprocessing_spec(encoder)["name"],
                "weights_id": str(getattr(encoder, "weights_id", "none")),
                "preprocessing": preprocessing_spec(encoder),
                "precision": precision,
                "patch_store": str(patches.path),
                "patch_key": patches.key,
                "shape": shape,
                "dtype": np.dtype(FEATURE_DTYPE).name,
                "chunk_size": self.chunk_size,
                "seconds_compute": round(float(seconds), 3),
            },
        )
        return _try_open(path, patches)  # type: ignore[return-value]


# ---- providers for STDataModule(features={name: fn}) ------------------------------------------
def split_names(names: str | Sequence[str]) -> list[str]:
    """ "uni+conch" or ["uni", "conch"] -> ["uni", "conch"] (order kept: it is the concat order)."""
    out = [p.strip() for p in names.split("+")] if isinstance(names, str) else [str(n) for n in names]
    if not out or any(not p for p in out):
        raise DataError(f"bad encoder list {names!r}", field="encoder")
    return out


def encoder_dim(names: str, overrides: dict[str, Any] | None = None) -> int:
    """Width of the (concatenated) frozen features the provider will serve for `names` built with
    `overrides`, so a method can size its layers before any feature exists."""
    from stbench.encoders import build_encoder, get_spec

    if not overrides:
        return sum(get_spec(n).dim for n in split_names(names))
    return sum(int(build_encoder(n, "none", arch_overrides=dict(overrides)).dim) for n in split_names(names))


def feature_key(names: str | Sequence[str]) -> str:
    """The batch key of (concatenated) features: `batch["features"]["uni+conch"]`."""
    return "+".join(split_names(names))


def feature_provider(
    names: str | Sequence[str],
    weights: str | Sequence[str] = "default",
    store: FeatureStore | None = None,
    patch_store: PatchStore | None = None,
    *,
    batch_size: int = 64,
    device: str | None = None,
    precision: str = "auto",
    progress: bool = False,
    build: Callable[[str, str], Any] | None = None,
    tiles: TileGrid | None = None,
) -> Callable[[Slide], np.ndarray]:
    """A `Slide -> (n_spots, sum D)` float32 function for `STDataModule(features={key: fn})`.

    Encoders are built lazily (once, on first use) with `build(name, weights)` (default:
    `stbench.encoders.build_encoder`); several encoders are concatenated in the given order.
    With `tiles` (see stbench/data/context.py) every spot gets its tile grid's features,
    flattened tile-major: (n_spots, n_tiles * sum D)."""
    enc_names = split_names(names)
    w = [weights] * len(enc_names) if isinstance(weights, str) else [str(x) for x in weights]
    if len(w) != len(enc_names):
        raise DataError(f"{len(enc_names)} encoders but {len(w)} weights", field="weights")
    if store is None or patch_store is None:
        raise DataError("feature_provider needs a FeatureStore and a PatchStore", field="features")
    built: dict[int, Any] = {}

    def encoder(i: int) -> Any:
        if i not in built:
            if build is None:
                from stbench.encoders import build_encoder

                built[i] = build_encoder(enc_names[i], weights=w[i])
            else:
                built[i] = build(enc_names[i], w[i])
        return built[i]

    def provide(slide: Slide) -> np.ndarray:
        source, pstore = slide, patch_store
        if tiles is not None:
            spot_crop = patch_store.spec.crop_size_px(slide)
            source = tile_grid_slide(slide, tiles, spot_crop)
            spec = patch_store.spec
            tile_spec = PatchSpec(out_px=spec.out_px, crop_px=tiles.tile_crop(spot_crop), edge=spec.edge)
            pstore = PatchStore(patch_store.cache_dir, tile_spec)
        patches = pstore.build(source)
        parts = [
            store.extract(
                source,
                patches,
                encoder(i),
                batch_size=batch_size,
                progress=progress,
                device=device,
                precision=precision,
            ).aligned(source.spot_ids)
            for i in range(len(enc_names))
        ]
        out = np.concatenate(parts, axis=1)
        if tiles is not None:  # (n * T, D) spot-major -> (n, T * D) tile-major per spot
            out = out.reshape(slide.n_spots, -1)
        return np.ascontiguousarray(out, dtype=np.float32)

    provide.encoders = enc_names  # type: ignore[attr-defined]
    provide.weights_ids = lambda: [str(encoder(i).weights_id) for i in range(len(enc_names))]  # type: ignore[attr-defined]
    return provide


def features_for(
    method_cls: Any,
    method_config: dict[str, Any],
    cache_dir: str | Path,
    patch_config: dict[str, Any] | None = None,
    *,
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = False,
    build: Callable[[str, str], Any] | None = None,
) -> dict[str, Callable[[Slide], np.ndarray]] | None:
    """What the runner passes as `STDataModule(features=...)` for `method_cls` with its config.

    A method asks for frozen features by listing `"encoder"` in `requires.features`: the feature
    named by its `encoder` hyper-parameter (e.g. "uni+conch") with its `weights`, and
    `encoder_overrides` (architecture knobs passed to `build_encoder(arch_overrides=...)`; tiny
    configs shrink the encoder with it). `"encoder:grid=G"` / `"encoder:sub=S"` add tile-grid
    features (stbench/data/context.py) under `"<key>:grid=G"`. Returns None when the method needs
    no features. The patches fed to encoders follow `requires.patch` overridden by the job's
    `data.patch` (the same merge as for image methods); tiles share its output size."""
    wanted = tuple(getattr(getattr(method_cls, "requires", None), "features", ()) or ())
    requests = [parse_feature_request(w) for w in wanted]
    requests = [(base, tiles) for base, tiles in requests if base == "encoder"]
    if not requests:
        return None
    defaults = _init_defaults(method_cls)
    enc = method_config.get("encoder", defaults.get("encoder"))
    weights = method_config.get("weights", defaults.get("weights", "default"))
    overrides = method_config.get("encoder_overrides", defaults.get("encoder_overrides"))
    if not enc:
        raise DataError(f"method {getattr(method_cls, 'name', '?')} needs an `encoder`", field="encoder")
    spec = PatchSpec(**{**dict(method_cls.requires.patch), **dict(patch_config or {})})
    build = build or _registry_builder(overrides)
    cache: dict[tuple[str, str], Any] = {}

    def shared(name: str, w: str) -> Any:  # one encoder instance for the spot and tile requests
        if (name, w) not in cache:
            cache[(name, w)] = build(name, w)
        return cache[(name, w)]

    out = {}
    for _, tiles in requests:
        key = feature_key(enc) + (tiles.suffix if tiles is not None else "")
        out[key] = feature_provider(
            enc,
            weights,
            FeatureStore(cache_dir),
            PatchStore(cache_dir, spec),
            batch_size=batch_size,
            device=device,
            progress=progress,
            build=shared,
            tiles=tiles,
        )
    return out


def _registry_builder(overrides: dict[str, Any] | None) -> Callable[[str, str], Any]:
    def build(name: str, weights: str) -> Any:
        from stbench.encoders import build_encoder

        if overrides:
            return build_encoder(name, weights=weights, arch_overrides=dict(overrides))
        return build_encoder(name, weights=weights)

    return build


# ---- internals -------------------------------------------------------------------------------
def _init_defaults(cls: Any) -> dict[str, Any]:
    import inspect

    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return {}
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def _encoder_dim(encoder: Any) -> int:
    dim = getattr(getattr(encoder, "spec", None), "dim", None)
    if dim is None:
        raise DataError("encoder has no spec.dim", field="encoder")
    return int(dim)


@contextlib.contextmanager
def _encoder_ready(encoder: Any, device: str) -> Iterator[Any]:
    """Eval mode on `device` for the extraction; the previous mode is restored afterwards."""
    was_training = bool(getattr(encoder, "training", False))
    encoder.eval()
    encoder.to(device)
    try:
        yield encoder
    finally:
        encoder.train(was_training)


def _embed(
    encoder: Any,
    patches: np.ndarray,
    lo: int,
    hi: int,
    batch_size: int,
    device: str,
    precision: str,
    dim: int,
) -> np.ndarray:
    """Rows lo:hi of `patches` (uint8 NHWC) -> float32 (hi - lo, dim); batched, inference mode."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    out = np.empty((hi - lo, dim), dtype=FEATURE_DTYPE)
    for s in range(lo, hi, batch_size):
        e = min(hi, s + batch_size)
        x = torch.from_numpy(np.array(patches[s:e])).to(device).permute(0, 3, 1, 2).float() / 255.0
        ctx = torch.autocast(dev_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            y = encoder(x)
        if tuple(y.shape) != (e - s, dim):
            raise DataError(
                f"encoder returned shape {tuple(y.shape)} for {e - s} patches, expected {(e - s, dim)}",
                field="encoder",
            )
        out[s - lo : e - lo] = y.float().cpu().numpy()
    if not np.isfinite(out).all():
        raise DataError(f"encoder produced non-finite features in rows {lo}:{hi}", field="encoder")
    return out


def _add_seconds(path: Path, rank: int, seconds: float) -> None:
    f = path / f".seconds.{rank}.json"
    prev = json.loads(f.read_text()) if f.exists() else 0.0
    f.write_text(json.dumps(prev + seconds))


def _try_open(path: Path, patches: SlidePatches) -> SlideFeatures | None:
    index_file, feats_file = path / _INDEX, path / _FEATURES
    if not (index_file.exists() and feats_file.exists()):
        return None
    try:
        index = json.loads(index_file.read_text())
        arr = np.load(feats_file, mmap_mode="r")
    except (ValueError, OSError):
        return None
    if list(arr.shape) != index.get("shape") or arr.shape[0] != len(patches):
        return None
    return SlideFeatures(path, index, arr, list(patches.spot_ids))


def _progress(items: list[int], on: bool, label: str) -> Iterator[int] | list[int]:
    if not on:
        return items
    try:
        from rich.progress import track
    except ImportError:  # pragma: no cover
        return items
    return track(items, description=label, total=len(items))


def provider_weights_id(datamodule: Any, key: str) -> str | None:
    """Weights id(s) of the encoder(s) behind `datamodule.feature_fns[key]` ("a+b" when concatenated),
    so a probe's result row names the weights its features came from."""
    fn = getattr(datamodule, "feature_fns", {}).get(key)
    ids = getattr(fn, "weights_ids", None)
    return "+".join(ids()) if callable(ids) else None
