"""Figures of the HTML leaderboard, as PNG bytes (matplotlib Agg, no pyplot state).

Every figure is drawn under matplotlib's default style (a user's matplotlibrc cannot change it) and
saved without the "Software" metadata, so the same inputs give the same bytes and a regenerated
report matches the committed one.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.style
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
MAX_PANELS = 6  # predicted maps / heatmaps beyond the truth: the report stays readable


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)  # Agg explicitly, whatever backend the caller's pyplot uses
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def pcc_box_plot(
    entries: Sequence[tuple[str, Sequence[float], str]], *, metric: str = "pcc", title: str = ""
) -> bytes:
    """Horizontal box plot of per-slice values, one box per entry (label, values, note if empty).
    Points are drawn on top so a box of 2 slices is not mistaken for a distribution."""
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(7.5, 1.2 + 0.45 * max(len(entries), 1)))
        ax = fig.add_subplot()
        positions = list(range(len(entries), 0, -1))  # first entry (best) on top
        for pos, (_, values, note) in zip(positions, entries, strict=True):
            if len(values):
                ax.boxplot(
                    [list(values)],
                    positions=[pos],
                    vert=False,
                    widths=0.55,
                    showfliers=False,
                    patch_artist=True,
                    boxprops={"facecolor": "#cfe0f3"},
                    medianprops={"color": "#1f4e79"},
                )
                ax.plot(list(values), [pos] * len(values), "o", ms=3.5, color="#1f4e79", alpha=0.7)
            else:
                ax.text(
                    0.0,
                    pos,
                    f"n/a ({note})" if note else "n/a",
                    va="center",
                    ha="left",
                    fontsize=8,
                    color="#7f7f7f",
                    transform=ax.get_yaxis_transform(),
                )
        ax.set_yticks(positions)
        ax.set_yticklabels([label for label, _, _ in entries], fontsize=8)
        ax.set_ylim(0.4, len(entries) + 0.6)
        ax.axvline(0.0, color="#999999", lw=0.8, ls="--")
        ax.set_xlabel(f"{metric} per test slice (folds x seeds)", fontsize=9)
        ax.grid(axis="x", color="#e5e5e5")
        if title:
            ax.set_title(title, fontsize=10)
        fig.tight_layout()
        return _png(fig)


@dataclass(frozen=True)
class SlidePrediction:
    """One job's prediction of one test slide, loaded from `jobs/<job_id>/predictions/<slide>.h5ad`."""

    label: str
    coords: np.ndarray  # (n, 2) full-resolution px
    genes: list[str]
    pred: np.ndarray  # (n, G) float64
    truth: np.ndarray  # (n, G) float64


def find_predictions(dirs: Iterable[str | Path]) -> dict[str, dict[str, Path]]:
    """{job_id: {slide: h5ad}} for every `<job_id>/predictions/<slide>.h5ad` under the given folders."""
    found: dict[str, dict[str, Path]] = {}
    for d in dirs:
        for path in sorted(Path(d).rglob("*.h5ad")):
            if path.parent.name == "predictions":
                found.setdefault(path.parent.parent.name, {})[path.stem] = path
    return found


def load_prediction(path: Path, label: str) -> SlidePrediction:
    import anndata

    ad = anndata.read_h5ad(path)
    if "truth" not in ad.layers or "spatial" not in ad.obsm:
        raise ValueError(f"{path}: a prediction file needs layers['truth'] and obsm['spatial']")

    def dense(m: object) -> np.ndarray:
        return np.asarray(m.toarray() if hasattr(m, "toarray") else m, dtype=np.float64)

    return SlidePrediction(
        label,
        np.asarray(ad.obsm["spatial"], dtype=np.float64)[:, :2],
        [str(g) for g in ad.var_names],
        dense(ad.X),
        dense(ad.layers["truth"]),
    )


def top_variance_genes(truth: np.ndarray, genes: Sequence[str], k: int) -> list[str]:
    """The k genes of highest truth variance on the slide (ties broken by name, so the choice is stable)."""
    var = np.var(truth, axis=0)
    order = sorted(range(len(genes)), key=lambda i: (-round(float(var[i]), 12), genes[i]))
    return [genes[i] for i in order[:k]]


def _columns(p: SlidePrediction, genes: Sequence[str], which: str) -> np.ndarray:
    index = {g: i for i, g in enumerate(p.genes)}
    return getattr(p, which)[:, [index[g] for g in genes]]


