"""STDataModule: slides + fold + panel/normalisation rules -> leak-free, seeded Lightning loaders.

Why one module: every method must see the same spots, genes, targets and augmentations for a
given (dataset, protocol, fold, seed), and no statistic may ever be fitted on a test slide. The
rules enforced here (see docs/data-model.md for the full batch contract):

- The gene panel is selected from the fold's TRAIN slides only; the target transform is fitted on
  TRAIN spots only (validation spots excluded when validation is a fraction of training spots).
- Validation = the fold's explicit validation slides, else a seeded fraction of training spots.
- The fold is checked for slide/patient leakage before anything is built.
- `prepare_data` only writes patch stores (Lightning runs it on one process per node);
  `setup` builds everything else on every process and never writes.
- Randomness (shuffling, dihedral augmentation) comes from one seeded generator in the training
  sampler, so batches are identical for a seed whatever the number of workers.
- Every spot has a global `index` (its row in `spot_table`): under DDP, DistributedSampler pads
  ranks by repeating spots, and writers de-duplicate predictions by this index.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from stbench.data.genes import GenePanel, panel_matrix, select_genes, spot_totals
from stbench.data.normalize import TargetTransform
from stbench.data.patches import PatchSpec, PatchStore
from stbench.data.protocols import Protocol, get_protocol
from stbench.data.slide import Slide
from stbench.data.splits import Fold, check_leakage, split_validation_spots
from stbench.errors import DataError, LeakageError

FeatureFn = Callable[[Slide], np.ndarray]
"""Per-slide feature provider: Slide -> (n_spots, D) array aligned with `slide.spot_ids`."""


@dataclass
class _SlideData:
    """Everything a dataset needs for one slide, as plain arrays (cheap to pickle to workers)."""

    name: str
    split: str
    offset: int
    spot_ids: list[str]
    coords: np.ndarray  # (n, 2) float32 full-res px (x, y)
    targets: np.ndarray  # (n, G) float32 normalised
    counts: np.ndarray  # (n, G) float32 raw panel counts
    totals: np.ndarray  # (n,) float32 total counts over all genes (library size)
    array_coords: np.ndarray | None  # (n, 2) int64 (col/x, row/y)
    patches_file: Path | None  # patches.npy of the slide's store
    patch_rows: np.ndarray | None  # (n,) row of each spot in patches.npy
    neighbours: np.ndarray | None  # (n, k) int64 global indices, -1 = none
    edges: np.ndarray | None = None  # (2, E) int64 local rows of the slide's spot graph
    features: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.spot_ids)


def dihedral(patch: np.ndarray, code: int) -> np.ndarray:
    """One of the 8 symmetries of the square on an (H, W, C) patch: rotate by 90 deg x (code % 4)
    counter-clockwise, then mirror left-right when code >= 4. Code 0 is the identity."""
    out = np.rot90(patch, code % 4, axes=(0, 1))
    if code >= 4:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


class _SpotSource:
    """Shared item builder of both dataset kinds; opens patch memmaps lazily in each process."""

    def __init__(
        self,
        slides: list[_SlideData],
        with_targets: bool,
        with_counts: bool,
        hidden_features: frozenset[str] = frozenset(),
        with_totals: bool = False,
    ) -> None:
        self.slides = slides
        self.with_targets = with_targets
        self.with_counts = with_counts
        self.with_totals = with_totals  # library sizes alone (no counts): allowed at predict
        self.hidden_features = hidden_features  # features this split must not serve (test latents)
        self._mm: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_mm": {}}  # memmaps are reopened in the worker, never copied

    def patches(self, s: int) -> np.ndarray:
        if s not in self._mm:
            self._mm[s] = np.load(self.slides[s].patches_file, mmap_mode="r")
        return self._mm[s]

    def images(self, s: int, rows: np.ndarray, codes: np.ndarray | None) -> torch.Tensor:
        sd = self.slides[s]
        raw = self.patches(s)[sd.patch_rows[rows]]  # (n, H, W, 3) uint8
        if codes is not None:
            raw = np.stack([dihedral(p, int(c)) for p, c in zip(raw, codes, strict=True)])
        return torch.from_numpy(np.ascontiguousarray(raw)).permute(0, 3, 1, 2).float().div_(255.0)

    def fields(self, s: int, rows: np.ndarray) -> dict[str, Any]:
        sd = self.slides[s]
        out: dict[str, Any] = {
            "coords": torch.from_numpy(sd.coords[rows]),
            "slide": [sd.name] * len(rows),
            "spot_id": [sd.spot_ids[r] for r in rows],
            "index": torch.from_numpy(sd.offset + rows.astype(np.int64)),
        }
        if self.with_targets:
            out["expression"] = torch.from_numpy(sd.targets[rows])
        if self.with_counts:
            out["counts"] = torch.from_numpy(sd.counts[rows])
            out["totals"] = torch.from_numpy(sd.totals[rows])
        elif self.with_totals:
            out["totals"] = torch.from_numpy(sd.totals[rows])
        if sd.array_coords is not None:
            out["array_coords"] = torch.from_numpy(sd.array_coords[rows])
        if sd.neighbours is not None:
            out["neighbours"] = torch.from_numpy(sd.neighbours[rows])
        feats = {k: v for k, v in sd.features.items() if k not in self.hidden_features}
        if feats:
            out["features"] = {k: torch.from_numpy(v[rows]) for k, v in feats.items()}
        return out


def _split_key(key: Any) -> tuple[int, int | None]:
    """Sampler keys are an int (no augmentation) or (int, token) from `SeededSampler`."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), None


