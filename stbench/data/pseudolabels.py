"""Pseudo-labels: an expression method's out-of-fold predictions stacked into one file (STMDiT PTPL).

Why: STMDiT's PTPL variant conditions the image generator on a predictor's output (the paper:
DeepSpot) instead of measured counts, so cohorts without expression (TCGA-SKCM) can be conditioned
the same way. The pseudo-label of a training spot must not come from a model that saw that spot, so
every slide is taken from the job that held it out (its test slides), and a slide predicted by two
jobs is refused instead of silently picked.

File layout (one h5ad): X = predictions, float32, in the producing protocol's target space (not raw
counts); obs index "<slide>/<spot_id>", obs columns slide, spot_id, job_id, fold; var index = genes;
uns["pseudolabels"] = provenance (method, dataset, source jobs, target space, what the rows are).
`stbench pseudolabels` writes it from a run folder; `write_pseudolabels` writes one from predictions
made elsewhere (e.g. a predictor run on H&E-only tiles), in the same layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from stbench.errors import DataError, LeakageError
from stbench.utils.io import atomic_path, sha256_file

UNS_KEY = "pseudolabels"
KIND = "out-of-fold predictions"
OOF_NOTE = (
    "each slide is predicted by the job that held it out (one of its test slides), so no spot's "
    "pseudo-label comes from a model trained on that spot"
)
_EXAMPLES = 5


def spot_key(slide: str, spot_id: str) -> str:
    """Row name of a spot in a pseudo-label file (spot ids are unique only within a slide)."""
    return f"{slide}/{spot_id}"


# ---- writing ---------------------------------------------------------------------------------
def write_pseudolabels(
    out: str | Path,
    values: np.ndarray,
    slides: Sequence[str],
    spot_ids: Sequence[str],
    genes: Sequence[str],
    *,
    info: Mapping[str, Any],
    job_ids: Sequence[str] | None = None,
    folds: Sequence[str] | None = None,
) -> Path:
    """Write a pseudo-label file atomically; `info` (method, dataset, space, ...) goes to uns.
    For predictions made outside a run, job_ids / folds default to "external"."""
    values = np.asarray(values, dtype=np.float32)
    n = len(slides)
    if values.shape != (n, len(genes)) or len(spot_ids) != n:
        raise DataError(
            f"pseudo-labels must be (spots, genes) = ({n}, {len(genes)}) with one spot id each, "
            f"got values {values.shape} and {len(spot_ids)} spot ids",
            file=out,
            field="X",
        )
    keys = [spot_key(str(s), str(i)) for s, i in zip(slides, spot_ids, strict=True)]
    obs = pd.DataFrame(
        {
            "slide": [str(s) for s in slides],
            "spot_id": [str(i) for i in spot_ids],
            "job_id": [str(j) for j in job_ids] if job_ids is not None else ["external"] * n,
            "fold": [str(f) for f in folds] if folds is not None else ["external"] * n,
        },
        index=pd.Index(keys, name="spot"),
    )
    if not obs.index.is_unique:
        dup = obs.index[obs.index.duplicated()].unique()[:_EXAMPLES].tolist()
        raise DataError(f"duplicate spots {dup}", file=out, field="obs_names")
    for col in ("slide", "job_id", "fold"):
        obs[col] = obs[col].astype("category")
    a = ad.AnnData(X=values, obs=obs, var=pd.DataFrame(index=pd.Index([str(g) for g in genes], name="gene")))
    if not a.var_names.is_unique:
        dup = a.var_names[a.var_names.duplicated()].unique()[:_EXAMPLES].tolist()
        raise DataError(f"duplicate genes {dup}", file=out, field="var")
    a.uns[UNS_KEY] = {"kind": KIND, "note": OOF_NOTE, **_h5_safe(dict(info))}
    out = Path(out)
    with atomic_path(out) as tmp:
        a.write_h5ad(tmp)
    return out


def _h5_safe(obj: Any) -> Any:
    """uns must be h5ad-writable: None -> "", nested dicts kept, lists of str as lists."""
    if isinstance(obj, Mapping):
        return {str(k): _h5_safe(v) for k, v in obj.items()}
    if obj is None:
        return ""
    if isinstance(obj, list | tuple):
        return [str(v) for v in obj]
    return obj


# ---- stacking a run folder's predictions ---------------------------------------------------------
def stack_pseudolabels(
    rows: list[dict[str, Any]],
    output_dir: str | Path,
    results: str | Path,
    method: str,
    dataset: str,
    protocol: str | None = None,
    seed: int | None = None,
    out: str | Path | None = None,
) -> Path:
    """Stack the test-slide predictions of the finished jobs `rows` (result rows read from `results`
    in the run folder `output_dir`) into one pseudo-label file; return its path. Reading and
    selecting the rows is the benchmark's job (stbench.benchmark.pseudolabels.collect_pseudolabels):
    stbench.data never imports stbench.benchmark. Default `out`:
    <output_dir>/pseudolabels/<method>__<dataset>.h5ad."""
    output_dir, results = Path(output_dir), Path(results)
    rows = sorted(rows, key=lambda r: (r["protocol"], str(r["fold"]), int(r["seed"]), r["job_id"]))
    owner = _slide_owners(rows, results)
    _same_target(rows, results)

    chunks: list[tuple[str, ad.AnnData]] = []
    genes: list[str] | None = None
    first: tuple[str, str] = ("", "")
    jobs: dict[str, dict[str, Any]] = {}
    space = ""
    for slide in sorted(owner):
        row = owner[slide]
        path = output_dir / "jobs" / row["job_id"] / "predictions" / f"{slide}.h5ad"
        a = _read_prediction(path, row, slide)
        if genes is None:
            genes, first = list(a.var_names), (row["job_id"], slide)
            space = str(a.uns.get("stbench", {}).get("space", ""))
        elif list(a.var_names) != genes:
            a = _align_panel(a, genes, first, row["job_id"], path, slide)
        chunks.append((slide, a))
        entry = jobs.setdefault(
            row["job_id"],
            {
                "protocol": row["protocol"],
                "fold": str(row["fold"]),
                "seed": int(row["seed"]),
                "config_hash": row.get("config_hash", ""),
                "test_slides": [],
                "n_spots": 0,
            },
        )
        entry["test_slides"].append(slide)
        entry["n_spots"] += int(a.n_obs)
    assert genes is not None
    values = np.concatenate([_dense(a.X) for _, a in chunks], axis=0)
    slides = [s for s, a in chunks for _ in range(a.n_obs)]
    spot_ids = [str(i) for _, a in chunks for i in a.obs_names]
    job_ids = [owner[s]["job_id"] for s in slides]
    folds = [str(owner[s]["fold"]) for s in slides]
    info = {
        "method": method,
        "dataset": dataset,
        "protocol": protocol or "",
        "seed": "" if seed is None else int(seed),
        "space": space,
        "target": rows[0].get("target") or "",
        "results_file": str(results),
        "jobs": jobs,
    }
    if out is None:
        out = output_dir / "pseudolabels" / f"{method}__{dataset}.h5ad"
    return write_pseudolabels(out, values, slides, spot_ids, genes, info=info, job_ids=job_ids, folds=folds)


def _describe(row: Mapping[str, Any]) -> str:
    return f"{row['job_id']} (protocol {row['protocol']}, fold {row['fold']}, seed {row['seed']})"


def _slide_owners(rows: list[dict[str, Any]], results: Path) -> dict[str, dict[str, Any]]:
    """slide -> the one job that predicted it; a slide in two jobs' test slides is refused."""
    owner: dict[str, dict[str, Any]] = {}
    clashes: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        test = [str(s) for s in row.get("test_slides") or []]
        if not test:
            raise DataError(f"job {row['job_id']} lists no test slides", file=results, field="test_slides")
        leaked = sorted(set(test) & {str(s) for s in row.get("train_slides") or []})
        if leaked:
            raise LeakageError(f"job {row['job_id']} trained on its test slide(s) {leaked} ({results})")
        for slide in test:
            if slide in owner:
                clashes.setdefault(slide, [owner[slide]]).append(row)
            else:
                owner[slide] = row
    if clashes:
        slide, who = next(iter(sorted(clashes.items())))
        protocols = sorted({r["protocol"] for r in rows})
        seeds = sorted({int(r["seed"]) for r in rows})
        raise DataError(
            f"slide {slide} is predicted by {len(who)} jobs ({', '.join(_describe(r) for r in who)}); "
            f"{len(clashes)} slide(s) in all are predicted twice. Pick one job per slide with "
            f"--protocol (here: {protocols}) and --seed (here: {seeds})",
            file=results,
            slide=slide,
            field="test_slides",
        )
    return owner