def spatial_maps(preds: Sequence[SlidePrediction], genes: Sequence[str], *, slide: str) -> bytes:
    """Truth (top row, from the first prediction file) and each prediction as spot scatters of
    obsm['spatial'] coloured by expression; one colour scale per gene, set by the truth's range,
    so a flat prediction looks flat."""
    preds = list(preds)[:MAX_PANELS]
    truth = _columns(preds[0], genes, "truth")
    panels = [("truth", preds[0].coords, truth)] + [
        (p.label, p.coords, _columns(p, genes, "pred")) for p in preds
    ]
    size = float(np.clip(12000.0 / max(len(truth), 1), 3.0, 40.0))  # dots fill the tissue at any spot count
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(3.2 * len(genes), 2.6 * len(panels) + 0.4), layout="constrained")
        axes = fig.subplots(len(panels), len(genes), squeeze=False)
        for j, gene in enumerate(genes):
            lo, hi = float(np.min(truth[:, j])), float(np.max(truth[:, j]))
            hi = hi if hi > lo else lo + 1.0
            for i, (label, xy, values) in enumerate(panels):
                ax = axes[i][j]
                sc = ax.scatter(
                    xy[:, 0], xy[:, 1], c=values[:, j], s=size, cmap="viridis", vmin=lo, vmax=hi, linewidths=0
                )
                ax.set_aspect("equal")
                ax.invert_yaxis()  # image coordinates: y grows downwards
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{gene}: {label}", fontsize=8)
            fig.colorbar(sc, ax=list(axes[:, j]), shrink=0.6, aspect=40).ax.tick_params(labelsize=6)
        fig.suptitle(
            f"slide {slide}: predicted vs true expression (top-{len(genes)} genes by truth variance)",
            fontsize=10,
        )
        return _png(fig)


def _corr(x: np.ndarray) -> np.ndarray:
    """Gene-gene Pearson matrix; genes constant on the slide give NaN rows (drawn grey)."""
    c = x - x.mean(axis=0)
    norm = np.sqrt((c**2).sum(axis=0))
    ok = norm > 1e-12 * np.maximum(np.abs(x).max(axis=0), 1.0)
    z = np.where(ok, c / np.where(ok, norm, 1.0), 0.0)
    r = np.clip(z.T @ z, -1.0, 1.0)
    r[~ok, :] = np.nan
    r[:, ~ok] = np.nan
    return r


def correlation_heatmaps(preds: Sequence[SlidePrediction], genes: Sequence[str], *, slide: str) -> bytes:
    """Gene-gene correlation matrices of the truth and of each prediction on one slide (same gene order);
    grey cells are genes constant in that matrix (e.g. every gene under a constant predictor)."""
    preds = list(preds)[:MAX_PANELS]
    mats = [("truth", _corr(_columns(preds[0], genes, "truth")))]
    mats += [(p.label, _corr(_columns(p, genes, "pred"))) for p in preds]
    cols = min(len(mats), 4)
    rows = -(-len(mats) // cols)
    with matplotlib.style.context("default"):
        cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#d9d9d9")
        fig = Figure(figsize=(3.3 * cols, 3.3 * rows + 0.4))
        axes = fig.subplots(rows, cols, squeeze=False)
        im = None
        for k, ax in enumerate(axes.flat):
            if k >= len(mats):
                ax.set_axis_off()
                continue
            label, mat = mats[k]
            im = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
            ax.set_title(label, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        if im is not None:
            fig.colorbar(im, ax=list(axes.flat), fraction=0.025, pad=0.02).ax.tick_params(labelsize=6)
        fig.suptitle(
            f"slide {slide}: gene-gene Pearson correlation, {len(genes)} genes of highest truth variance",
            fontsize=10,
        )
        return _png(fig)


def prediction_figures(
    entries: Sequence[tuple[str, Sequence[Mapping[str, object]]]],
    predictions: Mapping[str, Mapping[str, Path]],
    *,
    n_map_genes: int = 3,
    n_heatmap_genes: int = 20,
    marker_genes: Sequence[str] = (),
) -> tuple[str, bytes, bytes] | None:
    """Maps and heatmaps for one table: entries are (label, rows) in table order. The slide is the
    one most entries predicted (ties by name); each entry uses its lowest (seed, fold) job on it.
    The maps show `marker_genes` (a protocol's figure genes, e.g. HINGE's KRT6A, GNAS, FXYD2) that
    every prediction has, then the genes of highest truth variance up to `n_map_genes`.
    Returns (slide, maps PNG, heatmaps PNG) or None when no entry has a prediction file."""
    by_entry: list[tuple[str, dict[str, Path]]] = []
    for label, rows in entries:
        slides: dict[str, Path] = {}
        for r in sorted(rows, key=lambda r: (r["seed"], r["fold"], r["job_id"])):  # type: ignore[index]
            for slide, path in sorted(predictions.get(str(r["job_id"]), {}).items()):
                slides.setdefault(slide, path)
        if slides:
            by_entry.append((label, slides))
    if not by_entry:
        return None
    counts: dict[str, int] = {}
    for _, slides in by_entry:
        for s in slides:
            counts[s] = counts.get(s, 0) + 1
    slide = sorted(counts, key=lambda s: (-counts[s], s))[0]
    loaded = [load_prediction(slides[slide], label) for label, slides in by_entry if slide in slides]
    genes = top_variance_genes(loaded[0].truth, loaded[0].genes, max(n_map_genes, n_heatmap_genes))
    usable = [p for p in loaded if set(genes) <= set(p.genes)]
    markers = [g for g in marker_genes if all(g in p.genes for p in usable)]
    map_genes = (markers + [g for g in genes if g not in markers])[: max(n_map_genes, len(markers))]
    maps = spatial_maps(usable, map_genes, slide=slide)
    heat = correlation_heatmaps(usable, genes[:n_heatmap_genes], slide=slide)
    return slide, maps, heat
