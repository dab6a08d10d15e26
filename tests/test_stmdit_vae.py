"""SD3 VAE wrapper of STMDiT: loader (local diffusers folder, strict, offline/gated errors), latent
convention `(mean - shift) * scale` checked against diffusers by hand, decode, SD3's architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from stbench.encoders.vae import (
    SD3_REPO,
    SD3_SCALING_FACTOR,
    SD3_SHIFT_FACTOR,
    SD3_VAE_CONFIG,
    build_vae,
    load_vae,
    tiny_vae_config,
)
from stbench.encoders.weights import WeightsError

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_diffusers(seed: int = 0, **over) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**{**tiny_vae_config(), **over})


def images(n: int = 2, px: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, px, px, generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, AutoencoderKL]:
    ref = tiny_diffusers().eval()
    ref.save_pretrained(tmp_path / "tiny-vae")
    return tmp_path / "tiny-vae", ref


def test_local_folder_loads_and_encode_is_scaled_posterior_mean(saved) -> None:
    folder, ref = saved
    assert (folder / "config.json").exists() and (folder / "diffusion_pytorch_model.safetensors").exists()
    vae = load_vae(str(folder))
    assert vae.weights_id.startswith("local:tiny-vae@") and len(vae.weights_id.split("@")[1]) == 12
    assert (vae.scaling_factor, vae.shift_factor) == (SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR)
    assert vae.latent_channels == 16 and vae.downsample == 8
    x = images()
    with torch.no_grad():
        z = vae.encode(x)
        # by hand from the diffusers model: PixCell feeds Normalize(0.5, 0.5) images, i.e. 2x - 1
        post = ref.encode(2 * x - 1).latent_dist
        want = (post.mean - SD3_SHIFT_FACTOR) * SD3_SCALING_FACTOR
        mean_s, std_s = vae.encode_moments(x)
    assert z.shape == (2, 16, 4, 4)
    torch.testing.assert_close(z, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(std_s, post.std * SD3_SCALING_FACTOR, rtol=0, atol=1e-6)
    assert torch.equal(mean_s, z)


def test_sample_is_mean_plus_std_noise_and_decode_inverts_the_scaling(saved) -> None:
    folder, ref = saved
    vae = load_vae(str(folder))
    x = images(px=16)
    with torch.no_grad():
        mean_s, std_s = vae.encode_moments(x)
        s = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        eps = torch.randn(mean_s.shape, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(s, mean_s + std_s * eps)
        out = vae.decode(mean_s)
        by_hand = ref.decode(mean_s / SD3_SCALING_FACTOR + SD3_SHIFT_FACTOR).sample
    assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    torch.testing.assert_close(out, ((by_hand.clamp(-1, 1) + 1) / 2), rtol=0, atol=1e-6)


def test_scale_and_shift_come_from_the_config_else_sd3_constants(tmp_path: Path) -> None:
    ref = tiny_diffusers(scaling_factor=0.5, shift_factor=0.25)
    ref.save_pretrained(tmp_path / "own")
    vae = load_vae(str(tmp_path / "own"))
    assert (vae.scaling_factor, vae.shift_factor) == (0.5, 0.25)
    cfg = json.loads((tmp_path / "own" / "config.json").read_text())
    del cfg["scaling_factor"]
    cfg["shift_factor"] = None  # diffusers writes null when a VAE has no shift
    (tmp_path / "own" / "config.json").write_text(json.dumps(cfg))
    vae = load_vae(str(tmp_path / "own"))
    assert (vae.scaling_factor, vae.shift_factor) == (SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR)
    assert load_vae(str(tmp_path / "own"), scaling_factor=2.0).scaling_factor == 2.0


def test_pipeline_folder_with_vae_subfolder(tmp_path: Path) -> None:
    tiny_diffusers().save_pretrained(tmp_path / "pipe" / "vae")
    assert load_vae(str(tmp_path / "pipe")).weights_id.startswith("local:vae@")


def test_strict_loading_names_missing_keys(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tiny_diffusers().save_pretrained(tmp_path / "bad")
    f = tmp_path / "bad" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    gone = sorted(k for k in state if k.startswith("decoder.conv_out"))[0]
    del state[gone]
    save_file(state, str(f))
    with pytest.raises(WeightsError, match=f"missing keys: {gone}"):
        load_vae(str(tmp_path / "bad"))


def test_absent_sources_fail_with_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"empty: no config\.json .*save_pretrained"):
        load_vae(str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match="not a hub id.*local diffusers VAE folder"):
        load_vae("./no-such-vae")
    # offline: fails at once, naming the gated repo, the login step and the local-folder option
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError) as err:
        load_vae("default")
    msg = str(err.value)
    assert SD3_REPO in msg and "subfolder vae" in msg and "offline" in msg
    assert "huggingface-cli login" in msg and "local diffusers VAE folder" in msg


def test_hub_cache_snapshot_is_used_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub snapshot already in the cache loads offline; weights_id names repo, subfolder, revision."""
    snap = tmp_path / "hub" / "models--org--vae-repo" / "snapshots" / ("a" * 40) / "vae"
    tiny_diffusers().save_pretrained(snap)
    refs = tmp_path / "hub" / "models--org--vae-repo" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    vae = load_vae("hf:org/vae-repo/vae")
    assert vae.weights_id == "hf:org/vae-repo/vae@" + "a" * 12
    assert load_vae("org/vae-repo", subfolder="vae").weights_id == vae.weights_id


def test_tiny_and_random_builds_are_seeded_and_sd3_shaped() -> None:
    a, b = load_vae("tiny"), load_vae("tiny")
    assert a.weights_id == "none" and all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    state = torch.get_rng_state()
    sd3 = build_vae(SD3_VAE_CONFIG)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    cfg = sd3.vae.config
    assert list(cfg.block_out_channels) == [128, 256, 512, 512] and cfg.layers_per_block == 2
    assert sd3.latent_shape(256) == (16, 32, 32) and sd3.vae.quant_conv is None
    assert 83_000_000 < sum(p.numel() for p in sd3.parameters()) < 85_000_000


def test_input_checks() -> None:
    vae = load_vae("tiny")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vae.encode(images() * 255)
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling 8"):
        vae.encode(images(px=20))
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        vae.decode(torch.zeros(1, 4, 4, 4))
