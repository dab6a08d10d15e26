"""STDataModule on the synthetic dataset: batch contract, leakage, seeding, augmentation, modes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from stbench.data.datamodule import SeededSampler, STDataModule, dihedral
from stbench.data.patches import PatchSpec, PatchStore
from stbench.data.readers.synthetic import SyntheticReader
from stbench.data.slide import Slide
from stbench.data.splits import Fold
from stbench.data.synthetic import generate_synthetic
from stbench.errors import DataError, LeakageError

TRAIN = ("P0S0", "P0S1", "P1S0", "P1S1")
TEST = ("P2S0", "P2S1")
FOLD = Fold(0, "frac", TRAIN, (), TEST, unit="patient", val_fraction=0.15)
FOLD_VAL = Fold(1, "val-slides", ("P0S0", "P0S1"), ("P1S0", "P1S1"), TEST, unit="patient", val_fraction=0.0)
SPEC = PatchSpec(out_px=16)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(
        tmp_path_factory.mktemp("syn") / "ds", n_slides=6, n_patients=3, spots_per_side=8, n_genes=30
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture()
def slides(root: Path) -> list[Slide]:
    return SyntheticReader(root).read_all()


def make_dm(slides, cache: Path, fold: Fold = FOLD, **kw) -> STDataModule:
    kw.setdefault("patch_spec", SPEC)
    kw.setdefault("gene_rule", "top_var")
    kw.setdefault("gene_n", 20)
    dm = STDataModule(slides, fold, cache_dir=cache, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def batches(loader) -> list[dict]:
    return list(iter(loader))


def test_batch_contract(slides, cache: Path) -> None:
    dm = make_dm(slides, cache, batch_size=8, neighbours=3, include_counts=True)
    assert dm.n_genes == 20 == len(dm.genes) and dm.test_slides == list(TEST)
    b = next(iter(dm.train_dataloader()))
    expected = {
        "image",
        "expression",
        "counts",
        "totals",
        "coords",
        "array_coords",
        "slide",
        "spot_id",
        "index",
        "neighbours",
    }
    assert set(b) == expected
    assert b["image"].shape == (8, 3, 16, 16) and b["image"].dtype == torch.float32
    assert float(b["image"].min()) >= 0.0 and float(b["image"].max()) <= 1.0
    assert b["expression"].shape == (8, 20) and b["expression"].dtype == torch.float32
    assert b["counts"].shape == (8, 20) and b["counts"].dtype == torch.float32
    assert b["coords"].shape == (8, 2) and b["coords"].dtype == torch.float32
    assert b["array_coords"].shape == (8, 2) and b["array_coords"].dtype == torch.int64
    assert b["index"].shape == (8,) and b["index"].dtype == torch.int64
    assert b["neighbours"].shape == (8, 3) and b["neighbours"].dtype == torch.int64
    assert isinstance(b["slide"], list) and isinstance(b["spot_id"], list) and len(b["spot_id"]) == 8
    by_name = {s.name: s for s in slides}
    for i in range(8):
        slide, spot, idx = b["slide"][i], b["spot_id"][i], int(b["index"][i])
        row = dm.spot_table.loc[idx]
        assert (row["slide"], row["spot_id"]) == (slide, spot)
        s = by_name[slide]
        r = s.spot_ids.index(spot)
        assert np.allclose(b["coords"][i].numpy(), s.coords[r])
        assert np.allclose(b["expression"][i].numpy(), dm.targets(slide).loc[spot].to_numpy())
        raw = s.adata[spot, dm.genes].X.toarray().ravel()
        assert np.array_equal(b["counts"][i].numpy(), raw)
        assert np.allclose(b["expression"][i].numpy(), np.log1p(raw), atol=1e-6)  # default target: log1p
        r_, c_ = s.adata.obs.loc[spot, ["array_row", "array_col"]]
        assert b["array_coords"][i].tolist() == [c_, r_]  # (x = col, y = row)
    p = next(iter(dm.predict_dataloader()))
    assert "expression" not in p and "counts" not in p, "predict batches must not carry targets"
    assert set(p["slide"]) <= set(TEST)


def test_image_task_predict_carries_the_condition_never_the_real_tile(slides, cache: Path) -> None:
    """Image generation (task "image"): predict batches carry the test expression (the condition) and
    the morphology feature, never the image-side features (latents of the real tile) or counts."""

    def feature(width: int):
        return lambda slide: np.tile(np.arange(slide.n_spots, dtype=np.float32)[:, None], (1, width))

    dm = make_dm(
        slides,
        cache,
        patch_spec=None,
        include_counts=True,
        features={"uni": feature(3), "latents": feature(4), "latents_std": feature(4)},
        predict_condition=True,
        predict_hidden_features=("latents", "latents_std"),
    )
    train = next(iter(dm.train_dataloader()))
    assert set(train["features"]) == {"uni", "latents", "latents_std"} and "expression" in train
    p = next(iter(dm.predict_dataloader()))
    assert set(p["features"]) == {"uni"} and "counts" not in p and "image" not in p
    for i in range(len(p["spot_id"])):
        truth = dm.targets(p["slide"][i]).loc[p["spot_id"][i]].to_numpy()
        assert np.allclose(p["expression"][i].numpy(), truth)
    plain = next(iter(make_dm(slides, cache, patch_spec=None).predict_dataloader()))
    assert "expression" not in plain  # the default (expression task) is unchanged


def test_no_test_spot_in_train_or_val_and_val_disjoint(slides, cache: Path) -> None:
    dm = make_dm(slides, cache, batch_size=16)
    train = [i for b in batches(dm.train_dataloader()) for i in b["index"].tolist()]
    val = [i for b in batches(dm.val_dataloader()) for i in b["index"].tolist()]
    test = [i for b in batches(dm.test_dataloader()) for i in b["index"].tolist()]
    table = dm.spot_table
    assert len(train) == len(set(train)) and len(test) == len(set(test))
    assert not set(train) & set(val)
    assert set(table.loc[train + val, "slide"]) <= set(TRAIN)
    assert set(table.loc[test, "slide"]) == set(TEST)
    n_train_spots = sum(s.n_spots for s in slides if s.name in TRAIN)
    assert len(train) + len(val) == n_train_spots
    assert len(val) == round(0.15 * n_train_spots)
    assert sorted(test) == sorted(table.index[table["slide"].isin(TEST)].tolist())
    # explicit validation slides
    dm2 = make_dm(slides, cache, fold=FOLD_VAL)
    val2 = {s for b in batches(dm2.val_dataloader()) for s in b["slide"]}
    train2 = {s for b in batches(dm2.train_dataloader()) for s in b["slide"]}
    assert val2 == {"P1S0", "P1S1"} and train2 == {"P0S0", "P0S1"}


def test_leaky_folds_are_refused(slides, cache: Path) -> None:
    leaky = Fold(2, "leak", ("P0S0", "P2S0"), (), ("P2S1",), unit="patient", val_fraction=0.1)
    with pytest.raises(LeakageError):
        make_dm(slides, cache, fold=leaky)
    unknown = Fold(3, "missing", ("P0S0",), (), ("P9S9",), unit="patient", val_fraction=0.1)
    with pytest.raises(DataError, match="P9S9"):
        make_dm(slides, cache, fold=unknown)


def _perturb(slide: Slide, factor: float) -> Slide:
    a = slide.adata.copy()
    rng = np.random.default_rng(1)
    noise = rng.poisson(5.0, size=a.shape).astype(np.float32)
    a.X = sp.csr_matrix(a.X.toarray() * factor + noise)
    return dataclasses.replace(slide, adata=a)


def test_panel_and_transform_use_training_spots_only(slides, cache: Path) -> None:
    kw = {"patch_spec": None, "target": {"method": "normalize_log1p", "scale": "zscore"}}
    base = make_dm(slides, cache, **kw)
    changed_test = [_perturb(s, 7.0) if s.name in TEST else s for s in slides]
    other = make_dm(changed_test, cache, **kw)
    assert other.panel.hash == base.panel.hash and other.genes == base.genes
    assert other.transform.state_dict() == base.transform.state_dict()
    assert not np.allclose(other.targets("P2S0").to_numpy(), base.targets("P2S0").to_numpy())
    # ... while changing a training slide does move them (the check above is not vacuous)
    changed_train = [_perturb(s, 7.0) if s.name == "P0S0" else s for s in slides]
    moved = make_dm(changed_train, cache, **kw)
    assert moved.transform.state_dict() != base.transform.state_dict()
    # the z-score statistics are exactly those of the training spots minus validation spots
    train_rows = base.spot_table[base.spot_table["split"] == "train"]
    y = np.concatenate([base.targets(n).loc[g["spot_id"]].to_numpy() for n, g in train_rows.groupby("slide")])
    assert np.allclose(y.mean(axis=0), 0.0, atol=1e-4) and np.allclose(y.std(axis=0), 1.0, atol=1e-3)


def test_dihedral_augmentation_only_in_training(slides, cache: Path) -> None:
    dm = make_dm(slides, cache, batch_size=32)
    by_name = {s.name: s for s in slides}
    stores = {n: PatchStore(cache, SPEC).open(by_name[n]) for n in TRAIN + TEST}

    def stored(slide: str, spot: str) -> np.ndarray:
        store = stores[slide]
        return np.asarray(store.patches[store.spot_index()[spot]])

    def as_uint8(img: torch.Tensor) -> np.ndarray:
        return np.round(img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)

    codes = []
    for b in batches(dm.train_dataloader()):
        for img, slide, spot in zip(b["image"], b["slide"], b["spot_id"], strict=True):
            got, ref = as_uint8(img), stored(slide, spot)
            match = [k for k in range(8) if np.array_equal(got, dihedral(ref, k))]
            assert match, f"train patch {slide}/{spot} is not a dihedral transform of the stored patch"
            codes.append(match[0])
    assert len(set(codes)) == 8, "all 8 dihedral transforms should occur over an epoch"
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        for b in batches(loader):
            for img, slide, spot in zip(b["image"], b["slide"], b["spot_id"], strict=True):
                assert np.array_equal(as_uint8(img), stored(slide, spot))
    plain = make_dm(slides, cache, augment=False)
    b = next(iter(plain.train_dataloader()))
    assert np.array_equal(as_uint8(b["image"][0]), stored(b["slide"][0], b["spot_id"][0]))


def test_dihedral_group() -> None:
    p = np.arange(2 * 3 * 3 * 1).reshape(2, 3, 3)[..., None][0]
    outs = {dihedral(p, k).tobytes() for k in range(8)}
    assert len(outs) == 8 and np.array_equal(dihedral(p, 0), p)


def test_same_seed_same_batches(slides, cache: Path) -> None:
    def run(seed: int, workers: int = 0) -> list[tuple]:
        dm = make_dm(slides, cache, seed=seed, batch_size=16, num_workers=workers)
        loader = dm.train_dataloader()
        epochs = [batches(loader) for _ in range(2)]
        return [(tuple(b["index"].tolist()), b["image"].sum().item()) for ep in epochs for b in ep]

    a, b = run(0), run(0)
    assert a == b
    n = len(a) // 2
    assert a[:n] != a[n:], "the second epoch must reshuffle"
    assert run(1) != a
    assert run(0, workers=2) == a, "worker processes must not change batches"
    dm0, dm1 = make_dm(slides, cache, seed=0), make_dm(slides, cache, seed=1)
    assert not dm0.spot_table["split"].equals(dm1.spot_table["split"]), "the val split follows the seed"


def test_seeded_sampler_is_a_function_of_seed_and_epoch() -> None:
    s = SeededSampler(5, seed=3, augment=True)
    first, second = list(s), list(s)
    assert sorted(k[0] for k in first) == list(range(5)) and all(isinstance(k[1], int) for k in first)
    assert first != second, "each pass is a new epoch"
    fresh = SeededSampler(5, seed=3, augment=True)
    fresh.set_epoch(1)  # what Lightning does, also after a dataloader reload
    assert list(fresh) == second
    fresh.set_epoch(0)
    assert list(fresh) == first
    assert list(SeededSampler(5, seed=3, augment=False, shuffle=False)) == list(range(5))


def test_whole_slide_batches(slides, cache: Path) -> None:
    dm = make_dm(slides, cache, whole_slide=True)
    table = dm.spot_table
    for split, loader in (("train", dm.train_dataloader()), ("test", dm.test_dataloader())):
        seen = []
        for b in batches(loader):
            assert len(set(b["slide"])) == 1
            slide = b["slide"][0]
            rows = table[(table["slide"] == slide) & (table["split"] == split)]
            assert sorted(b["index"].tolist()) == sorted(rows.index.tolist())
            n = len(rows)
            assert b["image"].shape == (n, 3, 16, 16) and b["expression"].shape == (n, 20)
            assert b["mask"].dtype == torch.bool and bool(b["mask"].all())
            seen.append(slide)
        assert sorted(seen) == sorted(TRAIN if split == "train" else TEST)
    padded = make_dm(slides, cache, whole_slide=True, pad_to=64)
    b = next(iter(padded.test_dataloader()))
    n = int(b["mask"].sum())
    assert b["image"].shape[0] == 64 and n == (table["slide"] == b["slide"][0]).sum()
    assert (b["index"][n:] == -1).all() and b["spot_id"][n:] == [""] * (64 - n)
    assert float(b["expression"][n:].abs().sum()) == 0.0


def test_whole_slide_validation_is_scored_in_its_slide_context(slides, cache: Path) -> None:
    """Validation spots held out of a training slide come inside their whole slide: every spot of
    that slide is present (the context a whole-slide model sees at test time), `score_mask` marks
    exactly the validation spots, and padding is never scored. A validation SLIDE is all scored."""
    dm = make_dm(slides, cache, whole_slide=True, pad_to=80)
    table = dm.spot_table
    seen = []
    for b in batches(dm.val_dataloader()):
        slide = b["slide"][0]
        real = b["mask"]
        assert sorted(b["index"][real].tolist()) == sorted(table.index[table["slide"] == slide].tolist())
        val = set(table.index[(table["slide"] == slide) & (table["split"] == "val")].tolist())
        assert 0 < len(val) < int(real.sum())
        assert set(b["index"][b["score_mask"]].tolist()) == val
        assert not bool(b["score_mask"][~real].any())
        seen.append(slide)
    assert sorted(seen) == sorted(TRAIN)
    # training batches never include the held-out validation spots
    for b in batches(dm.train_dataloader()):
        assert "score_mask" not in b
        assert not set(b["index"][b["mask"]].tolist()) & set(table.index[table["split"] == "val"].tolist())
    by_slide = make_dm(slides, cache, FOLD_VAL, whole_slide=True)
    for b in batches(by_slide.val_dataloader()):
        assert "score_mask" not in b and b["slide"][0] in FOLD_VAL.val


def test_neighbours_stay_in_their_slide(slides, cache: Path) -> None:
    k = 4
    dm = make_dm(slides, cache, patch_spec=None, neighbours=k)
    table = dm.spot_table
    by_name = {s.name: s for s in slides}
    for b in batches(dm.test_dataloader()) + batches(dm.train_dataloader()):
        for idx, nb in zip(b["index"].tolist(), b["neighbours"].tolist(), strict=True):
            slide = table.loc[idx, "slide"]
            assert idx not in nb and -1 not in nb
            assert set(table.loc[nb, "slide"]) == {slide}
            xy = by_name[slide].coords
            d = np.linalg.norm(xy - xy[table.loc[idx, "row"]], axis=1)
            nearest = np.sort(d)[1 : k + 1]
            assert np.allclose(np.sort(d[table.loc[nb, "row"].to_numpy()]), nearest)


def test_expression_only_and_feature_extension(slides, cache: Path) -> None:
    def mean_count(slide: Slide) -> np.ndarray:
        return slide.counts().mean(axis=1, keepdims=True)

    dm = make_dm(slides, cache, patch_spec=None, features={"mean": mean_count})
    b = next(iter(dm.test_dataloader()))
    assert "image" not in b and b["features"]["mean"].shape == (32, 1)
    s = {x.name: x for x in slides}[b["slide"][0]]
    assert np.isclose(float(b["features"]["mean"][0]), s.counts()[s.spot_ids.index(b["spot_id"][0])].mean())
    with pytest.raises(DataError, match="cache_dir"):
        STDataModule(slides, FOLD, patch_spec=SPEC)
    no_image = [dataclasses.replace(x, image=None) if x.name == "P2S0" else x for x in slides]
    with pytest.raises(DataError, match="no image") as err:
        make_dm(no_image, cache)
    assert err.value.slide == "P2S0"


def test_protocol_rules_and_lazy_loader(root: Path, cache: Path) -> None:
    calls = []

    def load() -> list[Slide]:
        calls.append(1)
        return SyntheticReader(root).read_all()

    dm = STDataModule(load, FOLD, protocol="hinge", patch_spec=None)
    assert not calls
    dm.setup("fit")
    assert dm.transform.method == "log2p1" and dm.panel.rule == "hmhvg"
    b = next(iter(dm.val_dataloader()))
    assert b["expression"].shape[1] == dm.n_genes


def test_lightning_trainer_runs_and_predictions_deduplicate(slides, cache: Path) -> None:
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self, g: int) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, g)

        def forward(self, b):
            return self.lin(b["image"].mean(dim=(2, 3)))

        def training_step(self, b, i):
            return torch.nn.functional.mse_loss(self(b), b["expression"])

        def validation_step(self, b, i):
            self.log(
                "val_mse", torch.nn.functional.mse_loss(self(b), b["expression"]), batch_size=len(b["index"])
            )

        def predict_step(self, b, i):
            return b["index"], self(b)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = STDataModule(
        slides, FOLD, cache_dir=cache, patch_spec=SPEC, gene_rule="top_var", gene_n=20, batch_size=64
    )
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Tiny(20)
    trainer.fit(model, dm)
    out = trainer.predict(model, dm)
    idx = torch.cat([o[0] for o in out]).tolist()
    assert sorted(idx) == sorted(dm.spot_table.index[dm.spot_table["split"] == "test"].tolist())


def test_images_are_learnable(slides, cache: Path) -> None:
    """Ridge on 4x4-downsampled patches (pixels and their squares) beats the training-mean predictor
    on a held-out patient: the synthetic genes really can be predicted from the image."""
    dm = make_dm(slides, cache, gene_rule="all", gene_n=None, augment=False, batch_size=64)
    root = Path(slides[0].source).parents[2]
    genes_tsv = SyntheticReader(root).gene_model()
    markers = [dm.genes.index(g) for g in genes_tsv.index[genes_tsv["role"] == "marker"]]

    def collect(loader):
        xs, ys = [], []
        for b in loader:
            im = torch.nn.functional.adaptive_avg_pool2d(b["image"], 4).flatten(1)
            xs.append(torch.cat([im, im**2], 1).numpy())
            ys.append(b["expression"].numpy())
        return np.concatenate(xs).astype(np.float64), np.concatenate(ys).astype(np.float64)

    xtr, ytr = collect(dm.train_dataloader())
    xva, yva = collect(dm.val_dataloader())
    xte, yte = collect(dm.test_dataloader())
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva, xte = (xtr - mu) / sd, (xva - mu) / sd, (xte - mu) / sd
    ym = ytr.mean(0)

    def fit(lam: float) -> np.ndarray:
        return np.linalg.solve(xtr.T @ xtr + lam * np.eye(xtr.shape[1]), xtr.T @ (ytr - ym))

    lam = min((10.0, 100.0, 1000.0), key=lambda v: float(((xva @ fit(v) + ym - yva) ** 2).mean()))
    pred = xte @ fit(lam) + ym
    mse, base = ((pred - yte) ** 2).mean(), ((ym - yte) ** 2).mean()
    mse_m, base_m = ((pred - yte)[:, markers] ** 2).mean(), ((ym - yte)[:, markers] ** 2).mean()
    print(f"ridge lambda={lam}: test MSE {mse:.4f} vs mean {base:.4f}; markers {mse_m:.4f} vs {base_m:.4f}")
    assert mse < base, (mse, base)
    assert mse_m < 0.9 * base_m, (mse_m, base_m)
    pcc = [np.corrcoef(pred[:, g], yte[:, g])[0, 1] for g in markers]
    print("marker PCC", np.round(pcc, 3))
    assert np.mean(pcc) > 0.3, pcc


def test_train_target_mean_equals_mean_over_the_train_loader(slides, cache: Path) -> None:
    dm = make_dm(slides, cache, val_fraction=0.2, batch_size=16)
    seen = np.concatenate(
        [b["expression"].numpy().astype(np.float64) for b in batches(dm.train_dataloader())]
    )
    assert len(seen) < sum(len(dm.targets(s)) for s in dm.train_slides)  # validation spots left out
    np.testing.assert_allclose(dm.train_target_mean(), seen.mean(axis=0), rtol=1e-6)
