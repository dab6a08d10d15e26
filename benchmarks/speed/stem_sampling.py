"""Stem inference speed: spots per second of the 1,000-step ancestral sampler vs DDIM (issue 6, item 7).

Random inputs (no data, no training): a StemDiT of the tiny and/or paper size, `--spots` spots of
`--cond-dim` random features, `--samples` samples per spot (Stem averages 20), `--genes` genes.
Every step of either sampler is one network call on all spots x samples rows, so a long run can be
timed on its first `--probe-steps` steps and extrapolated (marked in the table); `--probe-steps 0`
times every step.

    .venv/bin/python benchmarks/speed/stem_sampling.py                       # CPU, both sizes
    .venv/bin/python benchmarks/speed/stem_sampling.py --sizes paper --device cuda --probe-steps 0
"""

from __future__ import annotations

import argparse
import time

import torch

from baselines.stem.model import StemDiT
from stbench.methods.toolkit.diffusion import GaussianDiffusion

SIZES = {  # the configs' network sizes (baselines/stem/configs/{tiny,paper}.yaml)
    "tiny": {"hidden": 64, "depth": 1, "heads": 4, "mlp_ratio": 2.0},
    "paper": {"hidden": 384, "depth": 12, "heads": 6, "mlp_ratio": 4.0},
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_sampler(
    net: StemDiT,
    diffusion: GaussianDiffusion,
    sampler: str,
    steps: int,
    spots: int,
    samples: int,
    probe: int,
    device: str,
) -> tuple[float, bool]:
    """(seconds for `steps` steps, extrapolated?) for one batch of spots x samples rows."""
    cond = torch.randn(spots, net.cond_dim, device=device).repeat_interleave(samples, 0)
    shape = (spots * samples, net.n_genes)
    run_steps = steps if probe <= 0 or steps <= probe else probe
    gen = torch.Generator(device=device).manual_seed(0)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(x, t, cond)

    with torch.inference_mode():
        diffusion.sample_ddim(model, shape, gen, device, steps=2)  # warm-up
        _sync(device)
        start = time.perf_counter()
        if sampler == "ancestral":
            diffusion.sample_ancestral(model, shape, gen, device, steps=run_steps)
        else:
            diffusion.sample_ddim(model, shape, gen, device, steps=run_steps)
        _sync(device)
    elapsed = time.perf_counter() - start
    return elapsed * steps / run_steps, run_steps != steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,paper")
    p.add_argument("--genes", type=int, default=200)
    p.add_argument("--cond-dim", type=int, default=1536)
    p.add_argument("--spots", type=int, default=8)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--ancestral-steps", type=int, default=1000)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--probe-steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    diffusion = GaussianDiffusion.linear(1000)
    print(
        f"device {args.device}, threads {torch.get_num_threads()}, {args.genes} genes, {args.spots} spots x "
        f"{args.samples} samples, cond dim {args.cond_dim}\n"
    )
    print("| size | params | sampler | steps | s / batch | spots/s | note |")
    print("|---|---:|---|---:|---:|---:|---|")
    for size in args.sizes.split(","):
        net = StemDiT(args.genes, args.cond_dim, **SIZES[size]).to(args.device).eval()
        for prm in net.parameters():  # non-zero outputs (adaLN-Zero starts at 0), same cost either way
            prm.data.normal_(0, 0.02)
        n_params = sum(x.numel() for x in net.parameters())
        rates = {}
        for sampler, steps in (("ancestral", args.ancestral_steps), ("ddim", args.ddim_steps)):
            sec, extrapolated = time_sampler(
                net, diffusion, sampler, steps, args.spots, args.samples, args.probe_steps, args.device
            )
            rates[sampler] = args.spots / sec
            note = f"extrapolated from {args.probe_steps} steps" if extrapolated else "measured"
            print(
                f"| {size} | {n_params:,} | {sampler} | {steps} | {sec:.2f} | {rates[sampler]:.3g} | {note} |"
            )
        print(f"| {size} | | ddim / ancestral | | | {rates['ddim'] / rates['ancestral']:.1f}x | |")


if __name__ == "__main__":
    main()
