"""BLEEP: fit + test through the runner, paper-config size, the loss against a numpy reference,
retrieval, and the leakage rule (the retrieval reference holds training spots only).

Observed on the synthetic harness fold (P0S0, tiny config, seed 0): test MSE 0.39-0.41 vs the mean
predictor's 0.422, gene-wise PCC 0.13-0.15. Thresholds: MSE below the mean's, PCC > 0.05."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from encoder_standin import TinyConvEncoder
from method_harness import run_method

from baselines.bleep import method as bleep_method
from baselines.bleep.method import BLEEP
from baselines.bleep.model import BLEEPNet, ProjectionHead, Reference, bleep_loss, retrieve
from stbench.data.datamodule import STDataModule
from stbench.data.patches import PatchSpec
from stbench.data.readers.synthetic import SyntheticReader
from stbench.data.splits import Fold
from stbench.data.synthetic import generate_synthetic
from stbench.methods.registry import register_method

CONFIGS = Path(__file__).resolve().parents[1] / "baselines" / "bleep" / "configs"
PAPER_GENES = 3467  # BLEEP's liver data: 3467 shared highly variable genes (config.py spot_embedding)
PAPER_PARAMS = 25_052_992  # = 24,165,440 + 256 * n_genes; README.md


def test_bleep_fit_test_beats_mean(synthetic_root: Path, mean_row: dict, tmp_path: Path) -> None:
    register_method(BLEEP)
    row = run_method("bleep", synthetic_root, tmp_path, config="tiny")
    m, base = row["metrics"], mean_row["metrics"]
    print("bleep", m["mse"], m["pcc"], "mean", base["mse"])
    assert m["mse"] < base["mse"], (m["mse"], base["mse"])
    assert m["pcc"] is not None and m["pcc"] > 0.05, m["pcc"]
    assert row["weights"] == "none"
    assert row["checkpoint"]["chosen_on"] == "val/mse"


def test_paper_config_parameter_count() -> None:
    cfg = yaml.safe_load((CONFIGS / "paper.yaml").read_text())["method"]
    cfg["weights"] = "none"  # same architecture; no download
    model = BLEEP(n_genes=PAPER_GENES, **cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == PAPER_PARAMS, n
    assert model.monitor == "val/loss"  # the authors keep the lowest held-out contrastive loss
    assert all(p.requires_grad for p in model.net.encoder.parameters())  # the encoder is trained
    assert model.net.training  # BatchNorm trains too (build_encoder hands out eval mode)


def _numpy_loss(img: np.ndarray, spot: np.ndarray, t: float) -> float:
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    logits = spot @ img.T / t
    sim = (img @ img.T + spot @ spot.T) / 2 / t
    targets = np.exp(log_softmax(sim))
    spots_loss = -(targets * log_softmax(logits)).sum(1)
    images_loss = -(targets.T * log_softmax(logits.T)).sum(1)
    return float(((spots_loss + images_loss) / 2).mean())


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_symmetric_loss_matches_numpy(temperature: float) -> None:
    rng = np.random.default_rng(0)
    img, spot = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    got = bleep_loss(torch.from_numpy(img), torch.from_numpy(spot), temperature)
    assert float(got) == pytest.approx(_numpy_loss(img, spot, temperature), rel=1e-10)
    # identical, orthonormal embeddings: soft targets are (nearly) one-hot on the matching pairs
    eye = torch.eye(3, dtype=torch.float64) * 10
    assert float(bleep_loss(eye, eye, 1.0)) < 1e-3


def test_shapes_and_projection_head() -> None:
    head = ProjectionHead(7, 16, 0.1).eval()
    out = head(torch.randn(4, 7))
    assert out.shape == (4, 16)
    assert torch.allclose(out.mean(-1), torch.zeros(4), atol=1e-5)  # LayerNorm output
    net = BLEEPNet(TinyConvEncoder(dim=12), 12, n_genes=9, dim=16).eval()
    assert net.embed_images(torch.rand(3, 3, 16, 16)).shape == (3, 16)
    assert net.embed_spots(torch.rand(3, 9)).shape == (3, 16)


def test_retrieval_modes() -> None:
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    values = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    ref = Reference(keys, values, torch.arange(4))
    q = torch.tensor([[2.0, 0.0]])  # cosine ranks rows 0, 1, 2, 3
    pred, rows = retrieve(q, ref, top_k=2, mode="mean")
    assert rows.tolist() == [[0, 1]] and pred.tolist() == [[1.5]]
    pred, rows = retrieve(q, ref, top_k=2, mode="top1")
    assert rows.tolist() == [[0]] and pred.tolist() == [[1.0]]
    pred, _ = retrieve(q, ref, top_k=2, mode="weighted")  # weights exp(-squared distance): 1 vs 1.01
    d = torch.tensor([1.0, 1.21 + 0.01])
    w = torch.exp(-d) / torch.exp(-d).sum()
    assert torch.allclose(pred, (w * torch.tensor([1.0, 2.0])).sum().view(1, 1))
    pred, rows = retrieve(q, ref, top_k=50, mode="mean")  # k larger than the reference: all of it
    assert rows.shape == (1, 4) and pred.item() == pytest.approx(2.5)


# ---- leakage: the reference is training spots only ------------------------------------------
TRAIN, TEST = ("P0S0", "P1S0", "P0S1"), ("P2S0",)
FOLD = Fold(0, "f", TRAIN, (), TEST, unit="patient", val_fraction=0.2)
HUGE = 1e6


class RecordingBLEEP(BLEEP):
    """Keeps each prediction's reference for inspection (the method drops it at on_predict_end)."""

    def on_predict_end(self) -> None:
        self.seen = [*getattr(self, "seen", []), self.reference]
        super().on_predict_end()


