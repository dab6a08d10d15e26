"""Leaderboard from result rows: aggregation = numpy, byte-identical regeneration, --check detects
edits and new rows, headers state the conventions, a null metric shows n/a with its reason, and a
malformed row fails naming its file and line."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from stbench.benchmark.leaderboard import FILES, build_leaderboard, check_leaderboard
from stbench.benchmark.results import ResultRowError, aggregate, read_rows, significance
from tests.fixtures.result_rows import (
    GENE_SET,
    PCC_CONVENTION,
    make_row,
    result_rows,
    slide_metrics,
    write_results,
)


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    write_results(tmp_path / "results" / "ci" / "results.jsonl", result_rows())
    return tmp_path / "results"


def _values(rows: list[dict], method: str, key: str) -> list[float]:
    return [r["metrics"][key] for r in rows if r["method"] == method]


def _section_rows(md: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in md.splitlines()
        if line.startswith("| ") and not line.startswith("| #")
    ]


# ---- aggregation --------------------------------------------------------------------------------------
def test_aggregate_equals_numpy_mean_and_sample_sd() -> None:
    rows = result_rows()
    agg = aggregate(rows).set_index("method")
    for method in ("uni-ridge", "patch-cnn"):
        for key in ("pcc", "pcc50", "pcc50_posthoc", "mse", "mae"):
            vals = np.array(_values(rows, method, key))
            assert agg.loc[method, f"{key}_mean"] == pytest.approx(np.mean(vals), abs=1e-12)
            assert agg.loc[method, f"{key}_sd"] == pytest.approx(np.std(vals, ddof=1), abs=1e-12)
            assert agg.loc[method, f"{key}_n"] == 6 and agg.loc[method, f"{key}_null"] == 0
        assert (agg.loc[method, "n_rows"], agg.loc[method, "n_folds"], agg.loc[method, "n_seeds"]) == (
            6,
            3,
            2,
        )
    mean = agg.loc["mean"]
    assert math.isnan(mean["pcc_mean"]) and math.isnan(mean["pcc_sd"])  # null stays null, never 0
    assert (mean["pcc_n"], mean["pcc_null"]) == (0, 6)
    assert mean["pcc_null_reason"] == "all 50 genes constant in prediction"
    assert mean["mse_mean"] == pytest.approx(np.mean(_values(rows, "mean", "mse")), abs=1e-12)
    # sorted by pcc descending, null last
    assert list(aggregate(rows)["method"]) == ["uni-ridge", "patch-cnn", "mean"]
    # bookkeeping keys are not metrics
    assert not any(c.startswith(("pcc_n_", "pcc_excluded", "n_spots")) for c in agg.columns)


def test_partly_null_metric_is_averaged_over_the_rest_and_counted() -> None:
    rows = result_rows()
    victim = next(r for r in rows if r["method"] == "patch-cnn")
    victim["metrics"] = {
        **victim["metrics"],
        "pcc": None,
        "pcc_n": 0,
        "pcc_excluded": 50,
        "pcc_excluded_truth": 50,
        "pcc_excluded_pred": 0,
    }
    e = aggregate(rows).set_index("method").loc["patch-cnn"]
    rest = [v for v in _values(rows, "patch-cnn", "pcc") if v is not None]
    assert (e["pcc_n"], e["pcc_null"]) == (5, 1)
    assert e["pcc_mean"] == pytest.approx(np.mean(rest), abs=1e-12)
    assert e["pcc_null_reason"] == "all 50 genes constant in truth"


def test_two_configs_of_one_method_are_separate_entries() -> None:
    rng = np.random.default_rng(3)
    rows = [
        make_row("patch-cnn", "none", f, s, slide_metrics(rng, 0.2), config_hash=h)
        for h in ("a" * 16, "b" * 16)
        for f in ("B4", "C2")
        for s in (0,)
    ]
    agg = aggregate(rows)
    assert len(agg) == 2 and set(agg["config_hash"]) == {"a" * 16, "b" * 16}
    assert list(agg["n_rows"]) == [2, 2]


def test_significance_is_scipy_wilcoxon_against_the_best_row() -> None:
    rows = result_rows()
    sig = significance(rows, aggregate(rows)).set_index("method")
    best, other = _values(rows, "uni-ridge", "pcc"), _values(rows, "patch-cnn", "pcc")
    expected = stats.wilcoxon(best, other, alternative="greater").pvalue
    assert sig.loc["patch-cnn", "pcc_p_vs_best"] == pytest.approx(expected, rel=1e-12)
    assert sig.loc["patch-cnn", "pcc_pairs"] == 6
    assert sig.loc["uni-ridge", "pcc_mark"] == "best"
    assert math.isnan(sig.loc["mean", "pcc_p_vs_best"]) and sig.loc["mean", "pcc_pairs"] == 0


# ---- files --------------------------------------------------------------------------------------------
def test_build_writes_four_files_and_regeneration_is_byte_identical(
    results_dir: Path, tmp_path: Path
) -> None:
    first = build_leaderboard(results_dir, tmp_path / "a")
    assert {p.name for p in first.values()} == set(FILES.values())
    again = build_leaderboard(results_dir, tmp_path / "b")
    for key in FILES:
        assert first[key].read_bytes() == again[key].read_bytes(), key
    before = {k: p.read_bytes() for k, p in first.items()}
    build_leaderboard(results_dir, tmp_path / "a")  # rebuild in place
    assert {k: p.read_bytes() for k, p in first.items()} == before
    for key in ("md", "csv", "tex"):
        text = first[key].read_text()
        assert not re.search(r"\d{4}-\d{2}-\d{2}|\d\d:\d\d:\d\d", text), key  # no timestamps
        assert str(tmp_path) not in text, key  # no machine-specific paths
    assert "`ci/results.jsonl` (18 rows, sha256 " in first["md"].read_text()


def test_check_passes_then_detects_hand_edit_new_row_and_missing_file(
    results_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "board"
    paths = build_leaderboard(results_dir, out)
    assert check_leaderboard(results_dir, out) == []

    md = paths["md"].read_text()
    paths["md"].write_text(md.replace("| 1 | uni-ridge", "| 1 | uni-ridge (edited)", 1))
    problems = check_leaderboard(results_dir, out)
    assert len(problems) == 1 and problems[0].startswith("LEADERBOARD.md")
    assert "uni-ridge (edited)" in problems[0] and "regenerated from rows" in problems[0]
    paths["md"].write_text(md)
    assert check_leaderboard(results_dir, out) == []

    rows = result_rows()
    rng = np.random.default_rng(9)
    rows.append(make_row("patch-cnn", "none", "B4", 2, slide_metrics(rng, 0.2)))
    write_results(results_dir / "ci" / "results.jsonl", rows)
    problems = check_leaderboard(results_dir, out)
    assert sorted(p.split(":")[0] for p in problems) == sorted(FILES.values())

    build_leaderboard(results_dir, out)
    paths["tex"].unlink()
    assert check_leaderboard(results_dir, out) == [
        f"leaderboard.tex: missing from {out} (run `stbench leaderboard`)"
    ]


def test_headers_state_protocol_gene_set_convention_weights_and_n(tmp_path: Path) -> None:
    rows = result_rows() + result_rows(seed=1, dataset="cscc", protocol="lopo", gene_set="top-var n=50")
    write_results(tmp_path / "r" / "results.jsonl", rows)
    paths = build_leaderboard(tmp_path / "r", tmp_path / "out")
    md = paths["md"].read_text()
    sections = md.split("\n## ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        "cscc · lopo · top-var n=50 · target unrecorded · folds B4, C2, C3",
        f"her2st · loso · {GENE_SET} · target unrecorded · folds B4, C2, C3",
    ]
    for s, (dataset, protocol, gene_set) in zip(
        sections, [("cscc", "lopo", "top-var n=50"), ("her2st", "loso", GENE_SET)], strict=True
    ):
        assert f"- **Protocol:** `{protocol}` on dataset `{dataset}`" in s
        assert f"- **Gene set:** `{gene_set}`" in s
        assert "- **Target:** `unrecorded`" in s and "- **Folds:** 3 folds: `B4`, `C2`, `C3`." in s
        assert f"- **PCC convention:** `pcc` (per slide, gene-wise): {PCC_CONVENTION}." in s
        assert "`pcc50`: the same on k genes FIXED before testing" in s
        assert "`pcc50_posthoc`: POST-HOC" in s
        assert "- **Weights:** per row, column `weights`" in s
        assert "- **n:** 3 folds × 2 seeds" in s
        table = {r[1]: r for r in _section_rows(s)}
        assert table["patch-cnn"][2] == "none (random init)"
        assert table["uni-ridge"][2] == "hf:MahmoodLab/UNI"
        assert table["mean"][0] == "ref" and table["mean"][-3:] == ["3 × 2", "6", "reference"]
    tex = paths["tex"].read_text()
    assert tex.count("\\begin{table}") == 2 and "\\textbf{Protocol:} \\texttt{loso}" in tex
    assert "none (random init)" in tex and "\\textbf{PCC convention:}" in tex
    html = paths["html"].read_text()
    assert html.count("<dt>PCC convention</dt>") == 2 and html.count("none (random init)") >= 4


def test_rows_sorted_by_pcc_and_null_metric_shows_na_with_footnote(results_dir: Path, tmp_path: Path) -> None:
    paths = build_leaderboard(results_dir, tmp_path / "out")
    md = paths["md"].read_text()
    table = _section_rows(md)
    assert [(r[0], r[1]) for r in table] == [("1", "uni-ridge"), ("2", "patch-cnn"), ("ref", "mean")]
    header = next(line for line in md.splitlines() if line.startswith("| #"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    mean = dict(zip(cols, table[2], strict=True))
    assert mean["pcc"] == "n/a [1]" and mean["pcc50"] == "n/a [2]" and mean["pcc50_posthoc"] == "n/a [3]"
    assert mean["mse"][0].isdigit() or mean["mse"].startswith("**")  # defined metrics stay numbers
    assert (
        "- [1] mean, weights none (random init): `pcc` has no value in 6 of 6 rows "
        "(all 50 genes constant in prediction). A constant predictor has no gene-wise correlation" in md
    )
    best = dict(zip(cols, table[0], strict=True))
    assert best["pcc"].startswith("**") and "±" in best["pcc"]  # best in column is bold
    assert "n/a\\textsuperscript{1}" in paths["tex"].read_text()
    assert "n/a<sup>[1]</sup>" in paths["html"].read_text()


def test_csv_carries_every_metric_mean_and_sd(results_dir: Path, tmp_path: Path) -> None:
    paths = build_leaderboard(results_dir, tmp_path / "out")
    table = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    rows = result_rows()
    agg = aggregate(rows).set_index("method")
    assert [r["method"] for r in table] == ["uni-ridge", "patch-cnn", "mean"]
    for r in table:
        for key in ("pcc", "pcc50", "pcc50_posthoc", "mse", "mae"):
            for stat in ("mean", "sd"):
                expected = agg.loc[r["method"], f"{key}_{stat}"]
                if math.isnan(expected):
                    assert r[f"{key}_{stat}"] == ""
                else:
                    assert float(r[f"{key}_{stat}"]) == pytest.approx(expected, abs=1e-6)
        assert len(r["job_ids"].split(";")) == int(r["n_rows"]) == 6
    assert table[2]["pcc_null"] == "6" and table[2]["weights_label"] == "none (random init)"
    assert [(r["rank"], r["kind"]) for r in table] == [("1", "method"), ("2", "method"), ("", "reference")]


# ---- reading rows ------------------------------------------------------------------------------------
GOOD = [r for r in result_rows()[:2]]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"schema": 1, "job_id": ', "not valid JSON"),
        (json.dumps({k: v for k, v in GOOD[0].items() if k != "seed"} | {"job_id": "x"}), "'seed'"),
        (json.dumps(GOOD[0] | {"job_id": "x", "schema": 2}), "'schema' must be 1"),
        (
            json.dumps(GOOD[0] | {"job_id": "x", "metrics": {"pcc": "0.3"}}),
            "metrics.pcc must be a number or null",
        ),
        (json.dumps(GOOD[0] | {"job_id": "x", "metrics": {"pcc": float("nan")}}), "NaN is not allowed"),
        (json.dumps(GOOD[0] | {"job_id": "x", "weights": ""}), "'weights'"),
        (json.dumps(GOOD[1]), "appears twice"),
    ],
)
def test_malformed_row_error_names_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "ci" / "results.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps(GOOD[0]) + "\n\n" + json.dumps(GOOD[1]) + "\n" + bad_line + "\n")
    with pytest.raises(ResultRowError) as err:
        read_rows([path])
    assert str(err.value).startswith(f"{path}:4: ") and message in str(err.value)
    assert err.value.line == 4 and err.value.file == str(path)
    with pytest.raises(ResultRowError, match=r"results\.jsonl:4: "):
        build_leaderboard(tmp_path, tmp_path / "out")


def test_no_results_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no results.jsonl"):
        build_leaderboard(tmp_path, tmp_path / "out")


def test_image_generation_rows_get_their_own_table_with_fid_and_oracle_columns(tmp_path: Path) -> None:
    """Rows of task "image" (STMDiT) never share a table with expression rows of the same dataset,
    protocol and gene set; their table ranks FID lower-is-better and shows the encoders used."""
    image = []
    for method, fid in (("stmdit", 60.0), ("pixcell", 70.0)):
        row = make_row(method, "none", "B4", 0, {"fid_uni": fid + 1, "oracle_auc": 0.01})
        if method == "stmdit":
            row["metrics"].update(fid_uni_ge=fid, fid_delta=-1.0)
        row.update(
            task="image",
            job_id=row["job_id"] + "-img",
            per_slide={},
            image_metrics={"fid_encoder": "resnet18@random-init", "oracle_encoder": "uni2-h@random-init"},
        )
        image.append(row)
    write_results(tmp_path / "r" / "results.jsonl", result_rows() + image)
    md = build_leaderboard(tmp_path / "r", tmp_path / "out")["md"].read_text()
    sections = md.split("\n## ")[1:]
    titles = [s.splitlines()[0] for s in sections]
    assert titles == [
        f"her2st · loso · {GENE_SET} · target unrecorded · folds B4, C2, C3",
        f"her2st · loso · {GENE_SET} · target unrecorded · fold B4 · image generation",
    ]
    expr, img = sections
    assert "fid_uni" not in expr and "pcc" not in img.split("| # |")[1].splitlines()[0]
    table = {r[1]: r for r in _section_rows(img)}
    assert table["stmdit"][3] == "60.000" and table["pixcell"][3] == "—"  # fid_uni_ge: one value, no bold
    assert table["stmdit"][4] == "**61.000**" and table["pixcell"][4] == "71.000"
    assert table["stmdit"][-1] == "resnet18@random-init / uni2-h@random-init"
