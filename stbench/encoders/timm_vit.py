"""timm ViT family on the hub (UNI, UNI2-h, Prov-GigaPath, H-optimus-0, H0-mini, Virchow2).

Built as `timm.create_model(architecture, pretrained=False, **config.model_args, **card kwargs)` and
then strictly loaded from the hub file (model.safetensors / pytorch_model.bin), which is what
`timm.create_model("hf-hub:...", pretrained=True, ...)` does, but with strict key checks and
fail-fast errors.
"""

from __future__ import annotations

from typing import Any

import torch

from stbench.encoders.base import Encoder, locate, split_tiny
from stbench.encoders.spec import EncoderSpec
from stbench.encoders.weights import WeightSource, load_state_dict, strict_load


def _resolve_layers(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The specs keep JSON-able names; timm needs the classes."""
    import timm.layers

    out = dict(kwargs)
    if out.get("mlp_layer") == "swiglu_packed":
        out["mlp_layer"] = timm.layers.SwiGLUPacked
    if out.get("act_layer") == "silu":
        out["act_layer"] = torch.nn.SiLU
    return out


class ViTPool(torch.nn.Module):
    """Token selection on timm's forward_features: CLS, or CLS ‖ mean of patch tokens (no registers)."""

    def __init__(self, model: torch.nn.Module, token: str) -> None:
        super().__init__()
        self.model = model
        self.token = token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(x)
        cls = tokens[:, 0]
        if self.token == "cls":
            return cls
        patches = tokens[:, self.model.num_prefix_tokens :]
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)


def build(spec: EncoderSpec, source: WeightSource, overrides: dict[str, Any] | None) -> Encoder:
    import timm

    arch_over, input_px = split_tiny(overrides, spec)
    cfg: dict[str, Any] = {}
    path = None
    weights_id = "none"
    if source.kind != "none":
        cfg, path, weights_id = locate(spec, source)
    arch = cfg.get("architecture", spec.arch)
    # hub config.json is authoritative for what it states; the card adds callables/extras
    kwargs = {**spec.arch_kwargs, **cfg.get("model_args", {}), **arch_over}
    kwargs["num_classes"] = 0
    model = timm.create_model(arch, pretrained=False, **_resolve_layers(kwargs))
    if path is not None:
        strict_load(model, load_state_dict(path), what=f"{spec.name} ({arch})")
    model.eval()
    dim = model.num_features * (2 if spec.token == "cls+meanpatch" else 1)
    return Encoder(spec, ViTPool(model, spec.token), dim=dim, weights_id=weights_id, input_px=input_px)
