"""Frozen image encoders (pathology foundation models and ImageNet CNNs) with real weight loaders."""

from stbench.encoders.base import Encoder
from stbench.encoders.registry import ENCODERS, build_encoder, check_encoder, get_spec, list_encoders
from stbench.encoders.spec import EncoderSpec
from stbench.encoders.weights import WeightsError

__all__ = [
    "ENCODERS",
    "Encoder",
    "EncoderSpec",
    "WeightsError",
    "build_encoder",
    "check_encoder",
    "get_spec",
    "list_encoders",
]
