"""Tiles -> features for image-generation metrics (FID, oracle regressors), through one frozen encoder.

Why a wrapper: real and generated tiles must pass through exactly the same preprocessing and
encoder, and every result row must say which encoder and weights produced its FID (FIDs from
different feature spaces are not comparable). `label` carries that name, including "random-init"
when the weights are not pretrained (tests), so such numbers can never pass as real ones.

Encoders: any stbench zoo name (`h0-mini` for FID, `uni2-h` for the oracle, `midnight` for the MLP
regressor) through `build_encoder`, or `inception` = torchvision's Inception-v3 2048-d pool features
(weights: torchvision IMAGENET1K_V1, NOT the TF-Inception weights of the original FID code, so
values are not comparable to published Inception-FIDs; "none" = seeded random init).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stbench.encoders.spec import IMAGENET_MEAN, IMAGENET_STD

INCEPTION_NAMES = ("inception", "inception-v3")
FeatureFn = Callable[[Any], np.ndarray]


def tiles_to_tensor(tiles: object) -> torch.Tensor:
    """(n, 3, H, W) float32 in [0, 1] from uint8 (n, H, W, 3) / (n, 3, H, W) or float in [0, 1]."""
    t = tiles if isinstance(tiles, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(tiles))
    if t.ndim != 4 or 3 not in (t.shape[1], t.shape[-1]):
        raise ValueError(f"tiles must be (n, H, W, 3) or (n, 3, H, W), got shape {tuple(t.shape)}")
    if t.shape[1] != 3:
        t = t.permute(0, 3, 1, 2)
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    t = t.float()
    if t.numel() and (t.min() < -1e-6 or t.max() > 1 + 1e-6 or not torch.isfinite(t).all()):
        raise ValueError("float tiles must be finite and in [0, 1] (pass uint8 for 0-255 images)")
    return t.clamp(0.0, 1.0)


class Featurizer:
    """Batched, no-grad encoder forward over tiles; returns float64 (n, d) numpy features."""

    def __init__(
        self, encoder: torch.nn.Module, *, label: str, batch_size: int = 32, device: str = "cpu"
    ) -> None:
        self.encoder = encoder.eval().to(device)
        self.label, self.batch_size, self.device = label, int(batch_size), device

    def __call__(self, tiles: object) -> np.ndarray:
        x = tiles_to_tensor(tiles)
        out = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.batch_size):
                out.append(self.encoder(x[start : start + self.batch_size].to(self.device)).double().cpu())
        if not out:
            raise ValueError("no tiles to featurize")
        return torch.cat(out).numpy()


class InceptionPool(torch.nn.Module):
    """Inception-v3 up to the 2048-d average pool; resize (bilinear) + ImageNet normalisation inside."""

    def __init__(self, net: torch.nn.Module, input_px: int = 299) -> None:
        super().__init__()
        net.fc = torch.nn.Identity()
        self.net, self.input_px = net, int(input_px)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (self.input_px, self.input_px):
            x = F.interpolate(x, size=(self.input_px, self.input_px), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)


def build_inception(weights: str = "default", input_px: int = 299) -> tuple[InceptionPool, str]:
    """(module, weights label). "default" = torchvision IMAGENET1K_V1 (downloaded or cached)."""
    from torchvision.models.inception import Inception3

    from stbench.encoders.torchvision_cnn import _torchvision_file
    from stbench.encoders.weights import file_sha, load_state_dict, strict_load

    if weights == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = Inception3(aux_logits=False, transform_input=False, init_weights=False)
        return InceptionPool(net, input_px).eval(), "inception-v3@random-init(seed 0)"
    enum = "Inception_V3_Weights.IMAGENET1K_V1"
    path = _torchvision_file(enum) if weights == "default" else Path(weights)
    net = Inception3(aux_logits=True, transform_input=True, init_weights=False)
    strict_load(net, load_state_dict(path), what="inception-v3")
    net.AuxLogits = None
    net.aux_logits = False
    label = (
        f"inception-v3@torchvision:{enum}" if weights == "default" else f"inception-v3@file:{file_sha(path)}"
    )
    return InceptionPool(net, input_px).eval(), label


def build_featurizer(
    name: str,
    weights: str = "default",
    *,
    arch_overrides: dict[str, Any] | None = None,
    batch_size: int = 32,
    device: str = "cpu",
) -> Featurizer:
    """A Featurizer for a zoo encoder or Inception; the label names encoder and weights."""
    if name in INCEPTION_NAMES:
        px = int((arch_overrides or {}).get("input_px", 299))
        module, label = build_inception(weights, px)
        return Featurizer(module, label=label, batch_size=batch_size, device=device)
    from stbench.encoders import build_encoder

    enc = build_encoder(name, weights, arch_overrides=arch_overrides)
    wid = "random-init(seed 0)" if enc.weights_id == "none" else enc.weights_id
    tiny = "" if arch_overrides is None else "[tiny]"
    return Featurizer(enc, label=f"{name}{tiny}@{wid}", batch_size=batch_size, device=device)


def featurizer_label(fn: object) -> str:
    """A featurizer's label (plain callables: their name), for result rows."""
    return str(getattr(fn, "label", getattr(fn, "__name__", type(fn).__name__)))
