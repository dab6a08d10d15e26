"""STMDiT's PixArt/PixCell DiT: sizes and parameter counts, per-sample null tokens (batched dual CFG),
the AdaLN / XAttn "starts as PixCell" property, and the PixCell-256 weight loader against diffusers."""

from __future__ import annotations

import json

import pytest
import torch

from baselines.stmdit.dit import SIZES, STMDiT, backbone_param_count, build_dit
from baselines.stmdit.dit_blocks import sincos_2d
from baselines.stmdit.ge_conditioning import GEConfig
from stbench.encoders.weights import WeightsError

pytestmark = pytest.mark.usefixtures("one_thread")

FUSIONS = [
    None,
    GEConfig(fusion="adaln", ge_dim=16),
    GEConfig(fusion="xattn", tokens="direct", ge_dim=16, k=4),
    GEConfig(fusion="xattn", tokens="pma", ge_dim=16, k=4),
    GEConfig(fusion="xattn", tokens="perceiver", ge_dim=16, k=4),
    GEConfig(fusion="xattn", tokens="gsa", ge_dim=16, k=4),
]
IDS = ["none", "adaln", "direct", "pma", "perceiver", "gsa"]
TOL = 1e-5  # batched vs separate forwards: float32, different batch shapes in the matmuls


def _randomise(model: STMDiT, seed: int = 0) -> STMDiT:
    """Non-zero everywhere (PixArt zero-inits the outputs and the GE gate), so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        if model.ge is not None and model.ge.adaln is not None:
            model.ge.adaln.gate.fill_(0.7)
    return model.eval()


def _ge_inputs(ge: GEConfig | None, b: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    if ge is None:
        return {}
    if ge.fusion == "adaln":
        return {"ge_vec": torch.randn(b, ge.ge_dim, generator=g)}
    return {"ge_tokens": torch.randn(b, 10, ge.ge_dim, generator=g)}


def test_param_counts_b_and_xl_match_formula_and_pixcell_file():
    """B = 119,675,264 and XL = 608,074,496 (null token included). XL equals PixCell-256's file: its
    diffusion_pytorch_model.safetensors is listed at 2.43 GB = 608.07 M fp32 values."""
    counts = {}
    for size in ("B", "XL"):
        with torch.device("meta"):
            model = build_dit(size)
        counts[size] = sum(p.numel() for p in model.parameters())
        assert counts[size] == backbone_param_count(model.cfg)
        print(f"STMDiT-{size} backbone parameters: {counts[size]:,}")
    assert counts == {"B": 119_675_264, "XL": 608_074_496}
    assert abs(counts["XL"] * 4 / 1e9 - 2.43) < 0.005
    d = SIZES["B"].hidden
    with torch.device("meta"):
        for ge, extra in [
            (GEConfig(fusion="adaln"), 256 * d + d + 1 + 256),
            (
                GEConfig(fusion="xattn", tokens="direct"),
                12 * (4 * d * d + 4 * d) + (256 * d + d + d * d + d) + d,
            ),
        ]:
            m = build_dit("B", ge=ge)
            n = sum(p.numel() for p in m.parameters()) - counts["B"]
            print(f"STMDiT-B GE {ge.fusion if ge.fusion == 'adaln' else 'xattn-' + ge.tokens}: +{n:,}")
            assert n == extra


@pytest.mark.parametrize("ge", FUSIONS, ids=IDS)
def test_tiny_shapes_every_fusion(ge):
    model = build_dit("tiny", ge=ge).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, 8, 8, generator=g)
    out = model(
        x, torch.tensor([0.0, 10.5, 999.0]), torch.randn(3, 1536, generator=g), **_ge_inputs(ge, 3, g)
    )
    assert out.shape == (3, 32, 8, 8)
    out = model(torch.randn(2, 16, 6, 10, generator=g), torch.tensor([5.0, 6.0]))  # non-square, all dropped
    assert out.shape == (2, 32, 6, 10)


def test_b_size_forward_with_ge():
    model = build_dit("B", ge=GEConfig(fusion="xattn", tokens="perceiver")).eval()
    g = torch.Generator().manual_seed(2)
    x, uni = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 1536, generator=g)
    with torch.no_grad():
        out = model(x, torch.tensor([1.0, 2.0]), uni, ge_tokens=torch.randn(2, 30, 256, generator=g))
    assert out.shape == (2, 32, 4, 4)


def test_uni_keep_false_equals_feeding_the_null_token():
    model = _randomise(build_dit("tiny"))
    g = torch.Generator().manual_seed(3)
    x, t, uni = (
        torch.randn(2, 16, 8, 8, generator=g),
        torch.tensor([3.0, 700.0]),
        torch.randn(2, 1536, generator=g),
    )
    null = model.y_embedder.y_embedding.detach()[0].expand(2, -1)
    with torch.no_grad():
        dropped = model(x, t, uni, uni_keep=torch.tensor([False, False]))
        explicit = model(x, t, null)
        none = model(x, t, None)
        kept = model(x, t, uni)
    assert torch.equal(dropped, explicit) and torch.equal(dropped, none)
    assert (dropped - kept).abs().max() > 1e-3
    assert isinstance(model.y_embedder.y_embedding, torch.nn.Parameter)  # STMDiT: a learned null token
    fixed = build_dit("tiny", learn_null=False)
    assert "y_embedder.y_embedding" not in dict(fixed.named_parameters())  # PixCell: a fixed buffer


@pytest.mark.parametrize("ge", FUSIONS, ids=IDS)
def test_per_sample_keep_masks_equal_separate_forwards(ge):
    """Every (uni_keep, ge_keep) combination in one batch = each sample alone with its inputs dropped
    (None) or given; tolerance 1e-5."""
    model = _randomise(build_dit("tiny", ge=ge))
    g = torch.Generator().manual_seed(4)
    b = 4
    x, t, uni = (
        torch.randn(b, 16, 8, 8, generator=g),
        torch.tensor([1.0, 250.0, 500.0, 999.0]),
        torch.randn(b, 1536, generator=g),
    )
    ge_in = _ge_inputs(ge, b, g)
    uni_keep = torch.tensor([True, False, True, False])
    ge_keep = torch.tensor([True, True, False, False]) if ge is not None else None
    with torch.no_grad():
        batched = model(x, t, uni, uni_keep=uni_keep, ge_keep=ge_keep, **ge_in)
        for i in range(b):
            one = {k: (v[i : i + 1] if ge_keep[i] else None) for k, v in ge_in.items()}
            alone = model(x[i : i + 1], t[i : i + 1], uni[i : i + 1] if uni_keep[i] else None, **one)
            torch.testing.assert_close(batched[i : i + 1], alone, atol=TOL, rtol=0)
    if ge is not None:  # the GE input really matters for kept samples
        with torch.no_grad():
            other = model(
                x, t, uni, uni_keep=uni_keep, ge_keep=ge_keep, **{k: v + 1 for k, v in ge_in.items()}
            )
        assert (other[0] - batched[0]).abs().max() > 1e-4
        torch.testing.assert_close(other[2:], batched[2:], atol=TOL, rtol=0)


@pytest.mark.parametrize("ge", FUSIONS[1:], ids=IDS[1:])
def test_three_guided_passes_batched_equal_separate(ge):
    """Dual CFG needs eps(0,0), eps(uni,0), eps(uni,g): stacked into one 3B batch = three forwards."""
    model = _randomise(build_dit("tiny", ge=ge))
    g = torch.Generator().manual_seed(5)
    b = 2
    x, t, uni = (
        torch.randn(b, 16, 8, 8, generator=g),
        torch.tensor([7.0, 70.0]),
        torch.randn(b, 1536, generator=g),
    )
    ge_in = _ge_inputs(ge, b, g)
    f, tr = torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)
    with torch.no_grad():
        ge3 = {k: torch.cat([v, v, v]) for k, v in ge_in.items()}
        keeps = {"uni_keep": torch.cat([f, tr, tr]), "ge_keep": torch.cat([f, f, tr])}
        stacked = model(x.repeat(3, 1, 1, 1), t.repeat(3), uni.repeat(3, 1), **keeps, **ge3)
        sep = torch.cat([model(x, t, None), model(x, t, uni), model(x, t, uni, **ge_in)])
    torch.testing.assert_close(stacked, sep, atol=TOL, rtol=0)


@pytest.mark.parametrize("ge", FUSIONS[1:], ids=IDS[1:])
def test_ge_model_at_init_is_the_no_ge_pixcell(ge):
    """AdaLN gate 0 and zero GE cross-attention outputs: same backbone weights -> identical outputs
    for any GE input; after moving the gate / the projection, GE changes the output."""
    base = _randomise(build_dit("tiny"))
    model = build_dit("tiny", ge=ge).eval()
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("ge.") or ".ge_cross_attn." in k for k in missing)
    if ge.fusion == "xattn":  # keep the zero output projection, randomise the rest of the GE path
        with torch.no_grad():
            for name, p in model.named_parameters():
                if (
                    name.startswith("ge.") or ".ge_cross_attn." in name
                ) and ".ge_cross_attn.proj." not in name:
                    p.add_(torch.randn_like(p) * 0.1)
    g = torch.Generator().manual_seed(6)
    x, t, uni = (
        torch.randn(2, 16, 8, 8, generator=g),
        torch.tensor([2.0, 20.0]),
        torch.randn(2, 1536, generator=g),
    )
    ge_in = _ge_inputs(ge, 2, g)
    with torch.no_grad():
        ref = base(x, t, uni)
        assert torch.equal(model(x, t, uni, **ge_in), ref)
        if ge.fusion == "adaln":
            assert float(model.ge.adaln.gate) == 0.0
            model.ge.adaln.gate.fill_(0.5)
        else:
            for block in model.blocks:
                block.ge_cross_attn.proj.weight.normal_(0, 0.1)
        assert (model(x, t, uni, **ge_in) - ref).abs().max() > 1e-4


def test_ge_inputs_are_checked():
    model = build_dit("tiny", ge=GEConfig(fusion="adaln", ge_dim=16))
    x, t = torch.zeros(1, 16, 8, 8), torch.zeros(1)
    with pytest.raises(ValueError, match="ge_vec"):
        model(x, t, ge_tokens=torch.zeros(1, 3, 16))
    with pytest.raises(ValueError, match="no GE input"):
        model(x, t, ge_keep=torch.tensor([True]))
    with pytest.raises(ValueError, match="without GE"):
        build_dit("tiny")(x, t, ge_vec=torch.zeros(1, 16))
    with pytest.raises(ValueError, match="uni has shape"):
        model(x, t, torch.zeros(1, 100))


def test_sincos_matches_diffusers_non_square():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ours = sincos_2d(64, 3, 5, base_size=16, interpolation=0.5)
    ref = get_2d_sincos_pos_embed(64, (3, 5), base_size=16, interpolation_scale=0.5, output_type="pt")
    torch.testing.assert_close(ours, ref.float(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- PixCell-256 weights


def _pixcell_folder(tmp_path, caption: int = 1536):
    """A tiny transformer folder in PixCell-256's layout: diffusers' PixArtTransformer2DModel saved with
    save_pretrained, plus caption_projection.uncond_embedding and PixCell's config fields."""
    from diffusers import PixArtTransformer2DModel
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    sizes = {"num_attention_heads": 4, "attention_head_dim": 16, "num_layers": 2, "cross_attention_dim": 64}
    ref = PixArtTransformer2DModel(
        **sizes,
        in_channels=16,
        out_channels=32,
        sample_size=8,
        patch_size=2,
        caption_channels=caption,
        interpolation_scale=0.5,
        use_additional_conditions=False,
    )
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    folder = tmp_path / "PixCell-256" / "transformer"
    ref.save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    null = torch.randn(1, caption) / caption**0.5
    state["caption_projection.uncond_embedding"] = null
    save_file(state, str(weights))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(_class_name="PixCellTransformer2DModel", caption_num_tokens=1)
    (folder / "config.json").write_text(json.dumps(cfg))
    return ref.eval(), null, folder


