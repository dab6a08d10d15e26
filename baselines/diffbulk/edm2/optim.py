"""EDM2 optimiser recipe: Adam(0.9, 0.99) and an inverse-square-root learning-rate decay.

Why inverse-sqrt: with forced weight normalisation the effective learning rate no longer shrinks
as weights grow, so EDM2 decays it explicitly: lr(t) = ref_lr / sqrt(max(t / t_ref, 1)), optionally
times a linear warm-up min(t / t_rampup, 1). EDM2 counts t in training images with
t_ref = ref_batches * batch_size (DiffBulk preset gene-img224-xs: ref_lr 0.012, ref_batches 70,000,
rampup 10 Mimg, the EDM2 default). Here t is in optimiser steps (t_ref = ref_batches, rampup in steps),
which is the same schedule divided through by the batch size.

Note on the authors' script (train.sh: batch 1024, duration 3 Mi images = 3,072 steps): t never
reaches t_ref = 70,000 steps, so the decay never engages, and the 10 Mimg warm-up never completes,
so the learning rate rises linearly to ~0.31 x ref_lr. `edm2_lr_nimg` reproduces that exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

ADAM_BETAS = (0.9, 0.99)


def inverse_sqrt_lr(step: int | float, ref_lr: float, ref_steps: float, rampup_steps: float = 0.0) -> float:
    """Learning rate at optimiser step `step` (0-based, the step about to be taken)."""
    lr = ref_lr
    if ref_steps > 0:
        lr /= math.sqrt(max(step / ref_steps, 1.0))
    if rampup_steps > 0:
        lr *= min(step / rampup_steps, 1.0)
    return lr


def edm2_lr_nimg(
    cur_nimg: int,
    batch_size: int,
    ref_lr: float = 0.012,
    ref_batches: float = 70e3,
    rampup_mimg: float = 10.0,
) -> float:
    """EDM2's schedule in its own units (images seen so far), for checking against the authors' runs."""
    return inverse_sqrt_lr(cur_nimg, ref_lr, ref_batches * batch_size, rampup_mimg * 1e6)


def make_adam(params: Iterable[torch.nn.Parameter], lr: float = 0.012, eps: float = 1e-8) -> torch.optim.Adam:
    """Adam with EDM2's betas (0.9, 0.99) and no weight decay (MP layers need none)."""
    return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=eps)


def make_lr_lambda(ref_steps: float, rampup_steps: float = 0.0):
    """Multiplier for torch.optim.lr_scheduler.LambdaLR (the optimiser's lr is ref_lr)."""
    return lambda step: inverse_sqrt_lr(step, 1.0, ref_steps, rampup_steps)
