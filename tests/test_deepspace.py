"""DeepSpaCE (`deepspace`): learns through the runner, paper-architecture size, shapes, ImageNet
classifier loading, training scope, augmentations.

Fit + test threshold on the synthetic dataset (tiny config unchanged, held-out slide P0S0): test MSE
below the `mean` predictor's and gene-wise PCC > 0.1. Observed (2 CPU cores): MSE 0.390 vs mean
0.422, PCC 0.139, about 9 s for the job (12 epochs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from method_harness import run_method

from baselines.deepspace import augment as aug
from baselines.deepspace.method import DeepSpaCE
from baselines.deepspace.model import DeepSpaCENet
from stbench.encoders import build_encoder
from stbench.methods.registry import register_method

CONFIGS = Path(__file__).resolve().parents[1] / "baselines" / "deepspace" / "configs"
TINY = {"cfg": [8, "M", 16, "M"], "input_px": 32}
TINY_HEAD = {"hidden": [64, 64], "pool": 2}
VGG16_TRUNK = 14_714_688  # torchvision vgg16 `features`
VGG16_FC67 = 25_088 * 4_096 + 4_096 + 4_096 * 4_096 + 4_096  # classifier.0 + classifier.3
PAPER_PARAMS_250 = VGG16_TRUNK + VGG16_FC67 + 4_096 * 250 + 250  # 135,284,794 for 250 genes


@pytest.fixture(autouse=True)
def _registered() -> None:
    register_method(DeepSpaCE)  # entry points are added to pyproject by the lead


def tiny_method(n_genes: int = 5, **kw) -> DeepSpaCE:
    torch.manual_seed(0)
    return DeepSpaCE(
        n_genes, weights=kw.pop("weights", "none"), encoder_overrides=TINY, **{**TINY_HEAD, **kw}
    )


def test_deepspace_learns_on_synthetic(synthetic_root, mean_row, tmp_path) -> None:
    row = run_method("deepspace", synthetic_root, tmp_path, config="tiny")
    m = row["metrics"]
    assert m["mse"] < mean_row["metrics"]["mse"], (m["mse"], mean_row["metrics"]["mse"])
    assert m["pcc"] > 0.1, m["pcc"]
    assert row["weights"] == "none"
    assert row["checkpoint"]["chosen_on"] == "val/mse"


def test_original_config_target_reaches_the_datamodule(synthetic_root, tmp_path) -> None:
    """original.yaml's target (log, then per-gene min-max on training spots) passes the runner."""
    target = yaml.safe_load((CONFIGS / "original.yaml").read_text())["data"]["target"]
    assert target == {"method": "log1p", "scale": "minmax"}
    over = {"data": {"target": target}, "trainer": {"max_epochs": 1}}
    row = run_method("deepspace", synthetic_root, tmp_path, config="tiny", overrides=over)
    assert row["target"] == "log1p"
    assert row["config"]["data"]["target"] == target
    assert row["metrics"]["mse"] < 0.5  # min-max targets live in [0, 1] on the training spots


def test_paper_config_leaves_the_target_to_the_protocol() -> None:
    cfg = yaml.safe_load((CONFIGS / "paper.yaml").read_text())
    assert "target" not in cfg["data"]
    assert cfg["method"]["lr"] == 1e-4 and cfg["method"]["weight_decay"] == 1e-4
    assert cfg["data"]["batch_size"] == 128 and cfg["trainer"]["max_epochs"] == 50


def test_paper_architecture_parameter_count() -> None:
    net = DeepSpaCENet(build_encoder("vgg16", "none"), 250)
    assert sum(p.numel() for p in net.encoder.parameters()) == VGG16_TRUNK
    assert sum(p.numel() for p in net.classifier.parameters()) == VGG16_FC67
    assert sum(p.numel() for p in net.parameters()) == PAPER_PARAMS_250
    assert [type(m).__name__ for m in net.classifier] == ["Linear", "ReLU", "Dropout"] * 2


