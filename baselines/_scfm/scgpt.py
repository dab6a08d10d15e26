"""scGPT (Cui et al., Nature Methods 2024) as a HINGE backbone: a post-LN transformer over gene tokens.

Facts (bowang-lab/scGPT, scgpt/model/model.py on main; pretraining code on the dev-temp branch;
the whole-human args.json):
- token = GeneEncoder(id) + ContinuousValueEncoder(value); GeneEncoder = Embedding (padding_idx =
  vocab["<pad>"]) -> LayerNorm; value encoder = clamp(max 512) -> Linear(1,D) -> ReLU -> Linear(D,D)
  -> LayerNorm -> Dropout. No positional embedding. A "<cls>" gene token is prepended with value
  pad_value (-2), as in pretraining (_map_append_cls) and scgpt.tasks.cell_emb.
- encoder layer = torch's TransformerEncoderLayer defaults: post-LN (norm_first False), ReLU, eps 1e-5,
  biases everywhere, dropout on attention probabilities, on both residual branches and inside the FFN:
  x = norm1(x + drop(attn(x))); x = norm2(x + drop(linear2(drop(relu(linear1(x)))))).
- ExprDecoder: Linear(D,D) -> LeakyReLU -> Linear(D,D) -> LeakyReLU -> Linear(D,1) per gene token.
- whole-human: embsize 512, nlayers 12, nheads 8, d_hid 512, dropout 0.2, pad_value -2, mask_value -1,
  input_style "binned" (51 bins), vocabulary default_census_vocab.json (60,694 genes, ids 0..60693)
  plus "<pad>", "<cls>", "<eoc>" appended -> 60,697 embedding rows.

Masked genes (visible False), two styles (`mask_style`):
- "mlm" (default; scGPT's GEP objective, TransformerModel.forward on main): a masked gene keeps its
  gene token and its value is replaced by mask_value (-1); attention is NOT masked (masks_kv False).
- "generative" (scGPT's GEN objective, dev-temp FlashscGPTMHA): a hidden gene's token is gene
  embedding + flag_encoder row 1 (no value); visible tokens attend only to visible tokens, a hidden
  token attends to the visible tokens and itself, and its attention output skips out_proj (scGPT's
  generative branch uses a cross-attention with identity in/out projections). masks_kv True.
Padding ids are never "visible"; like CellFM, padded tokens are only hidden from attention when
masks_kv is True, so use fixed gene panels (HINGE does).

Module names: q/k/v/o_proj (split from scGPT's packed in_proj / Wqkv, so HINGE's LoRA targets apply),
ffn.linear1/linear2, norm1/norm2, decoder.fc.{0,2,4}; scgpt_ckpt.py maps the published keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from baselines._scfm.base import Backbone, BackboneBlock

MASK_STYLES = ("mlm", "generative")
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")  # appended in this order when vocab.json lacks them


@dataclass(frozen=True)
class ScGPTConfig:
    """Every scGPT size. `n_tokens` = embedding rows (genes + specials); pad_id / cls_id index that table."""

    dim: int = 512
    n_layers: int = 12
    n_heads: int = 8
    d_hid: int = 512
    n_tokens: int = 60697
    pad_id: int = 60694
    cls_id: int = 60695
    dropout: float = 0.2
    pad_value: float = -2.0
    mask_value: float = -1.0
    cls_value: float | None = None  # None: pad_value, as scGPT's pretraining appends <cls>
    max_value: float = 512.0
    ln_eps: float = 1e-5
    mask_style: str = "mlm"
    n_bins: int | None = 51  # the input space the checkpoint was pretrained on (informational)

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.mask_style not in MASK_STYLES:
            raise ValueError(f"scgpt mask_style must be one of {MASK_STYLES}, got {self.mask_style!r}")
        for name in ("pad_id", "cls_id"):
            if not 0 <= getattr(self, name) < self.n_tokens:
                raise ValueError(f"{name} {getattr(self, name)} outside the {self.n_tokens}-row gene table")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def cls_input(self) -> float:
        return self.pad_value if self.cls_value is None else self.cls_value

    @property
    def generative(self) -> bool:
        return self.mask_style == "generative"

    def replace(self, **changes: Any) -> ScGPTConfig:
        return dataclasses.replace(self, **changes)


SIZES: dict[str, ScGPTConfig] = {
    "whole-human": ScGPTConfig(),
    # 200 genes (ids 0..199), then <pad> 200, <cls> 201, <eoc> 202: the whole-human layout, shrunk
    "tiny": ScGPTConfig(dim=32, n_layers=2, n_heads=4, d_hid=64, n_tokens=203, pad_id=200, cls_id=201),
}


def _not_meta(t: torch.Tensor) -> bool:
    return t.device.type != "meta"


class GeneEncoder(nn.Module):
    """Gene id -> Embedding -> LayerNorm (scGPT GeneEncoder: embedding, enc_norm)."""

    def __init__(self, n_tokens: int, dim: int, pad_id: int) -> None:
        super().__init__()
        # _weight skips nn.Embedding's normal_ init (seconds on the meta device); scGPT's init_weights
        # then draws uniform(-0.1, 0.1) on every row, the padding row included
        self.embedding = nn.Embedding(n_tokens, dim, padding_idx=pad_id, _weight=torch.empty(n_tokens, dim))
        self.enc_norm = nn.LayerNorm(dim)
        if _not_meta(self.embedding.weight):
            nn.init.uniform_(self.embedding.weight, -0.1, 0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(ids))


class ContinuousValueEncoder(nn.Module):
    """Scalar -> D: clamp(max) -> Linear(1,D) -> ReLU -> Linear(D,D) -> LayerNorm -> Dropout."""

    def __init__(self, dim: int, dropout: float = 0.1, max_value: float = 512.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, dim)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.max_value = max_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        return self.dropout(self.norm(self.linear2(self.activation(self.linear1(x)))))


class ScGPTAttention(nn.Module):
    """Multi-head softmax self-attention with biases (torch MHA / flash-attn numerics, scale 1/sqrt(d_h)).

    kv_mask (B,N) bool: keys a query may attend to; every token also attends to itself, so a hidden
    token sees the visible ones plus itself (scGPT's generative pattern). With `hidden_skip_out_proj`
    the outputs of hidden queries (kv_mask False) bypass o_proj, as in scGPT's generative branch.
    """

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0, hidden_skip_out_proj: bool = False):
        super().__init__()
        self.n_heads, self.head_dim, self.attn_dropout = n_heads, dim // n_heads, dropout
        self.hidden_skip_out_proj = hidden_skip_out_proj
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.o_proj = nn.Linear(dim, dim)
        if _not_meta(self.q_proj.weight):  # torch MHA: xavier_uniform over the packed (3D, D) matrix
            bound = math.sqrt(6.0 / (4 * dim))
            for lin in (self.q_proj, self.k_proj, self.v_proj):
                nn.init.uniform_(lin.weight, -bound, bound)
                nn.init.zeros_(lin.bias)
            nn.init.zeros_(self.o_proj.bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # (B,H,N,d)

    def forward(self, x: torch.Tensor, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        mask = None
        if kv_mask is not None:
            kv_mask = kv_mask.bool()
            eye = torch.eye(n, dtype=torch.bool, device=x.device)
            mask = (kv_mask[:, None, :] | eye)[:, None]  # (B,1,N,N), True = may attend
        p = self.attn_dropout if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        ctx = ctx.transpose(1, 2).reshape(b, n, d)
        out = self.o_proj(ctx)
        if self.hidden_skip_out_proj and kv_mask is not None:
            out = torch.where(kv_mask[..., None], out, ctx)
        return out


class FeedForward(nn.Module):
    """linear2(dropout(relu(linear1(x)))), torch TransformerEncoderLayer's FFN."""

    def __init__(self, dim: int, d_hid: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, d_hid)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_hid, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class ScGPTBlock(BackboneBlock):
    """Post-LN encoder layer: alpha 1, LayerNorm eps 1e-5, dropout p on both residual branches."""

    def __init__(self, cfg: ScGPTConfig) -> None:
        super().__init__()
        self.attn = ScGPTAttention(cfg.dim, cfg.n_heads, cfg.dropout, hidden_skip_out_proj=cfg.generative)
        self.ffn = FeedForward(cfg.dim, cfg.d_hid, cfg.dropout)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.alpha = 1.0
        self.masks_kv = cfg.generative


class ExprDecoder(nn.Module):
    """Gene token -> scalar: fc = Linear(D,D), LeakyReLU, Linear(D,D), LeakyReLU, Linear(D,1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(dim, dim), nn.LeakyReLU(), nn.Linear(dim, dim), nn.LeakyReLU(), nn.Linear(dim, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).squeeze(-1)


def _flag_encoder(dim: int) -> nn.Embedding:
    """scGPT's flag_encoder, Embedding(2, D) (row 1 marks genes to generate); N(0,1) init off the meta device."""
    emb = nn.Embedding(2, dim, _weight=torch.empty(2, dim))
    if _not_meta(emb.weight):
        nn.init.normal_(emb.weight)
    return emb


class ScGPT(Backbone):
    """scGPT backbone; `forward(values, gene_ids, visible)` predicts every gene's value (B, G)."""

    kind = "scgpt"
    n_prefix = 1

    def __init__(self, cfg: ScGPTConfig, size: str = "custom") -> None:
        super().__init__()
        self.cfg, self.size, self.dim = cfg, size, cfg.dim
        self.encoder = GeneEncoder(cfg.n_tokens, cfg.dim, cfg.pad_id)
        self.value_encoder = ContinuousValueEncoder(cfg.dim, cfg.dropout, cfg.max_value)
        self.flag_encoder = _flag_encoder(cfg.dim) if cfg.generative else None
        self.blocks = nn.ModuleList(ScGPTBlock(cfg) for _ in range(cfg.n_layers))
        self.decoder = ExprDecoder(cfg.dim)
        self.ckpt_report: Any = None

    def embed(
        self, values: torch.Tensor, gene_ids: torch.Tensor, visible: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, g = values.shape
        dev = values.device
        if gene_ids.dim() == 1:
            gene_ids = gene_ids.unsqueeze(0).expand(b, g)
        if gene_ids.shape != values.shape:
            raise ValueError(f"gene_ids {tuple(gene_ids.shape)} do not match values {tuple(values.shape)}")
        is_pad = gene_ids == self.cfg.pad_id
        vis = torch.ones(b, g, dtype=torch.bool, device=dev) if visible is None else visible.bool()
        vis = vis & ~is_pad
        dtype = self.encoder.embedding.weight.dtype
        cls_ids = torch.full((b, 1), self.cfg.cls_id, dtype=gene_ids.dtype, device=dev)
        cls_vals = torch.full((b, 1), self.cfg.cls_input, dtype=dtype, device=dev)
        vals = values.to(dtype)
        vals = torch.where(is_pad, torch.full_like(vals, self.cfg.pad_value), vals)
        # scGPT MLM: the mask marker is the value itself (generative style discards these values below)
        vals = torch.where(vis | is_pad, vals, torch.full_like(vals, self.cfg.mask_value))
        gene = self.encoder(torch.cat([cls_ids, gene_ids], dim=1))
        tokens = gene + self.value_encoder(torch.cat([cls_vals, vals], dim=1))
        vis_tokens = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=dev), vis], dim=1)
        if self.flag_encoder is not None:  # hidden genes: gene embedding + generation flag, no value
            tokens = torch.where((~vis_tokens)[..., None], gene + self.flag_encoder.weight[1], tokens)
        return tokens, vis_tokens

    def decode(self, tokens_genes: torch.Tensor) -> torch.Tensor:
        return self.decoder(tokens_genes)


