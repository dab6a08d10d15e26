"""STMDiT's two gene-expression (GE) fusions (paper Sec. 2.1 and Fig. 2), written from the paper.

(a) AdaLN: the CancerFoundation cell embedding g (B, ge_dim) is projected to the timestep-embedding
    width by a Linear and added to the timestep embedding through a learnable gate:
    t' = t + gate * Linear(g). t' then drives PixArt's single adaLN head (t_block) and the final
    layer, so every block is modulated by the fused signal ("a single AdaLN head modulates every layer
    on the fused signal"). The paper does not state the gate's shape or init; we use one scalar
    initialised to 0 (`gate_init`), so an untrained AdaLN model is exactly the no-GE PixCell.
(b) XAttn: the per-gene CancerFoundation tokens (B, n, ge_dim) are projected to the DiT width by a
    caption-style MLP (Linear -> GELU(tanh) -> Linear) and turned into K tokens by a token source;
    every DiT block attends to them with a second cross-attention placed after the UNI cross-attention
    (Fig. 2c draws it as an added cross-attention; the order is our choice), output projection
    zero-initialised. Token sources:
    - direct: the projected tokens themselves (~1,200 = <cls> + 1,199 genes with CancerFoundation);
    - pma: pooling by multi-head attention (Set Transformer, Lee et al. 2019): K = 32 learned seeds S,
      PMA(Z) = MAB(S, rFF(Z)), MAB(X, Y) = LN(H + rFF(H)), H = LN(X + MHA(X, Y, Y));
    - perceiver: K = 32 learned latents refined `perceiver_iters` times by [cross-attention to the
      genes + latent self-attention], pre-LN with MLPs, separate weights per iteration (Jaegle et al.);
    - gsa: the paper says only "self-attention over gene tokens (K = 32)". We prepend K = 32 learned
      summary tokens to the gene tokens, run `gsa_layers` pre-LN self-attention blocks over the joint
      sequence (genes attend to genes, so gene-gene interactions are modelled) and keep the K summary
      outputs. (An alternative reading, gene self-attention followed by PMA pooling, is not built.)
    pma / perceiver / gsa are invariant to the order of the gene tokens; direct is equivariant.

Dropped GE (ge_keep False, or no GE input at all): AdaLN substitutes a learned null vector in the
input space (ge_dim) before the projection; XAttn lets the sample attend to one learned null token (in
the DiT width) instead of its GE tokens. The null token is prepended to every sample's key sequence and
masked, so batched per-sample dropping equals separate forwards exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from baselines.stmdit.dit_blocks import CrossAttention, Mlp

FUSIONS = ("none", "adaln", "xattn")
TOKEN_SOURCES = ("direct", "pma", "perceiver", "gsa")


@dataclass(frozen=True)
class GEConfig:
    """fusion: none | adaln | xattn; tokens: direct | pma | perceiver | gsa (xattn only)."""

    fusion: str = "adaln"
    tokens: str = "perceiver"
    ge_dim: int = 256
    k: int = 32
    perceiver_iters: int = 2
    gsa_layers: int = 2
    gate_init: float = 0.0

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"GE fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.fusion == "xattn" and self.tokens not in TOKEN_SOURCES:
            raise ValueError(f"GE token source must be one of {TOKEN_SOURCES}, got {self.tokens!r}")
        for name in ("ge_dim", "k", "perceiver_iters", "gsa_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"GEConfig.{name} must be >= 1, got {getattr(self, name)}")


def _check_dropped(keep: torch.Tensor | None) -> None:
    if keep is not None and bool(keep.any()):
        raise ValueError("ge_keep is True for some samples but no GE input was given")


def _xavier(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class PreLNBlock(nn.Module):
    """q = q + Attn(LN(q), LN(kv)); q = q + MLP(LN(q)). kv None = self-attention over q."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, cross: bool = False) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim) if cross else None
        self.attn = CrossAttention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self, q: torch.Tensor, kv: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        qn = self.norm_q(q)
        kvn = qn if kv is None or self.norm_kv is None else self.norm_kv(kv)
        q = q + self.attn(qn, kvn, mask)
        return q + self.mlp(self.norm_mlp(q))


