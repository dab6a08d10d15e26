"""Leaderboard sections are comparable: one (dataset, protocol, gene set, target, fold set) each, so
rows on other folds or targets are never ranked together; references (`mean`, `depth`) are shown on
each section's folds but never ranked, bold or tested; `pcc − depth` is the hand-computed difference;
HEST-Bench sections rank by `pcc_pooled`. All on small hand-made rows."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from scipy import stats

from stbench.benchmark.leaderboard import build_leaderboard, build_sections, check_leaderboard
from stbench.benchmark.results import read_rows, row_kind, validate_row
from tests.fixtures.result_rows import make_row, write_results

FOLDS3 = ("B4", "C2", "C3")
CI_ROWS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "ci" / "results.jsonl"


def row(method: str, fold: str, pcc: float | None, *, seed: int = 0, **fields: Any) -> dict[str, Any]:
    """One result row; `fields` set top-level fields (target, kind, protocol) or, prefixed `m_`, metrics."""
    metrics: dict[str, Any] = {"pcc": pcc, "pcc_n": 0 if pcc is None else 50, "mse": 1.0 - (pcc or 0.0)}
    metrics.update({k[2:]: v for k, v in fields.items() if k.startswith("m_")})
    top = {k: v for k, v in fields.items() if not k.startswith("m_")}
    protocol = top.pop("protocol", "loso")
    r = make_row(method, "none", fold, seed, metrics, protocol=protocol)
    r.update({"target": "log1p", **top})
    r["job_id"] += f"__{r['target']}"
    return r


def runs(method: str, values: dict[str, float | None], **fields: Any) -> list[dict[str, Any]]:
    return [row(method, f, v, **fields) for f, v in values.items()]


def _board(tmp_path: Path, rows: list[dict[str, Any]]) -> dict[str, str]:
    write_results(tmp_path / "r" / "results.jsonl", rows)
    paths = build_leaderboard(tmp_path / "r", tmp_path / "out")
    return {k: p.read_text() for k, p in paths.items()}


def _md_tables(md: str) -> dict[str, list[dict[str, str]]]:
    """Section title -> table rows as {column: cell}."""
    out = {}
    for block in md.split("\n## ")[1:]:
        lines = block.splitlines()
        head = next(line for line in lines if line.startswith("| #"))
        cols = [c.strip() for c in head.strip("|").split("|")]
        body = [line for line in lines if line.startswith("| ") and not line.startswith("| #")]
        cells = [[c.strip() for c in line.strip("|").split("|")] for line in body]
        out[lines[0]] = [dict(zip(cols, c, strict=True)) for c in cells]
    return out


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# ---- fold sets ------------------------------------------------------------------------------------------
def test_a_method_on_a_subset_of_folds_gets_its_own_section(tmp_path: Path) -> None:
    rows = (
        runs("alpha", dict(zip(FOLDS3, (0.50, 0.40, 0.45), strict=True)))
        + runs("beta", dict(zip(FOLDS3, (0.30, 0.35, 0.25), strict=True)))
        + runs("gamma", {"B4": 0.90})  # best number, on the easiest slide only
    )
    board = _board(tmp_path, rows)
    tables = _md_tables(board["md"])
    assert list(tables) == [
        "her2st · loso · " + rows[0]["gene_set"] + " · target log1p · folds B4, C2, C3",
        "her2st · loso · " + rows[0]["gene_set"] + " · target log1p · fold B4",
    ]
    three, one = tables.values()
    assert [(r["#"], r["method"]) for r in three] == [("1", "alpha"), ("2", "beta")]
    assert [(r["#"], r["method"], r["pcc vs best"]) for r in one] == [("1", "gamma", "best")]
    assert "- **Folds:** 1 fold: `B4`. Every row of this section ran exactly these folds" in board["md"]
    csv_rows = _csv(board["csv"])
    assert {r["section"]: r["folds"] for r in csv_rows if r["method"] == "gamma"} == {"t2": "B4"}
    assert [r["rank"] for r in csv_rows] == ["1", "2", "1"]


def test_sections_are_split_by_target(tmp_path: Path) -> None:
    rows = runs("alpha", {"B4": 0.5, "C2": 0.6}) + runs(
        "alpha", {"B4": 0.2, "C2": 0.3}, target="normalize_log1p"
    )
    board = _board(tmp_path, rows)
    tables = _md_tables(board["md"])
    assert [t.split(" · ")[3] for t in tables] == ["target log1p", "target normalize_log1p"]
    assert all(len(t) == 1 and t[0]["#"] == "1" for t in tables.values())  # each ranked alone
    assert "- **Target:** `normalize_log1p`: ln(1 + x · target_sum / total)" in board["md"]
    assert sorted(r["target"] for r in _csv(board["csv"])) == ["log1p", "normalize_log1p"]


def test_every_sections_ranked_rows_share_one_folds_value(tmp_path: Path) -> None:
    rows = (
        runs("alpha", dict.fromkeys(FOLDS3, 0.4))
        + runs("beta", {"B4": 0.5, "C2": 0.5})
        + runs("gamma", {"C2": 0.5, "C3": 0.5})  # as many folds as beta, other folds
        + runs("depth", dict.fromkeys(FOLDS3, 0.7))
        + runs("mean", dict.fromkeys(FOLDS3, None))
    )
    table = _csv(_board(tmp_path, rows)["csv"])
    by_section: dict[str, set[str]] = {}
    for r in table:
        by_section.setdefault(r["section"], set()).add(r["folds"])
    assert len(by_section) == 3 and all(len(f) == 1 for f in by_section.values())
    assert sorted(f for (f,) in by_section.values()) == ["B4;C2", "B4;C2;C3", "C2;C3"]
    # references appear in every section, on that section's folds
    assert sorted(r["section"] for r in table if r["method"] == "depth") == ["t1", "t2", "t3"]


def test_committed_ci_rows_give_comparable_sections(tmp_path: Path) -> None:
    """`stbench leaderboard` works on the committed rows: one folds value per section, reference rows
    unranked, and --check passes on what it wrote."""
    out = tmp_path / "board"
    paths = build_leaderboard(CI_ROWS, out)
    assert check_leaderboard(CI_ROWS, out) == []
    table = _csv(paths["csv"].read_text())
    for section in {r["section"] for r in table}:
        assert len({r["folds"] for r in table if r["section"] == section}) == 1, section
    assert {r["rank"] for r in table if r["kind"] == "reference"} == {""}
    assert {r["method"] for r in table if r["kind"] == "reference"} == {"mean", "depth"}


def test_long_fold_lists_and_reference_only_sections(tmp_path: Path) -> None:
    seven = [f"S{i}" for i in range(7)]
    rows = runs("alpha", dict.fromkeys(seven, 0.4)) + runs("depth", {"Z9": 0.7})  # no method on Z9
    board = _board(tmp_path, rows)
    titles = list(_md_tables(board["md"]))
    assert [t.split(" · ")[-1] for t in titles] == ["7 folds", "fold Z9"]
    assert "- **Folds:** 7 folds: " + ", ".join(f"`{f}`" for f in seven) + "." in board["md"]
    assert [r["#"] for r in _md_tables(board["md"])[titles[1]]] == ["ref"]


# ---- references ------------------------------------------------------------------------------------------
def test_references_are_never_ranked_bold_or_tested(tmp_path: Path) -> None:
    best = dict(zip(FOLDS3, (0.80, 0.85, 0.75), strict=True))  # above every method, lowest mse
    rows = (
        runs("alpha", dict(zip(FOLDS3, (0.50, 0.40, 0.45), strict=True)))
        + runs("beta", dict(zip(FOLDS3, (0.30, 0.35, 0.25), strict=True)))
        + runs("depth", best)
        + runs("oracle", best, kind="reference")  # declared reference under another name
    )
    board = _board(tmp_path, rows)
    (table,) = _md_tables(board["md"]).values()
    assert [(r["#"], r["method"]) for r in table] == [
        ("1", "alpha"),
        ("2", "beta"),
        ("ref", "depth"),
        ("ref", "oracle"),
    ]
    for r in table[2:]:
        assert not any(c.startswith("**") for c in r.values()), r
        assert r["pcc vs best"] == "reference"
    assert table[0]["pcc"].startswith("**") and table[0]["mse"].startswith("**")  # bold among methods
    assert table[0]["pcc vs best"] == "best"
    expected = stats.wilcoxon([0.50, 0.40, 0.45], [0.30, 0.35, 0.25], alternative="greater").pvalue
    assert table[1]["pcc vs best"] == f"p = {expected:.3g} ns"
    csv_rows = {r["method"]: r for r in _csv(board["csv"])}
    for name in ("depth", "oracle"):
        r = csv_rows[name]
        assert (r["kind"], r["rank"], r["mark_vs_best"], r["p_vs_best"]) == ("reference", "", "", "")
    assert csv_rows["alpha"]["mark_vs_best"] == "best" and csv_rows["beta"]["kind"] == "method"
    assert "\\textbf{ref}" not in board["tex"] and "\nref & depth" in board["tex"]
    assert board["html"].count('<tr class="ref">') == 2
    assert '<tr class="ref"><td>ref</td><td class="l">depth</td>' in board["html"]


def test_kind_defaults_for_old_rows_and_is_validated() -> None:
    assert row_kind({"method": "mean"}) == row_kind({"method": "depth"}) == "reference"
    assert row_kind({"method": "patch-cnn"}) == "method"
    assert row_kind({"method": "depth", "kind": "method"}) == "method"  # a declared kind wins
    with pytest.raises(ValueError, match="'kind' must be one of"):
        validate_row(row("alpha", "B4", 0.5, kind="baseline"))
    with pytest.raises(ValueError, match="'target' must be a non-empty string"):
        validate_row(row("alpha", "B4", 0.5, target=""))


def test_pcc_minus_depth_is_the_difference_on_the_sections_folds(tmp_path: Path) -> None:
    rows = (
        runs("alpha", dict(zip(FOLDS3, (0.50, 0.55, 0.45), strict=True)))
        + runs("eta", dict.fromkeys(FOLDS3, 0.30))
        + runs("gamma", {"B4": 0.90})
        + runs("depth", dict(zip(FOLDS3, (0.75, 0.60, 0.80), strict=True)))
        + runs("beta", {"C4": 0.3})  # no depth row on C4
    )
    board = _board(tmp_path, rows)
    three, one, other = _md_tables(board["md"]).values()
    assert three[0]["pcc − depth"] == "**-0.217**"  # 0.5 - 0.7167 (depth over B4, C2, C3), best method
    assert three[1]["pcc − depth"] == "-0.417"
    assert three[2]["method"] == "depth" and three[2]["pcc − depth"] == "0.000"
    assert one[0]["pcc − depth"] == "0.150"  # 0.90 - 0.75: depth on B4 only
    assert one[1]["pcc"] == "0.750"  # the reference is aggregated over the section's folds
    assert other == [other[0]] and other[0]["pcc − depth"] == "—"
    assert "`pcc − depth` is empty: no `depth` row on these folds." in board["md"]
    delta = {(r["section"], r["method"]): r["pcc_minus_depth"] for r in _csv(board["csv"])}
    assert float(delta[("t1", "alpha")]) == pytest.approx(0.5 - (0.75 + 0.60 + 0.80) / 3, abs=1e-6)
    assert float(delta[("t2", "gamma")]) == pytest.approx(0.15, abs=1e-6)
    assert delta[("t3", "beta")] == ""


def test_pcc_partial_is_a_column_when_rows_carry_it(tmp_path: Path) -> None:
    rows = runs("alpha", {"B4": 0.5, "C2": 0.7}, m_pcc_partial=0.1) + runs(
        "depth", {"B4": 0.6, "C2": 0.6}, m_pcc_partial=0.0
    )
    board = _board(tmp_path, rows)
    header = next(line for line in board["md"].splitlines() if line.startswith("| #"))
    assert "| pcc | pcc − depth | pcc_partial |" in header
    (table,) = _md_tables(board["md"]).values()
    assert table[0]["pcc_partial"] == "0.100 ± 0.000" and table[1]["pcc_partial"] == "0.000 ± 0.000"
    assert _csv(board["csv"])[0]["pcc_partial_mean"] == "0.100000"
    assert "pcc_partial" not in _board(tmp_path / "b", runs("alpha", {"B4": 0.5}))["md"]


# ---- HEST-Bench ----------------------------------------------------------------------------------------------
def test_hest_sections_rank_by_pooled_pcc(tmp_path: Path) -> None:
    folds = ("f0", "f1", "f2")
    # alpha has the better per-slide pcc, beta the better pooled pcc: the pooled one ranks
    rows = runs("alpha", dict.fromkeys(folds, 0.6), protocol="hest", m_pcc_pooled=0.40) + [
        row("beta", f, 0.5, protocol="hest", m_pcc_pooled=p)
        for f, p in zip(folds, (0.50, 0.55, 0.45), strict=True)
    ]
    board = _board(tmp_path, rows)
    header = next(line for line in board["md"].splitlines() if line.startswith("| #"))
    assert header.startswith("| # | method | weights | pcc_pooled | pcc | pcc − depth |")
    assert header.endswith("| pcc_pooled vs best |")
    (table,) = _md_tables(board["md"]).values()
    assert [(r["#"], r["method"]) for r in table] == [("1", "beta"), ("2", "alpha")]
    assert table[0]["pcc_pooled"] == "**0.500 ± 0.050**" and table[0]["pcc_pooled vs best"] == "best"
    expected = stats.wilcoxon([0.50, 0.55, 0.45], [0.40] * 3, alternative="greater").pvalue
    assert table[1]["pcc_pooled vs best"] == f"p = {expected:.3g} ns"  # paired per fold
    assert "- **Ranking:** by mean `pcc_pooled`, methods only." in board["md"]
    assert [r["headline"] for r in _csv(board["csv"])] == ["pcc_pooled", "pcc_pooled"]


def test_sections_are_deterministic(tmp_path: Path) -> None:
    rows = runs("alpha", dict.fromkeys(FOLDS3, 0.4)) + runs("depth", dict.fromkeys(FOLDS3, 0.7))
    write_results(tmp_path / "a.jsonl", rows)
    write_results(tmp_path / "b.jsonl", rows[::-1])
    titles = [[s.title for s in build_sections(read_rows([tmp_path / n]))] for n in ("a.jsonl", "b.jsonl")]
    assert titles[0] == titles[1]
    a, b = (_board(tmp_path / n, json.loads(json.dumps(r))) for n, r in (("x", rows), ("y", rows[::-1])))
    assert a["md"].split("Sources:")[1].split("\n", 1)[1] == b["md"].split("Sources:")[1].split("\n", 1)[1]
    assert a["csv"] == b["csv"]


def test_run_summary_marks_references_and_shows_pcc_partial() -> None:
    from stbench.benchmark.summary import summary_rows

    rows = runs("alpha", {"B4": 0.5, "C2": 0.7}, m_pcc_partial=0.1) + runs(
        "depth", {"B4": 0.6}, m_pcc_partial=0.0
    )
    out = summary_rows(rows)
    assert [r["method"] for r in out] == ["alpha", "alpha", "depth (reference)", "alpha", "depth (reference)"]
    assert out[0]["pcc_partial"] == "0.100" and "pcc_pooled" not in out[0]
    assert out[3]["pcc"] == "0.600 ± 0.141"
