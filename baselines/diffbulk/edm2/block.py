"""EDM2 U-Net block (EDM2 Fig. 21): the one building block of both the encoder and the decoder.

Why this shape: the main path is only resampled / projected / pixel-normalised, the residual branch
is two MP 3x3 convolutions around an embedding modulation y * (1 + gain * Linear(emb)) whose gain
starts at 0 (so at init no block depends on the noise level or the gene condition), and the two are
blended with mp_sum(t=0.3); an optional multi-head self-attention with cosine (pixel-normalised) q/k
is blended the same way. Activations are clipped at +-256 as in EDM2 (an fp16 safety net).

Encoder flavour ('enc'): resample -> 1x1 skip projection if the width changes -> pixel norm, and the
residual branch starts from that normalised tensor. Decoder flavour ('dec'): the residual branch
starts from the (concatenated) input and the 1x1 projection is applied to the main path afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .mp import MPConv, mp_silu, mp_sum, normalize, pixel_norm, resample


class Block(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        resample_filter: Sequence[float] = (1.0, 1.0),
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256.0,
    ) -> None:
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"block flavor must be 'enc' or 'dec', got {flavor!r}")
        if attention and out_channels % channels_per_head:
            raise ValueError(
                f"{out_channels} channels are not divisible by channels_per_head {channels_per_head}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.flavor, self.resample_mode, self.resample_filter = flavor, resample_mode, tuple(resample_filter)
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = (
            dropout,
            res_balance,
            attn_balance,
            clip_act,
        )
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, ())
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode, self.resample_filter)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = pixel_norm(x)

        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            x = mp_sum(x, self._attention(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over pixels; q, k, v are pixel-normalised per head (cosine
        attention), which bounds the logits without a learned temperature."""
        n, c, h, w = x.shape
        qkv = self.attn_qkv(x).reshape(n, self.num_heads, c // self.num_heads, 3, h * w)
        q, k, v = normalize(qkv, dim=2).unbind(3)  # each (n, heads, c_head, hw)
        logits = torch.matmul(q.transpose(-1, -2), k) / math.sqrt(q.shape[2])  # (n, heads, hw_q, hw_k)
        y = torch.matmul(v, logits.softmax(dim=-1).transpose(-1, -2))  # (n, heads, c_head, hw_q)
        return self.attn_proj(y.reshape(n, c, h, w))