def build_scgpt(size: str = "tiny", **overrides: Any) -> ScGPT:
    """A random-init scGPT of a named size; overrides change single config fields (e.g. mask_style)."""
    if size not in SIZES:
        from stbench.errors import UnknownNameError

        raise UnknownNameError("scgpt size", size, list(SIZES))
    return ScGPT(SIZES[size].replace(**overrides), size=size)


def _build_backbone(size: str, checkpoint: Any = None, vocab: Any = None, **options: Any) -> ScGPT:
    """Registry builder: random init of `size`, or a checkpoint directory (best_model.pt, vocab.json,
    args.json) sized from its files. `vocab` (path or GeneVocab) defaults to the directory's vocab.json."""
    from baselines._scfm.scgpt_ckpt import load_scgpt, read_scgpt_vocab

    if checkpoint is not None:
        return load_scgpt(checkpoint, size=size, vocab=vocab, **options)
    if vocab is None:
        return build_scgpt(size, **options)
    gv, specials, n_tokens = read_scgpt_vocab(vocab)
    model = build_scgpt(
        size, **{"n_tokens": n_tokens, "pad_id": specials["<pad>"], "cls_id": specials["<cls>"], **options}
    )
    model.vocab = gv
    return model


def _register() -> None:
    from baselines._scfm.registry import register_backbone

    register_backbone("scgpt", _build_backbone)


_register()
