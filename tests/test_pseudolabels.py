"""Pseudo-labels (STMDiT PTPL): stacking a fake leave-one-slide-out run's test predictions into one
file, refusals (slide predicted twice, gene panels that differ, nothing matching, leakage), and
lookups whose errors name the file, the slide and the field."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from stbench.benchmark.pseudolabels import collect_pseudolabels
from stbench.data.pseudolabels import (
    KIND,
    UNS_KEY,
    PseudoLabels,
    spot_key,
    write_pseudolabels,
)
from stbench.errors import DataError, LeakageError
from stbench.utils.io import sha256_file
from tests.fixtures.stbench_run_layout import FakeJob, loso_jobs, write_run

SLIDES = ["A1", "B1", "C1"]


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """LOSO deepspot run on three slides (different spot counts) plus an unrelated method's job."""
    jobs = loso_jobs(SLIDES, spot_ids={"B1": ["x", "y", "z"]})
    other = FakeJob(fold="A1", test_slides=["A1"], all_slides=SLIDES, method="stnet")
    return write_run(tmp_path / "run", [*jobs, other])


def test_round_trip_stacks_each_slide_from_its_held_out_job(run: Path, tmp_path: Path) -> None:
    out = collect_pseudolabels(run, "deepspot", "tupro", out=tmp_path / "pl.h5ad")
    a = ad.read_h5ad(out)
    assert a.shape == (6 + 3 + 6, 4) and a.X.dtype == np.float32
    assert list(a.var_names) == ["G0", "G1", "G2", "G3"]
    assert a.obs_names[:2].tolist() == ["A1/s0", "A1/s1"] and "B1/x" in a.obs_names
    assert set(a.obs.columns) >= {"slide", "spot_id", "job_id", "fold"}
    info = a.uns[UNS_KEY]
    assert info["kind"] == KIND == "out-of-fold predictions" and "held it out" in info["note"]
    assert info["method"] == "deepspot" and info["target"] == "log1p"
    jobs = {j.fold: j for j in loso_jobs(SLIDES, spot_ids={"B1": ["x", "y", "z"]})}
    assert set(info["jobs"]) == {j.job_id for j in jobs.values()}
    for slide, job in jobs.items():
        rows = (a.obs["slide"] == slide).to_numpy()
        # every slide comes from the job that held it out, values unchanged
        assert set(a.obs.loc[rows, "job_id"]) == {job.job_id} and set(a.obs.loc[rows, "fold"]) == {slide}
        np.testing.assert_array_equal(a.X[rows], job.prediction(slide))
        assert list(info["jobs"][job.job_id]["test_slides"]) == [slide]

    pl = PseudoLabels.load(out)
    assert pl.slides == SLIDES and pl.genes == ["G0", "G1", "G2", "G3"]
    assert pl.source == f"pseudolabels:deepspot@{sha256_file(out)[:12]}"
    got = pl.lookup(["B1", "A1", "B1"], ["z", "s3", "x"], ["G2", "G0"])
    b1, a1 = jobs["B1"].prediction("B1"), jobs["A1"].prediction("A1")
    assert got.dtype == np.float32 and got.shape == (3, 2)
    np.testing.assert_array_equal(got, np.array([b1[2, [2, 0]], a1[3, [2, 0]], b1[0, [2, 0]]]))
    assert pl.lookup([], [], ["G1"]).shape == (0, 1)


def test_default_out_and_atomic_write(run: Path) -> None:
    out = collect_pseudolabels(run, "deepspot", "tupro", protocol="loso", seed=0)
    assert out == run / "pseudolabels" / "deepspot__tupro.h5ad" and out.is_file()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_slide_predicted_twice_is_refused_until_a_seed_is_picked(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [*loso_jobs(SLIDES, seed=0), *loso_jobs(SLIDES, seed=1)])
    with pytest.raises(DataError) as exc:
        collect_pseudolabels(run, "deepspot", "tupro", out=tmp_path / "pl.h5ad")
    e = exc.value
    assert e.slide == "A1" and e.field == "test_slides" and e.file == str(run / "results.jsonl")
    assert "predicted by 2 jobs" in e.problem and "3 slide(s)" in e.problem
    assert "--seed (here: [0, 1])" in e.problem and "--protocol" in e.problem
    assert not (tmp_path / "pl.h5ad").exists()
    out = collect_pseudolabels(run, "deepspot", "tupro", seed=1, out=tmp_path / "pl.h5ad")
    assert set(PseudoLabels.load(out).obs["job_id"].str.contains("__s1__")) == {True}


def test_gene_panel_mismatch_names_both_jobs(tmp_path: Path) -> None:
    jobs = loso_jobs(SLIDES)
    jobs[2].genes = ("G0", "G1", "G2", "OTHER")
    run = write_run(tmp_path / "run", jobs)
    with pytest.raises(DataError) as exc:
        collect_pseudolabels(run, "deepspot", "tupro", out=tmp_path / "pl.h5ad")
    e = exc.value
    assert e.field == "var" and e.slide == "C1"
    assert e.file == str(run / "jobs" / jobs[2].job_id / "predictions" / "C1.h5ad")
    assert jobs[0].job_id in e.problem and jobs[2].job_id in e.problem
    assert "['OTHER']" in e.problem and "['G3']" in e.problem and "Cannot stack" in e.problem


