"""Split strategies, the leakage check, validation spots and the image requirement."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from stbench.data.splits import (
    OVERLAP_PREFIX,
    Fold,
    FoldPlanError,
    check_leakage,
    donor_holdout,
    fixed_pool,
    kfold,
    leave_one_patient_out,
    leave_one_slice_out,
    overlap_notes,
    plan_folds,
    read_split_files,
    split_validation_spots,
)
from stbench.errors import DataError, LeakageError, UnknownNameError

# Her2ST layout (shared/data/README.md): 36 sections, patient = letter
HER2ST = {
    f"{p}{i}": p for p, n in zip("ABCDEFGH", (6, 6, 6, 6, 3, 3, 3, 3), strict=True) for i in range(1, n + 1)
}
POOL = [f"{p}1" for p in "ABCDEFGH"]
ALL_IMAGES = {s: True for s in HER2ST}
OUR_IMAGES = {s: s in {"B4", "C2", "C3", "C4", "C5", "C6"} for s in HER2ST}


@st.composite
def layouts(draw: st.DrawFn, min_slides: int = 2) -> dict[str, str]:
    """Random slide -> patient maps (1-5 patients, 1-4 slides each)."""
    n_pat = draw(st.integers(1, 5))
    out = {}
    for p in range(n_pat):
        for k in range(draw(st.integers(1, 4))):
            out[f"P{p}S{k}"] = f"P{p}"
    if len(out) < min_slides:
        out[f"P{n_pat}S0"] = f"P{n_pat}"
    return out


def assert_sound(fold: Fold, patients: dict[str, str]) -> None:
    """The invariants every fold must satisfy (independent of check_leakage's code)."""
    tv = set(fold.train) | set(fold.val)
    assert not set(fold.test) & tv
    test_patients = {patients[s] for s in fold.test}
    shared = test_patients & {patients[s] for s in tv}
    declared = [n for n in fold.notes if n.startswith(OVERLAP_PREFIX)]
    if fold.unit == "patient":
        assert not shared and not declared
    else:
        assert len(declared) == len(shared)
        for p in shared:
            assert any(f"patient {p} " in n for n in declared)


# ---- strategies ----------------------------------------------------------------------------------
def test_leave_one_slice_out_declares_overlap() -> None:
    folds, problems = plan_folds("leave_one_slice_out", HER2ST, has_image=ALL_IMAGES)
    assert problems == [] and len(folds) == 36
    a1 = next(f for f in folds if f.test == ("A1",))
    assert len(a1.train) == 35 and a1.val == () and a1.val_fraction == 0.1 and a1.unit == "slide"
    assert a1.notes == (
        f"{OVERLAP_PREFIX}patient A has test slide(s) A1 and training/validation slide(s) A2, A3, A4, A5, A6",
    )
    single, _ = leave_one_slice_out({"X1": "X", "Y1": "Y"})
    assert all(f.notes == () for f in single)


def test_leave_one_patient_out() -> None:
    folds, _ = plan_folds("leave_one_patient_out", HER2ST, has_image=ALL_IMAGES)
    assert [f.name for f in folds] == [f"patient-{p}" for p in "ABCDEFGH"]
    assert folds[0].test == ("A1", "A2", "A3", "A4", "A5", "A6") and folds[0].unit == "patient"
    assert all(not any(s.startswith(f.name[-1]) for s in f.train) for f in folds)
    assert leave_one_patient_out({"A1": "A", "A2": "A"})[0] == []


def test_kfold_explicit_groups_3_2_2() -> None:
    pats = {f"s{i}": f"p{i}" for i in range(1, 8)}
    groups = [["s1", "s2", "s3"], ["s4", "s5"], ["s6", "s7"]]
    folds, problems = plan_folds("kfold", pats, require_image=False, groups=groups)
    assert problems == [] and [f.test for f in folds] == [tuple(g) for g in groups]
    assert folds[1].train == ("s1", "s2", "s3", "s6", "s7")
    with pytest.raises(DataError, match="overlap"):
        kfold(pats, groups=[["s1"], ["s1", "s2"]])
    with pytest.raises(UnknownNameError, match="s9"):
        kfold(pats, groups=[["s9"]])


def test_kfold_seeded_and_by_patient() -> None:
    pats = {f"s{i}": f"p{i // 2}" for i in range(9)}
    a, _ = kfold(pats, k=3, seed=1)
    b, _ = kfold(pats, k=3, seed=1)
    assert a == b
    assert sorted(s for f in a for s in f.test) == sorted(pats)
    c, _ = kfold(pats, k=3, seed=1, group_by_patient=True)
    for f in c:
        assert f.unit == "patient"
        assert not {pats[s] for s in f.test} & {pats[s] for s in f.train}
    assert kfold(pats, k=20)[1]


def test_fixed_pool_her2st_all_images() -> None:
    folds, problems = plan_folds("fixed_pool", HER2ST, has_image=ALL_IMAGES, pool=POOL)
    assert problems == [] and [f.test for f in folds] == [(s,) for s in POOL]
    assert all(len(f.train) == 35 and f.unit == "slide" for f in folds)


def test_fixed_pool_reports_exactly_which_pool_sections_lack_images() -> None:
    folds, problems = plan_folds("fixed_pool", HER2ST, has_image=OUR_IMAGES, pool=POOL)
    assert folds == []
    assert (
        len(problems) == 1 and "A1, B1, C1, D1, E1, F1, G1, H1" in problems[0] and "no image" in problems[0]
    )
    with pytest.raises(FoldPlanError) as e:
        plan_folds("fixed_pool", HER2ST, has_image=OUR_IMAGES, pool=POOL, strict=True)
    assert e.value.problems == problems and "H1" in str(e.value)
    imgs = dict(OUR_IMAGES, C1=True, A1=True)
    folds, problems = plan_folds("fixed_pool", HER2ST, has_image=imgs, pool=POOL)
    assert [f.test for f in folds] == [("A1",), ("C1",)]
    assert problems[0].endswith("B1, D1, E1, F1, G1, H1") and "6 of 8" in problems[0]
    assert set(folds[0].train) == {"B4", "C1", "C2", "C3", "C4", "C5", "C6"}
    assert folds[0].excluded["B1"] == "no image"
    _, absent = fixed_pool({"A1": "A", "A2": "A"}, pool=["A1", "Z1"])
    assert "not in the dataset: Z1" in absent[0]


def test_donor_holdout() -> None:
    folds, problems = plan_folds(
        "donor_holdout", HER2ST, has_image=ALL_IMAGES, test_donors=["B", "E"], val_donors=["H"]
    )
    (f,) = folds
    assert f.unit == "patient" and f.test == tuple(sorted(s for s in HER2ST if s[0] in "BE"))
    assert f.val == ("H1", "H2", "H3") and f.val_fraction == 0.0
    with pytest.raises(UnknownNameError, match="donor"):
        donor_holdout(HER2ST, test_donors=["Q"])
    _, problems = plan_folds("donor_holdout", HER2ST, has_image=OUR_IMAGES, test_donors=["A", "B"])
    assert any("test donor A has no usable slide" in p for p in problems)


def _write_split(d: Path, i: int, train: list[str], test: list[str]) -> None:
    for part, ids in (("train", train), ("test", test)):
        with (d / f"{part}_{i}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sample_id", "patches_path", "expr_path"])
            for s in ids:
                w.writerow([s, f"patches/{s}.h5", f"adata/{s}.h5ad"])


