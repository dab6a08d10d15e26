"""Latent pre-extraction throughput of STMDiT's VAE (issue 8, item 7): the latent store vs a naive loop.

Tiles: 256 px patches of the offline synthetic dataset (content does not change VAE cost). VAEs, both
random init (no download): the tiny test VAE (`load_vae("tiny")`) and an SD3-sized VAE built from
SD3's published architecture (block_out_channels 128/256/512/512, layers_per_block 2, 16 latent
channels, no quant convs; ~83.8 M parameters).

  * store: `LatentStore.extract` of `--tiles` (tiny) / `--sd3-tiles` (SD3-sized) tiles into an empty
    cache at batch sizes 1, 8, 32 (inference mode, fp32 compute, float32 chunked memmap storage); a
    batch size above the tile count is skipped;
  * naive: the per-tile loop of a typical extraction script (PixCell's tools/extract_features.py
    saves one file per tile): one tile per forward with autograd on, then `np.save` of
    [mean, std] fp16 to its own .npy file;
  * ratio = store tiles/s / naive tiles/s; peak MB = resident-memory high-water mark during the
    run above the resident memory just before it (Linux VmHWM after a reset through
    /proc/self/clear_refs; falls back to ru_maxrss, which also counts earlier peaks).
One warm-up tile per VAE precedes the timings. Wall-clock on a shared machine: noisy, compare ratios.

    .venv/bin/python benchmarks/speed/latent_extraction.py                  # ~3-5 min on 2 CPU cores
    .venv/bin/python benchmarks/speed/latent_extraction.py --sd3-tiles 32   # SD3-sized at batch 32 too
"""

from __future__ import annotations

import argparse
import platform
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stbench.data.latents import LatentStore
from stbench.data.patches import PatchSpec, PatchStore, SlidePatches
from stbench.data.readers.synthetic import SyntheticReader
from stbench.data.synthetic import generate_synthetic
from stbench.encoders.vae import SD3_VAE_CONFIG, LatentVAE, build_vae, load_vae

BATCHES = (1, 8, 32)
PX = 256


def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def _release_freed_memory() -> None:
    """Hand memory freed by earlier runs back to the OS (glibc keeps it resident otherwise), so each
    run's peak is measured from a low baseline instead of hiding inside an earlier run's arena."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: later peaks may read low
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _measure(fn) -> tuple[float, float]:
    """(seconds, peak MB above the resident memory before) of fn()."""
    _release_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    before = _status_kb("VmRSS") or 0
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    hwm = _status_kb("VmHWM") if reset else None
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
    return dt, max(hwm - before, 0) / 1024


def tiles(cache: Path, n: int) -> SlidePatches:
    """A patch store of the first n spots of a synthetic slide (enough spots for n)."""
    side = max(6, int(np.ceil(np.sqrt(n / 0.8))) + 1)
    root = generate_synthetic(cache / f"ds{n}", n_slides=1, n_patients=1, spots_per_side=side, n_genes=8)
    slide = SyntheticReader(root).read_all()[0]
    if slide.n_spots < n:
        raise SystemExit(f"synthetic slide has {slide.n_spots} spots < {n}")
    slide.adata = slide.adata[:n].copy()
    return PatchStore(cache / "patches", PatchSpec(out_px=PX)).build(slide)


def naive(vae: LatentVAE, patches: SlidePatches, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i in range(len(patches)):
        x = torch.from_numpy(np.array(patches.patches[i])).permute(2, 0, 1)[None].float() / 255.0
        mean, std = vae.encode_moments(x)  # autograd on, as in a plain script without no_grad
        z = torch.cat([mean, std], dim=1)[0].detach().numpy().astype(np.float16)
        np.save(out / f"{patches.spot_ids[i]}_sd3_vae.npy", z)


def run(label: str, vae: LatentVAE, patches: SlidePatches, cache: Path) -> list[list[str]]:
    vae.eval()
    with torch.inference_mode():  # warm-up: thread pool, allocator, kernels
        vae.encode_moments(torch.rand(1, 3, PX, PX))
    n = len(patches)
    params = sum(p.numel() for p in vae.parameters())
    dt_naive, mb_naive = _measure(lambda: naive(vae, patches, cache / f"naive-{label}"))
    naive_rate = n / dt_naive
    rows = [
        [label, f"{params / 1e6:.2f} M", str(n), "naive loop", f"{naive_rate:.2f}", f"{mb_naive:.0f}", "1.00"]
    ]
    for b in BATCHES:
        if b > n:
            rows.append([label, "", str(n), f"store b={b}", "skipped (tiles < batch)", "", ""])
            continue
        store = LatentStore(cache / f"store-{label}-{b}", chunk_size=max(256, b))
        dt, mb = _measure(lambda b=b, store=store: store.extract(patches, vae, batch_size=b, device="cpu"))
        rate = n / dt
        rows.append(
            [label, "", str(n), f"store b={b}", f"{rate:.2f}", f"{mb:.0f}", f"{rate / naive_rate:.2f}"]
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=32, help="tiles for the tiny VAE")
    ap.add_argument(
        "--sd3-tiles", type=int, default=8, help="tiles for the SD3-sized VAE (~3-10 s each on CPU)"
    )
    ap.add_argument("--skip-sd3", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        rows += run("tiny (random)", load_vae("tiny"), tiles(cache / "a", args.tiles), cache)
        if not args.skip_sd3:
            sd3 = build_vae(SD3_VAE_CONFIG)
            rows += run("SD3-sized (random)", sd3, tiles(cache / "b", args.sd3_tiles), cache)
    print(
        f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, {PX} px tiles, fp32 compute; "
        "store: float32 memmap, naive: one fp16 .npy per tile"
    )
    header = ["VAE", "params", "tiles", "path", "tiles/s", "peak MB", "x naive"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
