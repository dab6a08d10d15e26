"""HINGE (`hinge`): identity at initialisation, the masked-diffusion schedule, curriculum and sampler,
ablation options, seeded predictions, slim checkpoints, vocabulary mapping, parameter counts, and a
fit + test through the runner.

Fit + test on the synthetic dataset (tiny config, held-out slide P0S0, seed 0): thresholds test MSE
below the `mean` predictor's (0.422) and gene-wise PCC > 0.04 (with 131 test spots x 50 genes the
mean PCC of an uninformed predictor has s.d. ~0.012 for independent genes: 0.04 is > 3 s.d.).
Observed: MSE 0.406, PCC 0.091, ~9 s for the job on 2 shared cores (seeds 1-4: MSE 0.400-0.416,
PCC 0.050-0.131).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from method_harness import run_method

from baselines._scfm import build_backbone
from baselines.hinge.condition import timestep_embedding
from baselines.hinge.gaussian import GaussianDiffusion
from baselines.hinge.masking import (
    MaskSchedule,
    auto_zeta,
    masked_loss,
    masked_sample,
    random_ranks,
    step_times,
    visible_mask,
)
from baselines.hinge.method import Hinge
from baselines.hinge.model import HingeNet, LoRALinear
from baselines.hinge.softadaln import ETA_BIAS, GATE_BIAS
from stbench.methods.registry import register_method

CONFIGS = Path(__file__).resolve().parents[1] / "baselines" / "hinge" / "configs"
TINY_ENC = {
    "encoder": "resnet18",
    "weights": "none",
    "encoder_overrides": {"layers": [1, 1, 1, 1], "input_px": 16},
}
HIST = 512  # the tiny ResNet-18's feature width
# Trainable / frozen parameters of HINGE on CellFM (D = 1536, UNI||CONCH 1536-d, G = 200 genes,
# the default 24,080-row gene table), counted on the meta device; README.md quotes them.
COUNTS = {"80m": (43_198_469, 77_570_817), "800m": (581_468_241, 795_030_273)}


def _tiny_net(seed: int = 0, g: int = 20, **kw) -> HingeNet:
    torch.manual_seed(seed)
    return HingeNet(build_backbone("cellfm", "tiny"), 12, g, **kw).double().eval()


def _inputs(b: int = 3, g: int = 20, seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(b, g, generator=gen, dtype=torch.float64) * 3
    visible = torch.rand(b, g, generator=gen) > 0.4
    t = torch.randint(1, 51, (b,), generator=gen)
    hist = torch.randn(b, 12, generator=gen, dtype=torch.float64)
    return values, torch.arange(1, g + 1), visible, t, hist


def _set_identity(net: HingeNet, eta_bias: float, gate_bias: float) -> None:
    with torch.no_grad():
        for m in [*net.pre_attn, *net.pre_ffn, net.pre_dec]:
            m.norm.b.fill_(eta_bias)
        for gate in [*net.gate_attn, *net.gate_ffn]:
            gate.proj.bias.fill_(gate_bias)


# ---- acceptance 1: identity at initialisation ---------------------------------------------------------
def test_identity_with_eta_zero_and_gate_one_equals_frozen_backbone() -> None:
    """eta = sigmoid(-1e4) = 0 and tau = sigmoid(1e4) = 1 exactly (s = kappa = 0 at init): the conditioned
    model IS the frozen backbone, for any histology and timestep (float32, the criterion's 1e-6)."""
    net = _tiny_net().float()
    _set_identity(net, -1e4, 1e4)
    values, ids, visible, t, hist = (x.float() if x.is_floating_point() else x for x in _inputs())
    ref = net.backbone(values, ids, visible)
    for h, tt in ((hist, t), (hist * 5 + 1, torch.full_like(t, 50))):
        out = net(values, ids, visible, tt, h)
        assert (out - ref).abs().max().item() <= 1e-6
    assert ref.abs().max() > 0.05  # the comparison is not between two zero vectors


def test_default_initialisation_stays_within_the_gate_bound() -> None:
    """Default init: every gate is the constant tau0 = sigmoid(6) (weights 0), every SoftNorm mixes
    eta0 = sigmoid(-12) = 6.1e-6 of the standardised input. Each of the 2L gated sites scales one
    residual branch by tau0, a relative change of eps = 1 - tau0 = 2.47e-3 of that branch that the
    post-LN renormalises; to first order the output moves by at most eps * max|f| per site, so
    BOUND: max|f_init - f_backbone| <= 2L * (1 - tau0) * max|f_backbone| (L = 2 here: 4.9e-3 * max|f|).
    First order in eps is checked too: halving 1 - tau0 halves the deviation."""
    net = _tiny_net()
    values, ids, visible, t, hist = _inputs()
    c = net.cond(t, hist, visible)
    tau0, eta0 = torch.sigmoid(torch.tensor(GATE_BIAS)), torch.sigmoid(torch.tensor(ETA_BIAS))
    for gate in [*net.gate_attn, *net.gate_ffn]:  # input-independent at init
        assert torch.allclose(gate(c), tau0.double().expand(3, 1, net.backbone.dim))
    assert net.pre_attn[0].norm.eta.item() == pytest.approx(eta0.item())
    out = net(values, ids, visible, t, hist)
    ref = net.backbone(values, ids, visible)
    dev = (out - ref).abs().max().item()
    bound = 2 * len(net.backbone.blocks) * (1 - tau0.item()) * ref.abs().max().item()
    print(f"default-init deviation {dev:.2e} <= bound {bound:.2e}")
    assert 0 < dev <= bound
    # first order: gate bias b with 1 - sigmoid(b) halved -> deviation halves (eta kept at eta0)
    eps = 1 - tau0.item()
    _set_identity(net, ETA_BIAS, math.log((1 - eps / 2) / (eps / 2)))
    dev_half = (net(values, ids, visible, t, hist) - ref).abs().max().item()
    assert 0.4 < dev_half / dev < 0.6, (dev, dev_half)


def test_only_modulation_parameters_require_grad() -> None:
    net = _tiny_net()
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in net.modulation_parameters()}
    assert not any(p.requires_grad for p in net.backbone.parameters())
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    print(f"tiny: trainable {n_train:,}, frozen {n_frozen:,}")
    # a training step moves the modulation only
    before = {n: p.clone() for n, p in net.backbone.named_parameters()}
    values, ids, visible, t, hist = _inputs()
    opt = torch.optim.AdamW(net.modulation_parameters(), lr=1e-2)
    net(values, ids, visible, t, hist).pow(2).mean().backward()
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in net.backbone.named_parameters())
    assert net.pre_dec.shift.weight.abs().sum() > 0