class DirectTokens(nn.Module):
    """The projected gene tokens as they are (n tokens; order-equivariant)."""

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return z, mask


class PMATokens(nn.Module):
    """Pooling by multi-head attention with K learned seeds (post-LN MAB of the Set Transformer)."""

    def __init__(self, dim: int, heads: int, k: int) -> None:
        super().__init__()
        self.seeds = nn.Parameter(torch.zeros(k, dim))
        self.rff_in = Mlp(dim, dim)
        self.attn = CrossAttention(dim, heads)
        self.norm0 = nn.LayerNorm(dim)
        self.rff_out = Mlp(dim, dim)
        self.norm1 = nn.LayerNorm(dim)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        s = self.seeds.unsqueeze(0).expand(z.shape[0], -1, -1)
        h = self.norm0(s + self.attn(s, self.rff_in(z), mask))
        return self.norm1(h + self.rff_out(h)), None


class PerceiverTokens(nn.Module):
    """K learned latents; each iteration = cross-attention to the genes, then latent self-attention."""

    def __init__(self, dim: int, heads: int, k: int, iters: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(k, dim))
        self.cross = nn.ModuleList(PreLNBlock(dim, heads, cross=True) for _ in range(iters))
        self.latent = nn.ModuleList(PreLNBlock(dim, heads) for _ in range(iters))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        lat = self.latents.unsqueeze(0).expand(z.shape[0], -1, -1)
        for cross, latent in zip(self.cross, self.latent, strict=True):
            lat = latent(cross(lat, z, mask))
        return self.norm_out(lat), None


class GSATokens(nn.Module):
    """Joint self-attention over [K summary tokens; gene tokens]; the K summary outputs are kept."""

    def __init__(self, dim: int, heads: int, k: int, layers: int) -> None:
        super().__init__()
        self.k = k
        self.summary = nn.Parameter(torch.zeros(k, dim))
        self.layers = nn.ModuleList(PreLNBlock(dim, heads) for _ in range(layers))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        b = z.shape[0]
        x = torch.cat([self.summary.unsqueeze(0).expand(b, -1, -1), z], dim=1)
        full = None
        if mask is not None:
            full = torch.cat([torch.ones(b, self.k, dtype=torch.bool, device=z.device), mask], dim=1)
        for layer in self.layers:
            x = layer(x, None, full)
        return self.norm_out(x[:, : self.k]), None


def build_token_source(cfg: GEConfig, dim: int, heads: int) -> nn.Module:
    if cfg.tokens == "direct":
        return DirectTokens()
    if cfg.tokens == "pma":
        return PMATokens(dim, heads, cfg.k)
    if cfg.tokens == "perceiver":
        return PerceiverTokens(dim, heads, cfg.k, cfg.perceiver_iters)
    return GSATokens(dim, heads, cfg.k, cfg.gsa_layers)


