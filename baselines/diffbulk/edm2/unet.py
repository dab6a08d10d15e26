"""EDM2 magnitude-preserving U-Net as DiffBulk configures it (iMVR-PL/DiffBulk, preset gene-img224-xs).

Layout (facts checked against NVlabs/edm2 `training/networks_edm2.py` and the DiffBulk copy of it):
- input = image (3 ch, scaled by c_in) + a constant ones channel (4 ch): the ones channel stands in
  for the biases MP layers do not have;
- encoder, per level (resolution res = img_resolution / 2^level, width channels[level]): level 0 opens
  with a 3x3 MPConv, deeper levels with a 'down' Block; then `num_blocks` encoder Blocks. Every
  encoder output is kept as a skip (1 + num_blocks at level 0, 1 + num_blocks at the others);
- decoder, from the lowest resolution up: at the lowest level two Blocks 'in0' (always with
  attention) and 'in1', elsewhere an 'up' Block; then `num_blocks + 1` Blocks, each fed
  mp_cat(main, skip.pop(), t=0.5). With num_blocks = 3 that is 3 encoder blocks and 4 decoder
  blocks per level, and all 16 skips are consumed;
- self-attention only at `attn_resolutions` (DiffBulk: 28, the lowest; 64 channels per head) plus
  the decoder's in0 block;
- embedding: MPFourier(c_noise) -> MPConv -> emb (width max(channels) = 512); the condition (the
  gene encoder's output vector, 256-d in DiffBulk) -> MPConv -> emb, merged with
  mp_sum(noise, cond, t=0.5); then mp_silu;
- output: 3x3 MPConv to img_channels with a learnable gain initialised to 0, so the untrained
  network outputs exactly 0 and the preconditioned denoiser starts as D = c_skip * x.

Unconditional inputs: DiffBulk's code uses the noise embedding alone when the gene condition is
dropped (PMS) or absent (stage II), which is the default here (`uncond="noise"`). EDM2's own
class-conditional code instead feeds a zero label vector, i.e. mp_sum(noise, 0) = noise / sqrt(2)
(`uncond="zeros"`). Per-sample PMS is supported through `cond_mask` (True = keep the condition).

Feature taps (stage II): `taps="decoder"` returns the output of the LAST decoder block at each
resolution (keys f"dec{res}", lowest resolution first: dec28, dec56, dec112, dec224 with
512/384/256/128 channels in the paper config, the authors' '28x28_block3' ... '224x224_block3'),
`"encoder"` the last encoder block per resolution (f"enc{res}", 224 first), `"all"` both.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .block import Block
from .mp import MPConv, MPFourier, mp_cat, mp_silu, mp_sum

# Paper configuration (DiffBulk preset gene-img224-xs: model_channels 128 x channel_mult 1/2/3/4).
PAPER_UNET: dict = {
    "img_resolution": 224,
    "img_channels": 3,
    "channels": (128, 256, 384, 512),
    "num_blocks": 3,
    "attn_resolutions": (28,),
    "cond_dim": 256,
    "channels_per_head": 64,
    "dropout": 0.0,
}

# CPU-test configuration: same topology, two levels, one block per level.
TINY_UNET: dict = {
    "img_resolution": 32,
    "img_channels": 3,
    "channels": (16, 32),
    "num_blocks": 1,
    "attn_resolutions": (16,),
    "cond_dim": 8,
    "channels_per_head": 16,
    "dropout": 0.0,
}

TAPS = ("decoder", "encoder", "all")


def tap_channels(img_resolution: int, channels: Sequence[int], taps: str) -> dict[str, int]:
    """{feature name: channels} for a tap selection, from the configuration alone (no network needed):
    the last block of a level always has that level's width."""
    if taps not in TAPS:
        raise ValueError(f"taps must be one of {TAPS} or None, got {taps!r}")
    levels = list(enumerate(channels))
    enc = {f"enc{img_resolution >> lv}": ch for lv, ch in levels}
    dec = {f"dec{img_resolution >> lv}": ch for lv, ch in reversed(levels)}
    return {"encoder": enc, "decoder": dec, "all": {**enc, **dec}}[taps]


