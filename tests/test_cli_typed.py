"""Typed configuration on the command line: values typed by the constructors' annotations, unknown
keys refused before anything heavy or any data is touched, --print_config round trips."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stbench import cli, config_schema
from stbench.benchmark.job import load_config
from stbench.benchmark.suite import SuiteError, parse_suite
from stbench.config_schema import OptionError, Raw, check_config, schema_for

REPO = Path(__file__).resolve().parents[1]
RUN = ["run", "--method", "patch-cnn", "--dataset", "synthetic"]


def _probe(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`main(argv)` in a fresh interpreter; prints which heavy modules the call imported."""
    code = (
        "import sys; from stbench.cli import main; rc = main(sys.argv[1:]); "
        "print('HEAVY', sorted(m for m in ('torch', 'lightning', 'stbench.benchmark.runner') if m in sys.modules)); "
        "sys.exit(rc)"
    )
    return subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            *argv,
            "--data-root",
            str(tmp_path / "data"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )


def _print_config(argv: list[str], root: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert cli.main([*argv, "--data-root", str(root), "--print_config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_lr_reaches_the_method_as_a_float(synthetic_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _print_config([*RUN, "--method.lr", "3e-4"], synthetic_root, capsys)
    assert doc["method"]["lr"] == 0.0003 and isinstance(doc["method"]["lr"], float)
    assert doc["run"]["config_name"] == "default"  # no --config: the method's configs/default.yaml
    assert doc["trainer"]["max_epochs"] == 40


def test_misspelled_method_key_exits_2_before_anything_heavy(tmp_path: Path) -> None:
    res = _probe([*RUN, "--method.lrr", "3e-4"], tmp_path)
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "'lrr'" in err and "did you mean 'lr'?" in err and "weight_decay" in err  # key, match, valid keys
    assert "HEAVY []" in res.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()  # no lock, no partial output


@pytest.mark.parametrize(
    ("option", "value", "expect"),
    [
        ("--trainer.max_epochs", "two", "expected Optional[int], got 'two'"),
        ("--trainer.max_epoch", "2", "did you mean 'max_epochs'?"),
        ("--data.batch_sise", "8", "did you mean 'batch_size'?"),
        ("--data.patch.out_pz", "8", "did you mean 'out_px'?"),
        ("--method.lr", "fast", "expected float, got 'fast'"),
    ],
)
def test_bad_keys_and_values_exit_2_naming_the_option(
    option: str, value: str, expect: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([*RUN, option, value, "--data-root", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert option in err and expect in err, err
    assert not (tmp_path / "data").exists()


def test_wrong_type_exits_2_in_a_subprocess(tmp_path: Path) -> None:
    res = _probe([*RUN, "--trainer.max_epochs", "two"], tmp_path)
    assert res.returncode == 2 and "--trainer.max_epochs" in res.stderr and "HEAVY []" in res.stdout


def test_values_keep_their_yaml_form_when_they_conform() -> None:
    """A value valid as YAML is kept as is (int 1 stays 1 for a float), so config hashes of jobs
    that worked before are unchanged; only text YAML 1.1 misreads is converted."""
    typed = check_config(
        {
            "method": {"lr": Raw("1"), "channels": Raw("[16,32]"), "cosine_schedule": Raw("false")},
            "trainer": {"devices": Raw("2"), "precision": Raw("bf16-mixed"), "max_epochs": Raw("3")},
            "data": {"patch": {"out_px": Raw("64")}, "gene_kwargs": {"gene_list": Raw("genes.json")}},
        },
        schema_for("patch-cnn"),
        "",
        flag=True,
    )
    assert typed == {
        "method": {"lr": 1, "channels": [16, 32], "cosine_schedule": False},
        "trainer": {"devices": 2, "precision": "bf16-mixed", "max_epochs": 3},
        "data": {"patch": {"out_px": 64}, "gene_kwargs": {"gene_list": "genes.json"}},
    }
    assert isinstance(typed["method"]["lr"], int) and isinstance(typed["trainer"]["devices"], int)


def test_every_committed_config_and_suite_is_valid_and_unchanged() -> None:
    """Checking must not alter a committed config or suite override (their job ids are in CI rows)."""
    for path in sorted(REPO.glob("baselines/*/configs/*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        for name, value in _entry_points().items():
            if value.startswith(f"baselines.{path.parts[-3]}."):
                out = check_config(data, schema_for(name), f"{path}: ")
                assert json.dumps(out, sort_keys=True) == json.dumps(data, sort_keys=True), path
    for path in sorted(REPO.glob("benchmarks/suites/*.yaml")):
        parse_suite(yaml.safe_load(path.read_text()), path)  # raises on a bad key
        for i, e in enumerate(yaml.safe_load(path.read_text())["grid"]):
            got = parse_suite(yaml.safe_load(path.read_text()), path).grid[i].overrides
            assert json.dumps(got, sort_keys=True) == json.dumps(e.get("overrides") or {}, sort_keys=True)


def _entry_points() -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group="stbench.methods")}


@pytest.mark.parametrize(
    ("folds", "expect"),
    [
        (["--folds", "P0S0"], ["P0S0"]),
        (["--folds", "P0S0,P1S1"], ["P0S0", "P1S1"]),
        (["--folds", "[P0S0,P1S1]"], ["P0S0", "P1S1"]),
        (["--folds", "0"], ["P0S0"]),
        (["--folds", "[0,3]"], ["P0S0", "P1S1"]),
        (["--folds+", "P0S1"], ["P0S1"]),
    ],
)
def test_folds_by_name_list_or_index(
    folds: list[str], expect: list[str], synthetic_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _print_config([*RUN, *folds], synthetic_root, capsys)["run"]["folds"] == expect


def test_unknown_fold_names_the_folds(synthetic_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*RUN, "--folds", "B4", "--data-root", str(synthetic_root), "--print_config"]) == 2
    err = capsys.readouterr().err
    assert "'B4'" in err and "P0S0" in err


def test_seeds_forms() -> None:
    for value, expect in (("0", [0]), ("0,1", [0, 1]), ("[0,1]", [0, 1])):
        assert cli.parse([*RUN, "--seeds", value]).run.seeds == expect


def test_boolean_options_bare_and_with_a_value() -> None:
    assert cli.parse(["leaderboard", "--check"]).leaderboard.check is True
    assert cli.parse(["leaderboard", "--check", "false"]).leaderboard.check is False
    assert cli.parse(["leaderboard"]).leaderboard.check is False
    for flag in ("--dry-run", "--dry_run"):
        assert cli.parse(["benchmark", "s.yaml", flag]).benchmark.dry_run is True
    assert cli.parse(["benchmark", "s.yaml", "--dry-run=false", "--progress"]).benchmark.progress is True
    run = cli.parse([*RUN, "--progress", "--output", "o"]).run
    assert run.progress is True and run.output == "o"
    assert cli.parse(["data", "prepare", "x", "--copy"]).data.prepare.copy is True


def test_print_config_round_trip_is_the_same_job(
    synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stbench.benchmark.runner import expand_jobs

    first = [
        *RUN,
        "--config",
        "tiny",
        "--folds",
        "P1S0,0",
        "--method.lr",
        "3e-4",
        "--trainer.max_epochs",
        "2",
    ]
    doc = _print_config(first, synthetic_root, capsys)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(doc, sort_keys=False))
    again = _print_config(["run", "--config", str(run_yaml)], synthetic_root, capsys)
    assert again == doc and again["run"]["config_name"] == "tiny"

    def jobs(argv: list[str]) -> list[tuple[str, str, str]]:
        a = cli.parse([*argv, "--data-root", str(synthetic_root)])
        r = a.run
        js = expand_jobs(
            r.method, r.dataset, r.protocol, r.folds, r.seeds, r.config, a.overrides, r.data_root
        )
        return [(j.job_id, j.config_hash, j.config_name) for j in js]

    assert jobs(first) == jobs(["run", "--config", str(run_yaml)])


def test_config_file_with_a_misspelled_key_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  lrr: 0.01\ntrainer:\n  max_epochs: 1\n")
    assert cli.main([*RUN, "--config", str(bad), "--data-root", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "method.lrr" in err and "did you mean 'lr'?" in err
    assert not (tmp_path / "data").exists()
    bad.write_text("run:\n  metod: patch-cnn\n")
    with pytest.raises(OptionError, match="run.metod.*did you mean 'method'"):
        load_config("patch-cnn", str(bad))


def test_config_file_values_typed_by_the_constructor(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("method:\n  lr: 3e-4\n")  # YAML 1.1 reads 3e-4 as a string
    name, cfg = load_config("patch-cnn", str(f))
    assert name == "c" and cfg["method"]["lr"] == 0.0003


def test_suite_overrides_checked_at_load_time(tmp_path: Path) -> None:
    suite = {
        "name": "t",
        "grid": [{"method": "patch-cnn", "dataset": "synthetic", "overrides": {"method": {"lrr": 0.1}}}],
    }
    with pytest.raises(SuiteError, match=r"s\.yaml: grid\[0\]\.overrides: .*'lrr'.*did you mean 'lr'"):
        parse_suite(suite, tmp_path / "s.yaml")
    suite["grid"][0]["overrides"] = {"patch-cnn": {"trainer": {"max_epochs": "two"}}}
    with pytest.raises(SuiteError, match=r"grid\[0\]\.overrides\.patch-cnn: trainer.max_epochs: expected"):
        parse_suite(suite, tmp_path / "s.yaml")
    suite["grid"][0]["overrides"] = {"method": {"lr": "3e-4"}}
    assert parse_suite(suite, tmp_path / "s.yaml").grid[0].overrides == {"method": {"lr": 0.0003}}


def test_overrides_outside_run_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["benchmark", "s.yaml", "--method.lr", "1"]) == 2
    assert "stbench run" in capsys.readouterr().err


def test_runner_data_keys_are_what_run_job_passes() -> None:
    """The data keys a config may not set are exactly those run_job gives STDataModule itself."""
    tree = ast.parse((REPO / "stbench/benchmark/runner.py").read_text())
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "STDataModule"
    ]
    assert len(calls) == 1
    passed = {k.arg for k in calls[0].keywords if k.arg} | {"slides", "fold"}
    assert passed == set(config_schema.RUNNER_DATA_KEYS)


def test_signatures_read_from_source_match_the_imported_classes() -> None:
    """The fast (source) reading agrees with inspect.signature for every registered method, the
    DataModule, PatchSpec and the Trainer, so the early check refuses exactly what the run would."""
    from stbench.methods.registry import available_methods

    targets = [(c.__module__, c.__qualname__, c) for c in available_methods().values()]
    targets += [
        (*config_schema.DATAMODULE, None),
        (*config_schema.PATCH_SPEC, None),
        (*config_schema.TRAINER, None),
    ]
    for module, name, obj in targets:
        fast = config_schema.source_params(module, name)
        slow = config_schema.imported_params(module, name, obj)
        assert fast is not None, (module, name)
        if config_schema.OPEN in slow:  # **kwargs forwarded to the base class: read through it
            assert set(slow) - {config_schema.OPEN} <= set(fast), (module, name)
            continue
        assert set(fast) == set(slow), (module, name)
        for key, p in fast.items():
            if slow[key].default is not config_schema._MISSING and p.default is not config_schema._MISSING:
                assert p.default == slow[key].default, (module, name, key)