def test_split_files_hest_bench(tmp_path: Path) -> None:
    d = tmp_path / "splits"
    d.mkdir()
    _write_split(d, 0, ["NCBI1", "NCBI2"], ["TENX1"])
    _write_split(d, 1, ["NCBI1", "TENX1"], ["NCBI2"])
    pats = {"NCBI1": "p1", "NCBI2": "p2", "TENX1": "p3"}
    folds, problems = plan_folds("split_files", pats, require_image=False, split_dir=d)
    assert problems == [] and [f.test for f in folds] == [("TENX1",), ("NCBI2",)]
    assert read_split_files(d)[0] == (0, ["NCBI1", "NCBI2"], ["TENX1"])
    _write_split(d, 2, ["NCBI1"], ["NCBI3"])
    with pytest.raises(DataError, match="NCBI3") as e:
        plan_folds("split_files", pats, require_image=False, split_dir=d)
    assert e.value.file.endswith("test_2.csv") and e.value.field == "sample_id"
    (d / "test_2.csv").unlink()
    with pytest.raises(DataError, match="no test_2.csv"):
        read_split_files(d)
    (d / "train_2.csv").write_text("id\nNCBI1\n")
    with pytest.raises(DataError, match="sample_id"):
        read_split_files(d)


def test_unknown_strategy_and_val_slides() -> None:
    with pytest.raises(UnknownNameError, match="leave_one_slice_out"):
        plan_folds("leave_one_slice_ot", HER2ST)
    folds, _ = plan_folds("leave_one_patient_out", HER2ST, has_image=ALL_IMAGES, val_slides=2, seed=3)
    for f in folds:
        assert len(f.val) == 2 and f.val_fraction == 0.0 and not set(f.val) & set(f.train)


