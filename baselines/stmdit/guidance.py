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


def regime_passes(regime: str) -> tuple[tuple[bool, bool], tuple[bool, bool], tuple[bool, bool]]:
    """(uni, ge) keep flags of the three terms of the guidance equation under a sampling regime.

    "uni+ge" is the equation itself; the ablation regimes "re-use the same scales but zero out the
    relevant conditioning input during sampling" (paper, Sec. D): a dropped modality is the null token
    in every pass, so "uni" = eps(0,0) + s_uni (eps(uni,0) - eps(0,0)), "ge" = eps(0,0) +
    s_ge (eps(0,ge) - eps(0,0)) and "none" = eps(0,0)."""
    if regime not in REGIME_KEEP:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    ku, kg = REGIME_KEEP[regime]
    return (False, False), (ku, False), (ku, kg)


def guided_prediction(
    model_fn: ModelFn,
    x: torch.Tensor,
    t: torch.Tensor,
    s_uni: float,
    s_ge: float,
    batched: bool = True,
    regime: str = "uni+ge",
) -> torch.Tensor:
    """Dual-guided prediction at (x, t) under `regime`. Batched: ONE forward over the distinct passes
    stacked ([none; uni; full] = 3B rows for "uni+ge"; passes that coincide under an ablation regime
    are computed once); unbatched: one forward per distinct pass."""
    b = x.shape[0]
    passes = regime_passes(regime)
    distinct = list(dict.fromkeys(passes))

    def flags(pairs: list[tuple[bool, bool]], j: int) -> torch.Tensor:
        return torch.cat([torch.full((b,), p[j], dtype=torch.bool, device=x.device) for p in pairs])

    if batched:
        n = len(distinct)
        out = model_fn(
            x.repeat(n, *([1] * (x.dim() - 1))), t.repeat(n), flags(distinct, 0), flags(distinct, 1)
        )
        by_pass = dict(zip(distinct, out.split(b), strict=True))
    else:
        by_pass = {p: model_fn(x, t, flags([p], 0), flags([p], 1)) for p in distinct}
    eps_none, eps_uni, eps_full = (by_pass[p] for p in passes)
    return combine(eps_none, eps_uni, eps_full, s_uni, s_ge)
