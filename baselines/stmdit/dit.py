"""STMDiT's denoiser: a PixArt-Sigma / PixCell DiT on 2x2 latent patches with UNI2-h cross-attention and
optional gene-expression (GE) conditioning (AdaLN fusion or per-block GE cross-attention).

Why one module for every family: PixCell-B, PixCell-Flow-B, PixCell-Pretrained-XL and all STMDiT GE
variants share the backbone; `ge=None` IS the no-GE PixCell, and with GE the new parts start at zero
(AdaLN gate 0, zero-initialised GE cross-attention output) so a GE model starts as that PixCell.

Per-sample dropping (classifier-free guidance): `uni_keep` / `ge_keep` (B,) bool select the learned
null token per sample, so the three guided passes of dual CFG can be stacked into one batch and give
the same numbers as three separate forwards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from baselines.stmdit.dit_blocks import (
    CaptionEmbedder,
    DiTBlock,
    FinalLayer,
    PatchEmbed,
    TimestepEmbedder,
    sincos_2d,
)
from baselines.stmdit.ge_conditioning import GEConditioning, GEConfig


@dataclass(frozen=True)
class DiTConfig:
    """Backbone sizes. `sample_size` is the latent side the positional grid is based on (256 px tiles
    -> 32 latents); `interpolation` is PixArt's pe_interpolation (PixCell-256 trains with 0.5)."""

    hidden: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    patch: int = 2
    in_channels: int = 16
    learn_sigma: bool = True
    uni_dim: int = 1536
    uni_tokens: int = 1
    sample_size: int = 32
    interpolation: float = 0.5
    learn_null: bool = True

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.hidden % 4:
            raise ValueError(f"hidden {self.hidden} must be divisible by 4 (2-D sin-cos positions)")
        if self.sample_size % self.patch:
            raise ValueError(f"sample_size {self.sample_size} is not a multiple of patch {self.patch}")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def base_size(self) -> int:
        return self.sample_size // self.patch

    def replace(self, **changes: Any) -> DiTConfig:
        return dataclasses.replace(self, **changes)


SIZES: dict[str, DiTConfig] = {
    "B": DiTConfig(hidden=768, depth=12, heads=12),
    "XL": DiTConfig(hidden=1152, depth=28, heads=16),
    "tiny": DiTConfig(hidden=64, depth=2, heads=4, sample_size=8),
}


def backbone_param_count(cfg: DiTConfig) -> int:
    """Closed-form parameter count of the no-GE backbone (null token included when learned).

    Per block 16 D^2 + 19 D (qkv 3D^2+3D, proj D^2+D, cross q D^2+D, kv 2D^2+2D, proj D^2+D, MLP
    2*r*D^2 + r*D + D with r = 4, table 6D); once: patch conv C p^2 D + D, timestep MLP 256 D + D^2 + 2D,
    t_block 6D^2 + 6D, caption MLP C_uni D + D^2 + 2D, final table 2D and Linear p^2 C_out (D + 1).
    """
    d, r, p = cfg.hidden, cfg.mlp_ratio, cfg.patch
    hid = int(d * r)
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * d + d) + (2 * d * d + 2 * d) + (d * d + d)
    block += (d * hid + hid) + (hid * d + d) + 6 * d
    once = cfg.in_channels * p * p * d + d  # patch embedding
    once += 256 * d + d + d * d + d  # timestep embedder
    once += 6 * d * d + 6 * d  # t_block
    once += cfg.uni_dim * d + d + d * d + d  # caption MLP
    once += 2 * d + d * p * p * cfg.out_channels + p * p * cfg.out_channels  # final layer
    null = cfg.uni_tokens * cfg.uni_dim if cfg.learn_null else 0
    return cfg.depth * block + once + null


def _as_keep(keep: torch.Tensor | None, b: int, device: torch.device, name: str) -> torch.Tensor | None:
    if keep is None:
        return None
    keep = torch.as_tensor(keep, device=device).bool().reshape(-1)
    if keep.numel() != b:
        raise ValueError(f"{name} has {keep.numel()} entries for a batch of {b}")
    return keep