def test_loso_image_exclusion_is_reported() -> None:
    folds, problems = plan_folds("leave_one_slice_out", HER2ST, has_image=OUR_IMAGES)
    assert [f.test[0] for f in folds] == ["B4", "C2", "C3", "C4", "C5", "C6"]
    assert problems[0].startswith("30 slide(s) without an image")
    assert folds[0].train == ("C2", "C3", "C4", "C5", "C6") and len(folds[0].excluded) == 30


# ---- check_leakage -------------------------------------------------------------------------------
PATS = {"A1": "A", "A2": "A", "B1": "B", "B2": "B"}


def test_check_leakage_catches_each_violation() -> None:
    ok = Fold(0, "ok", ("B1", "B2"), (), ("A1",), "slide", 0.1, {}, ())
    check_leakage(ok, PATS)
    with pytest.raises(LeakageError, match=r"test slide\(s\) \['A1'\] also in train"):
        check_leakage(Fold(0, "x", ("A1", "B1"), (), ("A1",), "slide", 0.1, {}, ()), PATS)
    with pytest.raises(LeakageError, match="also in train/val"):
        check_leakage(Fold(0, "x", ("B1",), ("A1",), ("A1",), "slide", 0.0, {}, ()), PATS)
    with pytest.raises(LeakageError, match="shares test patients"):
        check_leakage(Fold(0, "x", ("A2", "B1"), (), ("A1",), "patient", 0.1, {}, ()), PATS)
    undeclared = Fold(0, "x", ("A2", "B1"), (), ("A1",), "slide", 0.1, {}, ())
    with pytest.raises(LeakageError, match="not declared accurately"):
        check_leakage(undeclared, PATS)
    wrong = Fold(0, "x", ("A2", "B1"), (), ("A1",), "slide", 0.1, {}, (f"{OVERLAP_PREFIX}patient B ...",))
    with pytest.raises(LeakageError, match="not declared accurately"):
        check_leakage(wrong, PATS)
    right = Fold(
        0, "x", ("A2", "B1"), (), ("A1",), "slide", 0.1, {}, tuple(overlap_notes(["A2", "B1"], ["A1"], PATS))
    )
    check_leakage(right, PATS)
    with pytest.raises(LeakageError, match="excluded"):
        check_leakage(Fold(0, "x", ("B1", "B2"), (), ("A1",), "slide", 0.1, {"B2": "no image"}, ()), PATS)
    with pytest.raises(LeakageError, match="no known patient"):
        check_leakage(Fold(0, "x", ("Z9",), (), ("A1",), "slide", 0.1, {}, ()), PATS)
    with pytest.raises(LeakageError, match="no test slide"):
        check_leakage(Fold(0, "x", ("A1",), (), (), "slide", 0.1, {}, ()), PATS)
    with pytest.raises(ValueError, match="OR"):
        Fold(0, "x", ("A1",), ("B1",), ("B2",), "slide", 0.1, {}, ())


