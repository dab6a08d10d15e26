"""ImageNet CNNs from torchvision (ResNet-18/50, DenseNet-121, VGG16) as frozen feature extractors.

Default weights are torchvision's own enum checkpoints (raw state dicts fetched into
$TORCH_HOME/hub/checkpoints); a local state-dict file works the same way. Architectures are built
with torchvision's classes and size knobs (`layers`, `block_config`, `cfg`) from the spec, so tests
shrink depth through the same constructors.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

import torch

from stbench.encoders.base import Encoder, split_tiny
from stbench.encoders.spec import EncoderSpec
from stbench.encoders.weights import (
    WeightsError,
    WeightSource,
    file_sha,
    load_state_dict,
    offline,
    strict_load,
)

_DENSENET_OLD = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _build_net(spec: EncoderSpec, kw: dict[str, Any]) -> torch.nn.Module:
    from torchvision.models import densenet, resnet, vgg

    if spec.arch.startswith("resnet"):
        block = resnet.BasicBlock if kw.pop("block") == "basic" else resnet.Bottleneck
        return resnet.ResNet(block, kw.pop("layers"), **kw)
    if spec.arch.startswith("densenet"):
        return densenet.DenseNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})
    if spec.arch.startswith("vgg"):
        return vgg.make_layers(kw["cfg"], batch_norm=kw.get("batch_norm", False))
    raise WeightsError(f"unknown torchvision architecture {spec.arch}")


class CNNPool(torch.nn.Module):
    """Global-average-pooled last feature map (ResNet: before fc; DenseNet: after final ReLU)."""

    def __init__(self, net: torch.nn.Module, kind: str) -> None:
        super().__init__()
        self.net = net
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        if self.kind == "resnet":
            x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
            x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        elif self.kind == "densenet":
            x = torch.relu(n.features(x))
        else:  # vgg: conv trunk only
            x = n(x)
        return x.mean(dim=(2, 3))


def _torchvision_file(enum_name: str) -> Path:
    """The cached checkpoint of a torchvision weights enum, downloading it (10 s timeout) if allowed."""
    from torchvision.models import get_weight

    url = get_weight(enum_name).url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if path.exists():
        return path
    hint = f"it is downloaded from {url} into {path.parent}; or pass a local state-dict file with --weights"
    if offline():
        raise WeightsError(f"torchvision weights {enum_name}: no local copy and offline mode is on: {hint}")
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as exc:  # noqa: BLE001 - network failures become one clear message
        raise WeightsError(
            f"torchvision weights {enum_name}: download failed ({type(exc).__name__}): {hint}"
        ) from None
    finally:
        socket.setdefaulttimeout(old)
    return path


def build(spec: EncoderSpec, source: WeightSource, overrides: dict[str, Any] | None) -> Encoder:
    arch_over, input_px = split_tiny(overrides, spec)
    net = _build_net(spec, {**spec.arch_kwargs, **arch_over})
    kind = "resnet" if spec.arch.startswith("resnet") else spec.arch.rstrip("0123456789")
    weights_id = "none"
    if source.kind != "none":
        if source.kind == "torchvision":
            path = _torchvision_file(source.ref)
            weights_id = f"torchvision:{source.ref}"
        elif source.kind == "local":
            path = Path(source.ref)
            if path.is_dir():
                raise WeightsError(f"{spec.name}: expected a state-dict file, got directory {path}")
            weights_id = f"file:{file_sha(path)}"
        else:
            raise WeightsError(f"{spec.name}: torchvision encoders take 'default', 'none' or a local file")
        state = load_state_dict(path)
        if kind == "densenet":
            state = {(_DENSENET_OLD.sub(r"\1\2", k)): v for k, v in state.items()}
        if kind == "vgg":  # the classifier is unused by the pooled conv feature; drop it by prefix
            state = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        strict_load(net, state, what=f"{spec.name} ({spec.arch})")
    net.eval()
    with torch.no_grad():
        dim = CNNPool(net, kind)(torch.zeros(1, 3, 64, 64)).shape[1]
    return Encoder(spec, CNNPool(net, kind), dim=dim, weights_id=weights_id, input_px=input_px)
