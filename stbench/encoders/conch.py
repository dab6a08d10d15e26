"""CONCH vision tower (CoCa, ViT-B/16 at 448 px) rebuilt from timm + torch blocks, key-compatible.

The official `conch` package is not on PyPI. Its checkpoint (MahmoodLab/conch, pytorch_model.bin)
holds the whole CoCa model; the image side lives under `visual.`: `trunk.*` (a timm
VisionTransformer, width 768, depth 12, heads 12, patch 16, img 448, num_classes 0, used through
forward_features), `attn_pool_contrast` (1 learned query, d_model 512, context 768, 8 heads:
`query`, `attn` = nn.MultiheadAttention(kdim=vdim=768), `ln_q`, `ln_k`), `ln_contrast`,
`proj_contrast` (512x512), `attn_pool_caption` (256 queries, d_model 768) and `ln_caption`.
HINGE's embedding is `encode_image(proj_contrast=False, normalize=False)`: attentional pool ->
ln_contrast -> 512-d, i.e. WITHOUT the contrastive projection. Text-tower keys (`text.`,
`text_decoder.`, `logit_scale`) are dropped by prefix; every `visual.` key is loaded strictly.
"""

from __future__ import annotations

from typing import Any

import torch

from stbench.encoders.base import Encoder, locate, split_tiny
from stbench.encoders.spec import EncoderSpec
from stbench.encoders.weights import WeightsError, WeightSource, load_state_dict, strict_load


class AttentionalPool(torch.nn.Module):
    """Learned queries cross-attending to LayerNorm'd tokens (CoCa's attentional pooler)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = torch.nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = torch.nn.MultiheadAttention(
            d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True
        )
        self.ln_q = torch.nn.LayerNorm(d_model)
        self.ln_k = torch.nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, k, k, need_weights=False)[0]


class ConchVisual(torch.nn.Module):
    """Same submodule names as the checkpoint's `visual.` subtree."""

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        num_heads: int,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        embed_dim_caption: int,
        pool_heads: int,
        n_queries_caption: int,
    ) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=width,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4.0,
            num_classes=0,
            dynamic_img_size=True,
        )
        self.attn_pool_contrast = AttentionalPool(embed_dim, width, pool_heads, 1)
        self.ln_contrast = torch.nn.LayerNorm(embed_dim)
        self.proj_contrast = torch.nn.Parameter(torch.zeros(embed_dim, embed_dim))
        self.attn_pool_caption = AttentionalPool(embed_dim_caption, width, pool_heads, n_queries_caption)
        self.ln_caption = torch.nn.LayerNorm(embed_dim_caption)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The 512-d image embedding without the contrastive projection (HINGE's choice)."""
        tokens = self.trunk.forward_features(x)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


def build(spec: EncoderSpec, source: WeightSource, overrides: dict[str, Any] | None) -> Encoder:
    arch_over, input_px = split_tiny(overrides, spec)
    kwargs = {**spec.arch_kwargs, **arch_over}
    net = ConchVisual(**kwargs)
    weights_id = "none"
    if source.kind != "none":
        _, path, weights_id = locate(spec, source)
        state = load_state_dict(path)
        visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
        if not visual:
            raise WeightsError(f"checkpoint {path} has no 'visual.' keys: not a CONCH (CoCa) checkpoint")
        strict_load(net, visual, what=f"{spec.name} vision tower (visual.*)")
    net.eval()
    return Encoder(spec, net, dim=kwargs["embed_dim"], weights_id=weights_id, input_px=input_px)