def test_fold_dict_roundtrip() -> None:
    folds, _ = plan_folds("fixed_pool", HER2ST, has_image=dict(OUR_IMAGES, A1=True), pool=POOL)
    assert Fold.from_dict(folds[0].to_dict()) == folds[0]


# ---- validation spots ----------------------------------------------------------------------------
def test_split_validation_spots_basics() -> None:
    ids = [f"S:{i}" for i in range(50)]
    tr, va = split_validation_spots(ids, 0.1, seed=0)
    assert len(va) == 5 and sorted(tr + va) == sorted(ids) and not set(tr) & set(va)
    assert (tr, va) == split_validation_spots(ids, 0.1, seed=0)
    assert va != split_validation_spots(ids, 0.1, seed=1)[1]
    assert split_validation_spots(["a", "b"], 0.01, 0)[1] != []
    assert split_validation_spots(["a"], 0.5, 0) == (["a"], [])
    assert split_validation_spots(ids, 0.0, 0) == (ids, [])
    with pytest.raises(ValueError, match="unique"):
        split_validation_spots(["a", "a"], 0.1, 0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), fraction=st.floats(0.0, 0.95), seed=st.integers(0, 2**31))
def test_split_validation_spots_property(n: int, fraction: float, seed: int) -> None:
    ids = [f"x{i}" for i in range(n)]
    tr, va = split_validation_spots(ids, fraction, seed)
    assert tr + va != [] or n == 0
    assert sorted(tr + va) == sorted(ids) and not set(tr) & set(va)
    assert tr == [s for s in ids if s in set(tr)]  # order preserved
    if fraction > 0 and n >= 2:
        assert 1 <= len(va) <= n - 1


# ---- properties of every strategy ----------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    patients=layouts(),
    strategy=st.sampled_from(
        [
            "leave_one_slice_out",
            "leave_one_patient_out",
            "kfold",
            "kfold_patient",
            "fixed_pool",
            "donor_holdout",
        ]
    ),
    image_mask=st.lists(st.booleans(), min_size=30, max_size=30),
    require_image=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_no_strategy_ever_leaks(
    patients: dict[str, str], strategy: str, image_mask: list[bool], require_image: bool, seed: int
) -> None:
    slides = sorted(patients)
    has_image = {s: image_mask[i % 30] for i, s in enumerate(slides)}
    params: dict[str, object] = {}
    if strategy.startswith("kfold"):
        params = {"k": 2, "seed": seed, "group_by_patient": strategy == "kfold_patient"}
        strategy = "kfold"
    elif strategy == "fixed_pool":
        params = {"pool": slides[:: max(1, len(slides) // 3)]}
    elif strategy == "donor_holdout":
        params = {"test_donors": [sorted(set(patients.values()))[0]]}
    folds, problems = plan_folds(
        strategy, patients, has_image=has_image, require_image=require_image, **params
    )
    event(f"{strategy}: {'folds' if folds else 'no fold'}")
    for f in folds:
        assert_sound(f, patients)
        check_leakage(f, patients)
        if require_image:
            assert all(has_image[s] for s in f.slides)
            assert set(f.excluded) == {s for s in slides if not has_image[s]}
    if strategy == "fixed_pool" and require_image:
        lacking = [s for s in params["pool"] if not has_image[s]]  # type: ignore[union-attr]
        if lacking:
            assert any(p.endswith(", ".join(lacking)) for p in problems)
