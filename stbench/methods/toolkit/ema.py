"""Exponential moving average of a network's weights (Stem: decay 0.9999 after every optimiser step,
started as an exact copy; the EMA network is the one that samples). `warmup=True` (not in Stem;
for short runs such as the tiny config) uses decay min(decay, (1 + n) / (10 + n)) at update n, so
the average forgets the random initialisation within the first few dozen steps.

The average is a frozen deep copy registered as a submodule, so it is saved in (and restored from)
every checkpoint with the live weights, and DDP ranks (which hold identical weights after each
step) keep identical averages. Shared by Stem and STMDiT, hence in the toolkit.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.shadow = copy.deepcopy(model)
        self.shadow.requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * model, parameter by parameter; buffers copied."""
        decay = self.current_decay()
        live = dict(model.named_parameters())
        for name, p in self.shadow.named_parameters():
            p.lerp_(live[name].detach(), 1.0 - decay)
        live_buffers = dict(model.named_buffers())
        for name, b in self.shadow.named_buffers():
            b.copy_(live_buffers[name])
        self.updates += 1

    def current_decay(self) -> float:
        n = int(self.updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def forward(self, *args, **kwargs):
        return self.shadow(*args, **kwargs)