class UNet(nn.Module):
    def __init__(
        self,
        img_resolution: int = 224,
        img_channels: int = 3,
        channels: Sequence[int] = (128, 256, 384, 512),
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (28,),
        cond_dim: int = 256,
        noise_channels: int | None = None,
        emb_channels: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        uncond: str = "noise",
        **block_kwargs: object,
    ) -> None:
        super().__init__()
        if img_resolution % (1 << (len(channels) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channels) - 1}")
        if num_blocks < 1:
            raise ValueError(
                f"num_blocks must be >= 1 (the feature taps are the last block of a level), got {num_blocks}"
            )
        if uncond not in ("noise", "zeros"):
            raise ValueError(f"uncond must be 'noise' or 'zeros', got {uncond!r}")
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.channels, self.num_blocks = tuple(channels), num_blocks
        self.cond_dim, self.uncond = cond_dim, uncond
        self.label_balance, self.concat_balance = label_balance, concat_balance
        cnoise = noise_channels or channels[0]
        cemb = emb_channels or max(channels)
        blk = dict(channels_per_head=channels_per_head, dropout=dropout, **block_kwargs)

        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, ())
        self.emb_cond = MPConv(cond_dim, cemb, ()) if cond_dim else None

        self.enc = nn.ModuleDict()
        cout = img_channels + 1
        for level, width in enumerate(channels):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, width, (3, 3))
                cout = width
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, "enc", resample_mode="down", **blk)
            for idx in range(num_blocks):
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = Block(cout, width, cemb, "enc", attention=attn, **blk)
                cout = width

        self.dec = nn.ModuleDict()
        skips = [b.out_channels for b in self.enc.values()]
        for level, width in reversed(list(enumerate(channels))):
            res = img_resolution >> level
            if level == len(channels) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, "dec", attention=True, **blk)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, "dec", **blk)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, "dec", resample_mode="up", **blk)
            for idx in range(num_blocks + 1):
                attn = res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = Block(
                    cout + skips.pop(), width, cemb, "dec", attention=attn, **blk
                )
                cout = width
        self.out_conv = MPConv(cout, img_channels, (3, 3))

        last_enc, last_dec = f"_block{num_blocks - 1}", f"_block{num_blocks}"
        self._tap_names = {
            **{f"{r}x{r}{last_enc}": ("encoder", f"enc{r}") for r in self._resolutions()},
            **{f"{r}x{r}{last_dec}": ("decoder", f"dec{r}") for r in self._resolutions()},
        }

    def _resolutions(self) -> list[int]:
        return [self.img_resolution >> lv for lv in range(len(self.channels))]

    def feature_channels(self, taps: str) -> dict[str, int]:
        """{feature name: channels} of `forward(..., taps=taps)`'s features, in the same order."""
        return tap_channels(self.img_resolution, self.channels, taps)

    def embed(
        self, noise_labels: torch.Tensor, cond: torch.Tensor | None, cond_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Pre-activation embedding: noise alone, or mp_sum(noise, cond) where the condition is kept."""
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if cond is None and self.uncond == "zeros" and self.emb_cond is not None:
            cond = torch.zeros(emb.shape[0], self.cond_dim, device=emb.device, dtype=emb.dtype)
        if cond is None:
            return emb
        if self.emb_cond is None:
            raise ValueError("this UNet was built with cond_dim=0 and cannot take a condition")
        mixed = mp_sum(emb, self.emb_cond(cond.to(emb.dtype)), t=self.label_balance)
        if cond_mask is None:
            return mixed
        dropped = self.embed(noise_labels, None, None)
        return torch.where(cond_mask.reshape(-1, 1).to(torch.bool), mixed, dropped)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        cond: torch.Tensor | None = None,
        taps: str | None = None,
        cond_mask: torch.Tensor | None = None,
        authors_quirks: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, OrderedDict[str, torch.Tensor]]:
        """x (N, C, H, W) already scaled by c_in; noise_labels (N,) = c_noise; cond (N, cond_dim) or None.

        Returns the raw network output F (N, C, H, W) or, with `taps`, (F, features).
        `authors_quirks=True` reproduces DiffBulk's stage II extractor (Downstream/utils.py,
        extract_features), which differs from the trained forward: skips are joined with plain
        torch.cat instead of mp_cat, and the unconditional embedding is used without mp_silu.
        """
        if taps is not None and taps not in TAPS:
            raise ValueError(f"taps must be one of {TAPS} or None, got {taps!r}")
        if authors_quirks and cond is not None:
            raise ValueError("authors_quirks reproduces the unconditional stage II extractor; pass cond=None")
        emb = self.embed(noise_labels, cond, cond_mask)
        if not authors_quirks:
            emb = mp_silu(emb)
        feats: OrderedDict[str, torch.Tensor] = OrderedDict()

        h = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            h = block(h) if name.endswith("_conv") else block(h, emb)
            skips.append(h)
            self._record(feats, name, h, taps)
        for name, block in self.dec.items():
            if "_block" in name:
                skip = skips.pop()
                h = torch.cat([h, skip], dim=1) if authors_quirks else mp_cat(h, skip, t=self.concat_balance)
            h = block(h, emb)
            self._record(feats, name, h, taps)
        out = self.out_conv(h, gain=self.out_gain)
        return out if taps is None else (out, feats)

    def _record(
        self, feats: OrderedDict[str, torch.Tensor], name: str, h: torch.Tensor, taps: str | None
    ) -> None:
        hit = self._tap_names.get(name)
        if hit is not None and taps in (hit[0], "all"):
            feats[hit[1]] = h
