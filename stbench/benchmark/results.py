"""Result rows (`results.jsonl`) read strictly and aggregated one documented way.

The leaderboard is generated ONLY from these rows, so reading is strict: a malformed row fails with
an error naming its file and line, a NaN metric is refused (rows store null), and a job id seen twice
is refused (it would be counted twice). Aggregation sums with `math.fsum` over values sorted by
(fold, seed), so the numbers are exact-rounded and identical on every machine: regenerating the
leaderboard from the same rows gives the same bytes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from stbench.errors import StbenchError

SCHEMA = 1
RESULTS_FILE = "results.jsonl"
# task: expression prediction and image generation rows never share a table (different metrics);
# target: numbers on log1p(raw) and on normalised targets are not comparable either.
TABLE_KEYS = ("dataset", "protocol", "gene_set", "task", "target")
TASKS = ("expression", "image")
KINDS = ("method", "reference")
# Rows written before `kind` existed: these method names were references (yardsticks) already.
REFERENCE_METHODS = frozenset({"mean", "depth"})
UNRECORDED = "unrecorded"  # target of rows written before rows carried it
# config_hash is a key too: two configs of one method are two entries, never one mean over both.
GROUP_KEYS = (*TABLE_KEYS, "kind", "weights", "method", "config_hash")
MAIN_METRIC = "pcc"
LOWER_IS_BETTER = frozenset({"mse", "mae", "rvd", "fid_uni_ge", "fid_uni", "fid_ge", "fid_none", "fid_delta"})
REFERENCE_METRICS = frozenset({"ari_truth"})  # computed on the truth: context, not a score to rank

_REQUIRED_STR = ("job_id", "method", "dataset", "protocol", "gene_set", "weights")
_BOOKKEEPING = re.compile(r"^(n_spots|n_genes)$|_n$|_excluded(_\w+)?$|_n_spots$|_k$")
_ORDER = (
    "pcc",
    "pcc_partial",
    "pcc{k}",
    "pcc{k}_posthoc",
    "pcc_pooled",
    "pcc_spot",
    "mse",
    "mae",
    "rvd",
    "ssim",
    "coexpr",
)
# Image generation (task "image"): the headline metrics of a row, in column order.
IMAGE_METRICS = (
    "fid_uni_ge",
    "fid_uni",
    "fid_ge",
    "fid_none",
    "fid_delta",
    "oracle_auc",
    "oracle_auc_ceiling",
    "oracle_auc_pct_ceiling",
    "mlp_auc",
    "mlp_auc_ceiling",
)
_ORDER_TAIL = ("ari", "ari_truth", *IMAGE_METRICS)


class ResultRowError(StbenchError, ValueError):
    """A result row that cannot be read; the message starts with `file:line:`."""

    def __init__(self, message: str, *, file: str | Path, line: int) -> None:
        self.problem, self.file, self.line = message, str(file), line
        super().__init__(f"{file}:{line}: {message}")


def find_result_files(results: str | Path) -> list[Path]:
    """`results` is a results.jsonl file or a folder searched recursively (sorted, so order is stable)."""
    results = Path(results)
    if results.is_file():
        return [results]
    files = sorted(results.rglob(RESULTS_FILE)) if results.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no {RESULTS_FILE} found under {results}")
    return files


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed in a result row (a missing metric is null)")


def _check_number(value: object, where: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number or null, got {type(value).__name__} {value!r}")


def _check_metrics(metrics: object, where: str) -> None:
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{where} must be an object of metric values, got {type(metrics).__name__}")
    for key, value in metrics.items():
        _check_number(value, f"{where}.{key}")


def validate_row(obj: object) -> dict[str, Any]:
    """Check one decoded row against the schema (docs: notes ENGINE.md); return it normalised
    (fold as str, absent config_hash / per_slide / conventions filled). Raises ValueError."""
    if not isinstance(obj, dict):
        raise ValueError(f"a result row must be a JSON object, got {type(obj).__name__}")
    if obj.get("schema") != SCHEMA:
        raise ValueError(f"field 'schema' must be {SCHEMA}, got {obj.get('schema')!r}")
    for key in _REQUIRED_STR:
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise ValueError(f"field {key!r} must be a non-empty string, got {obj.get(key)!r}")
    if isinstance(obj.get("fold"), bool) or not isinstance(obj.get("fold"), (str, int)):
        raise ValueError(f"field 'fold' must be a string or integer, got {obj.get('fold')!r}")
    if isinstance(obj.get("seed"), bool) or not isinstance(obj.get("seed"), int):
        raise ValueError(f"field 'seed' must be an integer, got {obj.get('seed')!r}")
    if "metrics" not in obj:
        raise ValueError("field 'metrics' is missing")
    _check_metrics(obj["metrics"], "metrics")
    per_slide = obj.get("per_slide") or {}
    if not isinstance(per_slide, Mapping):
        raise ValueError(
            f"field 'per_slide' must be an object keyed by slide, got {type(per_slide).__name__}"
        )
    for slide, metrics in per_slide.items():
        _check_metrics(metrics, f"per_slide.{slide}")
    conventions = obj.get("conventions") or {}
    if not isinstance(conventions, Mapping):
        raise ValueError("field 'conventions' must be an object")
    config_hash = obj.get("config_hash") or ""
    if not isinstance(config_hash, str):
        raise ValueError(f"field 'config_hash' must be a string, got {config_hash!r}")
    task = obj.get("task", "expression")  # rows written before image generation existed
    if task not in TASKS:
        raise ValueError(f"field 'task' must be one of {TASKS}, got {task!r}")
    if "kind" in obj and obj["kind"] not in KINDS:
        raise ValueError(f"field 'kind' must be one of {KINDS}, got {obj['kind']!r}")
    if "target" in obj and (not isinstance(obj["target"], str) or not obj["target"]):
        raise ValueError(f"field 'target' must be a non-empty string, got {obj['target']!r}")
    return {
        **obj,
        "task": task,
        "fold": str(obj["fold"]),
        "config_hash": config_hash,
        "per_slide": dict(per_slide),
        "conventions": dict(conventions),
    }


def read_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """All rows of the given results.jsonl files, validated; blank lines are skipped.
    Each row gets `_file` and `_line` (where it came from) for later messages."""
    rows: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line, parse_constant=_reject_constant)
                except json.JSONDecodeError as exc:
                    raise ResultRowError(
                        f"not valid JSON ({exc.msg}, column {exc.colno})", file=path, line=lineno
                    ) from exc
                except ValueError as exc:
                    raise ResultRowError(str(exc), file=path, line=lineno) from exc
                try:
                    row = validate_row(obj)
                except ValueError as exc:
                    job = obj.get("job_id") if isinstance(obj, dict) else None
                    raise ResultRowError(
                        f"{exc}" + (f" (job {job})" if job else ""), file=path, line=lineno
                    ) from exc
                if row["job_id"] in seen:
                    raise ResultRowError(
                        f"job {row['job_id']} appears twice (first at {seen[row['job_id']]}); "
                        "each job must be counted once",
                        file=path,
                        line=lineno,
                    )
                seen[row["job_id"]] = f"{path}:{lineno}"
                rows.append({**row, "_file": str(path), "_line": lineno})
    return rows


def metric_sort_key(name: str) -> tuple[int, int, str]:
    """Canonical column order: pcc, pcc{k} by k, pcc{k}_posthoc by k, ..., ari, then others by name."""
    if m := re.fullmatch(r"pcc(\d+)", name):
        return (_ORDER.index("pcc{k}"), int(m.group(1)), name)
    if m := re.fullmatch(r"pcc(\d+)_posthoc", name):
        return (_ORDER.index("pcc{k}_posthoc"), int(m.group(1)), name)
    if name in _ORDER:
        return (_ORDER.index(name), 0, name)
    if name in _ORDER_TAIL:
        return (len(_ORDER) + _ORDER_TAIL.index(name), 0, name)
    return (len(_ORDER) + len(_ORDER_TAIL), 0, name)


def metric_names(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Score keys of the rows' `metrics` (bookkeeping such as pcc_n / pcc_excluded left out), ordered."""
    names = {k for row in rows for k in row["metrics"] if not _BOOKKEEPING.search(k)}
    return sorted(names, key=metric_sort_key)


