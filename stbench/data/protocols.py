"""Named evaluation protocols: split + gene panel + target transform + validation + metrics + seeds.

Each built-in reproduces a paper's evaluation (table in docs/protocols.md). `Protocol.folds`
returns only folds that passed `check_leakage`, plus the readable problems found while planning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stbench.data.genes import GenePanel, select_genes
from stbench.data.normalize import TargetTransform
from stbench.data.slide import Slide
from stbench.data.splits import STRATEGIES, UNITS, Fold, FoldPlanError, check_leakage, plan_folds
from stbench.errors import UnknownNameError
from stbench.utils.io import stable_hash


@dataclass(frozen=True)
class Protocol:
    """A complete evaluation recipe. `gene_variants` are named alternative panels (DiffBulk's
    top-100 / top-200 / all); `use_vocabulary` intersects genes with the method's vocabulary
    (HINGE: CellFM's) when the method has one."""

    name: str
    description: str
    split: str
    split_params: dict[str, Any] = field(default_factory=dict)
    gene_rule: str = "hmhvg"
    gene_params: dict[str, Any] = field(default_factory=dict)
    gene_variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    use_vocabulary: bool = False
    target: dict[str, Any] = field(default_factory=lambda: {"method": "log1p"})
    validation: dict[str, Any] = field(default_factory=lambda: {"fraction": 0.1})
    metrics: tuple[str, ...] = ("pcc", "mse", "mae")
    seeds: tuple[int, ...] = (0,)
    require_image: bool = True
    unit: str = "slide"
    reproduces: str = ""
    fallback_split: str | None = None  # used when the split's required input (e.g. a pool) is absent
    # Genes the paper maps in its figures: the report's spatial maps show these first where present.
    marker_genes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for s in (self.split, self.fallback_split):
            if s is not None and s not in STRATEGIES:
                raise UnknownNameError("split strategy", s, list(STRATEGIES))
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if set(self.validation) - {"fraction", "slides"}:
            raise ValueError(f"validation takes 'fraction' or 'slides', got {sorted(self.validation)}")
        TargetTransform(**self.target)  # validates the target settings early

    # ---- splits ------------------------------------------------------------------------------
    def folds(
        self,
        slides: Mapping[str, str],
        has_image: Mapping[str, bool] | None = None,
        eval_pool: Sequence[str] | None = None,
        groups: Sequence[Sequence[str]] | None = None,
        split_dir: str | Path | None = None,
        test_donors: Sequence[str] | None = None,
        val_donors: Sequence[str] = (),
        strict: bool = False,
    ) -> tuple[list[Fold], list[str]]:
        """Folds for a dataset given its slide -> patient map; every fold passed check_leakage.

        `eval_pool`, `groups`, `test_donors` and `split_dir` come from the dataset card or the
        caller; a protocol whose split needs one that is missing falls back or raises FoldPlanError.
        """
        strategy, params = self.split, dict(self.split_params)
        if strategy == "fixed_pool":
            if eval_pool:
                params["pool"] = list(eval_pool)
            elif self.fallback_split:
                strategy = self.fallback_split
            else:
                raise FoldPlanError([f"protocol {self.name!r} needs an evaluation pool (eval_pool)"])
        elif strategy == "kfold" and groups is not None:
            params = {
                "groups": [list(g) for g in groups],
                "group_by_patient": params.get("group_by_patient", False),
            }
        elif strategy == "donor_holdout":
            if not test_donors:
                raise FoldPlanError([f"protocol {self.name!r} needs the held-out donors (test_donors)"])
            params.update(test_donors=list(test_donors), val_donors=list(val_donors))
        elif strategy == "split_files":
            if split_dir is None:
                raise FoldPlanError([f"protocol {self.name!r} needs the split folder (split_dir)"])
            params["split_dir"] = split_dir
        val = self.validation
        folds, problems = plan_folds(
            strategy,
            slides,
            has_image=has_image,
            require_image=self.require_image,
            val_fraction=float(val.get("fraction", 0.0)) if "slides" not in val else 0.0,
            val_slides=int(val.get("slides", 0)),
            strict=strict,
            **params,
        )
        patients = {str(k): str(v) for k, v in slides.items()}
        for f in folds:  # belt and braces: nothing leaves here unchecked
            check_leakage(f, patients)
            if f.unit != self.unit:
                raise FoldPlanError(
                    [f"protocol {self.name!r} is {self.unit}-level but fold {f.name} is {f.unit}-level"]
                )
        return folds, problems

    # ---- genes and targets -------------------------------------------------------------------
    def gene_panel(
        self,
        train_slides: Sequence[Slide],
        variant: str | None = None,
        vocabulary: Iterable[str] | None = None,
        **overrides: Any,
    ) -> GenePanel:
        """The protocol's panel computed on TRAINING slides (vocabulary used only if declared)."""
        if variant is None:
            spec = {"rule": self.gene_rule, **self.gene_params}
        elif variant in self.gene_variants:
            spec = dict(self.gene_variants[variant])
        else:
            raise UnknownNameError("gene panel variant", variant, list(self.gene_variants))
        if "rule" in overrides and overrides["rule"] != spec["rule"]:
            spec = {}  # another rule: the protocol's own parameters (e.g. n) belong to its rule only
        spec.update(overrides)
        rule = spec.pop("rule")
        vocab = vocabulary if self.use_vocabulary else None
        return select_genes(train_slides, rule, vocabulary=vocab, **spec)

    def target_spec(self, counts: str = "raw") -> dict[str, Any]:
        """The target actually applied on a dataset whose values are `counts` (its card's
        declaration): the protocol's for raw counts, method "none" for normalised values."""
        return target_for_counts(self.target, counts)

    def target_transform(self, counts: str = "raw") -> TargetTransform:
        return TargetTransform(**self.target_spec(counts))

    def fit_fold(
        self,
        fold: Fold,
        slides: Mapping[str, Slide],
        variant: str | None = None,
        vocabulary: Iterable[str] | None = None,
        **overrides: Any,
    ) -> tuple[GenePanel, TargetTransform]:
        """Gene panel and fitted target transform of one fold, from its TRAINING slides only.

        Validation and test slides are never read here, so their counts cannot move either."""
        missing = [s for s in fold.train if s not in slides]
        if missing:
            raise FoldPlanError([f"fold {fold.name}: training slide(s) not loaded: {missing}"])
        train = [slides[s] for s in fold.train]
        panel = self.gene_panel(train, variant=variant, vocabulary=vocabulary, **overrides)
        return panel, self.target_transform().fit_slides(train, panel)

    # ---- description -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"], d["seeds"] = list(self.metrics), list(self.seeds)
        return d

    @property
    def hash(self) -> str:
        return stable_hash(self.to_dict())


def target_for_counts(spec: str | Mapping[str, Any], counts: str) -> dict[str, Any]:
    """A target spec adjusted to a dataset's `counts` declaration.

    "raw": unchanged. "normalized" (values already normalised or log-transformed): method "none",
    so nothing is normalised twice; the per-gene scale step (zscore, minmax), fitted on training
    spots, is kept, as it changes no library size."""
    if counts not in ("raw", "normalized"):
        raise ValueError(f"counts must be 'raw' or 'normalized', got {counts!r}")
    out = {"method": spec} if isinstance(spec, str) else dict(spec)
    if counts == "normalized":
        out["method"] = "none"
    return out


def target_label(method: str, counts: str = "raw") -> str:
    """The row's `target` field: the transform's method, or "none (counts: normalized)" when the
    dataset declared its values normalised and the protocol's transform was skipped."""
    return f"{method} (counts: normalized)" if counts == "normalized" else method


_VAL10 = {"fraction": 0.1}
# normalize_total(1e4) over ALL genes of the spot, then log1p: scanpy's convention, DeepSpot's code.
_WHOLE = {"method": "normalize_log1p", "target_sum": 1e4}
_HMHVG = {"n": 300, "on": "raw", "pool": "spots"}

PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in [
        Protocol(
            name="loso",
            description="Leave-one-slice-out: each slide is the test slide once; all other slides train "
            "(other sections of the test patient included, declared); 10% of training spots "
            "validate; HMHVG-300 genes; target normalize_log1p: normalize_total(1e4) over the whole "
            "transcriptome of the spot, then log1p (scanpy's convention, as DeepSpot's code does). "
            "Declared variants (data.target): log1p of raw counts (HEST-Bench's code), log2p1 "
            "(Stem's and HINGE's), normalize_log1p_panel (TRIPLEX's: normalize_total(1e4) over its "
            "selected genes, then log1p), stnet (ST-Net's log((1+y)/(n+Z))).",
            split="leave_one_slice_out",
            gene_rule="hmhvg",
            gene_params=dict(_HMHVG),
            target=dict(_WHOLE),
            validation=dict(_VAL10),
            metrics=("pcc", "pcc50", "pcc200", "mse", "mae"),
            seeds=(0,),
            unit="slide",
            reproduces="common slice-level protocol; its split and panel are stbench's, its target is "
            "DeepSpot's (normalize_total(1e4) over the whole transcriptome, then log1p), not any "
            "paper's complete evaluation",
        ),
        Protocol(
            name="lopo",
            description="Leave-one-patient-out: all slides of one patient test; other patients train; "
            "10% of training spots validate; HMHVG-300; target normalize_log1p: normalize_total(1e4) "
            "over the whole transcriptome, then log1p (scanpy's convention, as DeepSpot's code does). "
            "ST-Net's own target, log((1+y)/(n+Z)), is the declared variant data.target=stnet.",
            split="leave_one_patient_out",
            gene_rule="hmhvg",
            gene_params=dict(_HMHVG),
            target=dict(_WHOLE),
            validation=dict(_VAL10),
            metrics=("pcc", "pcc50", "pcc200", "mse", "mae"),
            seeds=(0,),
            unit="patient",
            reproduces="ST-Net (He et al. 2020) patient-level cross-validation (split only; the target "
            "is DeepSpot's, ST-Net's is the stnet variant)",
        ),
        Protocol(
            name="hinge",
            description="HINGE: slice-level; with a dataset evaluation pool (Her2ST: A1..H1) one fold per "
            "pool section, else leave-one-slice-out; genes = HMHVG (top-300 mean ∩ top-300 "
            "variance on training raw counts) after intersecting with the method vocabulary; "
            "log2(1+x) of raw counts as targets (Stem's and HINGE's code); 10% of training spots for "
            "early stopping; PCC-50/PCC-200 on "
            "the panel's most variable genes, MSE/MAE over all panel genes; seeds 0, 1, 2.",
            split="fixed_pool",
            fallback_split="leave_one_slice_out",
            gene_rule="hmhvg",
            gene_params=dict(_HMHVG),
            use_vocabulary=True,
            target={"method": "log2p1"},
            validation=dict(_VAL10),
            metrics=("pcc50", "pcc200", "mse", "mae"),
            seeds=(0, 1, 2),
            unit="slide",
            reproduces="HINGE (Table 1; appendix 'Evaluation protocol')",
            marker_genes=("KRT6A", "GNAS", "FXYD2"),
        ),
        Protocol(
            name="diffbulk",
            description="DiffBulk: slide-level 3-fold CV (explicit groups from the dataset card, e.g. "
            "CrunchDAO 3/2/2, else 3 seeded folds); genes = top-200 by training variance of "
            "log1p counts (variants top100, top200, all); targets log1p of the raw pseudo-bulk "
            "counts, no library-size normalisation (as HEST-Bench's code does for its targets).",
            split="kfold",
            split_params={"k": 3, "seed": 0},
            gene_rule="top_var",
            gene_params={"n": 200},
            gene_variants={
                "top100": {"rule": "top_var", "n": 100},
                "top200": {"rule": "top_var", "n": 200},
                "all": {"rule": "all"},
            },
            target={"method": "log1p"},
            validation=dict(_VAL10),
            metrics=("pcc", "pcc_flat", "mse", "mae"),
            seeds=(0,),
            unit="slide",
            reproduces="DiffBulk (Table I)",
        ),
        Protocol(
            name="stmdit",
            description="STMDiT: donor-level hold-out (test donors from the dataset card); genes = 3,000 "
            "seurat_v3 HVGs with batch = slide; targets normalize_total(1e4) over the whole "
            "transcriptome + log1p + z-score fitted on training spots; image metrics FID and oracle AUC.",
            split="donor_holdout",
            gene_rule="hvg",
            gene_params={"n": 3000, "batch_key": "slide"},
            target={"method": "normalize_log1p", "target_sum": 1e4, "scale": "zscore"},
            validation=dict(_VAL10),
            metrics=("fid", "oracle_auc"),
            seeds=(42,),
            unit="patient",
            reproduces="STMDiT (FID per regime, oracle AUC)",
        ),
        Protocol(
            name="hest",
            description="HEST-Bench: folds from the task's split files (splits/train_<i>.csv, "
            "test_<i>.csv); 50 genes (the task's list via gene_list=..., else top-50 by "
            "training variance of log1p); targets log1p of raw counts, as HEST-Bench's code does "
            "(no library-size normalisation, despite its docstring).",
            split="split_files",
            split_params={"unit": "slide"},
            gene_rule="top_var",
            gene_params={"n": 50},
            target={"method": "log1p"},
            validation=dict(_VAL10),
            metrics=("pcc", "mse", "mae"),
            seeds=(0,),
            unit="slide",
            reproduces="HEST-Bench (Jaume et al. 2024); STFlow's evaluation",
        ),
    ]
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise UnknownNameError("protocol", name, list(PROTOCOLS))
    return PROTOCOLS[name]


def register_protocol(protocol: Protocol, *, overwrite: bool = False) -> Protocol:
    """Add a user protocol to the registry (refuses to silently replace a built-in)."""
    if protocol.name in PROTOCOLS and not overwrite:
        raise ValueError(f"protocol {protocol.name!r} already registered")
    PROTOCOLS[protocol.name] = protocol
    return protocol