def test_output_shapes() -> None:
    method = tiny_method(5).eval()
    with torch.no_grad():
        assert method.predict_expression({"image": torch.rand(4, 3, 32, 32)}).shape == (4, 5)
        assert method.predict_expression({"image": torch.rand(2, 3, 48, 48)}).shape == (2, 5)
    assert method.weights_id() == "none"


@pytest.mark.parametrize("source", ["file", "default"])
def test_imagenet_classifier_weights_load_from_the_trunk_checkpoint(tmp_path, monkeypatch, source) -> None:
    """A VGG state dict (features.* + classifier.*) feeds both the zoo's trunk and fc6/fc7 here,
    from a local file or from torchvision's cached default checkpoint (a tiny stand-in file)."""
    from torchvision.models import get_weight
    from torchvision.models.vgg import make_layers

    torch.manual_seed(3)
    trunk = make_layers(TINY["cfg"])
    state = {f"features.{k}": v for k, v in trunk.state_dict().items()}
    fc = {"0.weight": torch.randn(64, 16 * 2 * 2), "0.bias": torch.randn(64), "3.weight": torch.randn(64, 64)}
    fc["3.bias"] = torch.randn(64)
    state.update({f"classifier.{k}": v for k, v in fc.items()})
    state.update({"classifier.6.weight": torch.randn(1000, 64), "classifier.6.bias": torch.randn(1000)})
    if source == "file":
        path, weights = tmp_path / "vgg_tiny.pth", str(tmp_path / "vgg_tiny.pth")
    else:  # what build_encoder finds in torch's hub cache after downloading the default weights
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
        url = get_weight("VGG16_Weights.IMAGENET1K_V1").url
        path, weights = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1], "default"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    method = tiny_method(5, weights=weights)
    want = "file:" if source == "file" else "torchvision:VGG16_Weights.IMAGENET1K_V1"
    assert method.weights_id().startswith(want)
    for k, v in fc.items():
        torch.testing.assert_close(method.net.classifier.state_dict()[k], v)
    torch.testing.assert_close(method.net.encoder.net.net[0].weight, trunk[0].weight)


def test_head_scope_trains_only_the_last_layer() -> None:
    method = tiny_method(5, train_scope="head")
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == {"net.head.weight", "net.head.bias"}
    assert all(p.requires_grad for p in tiny_method(5).parameters())


def test_loss_is_smooth_l1_and_early_stopping_watches_validation() -> None:
    method = tiny_method(5, augment=[]).eval()  # no dropout, no augmentation: a deterministic loss
    batch = {"image": torch.rand(3, 3, 32, 32), "expression": torch.randn(3, 5) * 3}
    with torch.no_grad():
        want = F.smooth_l1_loss(method.predict_expression(batch), batch["expression"])
        torch.testing.assert_close(method.loss(batch), want)
    (stop,) = method.configure_callbacks()
    assert stop.monitor == "val/mse" and stop.patience == 5
    assert tiny_method(5, early_stop_patience=None).configure_callbacks() == []


def test_augmentations_keep_shape_and_range_and_are_seeded() -> None:
    x = torch.rand(6, 3, 16, 16)
    torch.manual_seed(0)
    a = aug.augment(x, aug.GROUPS)
    torch.manual_seed(0)
    b = aug.augment(x, aug.GROUPS)
    assert a.shape == x.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, x)
    torch.testing.assert_close(aug.augment(x, ()), x)
    with pytest.raises(ValueError, match="flip"):
        aug.augment(x, ["flip"])
    with pytest.raises(ValueError, match="augmentation"):
        tiny_method(5, augment=["flip"])


def test_hsv_round_trip() -> None:
    x = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(aug.hsv_to_rgb(aug.rgb_to_hsv(x)), x, rtol=1e-5, atol=1e-5)
