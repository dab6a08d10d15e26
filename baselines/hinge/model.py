"""HingeNet: a frozen single-cell backbone made histology- and timestep-conditioned by SoftAdaLN.

Conditioned forward (SCFM.md), for each backbone block b with c = ConditionNet(t, histology, visible):
    h1 = pre_attn(x, c); a = b.attn(h1, b.kv_mask(visible))
    x = b.norm1(b.alpha * x + gate_attn(c) * b.dropout(a)); h2 = pre_ffn(x, c)
    x = b.norm2(b.alpha * x + gate_ffn(c) * b.dropout(b.ffn(h2)))
then decode(pre_dec(x[:, n_prefix:], c)). With eta = 0, s = kappa = 0 and gates = 1 this is exactly
Backbone.forward, so training starts from the pre-trained model's behaviour (paper sec. 3.3).

Adaptation schemes (paper Table 2) via `backbone_mode`: "frozen" (HINGE), "scratch" (the caller
passes a random-init backbone; everything trains), "decoder_tune" (the value decoder trains too),
"lora" (rank-r adapters on the named backbone linears; base weights frozen).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from baselines._scfm.base import Backbone
from baselines.hinge.condition import ConditionNet
from baselines.hinge.softadaln import ETA_BIAS, GATE_BIAS, Gate, SoftAdaLN

MODULATIONS = {"softadaln": "softnorm", "nosoftnorm": "nosoftnorm", "hist_affine_ln": "layernorm"}
BACKBONE_MODES = ("frozen", "scratch", "decoder_tune", "lora")
LORA_TARGETS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj")


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * B(A(x)); A ~ Kaiming-uniform, B = 0, so the wrapped layer is unchanged
    at init. The base Linear stays frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scaling = (alpha if alpha is not None else rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scaling


def add_lora(backbone: Backbone, rank: int, targets: Sequence[str] = LORA_TARGETS) -> int:
    """Wrap `block.<target>` (e.g. "attn.q_proj") of every block in LoRALinear; returns how many."""
    n = 0
    for block in backbone.blocks:
        for target in targets:
            parent_name, _, leaf = target.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            lin = getattr(parent, leaf, None)
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"LoRA target {target!r} is not a Linear in {type(block).__name__}")
            setattr(parent, leaf, LoRALinear(lin, rank))
            n += 1
    return n


def decoder_module(backbone: Backbone) -> nn.Module:
    for name in ("value_dec", "decoder"):
        if isinstance(getattr(backbone, name, None), nn.Module):
            return getattr(backbone, name)
    raise ValueError(f"{type(backbone).__name__} exposes no value decoder (value_dec / decoder)")


class HingeNet(nn.Module):
    """(values (B,G), gene_ids (G,) or (B,G), visible (B,G) bool, t (B,), histology (B,H)) -> x0_hat (B,G)."""

    def __init__(
        self,
        backbone: Backbone,
        hist_dim: int,
        n_genes: int,
        *,
        modulation: str = "softadaln",
        identity_init: bool = True,
        backbone_mode: str = "frozen",
        lora_rank: int = 8,
        lora_targets: Sequence[str] = LORA_TARGETS,
        use_visibility: bool = True,
        eta_bias: float = ETA_BIAS,
        gate_bias: float = GATE_BIAS,
        cond_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if modulation not in MODULATIONS:
            raise ValueError(f"hinge modulation must be one of {sorted(MODULATIONS)}, got {modulation!r}")
        if backbone_mode not in BACKBONE_MODES:
            raise ValueError(f"hinge backbone_mode must be one of {BACKBONE_MODES}, got {backbone_mode!r}")
        self.backbone, self.backbone_mode = backbone, backbone_mode
        self.n_prefix = int(backbone.n_prefix)
        d, n_blocks = backbone.dim, len(backbone.blocks)
        mode = MODULATIONS[modulation]

        def ada() -> SoftAdaLN:
            return SoftAdaLN(d, d, mode, identity_init, eta_bias)

        def gate() -> Gate:
            return Gate(d, d, identity_init, gate_bias)

        self.cond = ConditionNet(d, hist_dim, n_genes, use_visibility, cond_init_std)
        self.pre_attn = nn.ModuleList(ada() for _ in range(n_blocks))
        self.pre_ffn = nn.ModuleList(ada() for _ in range(n_blocks))
        self.gate_attn = nn.ModuleList(gate() for _ in range(n_blocks))
        self.gate_ffn = nn.ModuleList(gate() for _ in range(n_blocks))
        self.pre_dec = ada()  # ungated, before the value decoder
        if backbone_mode != "scratch":
            backbone.freeze()
        if backbone_mode == "decoder_tune":
            decoder_module(backbone).requires_grad_(True)
        elif backbone_mode == "lora":
            add_lora(backbone, lora_rank, lora_targets)

    def modulation_parameters(self) -> list[nn.Parameter]:
        """Everything HINGE adds (condition net, SoftAdaLN, gates) - the paper's trainable set."""
        mods = (self.cond, self.pre_attn, self.pre_ffn, self.gate_attn, self.gate_ffn, self.pre_dec)
        return [p for m in mods for p in m.parameters()]

    def forward(
        self,
        values: torch.Tensor,
        gene_ids: torch.Tensor,
        visible: torch.Tensor | None,
        t: torch.Tensor,
        hist: torch.Tensor,
    ) -> torch.Tensor:
        c = self.cond(t, hist, visible)
        x, vis = self.backbone.embed(values, gene_ids, visible)
        c = c.to(x.dtype)
        for i, b in enumerate(self.backbone.blocks):
            a = b.attn(self.pre_attn[i](x, c), b.kv_mask(vis))
            x = b.norm1(b.alpha * x + self.gate_attn[i](c) * b.dropout(a))
            f = b.ffn(self.pre_ffn[i](x, c))
            x = b.norm2(b.alpha * x + self.gate_ffn[i](c) * b.dropout(f))
        return self.backbone.decode(self.pre_dec(x[:, self.n_prefix :], c))
