"""Built-in protocols: definitions, Her2ST's fixed pool, leakage properties, train-only fitting."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stbench.data.protocols import PROTOCOLS, Protocol, get_protocol
from stbench.data.slide import Slide, make_adata
from stbench.data.splits import OVERLAP_PREFIX, FoldPlanError, check_leakage
from stbench.errors import UnknownNameError
from tests.conftest import HER2ST

REPO = Path(__file__).resolve().parents[1]
HER2ST_REAL = HER2ST
HER2ST = {
    f"{p}{i}": p for p, n in zip("ABCDEFGH", (6, 6, 6, 6, 3, 3, 3, 3), strict=True) for i in range(1, n + 1)
}
POOL = [f"{p}1" for p in "ABCDEFGH"]
OUR_IMAGES = {s: s in {"B4", "C2", "C3", "C4", "C5", "C6"} for s in HER2ST}


def test_registry_and_unknown_name() -> None:
    assert set(PROTOCOLS) == {"loso", "lopo", "hinge", "diffbulk", "stmdit", "hest"}
    with pytest.raises(UnknownNameError, match="Did you mean 'hinge'"):
        get_protocol("hinje")
    h = get_protocol("hinge")
    assert h.metrics == ("pcc50", "pcc200", "mse", "mae") and h.seeds == (0, 1, 2)
    assert h.gene_rule == "hmhvg" and h.gene_params["n"] == 300 and h.use_vocabulary
    assert h.target == {"method": "log2p1"} and h.validation == {"fraction": 0.1} and h.require_image
    assert get_protocol("lopo").unit == "patient" and get_protocol("stmdit").unit == "patient"
    assert len({p.hash for p in PROTOCOLS.values()}) == len(PROTOCOLS)


def test_hinge_her2st_fixed_pool_eight_folds() -> None:
    folds, problems = get_protocol("hinge").folds(HER2ST, {s: True for s in HER2ST}, eval_pool=POOL)
    assert problems == []
    assert [f.test for f in folds] == [(s,) for s in POOL]
    for f in folds:
        assert len(f.train) == 35 and f.val == () and f.val_fraction == 0.1 and f.unit == "slide"
        p = f.test[0][0]
        (note,) = f.notes
        assert note.startswith(f"{OVERLAP_PREFIX}patient {p} has test slide(s) {f.test[0]}")


def test_hinge_reports_exactly_which_pool_slides_lack_images() -> None:
    folds, problems = get_protocol("hinge").folds(HER2ST, OUR_IMAGES, eval_pool=POOL)
    assert folds == []
    (msg,) = problems
    named = set(msg.split(": ")[-1].split(", "))
    assert named == set(POOL) and "no image" in msg
    with pytest.raises(FoldPlanError, match="A1, B1, C1, D1, E1, F1, G1, H1"):
        get_protocol("hinge").folds(HER2ST, OUR_IMAGES, eval_pool=POOL, strict=True)


def test_hinge_without_pool_is_leave_one_slice_out() -> None:
    folds, problems = get_protocol("hinge").folds(HER2ST, OUR_IMAGES)
    assert [f.test[0] for f in folds] == ["B4", "C2", "C3", "C4", "C5", "C6"]
    assert "30 slide(s) without an image" in problems[0]


@pytest.mark.real_data
def test_hinge_on_real_her2st_layout() -> None:
    from stbench.data.readers.her2st import Her2STReader

    r = Her2STReader(HER2ST_REAL)
    slides = {s: r.patient_of(s) for s in r.list_slides()}
    has_image = {s: r.image_file(s) is not None for s in slides}
    assert slides == HER2ST and has_image == OUR_IMAGES
    folds, problems = get_protocol("hinge").folds(slides, has_image, eval_pool=POOL)
    assert folds == [] and set(problems[0].split(": ")[-1].split(", ")) == set(POOL)
    folds, _ = get_protocol("loso").folds(slides, has_image)
    assert len(folds) == 6


def test_diffbulk_groups_and_default_k() -> None:
    pats = {f"s{i}": f"p{i}" for i in range(1, 8)}
    imgs = {s: True for s in pats}
    groups = [["s1", "s2", "s3"], ["s4", "s5"], ["s6", "s7"]]
    folds, _ = get_protocol("diffbulk").folds(pats, imgs, groups=groups)
    assert [len(f.test) for f in folds] == [3, 2, 2]
    folds, _ = get_protocol("diffbulk").folds({"w1": "a", "w2": "b", "w3": "c"}, {"w1": 1, "w2": 1, "w3": 1})
    assert sorted(f.test for f in folds) == [("w1",), ("w2",), ("w3",)]
    assert all(len(f.train) == 2 for f in folds)


def test_stmdit_and_hest_need_their_inputs(tmp_path: Path) -> None:
    with pytest.raises(FoldPlanError, match="test_donors"):
        get_protocol("stmdit").folds(HER2ST, OUR_IMAGES)
    (f,) = get_protocol("stmdit").folds(HER2ST, {s: True for s in HER2ST}, test_donors=["G", "H"])[0]
    assert set(f.test) == {"G1", "G2", "G3", "H1", "H2", "H3"}
    with pytest.raises(FoldPlanError, match="split_dir"):
        get_protocol("hest").folds(HER2ST, OUR_IMAGES)
    d = tmp_path / "splits"
    d.mkdir()
    for name, ids in (("train_0.csv", ["C2", "C3"]), ("test_0.csv", ["B4"])):
        with (d / name).open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["sample_id", "patches_path", "expr_path"])
            w.writerows([[s, f"patches/{s}.h5", f"adata/{s}.h5ad"] for s in ids])
    folds, problems = get_protocol("hest").folds(HER2ST, OUR_IMAGES, split_dir=d)
    assert [f.test for f in folds] == [("B4",)] and folds[0].train == ("C2", "C3")


# ---- every protocol, random layouts: no leakage --------------------------------------------------
@st.composite
def layouts(draw: st.DrawFn) -> dict[str, str]:
    n_pat = draw(st.integers(2, 5))
    return {f"P{p}S{k}": f"P{p}" for p in range(n_pat) for k in range(draw(st.integers(1, 4)))}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    patients=layouts(),
    name=st.sampled_from(sorted(PROTOCOLS)),
    mask=st.lists(st.booleans(), min_size=20, max_size=20),
)
def test_every_protocol_never_leaks(
    tmp_path: Path, patients: dict[str, str], name: str, mask: list[bool]
) -> None:
    proto = get_protocol(name)
    slides = sorted(patients)
    has_image = {s: mask[i % 20] or i == 0 for i, s in enumerate(slides)}
    kw: dict[str, object] = {}
    if name == "hinge":
        kw["eval_pool"] = slides[::2]
    elif name == "stmdit":
        kw["test_donors"] = [patients[slides[-1]]]
    elif name == "hest":
        d = tmp_path / f"splits-{len(slides)}-{sum(mask)}"
        d.mkdir(exist_ok=True)
        for part, ids in (("train", slides[1:]), ("test", slides[:1])):
            (d / f"{part}_0.csv").write_text("sample_id\n" + "\n".join(ids) + "\n")
        kw["split_dir"] = d
    folds, _ = proto.folds(patients, has_image, **kw)
    for f in folds:
        check_leakage(f, patients)
        tv = set(f.train) | set(f.val)
        assert not set(f.test) & tv
        shared = {patients[s] for s in f.test} & {patients[s] for s in tv}
        declared = [n for n in f.notes if n.startswith(OVERLAP_PREFIX)]
        assert f.unit == proto.unit
        if f.unit == "patient":
            assert not shared
        else:
            assert {n.split("patient ")[2].split(" ")[0] for n in declared} == shared
        assert all(has_image[s] for s in f.slides)


# ---- gene panels and normalisation never see non-training slides ---------------------------------
def _slide(name: str, patient: str, rng: np.random.Generator, genes: list[str]) -> Slide:
    n = int(rng.integers(4, 12))
    lam = rng.gamma(0.7, 3.0, size=len(genes))
    coords = np.stack([np.arange(n) * 10.0, np.zeros(n)], axis=1)
    counts = rng.poisson(lam, size=(n, len(genes)))
    return Slide(name, patient, make_adata(counts, [f"s{i}" for i in range(n)], genes, coords))


GENES = [f"G{i:02d}" for i in range(30)]
SMALL = {
    "loso": {"n": 10},
    "lopo": {"n": 10},
    "hinge": {"n": 10},
    "diffbulk": {"n": 8},
    "hest": {"n": 8},
}


@settings(max_examples=25, deadline=None)
@given(patients=layouts(), name=st.sampled_from(sorted(SMALL)), seed=st.integers(0, 10_000))
def test_panel_and_transform_ignore_non_training_slides(
    patients: dict[str, str], name: str, seed: int
) -> None:
    base = get_protocol(name)
    proto = Protocol(
        **{
            **base.__dict__,
            "split": "leave_one_slice_out",
            "fallback_split": None,
            "split_params": {},
            "unit": "slide",
            "target": {**base.target, "scale": "zscore"},
        }
    )
    rng = np.random.default_rng(seed)
    slides = {s: _slide(s, p, rng, GENES) for s, p in patients.items()}
    folds, _ = proto.folds(patients, {s: True for s in patients})
    fold = folds[seed % len(folds)]
    panel, tt = proto.fit_fold(fold, slides, **SMALL[name])
    # replace every non-training slide by random counts (and other genes): nothing may move
    other = dict(slides)
    for s in set(patients) - set(fold.train):
        other[s] = _slide(s, patients[s], np.random.default_rng(seed + 1), GENES[::-1] + ["NEW"])
    panel2, tt2 = proto.fit_fold(fold, other, **SMALL[name])
    assert panel2 == panel and panel2.hash == panel.hash
    assert tt2.state_dict() == tt.state_dict()
    assert set(panel.train_slides) == set(fold.train) and not set(panel.train_slides) & set(fold.test)
    # ... while a change to a TRAINING slide does reach the fitted statistics (the check is sensitive)
    changed = dict(slides)
    t0 = fold.train[0]
    changed[t0] = _slide(t0, patients[t0], np.random.default_rng(seed + 2), GENES)
    _, tt3 = proto.fit_fold(fold, changed, **SMALL[name])
    assert tt3.state_dict() != tt.state_dict()


def test_gene_panel_variants_and_vocabulary() -> None:
    rng = np.random.default_rng(0)
    train = [_slide(f"S{i}", "P", rng, GENES) for i in range(3)]
    db = get_protocol("diffbulk")
    assert len(db.gene_panel(train, "top100")) == 30  # only 30 genes exist
    assert len(db.gene_panel(train, "all")) == 30
    assert len(db.gene_panel(train, n=5)) == 5
    with pytest.raises(UnknownNameError, match="top200"):
        db.gene_panel(train, "top2000")
    vocab = GENES[:12]
    assert set(get_protocol("hinge").gene_panel(train, vocabulary=vocab, n=30).genes) <= set(vocab)
    assert not set(get_protocol("loso").gene_panel(train, vocabulary=vocab, n=30).genes) <= set(vocab)
    tt = get_protocol("stmdit").target_transform()
    assert tt.method == "normalize_log1p" and tt.scale == "zscore" and tt.target_sum == 1e4
