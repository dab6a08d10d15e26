"""STMDiT as one plain nn.Module: the (trainable) DiT denoiser plus the frozen CancerFoundation encoder
that turns a spot's expression profile into the GE condition.

Why together: the GE condition is a function of the expression values only through this frozen
encoder and the gene columns chosen for it; keeping encoder, gene ids and column choice in one module
means a checkpoint carries everything that defines the condition (the LightningModule adds training,
EMA and sampling around it).
"""

from __future__ import annotations

import torch
from torch import nn

from baselines.stmdit.dit import STMDiT
from baselines.stmdit.ge_encoder import CancerFoundationEncoder, GEEncoding


class STMDiTModel(nn.Module):
    """denoiser(x, t, uni, ge, uni_keep, ge_keep) and encode_ge(expression) -> GEEncoding | None.

    `ge_cols` (n,) are the columns of the protocol's expression vector fed to CancerFoundation (its
    <= max_len - 1 genes), `gene_ids` their vocabulary ids; both are buffers so checkpoints keep them.
    """

    def __init__(
        self,
        dit: STMDiT,
        ge_encoder: CancerFoundationEncoder | None,
        gene_ids: torch.Tensor | None,
        ge_cols: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.dit = dit
        self.ge_encoder = ge_encoder
        if (ge_encoder is None) != (gene_ids is None):
            raise ValueError("gene_ids must be given exactly when a GE encoder is")
        n = 0 if gene_ids is None else int(gene_ids.numel())
        self.register_buffer(
            "gene_ids", gene_ids.long() if gene_ids is not None else torch.zeros(0, dtype=torch.long)
        )
        cols = torch.arange(n, dtype=torch.long) if ge_cols is None else ge_cols.long()
        if cols.numel() != n:
            raise ValueError(f"ge_cols has {cols.numel()} columns for {n} gene ids")
        self.register_buffer("ge_cols", cols)

    @property
    def uses_ge(self) -> bool:
        return self.ge_encoder is not None and self.dit.ge is not None

    @torch.no_grad()
    def encode_ge(self, expression: torch.Tensor | None) -> GEEncoding | None:
        """The frozen CancerFoundation encoding of (B, n_genes) expression (None without GE)."""
        if not self.uses_ge or expression is None:
            return None
        values = expression.float().index_select(1, self.ge_cols.to(expression.device))
        return self.ge_encoder(values, self.gene_ids)

    def denoise(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        uni: torch.Tensor | None,
        ge: GEEncoding | None,
        uni_keep: torch.Tensor | None = None,
        ge_keep: torch.Tensor | None = None,
        dit: nn.Module | None = None,
    ) -> torch.Tensor:
        """One denoiser call; `dit` = another copy of the denoiser (the EMA shadow) with the same inputs."""
        net = dit if dit is not None else self.dit
        if ge is None or not self.uses_ge:
            return net(x, t, uni, uni_keep=uni_keep)
        if self.dit.ge_cfg.fusion == "adaln":
            return net(x, t, uni, ge_vec=ge.cell.to(x.dtype), uni_keep=uni_keep, ge_keep=ge_keep)
        return net(
            x, t, uni, ge_tokens=ge.tokens.to(x.dtype), uni_keep=uni_keep, ge_keep=ge_keep, ge_mask=ge.mask
        )

    forward = denoise
