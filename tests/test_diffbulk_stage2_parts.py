"""DiffBulk stage II parts (MSFE-Net, fusions, regressor head) and PMS condition dropout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.diffbulk.fusion import (
    FUSIONS,
    FusedRegressor,
    Fusion,
    count_trainable,
    stage2_trainable_parameters,
)
from baselines.diffbulk.msfe import MSFENet, ScaleBranch, tap_channels
from baselines.diffbulk.pms import PMS, apply_pms, pms_keep_mask, select_conditioned, step_generator
from stbench.errors import UnknownNameError

pytestmark = pytest.mark.usefixtures("one_thread")

PAPER_DECODER = {"dec28": 512, "dec56": 384, "dec112": 256, "dec224": 128}


def _feature_maps(taps: dict[str, int], b: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Spatial size = resolution / 14 (2..16; the real ones are 28..224) keeps the test fast."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(b, c, int(n[3:]) // 14, int(n[3:]) // 14, generator=g) for n, c in taps.items()}


# ---- MSFE-Net ------------------------------------------------------------------------------------
def test_tap_channels_paper_setting_and_unet_names() -> None:
    assert tap_channels("decoder") == PAPER_DECODER
    assert list(tap_channels("decoder")) == list(PAPER_DECODER)  # concat order 28, 56, 112, 224
    assert tap_channels("encoder") == {"enc224": 128, "enc112": 256, "enc56": 384, "enc28": 512}
    assert list(tap_channels("all")) == list(tap_channels("encoder")) + list(tap_channels("decoder"))
    assert tap_channels("decoder", channels=(16, 32), img_resolution=32) == {"dec16": 32, "dec32": 16}
    with pytest.raises(UnknownNameError):
        tap_channels("middle")
    # same names and order as the EDM2 U-Net's feature taps (another file of this method)
    from baselines.diffbulk.edm2.unet import tap_channels as unet_taps

    for layers in ("decoder", "encoder", "all"):
        assert list(tap_channels(layers).items()) == list(
            unet_taps(224, (128, 256, 384, 512), layers).items()
        )


@pytest.mark.parametrize(
    ("layers", "proj_dim", "out_dim"),
    [("decoder", None, 512), ("encoder", None, 512), ("all", None, 1024), ("all", 512, 512)],
)
def test_msfe_output_dims(layers: str, proj_dim: int | None, out_dim: int) -> None:
    torch.manual_seed(0)
    taps = tap_channels(layers)
    net = MSFENet(taps, proj_dim=proj_dim).eval()
    feats = _feature_maps(taps)
    feats["dec999"] = torch.zeros(2, 3, 1, 1)  # extra keys are ignored
    z = net(feats)
    assert net.out_dim == out_dim and z.shape == (2, out_dim)
    if proj_dim is None:  # a sequence in tap order gives the same result as the mapping
        assert torch.equal(net([feats[n] for n in taps]), z)


def test_msfe_matches_hand_computation_and_checks_inputs() -> None:
    torch.manual_seed(0)
    net = MSFENet(PAPER_DECODER).eval()
    feats = _feature_maps(PAPER_DECODER)
    parts = []
    for branch, name in zip(net.branches, PAPER_DECODER, strict=True):
        y = F.conv2d(feats[name], branch.conv.weight, branch.conv.bias, padding=1)
        y = F.group_norm(y, 32, branch.norm.weight, branch.norm.bias)
        parts.append(F.silu(y).mean(dim=(2, 3)))
    assert torch.allclose(net(feats), torch.cat(parts, 1), atol=1e-6, rtol=0)
    with pytest.raises(KeyError, match="dec28"):
        net({k: v for k, v in feats.items() if k != "dec28"})
    feats["dec56"] = torch.zeros(2, 100, 4, 4)
    with pytest.raises(ValueError, match=r"dec56.*384"):
        net(feats)
    with pytest.raises(ValueError, match="divisible"):
        ScaleBranch(8, width=20, groups=32)


def test_msfe_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    net = MSFENet({"a": 4}, width=32, groups=8, dropout=0.5)
    x = torch.randn(64, 4, 3, 3)
    net.train()
    z = net([x])
    assert (z == 0).float().mean() > 0.3  # dropout on the pooled vector
    net.eval()
    assert (net([x]) == 0).float().mean() < 0.05


# ---- fusions -------------------------------------------------------------------------------------
def _z(seed: int = 3, b: int = 4, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)


def test_fusion_forms_equal_hand_computations() -> None:
    """Fixed (seeded) weights; every form against its formula written out with the weight matrices."""
    torch.manual_seed(0)
    zf, zd = _z()
    f = Fusion("gated", 8, 8)
    g = torch.sigmoid(torch.cat([zf, zd], 1) @ f.gate.weight.T + f.gate.bias)
    want = zf + g * (zd @ f.diff_proj.weight.T + f.diff_proj.bias)  # code form: Linear on z_diff
    assert torch.allclose(f(zf, zd), want, atol=1e-6, rtol=0)

    f = Fusion("gated", 8, 8, diff_proj=False)  # paper Eq. (6)-(7)
    g = torch.sigmoid(torch.cat([zf, zd], 1) @ f.gate.weight.T + f.gate.bias)
    assert torch.allclose(f(zf, zd), zf + g * zd, atol=1e-6, rtol=0)

    f = Fusion("add", 8, 8, c_init=0.3)  # learned: c = sigmoid(raw), raw initialised to c_init
    c = 1 / (1 + math.exp(-0.3))
    assert isinstance(f.c_raw, nn.Parameter) and f.c().item() == pytest.approx(c)
    assert torch.allclose(f(zf, zd), c * zf + (1 - c) * zd, atol=1e-6, rtol=0)
    f = Fusion("add", 8, 8, c_init=0.3, learn_c=False)  # fixed: c used as is
    assert count_trainable([f]) == 0
    assert torch.allclose(f(zf, zd), 0.3 * zf + 0.7 * zd, atol=1e-6, rtol=0)

    f = Fusion("concat", 8, 6)
    zd6 = zd[:, :6]
    c = torch.sigmoid(torch.tensor(1.0))  # config default c = 1.0 -> starts at 0.731
    assert f.out_dim == 14 and torch.allclose(f(zf, zd6), torch.cat([zf, c * zd6], 1), atol=1e-6, rtol=0)

    f = Fusion("film", 8, 8)
    want = (
        (1 + zd @ f.film_gamma.weight.T + f.film_gamma.bias) * zf
        + zd @ f.film_beta.weight.T
        + f.film_beta.bias
    )
    assert torch.allclose(f(zf, zd), want, atol=1e-6, rtol=0)

    assert torch.equal(Fusion("diff_only", 8, 6)(None, zd6), zd6)


def test_fm_only_reduces_exactly_to_z_fm() -> None:
    torch.manual_seed(0)
    zf, zd = _z()
    f = Fusion("fm_only", 8, 8)
    assert not f.needs_diff and count_trainable([f]) == 0
    assert torch.equal(f(zf, None), zf) and torch.equal(f(zf, zd), zf)
    # the gated fusion whose z_diff path is switched off (zero projection) is exactly z_fm
    g = Fusion("gated", 8, 8)
    with torch.no_grad():
        g.diff_proj.weight.zero_()
        g.diff_proj.bias.zero_()
    assert torch.equal(g(zf, zd), zf)
    head = FusedRegressor(f, 5)
    assert torch.equal(head(zf, None), head.decoder(zf))  # FM-branch-only = linear probe on PLIP


def test_fusion_errors() -> None:
    with pytest.raises(UnknownNameError):
        Fusion("sum")
    with pytest.raises(ValueError, match="proj_dim=512"):
        Fusion("add", 512, 1024)
    with pytest.raises(ValueError, match="diff_proj=True"):
        Fusion("gated", 512, 1024, diff_proj=False)
    assert Fusion("gated", 512, 1024).out_dim == 512  # code form absorbs a 1024-d "all" z_diff
    with pytest.raises(ValueError, match="z_diff"):
        Fusion("gated", 8, 8)(torch.zeros(1, 8), None)
    with pytest.raises(ValueError, match="n_genes"):
        FusedRegressor(Fusion("fm_only"), 0)
    assert set(FUSIONS) >= {"gated", "add", "concat", "fm_only", "diff_only"}


def test_stage2_trainable_parameters_paper_setting() -> None:
    """Paper (4 decoder taps 512/384/256/128, width 128, PLIP 512, gated with the code's Linear on
    z_diff): params = 2,263,552 + 513 G. G = 200 -> 2,366,152; the paper's ~2.5M corresponds to
    G ~ 461 (the all-genes setting: 460 genes -> 2,499,532; 541 -> 2,541,085)."""
    for g in (100, 200, 460, 538, 541):
        n = stage2_trainable_parameters(g)
        assert n == 2_263_552 + 513 * g
        print(f"stage II trainable parameters, G={g}: {n:,}")
    g_25 = (2_500_000 - 2_263_552) / 513
    print(f"G giving 2.5M: {g_25:.1f}")
    assert 455 < g_25 < 465
    torch.manual_seed(0)
    msfe = MSFENet(tap_channels("decoder"))
    head = FusedRegressor(Fusion("gated", 512, msfe.out_dim), 200)
    assert count_trainable([msfe, head]) == stage2_trainable_parameters(200) == 2_366_152
    assert stage2_trainable_parameters(200, fusion="fm_only") == 513 * 200
    assert stage2_trainable_parameters(200, layers="all") > stage2_trainable_parameters(200)


# ---- PMS ----------------------------------------------------------------------------------------
def _tol(p: float, n: int) -> float:
    """4 binomial standard deviations of a frequency over n draws (false failure rate ~6e-5)."""
    return 4 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_pms_sample_mode_drop_frequency(p: float) -> None:
    """200 batches x 64 = 12,800 per-sample draws: dropped fraction within p +- 4 sigma (0.0177 at p=.5);
    observed 0.4963 (p=.5), 0.1984 (p=.2)."""
    gen = torch.Generator().manual_seed(0)
    masks = torch.stack([pms_keep_mask(64, p, "sample", gen) for _ in range(200)])
    dropped = (~masks).float().mean().item()
    assert abs(dropped - p) < _tol(p, masks.numel()), dropped
    mixed = ((masks.any(1)) & (~masks.all(1))).float().mean()
    assert mixed > 0.9  # per sample: batches mix conditional and unconditional rows


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_pms_step_mode_drops_all_or_none(p: float) -> None:
    """2,000 steps of batch 16: each batch all kept or all dropped; dropped-batch fraction within
    p +- 4 sigma (0.045 at p=.5); observed 0.5045 (p=.5), 0.2000 (p=.2)."""
    gen = torch.Generator().manual_seed(0)
    masks = torch.stack([pms_keep_mask(16, p, "step", gen) for _ in range(2000)])
    assert bool((masks.all(1) | (~masks).all(1)).all())
    dropped = (~masks[:, 0]).float().mean().item()
    assert abs(dropped - p) < _tol(p, 2000), dropped


def test_apply_pms_outputs_and_determinism() -> None:
    cond = torch.arange(1.0, 13.0).reshape(6, 2)
    out1, keep1 = apply_pms(cond, 0.5, "sample", torch.Generator().manual_seed(4))
    out2, keep2 = apply_pms(cond, 0.5, "sample", torch.Generator().manual_seed(4))
    assert torch.equal(keep1, keep2) and (out1 is None) == (out2 is None)
    masks = {
        tuple(pms_keep_mask(16, 0.5, "sample", torch.Generator().manual_seed(s)).tolist()) for s in range(5)
    }
    assert len(masks) == 5  # different seeds, different draws
    keep = torch.tensor([True, False, True, False, False, True])
    out, k = apply_pms(cond, 0.5, keep_mask=keep)
    assert torch.equal(out[keep], cond[keep]) and torch.count_nonzero(out[~keep]) == 0
    assert apply_pms(cond, 0.0)[0] is cond  # p = 0: never dropped
    none, k = apply_pms(cond, 1.0)  # p = 1: all dropped -> None (skip the gene encoder)
    assert none is None and not k.any()
    # the U-Net picks per sample between the unconditional and the conditional embedding
    unc, con = torch.zeros(6, 3), torch.ones(6, 3)
    assert torch.equal(select_conditioned(unc, con, keep)[:, 0], keep.float())
    assert torch.equal(select_conditioned(unc, None, keep), unc)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pms_keep_mask(4, 1.5)
    with pytest.raises(UnknownNameError):
        pms_keep_mask(4, 0.5, "epoch")
    with pytest.raises(ValueError, match="keep_mask"):
        apply_pms(cond, 0.5, keep_mask=torch.ones(3, dtype=torch.bool))


def test_pms_state_resume_and_step_generator() -> None:
    a = PMS(0.5, "sample", seed=11)
    a.keep_mask(8)
    state = a.state_dict()
    nxt = a.keep_mask(32)
    b = PMS(0.5, "sample", seed=999)
    b.load_state_dict(state)
    assert torch.equal(b.keep_mask(32), nxt)
    # per-step generators: fixed by (seed, step, rank); rank 0 everywhere for mode="step"
    m1 = pms_keep_mask(8, 0.5, "step", step_generator(3, 17))
    m2 = pms_keep_mask(8, 0.5, "step", step_generator(3, 17))
    assert torch.equal(m1, m2)
    draws = [bool(pms_keep_mask(1, 0.5, "step", step_generator(3, s))[0]) for s in range(64)]
    assert 0 < sum(draws) < 64
