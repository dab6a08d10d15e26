"""Splits: which slides train, validate and test in each fold, and the leakage check.

Strategies are pure functions of the slide -> patient map and options; each returns
`(folds, problems)`: the folds it could build and one readable line per thing it could not (a pool
section without an image, a donor with no usable slide), so nothing vanishes silently.
`plan_folds` applies the image requirement, the validation rule and `check_leakage` to every fold.

Leakage rule: no test slide is ever in train or val. With unit "patient" no test patient is
either. With unit "slide" (slice-level protocols such as HINGE's, which trains on the other
sections of the test patient) patient overlap is allowed but must be declared in `fold.notes`
as "patient overlap: ..." lines, and `check_leakage` verifies the declaration is exactly right.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stbench.errors import DataError, LeakageError, StbenchError, UnknownNameError

UNITS = ("slide", "patient")
OVERLAP_PREFIX = "patient overlap: "
FoldPlan = tuple[list["Fold"], list[str]]


class FoldPlanError(StbenchError):
    """The requested split cannot be built; `problems` lists every reason (printed by the CLI)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("cannot plan folds:\n  - " + "\n  - ".join(self.problems))


@dataclass(frozen=True)
class Fold:
    """One train/val/test assignment of slides.

    `val` lists validation slides; when it is empty, validation is `val_fraction` of the training
    spots (see `split_validation_spots`). `excluded` maps slides left out of the fold entirely to
    the reason (e.g. "no image").
    """

    index: int
    name: str
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    unit: str = "slide"
    val_fraction: float = 0.1
    excluded: dict[str, str] = field(default_factory=dict, hash=False, compare=True)
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("train", "val", "test", "notes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.unit not in UNITS:
            raise ValueError(f"fold unit must be one of {UNITS}, got {self.unit!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val and self.val_fraction:
            raise ValueError("a fold uses validation slides OR a fraction of training spots, not both")

    @property
    def slides(self) -> tuple[str, ...]:
        return self.train + self.val + self.test

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "train": list(self.train),
            "val": list(self.val),
            "test": list(self.test),
            "unit": self.unit,
            "val_fraction": self.val_fraction,
            "excluded": dict(sorted(self.excluded.items())),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fold:
        return cls(
            int(d["index"]),
            str(d["name"]),
            tuple(d["train"]),
            tuple(d["val"]),
            tuple(d["test"]),
            str(d.get("unit", "slide")),
            float(d.get("val_fraction", 0.0)),
            dict(d.get("excluded", {})),
            tuple(d.get("notes", ())),
        )


# ---- leakage ---------------------------------------------------------------------------------
def overlap_notes(train_val: Sequence[str], test: Sequence[str], patients: Mapping[str, str]) -> list[str]:
    """The canonical declaration of test patients that also have training/validation slides."""
    notes = []
    for p in sorted({patients[s] for s in test}):
        tv = sorted(s for s in train_val if patients[s] == p)
        if tv:
            te = sorted(s for s in test if patients[s] == p)
            notes.append(
                f"{OVERLAP_PREFIX}patient {p} has test slide(s) {', '.join(te)} and "
                f"training/validation slide(s) {', '.join(tv)}"
            )
    return notes


def check_leakage(fold: Fold, patients: Mapping[str, str]) -> None:
    """Raise LeakageError if the fold leaks test data into training or validation (see module doc)."""
    where = f"fold {fold.index} ({fold.name})"
    if not fold.test:
        raise LeakageError(f"{where}: no test slide")
    if not fold.train:
        raise LeakageError(f"{where}: no training slide")
    for part in ("train", "val", "test"):
        seq = getattr(fold, part)
        if len(set(seq)) != len(seq):
            raise LeakageError(f"{where}: duplicate slides in {part}")
    unknown = sorted(s for s in fold.slides if s not in patients)
    if unknown:
        raise LeakageError(
            f"{where}: slides with no known patient {unknown[:10]}; cannot check patient leakage"
        )
    train_val = fold.train + fold.val
    bad = sorted(set(fold.test) & set(train_val))
    if bad:
        raise LeakageError(f"{where}: test slide(s) {bad} also in train/val")
    both = sorted(set(fold.train) & set(fold.val))
    if both:
        raise LeakageError(f"{where}: slide(s) {both} in both train and val")
    ex = sorted(set(fold.excluded) & set(fold.slides))
    if ex:
        raise LeakageError(f"{where}: excluded slide(s) {ex} still used")
    declared = sorted(n for n in fold.notes if n.startswith(OVERLAP_PREFIX))
    actual = sorted(overlap_notes(train_val, fold.test, patients))
    if fold.unit == "patient":
        if actual:
            raise LeakageError(
                f"{where}: patient-level fold shares test patients with train/val: "
                + "; ".join(a[len(OVERLAP_PREFIX) :] for a in actual)
            )
        if declared:
            raise LeakageError(f"{where}: patient-level fold must not declare patient overlap")
    elif declared != actual:
        raise LeakageError(
            f"{where}: patient overlap not declared accurately.\n  declared: {declared or 'nothing'}"
            f"\n  actual:   {actual or 'nothing'}"
        )


# ---- validation spots ------------------------------------------------------------------------
def split_validation_spots(
    spot_ids: Sequence[str], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Seeded random `fraction` of spots for validation (without replacement), order preserved.

    round(fraction * n) spots, clipped to [1, n - 1] when fraction > 0 and n >= 2, so validation
    is never empty and training never loses every spot. Spot ids must be unique across the pooled
    training slides (use "slide:spot").
    """
    ids = [str(s) for s in spot_ids]
    if len(set(ids)) != len(ids):
        raise ValueError("spot ids must be unique (prefix them with the slide name)")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    n = len(ids)
    if fraction == 0 or n < 2:
        return ids, []
    k = min(max(int(round(fraction * n)), 1), n - 1)
    chosen = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    return [s for i, s in enumerate(ids) if i not in chosen], [s for i, s in enumerate(ids) if i in chosen]


# ---- strategies ------------------------------------------------------------------------------
def _patients_of(slides: Sequence[str], patients: Mapping[str, str]) -> list[str]:
    return sorted({patients[s] for s in slides})


def _fold(
    index: int,
    name: str,
    train: Sequence[str],
    test: Sequence[str],
    unit: str,
    patients: Mapping[str, str],
    notes: Sequence[str] = (),
) -> Fold:
    train, test = sorted(train), sorted(test)
    extra = overlap_notes(train, test, patients) if unit == "slide" else []
    return Fold(index, name, tuple(train), (), tuple(test), unit, 0.0, {}, tuple(notes) + tuple(extra))


def leave_one_slice_out(
    patients: Mapping[str, str], *, excluded: Mapping[str, str] | None = None
) -> FoldPlan:
    """One fold per slide: test = that slide, train = every other slide (same patient included)."""
    slides = sorted(patients)
    if len(slides) < 2:
        return [], [f"leave-one-slice-out needs at least 2 usable slides, have {len(slides)}"]
    folds = [_fold(i, s, [t for t in slides if t != s], [s], "slide", patients) for i, s in enumerate(slides)]
    return folds, []


def leave_one_patient_out(
    patients: Mapping[str, str], *, excluded: Mapping[str, str] | None = None
) -> FoldPlan:
    """One fold per patient: test = all its slides, train = all other patients' slides."""
    pats = _patients_of(list(patients), patients)
    if len(pats) < 2:
        return [], [f"leave-one-patient-out needs at least 2 patients with usable slides, have {len(pats)}"]
    folds = []
    for i, p in enumerate(pats):
        test = [s for s in patients if patients[s] == p]
        folds.append(
            _fold(i, f"patient-{p}", [s for s in patients if patients[s] != p], test, "patient", patients)
        )
    return folds, []


def kfold(
    patients: Mapping[str, str],
    *,
    k: int = 3,
    groups: Sequence[Sequence[str]] | None = None,
    seed: int = 0,
    group_by_patient: bool = False,
    excluded: Mapping[str, str] | None = None,
) -> FoldPlan:
    """Slide-level k-fold. Explicit `groups` (each group is one fold's test set, e.g. 3/2/2 slides)
    or k groups from a seeded shuffle of the sorted slides (or patients, with group_by_patient)."""
    excluded = excluded or {}
    problems: list[str] = []
    unit = "patient" if group_by_patient else "slide"
    notes: list[str] = []
    if groups is not None:
        flat = [s for g in groups for s in g]
        dup = sorted({s for s in flat if flat.count(s) > 1})
        if dup:
            raise DataError(f"k-fold groups overlap: {dup}", field="groups")
        unknown = [s for s in flat if s not in patients and s not in excluded]
        if unknown:
            raise UnknownNameError("slide", unknown[0], sorted(set(patients) | set(excluded)))
        test_sets = []
        for i, g in enumerate(groups):
            gone = sorted(s for s in g if s in excluded)
            if gone:
                problems.append(
                    f"fold {i}: slide(s) {', '.join(gone)} dropped from its test group "
                    f"({'; '.join(f'{s}: {excluded[s]}' for s in gone)})"
                )
            usable = [s for s in g if s in patients]
            if usable:
                test_sets.append(usable)
            else:
                problems.append(f"fold {i}: no usable test slide left in group {list(g)}")
        always = sorted(set(patients) - set(flat))
        if always:
            notes.append(f"always in training (in no group): {', '.join(always)}")
    else:
        units = _patients_of(list(patients), patients) if group_by_patient else sorted(patients)
        if k < 2 or k > len(units):
            return [], [f"k-fold needs 2 <= k <= {len(units)} ({unit}s available), got k={k}"]
        order = [units[i] for i in np.random.default_rng(seed).permutation(len(units))]
        chunks = [sorted(c.tolist()) for c in np.array_split(np.array(order, dtype=object), k)]
        test_sets = [
            [s for s in sorted(patients) if (patients[s] if group_by_patient else s) in c] for c in chunks
        ]
    folds = []
    for i, test in enumerate(test_sets):
        train = [s for s in sorted(patients) if s not in test]
        if not train:
            problems.append(f"fold {i}: no training slide left")
            continue
        folds.append(_fold(len(folds), f"fold-{i}", train, test, unit, patients, notes))
    return folds, problems


def fixed_pool(
    patients: Mapping[str, str], *, pool: Sequence[str], excluded: Mapping[str, str] | None = None
) -> FoldPlan:
    """HINGE's Her2ST protocol: one fold per pool slide (e.g. A1, B1, ..., H1) as the test slide;
    train = every other usable slide, including the other sections of the same patient."""
    excluded = excluded or {}
    if not pool:
        raise DataError("fixed pool is empty", field="eval_pool")
    lacking = [s for s in pool if s in excluded]
    absent = [s for s in pool if s not in patients and s not in excluded]
    problems = []
    for reason in sorted({excluded[s] for s in lacking}):
        which = [s for s in lacking if excluded[s] == reason]
        problems.append(
            f"fixed pool: {len(which)} of {len(pool)} pool section(s) excluded ({reason}), "
            f"so they cannot be test slides: {', '.join(which)}"
        )
    if absent:
        problems.append(
            f"fixed pool: {len(absent)} of {len(pool)} pool section(s) not in the dataset: "
            f"{', '.join(absent)}"
        )
    folds = []
    for s in pool:
        if s in patients:
            train = [t for t in sorted(patients) if t != s]
            if not train:
                problems.append(f"fixed pool: no training slide for test slide {s}")
                continue
            folds.append(_fold(len(folds), s, train, [s], "slide", patients))
    return folds, problems


def donor_holdout(
    patients: Mapping[str, str],
    *,
    test_donors: Sequence[str],
    val_donors: Sequence[str] = (),
    excluded: Mapping[str, str] | None = None,
    all_patients: Mapping[str, str] | None = None,
) -> FoldPlan:
    """One fold: test = every usable slide of `test_donors`, val slides = those of `val_donors`
    (optional), train = the rest. Donor = patient."""
    everyone = dict(all_patients or patients)
    known = sorted(set(everyone.values()))
    for d in list(test_donors) + list(val_donors):
        if d not in known:
            raise UnknownNameError("donor", d, known)
    if set(test_donors) & set(val_donors):
        raise DataError(
            f"donors both test and validation: {sorted(set(test_donors) & set(val_donors))}",
            field="val_donors",
        )
    problems = []
    for d in test_donors:
        if not any(p == d for p in patients.values()):
            problems.append(
                f"donor hold-out: test donor {d} has no usable slide "
                f"({', '.join(sorted(s for s, p in everyone.items() if p == d))} excluded)"
            )
    test = sorted(s for s, p in patients.items() if p in set(test_donors))
    val = sorted(s for s, p in patients.items() if p in set(val_donors))
    train = sorted(s for s in patients if s not in test and s not in val)
    if not test or not train:
        return [], problems + ["donor hold-out: no test or no training slide left"]
    name = "donors-" + "+".join(test_donors)
    return [Fold(0, name, tuple(train), tuple(val), tuple(test), "patient", 0.0, {}, ())], problems


_SPLIT_RE = re.compile(r"^(train|test)_(\d+)\.csv$")


def read_split_files(split_dir: str | Path) -> list[tuple[int, list[str], list[str]]]:
    """HEST-Bench split CSVs: `train_<i>.csv` / `test_<i>.csv` with a `sample_id` column."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError("split folder not found", file=split_dir, field="splits")
    found: dict[int, dict[str, list[str]]] = {}
    for p in sorted(split_dir.iterdir()):
        m = _SPLIT_RE.match(p.name)
        if not m:
            continue
        with p.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "sample_id" not in reader.fieldnames:
                raise DataError(
                    f"no 'sample_id' column (columns: {reader.fieldnames})", file=p, field="sample_id"
                )
            ids = [str(r["sample_id"]).strip() for r in reader if str(r.get("sample_id") or "").strip()]
        if not ids:
            raise DataError("split file lists no sample", file=p, field="sample_id")
        found.setdefault(int(m.group(2)), {})[m.group(1)] = ids
    if not found:
        raise DataError("no train_<i>.csv / test_<i>.csv files", file=split_dir, field="splits")
    out = []
    for i in sorted(found):
        parts = found[i]
        for need in ("train", "test"):
            if need not in parts:
                raise DataError(
                    f"split {i} has no {need}_{i}.csv", file=split_dir / f"{need}_{i}.csv", field="splits"
                )
        out.append((i, parts["train"], parts["test"]))
    return out


def split_files(
    patients: Mapping[str, str],
    *,
    split_dir: str | Path,
    unit: str = "slide",
    excluded: Mapping[str, str] | None = None,
) -> FoldPlan:
    """Folds from HEST-Bench split files; slide id = sample_id."""
    excluded = excluded or {}
    problems = []
    folds = []
    for i, train_ids, test_ids in read_split_files(split_dir):
        for part, ids in (("train", train_ids), ("test", test_ids)):
            for s in ids:
                if s not in patients and s not in excluded:
                    err = UnknownNameError("slide", s, sorted(set(patients) | set(excluded)))
                    raise DataError(str(err), file=Path(split_dir) / f"{part}_{i}.csv", field="sample_id")
        gone = [s for s in test_ids if s in excluded]
        if gone:
            problems.append(
                f"split {i}: test slide(s) excluded: " + ", ".join(f"{s} ({excluded[s]})" for s in gone)
            )
        test = [s for s in test_ids if s in patients]
        train = [s for s in train_ids if s in patients]
        if not test or not train:
            problems.append(
                f"split {i}: no usable {'test' if not test else 'training'} slide left; fold skipped"
            )
            continue
        folds.append(_fold(len(folds), f"split-{i}", train, test, unit, patients))
    return folds, problems


STRATEGIES: dict[str, Callable[..., FoldPlan]] = {
    "leave_one_slice_out": leave_one_slice_out,
    "leave_one_patient_out": leave_one_patient_out,
    "kfold": kfold,
    "fixed_pool": fixed_pool,
    "donor_holdout": donor_holdout,
    "split_files": split_files,
}


def plan_folds(
    strategy: str,
    patients: Mapping[str, str],
    *,
    has_image: Mapping[str, bool] | None = None,
    require_image: bool = True,
    val_fraction: float = 0.1,
    val_slides: int = 0,
    seed: int = 0,
    strict: bool = False,
    **params: Any,
) -> FoldPlan:
    """Build, complete and leakage-check the folds of one strategy; return (folds, problems).

    Slides without an image are excluded (reason "no image") when `require_image`; a slide absent
    from `has_image` counts as having none. Validation is `val_fraction` of training spots, or,
    with `val_slides` > 0, that many training slides chosen with `seed` (val_fraction then 0).
    `strict=True` raises FoldPlanError on any problem; otherwise the caller gets (folds, problems),
    possibly ([], problems), and prints both (the CLI does).
    """
    if strategy not in STRATEGIES:
        raise UnknownNameError("split strategy", strategy, list(STRATEGIES))
    patients = {str(k): str(v) for k, v in patients.items()}
    excluded: dict[str, str] = {}
    if require_image:
        img = has_image or {}
        excluded = {s: "no image" for s in sorted(patients) if not img.get(s, False)}
    usable = {s: p for s, p in patients.items() if s not in excluded}
    extra = {"all_patients": patients} if strategy == "donor_holdout" else {}
    folds, problems = STRATEGIES[strategy](usable, excluded=excluded, **extra, **params)
    problems = list(problems)
    if excluded and strategy in ("leave_one_slice_out", "leave_one_patient_out", "kfold"):
        problems.insert(
            0,
            f"{len(excluded)} slide(s) without an image are excluded from training and testing: "
            f"{', '.join(sorted(excluded))}",
        )
    out = []
    for f in folds:
        train, val = list(f.train), list(f.val)
        frac = 0.0 if val else val_fraction
        if val_slides and not val:
            if len(train) <= val_slides:
                problems.append(
                    f"fold {f.name}: {len(train)} training slide(s), cannot hold out {val_slides} "
                    "for validation; using a fraction of training spots"
                )
            else:
                pick = np.random.default_rng(seed + f.index).permutation(len(train))[:val_slides]
                val = sorted(train[i] for i in pick)
                train = [s for s in train if s not in val]
                frac = 0.0
        notes = tuple(n for n in f.notes if not n.startswith(OVERLAP_PREFIX))
        if f.unit == "slide":
            notes += tuple(overlap_notes(train + val, f.test, patients))
        fold = Fold(f.index, f.name, tuple(train), tuple(val), f.test, f.unit, frac, dict(excluded), notes)
        check_leakage(fold, patients)
        out.append(fold)
    if strict and problems:
        raise FoldPlanError(problems)
    return out, problems
