"""`stbench run --method hinge --dataset cscc` end to end on a cSCC folder in the GEO layout
(GSE144240: GSM-prefixed stdata, spot selection and H&E jpg per section), through the CLI: data
prepare, the `hinge` protocol (no evaluation pool on cSCC, so leave-one-slice-out), the tiny config,
one fold. The row must name the protocol's genes, targets and metrics and say no pretrained weights
ran."""

from __future__ import annotations

import json
from pathlib import Path

from stbench.cli import main
from tests.fixtures.cscc_layout import write_cscc


def test_hinge_runs_on_cscc_in_the_geo_layout(tmp_path: Path) -> None:
    source = tmp_path / "GSE144240"
    write_cscc(source, n_genes=16, image_size=(420, 420))
    root, out = tmp_path / "data", tmp_path / "out"
    assert main(["data", "prepare", "cscc", "--source", str(source), "--data-root", str(root)]) == 0
    rc = main(
        ["run", "--method", "hinge", "--dataset", "cscc", "--protocol", "hinge", "--config", "tiny",
         "--folds+", "P2_ST_rep1", "--seeds+", "0", "--data-root", str(root), "--output", str(out),
         "--trainer.max_epochs", "2"]
    )  # fmt: skip
    assert rc == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert (row["method"], row["dataset"], row["protocol"], row["fold"]) == (
        "hinge",
        "cscc",
        "hinge",
        "P2_ST_rep1",
    )
    assert row["test_slides"] == ["P2_ST_rep1"]
    assert row["gene_set"].startswith("hmhvg") and row["n_genes"] >= 10
    assert "none" in row["weights"], row["weights"]  # random-init backbone and encoder, labelled
    m = row["metrics"]
    assert m["mse"] is not None and m["mae"] is not None and m["pcc"] is not None  # < 50 genes: no pcc50
    pred = out / "jobs" / row["job_id"] / "predictions"
    assert (pred / "P2_ST_rep1.h5ad").exists()


def test_hinge_protocol_picks_genes_inside_the_backbone_vocabulary(tmp_path: Path) -> None:
    """With a vocabulary file, the runner hands its symbols to the DataModule and the `hinge`
    protocol selects HMHVG genes among them only (on training slides)."""
    import stbench.benchmark.runner as runner
    from baselines.hinge.method import Hinge

    source = tmp_path / "GSE144240"
    write_cscc(source, n_genes=16, image_size=(420, 420))
    root = tmp_path / "data"
    assert main(["data", "prepare", "cscc", "--source", str(source), "--data-root", str(root)]) == 0
    vocab = tmp_path / "gene_info.csv"
    vocab.write_text("gene_name\n" + "".join(f"GENE{i}\n" for i in (1, 2, 3, 5, 8)))
    assert Hinge.gene_vocabulary({"vocab": str(vocab)}) == ["GENE1", "GENE2", "GENE3", "GENE5", "GENE8"]
    assert Hinge.gene_vocabulary({"backbone": "cellfm", "size": "tiny"}) is None
    import stbench.data.datamodule as dmod

    seen: dict[str, list[str]] = {}

    original = dmod.STDataModule.setup

    def spy(self, stage=None):
        original(self, stage)
        seen["genes"] = list(self.genes)

    dmod.STDataModule.setup = spy
    try:
        jobs = runner.expand_jobs(
            "hinge", "cscc", protocol="hinge", folds=["P2_ST_rep1"], seeds=[0], config="tiny",
            overrides={"method": {"vocab": str(vocab)}, "trainer": {"max_epochs": 1}}, data_root=str(root),
        )  # fmt: skip
        runner.run_jobs(jobs, tmp_path / "out")
    finally:
        dmod.STDataModule.setup = original
    assert seen["genes"] and set(seen["genes"]) <= {"GENE1", "GENE2", "GENE3", "GENE5", "GENE8"}
