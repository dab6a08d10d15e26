"""Suites: parsing with errors naming file and key, job expansion, resume, claims, fallback, comparison
with committed results, and the SLURM array path through submitit's local executor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stbench.benchmark import runner
from stbench.benchmark.store import RESULTS, claim, read_results
from stbench.benchmark.suite import (
    Suite,
    SuiteError,
    Tolerance,
    benchmark,
    check_against_committed,
    compare_to_committed,
    load_suite,
    parse_slurm_time,
    parse_tolerance,
    run_suite,
    submitit_parameters,
)

REPO = Path(__file__).resolve().parents[1]


def write_suite(tmp_path: Path, data: dict, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def mean_suite(tmp_path: Path, **extra) -> Path:
    data = {
        "name": "t",
        "grid": [{"method": "mean", "dataset": "synthetic", "protocol": "loso", "seeds": [0], "folds": 2}],
        **extra,
    }
    return write_suite(tmp_path, data)


# ---- parsing and validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key", "needle"),
    [
        ({"grid": [{"method": "mean", "dataset": "synthetic"}]}, "name", "required"),
        ({"name": "x", "grid": [], "extra": 1}, "top level", "unknown key(s) ['extra']"),
        ({"name": "x"}, "grid", "non-empty list"),
        (
            {"name": "x", "grid": [{"method": "meen", "dataset": "synthetic"}]},
            "grid[0].method",
            "unknown method 'meen'; valid: ",
        ),
        (
            {"name": "x", "grid": [{"method": "mean", "dataset": "synthetik"}]},
            "grid[0].dataset",
            "unknown dataset 'synthetik'; valid: ",
        ),
        (
            {"name": "x", "grid": [{"method": "mean", "dataset": "synthetic", "protocol": "lsoo"}]},
            "grid[0].protocol",
            "unknown protocol 'lsoo'",
        ),
        (
            {"name": "x", "grid": [{"method": "mean", "dataset": "synthetic", "seeds": ["a"]}]},
            "grid[0].seeds",
            "integer",
        ),
        (
            {"name": "x", "grid": [{"method": "mean", "dataset": "synthetic", "folds": 0}]},
            "grid[0].folds",
            "first n folds",
        ),
        (
            {"name": "x", "grid": [{"method": "mean", "dataset": ["synthetic", "her2st"], "folds": ["B4"]}]},
            "grid[0].folds",
            "belong to one dataset",
        ),
        (
            {
                "name": "x",
                "grid": [{"method": "mean", "dataset": "synthetic", "config": {"patch-cnn": "tiny"}}],
            },
            "grid[0].config",
            "not methods of this entry",
        ),
        (
            {"name": "x", "grid": [{"method": "patch-cnn", "dataset": "synthetic", "config": "huge"}]},
            "grid[0].config",
            "configs of patch-cnn: ['default', 'tiny']",
        ),
        (
            {"name": "x", "grid": [{"method": "mean", "dataset": "synthetic", "overrides": {"trainr": {}}}]},
            "grid[0].overrides",
            "keys must be sections",
        ),
        (
            {"name": "x", "grid": [{"method": "mean", "dataset": "synthetic", "colour": 1}]},
            "grid[0]",
            "unknown key(s) ['colour']",
        ),
        (
            {"name": "x", "grid": [{"method": "mean", "dataset": "synthetic"}], "tolerance": {"pcc": -1}},
            "tolerance.pcc",
            "number >= 0",
        ),
        (
            {
                "name": "x",
                "grid": [{"method": "mean", "dataset": "synthetic"}],
                "fallback": {"protocol": "loso"},
            },
            "fallback.dataset",
            "required",
        ),
        (
            {"name": "x", "grid": [{"method": "mean", "dataset": "synthetic"}], "sources": {"her3st": "d"}},
            "sources.her3st",
            "unknown dataset 'her3st'",
        ),
    ],
)
def test_validation_errors_name_file_and_key(tmp_path: Path, data: dict, key: str, needle: str) -> None:
    path = write_suite(tmp_path, data)
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {key}: "), msg
    assert needle in msg, msg


def test_yaml_and_missing_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ngrid: [\n")
    with pytest.raises(SuiteError, match=r"bad.yaml: yaml: not valid YAML"):
        load_suite(bad)
    with pytest.raises(SuiteError, match=r"nope.yaml: file: suite file not found"):
        load_suite(tmp_path / "nope.yaml")


def test_committed_suites_parse() -> None:
    for name in ("ci", "demo"):
        suite = load_suite(REPO / "benchmarks" / "suites" / f"{name}.yaml")
        assert suite.name == name
        assert {"mean", "patch-cnn"} <= {m for e in suite.grid for m in e.methods}
        entry = next(e for e in suite.grid if "patch-cnn" in e.methods)
        assert entry.config_for("patch-cnn") == "tiny"
    ci = load_suite(REPO / "benchmarks" / "suites" / "ci.yaml")
    # One fold set for every expression method, references included (comparable sections).
    image_methods = {"stmdit", "pixcell"}
    expression = [e for e in ci.grid if not set(e.methods) & image_methods]
    assert {"mean", "depth"} <= {m for e in expression for m in e.methods}
    assert len({e.folds for e in expression}) == 1 and isinstance(expression[0].folds, tuple)
    assert ci.fallback == {"dataset": "synthetic"}
    assert ci.sources["her2st"] == (REPO.parent / "shared" / "data" / "her2st").resolve()
    assert set(ci.tolerance) >= {"pcc", "mse"}
    assert ci.committed_results() == REPO / "benchmarks" / "results" / "ci" / RESULTS


def test_tolerance_and_slurm_parameters() -> None:
    tol = parse_tolerance({"pcc": 0.05, "mse": "10%"})
    assert tol == {"pcc": Tolerance(0.05), "mse": Tolerance(0.1, relative=True)}
    assert tol["mse"].allowed(2.0) == pytest.approx(0.2)
    assert [parse_slurm_time(t) for t in (90, "90", "10:30", "01:30:00", "1-00", "1-02:00:30")] == [
        90,
        90,
        11,
        90,
        1440,
        1561,
    ]
    with pytest.raises(Exception, match="not a SLURM time"):
        parse_slurm_time("soon")
    cluster, params = submitit_parameters(
        {
            "partition": "gpu",
            "gpus_per_node": 2,
            "tasks_per_node": 2,
            "time": "02:00:00",
            "array_parallelism": 8,
            "account": None,
        }
    )
    assert cluster == "slurm"
    assert params == {
        "slurm_partition": "gpu",
        "gpus_per_node": 2,
        "tasks_per_node": 2,
        "timeout_min": 120,
        "slurm_array_parallelism": 8,
    }
    assert submitit_parameters({"cluster": "local"}) == ("local", {})


# ---- job expansion -----------------------------------------------------------------------------------


def test_jobs_expand_grid_in_a_deterministic_order(tmp_path: Path) -> None:
    path = write_suite(
        tmp_path,
        {
            "name": "grid",
            "grid": [
                {
                    "method": ["mean", "patch-cnn"],
                    "config": {"patch-cnn": "tiny"},
                    "dataset": "synthetic",
                    "protocol": "loso",
                    "seeds": [0, 1],
                    "folds": 2,
                    "overrides": {"patch-cnn": {"trainer": {"max_epochs": 1}}},
                },
                {"method": "mean", "dataset": "synthetic", "folds": ["P1S1"], "seeds": 0},
                {"method": "mean", "dataset": "synthetic", "seeds": [0], "folds": ["P0S0"]},  # duplicate job
            ],
        },
    )
    suite = load_suite(path)
    jobs = suite.jobs()
    keys = [(j.method, j.fold, j.seed) for j in jobs]
    assert keys == [
        ("mean", "P0S0", 0),
        ("mean", "P0S0", 1),
        ("mean", "P0S1", 0),
        ("mean", "P0S1", 1),
        ("patch-cnn", "P0S0", 0),
        ("patch-cnn", "P0S0", 1),
        ("patch-cnn", "P0S1", 0),
        ("patch-cnn", "P0S1", 1),
        ("mean", "P1S1", 0),
    ]
    assert len({j.job_id for j in jobs}) == len(jobs)
    assert all(j.suite == "grid" and j.protocol == "loso" for j in jobs)
    cnn = [j for j in jobs if j.method == "patch-cnn"]
    assert {j.config_name for j in cnn} == {"tiny"} and cnn[0].config["trainer"]["max_epochs"] == 1
    assert cnn[0].config["method"]["channels"] == [16, 32, 64]  # the tiny config, with the override on top
    assert {j.config_name for j in jobs if j.method == "mean"} == {"default"}
    assert [j.job_id for j in load_suite(path).jobs()] == [j.job_id for j in jobs]
    # a job id is the same whether it comes from a suite or from `stbench run`
    direct = runner.expand_jobs("mean", "synthetic", "loso", folds=["P1S1"], seeds=[0])
    assert direct[0].job_id == jobs[-1].job_id


def test_unknown_fold_names_the_entry(tmp_path: Path) -> None:
    path = write_suite(
        tmp_path, {"name": "x", "grid": [{"method": "mean", "dataset": "synthetic", "folds": ["B4"]}]}
    )
    with pytest.raises(
        SuiteError, match=r"suite.yaml: grid\[0\]: mean on synthetic: unknown fold\(s\) \['B4'\]"
    ):
        load_suite(path).jobs()


def test_fallback_when_a_dataset_cannot_be_prepared(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    grid = [{"method": "mean", "dataset": "her2st", "protocol": "loso", "folds": ["B4"], "seeds": [0]}]
    no_fb = load_suite(
        write_suite(tmp_path, {"name": "x", "grid": grid, "sources": {"her2st": "missing/her2st"}})
    )
    with pytest.raises(SuiteError) as err:
        no_fb.jobs(root)
    assert "sources: dataset 'her2st' is not prepared under" in str(err.value)
    assert f"its source {tmp_path / 'missing' / 'her2st'} does not exist" in str(err.value)
    assert "stbench data prepare her2st --source DIR" in str(err.value)

    fb = load_suite(
        write_suite(
            tmp_path,
            {
                "name": "x",
                "grid": grid,
                "sources": {"her2st": "missing/her2st"},
                "fallback": {"dataset": "synthetic"},
            },
        )
    )
    plan = fb.plan(root)
    assert plan.datasets == {"her2st": "synthetic"}
    assert {(j.dataset, j.protocol) for j in plan.jobs} == {("synthetic", "loso")}
    assert len(plan.jobs) == 4  # fold names of her2st mean nothing on synthetic: all of its folds
    assert "running the suite's fallback dataset 'synthetic'" in plan.notes[0]


def test_a_declared_source_is_prepared_instead_of_falling_back(tmp_path: Path) -> None:
    from tests.fixtures.her2st_layout import write_her2st

    write_her2st(tmp_path / "src", sections=("A1", "B1"), with_image=("B1",))
    suite = load_suite(
        write_suite(
            tmp_path,
            {
                "name": "x",
                "grid": [{"method": "mean", "dataset": "her2st"}],
                "sources": {"her2st": "src"},
                "fallback": {"dataset": "synthetic"},
            },
        )
    )
    used, note = suite.resolve_dataset("her2st", str(tmp_path / "root"))
    assert used == "her2st" and note.startswith(f"prepared her2st from {tmp_path / 'src'}")
    assert (tmp_path / "root" / "her2st" / "manifest.json").exists()
    assert suite.resolve_dataset("her2st", str(tmp_path / "root")) == ("her2st", None)  # prepared: used as is


# ---- local launcher ----------------------------------------------------------------------------------


def test_local_run_writes_rows_and_rerun_skips_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suite = load_suite(mean_suite(tmp_path))
    out = tmp_path / "out"
    rows = run_suite(suite, out)
    jobs = suite.jobs()
    assert [r["job_id"] for r in rows] == [j.job_id for j in jobs] and len(rows) == 2
    on_disk = read_results(out / RESULTS)
    assert [r["job_id"] for r in on_disk] == [j.job_id for j in jobs]
    assert all(r["suite"] == "t" and r["method"] == "mean" and r["metrics"]["mse"] > 0 for r in on_disk)
    for j in jobs:
        assert (out / "jobs" / j.job_id / "predictions").is_dir()
    before = (out / RESULTS).read_bytes()

    def boom(*args, **kwargs):
        raise AssertionError("a finished job was run again")

    monkeypatch.setattr(runner, "run_job", boom)
    assert run_suite(suite, out) == []
    assert (out / RESULTS).read_bytes() == before


def test_only_unfinished_jobs_run_after_an_interruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suite = load_suite(mean_suite(tmp_path))
    out = tmp_path / "out"
    first, second = suite.jobs()
    runner.run_jobs([first], out)
    stale = out / f".{RESULTS}.abc123.tmp"  # what a SIGKILL during an append leaves behind
    stale.write_text('{"torn": ')
    (out / "jobs" / second.job_id).mkdir(parents=True)  # the in-flight job's half-written folder
    (out / "jobs" / second.job_id / "junk.txt").write_text("partial")
    calls = []
    real = runner.run_job
    monkeypatch.setattr(
        runner, "run_job", lambda job, *a, **k: calls.append(job.job_id) or real(job, *a, **k)
    )
    rows = run_suite(suite, out)
    assert calls == [second.job_id] and [r["job_id"] for r in rows] == [second.job_id]
    assert not stale.exists()
    assert not (out / "jobs" / second.job_id / "junk.txt").exists()  # restarted clean
    assert sorted(r["job_id"] for r in read_results(out / RESULTS)) == sorted([first.job_id, second.job_id])


def test_a_job_claimed_by_another_process_is_left_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    suite = load_suite(mean_suite(tmp_path))
    out = tmp_path / "out"
    first, second = suite.jobs()
    calls = []
    real = runner.run_job
    monkeypatch.setattr(
        runner, "run_job", lambda job, *a, **k: calls.append(job.job_id) or real(job, *a, **k)
    )
    # flock is per open file description: a second open() in this process contends like another process
    with claim(out, first.job_id) as mine:
        assert mine
        with claim(out, first.job_id) as again:
            assert not again
        rows = run_suite(suite, out)
    assert calls == [second.job_id] and [r["job_id"] for r in rows] == [second.job_id]
    assert "were running in another process" in capsys.readouterr().out


# ---- comparison with committed results ---------------------------------------------------------------


def _row(job_id: str, **metrics) -> dict:
    return {"job_id": job_id, "dataset": "her2st", "suite": "ci", "metrics": metrics}


def test_compare_to_committed() -> None:
    tol = {"pcc": 0.05, "mse": "10%"}
    committed = [_row("a", pcc=0.30, mse=1.0), _row("b", pcc=None, mse=2.0), _row("c", pcc=0.2, mse=1.0)]
    ok = [_row("a", pcc=0.26, mse=1.09), _row("b", pcc=None, mse=1.5), _row("c", pcc=0.9, mse=0.1)]
    assert compare_to_committed(ok, committed, tol) == []
    bad = [
        _row("a", pcc=0.24, mse=1.0),
        _row("b", pcc=None, mse=2.3),
        _row("c", pcc=None, mse=1.0),
        _row("d", pcc=0.5, mse=0.5),
    ]
    problems = compare_to_committed(bad, committed, tol)
    assert problems == [
        "d: no committed result (commit the new rows if the change is intended)",
        "a: pcc 0.3000 -> 0.2400, worse by 0.0600 > tolerance 0.05 (higher is better)",
        "b: mse 2.0000 -> 2.3000, worse by 0.3000 > tolerance 10% (lower is better)",
        "c: pcc was 0.2000, now null (pcc_excluded = None)",
    ]
    missing = compare_to_committed(ok[:2], committed, tol)
    assert missing == ["c: in the committed results but not run"]
    assert compare_to_committed(ok + ok[:1], committed, tol) == ["a: appears twice in the new rows"]


def test_check_against_committed_skips_datasets_replaced_by_the_fallback(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    suite = load_suite(mean_suite(tmp_path, tolerance={"mse": 0.01}))
    out = tmp_path / "out"
    run_suite(suite, out)
    plan = suite.plan()
    rows = read_results(out / RESULTS)
    committed = tmp_path / "committed.jsonl"
    worse = [json.loads(json.dumps(r)) for r in rows]
    worse[0]["metrics"]["mse"] -= 0.5  # the committed value was much better
    her2st = {**rows[0], "job_id": "mean__her2st__loso__B4__s0__x", "dataset": "her2st"}
    committed.write_text("".join(json.dumps(r) + "\n" for r in [*worse, her2st]))
    plan.datasets["her2st"] = "synthetic"  # as if the suite had fallen back from her2st
    problems, notes = check_against_committed(suite, out, plan, committed)
    assert len(problems) == 1 and problems[0].startswith(f"{rows[0]['job_id']}: mse ")
    assert notes == ["committed rows on her2st not compared: this run used the fallback dataset instead"]
    committed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    worse = [json.loads(json.dumps(r)) for r in rows]
    assert check_against_committed(suite, out, plan, committed)[0] == []
    assert benchmark(suite.path, output=str(out), compare=str(committed)) == 0
    worse[1]["metrics"]["mse"] -= 0.5
    committed.write_text("".join(json.dumps(r) + "\n" for r in worse))
    assert benchmark(suite.path, output=str(out), compare=str(committed)) == 1
    assert f"regression: {rows[1]['job_id']}: mse" in capsys.readouterr().out


def test_benchmark_dry_run_lists_jobs_with_status(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = mean_suite(tmp_path)
    out = tmp_path / "out"
    suite = load_suite(path)
    runner.run_jobs(suite.jobs()[:1], out)
    assert benchmark(path, output=str(out), dry_run=True) == 0
    text = capsys.readouterr().out
    assert "suite t: 2 job(s), 1 finished" in text and "to run" in text
    assert len(read_results(out / RESULTS)) == 1  # nothing ran


# ---- SLURM array through submitit's local executor ---------------------------------------------------


@pytest.mark.slow  # each array task is a fresh Python importing torch and Lightning
def test_slurm_launcher_runs_an_array_through_submitit_local(tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    suite = load_suite(
        mean_suite(tmp_path, slurm={"partition": "gpu", "time": "00:10:00", "array_parallelism": 2})
    )
    out = tmp_path / "out"
    rows = run_suite(suite, out, launcher="slurm", slurm={"cluster": "local"})
    ids = [j.job_id for j in suite.jobs()]
    assert sorted(r["job_id"] for r in rows) == sorted(ids)
    on_disk = read_results(out / RESULTS)
    assert sorted(r["job_id"] for r in on_disk) == sorted(ids)  # each exactly once
    submitted = list((out / "submitit").glob("submitted-*.json"))
    assert len(submitted) == 1 and set(json.loads(submitted[0].read_text())) == set(ids)
    job_json = json.loads((out / "jobs" / ids[0] / "job.json").read_text())
    assert Path(job_json["data_root"]).is_absolute()  # pinned at submission for tasks on other nodes
    assert run_suite(suite, out, launcher="slurm", slurm={"cluster": "local"}) == []  # nothing left to submit


@pytest.mark.slow
def test_slurm_launcher_reports_failed_tasks(tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    suite = load_suite(
        write_suite(
            tmp_path,
            {
                "name": "t",
                "grid": [{"method": "mean", "dataset": "synthetic", "seeds": [0], "folds": ["P1S0"]}],
            },
        )
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "jobs").write_text("a file where the job folders go: every task fails")
    with pytest.raises(Exception, match=r"1 of 1 array task\(s\) failed") as err:
        run_suite(suite, out, launcher="slurm", slurm={"cluster": "local"})
    assert all(j.job_id in str(err.value) for j in suite.jobs())
    assert "log " in str(err.value) and not (out / RESULTS).exists()


def test_unknown_launcher(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="unknown launcher 'pbs'; valid: local, slurm"):
        run_suite(Suite(name="x", grid=[]), tmp_path, launcher="pbs")
