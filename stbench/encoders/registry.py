"""Encoder registry: look up specs, build encoders with resolved weights, and check them."""

from __future__ import annotations

import time
from typing import Any

import torch

from stbench.encoders import conch, hf_transformers, resnet_trunc, timm_vit, torchvision_cnn
from stbench.encoders.base import Encoder
from stbench.encoders.spec import EncoderSpec
from stbench.encoders.specs import SPECS
from stbench.encoders.weights import WeightsError, parse_weights
from stbench.errors import UnknownNameError

ENCODERS: dict[str, EncoderSpec] = {s.name: s for s in SPECS}
_BUILDERS = {
    "timm-vit": timm_vit.build,
    "conch": conch.build,
    "hf-transformers": hf_transformers.build,
    "timm-resnet-trunc": resnet_trunc.build,
    "torchvision": torchvision_cnn.build,
}


def get_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise UnknownNameError("encoder", name, list(ENCODERS))
    return ENCODERS[name]


def list_encoders() -> list[EncoderSpec]:
    return list(ENCODERS.values())


def build_encoder(
    name: str, weights: str = "default", *, arch_overrides: dict[str, Any] | None = None
) -> Encoder:
    """Build encoder `name` with weights "default" (official source), "none" (random init), a local
    path (file or dir) or a hub id. `arch_overrides` shrinks size knobs (tests use spec.tiny)."""
    spec = get_spec(name)
    kind = "torchvision" if spec.source == "torchvision" else "hub"
    source = parse_weights(weights, spec.hub_id, default_kind=kind)
    if source.kind == "none":
        # Random init is seeded, so "none" means one reproducible model: its cached features can be
        # reused across runs, and two "none" rows of a table describe the same encoder.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            encoder = _BUILDERS[spec.family](spec, source, arch_overrides)
    else:
        encoder = _BUILDERS[spec.family](spec, source, arch_overrides)
    if arch_overrides is None and encoder.dim != spec.dim:
        raise WeightsError(f"encoder {name!r} produced {encoder.dim}-d features, expected {spec.dim}")
    return encoder.eval()


def check_encoder(name: str, weights: str = "default") -> dict[str, Any]:
    """Resolve + load the weights, run one patch through; for `stbench encoders check`."""
    start = time.perf_counter()
    encoder = build_encoder(name, weights)
    px = encoder.input_px
    with torch.inference_mode():
        out = encoder(torch.full((1, 3, px, px), 0.5))
    return {
        "name": name,
        "dim": int(out.shape[1]),
        "expected_dim": encoder.spec.dim,
        "weights_id": encoder.weights_id,
        "input_px": px,
        "finite": bool(torch.isfinite(out).all()),
        "seconds": round(time.perf_counter() - start, 3),
    }