def _same_target(rows: list[dict[str, Any]], results: Path) -> None:
    """Predictions in different target spaces (log1p vs log2) cannot be stacked into one matrix."""
    targets = {str(r.get("target")) for r in rows}
    if len(targets) > 1:
        by = {t: next(r["job_id"] for r in rows if str(r.get("target")) == t) for t in sorted(targets)}
        raise DataError(
            f"jobs predict in different target spaces {by}; select one protocol with --protocol",
            file=results,
            field="target",
        )


def _read_prediction(path: Path, row: Mapping[str, Any], slide: str) -> ad.AnnData:
    if not path.is_file():
        raise DataError(
            f"prediction of job {row['job_id']} is missing", file=path, slide=slide, field="predictions"
        )
    try:
        a = ad.read_h5ad(path)
    except Exception as exc:
        raise DataError(
            f"cannot read prediction: {exc}", file=path, slide=slide, field="predictions"
        ) from exc
    written_by = str(a.uns.get("stbench", {}).get("job_id", row["job_id"]))
    if written_by != row["job_id"]:
        raise DataError(
            f"file written by job {written_by}, but it sits in job {row['job_id']}'s folder",
            file=path,
            slide=slide,
            field="uns/stbench/job_id",
        )
    if "slide" in a.obs.columns and (a.obs["slide"].astype(str) != slide).any():
        other = sorted(set(a.obs["slide"].astype(str)) - {slide})[:_EXAMPLES]
        raise DataError(
            f"spots of other slides {other} in this file", file=path, slide=slide, field="obs/slide"
        )
    if not a.obs_names.is_unique:
        raise DataError("duplicate spot ids", file=path, slide=slide, field="obs_names")
    x = _dense(a.X)
    bad = ~np.isfinite(x)
    if bad.any():
        raise DataError(f"{int(bad.sum())} non-finite prediction value(s)", file=path, slide=slide, field="X")
    a.X = x
    a.obs = pd.DataFrame({"slide": slide}, index=a.obs_names.astype(str))
    return a


