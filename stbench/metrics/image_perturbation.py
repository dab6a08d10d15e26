"""Tissue perturbation composite (STMDiT Sections K and D.7): does the generated morphology follow
when the gene-expression input is interpolated from one tissue class's centroid to another's?

Protocol: for reference spots of a source -> target tissue pair, the GE embedding is
`interpolate(c_src, c_tgt, alpha)` = (1 - alpha) c_src + alpha c_tgt for alpha in ALPHAS (centroids
of the CancerFoundation embeddings per class, `class_centroids`), with the UNI embedding and the
sampler seed fixed; the generated tiles are embedded (H0-mini) and scored here, so this module is
testable without a generator. With d_a = |f(alpha = a) - C_tgt| (Euclidean, encoder space, C_* the
tissue-class centroids of REAL tiles' features):

* transition ("displacement", default) = (d_0 - d_1) / |C_tgt - C_src|: the distance the alpha = 1
  tile moved toward the target centroid (relative to where alpha = 0 was), as a fraction of the
  source-target centroid gap. 0 = no drift, 1 = a tile starting at C_src arriving at C_tgt.
  "position" = (|f_1 - C_src| - d_1) / |C_tgt - C_src| (where the alpha = 1 tile sits between the
  two centroids, in [-1, 1]) is the other reading of the paper's sentence, available as an option.
* monotonicity = -Spearman(alpha, d_alpha): +1 when the distance to the target falls at every step.
  Undefined (NaN) when the distances are all equal (no GE pathway to perturb).
* composite = transition + lambda_mono * monotonicity (lambda_mono = 1); per pair the MEDIAN over
  reference spots (undefined spots left out and counted); `three_pair_mean` averages pair medians.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
LAMBDA_MONO = 1.0
TRANSITIONS = ("displacement", "position")
PAIRS = (("tumor", "stroma"), ("tumor", "immune"), ("immune", "tumor"))  # STMDiT Table 5


def class_centroids(embeddings: object, labels: Sequence[object]) -> dict[str, np.ndarray]:
    """Mean embedding (float64) of each class label."""
    x = np.asarray(embeddings, dtype=np.float64)
    lab = np.asarray([str(v) for v in labels])
    if x.ndim != 2 or lab.size != x.shape[0]:
        raise ValueError(f"need (n, d) embeddings and n labels, got {x.shape} and {lab.size}")
    return {c: x[lab == c].mean(axis=0) for c in sorted(set(lab.tolist()))}


def interpolate(source: object, target: object, alphas: Sequence[float] = ALPHAS) -> np.ndarray:
    """(len(alphas), d) embeddings (1 - alpha) * source + alpha * target."""
    s, t = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if s.shape != t.shape or s.ndim != 1:
        raise ValueError(f"source and target must be equal-length vectors, got {s.shape}, {t.shape}")
    a = np.asarray(alphas, np.float64)[:, None]
    return (1.0 - a) * s + a * t


def _check_alphas(alphas: Sequence[float]) -> np.ndarray:
    a = np.asarray(alphas, np.float64)
    if a.ndim != 1 or a.size < 2 or np.any(np.diff(a) <= 0):
        raise ValueError(f"alphas must be >= 2 strictly increasing values, got {list(alphas)}")
    return a


def _ranks(v: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), as Spearman's rho uses."""
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.size)
    sv = v[order]
    i = 0
    while i < v.size:
        j = i
        while j + 1 < v.size and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def _spearman(a: np.ndarray, d: np.ndarray) -> float:
    if np.ptp(d) == 0:
        return float("nan")
    ra, rd = _ranks(a) - (a.size - 1) / 2, _ranks(d)
    rd = rd - rd.mean()
    return float(ra @ rd / np.sqrt((ra @ ra) * (rd @ rd)))


@dataclass(frozen=True)
class PerturbationScores:
    """Per reference spot (NaN where undefined) and the pair's median composite."""

    transition: np.ndarray
    monotonicity: np.ndarray
    composite: np.ndarray
    median: float | None
    n_defined: int
    n_undefined: int
    lambda_mono: float


def composite_from_distances(
    dist_target: object,
    centroid_gap: float,
    *,
    alphas: Sequence[float] = ALPHAS,
    dist_source_at_1: object | None = None,
    transition: str = "displacement",
    lambda_mono: float = LAMBDA_MONO,
) -> PerturbationScores:
    """Scores from each spot's distance to the target centroid along the path, (n, A) or (A,).
    `dist_source_at_1` (n,) is only needed for transition="position"."""
    a = _check_alphas(alphas)
    d = np.atleast_2d(np.asarray(dist_target, np.float64))
    if d.shape[1] != a.size:
        raise ValueError(f"distances have {d.shape[1]} steps, alphas {a.size}")
    if not centroid_gap > 0:
        raise ValueError(f"the source-target centroid gap must be > 0, got {centroid_gap}")
    if transition == "displacement":
        trans = (d[:, 0] - d[:, -1]) / centroid_gap
    elif transition == "position":
        if dist_source_at_1 is None:
            raise ValueError('transition="position" needs dist_source_at_1')
        trans = (np.asarray(dist_source_at_1, np.float64).reshape(-1) - d[:, -1]) / centroid_gap
    else:
        raise ValueError(f"transition must be one of {TRANSITIONS}, got {transition!r}")
    mono = np.array([-_spearman(a, row) for row in d])
    comp = trans + lambda_mono * mono
    ok = np.isfinite(comp)
    med = float(np.median(comp[ok])) if ok.any() else None
    return PerturbationScores(trans, mono, comp, med, int(ok.sum()), int((~ok).sum()), float(lambda_mono))


def perturbation_composite(
    features: object,
    source_centroid: object,
    target_centroid: object,
    *,
    alphas: Sequence[float] = ALPHAS,
    transition: str = "displacement",
    lambda_mono: float = LAMBDA_MONO,
) -> PerturbationScores:
    """Scores from generated tiles' features (n_spots, len(alphas), d) and the real-tile class
    centroids (d,) of the source and target tissue in the same encoder space."""
    f = np.asarray(features, np.float64)
    cs, ct = np.asarray(source_centroid, np.float64), np.asarray(target_centroid, np.float64)
    if f.ndim != 3 or f.shape[2] != ct.size or cs.shape != ct.shape:
        raise ValueError(f"need features (n, A, d) and (d,) centroids, got {f.shape}, {cs.shape}, {ct.shape}")
    d_t = np.linalg.norm(f - ct, axis=2)
    d_s1 = np.linalg.norm(f[:, -1] - cs, axis=1)
    return composite_from_distances(
        d_t,
        float(np.linalg.norm(ct - cs)),
        alphas=alphas,
        dist_source_at_1=d_s1,
        transition=transition,
        lambda_mono=lambda_mono,
    )


def three_pair_mean(medians: Mapping[object, float | None]) -> float | None:
    """Mean of the per-pair median composites (Table 5's last column); None if any is undefined."""
    vals = list(medians.values())
    if not vals or any(v is None for v in vals):
        return None
    return float(np.mean(vals))