def test_pixcell_loader_matches_diffusers_outputs(tmp_path):
    """Strong test: our DiT with the loaded weights reproduces diffusers' PixArtTransformer2DModel
    (which PixCell's class extends) on the same inputs, conditional, null-conditioned and non-square."""
    from baselines.stmdit.pixcell_weights import load_pixcell

    ref, null, folder = _pixcell_folder(tmp_path)
    model = load_pixcell(str(folder.parent)).eval()  # the pipeline root resolves to transformer/
    assert model.cfg.hidden == 64 and model.cfg.depth == 2 and model.cfg.interpolation == 0.5
    assert model.weights_id.startswith("local:transformer@")
    assert len(model.pixcell_report.loaded) == len(ref.state_dict()) + 1
    g = torch.Generator().manual_seed(7)
    x, t, uni = (
        torch.randn(3, 16, 8, 8, generator=g),
        torch.tensor([3.0, 400.0, 999.0]),
        torch.randn(3, 1536, generator=g),
    )
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, uni), ref(x, uni[:, None], t).sample, atol=1e-5, rtol=1e-5)
        dropped = model(x, t, uni, uni_keep=torch.zeros(3, dtype=torch.bool))
        torch.testing.assert_close(dropped, ref(x, null.expand(3, 1, -1), t).sample, atol=1e-5, rtol=1e-5)
        x2 = torch.randn(2, 16, 12, 8, generator=g)
        torch.testing.assert_close(
            model(x2, t[:2], uni[:2]), ref(x2, uni[:2, None], t[:2]).sample, atol=1e-5, rtol=1e-5
        )
    # a GE model initialised from PixCell: GE parameters stay at init, so it still is PixCell
    from baselines.stmdit.pixcell_weights import load_pixcell as load

    ge_model = load(str(folder), ge=GEConfig(fusion="adaln", ge_dim=8)).eval()
    assert ge_model.pixcell_report.kept_init == [
        "ge.adaln.gate",
        "ge.adaln.null",
        "ge.adaln.proj.bias",
        "ge.adaln.proj.weight",
    ]
    with torch.no_grad():
        torch.testing.assert_close(
            ge_model(x, t, uni, ge_vec=torch.randn(3, 8)),
            ref(x, uni[:, None], t).sample,
            atol=1e-5,
            rtol=1e-5,
        )


