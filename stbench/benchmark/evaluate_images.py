"""Evaluate generated tiles (`task = image`): FID per conditioning regime, oracle AUC, per-tissue FID,
bootstrap CIs and the tissue perturbation composite, as one flat metrics dict for a result row.

Inputs are aligned by test spot: row i of `real_tiles`, of every `generated[regime]` and of
`test_expression` is the same test spot (the generator was conditioned on that spot), which is what
makes the spot-level bootstrap paired. Regressors see ONLY `TrainPairs` (training split); the test
expression is used for scoring, never for fitting or gene selection.

Result keys (regime keys spelled uni_ge / uni / ge / none):
  fid_<r>, fid_<r>_low/_high/_halfwidth/_boot_mean, fid_delta = fid_uni_ge - fid_uni;
  oracle_auc_<r> (+ _low/_high/_halfwidth), oracle_pcc_k<k>_<r>, oracle_auc_ceiling (real test tiles),
  oracle_pcc_k<k>_real, oracle_auc_null = 0, oracle_auc / oracle_auc_pct_ceiling (headline regime);
  the same with prefix mlp_ when the Midnight+MLP regressor runs; perturb_<src>_to_<tgt> medians and
  perturb_three_pair_mean when perturbation tiles are given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from stbench.benchmark.image_features import FeatureFn, build_featurizer, featurizer_label
from stbench.errors import LeakageError
from stbench.metrics.image_fid import (
    REGIME_KEYS,
    REGIMES,
    check_regime,
    fid,
    fid_bootstrap,
    fid_delta,
    fid_per_group,
)
from stbench.metrics.image_oracle import (
    K_GRID,
    MLPOracle,
    RidgeOracle,
    bootstrap_auc,
    score_curve,
)
from stbench.metrics.image_perturbation import (
    ALPHAS,
    class_centroids,
    perturbation_composite,
    three_pair_mean,
)


@dataclass(frozen=True)
class ImageEvalConfig:
    fid_encoder: str = "h0-mini"
    fid_weights: str = "default"
    oracle_encoder: str = "uni2-h"
    oracle_weights: str = "default"
    mlp_encoder: str | None = None  # "midnight" runs the Midnight+MLP regressor
    mlp_weights: str = "default"
    ks: tuple[int, ...] = K_GRID
    n_components: int = 256
    integration: str = "mean"
    headline_regime: str | None = None  # default: the first of REGIMES that was generated
    n_boot: int = 1000  # 0 = no bootstrap
    confidence: float = 0.95
    seed: int = 0
    batch_size: int = 32
    device: str = "cpu"
    mlp: dict[str, Any] = field(default_factory=dict)  # MLPOracle keyword overrides
    tissue_min_count: int = 2
    alphas: tuple[float, ...] = ALPHAS


@dataclass(frozen=True)
class TrainPairs:
    """Real (tile, expression) pairs of the TRAINING split: the only data regressors are fitted on.
    Give the tiles (featurized here with the regressors' encoders) or precomputed features keyed
    "oracle" / "mlp" (same encoder as the featurizer used on test tiles)."""

    expression: Any  # (n_train, G), the protocol's target space
    tiles: Any = None
    features: Mapping[str, Any] = field(default_factory=dict)
    spot_ids: Sequence[str] | None = None


@dataclass(frozen=True)
class ImageEvalResult:
    metrics: dict[str, Any]
    per_tissue: pd.DataFrame  # regime, tissue, fid, n_real, n_generated
    curves: pd.DataFrame  # regressor, source (regime or "real"), k, pcc, n, excluded


def _check_disjoint(train_ids: Sequence[str] | None, test_ids: Sequence[str] | None) -> None:
    if train_ids is None or test_ids is None:
        return
    both = sorted(set(map(str, train_ids)) & set(map(str, test_ids)))
    if both:
        raise LeakageError(
            f"{len(both)} test spots are also in the regressors' training pairs (e.g. {both[:5]}); "
            "oracles must be fitted on the training split only"
        )


def _headline(config: ImageEvalConfig, regimes: Sequence[str]) -> str:
    if config.headline_regime is not None:
        if config.headline_regime not in regimes:
            raise ValueError(
                f"headline regime {config.headline_regime!r} was not generated ({list(regimes)})"
            )
        return config.headline_regime
    return next(r for r in REGIMES if r in regimes)


def _ci_keys(out: dict[str, Any], key: str, ci: Any) -> None:
    out[f"{key}_low"], out[f"{key}_high"] = ci.low, ci.high
    out[f"{key}_halfwidth"] = None if ci.low is None else (ci.high - ci.low) / 2


def _fid_block(
    real: np.ndarray,
    gen: Mapping[str, np.ndarray],
    labels: Sequence[str] | None,
    config: ImageEvalConfig,
    out: dict[str, Any],
) -> pd.DataFrame:
    fids: dict[str, float] = {}
    rows = []
    for regime, g in gen.items():
        key = f"fid_{REGIME_KEYS[regime]}"
        fids[regime] = out[key] = fid(real, g)
        if config.n_boot:
            ci = fid_bootstrap(real, g, n_boot=config.n_boot, confidence=config.confidence, seed=config.seed)
            _ci_keys(out, key, ci)
            out[f"{key}_boot_mean"] = ci.mean
        if labels is not None:
            for grp in fid_per_group(real, g, labels, min_count=config.tissue_min_count):
                rows.append(
                    {
                        "regime": regime,
                        "tissue": grp.group,
                        "fid": grp.fid,
                        "n_real": grp.n_real,
                        "n_generated": grp.n_generated,
                    }
                )
    out["fid_delta"] = fid_delta(fids)
    return pd.DataFrame(rows, columns=["regime", "tissue", "fid", "n_real", "n_generated"])


def _regressor_block(
    prefix: str,
    regressor: Any,
    test_expr: np.ndarray,
    real_feats: np.ndarray,
    gen_feats: Mapping[str, np.ndarray],
    headline: str,
    config: ImageEvalConfig,
    out: dict[str, Any],
) -> list[dict[str, Any]]:
    genes = {k: regressor.genes(k) for k in regressor.ks}
    out[f"{prefix}_ks"] = ",".join(str(k) for k in regressor.ks)
    out[f"{prefix}_auc_null"] = 0.0
    rows: list[dict[str, Any]] = []
    sources = {"real": real_feats, **gen_feats}
    for source, feats in sources.items():
        preds = regressor.predict(feats)
        score = score_curve(test_expr, preds, genes, integration=config.integration)
        key = f"{prefix}_auc_ceiling" if source == "real" else f"{prefix}_auc_{REGIME_KEYS[source]}"
        out[key] = score.auc
        tag = "real" if source == "real" else REGIME_KEYS[source]
        for k, res in score.curve.items():
            out[f"{prefix}_pcc_k{k}_{tag}"] = res.value
            rows.append(
                {
                    "regressor": prefix,
                    "source": source,
                    "k": k,
                    "pcc": res.value,
                    "n": res.n,
                    "excluded": res.excluded,
                }
            )
        if config.n_boot:
            ci = bootstrap_auc(
                test_expr,
                preds,
                genes,
                integration=config.integration,
                n_boot=config.n_boot,
                confidence=config.confidence,
                seed=config.seed,
            )
            _ci_keys(out, key, ci)
    head = f"{prefix}_auc_{REGIME_KEYS[headline]}"
    out[f"{prefix}_auc"] = out[head]
    for suffix in ("_low", "_high", "_halfwidth"):
        if head + suffix in out:
            out[f"{prefix}_auc{suffix}"] = out[head + suffix]
    ceiling = out[f"{prefix}_auc_ceiling"]
    out[f"{prefix}_auc_pct_ceiling"] = (
        None if out[head] is None or not ceiling else 100.0 * out[head] / ceiling
    )
    return rows


def _train_features(train: TrainPairs, role: str, fn: FeatureFn) -> np.ndarray:
    if role in train.features:
        return np.asarray(train.features[role], dtype=np.float64)
    if train.tiles is None:
        raise ValueError(
            f"TrainPairs needs tiles or precomputed features[{role!r}] to fit the {role} regressor"
        )
    return fn(train.tiles)


def _slug(label: str) -> str:
    """Tissue label as a result-key fragment ("Normal lymphoid" -> "normal_lymphoid")."""
    return re.sub(r"[^0-9a-z]+", "_", str(label).lower()).strip("_")


def _perturbation_block(
    perturbation: Mapping[tuple[str, str], Any],
    fid_fn: FeatureFn,
    real_feats: np.ndarray,
    labels: Sequence[str] | None,
    config: ImageEvalConfig,
    out: dict[str, Any],
) -> None:
    if labels is None:
        raise ValueError("the perturbation composite needs tissue_labels (real-tile class centroids)")
    centroids = class_centroids(real_feats, labels)
    medians = {}
    for (src, tgt), tiles in perturbation.items():
        for c in (src, tgt):
            if c not in centroids:
                raise ValueError(f"perturbation class {c!r} has no real test tiles ({sorted(centroids)})")
        arr = np.asarray(tiles)
        n, a = arr.shape[:2]
        if a != len(config.alphas):
            raise ValueError(f"perturbation {src}->{tgt}: {a} steps per spot, alphas {config.alphas}")
        feats = fid_fn(arr.reshape(n * a, *arr.shape[2:])).reshape(n, a, -1)
        res = perturbation_composite(feats, centroids[src], centroids[tgt], alphas=config.alphas)
        key = f"perturb_{_slug(src)}_to_{_slug(tgt)}"
        medians[key] = out[key] = res.median
        out[f"{key}_n"], out[f"{key}_undefined"] = res.n_defined, res.n_undefined
    out["perturb_three_pair_mean"] = three_pair_mean(medians)


def evaluate_images(
    real_tiles: Any,
    generated: Mapping[str, Any],
    train: TrainPairs,
    test_expression: Any,
    *,
    test_spot_ids: Sequence[str] | None = None,
    tissue_labels: Sequence[str] | None = None,
    fid_featurizer: FeatureFn | None = None,
    oracle_featurizer: FeatureFn | None = None,
    mlp_featurizer: FeatureFn | None = None,
    perturbation: Mapping[tuple[str, str], Any] | None = None,
    config: ImageEvalConfig | None = None,
) -> ImageEvalResult:
    """Score generated test tiles (per regime) against the real test tiles and measured expression.
    Featurizers default to `build_featurizer` on the config's encoders; tests pass stand-ins."""
    config = config or ImageEvalConfig()
    if not generated:
        raise ValueError("no generated tiles: pass {regime: tiles} for at least one of " + ", ".join(REGIMES))
    regimes = [check_regime(r) for r in generated]
    headline = _headline(config, regimes)
    _check_disjoint(train.spot_ids, test_spot_ids)
    test_expr = np.asarray(test_expression, dtype=np.float64)
    n = test_expr.shape[0]
    sizes = {"real_tiles": len(real_tiles), **{f"generated[{r}]": len(t) for r, t in generated.items()}}
    if tissue_labels is not None:
        sizes["tissue_labels"] = len(tissue_labels)
    if test_spot_ids is not None:
        sizes["test_spot_ids"] = len(test_spot_ids)
    bad = {k: v for k, v in sizes.items() if v != n}
    if bad:
        raise ValueError(f"inputs must be aligned with the {n} test spots of test_expression; got {bad}")

    kw = {"batch_size": config.batch_size, "device": config.device}
    fid_fn = fid_featurizer or build_featurizer(config.fid_encoder, config.fid_weights, **kw)
    oracle_fn = oracle_featurizer or build_featurizer(config.oracle_encoder, config.oracle_weights, **kw)
    if mlp_featurizer is None and config.mlp_encoder:
        mlp_featurizer = build_featurizer(config.mlp_encoder, config.mlp_weights, **kw)

    out: dict[str, Any] = {
        "n_test": n,
        "n_train": len(train.expression),
        "regimes": ",".join(regimes),
        "headline_regime": headline,
        "fid_encoder": featurizer_label(fid_fn),
        "oracle_encoder": featurizer_label(oracle_fn),
        "auc_integration": config.integration,
        "n_boot": config.n_boot,
    }
    real_fid = fid_fn(real_tiles)
    gen_fid = {r: fid_fn(t) for r, t in generated.items()}
    per_tissue = _fid_block(real_fid, gen_fid, tissue_labels, config, out)

    oracle = RidgeOracle(config.ks, config.n_components)
    oracle.fit(_train_features(train, "oracle", oracle_fn), train.expression)
    rows = _regressor_block(
        "oracle",
        oracle,
        test_expr,
        oracle_fn(real_tiles),
        {r: oracle_fn(t) for r, t in generated.items()},
        headline,
        config,
        out,
    )
    if mlp_featurizer is not None:
        out["mlp_encoder"] = featurizer_label(mlp_featurizer)
        mlp = MLPOracle(config.ks, seed=config.seed, device=config.device, **config.mlp)
        mlp.fit(_train_features(train, "mlp", mlp_featurizer), train.expression)
        rows += _regressor_block(
            "mlp",
            mlp,
            test_expr,
            mlp_featurizer(real_tiles),
            {r: mlp_featurizer(t) for r, t in generated.items()},
            headline,
            config,
            out,
        )
    if perturbation:
        _perturbation_block(perturbation, fid_fn, real_fid, tissue_labels, config, out)
    curves = pd.DataFrame(rows, columns=["regressor", "source", "k", "pcc", "n", "excluded"])
    return ImageEvalResult(out, per_tissue, curves)
