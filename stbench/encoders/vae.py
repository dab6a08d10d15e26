"""The SD3 VAE of STMDiT / PixCell: 256 x 256 H&E tiles <-> 16 x 32 x 32 latents (diffusers AutoencoderKL).

It lives in core beside the encoder zoo, not in a baseline, because the latent store
(stbench/data/latents.py) loads it for any method that asks for latents, and core never imports
`baselines`.

Why a wrapper: the diffusion model never sees raw VAE outputs, only `(z - shift) * scale` with SD3's
constants, and the images enter in [-1, 1]; keeping both conventions in one place means the latent
store, training and decoding of generated tiles can never disagree.

Facts used (PixCell's public code, cvlab-stonybrook/PixCell, read not copied):
- images are normalised with Normalize(0.5, 0.5), i.e. x = 2 * img - 1, before `vae.encode`, and
  decoded tiles are clamped to [-1, 1] and mapped back with (x + 1) / 2;
- latents are `(z - shift_factor) * scale_factor` with scale 1.5305, shift 0.0609 (its 256 px config;
  the same values are in the SD3 VAE's config.json), decoded with `z / scale + shift`;
- PixCell stores the posterior mean AND std per tile (fp16) and trains on a fresh posterior SAMPLE
  `mean + std * eps` drawn each time a tile is loaded (its `_vae_feat_loader`), not on the mean.
  `encode` here returns the (scaled) mean - the deterministic choice the latent store caches;
  `encode_moments` returns the scaled mean and std, so a method can draw PixCell's samples itself:
  (mean + std * eps - shift) * scale = mean_scaled + std_scaled * eps.

Sources for `load_vae`: "default" (`stabilityai/stable-diffusion-3.5-large`, subfolder `vae`, gated),
"hf:org/name[/subfolder]" or "org/name[/subfolder]" (hub), a local folder in diffusers'
`save_pretrained` layout (config.json + diffusion_pytorch_model.safetensors, or such a folder under
`vae/`), "none" (SD3 architecture, random init), "tiny" (a seeded random tiny VAE for tests) and
"pixels[:f]" (a lossless space-to-depth stand-in, stbench/encoders/pixel_vae.py, for tiny runs).
Loading is strict (every tensor checked by name and shape), pickle-free, and fails fast with one
message naming the repo or path and what to do; HF_HUB_OFFLINE / STBENCH_OFFLINE are respected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stbench.encoders.weights import (
    WeightsError,
    file_sha,
    hub_download,
    load_state_dict,
    strict_load,
)

SD3_REPO = "stabilityai/stable-diffusion-3.5-large"
SD3_SUBFOLDER = "vae"
SD3_SCALING_FACTOR = 1.5305
SD3_SHIFT_FACTOR = 0.0609
SD3_LATENT_CHANNELS = 16
# SD3 / SD3.5 vae/config.json (diffusers): 4 levels -> downsampling 8, no quant convs, mid attention.
SD3_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": SD3_LATENT_CHANNELS,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": SD3_SCALING_FACTOR,
    "shift_factor": SD3_SHIFT_FACTOR,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
LOCAL_HINT = (
    "or pass a local diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors, "
    "as written by AutoencoderKL.save_pretrained) as the `vae` setting"
)


def tiny_vae_config(width: int = 8, levels: int = 4, latent_channels: int = SD3_LATENT_CHANNELS) -> dict:
    """SD3's layout at toy width: `levels` blocks (downsampling 2**(levels-1); 4 -> 8 like SD3)."""
    chans = [width * min(2**i, 2) for i in range(levels)]
    return {
        **SD3_VAE_CONFIG,
        "block_out_channels": chans,
        "layers_per_block": 1,
        "norm_num_groups": min(4, width),
        "latent_channels": latent_channels,
        "sample_size": 64,
    }