class SpotDataset(Dataset):
    """One item = one spot (a dict of unbatched tensors; default_collate stacks them)."""

    def __init__(self, source: _SpotSource, items: list[tuple[int, int]], with_images: bool) -> None:
        self.source = source
        self.items = items
        self.with_images = with_images

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        i, token = _split_key(key)
        s, r = self.items[i]
        rows = np.array([r])
        item = self.source.fields(s, rows)
        if self.with_images:
            codes = None if token is None else np.array([token % 8])
            item["image"] = self.source.images(s, rows, codes)
        return _unbatch(item)


class SlideDataset(Dataset):
    """One item = one slide (all its spots of this split) = one batch; see docs/data-model.md."""

    def __init__(
        self,
        source: _SpotSource,
        items: list[tuple[int, np.ndarray]],
        with_images: bool,
        pad_to: int | None = None,
        scored: list[np.ndarray | None] | None = None,
    ) -> None:
        self.source = source
        self.items = items
        self.with_images = with_images
        self.pad_to = pad_to
        # Per item, which rows are scored (validation spots of a training slide served in the
        # context of their whole slide); None = every real row.
        self.scored = scored or [None] * len(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        i, token = _split_key(key)
        s, rows = self.items[i]
        batch = self.source.fields(s, rows)
        if self.with_images:
            codes = None if token is None else np.random.default_rng(token).integers(0, 8, len(rows))
            batch["image"] = self.source.images(s, rows, codes)
        batch["mask"] = torch.ones(len(rows), dtype=torch.bool)
        if self.scored[i] is not None:
            batch["score_mask"] = torch.from_numpy(self.scored[i])
        edges = self.source.slides[s].edges
        if edges is not None:
            batch["edge_index"] = _edges_among(edges, rows, self.source.slides[s].n)
        if self.pad_to is not None:
            batch = _pad(batch, self.pad_to)
        return batch


class SeededSampler(Sampler):
    """Training order and augmentation tokens drawn from a generator seeded with (seed, epoch):
    epoch e of a run with seed s is the same for every run, worker count, machine and dataloader
    reload. Lightning calls `set_epoch` (also through DDP's sampler wrapper); iterating without
    it advances the epoch by one per pass. Yields (item, token), or the bare item when
    augmentation is off; the token picks the dihedral transform(s)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, augment: bool = True) -> None:
        self.n = n
        self.seed = int(seed)
        self.shuffle = shuffle
        self.augment = augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Any]:
        digest = hashlib.sha256(f"stbench-sampler:{self.seed}:{self.epoch}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        self.epoch += 1
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        tokens = torch.randint(0, 2**31 - 1, (self.n,), generator=g)
        for i, t in zip(order.tolist(), tokens.tolist(), strict=True):
            yield (i, t) if self.augment else i


class STDataModule(L.LightningDataModule):
    """Lightning data module for one (slides, fold) pair.

    `slides` is a sequence of `Slide` or a zero-argument callable returning one (called lazily,
    once per process). `protocol` (a `Protocol` or its registered name) supplies the gene rule and
    parameters and the target transform; `gene_rule` / `gene_n` / `gene_kwargs` override single
    gene parameters, `gene_variant` picks a named protocol panel (DiffBulk's "top100"), `panel`
    fixes the genes outright (a `GenePanel` or a list), and `target` replaces the transform (a
    method name, TargetTransform keyword arguments, or an unfitted `TargetTransform`). Without a
    protocol the defaults are HMHVG (n = 300) and log1p. `vocabulary` restricts candidate genes
    (used when the protocol declares `use_vocabulary`, or always without a protocol).
    Validation follows the fold (its val slides or `fold.val_fraction`); `val_fraction` overrides.
    `patch_spec=None` means no images (expression-only or feature-based methods). `features`
    maps a name to a `FeatureFn`; its arrays appear as `batch["features"][name]` (the encoder
    feature store plugs in here). `neighbours=k` adds the global indices of each spot's k nearest
    spots of the same slide. `whole_slide=True` makes one batch = one slide (`pad_to` pads it).
    `include_counts` adds raw panel counts and totals to batches with targets (never predict);
    `include_totals` adds only the library sizes to every batch, predict included.
    """

    def __init__(
        self,
        slides: Sequence[Slide] | Callable[[], Sequence[Slide]],
        fold: Fold,
        *,
        protocol: Protocol | str | None = None,
        gene_rule: str | None = None,
        gene_n: int | None = None,
        gene_kwargs: Mapping[str, Any] | None = None,
        gene_variant: str | None = None,
        panel: GenePanel | Sequence[str] | None = None,
        vocabulary: Iterable[str] | None = None,
        target: str | Mapping[str, Any] | TargetTransform | None = None,
        patch_spec: PatchSpec | None = None,
        cache_dir: str | Path | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        whole_slide: bool = False,
        pad_to: int | None = None,
        augment: bool = True,
        val_fraction: float | None = None,
        seed: int = 0,
        num_workers: int = 0,
        neighbours: int | None = None,
        features: Mapping[str, FeatureFn] | None = None,
        include_counts: bool = False,
        include_totals: bool = False,
        graph: Mapping[str, Any] | None = None,
        pin_memory: bool = False,
        predict_condition: bool = False,
        predict_hidden_features: Iterable[str] = (),
    ) -> None:
        super().__init__()
        if patch_spec is not None and cache_dir is None:
            raise DataError("patch_spec needs a cache_dir for the patch store", field="cache_dir")
        if neighbours is not None and neighbours < 1:
            raise DataError(f"neighbours must be >= 1, got {neighbours}", field="neighbours")
        if graph is not None and not whole_slide:
            raise DataError("a spot graph needs whole_slide=True (one batch = one slide)", field="graph")
        if fold.val and val_fraction:
            raise DataError(
                f"fold {fold.name} has validation slides; val_fraction must be 0 or None",
                field="val_fraction",
            )
        self._slides_arg = slides
        self.fold = fold
        self.protocol = _resolve_protocol(protocol)
        self.gene_overrides: dict[str, Any] = dict(gene_kwargs or {})
        if gene_rule is not None:
            self.gene_overrides["rule"] = gene_rule
        if gene_n is not None:
            self.gene_overrides["n"] = gene_n
        self.gene_variant = gene_variant
        self._panel_arg = panel
        self.vocabulary = list(vocabulary) if vocabulary is not None else None
        self.target_spec = _target_spec(target, self.protocol)
        self.patch_spec = patch_spec
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.whole_slide = whole_slide
        self.pad_to = pad_to
        self.augment = augment
        self.val_fraction = float(val_fraction if val_fraction is not None else fold.val_fraction)
        self.seed = seed
        self.num_workers = num_workers
        self.k_neighbours = neighbours
        self.feature_fns = dict(features or {})
        self.include_counts = include_counts
        # Library size per spot in EVERY loader, predict included (BatchRequirements.totals: the
        # depth reference). Counts stay out of predict batches whatever this says.
        self.include_totals = bool(include_totals)
        self.graph = dict(graph) if graph is not None else None
        self.pin_memory = pin_memory
        # Image generation (task "image") is conditioned on the test spots' expression, so predict
        # batches carry it; what must stay hidden there is the image side (e.g. test latents).
        self.predict_condition = bool(predict_condition)
        self.predict_hidden_features = frozenset(predict_hidden_features)
        self._slides: dict[str, Slide] | None = None
        self._data: list[_SlideData] = []
        self._val_rows: dict[str, np.ndarray] = {}
        self.panel: GenePanel | None = None
        self.transform: TargetTransform | None = None
        self.spot_table: pd.DataFrame | None = None

    # ---- public properties -----------------------------------------------------------------
    @property
    def genes(self) -> list[str]:
        self._require_setup()
        return list(self.panel.genes)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def train_slides(self) -> list[str]:
        return list(self.fold.train)

    @property
    def val_slides(self) -> list[str]:
        return list(self.fold.val or ())

    @property
    def test_slides(self) -> list[str]:
        return list(self.fold.test)

    @property
    def slides(self) -> dict[str, Slide]:
        if self._slides is None:
            self._slides = {s.name: s for s in self._load_slides()}
        return self._slides

    def targets(self, slide: str) -> pd.DataFrame:
        """Normalised targets of every spot of `slide` (spots x panel genes): the truth the
        framework scores test predictions against (predict batches carry no targets)."""
        sd = self._slide_data(slide)
        return pd.DataFrame(sd.targets, index=pd.Index(sd.spot_ids, name="spot"), columns=self.genes)

    def raw_counts(self, slide: str) -> pd.DataFrame:
        """Raw panel counts of every spot of `slide` (spots x panel genes)."""
        sd = self._slide_data(slide)
        return pd.DataFrame(sd.counts, index=pd.Index(sd.spot_ids, name="spot"), columns=self.genes)

    # ---- Lightning hooks -------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Build patch stores on disk (one process per node); sets no state on self."""
        if self.patch_spec is None:
            return
        store = PatchStore(self.cache_dir, self.patch_spec)
        wanted = set(self.train_slides) | set(self.val_slides) | set(self.test_slides)
        for slide in self._load_slides():
            if slide.name in wanted:
                store.build(_with_image(slide))

    def setup(self, stage: str | None = None) -> None:
        """Panel, target transform, validation split and per-slide arrays (idempotent)."""
        if self.spot_table is not None:
            return
        slides = self.slides
        names = self.train_slides + self.val_slides + self.test_slides
        missing = [n for n in names if n not in slides]
        if missing:
            raise DataError(
                f"fold {getattr(self.fold, 'name', '?')} names slides not given: {missing}",
                slide=missing[0],
                field="fold",
            )
        if not self.train_slides or not self.test_slides:
            raise DataError("fold needs at least one train and one test slide", field="fold")
        check_leakage(self.fold, {n: s.patient for n, s in slides.items()})
        self._val_rows = self._split_validation(slides)
        train = [slides[n] for n in self.train_slides]
        self.panel = self._build_panel(train)
        counts = {n: panel_matrix(slides[n], self.panel).astype(np.float32) for n in names}
        totals = {n: spot_totals(slides[n]) for n in names}
        fit_rows = {n: self._train_rows(n) for n in self.train_slides}
        self.transform = TargetTransform(**self.target_spec).fit(
            [counts[n][fit_rows[n]] for n in self.train_slides],
            [totals[n][fit_rows[n]] for n in self.train_slides],
            [slides[n].n_genes for n in self.train_slides],
        )
        stores = PatchStore(self.cache_dir, self.patch_spec) if self.patch_spec is not None else None
        self._data, table, offset = [], [], 0
        for n in names:
            sd = self._slide_arrays(slides[n], counts[n], totals[n], offset, stores)
            self._data.append(sd)
            split = "train" if n in self.train_slides else "val" if n in self.val_slides else "test"
            sd.split = split
            rows_split = np.full(sd.n, split, dtype=object)
            if n in self._val_rows:
                rows_split[self._val_rows[n]] = "val"
            table.append(
                pd.DataFrame(
                    {
                        "slide": n,
                        "spot_id": sd.spot_ids,
                        "patient": slides[n].patient,
                        "split": rows_split,
                        "row": np.arange(sd.n),
                    }
                )
            )
            offset += sd.n
        if any(sd.array_coords is None for sd in self._data):  # batch keys must agree across slides
            for sd in self._data:
                sd.array_coords = None
        self.spot_table = pd.concat(table, ignore_index=True)
        self.spot_table.index.name = "index"
        self._check_disjoint()

    # ---- loaders ---------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        ds = self._dataset("train", targets=True)
        sampler = SeededSampler(
            len(ds), self.seed, shuffle=True, augment=self.augment and self.patch_spec is not None
        )
        return self._loader(ds, sampler=sampler, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        ds = self._dataset("val", targets=True)
        return self._loader(ds, batch_size=self.eval_batch_size) if len(ds) else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test", targets=True), batch_size=self.eval_batch_size)

    def reference_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Training spots only (validation spots and every val/test slide excluded), in a fixed
        order, unaugmented, with targets and spot batches even for whole-slide methods: the
        retrieval reference of BLEEP-style methods, which must never see a held-out spot."""
        self._require_setup()
        source = _SpotSource(self._data, with_targets=True, with_counts=False)
        items = [(s, int(r)) for s, rows in self._rows_of("train") for r in rows]
        ds = SpotDataset(source, items, self.patch_spec is not None)
        return DataLoader(ds, batch_size=batch_size or self.eval_batch_size, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """The test spots without targets or counts, so no method can read them while predicting
        (library sizes only with `include_totals`, for reference methods that declare them).
        Image-generation jobs (`predict_condition`) get the targets as their condition instead, and
        never the features named in `predict_hidden_features` (the real tiles' latents).

        Under DDP with fewer items than ranks (a whole-slide test fold of one slide on 2 ranks),
        Lightning's non-repeating predict sampler would leave a rank empty and fail; a padding
        DistributedSampler repeats items instead, and the prediction writer drops the repeats."""
        ds = self._dataset(
            "test", targets=self.predict_condition, counts=False, hidden=self.predict_hidden_features
        )
        sampler = None
        if dist.is_available() and dist.is_initialized() and len(ds) < dist.get_world_size():
            sampler = DistributedSampler(ds, shuffle=False, drop_last=False)
        return self._loader(ds, batch_size=self.eval_batch_size, sampler=sampler)

    # ---- internals -------------------------------------------------------------------------
    def _load_slides(self) -> list[Slide]:
        arg = self._slides_arg
        slides = list(arg() if callable(arg) else arg)
        seen: set[str] = set()
        for s in slides:
            if s.name in seen:
                raise DataError("duplicate slide name", slide=s.name, field="slide")
            seen.add(s.name)
        return slides

    def _require_setup(self) -> None:
        if self.spot_table is None:
            raise RuntimeError("STDataModule.setup() has not run yet")

    def _slide_data(self, slide: str) -> _SlideData:
        self._require_setup()
        for sd in self._data:
            if sd.name == slide:
                return sd
        raise DataError("slide is not part of this fold", slide=slide, field="slide")

    def _split_validation(self, slides: Mapping[str, Slide]) -> dict[str, np.ndarray]:
        """Rows of training slides held out for validation (only without explicit val slides).
        One seeded draw over the pooled training spots, keyed "slide:spot"."""
        if self.val_slides or self.val_fraction <= 0:
            return {}
        where = {f"{n}:{s}": (n, i) for n in self.train_slides for i, s in enumerate(slides[n].spot_ids)}
        _, val_keys = split_validation_spots(list(where), self.val_fraction, self.seed)
        held: dict[str, list[int]] = {}
        for k in val_keys:
            n, i = where[k]
            held.setdefault(n, []).append(i)
        return {n: np.array(sorted(rows), dtype=np.int64) for n, rows in held.items()}

    def train_targets(self) -> np.ndarray:
        """(n_train, G) float64 targets of the training spots (validation spots excluded), slide by
        slide: what a method may fit statistics on (scalers, ranges). Never validation or test."""
        self._require_setup()
        parts = [self.targets(n).to_numpy(np.float64)[self._train_rows(n)] for n in self.train_slides]
        if not parts or sum(len(p) for p in parts) == 0:
            raise DataError("no training spots", field="train")
        return np.concatenate(parts)

    def train_target_mean(self) -> np.ndarray:
        """(G,) mean target over the training spots (validation spots excluded): the mean predictor,
        and the starting bias of regression heads. Never touches validation or test spots."""
        return self.train_targets().mean(axis=0)

    def _train_rows(self, slide: str) -> np.ndarray:
        n = self.slides[slide].n_spots
        keep = np.ones(n, dtype=bool)
        if slide in self._val_rows:
            keep[self._val_rows[slide]] = False
        return np.flatnonzero(keep)

    def _build_panel(self, train: list[Slide]) -> GenePanel:
        """The fold's panel, from TRAINING slides only."""
        arg = self._panel_arg
        if isinstance(arg, GenePanel):
            return arg
        if arg is not None:
            return select_genes(train, "list", gene_list=list(arg))
        if self.protocol is not None:
            return self.protocol.gene_panel(
                train, variant=self.gene_variant, vocabulary=self.vocabulary, **self.gene_overrides
            )
        if self.gene_variant is not None:
            raise DataError("gene_variant needs a protocol", field="gene_variant")
        spec = {"rule": "hmhvg", **self.gene_overrides}
        rule = spec.pop("rule")
        return select_genes(train, rule, vocabulary=self.vocabulary, **spec)

    def _slide_arrays(
        self, slide: Slide, counts: np.ndarray, totals: np.ndarray, offset: int, stores: PatchStore | None
    ) -> _SlideData:
        targets = np.ascontiguousarray(
            self.transform.transform(counts, totals, slide.n_genes), dtype=np.float32
        )
        patches_file = patch_rows = None
        if stores is not None:
            sp_ = stores.build(_with_image(slide))
            pos = sp_.spot_index()
            patch_rows = np.array([pos[s] for s in slide.spot_ids], dtype=np.int64)
            patches_file = sp_.path / "patches.npy"
        feats = {}
        for name, fn in self.feature_fns.items():
            arr = np.asarray(fn(slide), dtype=np.float32)
            if arr.ndim != 2 or arr.shape[0] != slide.n_spots:
                raise DataError(
                    f"feature {name!r} must be (n_spots={slide.n_spots}, D), got {arr.shape}",
                    slide=slide.name,
                    field=f"features/{name}",
                )
            feats[name] = arr
        return _SlideData(
            name=slide.name,
            split="",
            offset=offset,
            spot_ids=slide.spot_ids,
            coords=slide.coords.astype(np.float32),
            targets=targets,
            counts=counts,
            totals=np.asarray(totals, dtype=np.float32),
            array_coords=_array_coords(slide),
            patches_file=patches_file,
            patch_rows=patch_rows,
            neighbours=_neighbours(slide.coords, self.k_neighbours, offset) if self.k_neighbours else None,
            features=feats,
            edges=self._edges(slide),
        )

    def _edges(self, slide: Slide) -> np.ndarray | None:
        if self.graph is None:
            return None
        from stbench.data.context import spot_graph

        return spot_graph(
            slide.coords, self.graph, mpp=slide.mpp, array_coords=_array_coords(slide), slide=slide.name
        )

    def _rows_of(self, split: str) -> list[tuple[int, np.ndarray]]:
        out = []
        for s, sd in enumerate(self._data):
            if split == "val" and sd.name in self._val_rows:
                rows = self._val_rows[sd.name]
            elif sd.split != split:
                continue
            elif split == "train":
                rows = self._train_rows(sd.name)
            else:
                rows = np.arange(sd.n)
            if len(rows):
                out.append((s, rows))
        return out

    def _dataset(
        self, split: str, targets: bool, counts: bool | None = None, hidden: frozenset[str] = frozenset()
    ) -> Dataset:
        self._require_setup()
        counts = targets and self.include_counts if counts is None else counts
        source = _SpotSource(
            self._data,
            with_targets=targets,
            with_counts=counts,
            hidden_features=hidden,
            with_totals=self.include_totals,
        )
        images = self.patch_spec is not None
        rows = self._rows_of(split)
        if self.whole_slide:
            if split == "val":
                return self._whole_slide_validation(source, rows, images)
            return SlideDataset(source, rows, images, pad_to=self.pad_to)
        return SpotDataset(source, [(s, int(r)) for s, rr in rows for r in rr], images)

    def _whole_slide_validation(
        self, source: _SpotSource, rows: list[tuple[int, np.ndarray]], images: bool
    ) -> SlideDataset:
        """Validation spots held out of a training slide are served inside their whole slide (its
        training spots give the context a whole-slide model sees at test time; their targets are
        present but not scored): `score_mask` marks the validation rows. A slide whose every spot
        is validation (a validation slide) is served as it is."""
        items, scored = [], []
        for s, val_rows in rows:
            n = self._data[s].n
            if len(val_rows) == n:
                items.append((s, val_rows))
                scored.append(None)
                continue
            flag = np.zeros(n, dtype=bool)
            flag[val_rows] = True
            items.append((s, np.arange(n)))
            scored.append(flag)
        return SlideDataset(source, items, images, pad_to=self.pad_to, scored=scored)

    def _loader(self, ds: Dataset, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=None if self.whole_slide else batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def _check_disjoint(self) -> None:
        """Belt and braces after check_leakage: no test slide may own a train/val spot."""
        t = self.spot_table
        leaked = set(t.loc[t["split"] != "test", "slide"]) & set(self.test_slides)
        if leaked:
            raise LeakageError(f"test slides {sorted(leaked)} have train/val spots")


# ---- helpers ---------------------------------------------------------------------------------
def _resolve_protocol(protocol: Protocol | str | None) -> Protocol | None:
    if isinstance(protocol, str):
        return get_protocol(protocol)
    return protocol


def _target_spec(
    target: str | Mapping[str, Any] | TargetTransform | None, protocol: Protocol | None
) -> dict[str, Any]:
    """TargetTransform keyword arguments: explicit target, else the protocol's, else log1p."""
    if target is None:
        return dict(protocol.target) if protocol is not None else {"method": "log1p"}
    if isinstance(target, str):
        return {"method": target}
    if isinstance(target, TargetTransform):
        if target.center is not None:
            raise DataError(
                "pass an unfitted TargetTransform: it is fitted on this fold's training spots", field="target"
            )
        return {"method": target.method, "target_sum": target.target_sum, "scale": target.scale}
    spec = dict(target)
    TargetTransform(**spec)  # validate early
    return spec


def _with_image(slide: Slide) -> Slide:
    if slide.image is None:
        raise DataError(
            "patch_spec is set but the slide has no image", file=slide.source, slide=slide.name, field="image"
        )
    return slide


def _array_coords(slide: Slide) -> np.ndarray | None:
    obs = slide.adata.obs
    for cx, cy in (("array_col", "array_row"), ("array_x", "array_y")):
        if cx in obs.columns and cy in obs.columns:
            return np.stack([obs[cx].to_numpy(np.int64), obs[cy].to_numpy(np.int64)], axis=1)
    return None


def _neighbours(coords: np.ndarray, k: int, offset: int) -> np.ndarray:
    """Global indices of each spot's k nearest other spots of the same slide (-1 when fewer)."""
    from scipy.spatial import cKDTree

    n = len(coords)
    out = np.full((n, k), -1, dtype=np.int64)
    if n < 2:
        return out
    kk = min(k + 1, n)
    _, idx = cKDTree(coords).query(coords, k=kk)
    idx = np.asarray(idx).reshape(n, kk)
    for i in range(n):
        others = [j for j in idx[i] if j != i][:k]
        out[i, : len(others)] = np.asarray(others, dtype=np.int64) + offset
    return out


def _edges_among(edges: np.ndarray, rows: np.ndarray, n: int) -> torch.Tensor:
    """The slide graph's edges between `rows` (a subset of the slide), renumbered 0..len(rows)-1."""
    local = np.full(n, -1, dtype=np.int64)
    local[rows] = np.arange(len(rows))
    e = local[edges]
    return torch.from_numpy(np.ascontiguousarray(e[:, (e >= 0).all(axis=0)]))


def _unbatch(item: dict[str, Any]) -> dict[str, Any]:
    """Strip the leading length-1 axis a single-spot `fields` call produces."""
    out: dict[str, Any] = {}
    for k, v in item.items():
        if isinstance(v, (torch.Tensor, list)):
            out[k] = v[0]
        elif isinstance(v, dict):
            out[k] = {kk: vv[0] for kk, vv in v.items()}
        else:
            out[k] = v
    return out


def _pad(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """Pad a whole-slide batch to `size` rows: zeros, index -1, spot_id "", mask (and score_mask) False."""
    n = len(batch["spot_id"])
    if n > size:
        raise DataError(
            f"slide has {n} spots, more than pad_to={size}", slide=batch["slide"][0], field="pad_to"
        )
    extra = size - n
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if k == "edge_index":  # edges index real rows only; padding adds no node and no edge
            out[k] = v
        elif isinstance(v, torch.Tensor):
            fill = -1 if k in ("index", "neighbours") else 0
            pad = torch.full((extra, *v.shape[1:]), fill, dtype=v.dtype)
            out[k] = torch.cat([v, pad])
        elif isinstance(v, dict):
            out[k] = {kk: torch.cat([vv, vv.new_zeros((extra, *vv.shape[1:]))]) for kk, vv in v.items()}
        elif k == "slide":
            out[k] = v + [v[0]] * extra
        else:
            out[k] = v + [""] * extra
    return out
