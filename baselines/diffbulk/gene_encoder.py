"""DiffBulk's gene-side condition: a union gene vocabulary and the open-embedding gene encoder.

Facts from the paper (Sec. III-B-1) and the authors' code (iMVR-PL/DiffBulk,
Pretrain/training/gene_encoder.py and networks_edm2.py), which this file re-implements:
- one learnable embedding per gene (dim 256); token = expression value x gene embedding, the RAW
  value times the RAW embedding row (no normalisation before the product, no bias, no value MLP);
- `depth` pre-LN transformer blocks: x += Dropout(MHA(LN(x))); x += Dropout(FFN(LN(x))), FFN =
  Linear(d, 4d) -> GELU -> Linear(4d, d), 8 heads, dropout 0.1 (none inside the attention), NO
  positional encoding and no final LayerNorm;
- pooling: nn.MultiheadAttention with ONE learnable query (init N(0, 1)) over the tokens -> 256-d;
- the 256 -> 512 projection lives in the U-Net (`emb_gene = Sequential(GeneModel, MPConv(256, 512))`,
  a weight-normalised linear without bias). Here `out_dim=None` returns the pooled 256-d vector so the
  EDM2 U-Net can own that magnitude-preserving projection exactly as the code does; an int `out_dim`
  adds a plain nn.Linear (the brief's default, for use outside the U-Net).

Deviations from the authors' code (deliberate; see the method card):
- The code keeps ONE embedding table PER PANEL, picked by the number of genes in the batch
  (460 / 541 / 538), so a gene shared by two datasets has two unrelated embeddings and a batch
  cannot mix panels. The paper describes one global vocabulary matrix V (N x dim) over the union of
  genes; we implement the paper: `GeneVocabulary` maps the union to ids, shared genes share a row,
  and a batch may mix panels through padding + key padding masks.
- Paper Eq. (2) scales the pooling logits by 1/sqrt(n_1) (number of genes); the code's
  nn.MultiheadAttention scales by 1/sqrt(head_dim). We follow the code.
- The code re-seeds the global RNG (torch.manual_seed(42)) inside constructors; we do not (the
  caller seeds model construction).

A zero-valued gene is NOT the same as an absent gene: its token is the zero vector, which still
takes part in attention (it is a key/value for every other token and for the pooling query). Only
padding (pad_mask True) removes a gene. The zero-padded-union MLP ablation cannot tell the two apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from stbench.data.genes import harmonise_gene_names
from stbench.errors import DataError, UnknownNameError
from stbench.utils.io import stable_hash

PAD_ID = 0
ENCODER_KINDS = ("open", "mlp")


class GeneVocabulary:
    """Gene symbol <-> embedding id over the union of several panels; id 0 is padding, never a gene.

    Order is deterministic: `from_panels` sorts the union by symbol, so the ids do not depend on the
    order in which datasets are listed; `extend` appends new genes (sorted) after the existing ones so
    a pre-trained stage I keeps its rows when a new panel is added. Serialised as the list of symbols
    (id = position + 1).
    """

    def __init__(self, symbols: Sequence[str]) -> None:
        names = harmonise_gene_names(symbols)
        if not names:
            raise DataError("gene vocabulary is empty", field="genes")
        dup = sorted(s for s, c in Counter(names).items() if c > 1)
        if dup:
            raise DataError(f"gene vocabulary has duplicate symbols {dup[:10]}", field="genes")
        if any(not s for s in names):
            raise DataError("gene vocabulary has an empty symbol", field="genes")
        self._symbols = tuple(names)
        self._ids = {s: i + 1 for i, s in enumerate(self._symbols)}

    @classmethod
    def from_panels(cls, panels: Iterable[Sequence[str]]) -> GeneVocabulary:
        """Sorted union of the panels' (harmonised) gene symbols."""
        union: set[str] = set()
        for panel in panels:
            union.update(harmonise_gene_names(panel))
        return cls(sorted(union))

    def extend(self, symbols: Iterable[str]) -> GeneVocabulary:
        """A new vocabulary with unseen genes appended (sorted); existing ids unchanged."""
        new = sorted(set(harmonise_gene_names(symbols)) - set(self._symbols))
        return GeneVocabulary(list(self._symbols) + new)

    @property
    def symbols(self) -> tuple[str, ...]:
        return self._symbols

    @property
    def n_vocab(self) -> int:
        """Rows of the embedding table: the genes plus the padding row."""
        return len(self._symbols) + 1

    @property
    def hash(self) -> str:
        return stable_hash({"gene_vocabulary": list(self._symbols)})

    def __len__(self) -> int:
        return len(self._symbols)

    def __contains__(self, symbol: object) -> bool:
        return isinstance(symbol, str) and harmonise_gene_names([symbol])[0] in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocabulary) and other._symbols == self._symbols

    def __hash__(self) -> int:
        return hash(self._symbols)

    def __repr__(self) -> str:
        return f"GeneVocabulary({len(self)} genes, hash={self.hash[:12]})"

    def ids(self, symbols: Sequence[str], *, unknown: str = "error") -> np.ndarray:
        """int64 ids of `symbols`; unknown genes raise (`unknown="error"`) or get -1 (`"mark"`)."""
        if unknown not in ("error", "mark"):
            raise ValueError(f"unknown must be 'error' or 'mark', got {unknown!r}")
        names = harmonise_gene_names(symbols)
        out = np.array([self._ids.get(s, -1) for s in names], dtype=np.int64)
        if unknown == "error" and (out < 0).any():
            missing = [s for s, i in zip(names, out, strict=True) if i < 0]
            raise DataError(
                f"{len(missing)} gene(s) not in the gene vocabulary ({len(self)} genes, "
                f"hash {self.hash[:12]}): {missing[:10]}; extend the vocabulary or drop them",
                field="genes",
            )
        return out

    def encode(
        self, symbols: Sequence[str], values: torch.Tensor | np.ndarray, *, unknown: str = "error"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One panel's (B, n) values -> (gene_ids, values, pad_mask) for the gene encoders.

        `unknown="drop"` silently drops columns whose gene is not in the vocabulary (e.g. a
        downstream panel meeting a pre-trained stage I); "error" raises naming them.
        """
        if unknown not in ("error", "drop"):
            raise ValueError(f"unknown must be 'error' or 'drop', got {unknown!r}")
        v = torch.as_tensor(values, dtype=torch.float32)
        if v.ndim != 2 or v.shape[1] != len(symbols):
            raise ValueError(f"values must be (B, {len(symbols)}), got {tuple(v.shape)}")
        ids = self.ids(symbols, unknown="error" if unknown == "error" else "mark")
        keep = ids >= 0
        ids_t = torch.as_tensor(ids[keep], device=v.device)
        v = v[:, torch.as_tensor(keep, device=v.device)]
        gene_ids = ids_t.unsqueeze(0).expand(v.shape[0], -1).contiguous()
        return gene_ids, v, torch.zeros_like(gene_ids, dtype=torch.bool)

    def to_list(self) -> list[str]:
        return list(self._symbols)

    @classmethod
    def from_list(cls, symbols: Sequence[str]) -> GeneVocabulary:
        return cls(symbols)

    def to_dict(self) -> dict[str, object]:
        return {"genes": self.to_list(), "n_genes": len(self), "pad_id": PAD_ID, "hash": self.hash}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> GeneVocabulary:
        vocab = cls(list(d["genes"]))  # type: ignore[arg-type]
        if "hash" in d and d["hash"] != vocab.hash:
            raise DataError("gene vocabulary hash mismatch: the stored list was edited", field="hash")
        return vocab


def pad_profiles(
    profiles: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixed-panel batch: [(ids (n_i,), values (n_i,)), ...] -> right-padded (B, max n_i) tensors."""
    if not profiles:
        raise ValueError("pad_profiles needs at least one profile")
    n = max(int(ids.numel()) for ids, _ in profiles)
    b = len(profiles)
    gene_ids = torch.full((b, n), PAD_ID, dtype=torch.long)
    values = torch.zeros((b, n), dtype=torch.float32)
    for i, (ids, vals) in enumerate(profiles):
        if ids.shape != vals.shape or ids.ndim != 1:
            raise ValueError(
                f"profile {i}: ids {tuple(ids.shape)} and values {tuple(vals.shape)} must be 1-d, equal"
            )
        gene_ids[i, : ids.numel()] = ids.long()
        values[i, : vals.numel()] = vals.float()
    return gene_ids, values, gene_ids == PAD_ID


def _check_inputs(
    gene_ids: torch.Tensor, values: torch.Tensor, pad_mask: torch.Tensor | None, n_vocab: int
) -> torch.Tensor:
    if gene_ids.ndim != 2 or values.shape != gene_ids.shape:
        raise ValueError(
            f"gene_ids and values must both be (B, n); got {tuple(gene_ids.shape)}, {tuple(values.shape)}"
        )
    if pad_mask is None:
        pad_mask = gene_ids == PAD_ID
    elif pad_mask.shape != gene_ids.shape or pad_mask.dtype != torch.bool:
        raise ValueError(
            f"pad_mask must be a bool (B, n) tensor, got {pad_mask.dtype} {tuple(pad_mask.shape)}"
        )
    if bool(((gene_ids == PAD_ID) & ~pad_mask).any()):
        raise ValueError("gene id 0 (padding) at a position that pad_mask marks as a gene")
    real = gene_ids[~pad_mask]
    if real.numel() and (int(real.min()) < 1 or int(real.max()) >= n_vocab):
        raise ValueError(f"gene ids must lie in [1, {n_vocab - 1}] (vocabulary of {n_vocab - 1} genes)")
    if bool(pad_mask.all(dim=1).any()):
        raise ValueError("a profile has no genes (all positions padded); drop its condition instead (PMS)")
    return pad_mask


class GeneBlock(nn.Module):
    """Pre-LN transformer block without positional encoding (order-agnostic by construction)."""

    def __init__(self, dim: int, heads: int, ffn_mult: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim * ffn_mult), nn.GELU(), nn.Linear(dim * ffn_mult, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        h = self.attn(h, h, h, key_padding_mask=pad_mask, need_weights=False)[0]
        x = x + self.drop(h)
        return x + self.drop(self.ffn(self.norm2(x)))


class AttentionPool(nn.Module):
    """One learnable query attends over the (non-padded) tokens: a set -> one vector."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        q = self.query.expand(x.shape[0], -1, -1)
        return self.attn(q, x, x, key_padding_mask=pad_mask, need_weights=False)[0].squeeze(1)


class OpenEmbeddingGeneEncoder(nn.Module):
    """Permutation-invariant encoder of a (gene, value) set over a union vocabulary -> (B, out_dim).

    forward(gene_ids (B, n) long, values (B, n) float, pad_mask (B, n) bool, True = padding; None
    means "id 0 is padding"). Padded positions are zeroed and masked out of every attention, so
    appending padding never changes the output.
    """

    def __init__(
        self,
        n_vocab: int,
        dim: int = 256,
        depth: int = 2,
        heads: int = 8,
        ffn_mult: int = 4,
        dropout: float = 0.1,
        out_dim: int | None = 512,
    ) -> None:
        super().__init__()
        if n_vocab < 2:
            raise ValueError(f"n_vocab counts the padding row and needs >= 2, got {n_vocab}")
        if depth < 1 or dim % heads:
            raise ValueError(
                f"need depth >= 1 and dim divisible by heads; got depth={depth}, dim={dim}, heads={heads}"
            )
        self.n_vocab = n_vocab
        self.dim = dim
        self.embedding = nn.Embedding(n_vocab, dim, padding_idx=PAD_ID)
        nn.init.xavier_uniform_(self.embedding.weight)  # as the code initialises its tables
        with torch.no_grad():
            self.embedding.weight[PAD_ID].zero_()
        self.blocks = nn.ModuleList(GeneBlock(dim, heads, ffn_mult, dropout) for _ in range(depth))
        self.pool = AttentionPool(dim, heads)
        self.proj: nn.Module = nn.Identity() if out_dim is None else nn.Linear(dim, out_dim)
        self.out_dim = dim if out_dim is None else out_dim

    def tokens(self, gene_ids: torch.Tensor, values: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """value x embedding per gene (raw product, no bias); padded tokens are exactly zero."""
        tok = self.embedding(gene_ids) * values.unsqueeze(-1).to(self.embedding.weight.dtype)
        return tok.masked_fill(pad_mask.unsqueeze(-1), 0.0)

    def forward(
        self, gene_ids: torch.Tensor, values: torch.Tensor, pad_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        pad_mask = _check_inputs(gene_ids, values, pad_mask, self.n_vocab)
        x = self.tokens(gene_ids, values, pad_mask)
        for block in self.blocks:
            x = block(x, pad_mask)
        return self.proj(self.pool(x, pad_mask))


class MLPGeneEncoder(nn.Module):
    """Ablation (paper Table III): a 3-layer MLP over a FIXED gene order.

    Single panel: build the vocabulary from that panel alone. Multiple panels: the union vocabulary,
    absent genes zero-padded (so an absent gene and a zero-valued gene are the same input). Layer sizes
    follow the code's commented-out alternative (n_genes -> 128 -> 512 -> 512, GELU, dropout 0.2).
    Takes the same (gene_ids, values, pad_mask) as the open encoder (scattered into the dense vector) or
    a dense (B, n_vocab - 1) vector through `forward_dense`.
    """

    def __init__(
        self, n_vocab: int, hidden: Sequence[int] = (128, 512), out_dim: int = 512, dropout: float = 0.2
    ) -> None:
        super().__init__()
        if n_vocab < 2:
            raise ValueError(f"n_vocab counts the padding row and needs >= 2, got {n_vocab}")
        self.n_vocab = n_vocab
        self.out_dim = out_dim
        layers: list[nn.Module] = []
        d = n_vocab - 1
        for h in hidden:
            layers += [nn.Linear(d, h), nn.GELU(), nn.Dropout(dropout)]
            d = h
        layers.append(nn.Linear(d, out_dim))
        self.mlp = nn.Sequential(*layers)

    def densify(
        self, gene_ids: torch.Tensor, values: torch.Tensor, pad_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, n) sparse profile -> (B, n_vocab - 1) vector in vocabulary order, zeros where absent."""
        pad_mask = _check_inputs(gene_ids, values, pad_mask, self.n_vocab)
        ids = gene_ids.masked_fill(pad_mask, PAD_ID)
        vals = values.float().masked_fill(pad_mask, 0.0)
        dense = torch.zeros(gene_ids.shape[0], self.n_vocab, dtype=vals.dtype, device=vals.device)
        dense.scatter_add_(1, ids, vals)
        return dense[:, 1:]

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)

    def forward(
        self, gene_ids: torch.Tensor, values: torch.Tensor, pad_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.mlp(self.densify(gene_ids, values, pad_mask))


def build_gene_encoder(kind: str, n_vocab: int, **kwargs: object) -> nn.Module:
    """`kind` "open" (paper) or "mlp" (ablation); kwargs go to the encoder's constructor."""
    if kind == "open":
        return OpenEmbeddingGeneEncoder(n_vocab, **kwargs)  # type: ignore[arg-type]
    if kind == "mlp":
        return MLPGeneEncoder(n_vocab, **kwargs)  # type: ignore[arg-type]
    raise UnknownNameError("gene encoder", kind, list(ENCODER_KINDS))