def null_reason(metrics: Mapping[str, Any], key: str) -> str:
    """Why a metric is null, from its bookkeeping keys (e.g. "all 50 genes constant in prediction")."""
    from stbench.metrics import describe

    text = describe(metrics, key)
    return text[len("n/a (") : -1] if text.startswith("n/a (") else "no value recorded"


def _mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Exact-rounded mean and sample sd (ddof = 1; None for one value): identical on every machine."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _summarise(group: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    group = sorted(group, key=lambda r: (r["fold"], r["seed"], r["job_id"]))
    out: dict[str, Any] = {
        "n_rows": len(group),
        "n_folds": len({r["fold"] for r in group}),
        "n_seeds": len({r["seed"] for r in group}),
        "folds": ";".join(sorted({r["fold"] for r in group})),
        "seeds": ";".join(str(s) for s in sorted({r["seed"] for r in group})),
        "job_ids": ";".join(sorted(r["job_id"] for r in group)),
        "config_name": ";".join(sorted({str(r.get("config_name") or "") for r in group} - {""})),
        "n_genes": ";".join(
            str(n) for n in sorted({r["n_genes"] for r in group if isinstance(r.get("n_genes"), int)})
        ),
    }
    for m in metrics:
        present = [r for r in group if m in r["metrics"]]
        values = [float(r["metrics"][m]) for r in present if r["metrics"][m] is not None]
        nulls = [r for r in present if r["metrics"][m] is None]
        mean, sd = _mean_sd(values) if values else (math.nan, None)
        out[f"{m}_mean"] = mean
        out[f"{m}_sd"] = math.nan if sd is None else sd
        out[f"{m}_n"] = len(values)
        out[f"{m}_null"] = len(nulls)
        out[f"{m}_null_reason"] = "; ".join(sorted({null_reason(r["metrics"], m) for r in nulls}))
    return out