def test_scgpt_backbone_identity_and_training() -> None:
    """The paper's second backbone through the same contract (scGPT: post-LN blocks, alpha = 1)."""
    torch.manual_seed(0)
    bb = build_backbone("scgpt", "tiny").double().eval()
    net = HingeNet(bb, 12, 20).double().eval()
    _set_identity(net, -1e4, 1e4)
    values, ids, visible, t, hist = _inputs()
    assert (net(values, ids, visible, t, hist) - bb(values, ids, visible)).abs().max().item() <= 1e-6
    m = Hinge(20, None, backbone="scgpt", size="tiny", K=5, **TINY_ENC)
    batch = {
        "expression": torch.rand(4, 20),
        "features": {"resnet18": torch.randn(4, HIST)},
        "index": torch.arange(4),
    }
    m.loss(batch).backward()
    assert not any(p.requires_grad for p in m.net.backbone.parameters())
    assert m.eval().predict_expression(batch).shape == (4, 20)


@pytest.mark.parametrize("size", ["80m", "800m"])
def test_trainable_and_frozen_counts_on_meta_device(size: str) -> None:
    with torch.device("meta"):
        net = HingeNet(build_backbone("cellfm", size), 1536, 200)
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    print(f"{size}: trainable {n_train:,}, frozen {n_frozen:,}")
    assert (n_train, n_frozen) == COUNTS[size]
    # closed form (README): 14,164,994 L + 14,561,281 + 1536 G for D = 1536, histology 1536-d
    assert n_train == 14_164_994 * len(net.backbone.blocks) + 14_561_281 + 1536 * 200


# ---- acceptance 2: schedule, sampler, curriculum ------------------------------------------------
@pytest.mark.parametrize("g", [5, 50, 200, 3000])
def test_schedule_endpoints_and_monotone(g: int) -> None:
    s = MaskSchedule(g, T=50)
    ab = s.alpha_bars
    assert ab[0].item() == 1.0 and ab[-1].item() == 0.0
    assert bool((ab[1:] < ab[:-1]).all())  # strictly decreasing
    assert s.n_masked(0).item() == 0 and s.n_masked(50).item() == g
    assert bool((s.n_masked_table[1:] >= s.n_masked_table[:-1]).all())
    assert 1.05 <= s.zeta <= 4.0