class STMDiT(nn.Module):
    """forward(x, t, uni, ge_tokens, ge_vec, uni_keep, ge_keep) -> (B, out_channels, h, w).

    x: noisy latents (B, C, h, w) with h, w multiples of the patch; t: (B,) timesteps (fractional ok).
    uni: (B, uni_dim) or (B, uni_tokens, uni_dim), or None = every sample unconditional.
    ge_tokens: (B, n, ge_dim) per-gene CancerFoundation tokens (XAttn fusions), ge_vec: (B, ge_dim) cell
    embedding (AdaLN fusion); None = GE dropped for every sample. uni_keep / ge_keep: (B,) bool, False
    = use the null token for that sample (None = keep all given inputs). ge_mask: optional (B, n) bool
    valid gene tokens (padding False). Channels [:C] are eps / velocity, [C:] the variance (learn_sigma).
    """

    weights_id: str = "none"  # set by loaders ("hf:...@rev" / "local:...@sha")
    grad_checkpointing: bool = False  # recompute blocks in backward (PixCell trains with it on)

    def __init__(self, cfg: DiTConfig, ge: GEConfig | None = None, size: str = "custom") -> None:
        super().__init__()
        self.cfg, self.size = cfg, size
        self.ge_cfg = ge if ge is not None and ge.fusion != "none" else None
        d = cfg.hidden
        xattn = self.ge_cfg is not None and self.ge_cfg.fusion == "xattn"
        self.x_embedder = PatchEmbed(cfg.in_channels, d, cfg.patch)
        self.t_embedder = TimestepEmbedder(d)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.y_embedder = CaptionEmbedder(cfg.uni_dim, d, cfg.uni_tokens, learn_null=cfg.learn_null)
        self.blocks = nn.ModuleList(
            DiTBlock(d, cfg.heads, cfg.mlp_ratio, ge_cross_attn=xattn) for _ in range(cfg.depth)
        )
        self.final_layer = FinalLayer(d, cfg.patch, cfg.out_channels)
        self.ge = GEConditioning(self.ge_cfg, d, cfg.heads) if self.ge_cfg is not None else None
        grid = cfg.base_size
        self.register_buffer(
            "pos_embed", sincos_2d(d, grid, grid, cfg.base_size, cfg.interpolation)[None], persistent=False
        )
        self.initialize_weights()

    # ------------------------------------------------------------------ init

    def initialize_weights(self) -> None:
        """PixArt's init: xavier-uniform Linears with zero bias, patch conv like a Linear, N(0, 0.02) for
        the timestep MLP, t_block and caption MLP, zero cross-attention output and final Linear."""

        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        backbone = [
            self.x_embedder,
            self.t_embedder,
            self.t_block,
            self.y_embedder,
            self.blocks,
            self.final_layer,
        ]
        for part in backbone:
            part.apply(basic)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for block in self.blocks:
            for xa in (block.cross_attn, block.ge_cross_attn):
                if xa is not None:
                    nn.init.zeros_(xa.proj.weight)
                    nn.init.zeros_(xa.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.ge is not None:
            self.ge.reset_parameters()

    # ------------------------------------------------------------------ helpers

    def backbone_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the PixCell backbone (everything but the GE conditioning)."""
        return [
            (n, p)
            for n, p in self.named_parameters()
            if not n.startswith("ge.") and ".ge_cross_attn." not in n
        ]

    def positions(self, gh: int, gw: int, device: torch.device) -> torch.Tensor:
        if (gh, gw) == (self.cfg.base_size,) * 2:
            return self.pos_embed
        table = sincos_2d(self.cfg.hidden, gh, gw, self.cfg.base_size, self.cfg.interpolation)
        return table[None].to(device)

    def unpatchify(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        p, c = self.cfg.patch, self.cfg.out_channels
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    def _uni_input(self, uni: torch.Tensor | None, keep: torch.Tensor | None, b: int) -> torch.Tensor | None:
        if uni is None:
            if keep is not None and bool(keep.any()):
                raise ValueError("uni_keep is True for some samples but uni is None")
            return None
        if uni.dim() == 2:
            uni = uni.unsqueeze(1)
        want = (b, self.cfg.uni_tokens, self.cfg.uni_dim)
        if tuple(uni.shape) != want:
            raise ValueError(
                f"uni has shape {tuple(uni.shape)}, expected {want} (or {(b, self.cfg.uni_dim)})"
            )
        return uni

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        uni: torch.Tensor | None = None,
        ge_tokens: torch.Tensor | None = None,
        ge_vec: torch.Tensor | None = None,
        uni_keep: torch.Tensor | None = None,
        ge_keep: torch.Tensor | None = None,
        ge_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.cfg.patch
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not a multiple of the patch {p}")
        gh, gw = h // p, w // p
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.dim() == 0 else t.reshape(-1)
        uni_keep = _as_keep(uni_keep, b, x.device, "uni_keep")
        ge_keep = _as_keep(ge_keep, b, x.device, "ge_keep")

        tokens = self.x_embedder(x) + self.positions(gh, gw, x.device).to(x.dtype)
        temb = self.t_embedder(t)
        ge_seq = ge_seq_mask = None
        if self.ge is not None:
            temb, ge_seq, ge_seq_mask = self.ge(temb, ge_tokens, ge_vec, ge_keep, ge_mask, b)
        elif ge_tokens is not None or ge_vec is not None or ge_keep is not None:
            raise ValueError("GE inputs were given to a model built without GE conditioning (ge=None)")
        t6 = self.t_block(temb)
        y = self.y_embedder(self._uni_input(uni, uni_keep, b), uni_keep, b)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, y, t6, ge_seq, ge_seq_mask, use_reentrant=False)
            else:
                tokens = block(tokens, y, t6, ge_seq, ge_seq_mask)
        return self.unpatchify(self.final_layer(tokens, temb), gh, gw)


def build_dit(size: str = "B", ge: GEConfig | dict[str, Any] | None = None, **overrides: Any) -> STMDiT:
    """A random-init STMDiT of a named size ("B", "XL", "tiny"); overrides change DiTConfig fields."""
    if size not in SIZES:
        from stbench.errors import UnknownNameError

        raise UnknownNameError("STMDiT size", size, list(SIZES))
    ge_cfg = GEConfig(**ge) if isinstance(ge, dict) else ge
    return STMDiT(SIZES[size].replace(**overrides), ge=ge_cfg, size=size)
