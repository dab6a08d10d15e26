"""The Encoder module every family returns: own resize + normalisation, then a pooled embedding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from stbench.encoders.spec import EncoderSpec
from stbench.encoders.weights import (
    WeightsError,
    WeightSource,
    file_sha,
    hub_weights,
    local_weights,
)


class Encoder(torch.nn.Module):
    """images [B, 3, H, W] float in [0, 1] -> features [B, dim].

    Resizing and normalisation live inside so every caller (feature store, finetune) preprocesses
    exactly as the encoder's authors do; `weights_id` names the weights for result rows.
    """

    def __init__(
        self, spec: EncoderSpec, net: torch.nn.Module, *, dim: int, weights_id: str, input_px: int
    ) -> None:
        super().__init__()
        self.spec = spec
        self.net = net
        self.dim = dim
        self.weights_id = weights_id
        self.input_px = input_px
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (self.input_px, self.input_px):
            mode = self.spec.resize
            x = F.interpolate(x, size=(self.input_px, self.input_px), mode=mode, antialias=True)
            x = x.clamp(0.0, 1.0)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(images))


def locate(spec: EncoderSpec, source: WeightSource) -> tuple[dict[str, Any], Path, str]:
    """(config.json contents or {}, weights file, weights_id) for a hub or local source."""
    if source.kind == "hub":
        config, path, rev = hub_weights(source.ref, gated=spec.gated and source.ref == spec.hub_id)
        weights_id = f"hf:{source.ref}@{rev}"
    elif source.kind == "local":
        config, path = local_weights(Path(source.ref))
        weights_id = f"file:{file_sha(path)}"
    else:
        raise WeightsError(f"encoder {spec.name!r}: unsupported weights source {source.kind!r}")
    cfg: dict[str, Any] = {}
    if config is not None:
        try:
            cfg = json.loads(Path(config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise WeightsError(f"cannot read {config}: {exc}") from None
    return cfg, path, weights_id


def split_tiny(overrides: dict[str, Any] | None, spec: EncoderSpec) -> tuple[dict[str, Any], int]:
    """Separate the input size from architecture overrides (tests shrink both)."""
    kw = dict(overrides or {})
    input_px = int(kw.pop("input_px", spec.input_px))
    return kw, input_px
