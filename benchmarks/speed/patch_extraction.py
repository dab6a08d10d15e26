"""Patch-store speed benchmark on the real Her2ST slides that ship an image (B4, C2-C6).

For each slide, in a fresh worker process (so memory of one slide never flatters another), the
steps below interleaved `--repeats` times (default 3), timings the best run:
  * decode:  `SlideImage.read()` once (JPEG decode + conversion to an (H, W, 3) array);
             the bare Pillow decode (`Image.open(...).load()`) is shown for reference;
  * extract: `PatchStore.build()` into an empty cache: its one decode + cutting, resampling,
             quality metrics and writing every patch; ratio = extract / decode (target <= 1.5);
  * peak MB: the worker's peak resident memory during its first `read()` / `build()` above its
             resident memory just before it (Linux VmHWM after a reset through
             /proc/self/clear_refs; falls back to ru_maxrss, which also counts earlier peaks);
then the read throughput of the built stores: random single-patch reads from the read-only
memory maps, stacked into float32 tensors (B, 3, H, W) in [0, 1] of batch 32, page cache warm.

Run: `make bench-speed` or `python benchmarks/speed/patch_extraction.py [--root DIR] [--slides B4 C2]`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "her2st"
SLIDES = ["B4", "C2", "C3", "C4", "C5", "C6"]
SPECS = {  # name -> PatchSpec kwargs
    "spot 224px": {"out_px": 224},  # crop = the 100 um spot diameter (~145 px), upsampled
    "224um 224px": {"out_px": 224, "crop_um": 224.0},  # 1 um/px, downsampled with antialiasing
}


# ---- memory ----------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb(before_kb: int, reset: bool) -> float:
    hwm = _status_kb("VmHWM") if reset else None
    if hwm is None:  # ru_maxrss: kB on Linux, bytes on macOS
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
    return max(hwm - before_kb, 0) / 1024


# ---- workers (each runs in a fresh process) ------------------------------------------------
def _slide_worker(root: str, slide_id: str, cache: str, repeats: int) -> dict[str, Any]:
    """All measurements of one slide, interleaved (decode, read, build A, build B) `repeats` times so
    background load hits them alike; times are the best run, peaks come from the first run."""
    from PIL import Image

    from stbench.data.patches import PatchSpec, PatchStore
    from stbench.data.readers.her2st import Her2STReader

    slide = Her2STReader(root).read_slide(slide_id)
    Image.MAX_IMAGE_PIXELS = None
    runs: dict[str, list[float]] = {"pil": [], "read": [], **{f"{n}_extract": [] for n in SPECS}}
    res: dict[str, Any] = {"spots": slide.n_spots}
    for k in range(repeats):
        t = time.perf_counter()
        with Image.open(slide.image.path) as im:
            im.load()
        runs["pil"].append(time.perf_counter() - t)
        del im
        before, reset = _status_kb("VmRSS") or 0, _reset_peak()
        t = time.perf_counter()
        arr = slide.image.read()
        runs["read"].append(time.perf_counter() - t)
        res["size"] = f"{arr.shape[1]}x{arr.shape[0]}"
        del arr
        if k == 0:
            res["read_peak_mb"] = _peak_mb(before, reset)
        for name, kwargs in SPECS.items():
            store = PatchStore(Path(cache) / f"{name.replace(' ', '_')}-run{k}", PatchSpec(**kwargs))  # empty
            before, reset = _status_kb("VmRSS") or 0, _reset_peak()
            t = time.perf_counter()
            sp = store.build(slide)
            runs[f"{name}_extract"].append(time.perf_counter() - t)
            runs.setdefault(f"{name}_cut", []).append(
                runs[f"{name}_extract"][-1] - sp.index["seconds_decode"]
            )
            if k == 0:
                res[f"{name}_peak_mb"] = _peak_mb(before, reset)
                res[f"{name}_path"] = str(sp.path)
                res["patches"], res[f"{name}_crop_px"] = len(sp), sp.crop_size_px
    res.update({f"{key}_s": min(values) for key, values in runs.items()})
    return res


def _in_fresh_process(fn: Any, *args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


# ---- read throughput -----------------------------------------------------------------------
def read_throughput(paths: list[str], batch: int = 32, seconds: float = 3.0) -> dict[str, float]:
    """Random single-patch reads from the stores' memory maps, stacked to float batches."""
    import numpy as np
    import torch

    maps = [np.load(Path(p) / "patches.npy", mmap_mode="r") for p in paths]
    sizes = np.array([len(m) for m in maps])
    rng = np.random.default_rng(0)
    n_batches = n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        which = rng.integers(0, len(maps), size=batch)
        rows = rng.integers(0, sizes[which])
        arr = np.stack([maps[w][r] for w, r in zip(which, rows, strict=True)])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
        assert x.shape[0] == batch
        n_batches += 1
        n += batch
    elapsed = time.perf_counter() - t0
    return {"patches_per_s": n / elapsed, "batches_per_s": n_batches / elapsed, "batches": n_batches}


