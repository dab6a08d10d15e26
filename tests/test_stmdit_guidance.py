"""STMDiT dual classifier-free guidance and modality dropout (issue 8, criteria 1 and 2), and the
two latent objectives' samplers.

Tolerances: batched guidance equals three separate passes to 1e-5 (float32, same weights, the
DiT's per-sample null tokens); regime shares within 4 binomial standard deviations over 200,000
draws."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.stmdit.dit import build_dit
from baselines.stmdit.guidance import (
    REGIME_KEEP,
    combine,
    guided_prediction,
    modality_keep,
    regime_proportions,
)
from baselines.stmdit.objectives import LatentObjective
from stbench.methods.sampling import spot_generators

pytestmark = pytest.mark.usefixtures("one_thread")


def test_guidance_formula_against_a_hand_computation() -> None:
    e0 = torch.tensor([1.0, -2.0])
    eu = torch.tensor([3.0, 0.0])
    ef = torch.tensor([2.0, 5.0])
    # eps = e0 + 4 (eu - e0) + 3 (ef - eu): [1 + 8 - 3, -2 + 8 + 15]
    assert torch.equal(combine(e0, eu, ef, 4.0, 3.0), torch.tensor([6.0, 21.0]))
    assert torch.equal(combine(e0, eu, ef, 1.0, 1.0), ef)  # unit scales = the full-condition pass
    assert torch.equal(combine(e0, eu, ef, 0.0, 0.0), e0)


def test_batched_guidance_equals_separate_passes_on_the_dit() -> None:
    torch.manual_seed(0)
    net = build_dit("tiny", ge={"fusion": "xattn", "tokens": "pma", "ge_dim": 16, "k": 4}).eval()
    with torch.no_grad():  # move the zero-initialised outputs so every path matters
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    b = 3
    x, t = torch.randn(b, 16, 8, 8), torch.tensor([10.0, 500.0, 999.0])
    uni, ge = torch.randn(b, 1536), torch.randn(b, 12, 16)

    def model_fn(xx, tt, uk, gk):
        reps = xx.shape[0] // b
        return net(xx, tt, uni=uni.repeat(reps, 1), ge_tokens=ge.repeat(reps, 1, 1), uni_keep=uk, ge_keep=gk)

    with torch.no_grad():
        batched = guided_prediction(model_fn, x, t, 4.0, 3.0, batched=True)
        separate = guided_prediction(model_fn, x, t, 4.0, 3.0, batched=False)
        by_hand = combine(
            *(model_fn(x, t, torch.full((b,), u), torch.full((b,), g)) for u, g in
              [(False, False), (True, False), (True, True)]),
            4.0, 3.0,
        )  # fmt: skip
    assert torch.allclose(batched, separate, atol=1e-5)
    assert torch.allclose(separate, by_hand, atol=1e-6)


@pytest.mark.parametrize("p_uni,p_ge", [(0.5, 0.5), (0.1, 0.3), (0.0, 1.0)])
def test_modality_dropout_gives_the_four_regimes_in_proportion(p_uni: float, p_ge: float) -> None:
    n = 200_000
    uni, ge = modality_keep(n, p_uni, p_ge, torch.Generator().manual_seed(1))
    expected = regime_proportions(p_uni, p_ge)
    assert math.isclose(sum(expected.values()), 1.0)
    for regime, (u, g) in REGIME_KEEP.items():
        share = ((uni == u) & (ge == g)).float().mean().item()
        sd = math.sqrt(expected[regime] * (1 - expected[regime]) / n)
        assert abs(share - expected[regime]) <= 4 * sd + 1e-12, (regime, share, expected[regime])
    # independence: the two drops are uncorrelated
    if 0 < p_uni < 1 and 0 < p_ge < 1:
        assert abs(torch.corrcoef(torch.stack([uni.float(), ge.float()]))[0, 1].item()) < 0.01


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_samplers_are_seeded_per_spot_and_losses_are_finite(kind: str) -> None:
    obj = LatentObjective(kind)

    def predict(x, t):  # a fixed denoiser: velocity/eps proportional to x
        return torch.cat([0.5 * x, torch.zeros_like(x)], dim=1)

    gens = spot_generators([4, 9], seed=0, stream="stmdit")
    a = obj.sample(predict, (2, 16, 4, 4), gens, steps=5)
    alone = obj.sample(predict, (1, 16, 4, 4), spot_generators([9], 0, "stmdit"), steps=5)
    assert a.shape == (2, 16, 4, 4) and torch.isfinite(a).all()
    assert torch.allclose(a[1:], alone, atol=1e-6)
    loss = obj.loss(predict, torch.randn(3, 16, 4, 4), torch.Generator().manual_seed(0))
    assert loss.shape == (3,) and torch.isfinite(loss).all()


def test_flow_euler_follows_the_exact_velocity_of_a_point_mass() -> None:
    """With data = a point mass mu, the true velocity at x_t is (x_t - mu) / t: Euler from t = 1
    lands exactly on mu."""
    obj = LatentObjective("flow")
    mu = torch.full((1, 16, 2, 2), 0.7)

    def predict(x, t):
        tt = (t / obj.num_steps).clamp_min(1e-6).view(-1, 1, 1, 1)
        return torch.cat([(x - mu) / tt, torch.zeros_like(x)], dim=1)

    out = obj.sample(predict, (1, 16, 2, 2), spot_generators([0], 0, "s"), steps=10)
    assert torch.allclose(out, mu, atol=1e-5)
