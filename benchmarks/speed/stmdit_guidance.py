"""STMDiT sampling speed: dual CFG with the three guided passes batched into one forward vs three forwards.

Why: dual classifier-free guidance (s_uni = 4, s_ge = 3) needs the none / UNI-only / full predictions
at every step. `guided_prediction(batched=True)` stacks them into one 3B-row forward (exact, thanks to
the DiT's per-sample null tokens); `batched=False` runs three B-row forwards. This script measures what
the stacking buys (issue 8, item 7) on the real modules, and asserts both give the same numbers.

Random inputs, no training (weights do not change the cost): `build_dit(size, ge=GEConfig(...))` with
every weight nudged by 0.02 N(0, 1) so the zero-initialised outputs (final layer, GE gate, GE
cross-attention) are live and the equality check is not trivially 0 == 0. UNI2-h features are random
1,536-d vectors, GE inputs a random (B, ge_dim) cell embedding (AdaLN) or (B, n, ge_dim) gene tokens
(XAttn with PMA pooling). Sampling is `LatentObjective(kind).sample` (DDIM for ddpm, Euler for flow)
with per-spot generators, so batched and separate runs start from the same noise.

Per configuration: one untimed guided prediction per mode at the measured shape (the warm-up; the two
are compared), then `repeats` sampler runs per mode, taking turns; median wall time (perf_counter).
  * tiles/s = batch / median seconds at `steps` steps; "@50" scales it by steps / 50 (every step is one
    guided prediction of the same cost) to the paper's 50-step samplers;
  * separate/batched = median seconds separate / batched (> 1: stacking is faster);
  * peak MB = resident-memory high-water mark (Linux VmHWM after a /proc/self/clear_refs reset) during
    the first run of a mode, above the resident memory before it;
  * decode tiles/s: the tiny random VAE (`load_vae("tiny")`, downsampling 8) decoding the batched
    latents; `--vae sd3` times an SD3-sized random VAE instead (seconds per tile on CPU), `--vae off`;
  * equality: max |batched - separate| of the guided eps (one step) and of the final latents must be
    <= 1e-5 x max(1, max |value|) (see `check_same`), else the script stops with an AssertionError.

    .venv/bin/python benchmarks/speed/stmdit_guidance.py                  # ~2-3 min on 2 CPU cores
    .venv/bin/python benchmarks/speed/stmdit_guidance.py --sizes tiny --steps 50 --batches 8 32 128
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from baselines.stmdit.dit import STMDiT, build_dit
from baselines.stmdit.ge_conditioning import GEConfig
from baselines.stmdit.guidance import guided_prediction
from baselines.stmdit.objectives import LatentObjective
from stbench.encoders.vae import SD3_VAE_CONFIG, LatentVAE, build_vae, load_vae
from stbench.methods.sampling import spot_generators

S_UNI, S_GE = 4.0, 3.0  # the paper's headline guidance scales
PAPER_STEPS = 50
TOLERANCE = 1e-5
FUSIONS = {
    "adaln": GEConfig(fusion="adaln"),
    "xattn-pma": GEConfig(fusion="xattn", tokens="pma"),
}


@dataclass(frozen=True)
class Case:
    """One measured configuration (a table row)."""

    size: str
    fusion: str
    objective: str
    latent: int
    batch: int
    steps: int
    repeats: int


# ---------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> int | None:
    """Reset VmHWM to the current RSS (Linux) and return that RSS in kB; None where unsupported.
    Freed memory is handed back first so a run's peak is not hidden in an earlier run's arena."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kb("VmRSS")