# ---- output --------------------------------------------------------------------------------
def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
        for r in rows:
            print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        return
    table = Table(title=title, title_justify="left")
    for h in header:
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(*r)
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help="Her2ST checkout (default: %(default)s)"
    )
    parser.add_argument("--slides", nargs="+", default=SLIDES)
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="keep stores here (default: temp, deleted)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timings are the best of N (default %(default)s)"
    )
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"Her2ST data not found at {args.root}; pass --root", file=sys.stderr)
        return 2
    import numpy as np
    import PIL

    print(
        f"python {platform.python_version()}, numpy {np.__version__}, pillow {PIL.__version__}, "
        f"{mp.cpu_count()} CPUs, {platform.machine()}, load average {os.getloadavg()[0]:.1f} at start"
    )
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="stbench-bench-patches-"))
    a, b = list(SPECS)
    rows, paths = [], []
    try:
        for sid in args.slides:
            r = _in_fresh_process(_slide_worker, str(args.root), sid, str(cache / sid), args.repeats)
            paths += [r[f"{a}_path"], r[f"{b}_path"]]
            rows.append(
                [
                    sid,
                    r["size"],
                    str(r["patches"]),
                    f"{r[f'{a}_crop_px']:.1f}",
                    f"{r['pil_s']:.2f}",
                    f"{r['read_s']:.2f}",
                    f"{r[f'{a}_extract_s']:.2f}",
                    f"{r[f'{a}_extract_s'] / r['read_s']:.2f}",
                    f"{r[f'{a}_cut_s'] / r['patches'] * 1000:.2f}",
                    f"{r['read_peak_mb']:.0f}",
                    f"{r[f'{a}_peak_mb']:.0f}",
                    f"{r[f'{b}_extract_s']:.2f}",
                    f"{r[f'{b}_extract_s'] / r['read_s']:.2f}",
                    f"{r[f'{b}_cut_s'] / r['patches'] * 1000:.2f}",
                    f"{r[f'{b}_peak_mb']:.0f}",
                ]
            )
        _print_table(
            f"Patch extraction, Her2ST (A = {a}: crop = 100 um spot diameter, out 224 px; "
            f"B = {b}: crop 224 um, out 224 px)",
            [
                "slide",
                "image",
                "patches",
                "A crop px",
                "PIL decode s",
                "read() s",
                "A extract s",
                "A ratio",
                "A ms/patch",
                "read() peak MB",
                "A peak MB",
                "B extract s",
                "B ratio",
                "B ms/patch",
                "B peak MB",
            ],
            rows,
        )
        print(
            f"Times: best of {args.repeats}, interleaved. ratio = extract / read(); extract includes its one "
            "read(). ms/patch = (extract - the read() inside it) / patches.\npeak MB = peak RSS above the RSS "
            "just before the first call, in a fresh process per slide (the decoded image alone is ~275 MB)."
        )
        tp = read_throughput(paths)
        _print_table(
            "Store read throughput (random access over memmaps, float batch of 32, warm page cache)",
            ["stores", "batches", "batches/s", "patches/s"],
            [
                [
                    str(len(paths)),
                    str(tp["batches"]),
                    f"{tp['batches_per_s']:.1f}",
                    f"{tp['patches_per_s']:.0f}",
                ]
            ],
        )
    finally:
        if args.cache_dir is None:
            shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
