"""Seeded noise for generative methods at validation and prediction time.

Why one helper: a sampled prediction must not depend on how spots were batched, on the rank that
holds them, or on anything drawn before (the global RNG does all three). Every generative method
therefore draws its noise from generators derived only from (method seed, a named stream, the
spots' global indices). numpy's SeedSequence mixes those integers, so neighbouring spot indices
get unrelated streams; the stream name keeps e.g. validation noise apart from prediction noise.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np
import torch


def _stream_id(stream: str | int) -> int:
    return int(stream) if isinstance(stream, int) else zlib.crc32(stream.encode())


def _seeded(entropy: list[int], device: torch.device | str) -> torch.Generator:
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def _indices(index: torch.Tensor | Iterable[int]) -> list[int]:
    if torch.is_tensor(index):
        return [int(i) for i in index.detach().cpu().reshape(-1).tolist()]
    return [int(i) for i in index]


def spot_generators(
    index: torch.Tensor | Iterable[int], seed: int, stream: str | int, device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per spot: spot i's noise is the same in any batch, on any rank."""
    sid = _stream_id(stream)
    return [_seeded([int(seed), sid, i], device) for i in _indices(index)]


def group_generator(
    index: torch.Tensor | Iterable[int], seed: int, stream: str | int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """One generator for a group of spots sampled jointly (a whole slide): seeded by the whole
    ordered index list, so the same slide gets the same noise on any rank."""
    return _seeded([int(seed), _stream_id(stream), *_indices(index)], device)