def timed(
    fns: dict[str, Callable[[], torch.Tensor]], repeats: int
) -> dict[str, tuple[float, float | None, torch.Tensor]]:
    """Per name: (median seconds, peak MB above the RSS before its first run or None, last output).
    The functions take turns (a, b, a, b, ...) so a load change on the shared machine hits both."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    peaks: dict[str, float | None] = dict.fromkeys(fns)
    outs: dict[str, torch.Tensor] = {}
    for r in range(repeats):
        for name, fn in fns.items():
            before = _reset_peak() if r == 0 else None
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
            hwm = _status_kb("VmHWM") if before is not None else None
            if before is not None and hwm is not None:
                peaks[name] = max(hwm - before, 0) / 1024
    return {k: (statistics.median(times[k]), peaks[k], outs[k]) for k in fns}


# ---------------------------------------------------------------------------- model and sampler


def make_net(size: str, fusion: str, ge_dim: int) -> STMDiT:
    """A random STMDiT with live (non-zero) output paths, in eval mode."""
    torch.manual_seed(0)
    net = build_dit(size, ge=dataclasses.replace(FUSIONS[fusion], ge_dim=ge_dim)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net


class GuidedSampler:
    """One guided sampling of `case` with fixed inputs and seeds; `batched` picks the CFG mode."""

    def __init__(self, net: STMDiT, case: Case, ge_tokens: int, batched: bool) -> None:
        if net.ge_cfg is None:
            raise ValueError("the benchmark needs a GE model (dual guidance)")
        g = torch.Generator().manual_seed(1)
        b, ge_dim = case.batch, net.ge_cfg.ge_dim
        self.net, self.case, self.batched = net, case, batched
        self.uni = torch.randn(b, net.cfg.uni_dim, generator=g)
        if net.ge_cfg.fusion == "adaln":
            self.ge = {"ge_vec": torch.randn(b, ge_dim, generator=g)}
        else:
            self.ge = {"ge_tokens": torch.randn(b, ge_tokens, ge_dim, generator=g)}
        self.objective = LatentObjective(case.objective)
        self.shape = (b, net.cfg.in_channels, case.latent, case.latent)

    def model_fn(
        self, x: torch.Tensor, t: torch.Tensor, uni_keep: torch.Tensor, ge_keep: torch.Tensor
    ) -> torch.Tensor:
        """guidance.ModelFn: the conditions repeated to x's batch (3B when the passes are stacked)."""
        reps = x.shape[0] // self.case.batch
        cond = {k: v.repeat(reps, *([1] * (v.dim() - 1))) for k, v in self.ge.items()}
        uni = self.uni.repeat(reps, 1)
        return self.net(x, t, uni=uni, uni_keep=uni_keep, ge_keep=ge_keep, **cond)

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_prediction(self.model_fn, x, t, S_UNI, S_GE, batched=self.batched)

    def warm_up(self) -> torch.Tensor:
        """One guided prediction at the measured shape (thread pool, allocator, kernels) on a fixed
        input, returned for the one-step equality check."""
        g = torch.Generator().manual_seed(2)
        x = torch.randn(self.shape, generator=g)
        t = torch.linspace(0.0, self.objective.num_steps - 1, self.shape[0])
        with torch.inference_mode():
            return self.predict(x, t)

    def run(self) -> torch.Tensor:
        """Latents (B, C, h, w) after `case.steps` guided sampler steps."""
        gens = spot_generators(torch.arange(self.case.batch), seed=42, stream="stmdit-speed")
        with torch.inference_mode():
            return self.objective.sample(self.predict, self.shape, gens, steps=self.case.steps)