def test_zeta_is_log_t_of_g_clipped() -> None:
    assert auto_zeta(200, 50) == pytest.approx(math.log(200) / math.log(50))  # 1.354 (METHODS.md)
    assert auto_zeta(200, 50) == pytest.approx(1.354, abs=1e-3)
    assert auto_zeta(20, 50) == 1.05 and auto_zeta(10**9, 50) == 4.0
    assert MaskSchedule(200, 50, zeta=2.0).zeta == 2.0


def test_masks_nested_in_t_with_exact_counts() -> None:
    s = MaskSchedule(37, T=50)
    ranks = random_ranks(6, 37, torch.Generator().manual_seed(0))
    assert bool((ranks.sort(dim=1).values == torch.arange(37)).all())  # a permutation per row
    prev = visible_mask(ranks, s, 0)
    assert bool(prev.all())
    for t in range(1, 51):
        vis = visible_mask(ranks, s, t)
        assert bool((vis <= prev).all())  # once masked, masked for larger t
        assert bool(((~vis).sum(1) == s.n_masked(t)).all())
        prev = vis


@pytest.mark.parametrize("k", [50, 5, 7])
def test_sampler_reveals_every_gene_once_and_never_changes_it(k: int) -> None:
    g, b = 23, 4
    s = MaskSchedule(g, T=50)
    ranks = random_ranks(b, g, torch.Generator().manual_seed(1))
    noise = torch.Generator().manual_seed(2)
    calls: list[torch.Tensor] = []

    def predict(values: torch.Tensor, visible: torch.Tensor, t: int) -> torch.Tensor:
        out = torch.randn(b, g, generator=noise)  # a different "x0_hat" at every call
        calls.append(out)
        return out

    trace: list = []
    fill = torch.zeros(b, g)
    x = masked_sample(predict, ranks, s, k, fill, trace)
    assert len(calls) == len(step_times(50, k)) - 1 <= k
    assert trace[0][0] == 50 and not trace[0][1].any()  # starts fully masked
    revealed_at = torch.full((b, g), -1)
    for step, (_, vis, inp) in enumerate(trace):
        assert bool((inp[~vis] == 0).all())  # hidden genes enter as the fill value
        if step:
            new = vis & ~trace[step - 1][1]
            assert bool((trace[step - 1][1] <= vis).all())  # visible stays visible
            revealed_at[new] = step - 1
            # every value the model sees as visible is the x0_hat of the step that revealed it
            for r, c in vis.nonzero().tolist():
                assert inp[r, c] == calls[int(revealed_at[r, c])][r, c]
    last_new = ~trace[-1][1]
    revealed_at[last_new] = len(trace) - 1
    assert bool((revealed_at >= 0).all())  # every gene revealed, exactly once (one step index each)
    for r in range(b):
        for c in range(g):
            assert x[r, c] == calls[int(revealed_at[r, c])][r, c]


def test_step_budget() -> None:
    assert step_times(50, 50) == list(range(50, -1, -1))
    assert step_times(50, 5) == [50, 40, 30, 20, 10, 0]
    assert step_times(50, 500) == list(range(50, -1, -1))
    with pytest.raises(ValueError, match="K >= 1"):
        step_times(50, 0)


def test_curriculum_only_draws_low_mask_steps() -> None:
    s = MaskSchedule(200, T=50)
    band = s.band(0.2)
    assert band.tolist() == list(range(1, 8))  # G = 200: t <= 7 (METHODS.md)
    draws = s.sample_t(5000, curriculum=True, rho=0.2, generator=torch.Generator().manual_seed(0))
    assert bool((s.alpha_bar(draws) >= 0.8).all()) and set(draws.tolist()) == set(band.tolist())
    full = s.sample_t(5000, generator=torch.Generator().manual_seed(0))
    assert full.min() == 1 and full.max() == 50
    # through the method: epochs < curriculum_epochs draw from the band, later epochs from 1..T
    m = Hinge(200, None, size="tiny", curriculum_epochs=2, backbone_options={"n_genes": 255}, **TINY_ENC)
    seen: list[torch.Tensor] = []
    original = m.schedule.sample_t
    m.schedule.sample_t = lambda n, **kw: seen.append(original(n, **kw)) or seen[-1]  # type: ignore[method-assign]
    batch = {
        "expression": torch.rand(64, 200),
        "features": {"resnet18": torch.randn(64, HIST)},
        "index": torch.arange(64),
    }
    for epoch in (0, 1, 2):
        type(m).current_epoch = property(lambda self, e=epoch: e)  # type: ignore[assignment]
        try:
            m.loss(batch)
        finally:
            del type(m).current_epoch
    assert bool((s.alpha_bar(torch.cat(seen[:2])) >= 0.8).all())
    assert seen[2].max() > 7


