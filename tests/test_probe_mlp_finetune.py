"""probe-mlp (cached features) and finetune (encoder + head end to end) learn on the synthetic data.

Thresholds for both: test MSE below the training-mean predictor's MSE on a held-out patient and
mean marker-gene PCC > 0.3 (observed: probe-mlp 0.470 vs 0.534, PCC 0.47; finetune 0.522 vs 0.534,
PCC 0.51)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from encoder_standin import StandInEncoder, TinyConvEncoder

from baselines.finetune import method as finetune_method
from baselines.probe_mlp.method import ProbeMLP
from stbench.data.datamodule import STDataModule
from stbench.data.features import FeatureStore, feature_provider
from stbench.data.patches import PatchSpec, PatchStore
from stbench.data.readers.synthetic import SyntheticReader
from stbench.data.splits import Fold
from stbench.data.synthetic import generate_synthetic

TRAIN, TEST = ("P0S0", "P1S0", "P0S1"), ("P2S0",)
FOLD = Fold(0, "f", TRAIN, (), TEST, unit="patient", val_fraction=0.15)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    root = generate_synthetic(
        tmp_path_factory.mktemp("syn") / "ds", n_slides=4, n_patients=3, spots_per_side=8, n_genes=30
    )
    return root, tmp_path_factory.mktemp("cache")


def trainer(epochs: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def scores(dm: STDataModule, method: L.LightningModule, tr: L.Trainer, root: Path) -> dict[str, float]:
    out = tr.predict(method, datamodule=dm)
    pred = torch.cat([o["pred"] for o in out]).numpy()
    rows = dm.spot_table.loc[torch.cat([o["index"] for o in out]).numpy(), "row"].to_numpy()
    truth = dm.targets(TEST[0]).to_numpy()[rows]
    train = np.concatenate([dm.targets(n).to_numpy()[dm._train_rows(n)] for n in TRAIN])
    model = SyntheticReader(root).gene_model()
    markers = [dm.genes.index(g) for g in model.index[model["role"] == "marker"] if g in dm.genes]
    return {
        "mse": float(((pred - truth) ** 2).mean()),
        "mean_mse": float(((train.mean(0) - truth) ** 2).mean()),
        "marker_pcc": float(np.mean([np.corrcoef(pred[:, g], truth[:, g])[0, 1] for g in markers])),
    }


def test_probe_mlp_learns_on_cached_features(data) -> None:
    root, cache = data
    slides = SyntheticReader(root).read_all()
    enc = StandInEncoder(weights_id="file:feedbeef0000")
    fn = feature_provider(
        "standin",
        "x",
        FeatureStore(cache),
        PatchStore(cache, PatchSpec(out_px=16)),
        device="cpu",
        build=lambda n, w: enc,
    )
    dm = STDataModule(slides, FOLD, features={"standin": fn}, gene_rule="top_var", gene_n=20, batch_size=32)
    dm.setup("fit")
    L.seed_everything(0, verbose=False)
    method = ProbeMLP(dm.n_genes, dm.genes, encoder="standin", hidden=64, dropout=0.1, lr=1e-3)
    tr = trainer(5)  # short training: the runner instead keeps the best-on-validation checkpoint
    tr.fit(method, datamodule=dm)
    s = scores(dm, method, tr, root)
    print("probe-mlp", s)
    assert s["mse"] < s["mean_mse"] and s["marker_pcc"] > 0.3, s
    assert method.weights_id() == "file:feedbeef0000"
    assert enc.patches_seen == sum(sl.n_spots for sl in slides)  # each patch encoded once, not per epoch


def test_finetune_trains_encoder_and_head_end_to_end(data, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = data
    slides = SyntheticReader(root).read_all()
    monkeypatch.setattr(finetune_method, "_build_encoder", lambda name, w: TinyConvEncoder(weights_id=w))
    dm = STDataModule(
        slides,
        FOLD,
        patch_spec=PatchSpec(out_px=16),
        cache_dir=cache,
        gene_rule="top_var",
        gene_n=20,
        batch_size=32,
    )
    dm.prepare_data()
    dm.setup("fit")
    L.seed_everything(0, verbose=False)
    method = finetune_method.Finetune(
        dm.n_genes, dm.genes, encoder="tiny", weights="none", encoder_lr=3e-3, lr=3e-3
    )
    before = [p.detach().clone() for p in method.net.encoder.parameters()]
    tr = trainer(12)
    tr.fit(method, datamodule=dm)
    moved = [not torch.equal(a, b) for a, b in zip(before, method.net.encoder.parameters(), strict=True)]
    assert all(moved)  # the encoder itself is trained, not only the head
    s = scores(dm, method, tr, root)
    print("finetune", s)
    assert s["mse"] < s["mean_mse"] and s["marker_pcc"] > 0.3, s
    assert method.weights_id() == "none"
