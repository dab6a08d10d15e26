"""Every committed suite parses against the registry, and the issue-5 baselines, the generative and the image
generation methods are in the CI suite (tiny configs) and in the paper suites whose tables they belong to."""

from __future__ import annotations

from pathlib import Path

import pytest

from stbench.benchmark.suite import load_suite

SUITES = Path(__file__).resolve().parents[1] / "benchmarks" / "suites"
ISSUE5 = ("stnet", "deepspace", "histogene", "hist2st", "bleep", "triplex", "merge", "deepspot")
GENERATIVE = ("hinge", "stem", "stflow")
TWO_STAGE = ("diffbulk",)


def _methods(suite, config: str | None = None) -> set[str]:
    return {m for e in suite.grid for m in e.methods if config is None or e.config_for(m) == config}


@pytest.mark.parametrize("path", sorted(SUITES.glob("*.yaml")), ids=lambda p: p.name)
def test_suite_parses(path: Path) -> None:
    suite = load_suite(path)
    assert suite.grid and suite.name == path.stem


def test_ci_suite_runs_every_baseline_tiny() -> None:
    ci = load_suite(SUITES / "ci.yaml")
    assert set(ISSUE5) | set(GENERATIVE) | set(TWO_STAGE) <= _methods(ci, "tiny")
    assert "diffbulk" in _methods(ci, "ablations/fm_only")  # the FM-branch-only ablation beside it


def test_paper_suites_hold_their_tables_rows() -> None:
    hinge = load_suite(SUITES / "hinge-table1.yaml")
    assert {"stnet", "bleep", "triplex", "merge", *GENERATIVE} <= _methods(hinge, "paper")
    assert {e.protocols for e in hinge.grid} == {("hinge",)}
    diffbulk = load_suite(SUITES / "diffbulk-table1.yaml")
    assert {"stnet", "deepspace", "histogene", "bleep", "diffbulk"} <= _methods(diffbulk, "paper")
    assert {"probe-ridge", "finetune"} <= _methods(diffbulk)
    assert {e.protocols for e in diffbulk.grid} == {("diffbulk",)}


def test_image_generation_suites_hold_stmdit_and_its_baselines() -> None:
    ci = load_suite(SUITES / "ci.yaml")
    assert "stmdit" in _methods(ci, "tiny") and "pixcell" in _methods(ci, "pixcell_tiny")
    tables = load_suite(SUITES / "stmdit-tables.yaml")
    assert {e.protocols for e in tables.grid} == {("stmdit",)}
    assert _methods(tables, "paper") == {"stmdit"}
    configs = {e.config_for(m) for e in tables.grid for m in e.methods}
    assert {"pixcell_b", "pixcell_flow_b", "pixcell_pretrained_xl", "adaln_ddpm", "xattn_pma"} <= configs