def aggregate(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One line per (dataset, protocol, gene_set, weights, method, config_hash): for every metric
    `<m>_mean`, `<m>_sd` (sample sd, ddof = 1) over the rows (folds x seeds; each row is the mean over
    its fold's test slides), `<m>_n` values used and `<m>_null` rows whose value is null, with
    `<m>_null_reason`. Null stays null: NaN in the frame (never 0), "n/a" in tables.
    Sorted by table, then pcc mean descending (null last), then method, weights, config."""
    metrics = metric_names(rows)
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(_key(row, k) for k in GROUP_KEYS), []).append(dict(row))
    records = [
        {**dict(zip(GROUP_KEYS, key, strict=True)), **_summarise(group, metrics)}
        for key, group in groups.items()
    ]
    columns = [
        *GROUP_KEYS,
        "n_rows",
        "n_folds",
        "n_seeds",
        "folds",
        "seeds",
        "job_ids",
        "config_name",
        "n_genes",
    ]
    for m in metrics:
        columns += [f"{m}_mean", f"{m}_sd", f"{m}_n", f"{m}_null", f"{m}_null_reason"]
    df = pd.DataFrame.from_records(records, columns=columns)
    return sort_entries(df)


def sort_entries(df: pd.DataFrame, metric: str = MAIN_METRIC) -> pd.DataFrame:
    """Tables in name order; inside a table best `metric` first (null last), ties by name."""
    main = f"{metric}_mean"
    key = df[main].fillna(-math.inf) if main in df else pd.Series(-math.inf, index=df.index)
    ordered = df.assign(_neg=-key).sort_values(
        [*TABLE_KEYS, "_neg", "method", "weights", "config_hash"], kind="mergesort"
    )
    return ordered.drop(columns="_neg").reset_index(drop=True)


def _slice_scores(rows: Iterable[Mapping[str, Any]], metric: str) -> dict[tuple[str, int, str], float | None]:
    """Per-slice values keyed (fold, seed, slide); a row without per_slide values of `metric` (no
    per_slide, or a per-fold metric such as pcc_pooled) counts as one slice: its fold."""
    scores: dict[tuple[str, int, str], float | None] = {}
    for r in rows:
        per_slide = r.get("per_slide") or {}
        if not any(metric in v for v in per_slide.values()):
            per_slide = {r["fold"]: r["metrics"]}
        for slide, values in per_slide.items():
            if metric in values:
                scores[(r["fold"], r["seed"], str(slide))] = values[metric]
    return scores


def slice_values(rows: Iterable[Mapping[str, Any]], metric: str = MAIN_METRIC) -> list[float]:
    """The defined per-slice values of `metric` (for box plots), in (fold, seed, slide) order."""
    scores = _slice_scores(rows, metric)
    return [float(scores[k]) for k in sorted(scores) if scores[k] is not None]


def entry_rows(rows: Iterable[Mapping[str, Any]], entry: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The rows behind one aggregated entry."""
    return [r for r in rows if all(_key(r, k) == str(entry[k]) for k in GROUP_KEYS)]


def row_kind(row: Mapping[str, Any]) -> str:
    """ "method" or "reference"; a row without `kind` is a reference for `mean` and `depth`."""
    return str(row.get("kind") or ("reference" if row["method"] in REFERENCE_METHODS else "method"))


def _key(row: Mapping[str, Any], key: str) -> str:
    """A grouping key's value; old rows have no `task` (= expression), `target` or `kind`."""
    if key == "task":
        return str(row.get("task", "expression"))
    if key == "target":
        return str(row.get("target") or UNRECORDED)
    if key == "kind":
        return row_kind(row)
    return str(row[key])


def significance(
    rows: Sequence[Mapping[str, Any]], agg: pd.DataFrame, metric: str = MAIN_METRIC
) -> pd.DataFrame:
    """Add `<metric>_p_vs_best`, `<metric>_mark`, `<metric>_pairs`: in each table, a paired Wilcoxon
    signed-rank test (stbench.metrics.wilcoxon_test, one-sided: the best entry is better) on per-slice
    scores of every entry against the entry with the best mean, paired by (fold, seed, slide); slices
    where either value is null are not pairs. Marks are HINGE's (*** < 0.001, ** < 0.01, * < 0.05, ns).
    p stays NaN for the best entry, with fewer than 2 pairs, or without stbench.metrics.statistics.
    Reference entries (kind "reference") are never the best entry and never get a p or a mark."""
    out = agg.copy()
    p_col, mark_col, n_col = f"{metric}_p_vs_best", f"{metric}_mark", f"{metric}_pairs"
    out[p_col], out[mark_col], out[n_col] = math.nan, "", 0
    mean_col = f"{metric}_mean"
    if mean_col not in out:
        return out
    try:
        from stbench.metrics.statistics import significance_mark_stars, wilcoxon_test
    except ImportError:  # pragma: no cover - the metrics package ships with stbench
        return out
    lower = metric in LOWER_IS_BETTER
    kinds = out["kind"] if "kind" in out else pd.Series("method", index=out.index)
    for _, table in out[kinds != "reference"].groupby(list(TABLE_KEYS), sort=True):
        defined = table[table[mean_col].notna()]
        if defined.empty:
            continue
        best_idx = defined[mean_col].idxmin() if lower else defined[mean_col].idxmax()
        best = _slice_scores(entry_rows(rows, out.loc[best_idx]), metric)
        out.loc[best_idx, mark_col] = "best"
        for idx in table.index:
            if idx == best_idx:
                continue
            other = _slice_scores(entry_rows(rows, out.loc[idx]), metric)
            keys = sorted(
                k for k in best.keys() & other.keys() if best[k] is not None and other[k] is not None
            )
            out.loc[idx, n_col] = len(keys)
            if len(keys) < 2:
                continue
            test = wilcoxon_test(
                [best[k] for k in keys], [other[k] for k in keys], alternative="less" if lower else "greater"
            )
            out.loc[idx, p_col] = test.pvalue
            out.loc[idx, mark_col] = significance_mark_stars(test.pvalue)
    return out