@pytest.fixture(scope="module")
def poisoned_dm(tmp_path_factory: pytest.TempPathFactory) -> STDataModule:
    """A DataModule whose validation and test targets are huge: any leak shows in predictions."""
    root = generate_synthetic(
        tmp_path_factory.mktemp("syn") / "ds", n_slides=4, n_patients=3, spots_per_side=6, n_genes=20
    )
    dm = STDataModule(
        SyntheticReader(root).read_all(),
        FOLD,
        patch_spec=PatchSpec(out_px=16),
        cache_dir=tmp_path_factory.mktemp("cache"),
        gene_rule="top_var",
        gene_n=10,
        batch_size=16,
    )
    dm.prepare_data()
    dm.setup("fit")
    for sd in dm._data:
        if sd.split == "test":
            sd.targets[:] = HUGE
        elif sd.name in dm._val_rows:
            sd.targets[dm._val_rows[sd.name]] = -HUGE
    return dm


def _model(dm: STDataModule, monkeypatch: pytest.MonkeyPatch, **kw) -> RecordingBLEEP:
    monkeypatch.setattr(bleep_method, "_build_encoder", lambda n, w, o: TinyConvEncoder(dim=8))
    L.seed_everything(0, verbose=False)
    return RecordingBLEEP(dm.n_genes, dm.genes, encoder="tiny", weights="none", top_k=5, **kw)


def _predict(model: BLEEP, dm: STDataModule) -> torch.Tensor:
    tr = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return torch.cat([o["pred"] for o in tr.predict(model, datamodule=dm)])


@pytest.mark.parametrize("retrieval", ["mean", "weighted", "top1"])
def test_retrieval_reference_is_training_spots_only(
    poisoned_dm: STDataModule, monkeypatch: pytest.MonkeyPatch, retrieval: str
) -> None:
    dm = poisoned_dm
    model = _model(dm, monkeypatch, retrieval=retrieval)
    pred = _predict(model, dm)
    (ref,) = model.seen
    table = dm.spot_table
    assert (table.loc[ref.index.numpy(), "split"] == "train").all()
    assert set(ref.index.tolist()) == set(table.index[table["split"] == "train"])  # all of them, no more
    train = np.concatenate([dm.targets(n).to_numpy()[dm._train_rows(n)] for n in TRAIN])
    assert np.abs(train).max() < 100  # the poison did not touch training spots
    lo, hi = torch.from_numpy(train.min(0)), torch.from_numpy(train.max(0))
    assert pred.shape == (table["split"].eq("test").sum(), dm.n_genes)
    assert ((pred >= lo - 1e-5) & (pred <= hi + 1e-5)).all()  # averages of training targets only
    assert model.reference is None  # dropped after predicting


def test_reference_is_rebuilt_from_current_weights(poisoned_dm: STDataModule, monkeypatch) -> None:
    """A reference never outlives the weights it was built with: none is saved in checkpoints, and
    predicting after a weight change (e.g. Lightning restoring the best checkpoint) re-embeds."""
    dm = poisoned_dm
    model = _model(dm, monkeypatch)
    assert not any("reference" in k for k in model.state_dict())
    _predict(model, dm)
    with torch.no_grad():
        for p in model.net.spot_projection.parameters():
            p.add_(0.5)
    _predict(model, dm)
    first, second = model.seen
    assert torch.equal(first.index, second.index) and torch.equal(first.values, second.values)
    assert not torch.allclose(first.keys, second.keys)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(second.keys, model.net.embed_spots(second.values))
    with pytest.raises(RuntimeError, match="reference"):
        model.predict_expression({"image": torch.rand(2, 3, 16, 16)})
