"""Independent modality dropout (training) and dual classifier-free guidance (sampling) for STMDiT.

Training drops the morphology (UNI) and the expression (GE) conditions independently with
probability p each, so one network learns all four regimes in proportions full (1-p)^2, UNI-only
p(1-p), GE-only p(1-p), none p^2. Sampling combines three of them (paper eq.):

    eps = eps(0, 0) + s_uni (eps(uni, 0) - eps(0, 0)) + s_ge (eps(uni, ge) - eps(uni, 0))

The three passes differ only in their keep masks, so they run as ONE forward over a 3x batch (the
DiT's per-sample null tokens make that exact); `guided_prediction(..., batched=False)` runs them
separately, for the speed benchmark and the equality test.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

REGIMES = ("uni+ge", "uni", "ge", "none")
# (uni kept, ge kept) of each regime
REGIME_KEEP = {"uni+ge": (True, True), "uni": (True, False), "ge": (False, True), "none": (False, False)}

# model_fn(x, t, uni_keep, ge_keep) -> prediction (same leading batch as x); the caller closes over
# the condition tensors, repeated to x's batch.
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def modality_keep(
    n: int, p_uni: float, p_ge: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(uni_keep, ge_keep) bool (n,): each modality dropped independently with its probability."""
    for p in (p_uni, p_ge):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"modality dropout must be in [0, 1], got {p}")
    u = torch.rand(2, n, generator=generator)
    return u[0] >= p_uni, u[1] >= p_ge


def regime_proportions(p_uni: float, p_ge: float) -> dict[str, float]:
    """Expected share of each regime under independent dropout."""
    return {
        "uni+ge": (1 - p_uni) * (1 - p_ge),
        "uni": (1 - p_uni) * p_ge,
        "ge": p_uni * (1 - p_ge),
        "none": p_uni * p_ge,
    }


def combine(
    eps_none: torch.Tensor, eps_uni: torch.Tensor, eps_full: torch.Tensor, s_uni: float, s_ge: float
) -> torch.Tensor:
    """The paper's dual guidance from the three regime predictions."""
    return eps_none + s_uni * (eps_uni - eps_none) + s_ge * (eps_full - eps_uni)


def guided_prediction(
    model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, s_uni: float, s_ge: float, batched: bool = True
) -> torch.Tensor:
    """Dual-guided prediction at (x, t). Batched: one forward over [none; uni; full] (3B rows)."""
    b = x.shape[0]
    on = torch.ones(b, dtype=torch.bool, device=x.device)
    off = torch.zeros_like(on)
    passes = ((off, off), (on, off), (on, on))  # none, uni-only, full
    if batched:
        uni = torch.cat([p[0] for p in passes])
        ge = torch.cat([p[1] for p in passes])
        out = model_fn(x.repeat(3, *([1] * (x.dim() - 1))), t.repeat(3), uni, ge)
        eps_none, eps_uni, eps_full = out.split(b)
    else:
        eps_none, eps_uni, eps_full = (model_fn(x, t, u, g) for u, g in passes)
    return combine(eps_none, eps_uni, eps_full, s_uni, s_ge)
