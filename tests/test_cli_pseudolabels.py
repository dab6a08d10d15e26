"""`stbench pseudolabels`: writes the stacked out-of-fold file from a fake run folder, and a slide
predicted by two seeds exits 2 with a message naming the slide and the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stbench.cli import main
from stbench.data.pseudolabels import PseudoLabels
from tests.fixtures.stbench_run_layout import loso_jobs, write_run

SLIDES = ["A1", "B1"]


def test_pseudolabels_command_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = loso_jobs(SLIDES, seed=0)
    run = write_run(tmp_path / "run", [*jobs, *loso_jobs(SLIDES, seed=1)])
    out = tmp_path / "pl" / "deepspot.h5ad"
    argv = ["pseudolabels", str(run), "--method", "deepspot", "--dataset", "tupro"]
    rc = main([*argv, "--protocol", "loso", "--seed", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    pl = PseudoLabels.load(out)
    assert f"wrote {out}: 12 spots x 4 genes, 2 slide(s) from 2 job(s)" in printed
    assert pl.source in printed
    assert set(pl.obs["job_id"]) == {j.job_id for j in jobs}
    ids = [f"s{i}" for i in range(6)]
    np.testing.assert_array_equal(pl.lookup(["B1"] * 6, ids, pl.genes), jobs[1].prediction("B1"))

    assert main([*argv, "--out", str(tmp_path / "both.h5ad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: slide A1 is predicted by 2 jobs") and "--seed (here: [0, 1])" in err
    assert "slide=A1" in err and "field=test_slides" in err and not (tmp_path / "both.h5ad").exists()
