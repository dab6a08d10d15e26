"""HEST-Benchmark's ResNet50-trunc: timm `resnet50.tv_in1k` cut after layer3, global average pool
(1024-d). The full network is loaded strictly (so the checkpoint is verified) and the forward stops
at layer3.
"""

from __future__ import annotations

from typing import Any

import torch

from stbench.encoders.base import Encoder, locate, split_tiny
from stbench.encoders.spec import EncoderSpec
from stbench.encoders.weights import WeightSource, load_state_dict, strict_load


class Layer3Pool(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.maxpool(m.act1(m.bn1(m.conv1(x))))
        x = m.layer3(m.layer2(m.layer1(x)))
        return x.mean(dim=(2, 3))


def build(spec: EncoderSpec, source: WeightSource, overrides: dict[str, Any] | None) -> Encoder:
    import timm

    arch_over, input_px = split_tiny(overrides, spec)
    cfg: dict[str, Any] = {}
    path = None
    weights_id = "none"
    if source.kind != "none":
        cfg, path, weights_id = locate(spec, source)
    # hub config.json is authoritative for what it states; the card adds callables/extras
    kwargs = {**spec.arch_kwargs, **cfg.get("model_args", {}), **arch_over}
    if "num_classes" in cfg:
        kwargs.setdefault("num_classes", cfg["num_classes"])
    model = timm.create_model(spec.arch, pretrained=False, **kwargs)
    if path is not None:
        strict_load(model, load_state_dict(path), what=f"{spec.name} ({spec.arch})")
    model.eval()
    dim = (
        model.layer3[-1].conv3.out_channels
        if hasattr(model.layer3[-1], "conv3")
        else model.layer3[-1].conv2.out_channels
    )
    return Encoder(spec, Layer3Pool(model), dim=dim, weights_id=weights_id, input_px=input_px)