class LatentVAE(nn.Module):
    """An AutoencoderKL plus the latent convention: [0, 1] images in, `(z - shift) * scale` out."""

    def __init__(
        self,
        vae: nn.Module,
        *,
        weights_id: str,
        scaling_factor: float,
        shift_factor: float,
        name: str = "sd3-vae",
    ) -> None:
        super().__init__()
        self.vae = vae.eval()
        self.weights_id = str(weights_id)
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.name = name

    # ---- geometry --------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, px: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a px x px tile; ValueError if px is not a multiple of the factor."""
        if px % self.downsample:
            raise ValueError(
                f"tile side {px} px is not a multiple of the VAE's downsampling {self.downsample}"
            )
        return (self.latent_channels, px // self.downsample, px // self.downsample)

    def describe(self) -> dict[str, Any]:
        """What changes the latents besides the weights (hashed into latent-store keys)."""
        cfg = {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}
        return {
            "name": self.name,
            "input": "2*img-1",
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "config": json.loads(json.dumps(cfg, default=list)),
        }

    # ---- encode / decode -------------------------------------------------------------------
    def _check(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        for side in images.shape[2:]:
            self.latent_shape(int(side))
        lo, hi = float(images.min()), float(images.max())
        if lo < -1e-4 or hi > 1 + 1e-4:
            raise ValueError(f"images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior (mean, std) of [0, 1] images, each (B, C, H/f, W/f)."""
        self._check(images)
        post = self.vae.encode(images * 2.0 - 1.0).latent_dist
        return post.mean, post.std

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled posterior mean `(mean - shift) * scale` and std `std * scale`."""
        mean, std = self.moments(images)
        return (mean - self.shift_factor) * self.scaling_factor, std * self.scaling_factor

    def encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """[0, 1] images (B, 3, H, W) -> latents (B, C, H/f, W/f): the scaled posterior mean, or a
        scaled posterior sample (PixCell's training input) with `sample=True`."""
        mean, std = self.encode_moments(images)
        if not sample:
            return mean
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * eps

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) in the scaled space -> images (B, 3, h*f, w*f) clamped to [0, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (B, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        x = self.vae.decode(latents / self.scaling_factor + self.shift_factor).sample
        return ((x.clamp(-1.0, 1.0) + 1.0) / 2.0).clamp(0.0, 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)


# ---- construction ----------------------------------------------------------------------------
def _factors(raw: dict[str, Any], scaling: float | None, shift: float | None) -> tuple[float, float]:
    """Explicit arguments, else the config's values when present (not null), else SD3's constants."""
    if scaling is None:
        scaling = raw.get("scaling_factor")
    if shift is None:
        shift = raw.get("shift_factor")
    return (
        float(SD3_SCALING_FACTOR if scaling is None else scaling),
        float(SD3_SHIFT_FACTOR if shift is None else shift),
    )


def _autoencoder(config: dict[str, Any]) -> nn.Module:
    from diffusers import AutoencoderKL

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        return AutoencoderKL.from_config(cfg)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"VAE config cannot build an AutoencoderKL: {exc}") from None


def build_vae(
    config: dict[str, Any] | None = None,
    *,
    seed: int | None = 0,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    name: str = "sd3-vae",
) -> LatentVAE:
    """Random-init VAE of `config` (default: SD3's architecture), seeded without touching the global
    RNG. weights_id is "none": stores then key it by a hash of the actual parameters."""
    cfg = dict(config or SD3_VAE_CONFIG)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        vae = _autoencoder(cfg)
    scale, shift = _factors(cfg, scaling_factor, shift_factor)
    return LatentVAE(vae, weights_id="none", scaling_factor=scale, shift_factor=shift, name=name)


def _from_files(
    config_file: Path, weights_file: Path, weights_id: str, what: str, **factors: Any
) -> LatentVAE:
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{what}: cannot read {config_file}: {exc}") from None
    if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise WeightsError(f"{what}: {config_file} describes a {raw['_class_name']}, not an AutoencoderKL")
    vae = _autoencoder(raw)
    strict_load(vae, load_state_dict(weights_file), what=f"{what} (AutoencoderKL of {config_file})")
    scale, shift = _factors(raw, factors.get("scaling_factor"), factors.get("shift_factor"))
    return LatentVAE(vae, weights_id=weights_id, scaling_factor=scale, shift_factor=shift)


def _local_folder(path: Path, subfolder: str | None) -> tuple[Path, Path]:
    """(config.json, weights file) of a diffusers VAE folder, a pipeline folder with `vae/`, or a file."""
    if path.is_file():
        folder, weights = path.parent, path
    else:
        folder = path
        if not (folder / "config.json").exists():
            sub = folder / (subfolder or SD3_SUBFOLDER)
            if (sub / "config.json").exists():
                folder = sub
        weights = next((folder / n for n in WEIGHT_NAMES if (folder / n).exists()), folder / WEIGHT_NAMES[0])
    config = folder / "config.json"
    if not config.exists():
        raise WeightsError(
            f"VAE folder {path}: no config.json (expected diffusers' save_pretrained layout: "
            f"config.json + {WEIGHT_NAMES[0]}, possibly under {subfolder or SD3_SUBFOLDER}/)"
        )
    if not weights.exists():
        raise WeightsError(f"VAE folder {folder}: no weights file ({' or '.join(WEIGHT_NAMES)})")
    return config, weights


def _parse_hub(source: str, subfolder: str | None) -> tuple[str, str | None]:
    ref = source[3:] if source.startswith("hf:") else source
    ref = ref.split("@")[0].strip("/")
    parts = ref.split("/")
    if len(parts) < 2 or not all(parts) or source.startswith((".", "/", "~")):
        raise WeightsError(
            f"VAE source {source!r}: no such file or folder, and not a hub id (org/name[/subfolder]); "
            + LOCAL_HINT
        )
    repo = "/".join(parts[:2])
    sub = subfolder if subfolder is not None else ("/".join(parts[2:]) or None)
    return repo, sub


def load_vae(
    source: str = "default",
    subfolder: str | None = None,
    *,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
) -> LatentVAE:
    """The VAE named by `source` (see the module docstring), in eval mode, fp32 (SD3's config asks
    for fp32 VAE inference: force_upcast). `weights_id` says which weights ran:
    "hf:<repo>/<subfolder>@<revision>", "local:<folder>@<sha256[:12] of the weights file>", "none"."""
    src = (source or "default").strip()
    factors = {"scaling_factor": scaling_factor, "shift_factor": shift_factor}
    if src == "none":
        return build_vae(SD3_VAE_CONFIG, **factors)
    if src == "tiny":
        return build_vae(tiny_vae_config(), name="tiny-vae", **factors)
    if src.startswith("pixels"):  # lossless space-to-depth stand-in for tests and CI (pixel_vae.py)
        from stbench.encoders.pixel_vae import PixelLatentVAE, parse_pixels

        return PixelLatentVAE(parse_pixels(src) or 4)
    path = Path(src).expanduser()
    if src != "default" and path.exists():
        config, weights = _local_folder(path, subfolder)
        wid = f"local:{config.parent.name}@{file_sha(weights)}"
        return _from_files(config, weights, wid, f"VAE {path}", **factors)
    if src == "default":
        repo, sub = SD3_REPO, subfolder if subfolder is not None else SD3_SUBFOLDER
    else:
        repo, sub = _parse_hub(src, subfolder)
    prefix = f"{sub.strip('/')}/" if sub else ""
    gated = repo == SD3_REPO or repo.startswith("stabilityai/stable-diffusion-3")
    try:
        config = hub_download(repo, f"{prefix}config.json", gated=gated)
        weights = hub_download(repo, f"{prefix}{WEIGHT_NAMES[0]}", gated=gated, required=False)
        if weights is None:
            label = f"its weights ({prefix}{' or '.join(WEIGHT_NAMES)})"
            weights = hub_download(repo, f"{prefix}{WEIGHT_NAMES[1]}", gated=gated, label=label)
    except WeightsError as exc:  # the generic hint names --weights; the VAE's setting is `vae`
        why = str(exc).replace("; or pass a local copy with --weights PATH", "")
        why = why.replace(", or pass a local copy with --weights PATH", "")
        raise WeightsError(f"SD3 VAE {repo} (subfolder {sub or '-'}): {why}; {LOCAL_HINT}") from None
    assert config is not None and weights is not None
    parts = weights.parts
    rev = parts[parts.index("snapshots") + 1][:12] if "snapshots" in parts else file_sha(weights)
    wid = f"hf:{repo}{'/' + sub.strip('/') if sub else ''}@{rev}"
    return _from_files(config, weights, wid, f"VAE {repo}", **factors)