class AdaLNFusion(nn.Module):
    """t' = t + gate * Linear(g), g = the cell embedding or the learned null vector where dropped."""

    def __init__(self, ge_dim: int, hidden: int, gate_init: float = 0.0) -> None:
        super().__init__()
        self.gate_init = gate_init
        self.proj = nn.Linear(ge_dim, hidden)
        self.gate = nn.Parameter(torch.full((), float(gate_init)))
        self.null = nn.Parameter(torch.zeros(ge_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _xavier(self.proj)
        nn.init.normal_(self.null, std=self.null.numel() ** -0.5)
        with torch.no_grad():
            self.gate.fill_(self.gate_init)

    def inputs(self, ge_vec: torch.Tensor | None, keep: torch.Tensor | None, b: int) -> torch.Tensor:
        null = self.null.unsqueeze(0).expand(b, -1)
        if ge_vec is None:
            _check_dropped(keep)
            return null
        if ge_vec.shape != null.shape:
            raise ValueError(f"ge_vec has shape {tuple(ge_vec.shape)}, expected {tuple(null.shape)}")
        return (
            ge_vec.to(null.dtype) if keep is None else torch.where(keep[:, None], ge_vec.to(null.dtype), null)
        )

    def forward(
        self, temb: torch.Tensor, ge_vec: torch.Tensor | None, keep: torch.Tensor | None
    ) -> torch.Tensor:
        return temb + self.gate * self.proj(self.inputs(ge_vec, keep, temb.shape[0]))


class XAttnTokens(nn.Module):
    """Gene tokens -> (B, 1 + K, D) key sequence [null; K tokens] and its (B, 1 + K) key mask."""

    def __init__(self, cfg: GEConfig, hidden: int, heads: int) -> None:
        super().__init__()
        self.proj = Mlp(cfg.ge_dim, hidden, hidden)
        self.source = build_token_source(cfg, hidden, heads)
        self.null = nn.Parameter(torch.zeros(1, hidden))
        self.ge_dim = cfg.ge_dim
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _xavier(self)
        nn.init.normal_(self.null, std=self.null.shape[-1] ** -0.5)
        for name in ("seeds", "latents", "summary"):
            if hasattr(self.source, name):
                nn.init.normal_(getattr(self.source, name), std=0.02)

    def tokens(
        self, ge_tokens: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, K, D) GE tokens (no null handling) and their validity mask (None = all valid)."""
        if ge_tokens.dim() != 3 or ge_tokens.shape[-1] != self.ge_dim:
            raise ValueError(f"ge_tokens must be (B, n, {self.ge_dim}), got {tuple(ge_tokens.shape)}")
        return self.source(self.proj(ge_tokens), mask)

    def forward(
        self,
        ge_tokens: torch.Tensor | None,
        keep: torch.Tensor | None,
        mask: torch.Tensor | None,
        b: int,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        null = self.null.to(dtype).unsqueeze(0).expand(b, -1, -1)
        if ge_tokens is None:
            _check_dropped(keep)
            return null, None
        if mask is not None:
            mask = mask.bool()
            if mask.shape != ge_tokens.shape[:2]:
                raise ValueError(
                    f"ge_mask {tuple(mask.shape)} does not match ge_tokens {tuple(ge_tokens.shape[:2])}"
                )
        if keep is not None:  # dropped samples: finite placeholder inputs, whatever the caller passed
            ge_tokens = torch.where(keep[:, None, None], ge_tokens, torch.zeros_like(ge_tokens))
        tok, tok_mask = self.tokens(ge_tokens.to(dtype), mask)
        keep_ = torch.ones(b, dtype=torch.bool, device=tok.device) if keep is None else keep
        if keep is not None:
            tok = torch.where(keep[:, None, None], tok, torch.zeros_like(tok))
        valid = keep_[:, None].expand(-1, tok.shape[1])
        if tok_mask is not None:
            valid = valid & tok_mask
        seq = torch.cat([null, tok.to(dtype)], dim=1)
        return seq, torch.cat([~keep_[:, None], valid], dim=1)


class GEConditioning(nn.Module):
    """The GE pathway of STMDiT: returns (timestep embedding, GE key sequence or None, its mask)."""

    def __init__(self, cfg: GEConfig, hidden: int, heads: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.adaln = AdaLNFusion(cfg.ge_dim, hidden, cfg.gate_init) if cfg.fusion == "adaln" else None
        self.xattn = XAttnTokens(cfg, hidden, heads) if cfg.fusion == "xattn" else None

    def reset_parameters(self) -> None:
        for part in (self.adaln, self.xattn):
            if part is not None:
                part.reset_parameters()

    def forward(
        self,
        temb: torch.Tensor,
        ge_tokens: torch.Tensor | None,
        ge_vec: torch.Tensor | None,
        keep: torch.Tensor | None,
        mask: torch.Tensor | None,
        b: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self.adaln is not None:
            if ge_tokens is not None:
                raise ValueError("the AdaLN fusion takes the cell embedding ge_vec, not ge_tokens")
            return self.adaln(temb, ge_vec, keep), None, None
        assert self.xattn is not None
        if ge_vec is not None:
            raise ValueError("the cross-attention fusion takes per-gene ge_tokens, not ge_vec")
        seq, seq_mask = self.xattn(ge_tokens, keep, mask, b, temb.dtype)
        return temb, seq, seq_mask
