"""Seeded sampling noise: a spot's draws depend on (seed, stream, its global index) only."""

from __future__ import annotations

import torch

from stbench.methods.sampling import group_generator, spot_generators


def _draw(gens: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(5, generator=g) for g in gens])


def test_spot_noise_does_not_depend_on_the_batch_it_is_in() -> None:
    together = _draw(spot_generators(torch.tensor([3, 10, 11]), seed=0, stream="predict"))
    alone = _draw(spot_generators([10], seed=0, stream="predict"))
    reordered = _draw(spot_generators(torch.tensor([11, 10]), seed=0, stream="predict"))
    assert torch.equal(together[1], alone[0])
    assert torch.equal(together[1], reordered[1]) and torch.equal(together[2], reordered[0])


def test_neighbouring_spots_seeds_and_streams_give_unrelated_noise() -> None:
    base = _draw(spot_generators(range(50), seed=0, stream="predict"))
    corr = torch.corrcoef(base)
    off = corr[~torch.eye(50, dtype=torch.bool)]
    assert off.abs().max() < 0.999  # no two spots share a stream
    for other in (
        _draw(spot_generators(range(50), seed=1, stream="predict")),
        _draw(spot_generators(range(50), seed=0, stream="val")),
    ):
        assert not torch.isclose(base, other).any()


def test_group_generator_is_a_function_of_the_ordered_indices() -> None:
    a = torch.randn(8, generator=group_generator(torch.tensor([4, 5, 6]), 0, "stflow"))
    b = torch.randn(8, generator=group_generator([4, 5, 6], 0, "stflow"))
    c = torch.randn(8, generator=group_generator([4, 5, 7], 0, "stflow"))
    assert torch.equal(a, b) and not torch.allclose(a, c)