def test_loss_weights_and_variants() -> None:
    s = MaskSchedule(10, T=10, zeta=1.05)
    assert s.weight(1).item() == pytest.approx(1.0)
    t = torch.arange(2, 11)
    w = (s.alpha_bars[t - 1] - s.alpha_bars[t]) / (1 - s.alpha_bars[t])
    assert torch.allclose(s.weight(t), w)
    x0, pred = torch.zeros(1, 10), torch.ones(1, 10)
    ranks = torch.arange(10).unsqueeze(0)  # gene g has rank g: masked first = low ranks
    tt = torch.tensor([5])
    k5, k4 = s.n_masked(5).item(), s.n_masked(4).item()
    paper = masked_loss(pred, x0, ranks, tt, s, "paper")
    assert paper.item() == pytest.approx(s.weight(5).item() * k5 / 10)
    code = masked_loss(pred * torch.arange(10.0), x0, ranks, tt, s, "code")  # errors g^2 on genes k4..k5-1
    assert code.item() == pytest.approx(sum(g**2 for g in range(k4, k5)) / (k5 - k4))
    with pytest.raises(ValueError, match="loss must be one of"):
        masked_loss(pred, x0, ranks, tt, s, "nope")


# ---- ablations, encoders -------------------------------------------------------------------------
ABLATIONS = {
    "hinge": {},
    "scratch": {"backbone_mode": "scratch"},
    "decoder_tune": {"backbone_mode": "decoder_tune"},
    "backbone_lora": {"backbone_mode": "lora", "lora_rank": 2},
    "gauss_diff": {"objective": "gaussian", "gauss_T": 100},
    "nocurr": {"curriculum_epochs": 0},
    "randmask": {"mask_fill": "randn"},
    "hist_affine_ln": {"modulation": "hist_affine_ln"},
    "nosoftnorm": {"modulation": "nosoftnorm"},
    "noidinit": {"identity_init": False},
    "code_loss": {"loss": "code"},
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_options_build_train_and_sample(name: str) -> None:
    torch.manual_seed(0)
    m = Hinge(12, None, size="tiny", K=5, n_samples=2, **TINY_ENC, **ABLATIONS[name])
    batch = {
        "expression": torch.rand(4, 12) * 2,
        "features": {"resnet18": torch.randn(4, HIST)},
        "index": torch.arange(4),
    }
    loss = m.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p for p in m.parameters() if p.requires_grad]
    assert grads and all(p.grad is None or torch.isfinite(p.grad).all() for p in grads)
    m.eval()
    pred = m.predict_expression(batch)
    assert pred.shape == (4, 12) and torch.isfinite(pred).all()
    bb = m.net.backbone
    if name == "scratch":
        assert all(p.requires_grad for p in bb.parameters())
    elif name == "decoder_tune":
        assert {n for n, p in bb.named_parameters() if p.requires_grad} == {
            "value_dec.w1.weight",
            "value_dec.w2.weight",
        }
    elif name == "backbone_lora":
        names = {n for n, p in bb.named_parameters() if p.requires_grad}
        assert len(names) == 2 * 4 * len(bb.blocks) and all("lora_" in n for n in names)
    else:
        assert not any(p.requires_grad for p in bb.parameters())