def check_same(what: str, case: Case, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, max |a|); asserts the difference is within TOLERANCE x max(1, max |a|): absolute
    for O(1) values, relative for the large latents a random-weight DDIM sampler produces (its x0
    prediction divides by sqrt(alpha_bar) ~ 0.006 at t = 999, amplifying float32 rounding alike)."""
    diff, scale = (a - b).abs().max().item(), a.abs().max().item()
    if not diff <= TOLERANCE * max(1.0, scale):
        raise AssertionError(
            f"{case}: batched and separate {what} differ by {diff:.3g} (max |value| {scale:.3g}, "
            f"tolerance {TOLERANCE:g} x max(1, that))"
        )
    return diff, scale


def measure(net: STMDiT, vae: LatentVAE | None, case: Case, ge_tokens: int) -> dict[str, float | None]:
    """Batched vs separate tiles/s and peaks, the equality checks, and optional decode tiles/s."""
    samplers = {
        m: GuidedSampler(net, case, ge_tokens, batched=m == "batched") for m in ("batched", "separate")
    }
    eps = {m: smp.warm_up() for m, smp in samplers.items()}
    eps_diff, _ = check_same("guided predictions", case, eps["batched"], eps["separate"])
    res = timed({m: smp.run for m, smp in samplers.items()}, case.repeats)
    (sec_b, peak_b, lat_b), (sec_s, peak_s, lat_s) = res["batched"], res["separate"]
    lat_diff, lat_scale = check_same("latents", case, lat_b, lat_s)
    row: dict[str, float | None] = {
        "batched": case.batch / sec_b,
        "separate": case.batch / sec_s,
        "ratio": sec_s / sec_b,
        "peak_b": peak_b,
        "peak_s": peak_s,
        "eps_diff": eps_diff,
        "lat_diff": lat_diff,
        "lat_scale": lat_scale,
        "decode": None,
    }
    if vae is not None:
        with torch.inference_mode():
            vae.decode(lat_b)  # warm-up
            row["decode"] = case.batch / timed({"d": lambda: vae.decode(lat_b)}, case.repeats)["d"][0]
    return row


# ---------------------------------------------------------------------------- table


def _fmt(v: float | None) -> str:
    """3 significant digits (whole numbers from 100 up); a dash for not measured."""
    if v is None:
        return "–"
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


HEADER = [
    "DiT",
    "params",
    "GE",
    "objective",
    "latents",
    "batch",
    "steps",
    "batched tiles/s",
    "separate tiles/s",
    "separate/batched",
    "batched tiles/s @50",
    "decode tiles/s",
    "peak MB batched / separate",
    "max abs diff: eps / latents (max abs latent)",
]


def table_row(case: Case, params: int, r: dict[str, float | None]) -> str:
    at_paper = None if r["batched"] is None else r["batched"] * case.steps / PAPER_STEPS
    peaks = f"{_fmt(r['peak_b'])} / {_fmt(r['peak_s'])}"
    cells = [
        case.size,
        f"{params / 1e6:.2f} M",
        case.fusion,
        case.objective,
        f"16x{case.latent}x{case.latent}",
        str(case.batch),
        str(case.steps),
        _fmt(r["batched"]),
        _fmt(r["separate"]),
        f"{r['ratio']:.2f}x",
        _fmt(at_paper),
        _fmt(r["decode"]),
        peaks,
        f"{r['eps_diff']:.1e} / {r['lat_diff']:.1e} ({r['lat_scale']:.3g})",
    ]
    return "| " + " | ".join(cells) + " |"


def cases(args: argparse.Namespace) -> list[Case]:
    """The measured grid: tiny at its 8x8 latents; B at 32x32 (256 px tiles) with its own, smaller
    batch / steps / repeats since one B forward is ~0.5 s per row on 2 CPU cores."""
    out = []
    for size in args.sizes:
        tiny = size == "tiny"
        latent = args.latent if tiny else args.b_latent
        batches = args.batches if tiny else args.b_batches
        steps = args.steps if tiny else args.b_steps
        repeats = args.repeats if tiny else args.b_repeats
        objectives = args.objectives if tiny else args.b_objectives
        for fusion in args.fusions:
            for objective in objectives:
                for batch in batches:
                    out.append(Case(size, fusion, objective, latent, batch, steps, repeats))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "B"], choices=["tiny", "B", "XL"])
    ap.add_argument("--fusions", nargs="+", default=list(FUSIONS), choices=list(FUSIONS))
    ap.add_argument("--objectives", nargs="+", default=["ddpm"], choices=["ddpm", "flow"], help="(tiny)")
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 32], help="tiny batch sizes")
    ap.add_argument("--steps", type=int, default=10, help="sampler steps (tiny)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode (tiny); median reported")
    ap.add_argument("--latent", type=int, default=8, help="latent side (tiny; 8 = 64 px tiles)")
    ap.add_argument("--b-objectives", nargs="+", default=["ddpm"], choices=["ddpm", "flow"])
    ap.add_argument("--b-batches", nargs="+", type=int, default=[2], help="B / XL batch sizes")
    ap.add_argument("--b-steps", type=int, default=2, help="sampler steps (B / XL)")
    ap.add_argument("--b-repeats", type=int, default=2, help="timed runs per mode (B / XL)")
    ap.add_argument("--b-latent", type=int, default=32, help="latent side (B / XL; 32 = 256 px tiles)")
    ap.add_argument("--ge-dim", type=int, default=256, help="GE embedding / token width")
    ap.add_argument("--ge-tokens", type=int, default=1200, help="gene tokens per spot (XAttn)")
    ap.add_argument(
        "--vae", default="tiny", choices=["tiny", "sd3", "off"], help="decoder timed on the latents"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    ap.add_argument(
        "--keep-denormals",
        action="store_true",
        help="do not flush subnormal floats (the stmdit Method flushes them while sampling)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(not args.keep_denormals)
    vae = None
    if args.vae != "off":
        vae = load_vae("tiny") if args.vae == "tiny" else build_vae(SD3_VAE_CONFIG)
    lines = [
        f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, fp32, denormals {'kept' if args.keep_denormals else 'flushed'}; s_uni {S_UNI:g}, s_ge {S_GE:g}; GE dim {args.ge_dim}, "
        f"{args.ge_tokens} gene tokens (xattn); decode: {args.vae} VAE; tiles/s = batch / median of repeats",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * 4 + "---:|" * (len(HEADER) - 4),
    ]
    print("\n".join(lines), flush=True)
    nets: dict[tuple[str, str], STMDiT] = {}
    for case in cases(args):
        key = (case.size, case.fusion)
        if key not in nets:
            nets.clear()  # one B-sized model in memory at a time
            nets[key] = make_net(case.size, case.fusion, args.ge_dim)
        net = nets[key]
        params = sum(p.numel() for p in net.parameters())
        lines.append(table_row(case, params, measure(net, vae, case, args.ge_tokens)))
        print(lines[-1], flush=True)
    print(
        f"all rows: batched == separate (guided eps and latents) within {TOLERANCE:g} x max(1, max |value|)"
    )
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
