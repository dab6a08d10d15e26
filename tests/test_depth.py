"""The `depth` reference (per-gene OLS of the target on log library size) and the `kind` of methods.

Why these tests: the depth row is the yardstick for how much of a PCC sequencing depth explains,
so its fit must be exactly OLS on the training spots, its library sizes must reach predict only
for methods that declare them, and it must be listed and recorded as a reference.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from method_harness import run_method

from baselines.depth.method import DepthReference
from baselines.depth.model import DepthLinear
from stbench.data.datamodule import STDataModule
from stbench.data.readers.synthetic import SyntheticReader
from stbench.data.slide import Slide
from stbench.data.splits import Fold
from stbench.data.synthetic import generate_synthetic
from stbench.methods.base import BatchRequirements
from stbench.methods.registry import available_methods

TRAIN = ("P0S0", "P0S1", "P1S0", "P1S1")
TEST = ("P2S0", "P2S1")
FOLD = Fold(0, "frac", TRAIN, (), TEST, unit="patient", val_fraction=0.2)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Slide]:
    root = generate_synthetic(
        tmp_path_factory.mktemp("syn") / "ds", n_slides=6, n_patients=3, spots_per_side=8, n_genes=30
    )
    return SyntheticReader(root).read_all()


def make_dm(slides: list[Slide], **kw) -> STDataModule:
    dm = STDataModule(slides, FOLD, gene_rule="top_var", gene_n=20, batch_size=16, **kw)
    dm.setup("fit")
    return dm


def library_size(slide: Slide) -> np.ndarray:
    """Independent of the DataModule: the row sums of the slide's full count matrix."""
    return np.asarray(slide.adata.X.sum(axis=1), dtype=np.float64).ravel()


def lstsq_fit(dm: STDataModule, slides: list[Slide], split: str | tuple[str, ...]) -> np.ndarray:
    """(2, G) [intercept; slope] by numpy lstsq on the spots whose split is in `split`."""
    by_name = {s.name: s for s in slides}
    xs, ys = [], []
    table = dm.spot_table
    for name in TRAIN:
        rows = table.loc[(table["slide"] == name) & table["split"].isin(np.atleast_1d(split)), "row"]
        rows = rows.to_numpy()
        xs.append(np.log(np.maximum(library_size(by_name[name])[rows], 1.0)))
        ys.append(dm.targets(name).to_numpy(np.float64)[rows])
    x, y = np.concatenate(xs), np.concatenate(ys)
    design = np.stack([np.ones_like(x), x], axis=1)
    return np.linalg.lstsq(design, y, rcond=None)[0]


def test_fit_is_ols_per_gene_on_training_spots_only(slides: list[Slide]) -> None:
    dm = make_dm(slides, include_totals=True)
    assert (dm.spot_table["split"] == "val").sum() > 0  # validation spots exist and must be excluded
    method = DepthReference(n_genes=dm.n_genes, genes=dm.genes)
    method.run_stage_estimate(dm, None)
    got = np.stack([method.model.intercept.numpy(), method.model.slope.numpy()])
    want = lstsq_fit(dm, slides, "train")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.abs(method.model.slope.numpy()).max() > 0.05  # depth does explain the synthetic targets
    with_val = lstsq_fit(dm, slides, ("train", "val"))
    assert np.abs(got - with_val).max() > 1e-4  # the check above would catch validation spots

    # Predictions: each test spot from its own library size.
    by_name = {s.name: s for s in slides}
    for batch in dm.predict_dataloader():
        pred = method.predict_expression(batch).double().numpy()
        table = dm.spot_table.loc[batch["index"].numpy()]
        totals = np.array(
            [library_size(by_name[s])[r] for s, r in zip(table["slide"], table["row"], strict=True)]
        )
        x = np.log(np.maximum(totals, 1.0))
        np.testing.assert_allclose(pred, want[0] + x[:, None] * want[1], rtol=0, atol=1e-5)


def test_zero_total_and_constant_depth_guards() -> None:
    model = DepthLinear(2)
    totals = torch.tensor([0.0, 1.0, np.e**2, np.e**4], dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 1.0], [5.0, 2.0]])
    model.accumulate(totals, targets)  # x = log(max(t, 1)) = 0, 0, 2, 4: exactly y0 = 1 + x, y1 = x / 2
    model.finish()
    np.testing.assert_allclose(model.intercept.numpy(), [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(model.slope.numpy(), [1.0, 0.5], atol=1e-12)
    out = model(torch.tensor([0.0]))
    assert torch.isfinite(out).all() and torch.allclose(out, model.intercept.unsqueeze(0))

    flat = DepthLinear(1)  # every spot the same depth: no slope, the training mean
    flat.accumulate(torch.full((3,), 100.0), torch.tensor([[1.0], [2.0], [6.0]]))
    flat.finish()
    assert flat.slope.item() == 0.0 and flat.intercept.item() == pytest.approx(3.0)


def test_predict_batches_carry_totals_only_when_declared(slides: list[Slide]) -> None:
    plain = make_dm(slides, include_counts=True)  # a method that reads counts in training only
    assert all("totals" in b and "counts" in b for b in plain.train_dataloader())
    for batch in plain.predict_dataloader():
        assert not {"totals", "counts", "expression"} & set(batch), sorted(batch)

    declared = make_dm(slides, include_totals=True)
    for batch in declared.predict_dataloader():
        assert "totals" in batch and not {"counts", "expression"} & set(batch), sorted(batch)
    assert all("counts" not in b for b in declared.train_dataloader())  # totals only, never counts


def test_only_references_declare_totals() -> None:
    assert BatchRequirements().totals is False
    methods = available_methods()
    assert methods["depth"].requires.totals and methods["depth"].kind == "reference"
    assert methods["mean"].kind == "reference"
    for name, cls in methods.items():
        assert cls.kind in ("method", "reference"), name
        if cls.requires.totals:
            assert cls.kind == "reference", name
    assert methods["patch-cnn"].kind == "method"


def test_depth_runs_through_the_runner_as_a_reference(synthetic_root: Path, tmp_path: Path) -> None:
    row = run_method("depth", synthetic_root, tmp_path, config=None)
    assert row["kind"] == "reference" and row["method"] == "depth"
    assert row["metrics"]["pcc"] is not None and np.isfinite(row["metrics"]["pcc"])
    # A function of log depth alone: given log depth, every gene's prediction is constant.
    assert "pcc_partial" in row["metrics"] and row["metrics"]["pcc_partial"] is None


def test_list_methods_marks_references() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "stbench.cli", "list", "methods"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {line.split()[1]: line for line in out.stdout.splitlines() if line.startswith("│")}
    assert "reference" in lines["depth"].split() and "reference" in lines["mean"].split()
    assert "method" in lines["patch-cnn"].split() and "reference" not in lines["patch-cnn"]
