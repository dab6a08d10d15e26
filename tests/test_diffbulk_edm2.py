"""DiffBulk stage I (EDM2) network: MP layers, zero-init, taps, loss, sampler, LR, cost.

Tolerances: magnitude checks use >= 2^18 samples, where the sampling error of a mean square is
~ sqrt(2 / n) < 0.3%; we accept 3% (MP_TOL). Zero-init checks are exact (the output gain multiplies
the output convolution's weights by 0), asserted to 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch

from baselines.diffbulk.cost import authors_gene_encoder_params, cost_report, stage2_params
from baselines.diffbulk.edm2.loss import EDM2Loss, loss_weight, uncertainty_loss
from baselines.diffbulk.edm2.mp import (
    MPConv,
    MPFourier,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
    pixel_norm,
    resample,
)
from baselines.diffbulk.edm2.optim import ADAM_BETAS, edm2_lr_nimg, inverse_sqrt_lr, make_adam
from baselines.diffbulk.edm2.precond import Precond, extract_features
from baselines.diffbulk.edm2.sampler import edm_sample, sigma_steps
from baselines.diffbulk.edm2.unet import PAPER_UNET, TINY_UNET, tap_channels

pytestmark = pytest.mark.usefixtures("one_thread")

MP_TOL = 0.03


def ms(x: torch.Tensor) -> float:
    """Mean square (EDM2's 'magnitude')."""
    return float(x.detach().double().square().mean())


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny(**over: object) -> Precond:
    torch.manual_seed(0)
    return Precond(**{**TINY_UNET, **over})


def randomise_gains(net: torch.nn.Module, value: float = 0.7) -> None:
    """Move every zero-initialised gain so the network actually depends on its inputs."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(value)


# ----------------------------------------------------------------------------- MP primitives


def test_mp_layers_preserve_unit_magnitude() -> None:
    g = gen(1)
    x = torch.randn(2048, 256, generator=g)  # 2^19 unit-variance values
    lin = MPConv(256, 512).train()
    assert abs(ms(lin(x)) - 1) < MP_TOL
    conv = MPConv(32, 48, (3, 3)).train()
    img = torch.randn(16, 32, 40, 40, generator=g)
    assert abs(ms(conv(img)[:, :, 1:-1, 1:-1]) - 1) < MP_TOL  # interior: zero padding shrinks borders
    z = torch.randn(1 << 20, generator=g)
    assert abs(ms(mp_silu(z)) - 1) < MP_TOL  # the mean square, not the variance, is preserved
    a, b = torch.randn(1 << 19, generator=g), torch.randn(1 << 19, generator=g)
    for t in (0.3, 0.5):
        assert abs(ms(mp_sum(a, b, t)) - 1) < MP_TOL
    a2, b2 = torch.randn(4096, 64, generator=g), torch.randn(4096, 192, generator=g)
    for t in (0.3, 0.5):
        cat = mp_cat(a2, b2, dim=1, t=t)
        assert cat.shape == (4096, 256) and abs(ms(cat) - 1) < MP_TOL
        # b's share of the energy is t^2 / ((1 - t)^2 + t^2), whatever the channel counts
        share = float(cat[:, 64:].square().sum() / cat.square().sum())
        assert abs(share - t**2 / ((1 - t) ** 2 + t**2)) < 0.01
    fourier = MPFourier(128)(torch.randn(8192, generator=g))
    assert fourier.shape == (8192, 128) and abs(ms(fourier) - 1) < MP_TOL


def test_mp_cat_equal_halves_is_plain_cat() -> None:
    """With t = 0.5 and equal widths mp_cat is torch.cat (why the authors' plain-cat extractor only
    differs where the skip and main widths differ)."""
    a, b = torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4)
    assert torch.allclose(mp_cat(a, b), torch.cat([a, b], 1))
    assert not torch.allclose(mp_cat(a, torch.randn(3, 4, 4, 4)), torch.cat([a, torch.randn(3, 4, 4, 4)], 1))


def test_normalize_and_pixel_norm_give_unit_rms() -> None:
    x = torch.randn(5, 7, 3, 3) * 9
    assert torch.allclose(normalize(x).square().mean(dim=(1, 2, 3)), torch.ones(5), atol=1e-4)
    assert torch.allclose(pixel_norm(x).square().mean(dim=1), torch.ones(5, 3, 3), atol=1e-4)
    assert torch.isfinite(normalize(torch.zeros(2, 3))).all()


def test_forced_weight_normalisation_and_gain() -> None:
    conv = MPConv(6, 4, (3, 3))
    with torch.no_grad():
        conv.weight.mul_(5.0)
    x = torch.randn(2, 6, 5, 5)
    conv.eval()(x)
    assert float(conv.weight.detach().square().mean()) > 10  # eval mode leaves the stored weights alone
    y1 = conv.train()(x)
    rms = conv.weight.square().mean(dim=(1, 2, 3))
    assert torch.allclose(rms, torch.ones(4), atol=1e-3)  # re-normalised in place, per output channel
    assert conv.weight.grad is None  # the in-place update is not part of the graph
    assert torch.allclose(conv(x, gain=2.0), 2 * y1, atol=1e-5)
    assert torch.count_nonzero(conv(x, gain=torch.zeros([]))) == 0


def test_resample_box_filter() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    down = resample(x, "down")
    assert torch.allclose(down, torch.nn.functional.avg_pool2d(x, 2))
    up = resample(down, "up")
    assert torch.allclose(up, down.repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert resample(x, "keep") is x
    with pytest.raises(ValueError, match="resample mode"):
        resample(x, "sideways")


# ----------------------------------------------------------------------------- network


@pytest.mark.parametrize("train", [False, True])
def test_zero_init_gains_give_c_skip_x(train: bool) -> None:
    net = tiny().train(train)
    x = torch.randn(3, 3, 32, 32, generator=gen(2))
    cond = torch.randn(3, TINY_UNET["cond_dim"], generator=gen(3))
    keep = torch.tensor([True, False, True])
    for sigma in (0.002, 0.2, 0.5, 1.0, 5.0, 80.0):
        c_skip = 0.25 / (sigma**2 + 0.25)
        for kwargs in ({}, {"cond": cond}, {"cond": cond, "cond_mask": keep}):
            d = net(x, sigma, **kwargs)
            assert torch.allclose(d, c_skip * x, atol=1e-6), (sigma, kwargs)


def test_zero_init_blocks_ignore_the_embedding_until_gains_move() -> None:
    net = tiny().eval()
    x = torch.randn(2, 3, 32, 32, generator=gen(4))
    cond = torch.randn(2, TINY_UNET["cond_dim"], generator=gen(5))
    _, f0 = net(x, 0.5, None, taps="all")
    _, f1 = net(x, 0.5, cond, taps="all")
    assert all(torch.equal(f0[k], f1[k]) for k in f0)  # emb_gain = 0: modulation is exactly 1
    randomise_gains(net)
    _, g0 = net(x, 0.5, None, taps="all")
    _, g1 = net(x, 0.5, cond, taps="all")
    assert not torch.allclose(g0["dec32"], g1["dec32"])
    assert not torch.allclose(net(x, 0.5), 0.25 / 0.5 * x)


def test_taps_shapes_channels_and_order() -> None:
    net = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    expected = {
        "decoder": {"dec16": (32, 16), "dec32": (16, 32)},
        "encoder": {"enc32": (16, 32), "enc16": (32, 16)},
    }
    expected["all"] = {**expected["encoder"], **expected["decoder"]}
    for taps, want in expected.items():
        d, _, feats = net(x, 1.0, None, taps=taps, return_logvar=True)
        assert d.shape == x.shape
        assert list(feats) == list(want)
        assert {k: (v.shape[1], v.shape[2]) for k, v in feats.items()} == want
        assert net.unet.feature_channels(taps) == {k: c for k, (c, _) in want.items()}
    with pytest.raises(ValueError, match="taps must be one of"):
        net(x, 1.0, taps="middle")


def test_paper_config_topology_and_feature_channels() -> None:
    """Block counts as DiffBulk configures EDM2 (checked against the authors' networks_edm2.py):
    per level 3 encoder blocks (+ conv / down), 4 decoder blocks (+ up, or in0/in1 at 28);
    attention (8 heads of 64) only at 28x28 and in the decoder's in0 block."""
    with torch.device("meta"):
        net = Precond(**PAPER_UNET)
    enc, dec = list(net.unet.enc), list(net.unet.dec)
    for res in (224, 112, 56, 28):
        assert sum(k.startswith(f"{res}x{res}_block") for k in enc) == 3
        assert sum(k.startswith(f"{res}x{res}_block") for k in dec) == 4
    assert enc[0] == "224x224_conv" and [k for k in enc if "down" in k] == [
        "112x112_down",
        "56x56_down",
        "28x28_down",
    ]
    assert dec[:2] == ["28x28_in0", "28x28_in1"] and [k for k in dec if "up" in k] == [
        "56x56_up",
        "112x112_up",
        "224x224_up",
    ]
    heads = {
        f"{n}.{k}": b.num_heads
        for n in ("enc", "dec")
        for k, b in getattr(net.unet, n).items()
        if hasattr(b, "num_heads")
    }
    assert {k for k, h in heads.items() if h} == {
        "enc.28x28_block0",
        "enc.28x28_block1",
        "enc.28x28_block2",
        "dec.28x28_in0",
    } | {f"dec.28x28_block{i}" for i in range(4)}
    assert set(h for h in heads.values() if h) == {8}
    want = {"dec28": 512, "dec56": 384, "dec112": 256, "dec224": 128}
    assert (
        net.unet.feature_channels("decoder") == want == tap_channels(224, PAPER_UNET["channels"], "decoder")
    )
    _, feats = net.unet(
        torch.empty(1, 3, 224, 224, device="meta"), torch.empty(1, device="meta"), taps="decoder"
    )
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        k: (c, int(k[3:]), int(k[3:])) for k, c in want.items()
    }


def test_cond_mask_is_per_sample_pms() -> None:
    """cond_mask True rows see the condition, False rows equal a fully unconditional pass (the
    authors' code uses the noise embedding alone when the condition is dropped)."""
    net = tiny().eval()
    randomise_gains(net)
    x = torch.randn(4, 3, 32, 32, generator=gen(6))
    cond = torch.randn(4, TINY_UNET["cond_dim"], generator=gen(7))
    keep = torch.tensor([True, False, False, True])
    mixed = net(x, 0.7, cond, cond_mask=keep)
    full, none = net(x, 0.7, cond), net(x, 0.7, None)
    assert torch.allclose(mixed[keep], full[keep], atol=1e-6)
    assert torch.allclose(mixed[~keep], none[~keep], atol=1e-6)
    zeros = tiny(uncond="zeros").eval()
    zeros.load_state_dict(net.state_dict())
    assert not torch.allclose(zeros(x, 0.7, None), none)  # mp_sum(noise, 0) = noise / sqrt(2)


def test_authors_quirks_extractor() -> None:
    net = tiny().eval()
    randomise_gains(net)
    x = torch.randn(2, 3, 32, 32, generator=gen(8))
    f_std = extract_features(net, x, 0.01, "decoder", gen(9))
    f_std2 = extract_features(net, x, 0.01, "decoder", gen(9))
    f_q = extract_features(net, x, 0.01, "decoder", gen(9), authors_quirks=True)
    assert all(torch.equal(f_std[k], f_std2[k]) for k in f_std)  # seeded noise: reproducible
    assert list(f_q) == ["dec16", "dec32"] and not torch.allclose(f_q["dec32"], f_std["dec32"])
    with pytest.raises(ValueError, match="authors_quirks"):
        net(x, 0.5, torch.randn(2, TINY_UNET["cond_dim"]), authors_quirks=True)


def test_tiny_training_steps_reduce_the_loss() -> None:
    """A few Adam steps on a fixed batch with a fixed (seeded) sigma / noise draw lower the loss
    (observed 1.35 -> 1.11; asserted drop > 0.05). At init only the output gain and the uncertainty
    head receive gradient: every other weight sits behind the zero output gain."""
    net = tiny().train()
    loss_fn = EDM2Loss()
    x = torch.rand(4, 3, 32, 32, generator=gen(10)) * 2 - 1
    cond = torch.randn(4, TINY_UNET["cond_dim"], generator=gen(11))
    opt = make_adam(net.parameters(), lr=0.01)
    loss = loss_fn(net, x, cond, gen(12)).mean()
    loss.backward()
    first = float(loss.detach())
    grads = {n: float(p.grad.abs().max()) for n, p in net.named_parameters()}
    assert grads["unet.out_gain"] > 0 and grads["logvar_linear.weight"] > 0
    assert all(v == 0 for n, v in grads.items() if n not in ("unet.out_gain", "logvar_linear.weight"))
    opt.step()
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn(net, x, cond, gen(12)).mean()
        loss.backward()
        opt.step()
    print(f"loss {first:.3f} -> {float(loss.detach()):.3f}")
    assert float(loss.detach()) < first - 0.05, (first, float(loss.detach()))


# ----------------------------------------------------------------------------- loss


def test_loss_formula_by_hand() -> None:
    d = torch.tensor([0.5, -1.0, 2.0, 0.0]).reshape(2, 2, 1, 1)
    y = torch.tensor([0.0, 0.0, 1.0, 1.0]).reshape(2, 2, 1, 1)
    sigma = torch.tensor([0.5, 2.0]).reshape(2, 1, 1, 1)
    logvar = torch.tensor([0.1, -0.3]).reshape(2, 1, 1, 1)
    w = [(0.25 + 0.25) / (0.5 * 0.5) ** 2, (4 + 0.25) / (2.0 * 0.5) ** 2]  # (s^2 + sd^2) / (s sd)^2
    se = [(0.25 + 1.0) / 2, (1.0 + 1.0) / 2]  # mean squared error per sample
    lv = [0.1, -0.3]
    want = torch.tensor([w[i] / math.exp(lv[i]) * se[i] + lv[i] for i in range(2)])
    got = uncertainty_loss(d, y, sigma, logvar)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(uncertainty_loss(d, y, sigma, logvar, element_reduction="sum"), 2 * want, atol=1e-5)
    assert torch.allclose(loss_weight(sigma).flatten(), torch.tensor(w))


def test_sigma_distribution_and_reproducibility() -> None:
    s = EDM2Loss().sample_sigma(200_000, gen(13))
    ln = s.log().flatten()
    assert abs(float(ln.mean()) + 0.4) < 0.01 and abs(float(ln.std()) - 1.0) < 0.01
    net = tiny().eval()  # eval: no in-place weight re-normalisation between the two calls
    x = torch.rand(2, 3, 32, 32, generator=gen(14)) * 2 - 1
    a, b = EDM2Loss()(net, x, None, gen(15)), EDM2Loss()(net, x, None, gen(15))
    assert a.shape == (2,) and torch.equal(a, b)


# ----------------------------------------------------------------------------- sampler, LR


def test_sampler_returns_point_mass_and_is_seeded() -> None:
    mu = torch.randn(1, 3, 8, 8, generator=gen(16))
    point = lambda x, s, c: mu.expand_as(x)  # noqa: E731 - exact posterior mean of a point mass
    for steps in (2, 8, 32):
        out = edm_sample(point, (2, 3, 8, 8), generator=gen(17), num_steps=steps)
        assert torch.allclose(out, mu.expand(2, 3, 8, 8), atol=1e-5)
    # Gaussian data N(0, 0.5^2): exact denoiser x s^2 / (s^2 + sigma^2); samples come out N(0, 0.5^2)
    gauss = lambda x, s, c: x * 0.25 / (0.25 + s.reshape(-1, 1, 1, 1) ** 2)  # noqa: E731
    a = edm_sample(gauss, (4096, 1, 1, 1), generator=gen(18))
    assert abs(float(a.std()) - 0.5) < 0.03
    assert torch.equal(a, edm_sample(gauss, (4096, 1, 1, 1), generator=gen(18)))
    assert not torch.equal(a, edm_sample(gauss, (4096, 1, 1, 1), generator=gen(19)))


def test_sampler_guidance_and_schedule() -> None:
    mu_c, mu_u = torch.full((1, 1, 2, 2), 1.0), torch.full((1, 1, 2, 2), -1.0)
    net = lambda x, s, c: (mu_u if c is None else mu_c).expand_as(x)  # noqa: E731
    cond = torch.zeros(1, 4)
    out = edm_sample(net, (1, 1, 2, 2), cond, gen(20), num_steps=4, guidance=1.5)
    assert torch.allclose(out, mu_u + 1.5 * (mu_c - mu_u), atol=1e-5)
    with pytest.raises(ValueError, match="needs a condition"):
        edm_sample(net, (1, 1, 2, 2), None, gen(20), guidance=2.0)
    steps = sigma_steps(32)
    assert (
        len(steps) == 33 and float(steps[0]) == pytest.approx(80) and float(steps[31]) == pytest.approx(0.002)
    )
    assert float(steps[32]) == 0 and bool((steps[1:] < steps[:-1]).all())


def test_sampler_runs_the_tiny_network() -> None:
    net = tiny().eval()
    out = edm_sample(net, (2, 3, 32, 32), torch.randn(2, TINY_UNET["cond_dim"]), gen(21), num_steps=3)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_inverse_sqrt_lr() -> None:
    assert inverse_sqrt_lr(0, 0.01, 1000) == inverse_sqrt_lr(1000, 0.01, 1000) == 0.01
    assert inverse_sqrt_lr(4000, 0.01, 1000) == pytest.approx(0.005)
    assert inverse_sqrt_lr(50, 0.01, 1000, rampup_steps=100) == pytest.approx(0.005)
    # the authors' run (batch 1024, 3 Mi images) never leaves the warm-up and never decays
    assert edm2_lr_nimg(3 << 20, 1024) == pytest.approx(0.012 * (3 << 20) / 1e7)
    assert make_adam([torch.nn.Parameter(torch.zeros(1))]).defaults["betas"] == ADAM_BETAS == (0.9, 0.99)


# ----------------------------------------------------------------------------- cost


def _block(cin: int, cout: int, emb: int, flavor: str, attn: bool) -> int:
    p = 1 + (cout if flavor == "enc" else cin) * cout * 9 + emb * cout + cout * cout * 9
    p += cin * cout if cin != cout else 0
    return p + (4 * cout * cout if attn else 0)


def edm2_param_formula(
    res: int, ch: tuple[int, ...], nb: int, attn: tuple[int, ...], cond: int, img: int = 3
) -> int:
    """Independent count written from the topology description (not from the module code)."""
    emb, p, c, skips = max(ch), 1 + ch[0] * max(ch) + cond * max(ch), img + 1, []
    for lv, w in enumerate(ch):
        r = res >> lv
        p += c * w * 9 if lv == 0 else _block(c, c, emb, "enc", False)
        c = w if lv == 0 else c
        skips.append(c)
        for _ in range(nb):
            p, c = p + _block(c, w, emb, "enc", r in attn), w
            skips.append(c)
    for lv, w in reversed(list(enumerate(ch))):
        r = res >> lv
        p += (
            _block(c, c, emb, "dec", True) + _block(c, c, emb, "dec", False)
            if lv == len(ch) - 1
            else _block(c, c, emb, "dec", False)
        )
        for _ in range(nb + 1):
            p, c = p + _block(c + skips.pop(), w, emb, "dec", r in attn), w
    return p + c * img * 9 + 128  # output conv + uncertainty head MPConv(128, 1)


def test_cost_report_paper_config() -> None:
    """Paper: ~122.4M parameters (U-Net with the gene encoder), 25.66 'GFLOPs' per 224 tile.
    Measured: 120,201,253 for the network; + the authors' per-panel gene encoder (2,236,928) =
    122,438,181, which matches 122.4M. FLOPs: 1075.7 GFLOPs = 537.9 GMACs: the paper's 25.66 matches
    NEITHER convention (21x below the MAC count); see the method card."""
    r = cost_report(PAPER_UNET, device="meta")
    p = PAPER_UNET
    formula = edm2_param_formula(
        p["img_resolution"], p["channels"], p["num_blocks"], p["attn_resolutions"], p["cond_dim"]
    )
    assert r["params_network"] == formula == 120_201_253
    assert abs(r["params_network_plus_authors_gene_encoder"] - 122.4e6) < 0.05e6
    assert r["gmacs"] == pytest.approx(r["gflops_torch"] / 2)
    assert 530 < r["gmacs"] < 545 and r["paper_gflops_matches"] == "neither"


def test_cost_counts_match_between_cpu_and_meta_and_gene_encoder_formula() -> None:
    a, b = cost_report(TINY_UNET, tile_px=32, device="cpu"), cost_report(TINY_UNET, tile_px=32, device="meta")
    assert a["gflops_torch"] == b["gflops_torch"] > 0 and a["params_network"] == b["params_network"]
    t = TINY_UNET
    assert a["params_network"] == edm2_param_formula(
        t["img_resolution"], t["channels"], t["num_blocks"], t["attn_resolutions"], t["cond_dim"]
    )
    # authors' GeneModel layout rebuilt from torch modules, counted, vs the closed form
    d = 256
    mods = [
        torch.nn.LayerNorm(d),
        torch.nn.MultiheadAttention(d, 8),
        torch.nn.LayerNorm(d),
        torch.nn.Linear(d, 4 * d),
        torch.nn.Linear(4 * d, d),
    ]
    block = sum(q.numel() for m in mods for q in m.parameters())
    pool = d + sum(q.numel() for q in torch.nn.MultiheadAttention(d, 8).parameters())
    assert authors_gene_encoder_params() == 1539 * d + 2 * block + pool == 2_236_928


def test_stage2_params_about_2_5m() -> None:
    """Paper ~2.5M: decoder taps, PLIP 512, gated fusion with the code's Linear on z_diff:
    2,263,552 + 513 G -> 2,541,085 for the 541-gene HEST-Bowel panel."""
    s = stage2_params(541)
    assert s["params"] == s["formula"] == 2_263_552 + 513 * 541
    assert abs(s["params"] - 2.5e6) < 0.1e6
    assert stage2_params(100, taps="all")["tap_channels"] == {
        **tap_channels(224, (128, 256, 384, 512), "all")
    }