def test_pixcell_loader_fails_loudly(tmp_path):
    from safetensors.torch import load_file, save_file

    from baselines.stmdit.pixcell_weights import load_pixcell

    _, _, folder = _pixcell_folder(tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    good = load_file(str(weights))

    def write(state):
        save_file(state, str(weights))

    write({k: v for k, v in good.items() if k != "transformer_blocks.1.attn2.to_v.weight"})
    with pytest.raises(WeightsError, match=r"missing tensors: blocks\.1\.cross_attn\.kv_linear\.weight\[1\]"):
        load_pixcell(str(folder))
    write({**good, "transformer_blocks.0.attn1.to_qkv.weight": torch.zeros(192, 64)})
    with pytest.raises(WeightsError, match="unexpected key 'transformer_blocks.0.attn1.to_qkv.weight'"):
        load_pixcell(str(folder))
    write({**good, "proj_out.weight": torch.zeros(64, 64)})
    with pytest.raises(WeightsError, match="shape mismatch for 'proj_out.weight'"):
        load_pixcell(str(folder))
    write({k: v for k, v in good.items() if k != "caption_projection.uncond_embedding"})
    with pytest.raises(WeightsError, match="y_embedder.y_embedding"):
        load_pixcell(str(folder))
    assert not load_pixcell(str(folder), allow_missing_null=True).pixcell_report.null_from_file
    write(good)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "caption_num_tokens": 4}))
    with pytest.raises(WeightsError, match="caption_num_tokens"):
        load_pixcell(str(folder))
    with pytest.raises(WeightsError, match="not a PixCell transformer folder"):
        load_pixcell(str(tmp_path))


def test_grad_checkpointing_gives_the_same_gradients():
    model = _randomise(build_dit("tiny", ge=GEConfig(fusion="xattn", tokens="gsa", ge_dim=16, k=4))).train()
    g = torch.Generator().manual_seed(8)
    args = (
        torch.randn(2, 16, 8, 8, generator=g),
        torch.tensor([1.0, 2.0]),
        torch.randn(2, 1536, generator=g),
    )
    kw = {
        "ge_tokens": torch.randn(2, 5, 16, generator=g),
        "uni_keep": torch.tensor([True, False]),
        "ge_keep": torch.tensor([False, True]),
    }
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.grad_checkpointing = ckpt
        model(*args, **kw).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})  # keep masks: no unused params
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=0, msg=name)
