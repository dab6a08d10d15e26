"""PMS (probabilistic masking switch): drop the gene condition with probability p during stage I.

Paper Eq. (4): y = emptyset with probability p, else c_gene(g) -- read per sample. The authors' code
(networks_edm2.py, UNet.forward) draws ONE `random.random()` per forward call after re-seeding the
RNGs with `seed + cur_nimg`, so every micro-batch of an optimiser step (and every DDP rank) makes the
same decision: the whole step is conditional or unconditional. Both are offered: mode="sample"
(paper, default) and mode="step" (code).

Unconditional is NOT "condition = zeros" inside an EDM2 U-Net: the code uses emb = noise_emb when the
condition is dropped, while mp_sum(noise_emb, 0, t=0.5) = 0.5 noise_emb / sqrt(0.5) = noise_emb /
sqrt(2) differs from it. So `apply_pms` returns zeros for dropped rows (harmless placeholders) AND the keep mask;
the U-Net must pick per sample with `select_conditioned(noise_emb, mp_sum(noise_emb, gene_emb),
keep_mask)`, and when every row is dropped `apply_pms` returns None (skip the gene encoder, as the
code does).
"""

from __future__ import annotations

import hashlib

import torch

from stbench.errors import UnknownNameError

MODES = ("sample", "step")


def _check(p: float, mode: str) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"PMS probability p must be in [0, 1], got {p}")
    if mode not in MODES:
        raise UnknownNameError("PMS mode", mode, list(MODES))


def pms_keep_mask(
    batch_size: int,
    p: float,
    mode: str = "sample",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B,) bool, True = keep the gene condition. Draws B uniforms ("sample") or one ("step")."""
    _check(p, mode)
    gdev = generator.device if generator is not None else "cpu"
    n = batch_size if mode == "sample" else 1
    u = torch.rand(n, generator=generator, device=gdev)
    keep = (u >= p).expand(batch_size) if mode == "step" else u >= p
    return keep.to(device if device is not None else gdev).contiguous()


def apply_pms(
    cond: torch.Tensor,
    p: float,
    mode: str = "sample",
    generator: torch.Generator | None = None,
    keep_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """-> (cond with dropped rows zeroed, or None if all rows dropped; keep_mask (B,) bool).

    Pass `keep_mask` to reuse one decision (e.g. the per-step draw across gradient-accumulation
    micro-batches); otherwise it is drawn from `generator`.
    """
    keep = keep_mask if keep_mask is not None else pms_keep_mask(cond.shape[0], p, mode, generator)
    keep = keep.to(device=cond.device, dtype=torch.bool)
    if keep.shape != (cond.shape[0],):
        raise ValueError(f"keep_mask must be ({cond.shape[0]},), got {tuple(keep.shape)}")
    if not bool(keep.any()):
        return None, keep
    if bool(keep.all()):
        return cond, keep
    k = keep.view(-1, *([1] * (cond.ndim - 1)))
    return torch.where(k, cond, torch.zeros_like(cond)), keep


def select_conditioned(
    uncond: torch.Tensor, cond: torch.Tensor | None, keep_mask: torch.Tensor
) -> torch.Tensor:
    """Per sample: `cond` where the condition is kept, `uncond` where PMS dropped it."""
    if cond is None:
        return uncond
    k = keep_mask.to(device=uncond.device, dtype=torch.bool).view(-1, *([1] * (uncond.ndim - 1)))
    return torch.where(k, cond, uncond)


def step_generator(
    seed: int, step: int, rank: int = 0, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator fixed by (seed, step, rank): resumable and identical however the run is split.

    mode="step" must give every DDP rank the same decision: use rank=0 on all ranks. mode="sample"
    may pass the real rank so ranks draw independent masks.
    """
    digest = hashlib.sha256(f"diffbulk-pms:{seed}:{step}:{rank}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class PMS:
    """Stateful convenience: p, mode and a seeded generator (state saved for exact resume)."""

    def __init__(self, p: float = 0.5, mode: str = "sample", seed: int = 0) -> None:
        _check(p, mode)
        self.p = float(p)
        self.mode = mode
        self.generator = torch.Generator().manual_seed(seed)

    def keep_mask(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        return pms_keep_mask(batch_size, self.p, self.mode, self.generator, device)

    def __call__(
        self, cond: torch.Tensor, keep_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        return apply_pms(cond, self.p, self.mode, self.generator, keep_mask)

    def state_dict(self) -> dict[str, object]:
        return {"p": self.p, "mode": self.mode, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.p = float(state["p"])  # type: ignore[arg-type]
        self.mode = str(state["mode"])
        self.generator.set_state(state["rng"])  # type: ignore[arg-type]
