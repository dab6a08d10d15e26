"""Protocol `hest` on a HEST-Bench task copy: folds from its split CSVs, genes from its shipped list."""

from __future__ import annotations

import json
from pathlib import Path

from stbench.benchmark.runner import expand_jobs, run_jobs
from stbench.data.prepare import prepare
from tests.fixtures.hest_layout import SAMPLES, write_hest


def test_hest_protocol_uses_the_tasks_splits_and_gene_list(tmp_path: Path) -> None:
    ids = tuple(SAMPLES)[:3]
    src = tmp_path / "task"
    write_hest(src, ids=ids, n_genes=10)
    (src / "splits").mkdir()
    for i, test in enumerate(ids[:2]):
        (src / "splits" / f"train_{i}.csv").write_text(
            "sample_id\n" + "\n".join(s for s in ids if s != test) + "\n"
        )
        (src / "splits" / f"test_{i}.csv").write_text(f"sample_id\n{test}\n")
    (src / "var_50genes.json").write_text(json.dumps({"genes": ["G3", "G1", "G5"]}))
    prepare("hest-bench-idc", tmp_path / "data", src)

    jobs = expand_jobs("mean", "hest-bench-idc", protocol="hest", data_root=str(tmp_path / "data"))
    assert [j.fold for j in jobs] == ["split-0", "split-1"]
    rows = run_jobs(jobs, tmp_path / "out")
    for row, test in zip(rows, ids[:2], strict=True):
        assert row["test_slides"] == [test] and test not in row["train_slides"]
        assert row["gene_set"].startswith("list") and row["n_genes"] == 3
        panel = json.loads((tmp_path / "out" / "jobs" / row["job_id"] / "gene_panel.json").read_text())
        assert sorted(panel["genes"]) == ["G1", "G3", "G5"] and row["target"] == "log1p"
