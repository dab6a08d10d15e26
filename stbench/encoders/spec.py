"""What an encoder is: one frozen record of architecture, preprocessing, output and provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class EncoderSpec:
    """Facts about one encoder, taken from its model card / authors' code.

    `arch_kwargs` are the constructor arguments of the full model (as the card passes them);
    `tiny` overrides only the size knobs (depth, width, heads, image size) so tests build a small
    model through exactly the same constructor and loading code.
    """

    name: str
    family: str  # builder module: "timm-vit", "conch", "hf-transformers", "timm-resnet-trunc", "torchvision"
    arch: str
    dim: int
    source: str  # "timm-hub" | "hf-transformers" | "torchvision" | "conch"
    hub_id: str | None
    input_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mpp: float | None
    token: str  # "cls" | "cls+meanpatch" | "pooled" | "attn-pool" | "projected"
    precision: str
    licence: str
    gated: bool
    url: str
    arch_kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    tiny: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    resize: str = "bicubic"
    notes: str = ""

    @property
    def access(self) -> str:
        """How a user obtains the weights (shown in errors and docs)."""
        if self.source == "torchvision":
            return "downloaded by torchvision from download.pytorch.org (or pass a local state-dict file)"
        how = f"https://huggingface.co/{self.hub_id}"
        if self.gated:
            return (
                f"request access at {how}, then `huggingface-cli login` or export HF_TOKEN "
                "(or pass a local copy with --weights PATH)"
            )
        return f"public at {how} (or pass a local copy with --weights PATH)"
