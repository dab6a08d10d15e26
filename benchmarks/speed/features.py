"""Feature-store speed: extraction throughput of frozen encoders on CPU, and what caching saves.

On the offline synthetic dataset (224 px patches of 112 um, HEST's scale), in this process:
  * extraction: `FeatureStore.extract` of one slide's patches into an empty cache, patches/s, for
    HEST's ResNet50-trunc (registry, random init) and a ViT-B/16 (timm `vit_base_patch16_224`,
    random init, CLS token, 768-d); fp32 on CPU, batch `--batch-size`;
  * probe epoch: one epoch of an MLP probe (probe-mlp's head, AdamW) over the training spots, with
    features read from the cache vs recomputed by ResNet50-trunc in the same epoch (what a method
    that embeds inside its training loop pays every epoch); ratio = recomputed / cached.
Timings are wall-clock, best of `--repeats` (the cached epoch: best of >= 3 after a warm-up epoch).

Run: `python benchmarks/speed/features.py [--slides 2] [--batch-size 32] [--repeats 1]`.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from baselines.probe_mlp.model import MLPHead
from stbench.data.features import FeatureStore
from stbench.data.patches import PatchSpec, PatchStore
from stbench.data.readers.synthetic import SyntheticReader
from stbench.data.synthetic import generate_synthetic

SPEC = PatchSpec(out_px=224, crop_um=112.0)


@dataclass(frozen=True)
class _Spec:
    name: str
    arch: str
    dim: int
    input_px: int = 224
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    mpp: float | None = None
    token: str = "cls"


class TimmViTB(torch.nn.Module):
    """timm vit_base_patch16_224, random init, with the Encoder interface ([0, 1] images in)."""

    def __init__(self) -> None:
        super().__init__()
        import timm

        self.spec = _Spec("vit-b16-timm", "vit_base_patch16_224", 768)
        self.weights_id = "none"
        self.model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        self.register_buffer("m", torch.tensor(self.spec.mean).view(1, 3, 1, 1))
        self.register_buffer("s", torch.tensor(self.spec.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.m) / self.s)


def extraction(slide, patches, encoder, cache: Path, batch_size: int, repeats: int) -> float:
    best = np.inf
    for r in range(repeats):
        store = FeatureStore(cache / f"{encoder.spec.name}-{r}")
        t0 = time.perf_counter()
        store.extract(slide, patches, encoder, batch_size=batch_size, device="cpu", precision="fp32")
        best = min(best, time.perf_counter() - t0)
    return len(patches) / best


def probe_epoch(x: np.ndarray, y: np.ndarray, encoder=None, patches=None, batch_size: int = 32) -> float:
    """One MLP-probe epoch; with `encoder`, features are recomputed from `patches` batch by batch."""
    torch.manual_seed(0)
    head = MLPHead(x.shape[1], y.shape[1], hidden=256)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    order = np.random.default_rng(0).permutation(len(x))
    t0 = time.perf_counter()
    for s in range(0, len(order), batch_size):
        rows = np.sort(order[s : s + batch_size])
        if encoder is not None:
            img = torch.from_numpy(np.array(patches[rows])).permute(0, 3, 1, 2).float() / 255.0
            with torch.inference_mode():
                feats = encoder(img)
            xb = feats.clone()
        else:
            xb = torch.from_numpy(x[rows])
        loss = torch.nn.functional.mse_loss(head(xb), torch.from_numpy(y[rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=2, help="synthetic slides for the probe epoch")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    from stbench.encoders import build_encoder

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        root = generate_synthetic(tmp_path / "ds", n_slides=max(2, args.slides), n_patients=2)
        slides = SyntheticReader(root).read_all()[: args.slides]
        ps = PatchStore(tmp_path / "cache", SPEC)
        stores = [ps.build(s) for s in slides]
        resnet = build_encoder("resnet50-trunc", weights="none").eval()
        vit = TimmViTB().eval()
        rows = []
        for enc in (resnet, vit):
            rate = extraction(slides[0], stores[0], enc, tmp_path, args.batch_size, args.repeats)
            rows.append((enc.spec.name, enc.spec.dim, len(stores[0]), rate))
        fs = FeatureStore(tmp_path / "cache")
        x = np.concatenate(
            [fs.extract(s, p, resnet, device="cpu").array for s, p in zip(slides, stores, strict=True)]
        )
        all_patches = np.concatenate([np.asarray(p.patches) for p in stores])
        y = np.random.default_rng(0).normal(size=(len(x), 50)).astype(np.float32)
        probe_epoch(x, y, batch_size=args.batch_size)  # warm-up (thread pool, allocator, AdamW state)
        cached = min(probe_epoch(x, y, batch_size=args.batch_size) for _ in range(max(3, args.repeats)))
        recomputed = probe_epoch(x, y, resnet, all_patches, args.batch_size)

    print(
        f"CPU: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
        f"batch {args.batch_size}, fp32, 224 px patches"
    )
    print("| encoder | dim | patches | extraction (patches/s) |")
    print("|---|---|---|---|")
    for name, dim, n, rate in rows:
        print(f"| {name} | {dim} | {n} | {rate:.1f} |")
    print()
    print(f"| probe epoch ({len(x)} spots, MLP 256) | seconds |")
    print("|---|---|")
    print(f"| cached features | {cached:.3f} |")
    print(f"| recomputed (ResNet50-trunc every epoch) | {recomputed:.2f} |")
    print(f"| ratio recomputed / cached | {recomputed / cached:.0f}x |")


if __name__ == "__main__":
    main()