def test_lora_and_variants_start_where_expected() -> None:
    """LoRA adapters start at zero (identity); NoIdInit's gates and SoftNorm are not identity."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    wrapped = LoRALinear(lin, 2)
    x = torch.randn(3, 8)
    assert torch.equal(wrapped(x), lin(x))
    net = _tiny_net(identity_init=False)
    assert net.pre_attn[0].norm.eta.item() == pytest.approx(0.5)
    assert net.pre_attn[0].scale.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="modulation"):
        _tiny_net(modulation="adain")
    with pytest.raises(ValueError, match="LoRA target"):
        _tiny_net(backbone_mode="lora", lora_targets=("attn.nope",))


@pytest.mark.parametrize(("encoder", "dim"), [("uni", 1024), ("conch", 512), ("uni+conch", 1536)])
def test_encoder_options_size_the_histology_mlp(encoder: str, dim: int) -> None:
    m = Hinge(8, None, size="tiny", encoder=encoder)
    assert m.net.cond.h_mlp[0].in_features == dim and m.key == encoder
    assert Hinge.requires.features == ("encoder",) and Hinge.requires.image is False


def test_condition_network_pieces() -> None:
    e = timestep_embedding(torch.tensor([0, 7]), 256)
    assert e.shape == (2, 256)
    assert torch.allclose(e[0, :128], torch.ones(128)) and torch.allclose(
        e[0, 128:], torch.zeros(128)
    )  # cos first
    assert e[1, 0].item() == pytest.approx(math.cos(7.0)) and e[1, 128].item() == pytest.approx(math.sin(7.0))
    net = _tiny_net()
    for mlp in (net.cond.t_mlp, net.cond.h_mlp, net.cond.m_mlp):
        w = torch.cat([mlp[0].weight.flatten(), mlp[2].weight.flatten()])
        assert abs(w.std().item() - 0.02) < 0.004 and mlp[0].bias.abs().sum() == 0


def test_gaussian_diffusion_helper() -> None:
    d = GaussianDiffusion(T=100)
    assert d.alpha_bars[0] == 1 and bool((d.alpha_bars[1:] < d.alpha_bars[:-1]).all())
    x0 = torch.randn(3, 5)
    t = torch.tensor([1, 50, 100])
    xt = d.q_sample(x0, t, torch.zeros_like(x0))
    assert torch.allclose(xt, x0 * d.alpha_bars[t].sqrt().float().unsqueeze(1))
    noise = torch.randn(len(step_times(100, 10)), 3, 5)
    out = d.sample(lambda x, tt: x0, noise, K=10)  # an oracle x0-predictor returns x0 exactly
    assert torch.allclose(out, x0)


# ---- method behaviour --------------------------------------------------------------------------------
def test_predictions_do_not_depend_on_batching() -> None:
    """Sampling noise comes from per-spot generators: DDP shards == one process."""
    torch.manual_seed(0)
    m = Hinge(15, None, size="tiny", K=5, n_samples=3, mask_fill="randn", **TINY_ENC).eval()
    feats = torch.randn(6, HIST)
    idx = torch.tensor([3, 17, 4, 99, 0, 8])
    full = m.predict_expression({"features": {"resnet18": feats}, "index": idx})
    order = [5, 2, 0]
    part = m.predict_expression({"features": {"resnet18": feats[order]}, "index": idx[order]})
    assert torch.allclose(part, full[order], atol=1e-5)  # same draws; only BLAS rounding differs
    assert not torch.allclose(full[0], full[1])
    m2 = Hinge(15, None, size="tiny", K=5, n_samples=3, mask_fill="randn", sample_seed=1, **TINY_ENC).eval()
    m2.load_state_dict(m.state_dict())
    other = m2.predict_expression({"features": {"resnet18": feats}, "index": idx})
    assert not torch.allclose(other, full, atol=1e-3)


def _ckpt_backbone(tmp_path: Path, genes: list[str]) -> tuple[Path, Path]:
    from baselines._scfm.ckpt import save_cellfm_ckpt

    torch.manual_seed(3)
    path = tmp_path / "tiny.ckpt"
    save_cellfm_ckpt(build_backbone("cellfm", "tiny"), path)
    vocab = tmp_path / "vocab.json"
    # CellFM tables have round_up8(max id + 1) rows: the tiny table's 104 rows fit 96..103 genes
    vocab.write_text(json.dumps([*genes, *(f"FILL{i}" for i in range(100 - len(genes)))]))
    return path, vocab


def test_checkpoints_leave_out_the_frozen_backbone_file_weights(tmp_path: Path) -> None:
    genes = ["KRT6A", "GNAS", "FXYD2", "ERBB2"]
    ck, vocab = _ckpt_backbone(tmp_path, genes)
    m = Hinge(4, genes, size="tiny", checkpoint=str(ck), vocab=str(vocab), **TINY_ENC)
    assert m.gene_ids.tolist() == [1, 2, 3, 4]
    assert m.weights_id().startswith("cellfm-tiny=file:")
    with torch.no_grad():
        m.net.pre_dec.shift.bias.fill_(0.5)
    saved = {"state_dict": dict(m.state_dict())}
    m.on_save_checkpoint(saved)
    sd = saved["state_dict"]
    assert not any(k.startswith("net.backbone.") for k in sd) and "net.pre_dec.shift.bias" in sd
    m2 = Hinge(4, genes, size="tiny", checkpoint=str(ck), vocab=str(vocab), **TINY_ENC)
    m2.on_load_checkpoint(saved)
    m2.load_state_dict(sd)  # strict: the frozen entries come from the backbone file
    assert torch.equal(m2.net.pre_dec.shift.bias, m.net.pre_dec.shift.bias)
    saved["hinge_backbone"] = "file:000000000000"
    with pytest.raises(ValueError, match="backbone weights"):
        m2.on_load_checkpoint(saved)
    # random-init backbones cannot be rebuilt from a config: their weights stay in the checkpoint
    r = Hinge(4, genes, size="tiny", **TINY_ENC)
    saved_r = {"state_dict": dict(r.state_dict())}
    r.on_save_checkpoint(saved_r)
    assert any(k.startswith("net.backbone.") for k in saved_r["state_dict"])


def test_vocabulary_mapping_and_required_checkpoint(tmp_path: Path) -> None:
    genes = ["KRT6A", "GNAS", "FXYD2", "ERBB2"]
    ck, vocab = _ckpt_backbone(tmp_path, genes)
    with pytest.raises(
        ValueError, match=r"2 of 5 panel genes are not in the cellfm vocabulary \(NOPE1, NOPE2\)"
    ):
        Hinge(
            5,
            ["gnas", "NOPE1", "KRT6A", "NOPE2", "ERBB2"],
            size="tiny",
            checkpoint=str(ck),
            vocab=str(vocab),
            **TINY_ENC,
        )
    m = Hinge(2, ["gnas", "KRT6A"], size="tiny", checkpoint=str(ck), vocab=str(vocab), **TINY_ENC)
    assert m.gene_ids.tolist() == [2, 1]  # case-insensitive fallback, panel order kept
    with pytest.raises(ValueError, match="needs its gene vocabulary"):
        Hinge(2, genes[:2], size="tiny", checkpoint=str(ck), **TINY_ENC)
    with pytest.raises(ValueError, match="method.checkpoint is required"):
        Hinge(2, genes[:2], size="80m")
    with pytest.raises(ValueError, match="gene ids must lie in"):
        Hinge(200, None, size="tiny", **TINY_ENC)  # the tiny table has 104 rows
    assert Hinge(3, None, size="tiny", **TINY_ENC).gene_ids.tolist() == [1, 2, 3]  # random init: panel order


def test_configs_use_only_known_options() -> None:
    params = set(inspect.signature(Hinge.__init__).parameters)
    paper = yaml.safe_load((CONFIGS / "paper.yaml").read_text())
    assert set(paper["method"]) <= params
    assert paper["method"]["checkpoint"] is None  # a required user setting (the error names it)
    assert paper["trainer"]["gradient_clip_val"] == 1.0 and paper["trainer"]["max_epochs"] == 40
    assert paper["method"]["milestones"] == [20, 35] and paper["data"]["batch_size"] == 32
    for path in sorted((CONFIGS / "ablations").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        assert set(cfg["method"]) <= params, path.name
        assert cfg["data"] == paper["data"] and cfg["trainer"] == paper["trainer"], path.name
    tiny = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    assert set(tiny["method"]) <= params


# ---- fit + test through the runner -------------------------------------------------------------------------
def test_hinge_fit_test_beats_mean(synthetic_root: Path, mean_row: dict, tmp_path: Path) -> None:
    register_method(Hinge)
    row = run_method("hinge", synthetic_root, tmp_path, config="tiny")
    m, base = row["metrics"], mean_row["metrics"]
    print("hinge", m["mse"], m["pcc"], "mean", base["mse"])
    assert m["mse"] < base["mse"], (m["mse"], base["mse"])
    assert m["pcc"] is not None and m["pcc"] > 0.04, m["pcc"]
    assert row["weights"] == "none"  # random-init tiny CellFM and random-init encoder
    assert row["checkpoint"]["chosen_on"] == "val/masked_mse"
