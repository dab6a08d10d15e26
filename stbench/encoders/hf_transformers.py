"""Hugging Face transformers encoders: PLIP (CLIPModel), Phikon (ViTModel), Phikon-v2 and Midnight
(Dinov2Model). Loaded with `from_pretrained` on the resolved snapshot folder (safetensors or
weights-only .bin), and the loading report is checked: any missing, unexpected or mismatched key
is an error instead of transformers' usual warning + random init.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from stbench.encoders.base import Encoder, locate, split_tiny
from stbench.encoders.spec import EncoderSpec
from stbench.encoders.weights import WeightsError, WeightSource, _preview

_CLASSES = {"clip": ("CLIPModel", "CLIPConfig"), "vit": ("ViTModel", "ViTConfig"),
            "dinov2": ("Dinov2Model", "Dinov2Config")}  # fmt: skip


# Phikon's card builds ViTModel(add_pooling_layer=False): the pooler is unused, so pooler weights in a
# checkpoint are dropped by prefix (like CONCH's text tower); any other unexpected key is an error.
_MODEL_KW: dict[str, dict[str, Any]] = {"vit": {"add_pooling_layer": False}}
_UNUSED_PREFIXES: dict[str, tuple[str, ...]] = {"vit": ("pooler.",)}


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in new.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class HFPool(torch.nn.Module):
    """The card's embedding: CLIP image features, CLS, or CLS ‖ mean of patch tokens."""

    def __init__(self, model: torch.nn.Module, token: str) -> None:
        super().__init__()
        self.model = model
        self.token = token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token == "projected":  # CLIPModel.get_image_features: pooled CLS -> visual_projection
            pooled = self.model.vision_model(pixel_values=x).pooler_output
            return self.model.visual_projection(pooled)
        hidden = self.model(pixel_values=x).last_hidden_state
        if self.token == "cls":
            return hidden[:, 0]
        return torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=-1)


def _check_report(info: dict[str, Any], spec: EncoderSpec, path: Path) -> None:
    problems = []
    unused = _UNUSED_PREFIXES.get(spec.arch, ())
    info = {
        **info,
        "unexpected_keys": [k for k in info.get("unexpected_keys") or [] if not k.startswith(unused)],
    }
    for label, key in (("missing keys", "missing_keys"), ("unexpected keys", "unexpected_keys")):
        keys = sorted(info.get(key) or [])
        if keys:
            problems.append(f"{label}: {_preview(keys)}")
    mism = [
        f"{m[0]} (checkpoint {tuple(m[1])} vs model {tuple(m[2])})" for m in info.get("mismatched_keys") or []
    ]
    if mism:
        problems.append(f"shape mismatch: {_preview(mism)}")
    if problems:
        raise WeightsError(
            f"checkpoint {path} does not match {spec.name} ({spec.arch}): " + "; ".join(problems)
        )


def build(spec: EncoderSpec, source: WeightSource, overrides: dict[str, Any] | None) -> Encoder:
    import transformers

    arch_over, input_px = split_tiny(overrides, spec)
    model_name, config_name = _CLASSES[spec.arch]
    model_cls = getattr(transformers, model_name)
    config_cls = getattr(transformers, config_name)
    weights_id = "none"
    if source.kind == "none":
        config = config_cls(**_deep_update(spec.arch_kwargs, arch_over))
        model = model_cls(config, **_MODEL_KW.get(spec.arch, {}))
    else:
        cfg, path, weights_id = locate(spec, source)
        if not cfg:
            raise WeightsError(f"{spec.name}: no config.json next to {path} (HF transformers layout needed)")
        config = config_cls.from_dict(_deep_update(cfg, arch_over))
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            model, info = model_cls.from_pretrained(
                str(path.parent),
                config=config,
                output_loading_info=True,
                local_files_only=True,
                ignore_mismatched_sizes=True,
                **_MODEL_KW.get(spec.arch, {}),  # so mismatches are reported (then raised below), not logged
            )
        except (RuntimeError, ValueError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(f"checkpoint {path} does not load into {spec.name}: {first}") from None
        finally:
            transformers.logging.set_verbosity(verbosity)
        _check_report(info, spec, path)
    model.eval()
    if spec.token == "projected":
        dim = config.projection_dim
    else:
        dim = config.hidden_size * (2 if spec.token == "cls+meanpatch" else 1)
    return Encoder(spec, HFPool(model, spec.token), dim=dim, weights_id=weights_id, input_px=input_px)