def _align_panel(
    a: ad.AnnData, genes: list[str], first: tuple[str, str], job_id: str, path: Path, slide: str
) -> ad.AnnData:
    """Same genes in another order are reordered; a different panel cannot be stacked."""
    have = list(a.var_names)
    if set(have) == set(genes):
        return a[:, genes].copy()
    only_here = [g for g in have if g not in set(genes)]
    only_first = [g for g in genes if g not in set(have)]
    raise DataError(
        f"gene panels differ: job {job_id} (slide {slide}, {len(have)} genes) vs job {first[0]} "
        f"(slide {first[1]}, {len(genes)} genes); {len(only_here)} gene(s) only in {job_id} "
        f"(e.g. {only_here[:_EXAMPLES]}), {len(only_first)} only in {first[0]} "
        f"(e.g. {only_first[:_EXAMPLES]}). Cannot stack: run every fold on one fixed panel "
        "(--data.gene_rule list --data.gene_kwargs.gene_list FILE)",
        file=path,
        slide=slide,
        field="var",
    )


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)


# ---- reading ---------------------------------------------------------------------------------
@dataclass
class PseudoLabels:
    """A loaded pseudo-label file; `lookup` gives the (spots, genes) matrix a method conditions on."""

    path: Path
    values: np.ndarray
    obs: pd.DataFrame
    genes: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    _sha: str | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> PseudoLabels:
        path = Path(path)
        if not path.is_file():
            raise DataError("pseudo-label file not found", file=path, field="pseudolabels")
        try:
            a = ad.read_h5ad(path)
        except Exception as exc:
            raise DataError(f"cannot read pseudo-labels: {exc}", file=path, field="pseudolabels") from exc
        if UNS_KEY not in a.uns:
            raise DataError(
                "not a pseudo-label file (no uns['pseudolabels']); make one with `stbench pseudolabels`",
                file=path,
                field=f"uns/{UNS_KEY}",
            )
        missing = [c for c in ("slide", "spot_id") if c not in a.obs.columns]
        if missing:
            raise DataError(f"obs lacks columns {missing}", file=path, field="obs")
        return cls(path, _dense(a.X), a.obs.copy(), [str(g) for g in a.var_names], _plain(a.uns[UNS_KEY]))

    @property
    def slides(self) -> list[str]:
        return sorted(set(self.obs["slide"].astype(str)))

    @property
    def method(self) -> str:
        return str(self.info.get("method") or "unknown")

    @property
    def sha12(self) -> str:
        if self._sha is None:
            self._sha = sha256_file(self.path)[:12]
        return self._sha

    @property
    def source(self) -> str:
        """What produced these labels, for result rows and slide meta: pseudolabels:<method>@<sha12>."""
        return f"pseudolabels:{self.method}@{self.sha12}"

    def lookup(self, slides: Sequence[str], spot_ids: Sequence[str], genes: Sequence[str]) -> np.ndarray:
        """(n, G) float32 pseudo-labels of the given spots and genes; a DataError naming the file,
        slide and field (with how many are missing and examples) when any spot or gene is absent."""
        if len(slides) != len(spot_ids):
            raise DataError(
                f"{len(slides)} slide names for {len(spot_ids)} spot ids", file=self.path, field="spot_ids"
            )
        gidx = pd.Index(self.genes).get_indexer([str(g) for g in genes])
        if (gidx < 0).any():
            miss = [str(g) for g, i in zip(genes, gidx, strict=True) if i < 0]
            asked = sorted({str(s) for s in slides})
            raise DataError(
                f"{len(miss)} of {len(genes)} requested gene(s) not in the pseudo-labels "
                f"({len(self.genes)} genes), e.g. {miss[:_EXAMPLES]}",
                file=self.path,
                slide=", ".join(asked[:3]) + (", ..." if len(asked) > 3 else "") or None,
                field="var",
            )
        keys = [spot_key(str(s), str(i)) for s, i in zip(slides, spot_ids, strict=True)]
        ridx = self.obs.index.get_indexer(keys)
        if (ridx < 0).any():
            self._missing_spots(slides, spot_ids, ridx)
        return np.ascontiguousarray(self.values[np.ix_(ridx, gidx)], dtype=np.float32)

    def _missing_spots(self, slides: Sequence[str], spot_ids: Sequence[str], ridx: np.ndarray) -> None:
        miss = np.flatnonzero(ridx < 0)
        by_slide: dict[str, list[str]] = {}
        for i in miss:
            by_slide.setdefault(str(slides[i]), []).append(str(spot_ids[i]))
        slide, ids = next(iter(by_slide.items()))
        asked = sum(1 for s in slides if str(s) == slide)
        more = f"; {len(miss)} missing over {len(by_slide)} slide(s)" if len(by_slide) > 1 else ""
        if slide not in set(self.slides):
            raise DataError(
                f"slide has no pseudo-labels in this file (it has {self.slides[:10]}){more}",
                file=self.path,
                slide=slide,
                field="obs/slide",
            )
        raise DataError(
            f"{len(ids)} of {asked} requested spot(s) not in the pseudo-labels, e.g. {ids[:_EXAMPLES]}{more}",
            file=self.path,
            slide=slide,
            field="obs_names",
        )


def _plain(obj: Any) -> Any:
    """uns as read back (numpy arrays and scalars) -> plain JSON-able Python values."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return [_plain(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj
