"""Synthetic, offline spatial-transcriptomics dataset whose genes really depend on the image.

Why: every test, the demo and CI need a dataset that exists without any download, is small, is
byte-identical for a seed, and on which a method that reads the image *can* beat the mean
predictor. Each slide is a procedural H&E-like image (pink eosin stroma with fibre texture, purple
hematoxylin nuclei) rendered from smooth latent tissue fields; spots sit on a square grid; every
gene's expected count is a known function of the morphology measured under the spot, times a
library size, with negative-binomial noise. The ground truth is saved next to the data.

On-disk layout (documented in docs/data-model.md; read by `stbench.data.readers.synthetic`):

    <root>/dataset.json                 format, version, generator parameters, slides -> patients,
                                        morphology feature names with their centre/scale
    <root>/genes.tsv                    per gene: role, base log-mean, feature weights, nonlinearity,
                                        hidden-field weight, NB dispersion (the known gene model)
    <root>/slides/<slide>/image.tif     RGB uint8 H&E-like image (uncompressed TIFF) at `mpp` um per pixel
    <root>/slides/<slide>/spots.tsv     spot, array_row, array_col, pixel_x, pixel_y (spots on tissue)
    <root>/slides/<slide>/counts.tsv.gz raw integer counts, rows = spots (first column "spot"), cols = genes
    <root>/slides/<slide>/meta.json     slide, patient, mpp, spot_diameter_um, spot_spacing_um, stain batch
    <root>/slides/<slide>/truth.tsv     per spot: morphology features (raw and z), hidden field, library size
    <root>/slides/<slide>/expected.tsv.gz  noise-free expected counts (spots x genes)

Gene model (log scale, per spot i and gene g, patient p):

    log mu_ig = log L_i + b_g + sum_k W_gk z_ik + nonlin_g(z_i) + h_g * hidden_i + beta_pg
    counts_ig ~ NegativeBinomial(mean mu_ig, dispersion theta_g)      (Gamma-Poisson)

where z_ik = clip((f_ik - centre_k) / scale_k, -4, 4) and f_ik are the morphology features of
`FEATURES`, measured on the rendered stain-concentration maps within the spot disc (the same
statistics `morphology_features` computes from an RGB image by colour deconvolution). Centres and
scales are fixed constants (calibrated once for the default rendering), so a slide's content
depends only on (seed, slide index, parameters), never on how many other slides are generated.

Variant `context` (``variant="context"``; the catalog's `synthetic-context`): some genes depend on
tissue OUTSIDE the spot's own patch, so a method's context component (neighbour view, spot graph,
attention across spots) has something to learn that a spot-only ablation cannot see:

    log mu_ig += sum_k N_gk c_ik + R_g r_i

- "neighbour" genes: c_ik = the mean z_k of the (up to 8) surrounding grid spots, minus its
  least-squares prediction from the spot's own z_k (per slide), scaled to unit variance; so c
  carries what the neighbours show and the spot itself does not (features: nuclei fraction, eosin).
- "region" genes: r_i = +-1, the side of a random straight boundary across the slide (angle and
  offset drawn per slide). The region shifts the nuclei-density and eosin fields by a modest
  amount on one side: visible over many spots, weak inside one patch (local variation is larger),
  and not a fixed position (the boundary moves between slides).
In this variant genes.tsv gains the columns n_<feature> (N) and region_weight (R), and truth.tsv
the columns context_<feature> (c) and region (r). The default variant draws exactly the same
random numbers and writes the same bytes as before (its dataset.json has no `variant` field).
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stbench.utils.io import atomic_path, stable_hash, write_json_atomic, write_text_atomic

FORMAT_VERSION = 1

# Typical H&E optical-density stain vectors (RGB; the Macenko-normalisation reference values):
# the rendering basis before per-slide jitter, and the basis `deconvolve` inverts.
STAIN_H = np.array([0.5626, 0.7201, 0.4062])
STAIN_E = np.array([0.2159, 0.8012, 0.5581])

FEATURES = ("nuclei_fraction", "nuclear_stain", "eosin", "fibre_texture")
"""Morphology features under a spot (disc of the spot diameter):
nuclei_fraction  fraction of pixels inside nuclei (hematoxylin concentration > NUCLEUS_THRESHOLD)
nuclear_stain    mean hematoxylin concentration over nucleus pixels (chromatin darkness)
eosin            mean eosin concentration over non-nucleus pixels (stroma / cytoplasm density)
fibre_texture    root-mean-square eosin gradient over the disc (collagen-fibre texture energy)"""

NUCLEUS_THRESHOLD = 0.35
# Fixed standardisation constants (median / spread of each feature under the default rendering).
FEATURE_CENTRE = np.array([0.32, 0.88, 0.54, 0.084])
FEATURE_SCALE = np.array([0.17, 0.20, 0.17, 0.05])

ROLES = ("marker", "nonlinear", "mixed", "hidden", "noise", "neighbour", "region")
VARIANTS = ("default", "context")
CONTEXT_FEATURES = (0, 2)  # nuclei_fraction, eosin: colour-level, still visible in 16-px patches
REGION_SHIFT = 0.6  # logit shift of the density and eosin fields on the region's +1 side


@dataclass(frozen=True)
class SyntheticParams:
    """Everything that determines the generated bytes (saved in dataset.json)."""

    n_slides: int = 4
    n_patients: int = 2
    spots_per_side: int = 12
    n_genes: int = 50
    seed: int = 0
    mpp: float = 1.0
    spot_diameter_um: float = 55.0
    spot_spacing_um: float = 64.0
    margin_um: float = 40.0
    nuclei_per_mm2: float = 6000.0
    library_size: float = 1.0
    stain_jitter: float = 0.06
    tissue_fraction: float = 0.9
    variant: str = "default"


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------
def generate_synthetic(
    root: str | Path,
    n_slides: int = 4,
    n_patients: int = 2,
    spots_per_side: int = 12,
    n_genes: int = 50,
    seed: int = 0,
    **options: Any,
) -> Path:
    """Write the synthetic dataset under `root` (created if needed) and return `root`.

    `options` are the other fields of `SyntheticParams` (mpp, spot_diameter_um, spot_spacing_um,
    margin_um, nuclei_per_mm2, library_size, stain_jitter, tissue_fraction, variant). Slides are named
    ``P<patient>S<section>`` and assigned to patients round-robin. Deterministic: the same
    arguments give byte-identical files (same platform and numpy version).
    """
    params = SyntheticParams(
        n_slides=n_slides,
        n_patients=n_patients,
        spots_per_side=spots_per_side,
        n_genes=n_genes,
        seed=seed,
        **options,
    )
    _check_params(params)
    root = Path(root)
    genes = _gene_model(params)
    patients = [f"P{p}" for p in range(params.n_patients)]
    patient_effects = {p: _patient_effects(params, i) for i, p in enumerate(patients)}
    slides: dict[str, str] = {}
    for s in range(params.n_slides):
        patient = patients[s % params.n_patients]
        name = f"{patient}S{s // params.n_patients}"
        slides[name] = patient
        _write_slide(root / "slides" / name, name, patient, s, params, genes, patient_effects[patient])
    _write_genes_tsv(root / "genes.tsv", genes)
    write_json_atomic(
        root / "dataset.json",
        {
            "format": "synthetic",
            "version": FORMAT_VERSION,
            "params": _params_dict(params),
            "params_hash": params_hash(params),
            "slides": slides,
            "genes": genes["names"],
            "features": list(FEATURES),
            "feature_centre": FEATURE_CENTRE.tolist(),
            "feature_scale": FEATURE_SCALE.tolist(),
            "nucleus_threshold": NUCLEUS_THRESHOLD,
            "stain_h": STAIN_H.tolist(),
            "stain_e": STAIN_E.tolist(),
            "patient_effects": {p: np.round(e["beta"], 6).tolist() for p, e in patient_effects.items()},
        },
    )
    return root


def ensure_synthetic(root: str | Path, **kwargs: Any) -> Path:
    """Generate under `root` unless a dataset with exactly these parameters is already there.

    The offline default of the catalog: cheap to call every time, rebuilds when parameters change.
    """
    root = Path(root)
    params = SyntheticParams(**kwargs)
    meta = root / "dataset.json"
    if meta.exists():
        try:
            if json.loads(meta.read_text()).get("params_hash") == params_hash(params):
                return root
        except (OSError, ValueError):
            pass
    return generate_synthetic(root, **asdict(params))


def params_hash(params: SyntheticParams) -> str:
    return stable_hash({"version": FORMAT_VERSION, **_params_dict(params)})


def _params_dict(params: SyntheticParams) -> dict[str, Any]:
    """asdict without `variant` for the default one, so the default dataset's bytes and hash stay
    exactly what they were before variants existed."""
    d = asdict(params)
    if d["variant"] == "default":
        del d["variant"]
    return d


def deconvolve(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin concentrations of an RGB uint8 image (H, W, 3) by least squares
    on optical density with the canonical stain vectors (what a stain-agnostic analysis sees)."""
    od = -np.log(np.clip(rgb[..., :3].astype(np.float64), 1.0, 255.0) / 255.0)
    basis = np.stack([STAIN_H, STAIN_E], axis=1)  # (3, 2)
    conc = od @ np.linalg.pinv(basis).T  # (H, W, 2)
    return conc[..., 0], conc[..., 1]


def morphology_features(rgb: np.ndarray, centres_xy: np.ndarray, radius_px: float) -> np.ndarray:
    """`FEATURES` measured from an RGB image within discs of `radius_px` around `centres_xy` (x, y).

    The generator computes the same statistics on the exact stain concentrations; tests use this
    to check that genes depend on what a model can actually see.
    """
    c_h, c_e = deconvolve(rgb)
    return _disc_features(c_h, c_e, np.asarray(centres_xy, dtype=np.float64), radius_px)


def standardise(features: np.ndarray) -> np.ndarray:
    """Raw features -> the clipped z-scores the gene model uses."""
    return np.clip((np.asarray(features) - FEATURE_CENTRE) / FEATURE_SCALE, -4.0, 4.0)


def expected_log_mean(
    z: np.ndarray,
    hidden: np.ndarray,
    genes: dict[str, Any],
    context: np.ndarray | None = None,
    region: np.ndarray | None = None,
) -> np.ndarray:
    """log mu without library size and patient effect: b + W z + nonlin(z) + h * hidden, plus, in the
    context variant, N c + R r (c: neighbour contrast per feature, r: region +-1)."""
    out = genes["base"][None, :] + z @ genes["weights"].T + hidden[:, None] * genes["hidden"][None, :]
    if context is not None and "neighbour" in genes:
        out += context @ genes["neighbour"].T
    if region is not None and "region" in genes:
        out += region[:, None] * genes["region"][None, :]
    for g, (kind, k1, k2, a) in enumerate(genes["nonlin"]):
        if kind == "quadratic":
            out[:, g] += a * (z[:, k1] ** 2 - 1.0)
        elif kind == "interaction":
            out[:, g] += a * z[:, k1] * z[:, k2]
        elif kind == "threshold":
            out[:, g] += a * np.tanh(2.0 * (z[:, k1] - 0.5))
    return out


# ---------------------------------------------------------------------------------------------
# gene model
# ---------------------------------------------------------------------------------------------
def _check_params(p: SyntheticParams) -> None:
    if p.n_slides < 1 or p.n_patients < 1 or p.n_patients > p.n_slides:
        raise ValueError(f"need 1 <= n_patients ({p.n_patients}) <= n_slides ({p.n_slides})")
    if p.spots_per_side < 2 or p.n_genes < 8:
        raise ValueError(f"need spots_per_side >= 2 and n_genes >= 8, got {p.spots_per_side}, {p.n_genes}")
    if p.mpp <= 0 or p.spot_diameter_um <= 0 or p.spot_spacing_um <= 0:
        raise ValueError("mpp, spot_diameter_um and spot_spacing_um must be > 0")
    if p.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {p.variant!r}")
    if p.variant == "context" and p.n_genes < 16:
        raise ValueError(f"the context variant needs n_genes >= 16, got {p.n_genes}")


def _gene_roles(n: int) -> list[str]:
    """Role of each gene; markers first so small panels still contain image-driven genes."""
    n_marker = max(4, n // 8)
    n_nonlin = max(1, n // 12)
    n_hidden = max(1, n // 16)
    n_mixed = min(max(1, n // 4), n - n_marker - n_nonlin - n_hidden - 1)  # keep >= 1 noise gene
    n_noise = n - n_marker - n_nonlin - n_mixed - n_hidden
    if n_mixed < 1 or n_noise < 1:
        raise ValueError(f"n_genes={n} is too small for every gene role (need >= 8)")
    return (
        ["marker"] * n_marker
        + ["nonlinear"] * n_nonlin
        + ["mixed"] * n_mixed
        + ["hidden"] * n_hidden
        + ["noise"] * n_noise
    )


def _gene_model(p: SyntheticParams) -> dict[str, Any]:
    rng = np.random.default_rng([p.seed, 0])
    roles = _gene_roles(p.n_genes)
    k = len(FEATURES)
    n = len(roles)
    base = rng.uniform(np.log(3.0), np.log(40.0), size=n)
    weights = np.zeros((n, k))
    hidden = np.zeros(n)
    nonlin: list[tuple[str, int, int, float]] = [("none", 0, 0, 0.0)] * n
    theta = rng.uniform(5.0, 30.0, size=n)
    marker_feature = np.full(n, -1)
    kinds = ("quadratic", "interaction", "threshold")
    i_marker = i_nonlin = 0
    for g, role in enumerate(roles):
        if role == "marker":
            f = i_marker % k
            sign = 1.0 if (i_marker // k) % 2 == 0 else -1.0
            weights[g, f] = sign * rng.uniform(0.8, 1.1)
            base[g] = rng.uniform(np.log(15.0), np.log(40.0))
            theta[g] = rng.uniform(15.0, 30.0)
            marker_feature[g] = f
            i_marker += 1
        elif role == "nonlinear":
            kind = kinds[i_nonlin % 3]
            k1, k2 = int(rng.integers(k)), int(rng.integers(k))
            if kind == "interaction" and k2 == k1:
                k2 = (k1 + 1) % k
            nonlin[g] = (kind, k1, k2, float(rng.uniform(0.35, 0.6)))
            weights[g] = rng.normal(0.0, 0.15, size=k)
            i_nonlin += 1
        elif role == "mixed":
            weights[g] = rng.normal(0.0, 0.4, size=k)
        elif role == "hidden":
            hidden[g] = rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.0)
    out = {
        "names": [f"GENE{g:03d}" for g in range(n)],
        "roles": roles,
        "base": base,
        "weights": weights,
        "nonlin": nonlin,
        "hidden": hidden,
        "theta": theta,
        "marker_feature": marker_feature,
    }
    if p.variant == "context":
        _add_context_genes(p, out)
    return out


def _add_context_genes(p: SyntheticParams, genes: dict[str, Any]) -> None:
    """Turn noise genes (and, if needed, the last mixed genes) into "neighbour" and "region" genes.

    A separate random stream, so the other genes keep their default-variant parameters. About a
    third of the panel depends on context: enough for the mean gene-wise PCC to show whether a
    method uses it."""
    rng = np.random.default_rng([p.seed, 4])
    n = len(genes["roles"])
    n_nb, n_reg = max(2, n // 5), max(2, n // 8)
    pool = [g for g in range(n) if genes["roles"][g] == "noise"]
    pool += [g for g in reversed(range(n)) if genes["roles"][g] == "mixed"]
    chosen = pool[: n_nb + n_reg]
    nb = np.zeros((n, len(FEATURES)))
    reg = np.zeros(n)
    for i, g in enumerate(chosen):
        genes["weights"][g] = 0.0
        genes["base"][g] = rng.uniform(np.log(15.0), np.log(40.0))
        genes["theta"][g] = rng.uniform(15.0, 30.0)
        sign = rng.choice([-1.0, 1.0])
        if i < n_nb:
            genes["roles"][g] = "neighbour"
            nb[g, CONTEXT_FEATURES[i % len(CONTEXT_FEATURES)]] = sign * rng.uniform(0.8, 1.1)
        else:
            genes["roles"][g] = "region"
            reg[g] = sign * rng.uniform(0.6, 0.9)
    genes["neighbour"], genes["region"] = nb, reg


def _patient_effects(p: SyntheticParams, index: int) -> dict[str, np.ndarray]:
    """Patient-level biology: shifts of the latent tissue fields and a per-gene expression offset."""
    rng = np.random.default_rng([p.seed, 1, index])
    return {"latent_shift": rng.normal(0.0, 0.35, size=5), "beta": rng.normal(0.0, 0.12, size=p.n_genes)}


def _write_genes_tsv(path: Path, genes: dict[str, Any]) -> None:
    cols = [
        "gene",
        "role",
        "marker_feature",
        "base_log_mean",
        *[f"w_{f}" for f in FEATURES],
        "nonlinear",
        "nonlinear_f1",
        "nonlinear_f2",
        "nonlinear_a",
        "hidden_weight",
        "dispersion",
    ]
    ctx = "neighbour" in genes
    if ctx:
        cols += [*[f"n_{f}" for f in FEATURES], "region_weight"]
    lines = ["\t".join(cols)]
    for g, name in enumerate(genes["names"]):
        kind, k1, k2, a = genes["nonlin"][g]
        mf = int(genes["marker_feature"][g])
        row = [
            name,
            genes["roles"][g],
            FEATURES[mf] if mf >= 0 else "",
            _f(genes["base"][g]),
            *[_f(w) for w in genes["weights"][g]],
            kind,
            FEATURES[k1] if kind != "none" else "",
            FEATURES[k2] if kind == "interaction" else "",
            _f(a),
            _f(genes["hidden"][g]),
            _f(genes["theta"][g]),
        ]
        if ctx:
            row += [*[_f(w) for w in genes["neighbour"][g]], _f(genes["region"][g])]
        lines.append("\t".join(row))
    write_text_atomic(path, "\n".join(lines) + "\n")


def read_gene_model(root: str | Path) -> dict[str, Any]:
    """Parse `<root>/genes.tsv` back into the arrays `expected_log_mean` takes (tests, analyses)."""
    import pandas as pd

    df = pd.read_csv(Path(root) / "genes.tsv", sep="\t", keep_default_na=False)
    idx = {f: i for i, f in enumerate(FEATURES)}
    nonlin = [
        (r.nonlinear, idx.get(r.nonlinear_f1, 0), idx.get(r.nonlinear_f2, 0), float(r.nonlinear_a))
        for r in df.itertuples()
    ]
    out = {
        "names": df["gene"].tolist(),
        "roles": df["role"].tolist(),
        "base": df["base_log_mean"].to_numpy(float),
        "weights": df[[f"w_{f}" for f in FEATURES]].to_numpy(float),
        "nonlin": nonlin,
        "hidden": df["hidden_weight"].to_numpy(float),
        "theta": df["dispersion"].to_numpy(float),
        "marker_feature": np.array([idx.get(v, -1) for v in df["marker_feature"]]),
    }
    if "region_weight" in df.columns:  # context variant
        out["neighbour"] = df[[f"n_{f}" for f in FEATURES]].to_numpy(float)
        out["region"] = df["region_weight"].to_numpy(float)
    return out


# ---------------------------------------------------------------------------------------------
# one slide
# ---------------------------------------------------------------------------------------------
def _write_slide(
    folder: Path,
    name: str,
    patient: str,
    index: int,
    p: SyntheticParams,
    genes: dict[str, Any],
    patient_fx: dict[str, np.ndarray],
) -> None:
    rng = np.random.default_rng([p.seed, 2, index])
    spacing = p.spot_spacing_um / p.mpp
    margin = p.margin_um / p.mpp
    side = int(round(2 * margin + (p.spots_per_side - 1) * spacing))
    rows, cols = np.meshgrid(np.arange(p.spots_per_side), np.arange(p.spots_per_side), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    xy = np.stack([margin + cols * spacing, margin + rows * spacing], axis=1)

    region_map = _region_map(p, index, side) if p.variant == "context" else None
    fields = _latent_fields(rng, side, spacing, patient_fx["latent_shift"], p.tissue_fraction, region_map)
    c_h, c_e = _render_concentrations(rng, fields, p)
    stain = _stain_batch(rng, p.stain_jitter)
    rgb = _to_rgb(rng, c_h, c_e, stain)

    # Spots on tissue only (like Space Ranger's in_tissue); keep at least a handful.
    tissue_at = fields["tissue"][np.round(xy[:, 1]).astype(int), np.round(xy[:, 0]).astype(int)]
    keep = tissue_at > 0.5
    if keep.sum() < 4:
        keep[:] = True
    xy, rows, cols = xy[keep], rows[keep], cols[keep]
    spot_ids = [f"{r}x{c}" for r, c in zip(rows, cols, strict=True)]

    radius = p.spot_diameter_um / p.mpp / 2.0
    feats = _disc_features(c_h, c_e, xy, radius)
    z = standardise(feats)
    hidden = _sample_at(fields["hidden"], xy)
    lib = p.library_size * np.exp(rng.normal(0.0, 0.2) + rng.normal(0.0, 0.25, size=len(xy)))
    context = region = None
    if region_map is not None:
        context = neighbour_contrast(z, rows, cols)
        region = np.where(_sample_at(region_map, xy) > 0.5, 1.0, -1.0)
    log_mu = expected_log_mean(z, hidden, genes, context, region)
    log_mu = log_mu + patient_fx["beta"][None, :] + np.log(lib)[:, None]
    mu = np.exp(np.clip(log_mu, -10.0, 12.0))
    theta = genes["theta"][None, :]
    counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.int64)

    folder.mkdir(parents=True, exist_ok=True)
    _write_tiff(folder / "image.tif", rgb, p.mpp)
    spots_txt = "spot\tarray_row\tarray_col\tpixel_x\tpixel_y\n" + "".join(
        f"{s}\t{r}\t{c}\t{_f(x)}\t{_f(y)}\n" for s, r, c, (x, y) in zip(spot_ids, rows, cols, xy, strict=True)
    )
    write_text_atomic(folder / "spots.tsv", spots_txt)
    _write_matrix_gz(folder / "counts.tsv.gz", spot_ids, genes["names"], counts, integer=True)
    _write_matrix_gz(folder / "expected.tsv.gz", spot_ids, genes["names"], mu, integer=False)
    tcols = [*FEATURES, *[f"z_{f}" for f in FEATURES], "hidden", "library_size"]
    tvals = np.concatenate([feats, z, hidden[:, None], lib[:, None]], axis=1)
    if context is not None and region is not None:
        tcols += [*[f"context_{f}" for f in FEATURES], "region"]
        tvals = np.concatenate([tvals, context, region[:, None]], axis=1)
    _write_matrix(folder / "truth.tsv", spot_ids, tcols, tvals)
    write_json_atomic(
        folder / "meta.json",
        {
            "slide": name,
            "patient": patient,
            "platform": "synthetic",
            "mpp": p.mpp,
            "spot_diameter_um": p.spot_diameter_um,
            "spot_spacing_um": p.spot_spacing_um,
            "image_size": [side, side],
            "n_spots": len(spot_ids),
            "seed": [p.seed, 2, index],
            "stain": {k: np.round(v, 6).tolist() for k, v in stain.items()},
        },
    )


def neighbour_contrast(z: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(n, K) per spot: the mean z of its (up to 8) surrounding grid spots, minus the per-slide
    least-squares prediction from its own z, scaled to unit variance (columns outside
    `CONTEXT_FEATURES` are 0). A spot without neighbours gets 0. What the neighbours add."""
    where = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(rows, cols, strict=True))}
    nb = np.array(z, dtype=np.float64, copy=True)
    has = np.zeros(len(z), dtype=bool)
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        idx = [
            where[(int(r) + dr, int(c) + dc)]
            for dr in (-1, 0, 1)
            for dc in (-1, 0, 1)
            if (dr or dc) and (int(r) + dr, int(c) + dc) in where
        ]
        if idx:
            nb[i], has[i] = z[idx].mean(0), True
    out = np.zeros_like(nb)
    for k in CONTEXT_FEATURES:
        x, y = z[has, k], nb[has, k]
        if has.sum() < 3 or x.std() < 1e-9:
            continue
        slope = np.cov(x, y, bias=True)[0, 1] / x.var()
        res = y - y.mean() - slope * (x - x.mean())
        out[has, k] = res / max(res.std(), 1e-9)
    return out


def _region_map(p: SyntheticParams, index: int, side: int) -> np.ndarray:
    """(side, side) in [0, 1]: a soft step across a random straight boundary through the middle
    part of the slide (own random stream: the default variant's draws are untouched)."""
    rng = np.random.default_rng([p.seed, 3, index])
    ang = rng.uniform(0.0, 2 * np.pi)
    off = rng.uniform(-0.15, 0.15) * side
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) - side / 2.0
    dist = xx * np.cos(ang) + yy * np.sin(ang) - off
    width = 0.25 * p.spot_spacing_um / p.mpp
    return _sigmoid(dist / width).astype(np.float32)


def _smooth_field(
    rng: np.random.Generator, n: int, step: float, min_wl: float, max_wl: float, k: int = 6
) -> np.ndarray:
    """Unit-variance random field on an n x n grid of spacing `step` px: a sum of `k` plane waves
    with wavelengths in [min_wl, max_wl] px, evaluated separably (two outer products per wave)."""
    out = np.zeros((n, n), dtype=np.float64)
    coord = np.arange(n, dtype=np.float64) * step
    for _ in range(k):
        wl = rng.uniform(min_wl, max_wl)
        ang = rng.uniform(0.0, np.pi)
        phase = rng.uniform(0.0, 2 * np.pi)
        ax = 2 * np.pi * np.cos(ang) / wl * coord + phase
        ay = 2 * np.pi * np.sin(ang) / wl * coord
        out += np.outer(np.cos(ay), np.cos(ax)) - np.outer(np.sin(ay), np.sin(ax))
    return out * np.sqrt(2.0 / k)


def _upsample(coarse: np.ndarray, side: int) -> np.ndarray:
    """Bilinear upsampling of a coarse field to side x side (fields are smooth on this scale)."""
    from PIL import Image

    im = Image.fromarray(coarse.astype(np.float32), mode="F")
    return np.asarray(im.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)


def _latent_fields(
    rng: np.random.Generator,
    side: int,
    spacing: float,
    shift: np.ndarray,
    tissue_fraction: float,
    region_map: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Smooth tissue fields in [0, 1]: nuclei density, chromatin darkness, eosin, fibre amount,
    nucleus size, plus an unrendered 'hidden' biology field, fibre orientation and a tissue mask.
    Evaluated on a grid 4x coarser than the image and upsampled (all wavelengths are >= 1.5 spots)."""
    step = 4.0
    n = side // 4 + 2
    lo, hi = 2.5 * spacing, 8.0 * spacing
    names = ("density", "darkness", "eosin", "fibre", "size")
    c = {nm: _sigmoid(1.3 * _smooth_field(rng, n, step, lo, hi) + shift[i]) for i, nm in enumerate(names)}
    c["hidden"] = _smooth_field(rng, n, step, lo, hi)
    ang = _smooth_field(rng, n, step, 3 * spacing, 10 * spacing) * 0.8
    c["cos"], c["sin"] = np.cos(ang), np.sin(ang)
    c["warp"] = _smooth_field(rng, n, step, 1.5 * spacing, 4 * spacing) * 3.0
    # Tissue: a smooth blob; threshold at the quantile that leaves `tissue_fraction` covered.
    t = _smooth_field(rng, n, step, 6 * spacing, 14 * spacing, k=4)
    yy, xx = np.mgrid[0:n, 0:n] / max(n - 1, 1) - 0.5
    t = t - 2.5 * (xx**2 + yy**2)
    thr = np.quantile(t, 1.0 - tissue_fraction)
    c["tissue"] = _sigmoid((t - thr) * 12.0)
    full = n * step
    out = {k: _upsample(v, int(full))[:side, :side] for k, v in c.items()}
    if region_map is not None:  # context variant: shift density and eosin on the region's +1 side
        for k in ("density", "eosin"):
            v = np.clip(out[k], 1e-6, 1.0 - 1e-6)
            logit = np.log(v / (1.0 - v))
            out[k] = _sigmoid(logit + REGION_SHIFT * (2.0 * region_map - 1.0)).astype(np.float32)
    return out


def _render_concentrations(
    rng: np.random.Generator, f: dict[str, np.ndarray], p: SyntheticParams
) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin concentration maps (the 'true' tissue, before staining/scanning)."""
    side = f["tissue"].shape[0]
    coord = np.arange(side, dtype=np.float32)
    # Stroma: eosin level plus oriented collagen fibres whose amplitude follows the fibre field.
    period = 9.0 / p.mpp
    phase = (2 * np.pi / period) * (coord[None, :] * f["cos"] + coord[:, None] * f["sin"]) + f["warp"] * (
        2 * np.pi
    )
    stripes = (0.5 + 0.5 * np.sin(phase)) ** 3
    c_e = f["tissue"] * (0.25 + 0.55 * f["eosin"] + 0.5 * f["fibre"] * (stripes - 0.3))
    c_h = 0.06 * f["tissue"]
    # Nuclei: a thinned Poisson process with intensity from the density field (on tissue only).
    lam_max = p.nuclei_per_mm2 * (p.mpp * 1e-3) ** 2 * 2.0
    n = rng.poisson(lam_max * side * side)
    cx = rng.uniform(0, side, n)
    cy = rng.uniform(0, side, n)
    ix, iy = np.clip(cx.astype(int), 0, side - 1), np.clip(cy.astype(int), 0, side - 1)
    accept = rng.uniform(size=n) < (0.1 + 0.9 * f["density"][iy, ix]) * f["tissue"][iy, ix]
    cx, cy, ix, iy = cx[accept], cy[accept], ix[accept], iy[accept]
    m = len(cx)
    radius = (2.8 + 3.0 * f["size"][iy, ix]) * np.exp(rng.normal(0, 0.12, m)) / p.mpp
    elong = rng.uniform(1.0, 1.6, m)
    theta = rng.uniform(0, np.pi, m)
    inten = (0.55 + 0.9 * f["darkness"][iy, ix]) * np.exp(rng.normal(0, 0.08, m))
    nuc = np.zeros(side * side, dtype=np.float32)
    # Stamp nuclei in buckets of similar size, so each bucket uses a small stamp window.
    half = np.ceil(radius * np.sqrt(elong) + 2.0).astype(int)
    for hb in np.unique(half):
        sel = half == hb
        _stamp(nuc, side, int(hb), cx[sel], cy[sel], radius[sel], elong[sel], theta[sel], inten[sel])
    return c_h + nuc.reshape(side, side), c_e


def _stamp(
    canvas: np.ndarray,
    side: int,
    half: int,
    cx: np.ndarray,
    cy: np.ndarray,
    radius: np.ndarray,
    elong: np.ndarray,
    theta: np.ndarray,
    inten: np.ndarray,
) -> None:
    """Max-composite soft-edged ellipses (nuclei) into a flat side*side canvas."""
    off = np.arange(-half, half + 1, dtype=np.float32)
    ox0, oy0 = np.floor(cx), np.floor(cy)
    dx = off[None, None, :] + (ox0 - cx).astype(np.float32)[:, None, None]
    dy = off[None, :, None] + (oy0 - cy).astype(np.float32)[:, None, None]
    ct, st = np.cos(theta).astype(np.float32)[:, None, None], np.sin(theta).astype(np.float32)[:, None, None]
    r = radius.astype(np.float32)[:, None, None]
    se = np.sqrt(elong).astype(np.float32)[:, None, None]
    rho = np.sqrt(((dx * ct + dy * st) / (r * se)) ** 2 + ((dy * ct - dx * st) * se / r) ** 2)
    prof = _sigmoid((1.0 - rho) * r * 2.5) * inten.astype(np.float32)[:, None, None]
    px = ox0.astype(np.int64)[:, None, None] + np.arange(-half, half + 1)[None, None, :]
    py = oy0.astype(np.int64)[:, None, None] + np.arange(-half, half + 1)[None, :, None]
    px, py = np.broadcast_arrays(px, py)
    ok = (px >= 0) & (px < side) & (py >= 0) & (py < side) & (prof > 0.01)
    np.maximum.at(canvas, py[ok] * side + px[ok], prof[ok])


def _stain_batch(rng: np.random.Generator, jitter: float) -> dict[str, np.ndarray]:
    """Per-slide staining/scanning batch effect: perturbed stain vectors, stain amounts, white point."""

    def perturb(v: np.ndarray) -> np.ndarray:
        w = np.clip(v + rng.normal(0, jitter, 3), 0.01, None)
        return w / np.linalg.norm(w)

    return {
        "h": perturb(STAIN_H),
        "e": perturb(STAIN_E),
        "amount": np.exp(rng.normal(0, jitter, 2)),
        "white": np.clip(1.0 - np.abs(rng.normal(0, 0.02, 3)), 0.9, 1.0),
    }


def _to_rgb(
    rng: np.random.Generator, c_h: np.ndarray, c_e: np.ndarray, stain: dict[str, np.ndarray]
) -> np.ndarray:
    """Beer-Lambert: optical density = sum of stain amount x stain vector, plus sensor noise."""
    h = stain["amount"][0] * stain["h"]
    e = stain["amount"][1] * stain["e"]
    noise = rng.standard_normal(size=c_h.shape, dtype=np.float32) * np.float32(0.025)
    out = np.empty((*c_h.shape, 3), dtype=np.uint8)
    for ch in range(3):  # per channel: broadcasting over a length-3 axis is slow in numpy
        od = c_h * np.float32(h[ch]) + c_e * np.float32(e[ch]) + (noise + np.float32(0.02))
        val = np.exp(-od) * np.float32(255.0 * stain["white"][ch])
        out[..., ch] = np.clip(np.rint(val), 0, 255)
    return out


def _disc_features(c_h: np.ndarray, c_e: np.ndarray, xy: np.ndarray, radius: float) -> np.ndarray:
    """`FEATURES` per spot from concentration maps, inside discs of `radius` px."""
    h, w = c_h.shape
    r = int(np.ceil(radius))
    off = np.arange(-r, r + 1)
    gy, gx = np.gradient(c_e)
    grad2 = gx**2 + gy**2
    out = np.zeros((len(xy), len(FEATURES)))
    for i, (x, y) in enumerate(np.asarray(xy, dtype=np.float64)):
        cx, cy = int(round(x)), int(round(y))
        ys, xs = np.clip(cy + off, 0, h - 1), np.clip(cx + off, 0, w - 1)
        disc = ((xs[None, :] - x) ** 2 + (ys[:, None] - y) ** 2) <= radius**2
        hh, ee, gg = c_h[np.ix_(ys, xs)][disc], c_e[np.ix_(ys, xs)][disc], grad2[np.ix_(ys, xs)][disc]
        nuc = hh > NUCLEUS_THRESHOLD
        out[i, 0] = nuc.mean()
        out[i, 1] = hh[nuc].mean() if nuc.any() else FEATURE_CENTRE[1]
        out[i, 2] = ee[~nuc].mean() if (~nuc).any() else ee.mean()
        out[i, 3] = np.sqrt(gg.mean())
    return out


def _sample_at(field: np.ndarray, xy: np.ndarray) -> np.ndarray:
    h, w = field.shape
    ix = np.clip(np.round(xy[:, 0]).astype(int), 0, w - 1)
    iy = np.clip(np.round(xy[:, 1]).astype(int), 0, h - 1)
    return field[iy, ix]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------------------------------------
# deterministic writers (no timestamps in any file)
# ---------------------------------------------------------------------------------------------
def _f(v: float) -> str:
    return f"{float(v):.6g}"


def _matrix_text(row_ids: list[str], cols: list[str], values: np.ndarray, integer: bool) -> str:
    buf = io.StringIO()
    buf.write("spot\t" + "\t".join(cols) + "\n")
    fmt = "%d" if integer else "%.6g"
    body = np.char.mod(fmt, values)
    for rid, row in zip(row_ids, body, strict=True):
        buf.write(rid + "\t" + "\t".join(row) + "\n")
    return buf.getvalue()


def _write_matrix(path: Path, row_ids: list[str], cols: list[str], values: np.ndarray) -> None:
    write_text_atomic(path, _matrix_text(row_ids, cols, values, integer=False))


def _write_matrix_gz(
    path: Path, row_ids: list[str], cols: list[str], values: np.ndarray, integer: bool
) -> None:
    data = _matrix_text(row_ids, cols, values, integer).encode()
    with (
        atomic_path(path) as tmp,
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
    ):
        gz.write(data)


def _write_tiff(path: Path, rgb: np.ndarray, mpp: float) -> None:
    """Uncompressed RGB TIFF with the pixel size in its resolution tags (pixels per centimetre).
    Uncompressed because encoding dominated generation time; no date tag, so bytes are stable."""
    import tifffile

    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            rgb,
            photometric="rgb",
            metadata=None,
            resolution=(1e4 / mpp, 1e4 / mpp),
            resolutionunit="CENTIMETER",
        )
