"""DeepSpaCE's training augmentations on (B, 3, H, W) tensors in [0, 1].

DeepSpaCE (BasicLib.ImageTransform, albumentations) applies, in order: resize, "flip" (random
90-degree rotation, flip, transpose), "crop", "color" and "random", then ImageNet normalisation.
"flip" is the DataModule's dihedral augmentation; the other three groups are re-implemented here
on batched tensors with albumentations' default ranges (see README.md for the approximations).
Randomness comes from torch's global generator, which the runner seeds per job.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

GROUPS = ("crop", "color", "random")
_EPS = 1e-8


def _coin(n: int, p: float, device: torch.device) -> torch.Tensor:
    return torch.rand(n, device=device) < p


def _uniform(n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    return torch.rand(n, device=device) * (hi - lo) + lo


def _where(x: torch.Tensor, on: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fn applied to the images selected by the boolean mask `on` only (the rest unchanged)."""
    if not bool(on.any()):
        return x
    out = x.clone()
    out[on] = fn(x[on])
    return out


def _warp(x: torch.Tensor, theta: torch.Tensor, padding: str) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def random_resized_crop(
    x: torch.Tensor, p: float = 0.5, scale: tuple[float, float] = (0.5, 1.0), ratio=(0.75, 4 / 3)
) -> torch.Tensor:
    """RandomResizedCrop(scale=(0.5, 1), p=0.5): a random sub-window resized back to H x W."""
    n, dev = x.shape[0], x.device
    area = _uniform(n, *scale, dev)
    r = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), dev))
    w = torch.sqrt(area * r).clamp(max=1.0)  # fraction of the side
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, device=dev) * (1 - w) + w / 2) * 2 - 1  # centre in [-1, 1]
    cy = (torch.rand(n, device=dev) * (1 - h) + h / 2) * 2 - 1
    on = _coin(n, p, dev)
    one, zero = torch.ones_like(w), torch.zeros_like(w)
    w, h = torch.where(on, w, one), torch.where(on, h, one)
    cx, cy = torch.where(on, cx, zero), torch.where(on, cy, zero)
    theta = torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
    return _warp(x, theta, "border")


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    s = delta / maxc.clamp_min(_EPS)
    d = delta.clamp_min(_EPS)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, torch.remainder(h / 6.0, 1.0), torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(1)
    h6 = torch.remainder(h, 1.0) * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # (r, g, b) for each of the six hue sectors, then pick the pixel's sector.
    table = torch.stack(
        [torch.stack(c, 0) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))],
        0,
    )  # (6, 3, B, H, W)
    idx = sector.long().clamp(0, 5)[None, None].expand(1, 3, *sector.shape)
    return table.gather(0, idx)[0].permute(1, 0, 2, 3)


def color(x: torch.Tensor) -> torch.Tensor:
    """HueSaturationValue (hue +-20 of OpenCV's 180 = +-40 deg, saturation +-30/255, value +-20/255),
    ChannelShuffle and RGBShift (+-20/255 per channel), each with p = 0.5."""
    n, dev = x.shape[0], x.device
    x = _where(x.clamp(0, 1), _coin(n, 0.5, dev), _hsv_shift)
    perm = torch.argsort(torch.rand(n, 3, device=dev), dim=1)
    shuffled = x.gather(1, perm[:, :, None, None].expand_as(x))
    x = torch.where(_coin(n, 0.5, dev)[:, None, None, None], shuffled, x)
    rgb = torch.rand(n, 3, 1, 1, device=dev) * (40 / 255) - 20 / 255
    x = torch.where(_coin(n, 0.5, dev)[:, None, None, None], x + rgb, x)
    return x.clamp(0, 1)


def _hsv_shift(x: torch.Tensor) -> torch.Tensor:
    n, dev = x.shape[0], x.device
    hue, sat, val = 20 / 180, 30 / 255, 20 / 255
    shift = torch.stack(
        [_uniform(n, -hue, hue, dev), _uniform(n, -sat, sat, dev), _uniform(n, -val, val, dev)], 1
    )
    hsv = rgb_to_hsv(x) + shift[:, :, None, None]
    hsv = torch.stack([torch.remainder(hsv[:, 0], 1.0), hsv[:, 1].clamp(0, 1), hsv[:, 2].clamp(0, 1)], 1)
    return hsv_to_rgb(hsv)


def _noise(x: torch.Tensor) -> torch.Tensor:
    """GaussNoise(var_limit=(10, 50)) on the 0-255 scale."""
    std = torch.sqrt(_uniform(x.shape[0], 10.0, 50.0, x.device)) / 255.0
    return x + torch.randn_like(x) * std[:, None, None, None]


def _box(x: torch.Tensor, size: int) -> torch.Tensor:
    """size x size mean filter with reflected borders (OpenCV's default for cv2.blur), as running
    sums along each axis (cheaper on CPU than a depthwise convolution)."""
    r = size // 2
    c = F.pad(x, (r + 1, r, r + 1, r), mode="reflect").cumsum(-1)
    c = (c[..., size:] - c[..., :-size]).cumsum(-2)
    return (c[..., size:, :] - c[..., :-size, :]) / (size * size)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Blur(blur_limit=7): a box filter of odd size 3, 5 or 7 per image."""
    k = torch.randint(0, 3, (x.shape[0],), device=x.device)
    for i, size in enumerate((3, 5, 7)):
        x = _where(x, k == i, lambda im, size=size: _box(im, size))
    return x


def _shift_scale_rotate(x: torch.Tensor) -> torch.Tensor:
    """ShiftScaleRotate(shift 0.0625, scale 0.1, rotate 45 deg), reflected borders."""
    n, dev = x.shape[0], x.device
    angle = _uniform(n, -math.pi / 4, math.pi / 4, dev)
    scale = _uniform(n, 0.9, 1.1, dev)
    tx, ty = _uniform(n, -0.125, 0.125, dev), _uniform(n, -0.125, 0.125, dev)  # 0.0625 of the side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    return _warp(x, theta, "reflection")


def random_degradation(x: torch.Tensor) -> torch.Tensor:
    """OneOf(noise, blur, distortion) on every image (DeepSpaCE's "random" group, p = 1)."""
    which = torch.randint(0, 3, (x.shape[0],), device=x.device)
    for i, fn in enumerate((_noise, _blur, _shift_scale_rotate)):
        x = _where(x, which == i, fn)
    return x.clamp(0, 1)


def augment(x: torch.Tensor, groups: Sequence[str]) -> torch.Tensor:
    """Apply the named groups in DeepSpaCE's order (crop, color, random)."""
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"deepspace: unknown augmentation(s) {sorted(unknown)}; choose from {GROUPS}")
    x = x.float()
    if "crop" in groups:
        x = random_resized_crop(x)
    if "color" in groups:
        x = color(x)
    if "random" in groups:
        x = random_degradation(x)
    return x
