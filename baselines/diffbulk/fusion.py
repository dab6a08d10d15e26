"""Stage II fusions of z_fm (PLIP, 512) and z_diff (MSFE-Net, 512) and the linear gene decoder.

Facts from the authors' code (Downstream/model.py `FeatureFusionNetWithPLIP`; config.yaml uses
fusion_method "gated_residual", c 1.0, c_learnable True):
- gated ("gated_residual"): g = sigmoid(Linear([z_fm; z_diff]) -> 512), z = z_fm + g * Linear(z_diff).
  The paper's Eq. (6)-(7) has no Linear on z_diff: `diff_proj=False` gives the paper form.
- add: z = c z_fm + (1 - c) z_diff;  concat: z = [z_fm; c z_diff] (decoder input 1024);
  film (code only, not in the paper): z = (1 + Linear_g(z_diff)) * z_fm + Linear_b(z_diff).
- c: a raw scalar initialised to `c_init` (config: 1.0); when learnable the code uses sigmoid(raw),
  so training starts at sigmoid(1.0) = 0.731 (the paper reports learned 0.7088 / 0.7348); when fixed
  it uses the raw value as is. We do the same.
- decoder: one Linear(fused dim -> n_genes).
Ablations added here: fm_only (z = z_fm: the FM-branch-only model, i.e. a linear probe on PLIP) and
diff_only (z = z_diff: the paper's "Diffusion (alone)", Table VII).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from baselines.diffbulk.msfe import MSFENet, tap_channels
from stbench.errors import UnknownNameError

FUSIONS = ("gated", "add", "concat", "film", "fm_only", "diff_only")


class Fusion(nn.Module):
    """z = fuse(z_fm (B, fm_dim), z_diff (B, diff_dim)) -> (B, out_dim)."""

    def __init__(
        self,
        kind: str = "gated",
        fm_dim: int = 512,
        diff_dim: int = 512,
        *,
        diff_proj: bool = True,
        c_init: float = 1.0,
        learn_c: bool = True,
    ) -> None:
        super().__init__()
        if kind not in FUSIONS:
            raise UnknownNameError("fusion", kind, list(FUSIONS))
        same_dim_needed = kind in ("add",) or (kind == "gated" and not diff_proj)
        if same_dim_needed and diff_dim != fm_dim:
            raise ValueError(
                f"fusion {kind!r} needs z_diff ({diff_dim}) and z_fm ({fm_dim}) of equal size; "
                f"give MSFE-Net proj_dim={fm_dim}" + (" or use diff_proj=True" if kind == "gated" else "")
            )
        self.kind = kind
        self.fm_dim = fm_dim
        self.diff_dim = diff_dim
        self.learn_c = learn_c
        if kind == "gated":
            self.gate = nn.Linear(fm_dim + diff_dim, fm_dim)
            self.diff_proj: nn.Module = nn.Linear(diff_dim, fm_dim) if diff_proj else nn.Identity()
        elif kind == "film":
            self.film_gamma = nn.Linear(diff_dim, fm_dim)
            self.film_beta = nn.Linear(diff_dim, fm_dim)
        if kind in ("add", "concat"):
            if learn_c:
                self.c_raw = nn.Parameter(torch.tensor(float(c_init)))
            else:
                self.register_buffer("c_raw", torch.tensor(float(c_init)))
        self.out_dim = {"concat": fm_dim + diff_dim, "diff_only": diff_dim}.get(kind, fm_dim)

    @property
    def needs_diff(self) -> bool:
        return self.kind != "fm_only"

    @property
    def needs_fm(self) -> bool:
        return self.kind != "diff_only"

    def _inputs(self) -> list[str]:
        return [n for n, needed in (("z_fm", self.needs_fm), ("z_diff", self.needs_diff)) if needed]

    def c(self) -> torch.Tensor:
        """The mixing scalar as used (sigmoid of the raw parameter when learned, raw when fixed)."""
        if not hasattr(self, "c_raw"):
            raise AttributeError(f"fusion {self.kind!r} has no scalar c")
        return torch.sigmoid(self.c_raw) if self.learn_c else self.c_raw

    def forward(self, z_fm: torch.Tensor | None, z_diff: torch.Tensor | None) -> torch.Tensor:
        if (self.needs_fm and z_fm is None) or (self.needs_diff and z_diff is None):
            raise ValueError(f"fusion {self.kind!r} needs " + " and ".join(self._inputs()))
        if self.kind == "fm_only":
            return z_fm  # type: ignore[return-value]
        if self.kind == "diff_only":
            return z_diff  # type: ignore[return-value]
        assert z_fm is not None and z_diff is not None  # for the type checker; checked above
        if self.kind == "gated":
            g = torch.sigmoid(self.gate(torch.cat([z_fm, z_diff], dim=1)))
            return z_fm + g * self.diff_proj(z_diff)
        if self.kind == "film":
            return (1.0 + self.film_gamma(z_diff)) * z_fm + self.film_beta(z_diff)
        c = self.c()
        if self.kind == "add":
            return c * z_fm + (1.0 - c) * z_diff
        return torch.cat([z_fm, c * z_diff], dim=1)  # concat


class FusedRegressor(nn.Module):
    """Fusion followed by the linear decoder to the genes: (z_fm, z_diff) -> (B, n_genes)."""

    def __init__(self, fusion: Fusion, n_genes: int) -> None:
        super().__init__()
        if n_genes < 1:
            raise ValueError(f"n_genes must be >= 1, got {n_genes}")
        self.fusion = fusion
        self.decoder = nn.Linear(fusion.out_dim, n_genes)

    def forward(self, z_fm: torch.Tensor | None, z_diff: torch.Tensor | None) -> torch.Tensor:
        return self.decoder(self.fusion(z_fm, z_diff))


def count_trainable(modules: Iterable[nn.Module]) -> int:
    """Trainable parameters over modules, each shared tensor once."""
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                seen[id(p)] = p.numel()
    return sum(seen.values())


def stage2_trainable_parameters(
    n_genes: int,
    layers: str = "decoder",
    fusion: str = "gated",
    fm_dim: int = 512,
    width: int = 128,
    proj_dim: int | None = None,
    diff_proj: bool = True,
) -> int:
    """Trainable parameters of stage II (MSFE-Net + fusion + decoder) for the paper's U-Net taps.

    Paper setting (decoder taps 512/384/256/128, width 128, PLIP 512, gated with the code's Linear on
    z_diff): 9*128*1280 + 4*128 (convs) + 4*256 (GroupNorms) + (1024*512 + 512) (gate)
    + (512*512 + 512) (z_diff Linear) + 513*G (decoder) = 2,263,552 + 513*G.
    """
    msfe = MSFENet(tap_channels(layers), width=width, proj_dim=proj_dim)
    needs_diff = fusion != "fm_only"
    head = FusedRegressor(Fusion(fusion, fm_dim, msfe.out_dim, diff_proj=diff_proj), n_genes)
    return count_trainable([msfe, head] if needs_diff else [head])
