"""CellFM (Zeng et al., 2025) in PyTorch: a retention-network masked autoencoder over gene tokens.

Facts (METHODS.md "HINGE" section; the authors' MindSpore code, biomed-AI/CellFM):
- token = soft-lookup value embedding + gene-id embedding (row 0 = padding, zero; rows rounded up to a
  multiple of 8); masked genes get `zero_emb` added (HINGE's use of CellFM); a CLS token is prepended;
- retention block (non-causal linear attention, no decay, no biases): Q = ReLU(xWq)/sqrt(d_h),
  K = ReLU(xWk)/sqrt(d_h), V = xWv / sqrt(#gene tokens), U = SiLU(xWu); per head O = Q (K^T V), per-head
  SRMSNorm (x / max(rms(x), 1e-12)), times U, output projection;
- K and V are multiplied by the visibility mask in the first half of the layers (CLS always visible);
- SGLU FFN o(u(x) * v(x)); post-LN x = LN(alpha*x + sublayer(x)), alpha = (2L)^0.25; init gain
  beta = (8L)^-0.25 for v/u/o and the FFN; dropout in layer i = 0.1*i/L;
- value decoder Linear(D,D) -> LeakyReLU -> Linear(D,1), no biases.
Module names mirror the MindSpore parameter names so the checkpoint map (ckpt.py) is short.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from baselines._scfm.base import Backbone, BackboneBlock


def round_up8(n: int) -> int:
    return n + (-n) % 8


def _xavier(w: torch.Tensor, gain: float = 1.0) -> None:
    """xavier_normal_, skipped on the meta device (torch routes normal_ there through slow Python refs)."""
    if w.device.type != "meta":
        nn.init.xavier_normal_(w, gain=gain)


@dataclass(frozen=True)
class CellFMConfig:
    """Every CellFM size. `gene_rows` (table rows incl. padding) wins over n_genes when set (checkpoints)."""

    dim: int = 1536
    n_layers: int = 40
    n_heads: int = 48
    n_genes: int = 24078  # gene_info.csv; the table has round_up8(n_genes + 1) rows
    gene_rows: int | None = None
    value_bins: int = 256
    dropout: float = 0.1  # layer i uses dropout * i / n_layers
    ln_eps: float = 1e-6  # HINGE's value; MindSpore's LayerNorm default is 1e-7
    leaky_slope: float = 0.2  # MindSpore nn.LeakyReLU default (CellFM pretraining); torch ports use 0.01

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.gene_rows is not None and self.gene_rows < 1:
            raise ValueError(f"gene_rows must be >= 1, got {self.gene_rows}")

    @property
    def rows(self) -> int:
        return self.gene_rows if self.gene_rows is not None else round_up8(self.n_genes + 1)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def alpha(self) -> float:
        return (2 * self.n_layers) ** 0.25

    @property
    def beta(self) -> float:
        return (8 * self.n_layers) ** -0.25

    def replace(self, **changes: object) -> CellFMConfig:
        return dataclasses.replace(self, **changes)


SIZES: dict[str, CellFMConfig] = {
    "800m": CellFMConfig(),
    "80m": CellFMConfig(n_layers=2),
    "tiny": CellFMConfig(dim=32, n_layers=2, n_heads=4, n_genes=100),
}


class SoftLookup(nn.Module):
    """Scalar -> D: Linear(1,b) -> LeakyReLU -> W3 v + a v -> softmax over b -> Linear(b,D); no biases."""

    def __init__(self, dim: int, bins: int = 256, leaky_slope: float = 0.2) -> None:
        super().__init__()
        self.w1 = nn.Linear(1, bins, bias=False)
        self.w3 = nn.Linear(bins, bins, bias=False)
        self.table = nn.Linear(bins, dim, bias=False)
        self.a = nn.Parameter(torch.zeros(1, 1))
        self.leaky_slope = leaky_slope

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        v = F.leaky_relu(self.w1(values.unsqueeze(-1)), self.leaky_slope)
        v = self.w3(v) + self.a * v
        return self.table(torch.softmax(v, dim=-1))


class ValueEncoder(nn.Module):
    """Holds the soft lookup as `value_enc` so parameter names match CellFM's value_enc.value_enc.*."""

    def __init__(self, dim: int, bins: int = 256, leaky_slope: float = 0.2) -> None:
        super().__init__()
        self.value_enc = SoftLookup(dim, bins, leaky_slope)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.value_enc(values)