def test_same_panel_in_another_order_is_reordered(tmp_path: Path) -> None:
    jobs = loso_jobs(SLIDES)
    jobs[1].genes = ("G3", "G2", "G1", "G0")
    run = write_run(tmp_path / "run", jobs)
    pl = PseudoLabels.load(collect_pseudolabels(run, "deepspot", "tupro", out=tmp_path / "pl.h5ad"))
    np.testing.assert_array_equal(
        pl.lookup(["B1"] * 6, [f"s{i}" for i in range(6)], ["G0", "G3"]), jobs[1].prediction("B1")[:, [3, 0]]
    )


def test_nothing_matching_is_refused(run: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no finished job matches \(method 'deepspot', dataset 'her2st'\)"):
        collect_pseudolabels(run, "deepspot", "her2st")
    with pytest.raises(DataError, match="protocol 'hinge', seed 3"):
        collect_pseudolabels(run, "deepspot", "tupro", protocol="hinge", seed=3)
    with pytest.raises(DataError) as exc:
        collect_pseudolabels(tmp_path / "empty", "deepspot", "tupro")
    assert exc.value.field == "results" and exc.value.file.endswith("results.jsonl")


def test_missing_prediction_file_and_target_mix_are_refused(tmp_path: Path) -> None:
    jobs = loso_jobs(SLIDES)
    run = write_run(tmp_path / "run", jobs)
    (run / "jobs" / jobs[1].job_id / "predictions" / "B1.h5ad").unlink()
    with pytest.raises(DataError) as exc:
        collect_pseudolabels(run, "deepspot", "tupro")
    assert exc.value.slide == "B1" and exc.value.field == "predictions"

    mixed = loso_jobs(SLIDES)
    mixed[0].target = "log2p1"
    run2 = write_run(tmp_path / "run2", mixed)
    with pytest.raises(DataError, match="different target spaces") as exc:
        collect_pseudolabels(run2, "deepspot", "tupro")
    assert exc.value.field == "target"


def test_a_job_that_trained_on_its_test_slide_is_leakage(tmp_path: Path) -> None:
    job = FakeJob(fold="A1", test_slides=["A1"], all_slides=SLIDES)
    row = job.row()
    run = write_run(tmp_path / "run", [job])
    row["train_slides"] = SLIDES
    import json

    (run / "results.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(LeakageError, match=r"trained on its test slide\(s\) \['A1'\]"):
        collect_pseudolabels(run, "deepspot", "tupro")


@pytest.fixture
def labels(run: Path, tmp_path: Path) -> PseudoLabels:
    return PseudoLabels.load(collect_pseudolabels(run, "deepspot", "tupro", out=tmp_path / "pl.h5ad"))


def test_missing_spots_name_file_slide_and_field(labels: PseudoLabels) -> None:
    ids = ["s0", "s1", "gone1", "gone2", "gone3"]
    with pytest.raises(DataError) as exc:
        labels.lookup(["A1"] * 5, ids, ["G0"])
    e = exc.value
    assert (e.file, e.slide, e.field) == (str(labels.path), "A1", "obs_names")
    assert "3 of 5 requested spot(s)" in e.problem and "['gone1', 'gone2', 'gone3']" in e.problem

    with pytest.raises(DataError) as exc:
        labels.lookup(["A1", "Z9"], ["bad", "s0"], ["G0"])
    assert exc.value.slide == "A1" and "2 missing over 2 slide(s)" in exc.value.problem

    with pytest.raises(DataError) as exc:
        labels.lookup(["Z9", "Z9"], ["s0", "s1"], ["G0"])
    e = exc.value
    assert (e.slide, e.field) == ("Z9", "obs/slide") and "has no pseudo-labels" in e.problem


def test_missing_genes_name_file_slide_and_field(labels: PseudoLabels) -> None:
    with pytest.raises(DataError) as exc:
        labels.lookup(["A1", "B1"], ["s0", "x"], ["G0", "MISSING1", "MISSING2"])
    e = exc.value
    assert (e.file, e.slide, e.field) == (str(labels.path), "A1, B1", "var")
    assert "2 of 3 requested gene(s)" in e.problem and "['MISSING1', 'MISSING2']" in e.problem


def test_load_refuses_a_plain_h5ad(tmp_path: Path) -> None:
    path = tmp_path / "plain.h5ad"
    ad.AnnData(X=np.zeros((2, 2), np.float32)).write_h5ad(path)
    with pytest.raises(DataError) as exc:
        PseudoLabels.load(path)
    assert exc.value.field == "uns/pseudolabels" and exc.value.file == str(path)
    with pytest.raises(DataError, match="not found"):
        PseudoLabels.load(tmp_path / "nope.h5ad")


def test_write_pseudolabels_from_external_predictions(tmp_path: Path) -> None:
    values = np.arange(6, dtype=np.float64).reshape(3, 2)
    out = write_pseudolabels(
        tmp_path / "ext.h5ad",
        values,
        ["T1", "T1", "T2"],
        ["r0_c0", "r0_c1", "r0_c0"],
        ["A", "B"],
        info={"method": "deepspot-official", "dataset": "tcga-skcm", "space": "log1p"},
    )
    pl = PseudoLabels.load(out)
    assert pl.source.startswith("pseudolabels:deepspot-official@") and pl.slides == ["T1", "T2"]
    assert spot_key("T2", "r0_c0") in pl.obs.index and set(pl.obs["job_id"]) == {"external"}
    np.testing.assert_array_equal(pl.lookup(["T2", "T1"], ["r0_c0", "r0_c1"], ["B"]), [[5.0], [3.0]])
    with pytest.raises(DataError, match="duplicate spots"):
        write_pseudolabels(tmp_path / "dup.h5ad", values, ["T1"] * 3, ["a", "a", "b"], ["A", "B"], info={})
