"""Power-function EMA and post-hoc EMA reconstruction (EDM2 Sec. 3 and App. C.1-C.3).

Why: a power-function EMA averages the weights seen up to time t with density proportional to
tau^gamma on [0, t]; its width is expressed as the relative standard deviation sigma_rel of that
density, std^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), so one value works for any run length.
During training two such averages are tracked (sigma_rel 0.05 and 0.10, the DiffBulk / EDM2
defaults) and snapshotted periodically; after training, any other sigma_rel (the paper reports
0.100) can be reconstructed as the least-squares combination of the snapshots' averaging profiles.

Relations (this module's own derivation, checked against EDM2's phema.py):
- std -> gamma: the largest real root of gamma^3 + 7 gamma^2 + (16 - std^-2) gamma + (12 - std^-2);
  std 0.05 -> gamma ~ 16.97 and std 0.10 -> gamma ~ 6.94 (a SMALLER std is a LONGER average);
- tracking update at time t after a step of length delta: beta = (1 - delta / t)^(gamma + 1),
  ema <- beta ema + (1 - beta) theta (beta = 0 at the first step, so the average starts as a copy);
- inner product of two normalised profiles p_a (time t_a, gamma_a) and p_b (t_b, gamma_b):
  (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * min(t_a, t_b)^(gamma_a + gamma_b + 1)
  / (t_a^(gamma_a + 1) t_b^(gamma_b + 1));
- reconstruction: solve A x = b with A the snapshots' Gram matrix and b their products with the
  target profile, then rescale x to sum to 1 (so a constant trajectory is reproduced exactly).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

MAX_STD = float(np.sqrt(1 / 12))  # gamma -> 0 (a uniform average) gives the widest profile


def exp_to_std(gamma: float | np.ndarray) -> np.ndarray:
    """Relative standard deviation of the profile tau^gamma on [0, 1]."""
    g = np.float64(gamma)
    return np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def std_to_exp(std: float | np.ndarray) -> np.ndarray:
    """Exponent gamma whose profile has relative standard deviation `std` (0 < std < 1/sqrt(12))."""
    s = np.float64(std).reshape(-1)
    if np.any((s <= 0) | (s >= MAX_STD)):
        raise ValueError(f"sigma_rel must be in (0, {MAX_STD:.4f}), got {s.tolist()}")
    inv = s**-2
    roots = [np.roots([1.0, 7.0, 16.0 - v, 12.0 - v]) for v in inv]
    out = np.array([r[np.abs(r.imag) < 1e-9].real.max() for r in roots])
    return out.reshape(np.shape(std))


def power_function_beta(std: float, t: float, delta: float = 1.0, gamma: float | None = None) -> float:
    """Decay for an update that moves the clock from t - delta to t (`gamma` skips the cubic solve)."""
    g = float(std_to_exp(std)) if gamma is None else gamma
    return float((1.0 - delta / t) ** (g + 1))


def power_function_correlation(
    a_ofs: np.ndarray, a_std: np.ndarray, b_ofs: np.ndarray, b_std: np.ndarray
) -> np.ndarray:
    """Inner products of normalised power-function profiles (broadcasting)."""
    ga, gb = std_to_exp(np.asarray(a_std)), std_to_exp(np.asarray(b_std))
    ta, tb = np.float64(a_ofs), np.float64(b_ofs)
    m = np.minimum(ta, tb)
    # m^(ga+gb+1) / (ta^(ga+1) tb^(gb+1)) computed in log space for large t and gamma
    log_ratio = (ga + gb + 1) * np.log(m) - (ga + 1) * np.log(ta) - (gb + 1) * np.log(tb)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * np.exp(log_ratio)


def solve_posthoc_coefficients(
    in_ofs: Sequence[float],
    in_std: Sequence[float],
    out_ofs: float | Sequence[float],
    out_std: float | Sequence[float],
) -> np.ndarray:
    """(n_in, n_out) weights: column j combines the input snapshots into target profile j."""
    in_ofs, in_std = np.broadcast_arrays(np.float64(in_ofs), np.float64(in_std))
    out_ofs, out_std = np.broadcast_arrays(
        np.atleast_1d(np.float64(out_ofs)), np.atleast_1d(np.float64(out_std))
    )
    col, row = (lambda v: v.reshape(-1, 1)), (lambda v: v.reshape(1, -1))
    gram = power_function_correlation(col(in_ofs), col(in_std), row(in_ofs), row(in_std))
    rhs = power_function_correlation(col(in_ofs), col(in_std), row(out_ofs), row(out_std))
    x = np.linalg.solve(gram, rhs)
    return x / x.sum(axis=0, keepdims=True)


def posthoc_reconstruct(
    snapshots: Sequence[tuple[float, float, Mapping[str, torch.Tensor]]],
    out_std: float,
    out_ofs: float | None = None,
) -> dict[str, torch.Tensor]:
    """State dict of the sigma_rel = out_std average at time out_ofs (default: the latest snapshot).

    snapshots: (time, sigma_rel, state_dict) of saved EMA weights, time in the EMA's own clock
    (`PowerFunctionEMA.t`). Only snapshots with 0 < time <= out_ofs are used. Floating tensors are
    combined in float64 and cast back; other entries (integer buffers) are copied from the latest.
    """
    if not snapshots:
        raise ValueError("post-hoc reconstruction needs at least one snapshot")
    out_ofs = max(s[0] for s in snapshots) if out_ofs is None else float(out_ofs)
    used = sorted((s for s in snapshots if 0 < s[0] <= out_ofs), key=lambda s: s[0])
    if not used:
        raise ValueError(f"no snapshot with 0 < time <= {out_ofs}")
    coef = solve_posthoc_coefficients([s[0] for s in used], [s[1] for s in used], out_ofs, out_std)[:, 0]
    latest = used[-1][2]
    out: dict[str, torch.Tensor] = {}
    for key, ref in latest.items():
        if torch.is_floating_point(ref):
            acc = sum(float(c) * s[2][key].to(torch.float64) for c, s in zip(coef, used, strict=True))
            out[key] = acc.to(ref.dtype)
        else:
            out[key] = ref.clone()
    return out


class PowerFunctionEMA(nn.Module):
    """Tracks power-function averages of `net`'s parameters for several sigma_rel values.

    An nn.Module so that the averages and the clock `t` travel in checkpoints (state_dict /
    load_state_dict); the stds are stored as extra state and checked on load. Buffers (e.g. the
    Fourier features) are copied, not averaged. Call `update(net)` after every optimiser step.
    """

    def __init__(self, net: nn.Module, stds: Sequence[float] = (0.05, 0.10)) -> None:
        super().__init__()
        self.stds = tuple(float(s) for s in stds)
        self.gammas = tuple(float(g) for g in std_to_exp(np.asarray(self.stds)))  # also validates
        self.emas = nn.ModuleList(copy.deepcopy(net).requires_grad_(False) for _ in self.stds)
        self.register_buffer("t", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def reset(self, net: nn.Module) -> None:
        """Make every average an exact copy of `net` (the clock is left unchanged)."""
        for ema in self.emas:
            for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
                p_ema.copy_(p)

    @torch.no_grad()
    def update(self, net: nn.Module, delta: float = 1.0) -> None:
        """Advance the clock by `delta` (1 per step; or the batch size to count images like EDM2)."""
        self.t += delta
        t = float(self.t)
        for std, gamma, ema in zip(self.stds, self.gammas, self.emas, strict=True):
            beta = power_function_beta(std, t, delta, gamma)
            for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
                p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - beta)
            for b_ema, b in zip(ema.buffers(), net.buffers(), strict=True):
                b_ema.copy_(b)

    def average(self, std: float) -> nn.Module:
        """The tracked average for `std` (one of `self.stds`)."""
        for s, ema in zip(self.stds, self.emas, strict=True):
            if abs(s - std) < 1e-12:
                return ema
        raise KeyError(f"sigma_rel {std} is not tracked; tracked: {self.stds}")

    def snapshots(self) -> list[tuple[float, float, dict[str, torch.Tensor]]]:
        """(t, std, detached state dict copy) per tracked average, ready for `posthoc_reconstruct`."""
        t = float(self.t)
        return [
            (t, s, {k: v.detach().clone() for k, v in ema.state_dict().items()})
            for s, ema in zip(self.stds, self.emas, strict=True)
        ]

    def get_extra_state(self) -> dict:
        return {"stds": list(self.stds)}

    def set_extra_state(self, state: dict) -> None:
        stds = tuple(float(s) for s in state["stds"])
        if stds != self.stds:
            raise ValueError(f"checkpoint tracks sigma_rel {stds}, this EMA tracks {self.stds}")
