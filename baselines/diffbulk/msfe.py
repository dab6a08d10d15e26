"""MSFE-Net: a light adapter turning frozen U-Net activations at several scales into z_diff.

Facts from the authors' code (Downstream/model.py `FeatureFusionBlock`, utils.py `extract_features`):
per tapped activation Conv2d 3x3 (padding 1, with bias) C_s -> 128, GroupNorm(32, 128), SiLU, global
average pool, then Dropout(0.1) on the pooled 128-d vector; the four vectors are concatenated in the
order 28, 56, 112, 224 (channels 512, 384, 256, 128) -> z_diff of 512. The taps are the LAST decoder
block of each level (`dec['{r}x{r}_block3']`: the decoder has num_blocks + 1 = 4 blocks per level).
(The code also computes an upsampled 28 -> 56 map it never uses; omitted.)

The code only supports the decoder taps. For the paper's encoder / all-layer ablation (Table V) we
choose: encoder = the last encoder block of each level (`enc['{r}x{r}_block2']`, same channels);
all = encoder + decoder taps (8 scales -> 1024), as the EDM2 U-Net's feature taps define them. We keep 128 per scale, so "all" gives 1024; the
default gated fusion already projects z_diff with a Linear (code form), which absorbs the width, and
fusions that need z_diff to match z_fm exactly (add, film, gated without projection) can ask
MSFE-Net for `proj_dim=512` (one extra Linear 1024 -> 512). Tap names ("dec28", "enc224", ...) are
those of the U-Net's feature extractor; build MSFE-Net from `unet.feature_channels(layers)` or
`tap_channels(layers)` (identical).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from stbench.errors import UnknownNameError

LAYERS = ("decoder", "encoder", "all")
PAPER_CHANNELS = (128, 256, 384, 512)  # model_channels 128 x channel_mult (1, 2, 3, 4)


def tap_channels(
    layers: str = "decoder", channels: Sequence[int] = PAPER_CHANNELS, img_resolution: int = 224
) -> dict[str, int]:
    """{tap name: channels}; the same names and order as the EDM2 U-Net's `feature_channels(layers)`
    (baselines/diffbulk/edm2/unet.py): decoder lowest resolution first (the code's concatenation
    order), encoder in encoder order, all = encoder then decoder.

    Paper setting: {"dec28": 512, "dec56": 384, "dec112": 256, "dec224": 128}.
    """
    if layers not in LAYERS:
        raise UnknownNameError("MSFE layers", layers, list(LAYERS))
    levels = list(enumerate(channels))
    enc = {f"enc{img_resolution >> lv}": c for lv, c in levels}
    dec = {f"dec{img_resolution >> lv}": c for lv, c in reversed(levels)}
    if layers == "decoder":
        return dec
    if layers == "encoder":
        return enc
    return {**enc, **dec}


class ScaleBranch(nn.Module):
    """Conv3x3 -> GroupNorm -> SiLU -> global average pool -> dropout: (B, C, H, W) -> (B, width)."""

    def __init__(self, in_channels: int, width: int = 128, groups: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        if width % groups:
            raise ValueError(f"MSFE width {width} must be divisible by GroupNorm groups {groups}")
        self.conv = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(groups, width)
        self.act = nn.SiLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.norm(self.conv(x))).mean(dim=(2, 3)))


class MSFENet(nn.Module):
    """One ScaleBranch per tap, concatenated in `channels` order (optionally projected).

    forward takes {tap name: (B, C_s, H_s, W_s)} (extra keys ignored) or a sequence in `channels`
    order; returns (B, out_dim), out_dim = width x n_taps, or `proj_dim` if given.
    """

    def __init__(
        self,
        channels: Mapping[str, int],
        width: int = 128,
        groups: int = 32,
        dropout: float = 0.1,
        proj_dim: int | None = None,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("MSFE-Net needs at least one tapped scale")
        self.names = list(channels)
        # ModuleDict keys may not contain "."; branches are stored by position, mapped by self.names.
        self.branches = nn.ModuleList(ScaleBranch(c, width, groups, dropout) for c in channels.values())
        self.channels = dict(channels)
        concat = width * len(self.names)
        self.proj: nn.Module = nn.Identity() if proj_dim is None else nn.Linear(concat, proj_dim)
        self.out_dim = concat if proj_dim is None else proj_dim

    def forward(self, features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(features, Mapping):
            missing = [n for n in self.names if n not in features]
            if missing:
                raise KeyError(f"MSFE-Net: missing tapped features {missing}; got {sorted(features)}")
            maps = [features[n] for n in self.names]
        else:
            maps = list(features)
            if len(maps) != len(self.names):
                raise ValueError(f"MSFE-Net expects {len(self.names)} feature maps, got {len(maps)}")
        for name, fmap in zip(self.names, maps, strict=True):
            if fmap.ndim != 4 or fmap.shape[1] != self.channels[name]:
                raise ValueError(
                    f"tap {name}: expected (B, {self.channels[name]}, H, W), got {tuple(fmap.shape)}"
                )
        z = torch.cat([branch(f) for branch, f in zip(self.branches, maps, strict=True)], dim=1)
        return self.proj(z)
