"""The backbone contract between single-cell foundation models and the methods that wrap them.

HINGE inserts modulation before every sub-layer of a FROZEN backbone and gates every residual, so a
backbone exposes its blocks' sub-layers (attn, ffn, post-norms, residual scale) rather than only a
forward(). `BackboneBlock.forward` and `Backbone.forward` are the plain (unconditioned) path; a wrapper
that reproduces them with identity modulation must give the same numbers (see /work/notes/SCFM.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from baselines._scfm.vocab import GeneVocab


class BackboneBlock(nn.Module):
    """One post-LN block: x = norm1(alpha*x + drop(attn(x, kv_mask))); x = norm2(alpha*x + drop(ffn(x))).

    Subclasses set: attn (x (B,N,D), kv_mask (B,N) bool | None -> (B,N,D)), ffn, norm1, norm2,
    alpha (residual scale), masks_kv (whether attn sees the visibility mask), dropout.
    """

    attn: nn.Module
    ffn: nn.Module
    norm1: nn.Module
    norm2: nn.Module
    dropout: nn.Module
    alpha: float
    masks_kv: bool

    def kv_mask(self, visible: torch.Tensor | None) -> torch.Tensor | None:
        """The mask the attention of this block gets: the visibility mask only where masks_kv."""
        return visible if self.masks_kv else None

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attn(x, self.kv_mask(visible))
        x = self.norm1(self.alpha * x + self.dropout(a))
        return self.norm2(self.alpha * x + self.dropout(self.ffn(x)))


class Backbone(nn.Module):
    """A token-based masked-autoencoding single-cell model: embed -> blocks -> decode.

    Subclasses set dim (D), blocks (nn.ModuleList of BackboneBlock), n_prefix (tokens before the genes),
    and implement embed() and decode(). `vocab` maps gene symbols to the model's gene ids (0 = padding).
    """

    dim: int
    blocks: nn.ModuleList
    n_prefix: int
    kind: str = "?"
    size: str = "?"

    def __init__(self) -> None:
        super().__init__()
        self.vocab: GeneVocab | None = None
        self.checkpoint_path: str | None = None
        self._weights_id: str | None = None

    def embed(
        self, values: torch.Tensor, gene_ids: torch.Tensor, visible: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(values (B,G), gene_ids (B,G) or (G,), visible (B,G) bool) -> (tokens (B,P+G,D), visible (B,P+G))."""
        raise NotImplementedError

    def decode(self, tokens_genes: torch.Tensor) -> torch.Tensor:
        """Gene tokens (B,G,D) -> one scalar per gene (B,G)."""
        raise NotImplementedError

    def encode(
        self, values: torch.Tensor, gene_ids: torch.Tensor, visible: torch.Tensor | None = None
    ) -> torch.Tensor:
        """All output tokens (B, n_prefix + G, D), prefix (CLS) included."""
        x, vis = self.embed(values, gene_ids, visible)
        for block in self.blocks:
            x = block(x, vis)
        return x

    def forward(
        self, values: torch.Tensor, gene_ids: torch.Tensor, visible: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted value per gene (B,G): masked genes are reconstructed from the visible ones."""
        return self.decode(self.encode(values, gene_ids, visible)[:, self.n_prefix :])

    def weights_id(self) -> str:
        """'none' for random init, 'file:<sha256[:12]>' for a checkpoint (hashed once, lazily)."""
        if self.checkpoint_path is None:
            return "none"
        if self._weights_id is None:
            from stbench.utils.io import sha256_file

            self._weights_id = f"file:{sha256_file(self.checkpoint_path)[:12]}"
        return self._weights_id

    def freeze(self) -> Backbone:
        """requires_grad False everywhere (HINGE trains only modulation around a frozen backbone)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self