def srms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMS norm over the last axis, in float32: x / sqrt(max(mean(x^2), 1e-24)).
    Clamped BEFORE the square root: a head whose ReLU kernels output all zeros has mean(x^2) = 0, and
    the gradient of sqrt at 0 is infinite (NaN through the clamp) even though the value is fine."""
    xf = x.float()
    rms = xf.pow(2).mean(dim=-1, keepdim=True).clamp_min(1e-24).sqrt()
    return (xf / rms).to(x.dtype)


class Retention(nn.Module):
    """Multi-head non-causal retention with ReLU kernels; kv_mask zeroes the keys/values of hidden tokens."""

    def __init__(self, dim: int, n_heads: int, beta: float = 1.0, n_prefix: int = 1) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.n_prefix = n_heads, dim // n_heads, n_prefix
        for name in ("q", "k", "v", "u", "o"):
            setattr(self, f"{name}_proj", nn.Linear(dim, dim, bias=False))
        _xavier(self.q_proj.weight)
        _xavier(self.k_proj.weight)
        for lin in (self.v_proj, self.u_proj, self.o_proj):
            _xavier(lin.weight, gain=beta)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # (B,H,N,d)

    def forward(self, x: torch.Tensor, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        scale = self.head_dim**-0.5
        q = self._heads(F.relu(self.q_proj(x))) * scale
        k = self._heads(F.relu(self.k_proj(x))) * scale
        # V scaled by 1/sqrt(number of gene tokens), the same in every layer (CellFM's len_scale)
        v = self._heads(self.v_proj(x)) * (max(n - self.n_prefix, 1) ** -0.5)
        u = self._heads(F.silu(self.u_proj(x)))
        if kv_mask is not None:
            m = kv_mask.to(k.dtype)[:, None, :, None]
            k, v = k * m, v * m
        o = q @ (k.transpose(-1, -2) @ v)  # (B,H,N,d): linear in N
        o = srms_norm(o) * u
        return self.o_proj(o.transpose(1, 2).reshape(b, n, d))


class SGLU(nn.Module):
    """Gated linear unit without activation: o(u(x) * v(x)), no biases."""

    def __init__(self, dim: int, beta: float = 1.0) -> None:
        super().__init__()
        self.u_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        for lin in (self.u_proj, self.v_proj, self.o_proj):
            _xavier(lin.weight, gain=beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.u_proj(x) * self.v_proj(x))


class CellFMBlock(BackboneBlock):
    """Retention + SGLU with post-LN residuals scaled by alpha; masks K/V iff masks_kv."""

    def __init__(self, cfg: CellFMConfig, index: int) -> None:
        super().__init__()
        self.attn = Retention(cfg.dim, cfg.n_heads, cfg.beta)
        self.ffn = SGLU(cfg.dim, cfg.beta)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.dropout = nn.Dropout(cfg.dropout * index / cfg.n_layers)
        self.alpha = cfg.alpha
        self.masks_kv = index < cfg.n_layers // 2


class ValueDecoder(nn.Module):
    """Gene token -> scalar: Linear(D,D) -> LeakyReLU -> Linear(D,1), no biases."""

    def __init__(self, dim: int, leaky_slope: float = 0.2) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, dim, bias=False)
        self.w2 = nn.Linear(dim, 1, bias=False)
        self.leaky_slope = leaky_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.leaky_relu(self.w1(x), self.leaky_slope)).squeeze(-1)


class CellFM(Backbone):
    """CellFM backbone; `forward(values, gene_ids, visible)` reconstructs every gene's value."""

    kind = "cellfm"
    n_prefix = 1

    def __init__(self, cfg: CellFMConfig, size: str = "custom") -> None:
        super().__init__()
        self.cfg, self.size, self.dim = cfg, size, cfg.dim
        self.gene_emb = nn.Parameter(torch.empty(cfg.rows, cfg.dim))
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.dim))
        self.zero_emb = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.value_enc = ValueEncoder(cfg.dim, cfg.value_bins, cfg.leaky_slope)
        self.blocks = nn.ModuleList(CellFMBlock(cfg, i) for i in range(cfg.n_layers))
        self.value_dec = ValueDecoder(cfg.dim, cfg.leaky_slope)
        _xavier(self.gene_emb, gain=0.5)
        if self.cls_token.device.type != "meta":
            nn.init.normal_(self.cls_token, std=0.5 / math.sqrt(cfg.dim))
        with torch.no_grad():
            self.gene_emb[0].zero_()

    def embed(
        self, values: torch.Tensor, gene_ids: torch.Tensor, visible: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, g = values.shape
        if gene_ids.dim() == 1:
            gene_ids = gene_ids.unsqueeze(0).expand(b, g)
        if gene_ids.shape != values.shape:
            raise ValueError(f"gene_ids {tuple(gene_ids.shape)} do not match values {tuple(values.shape)}")
        if visible is None:
            visible = torch.ones(b, g, dtype=torch.bool, device=values.device)
        tok = self.value_enc(values.to(self.gene_emb.dtype))
        tok = tok + self.zero_emb * (~visible).unsqueeze(-1).to(tok.dtype)
        tok = tok + F.embedding(gene_ids, self.gene_emb, padding_idx=0)
        tokens = torch.cat([self.cls_token.expand(b, 1, self.dim), tok], dim=1)
        ones = torch.ones(b, 1, dtype=torch.bool, device=values.device)
        return tokens, torch.cat([ones, visible.bool()], dim=1)

    def decode(self, tokens_genes: torch.Tensor) -> torch.Tensor:
        return self.value_dec(tokens_genes)


def build_cellfm(size: str = "tiny", **overrides: object) -> CellFM:
    """A random-init CellFM of a named size; overrides change single config fields (e.g. gene_rows)."""
    if size not in SIZES:
        from stbench.errors import UnknownNameError

        raise UnknownNameError("cellfm size", size, list(SIZES))
    return CellFM(SIZES[size].replace(**overrides), size=size)
