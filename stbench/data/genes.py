"""Gene panels: which genes a benchmark predicts, chosen from TRAINING slides only.

A panel is fixed before any test slide is looked at, saved with the results, and identified by a
hash, so two result rows with the same panel hash predicted exactly the same genes in the same
order. Rules (see docs/protocols.md for the full definitions and the papers they reproduce):

    hmhvg     top-n by mean  ∩  top-n by variance (Stem / HINGE; n = 300; statistics on raw counts)
    top_var   top-n by variance (DiffBulk top-100/200, HEST-Bench 50, PCC-k sets; on log1p counts)
    top_mean  top-n by mean (ST-Net's 250; on raw counts)
    hvg       scanpy highly_variable_genes(flavor="seurat_v3") on raw counts, one batch per slide
    list      an explicit list (or a file: one gene per line, or JSON list / {"genes": [...]})
    all       every gene the training slides share (after vocabulary and exclusion filters)

Statistics pool all training spots (each spot weighs the same) unless `pool="slides"`, and are
rounded to 10 significant digits before ranking so the panel never depends on summation order;
ties are broken by gene name. Every panel is stored ordered by decreasing training variance of
log1p(counts) (ties by name), so `panel.top_k(k)` is the honest PCC-k gene set.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from stbench.data.slide import Slide
from stbench.errors import DataError, UnknownNameError
from stbench.utils.io import stable_hash, write_json_atomic

RULES = ("hmhvg", "top_var", "top_mean", "hvg", "list", "all")
DEFAULT_N = {"hmhvg": 300, "top_var": 200, "top_mean": 250, "hvg": 2000}
# Scale the ranking statistics are computed on, per rule (see module docstring / docs).
DEFAULT_ON = {"hmhvg": "raw", "top_var": "log", "top_mean": "raw", "hvg": "raw", "list": "log", "all": "log"}
MISSING_POLICIES = ("intersect", "zero")

# Presets for `exclude`: regular expressions, written for human (upper) and mouse (title) case.
EXCLUDE_PRESETS = {
    "mito": r"^(MT|mt|Mt)-",
    # Cytosolic ribosomal proteins (RPS6, RPL10A, RPLP0, RPSA, RPS4Y1, RPL36AL ...) but not
    # look-alikes such as the kinase RPS6KA1.
    "ribo": r"^(RP[SL]|Rp[sl])(\d+(A|AL|L|X|Y\d?|a|al|l|x|y\d?)?|[Pp]\d|[Aa])$",
}

_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*[GTP]\d{6,})\.\d+$")
_SIG_DIGITS = 10


def harmonise_gene_names(names: Iterable[str]) -> list[str]:
    """Canonical gene names: strip whitespace and drop Ensembl version suffixes (ENSG...\\.7).

    Case is kept: human symbols are upper case, mouse symbols title case, and some human symbols
    carry lower-case letters (C1orf122), so case-folding would merge or break identifiers.
    """
    out = []
    for n in names:
        s = str(n).strip()
        m = _ENSEMBL_VERSION.match(s)
        out.append(m.group(1) if m else s)
    return out


@dataclass(frozen=True)
class GenePanel:
    """The genes a benchmark predicts, in a fixed order, and how they were chosen.

    `hash` covers rule + genes + params but NOT `train_slides`: it identifies *what is predicted
    and by which rule*, so folds whose training sets yield the same genes share a panel id; the
    training slides are still saved in the JSON for provenance.
    """

    rule: str
    genes: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    train_slides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "genes", tuple(self.genes))
        object.__setattr__(self, "train_slides", tuple(self.train_slides))
        if len(set(self.genes)) != len(self.genes):
            raise DataError("gene panel has duplicate genes", field="genes")

    def __len__(self) -> int:
        return len(self.genes)

    @property
    def hash(self) -> str:
        return stable_hash({"rule": self.rule, "genes": list(self.genes), "params": self.params})

    @property
    def missing(self) -> str:
        return str(self.params.get("missing", "intersect"))

    def top_k(self, k: int) -> tuple[str, ...]:
        """The k genes of highest training variance (the PCC-k set), fixed before testing."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return self.genes[:k]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "genes": list(self.genes),
            "params": self.params,
            "train_slides": list(self.train_slides),
            "hash": self.hash,
            "n_genes": len(self.genes),
        }

    def save(self, path: str | Path) -> Path:
        write_json_atomic(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> GenePanel:
        try:
            d = json.loads(Path(path).read_text())
            panel = cls(
                d["rule"], tuple(d["genes"]), dict(d.get("params", {})), tuple(d.get("train_slides", ()))
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"cannot read gene panel: {exc}", file=path) from exc
        if "hash" in d and d["hash"] != panel.hash:
            raise DataError(
                f"gene panel hash mismatch (file says {d['hash']}, content gives {panel.hash}); "
                "the file was edited",
                file=path,
                field="hash",
            )
        return panel


# ---- helpers -------------------------------------------------------------------------------------
def _exclude_matcher(exclude: Sequence[str]) -> re.Pattern[str] | None:
    """Presets ("mito", "ribo"), regexes ("re:^HB[AB]"), otherwise case-sensitive prefixes ("MT-")."""
    parts = []
    for e in exclude:
        if e in EXCLUDE_PRESETS:
            parts.append(EXCLUDE_PRESETS[e])
        elif e.startswith("re:"):
            parts.append(e[3:])
        else:
            parts.append("^" + re.escape(e))
    return re.compile("|".join(f"(?:{p})" for p in parts)) if parts else None


def _slide_genes(slide: Slide) -> dict[str, int]:
    names = harmonise_gene_names(slide.adata.var_names)
    index: dict[str, int] = {}
    dups = []
    for i, g in enumerate(names):
        if g in index:
            dups.append(g)
        index[g] = i
    if dups:
        raise DataError(
            f"gene names collide after harmonisation (version suffix / whitespace): {dups[:5]}",
            file=slide.source,
            slide=slide.name,
            field="var_names",
        )
    return index


def _csr(slide: Slide) -> sp.csr_matrix:
    x = slide.adata.X
    return sp.csr_matrix(x, dtype=np.float64) if not sp.issparse(x) else x.tocsr().astype(np.float64)


def _round_sig(x: np.ndarray, digits: int = _SIG_DIGITS) -> np.ndarray:
    """Round to `digits` significant digits, so values equal in exact arithmetic tie."""
    return np.array([float(f"{v:.{digits}g}") for v in np.asarray(x, dtype=np.float64)])


def gene_stats(
    slides: Sequence[Slide], genes: Sequence[str], *, on: str = "log", pool: str = "spots"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and (population) variance over the training spots of `slides`.

    `on`: "raw" counts or "log" = log1p(counts) (rankings equal those on log2(1+counts)).
    `pool`: "spots" (all spots pooled, each weighs the same) or "slides" (per-slide statistics
    averaged, each slide weighs the same). Genes a slide lacks count as zero there.
    """
    if on not in ("raw", "log"):
        raise ValueError(f"on must be 'raw' or 'log', got {on!r}")
    if pool not in ("spots", "slides"):
        raise ValueError(f"pool must be 'spots' or 'slides', got {pool!r}")
    g = len(genes)
    s1, s2, n = np.zeros(g), np.zeros(g), 0
    per_slide: list[tuple[np.ndarray, np.ndarray]] = []
    for slide in slides:
        idx = _slide_genes(slide)
        cols = [idx.get(name, -1) for name in genes]
        present = np.array([c >= 0 for c in cols], dtype=bool)
        x = _csr(slide)[:, [c for c in cols if c >= 0]]
        if on == "log":
            x.data = np.log1p(x.data)
        a1, a2 = np.zeros(g), np.zeros(g)
        a1[present] = np.asarray(x.sum(axis=0)).ravel()
        a2[present] = np.asarray(x.multiply(x).sum(axis=0)).ravel()
        s1, s2, n = s1 + a1, s2 + a2, n + x.shape[0]
        m = a1 / x.shape[0]
        per_slide.append((m, np.maximum(a2 / x.shape[0] - m * m, 0.0)))
    if n == 0:
        raise DataError("no training spots to compute gene statistics from", field="train_slides")
    if pool == "slides":
        mean = np.mean([m for m, _ in per_slide], axis=0)
        var = np.mean([v for _, v in per_slide], axis=0)
    else:
        mean = s1 / n
        var = np.maximum(s2 / n - mean * mean, 0.0)
    return _round_sig(mean), _round_sig(var)


def rank_genes(genes: Sequence[str], score: np.ndarray) -> list[str]:
    """Genes by decreasing score; equal scores ordered by gene name (deterministic)."""
    order = np.lexsort((np.asarray(genes, dtype=object).astype(str), -np.asarray(score, dtype=np.float64)))
    return [genes[i] for i in order]


def _read_gene_list(gene_list: Sequence[str] | str | Path) -> tuple[list[str], str | None]:
    if isinstance(gene_list, (str, Path)):
        path = Path(gene_list)
        if not path.is_file():
            raise DataError("gene list file not found", file=path, field="gene_list")
        text = path.read_text()
        if path.suffix.lower() == ".json":
            try:
                obj = json.loads(text)
            except ValueError as exc:
                raise DataError(f"invalid JSON gene list: {exc}", file=path, field="gene_list") from exc
            names = obj.get("genes") if isinstance(obj, dict) else obj
            if not isinstance(names, list):
                raise DataError("JSON gene list must be a list or {'genes': [...]}", file=path, field="genes")
        else:
            names = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        return harmonise_gene_names(names), str(path)
    return harmonise_gene_names(gene_list), None


def _candidates(
    slides: Sequence[Slide], missing: str, vocabulary: set[str] | None, matcher: re.Pattern[str] | None
) -> tuple[list[str], dict[str, str]]:
    """Shared (or union) gene set after vocabulary and exclusion filters, and why others dropped."""
    sets = [set(_slide_genes(s)) for s in slides]
    union = set().union(*sets)
    shared = set.intersection(*sets) if missing == "intersect" else union
    why: dict[str, str] = {}
    for gname in union - shared:
        lacking = [s.name for s, gs in zip(slides, sets, strict=True) if gname not in gs]
        why[gname] = f"missing from training slide(s) {lacking[:5]} (missing='intersect'; use missing='zero')"
    keep = set()
    for gname in shared:
        if vocabulary is not None and gname not in vocabulary:
            why[gname] = "not in the model vocabulary"
        elif matcher is not None and matcher.search(gname):
            why[gname] = "excluded by the `exclude` patterns"
        else:
            keep.add(gname)
    return sorted(keep), why


def select_genes(
    slides: Sequence[Slide],
    rule: str = "hmhvg",
    *,
    n: int | None = None,
    gene_list: Sequence[str] | str | Path | None = None,
    vocabulary: Iterable[str] | None = None,
    exclude: Sequence[str] = (),
    missing: str = "intersect",
    batch_key: str | None = "slide",
    on: str | None = None,
    pool: str = "spots",
    order_on: str = "log",
) -> GenePanel:
    """Choose a gene panel from TRAINING slides only (never pass a test slide here).

    Order of operations: harmonise names -> shared genes (`missing`) -> vocabulary -> `exclude`
    -> rule -> order by decreasing training variance (on `order_on`, ties by name).
    """
    if rule not in RULES:
        raise UnknownNameError("gene rule", rule, list(RULES))
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    if not slides:
        raise DataError("gene selection needs at least one training slide", field="train_slides")
    names = [s.name for s in slides]
    if len(set(names)) != len(names):
        raise DataError(
            f"duplicate training slides {sorted({x for x in names if names.count(x) > 1})}",
            field="train_slides",
        )
    if rule in ("list", "all") and n is not None:
        raise ValueError(f"rule {rule!r} takes no n")
    if rule == "list" and gene_list is None:
        raise ValueError("rule 'list' needs gene_list")
    if rule != "list" and gene_list is not None:
        raise ValueError(f"gene_list is only used by rule 'list', not {rule!r}")
    n = DEFAULT_N.get(rule) if n is None else int(n)
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    on = DEFAULT_ON[rule] if on is None else on

    vocab = set(harmonise_gene_names(vocabulary)) if vocabulary is not None else None
    genes, why = _candidates(slides, missing, vocab, _exclude_matcher(exclude))
    params: dict[str, Any] = {
        "missing": missing,
        "exclude": list(exclude),
        "order": "variance_desc",
        "order_on": order_on,
    }
    if rule not in ("list", "all"):
        params.update(n=n, on=on, pool=pool)
    if vocab is not None:
        params.update(vocabulary_size=len(vocab), vocabulary_hash=stable_hash(sorted(vocab)))

    if rule == "list":
        wanted, list_file = _read_gene_list(gene_list)  # type: ignore[arg-type]
        dups = sorted({x for x in wanted if wanted.count(x) > 1})
        if dups:
            raise DataError(f"duplicate genes in the gene list: {dups[:5]}", file=list_file, field="genes")
        allowed = set(genes)
        for gname in wanted:
            if gname in allowed:
                continue
            if gname in why:
                raise DataError(
                    f"gene {gname!r} of the list cannot be used: {why[gname]}", file=list_file, field="genes"
                )
            if list_file is not None:
                err = UnknownNameError("gene", gname, genes)
                raise DataError(f"{err} (in no training slide)", file=list_file, field="genes")
            raise UnknownNameError("gene", gname, genes)
        chosen = wanted
        params["list_hash"] = stable_hash(wanted)
        if list_file is not None:
            params["list_file"] = Path(list_file).name
    elif rule == "all":
        chosen = genes
    elif rule == "hvg":
        chosen = _seurat_v3(slides, genes, n, batch_key)
        params["batch_key"] = batch_key
    else:
        if not genes:
            raise DataError("no candidate genes left after the vocabulary / exclude filters", field="genes")
        mean, var = gene_stats(slides, genes, on=on, pool=pool)
        by_mean, by_var = rank_genes(genes, mean)[:n], rank_genes(genes, var)[:n]
        if rule == "top_mean":
            chosen = by_mean
        elif rule == "top_var":
            chosen = by_var
        else:  # hmhvg
            chosen = sorted(set(by_mean) & set(by_var))
    if not chosen:
        raise DataError(f"gene rule {rule!r} selected no genes", field="genes")
    _, order_var = gene_stats(slides, chosen, on=order_on, pool=pool)
    ordered = rank_genes(list(chosen), order_var)
    return GenePanel(rule, tuple(ordered), params, tuple(names))


def _seurat_v3(slides: Sequence[Slide], genes: list[str], n: int, batch_key: str | None) -> list[str]:
    """scanpy's seurat_v3 HVGs on raw counts of the training spots (batch = slide or patient)."""
    import scanpy as sc

    if batch_key not in (None, "slide", "patient"):
        raise ValueError(f"batch_key must be 'slide', 'patient' or None, got {batch_key!r}")
    a = training_anndata(slides, genes)
    try:
        sc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=min(n, a.n_vars), batch_key=batch_key)
    except ImportError as exc:  # seurat_v3 needs scikit-misc (loess)
        raise DataError(f"rule 'hvg' (seurat_v3) needs the package scikit-misc: {exc}", field="rule") from exc
    return [g for g, hv in zip(a.var_names, a.var["highly_variable"], strict=True) if hv]


def training_anndata(slides: Sequence[Slide], genes: Sequence[str]) -> Any:
    """Concatenated raw counts of `slides` on `genes` (zeros where a slide lacks a gene),
    obs columns `slide` and `patient` (what scanpy's batch_key needs)."""
    import anndata as ad
    import pandas as pd

    mats, obs = [], []
    for s in slides:
        mats.append(sp.csr_matrix(_panel_block(s, list(genes), allow_missing=True)))
        obs.append(
            pd.DataFrame(
                {"slide": s.name, "patient": s.patient}, index=[f"{s.name}:{i}" for i in s.adata.obs_names]
            )
        )
    return ad.AnnData(
        X=sp.vstack(mats).tocsr(),
        obs=pd.concat(obs),
        var=pd.DataFrame(index=pd.Index(list(genes), name="gene")),
    )


def _panel_block(slide: Slide, genes: list[str], *, allow_missing: bool) -> np.ndarray:
    idx = _slide_genes(slide)
    absent = [g for g in genes if g not in idx]
    if absent and not allow_missing:
        raise DataError(
            f"{len(absent)} panel gene(s) missing from this slide: {absent[:10]} "
            "(panel built with missing='intersect'; rebuild with missing='zero' if absence means "
            "zero counts)",
            file=slide.source,
            slide=slide.name,
            field="genes",
        )
    x = _csr(slide)
    out = np.zeros((slide.n_spots, len(genes)), dtype=np.float32)
    pos = [j for j, g in enumerate(genes) if g in idx]
    if pos:
        out[:, pos] = x[:, [idx[genes[j]] for j in pos]].toarray()
    return out


def panel_matrix(slide: Slide, panel: GenePanel) -> np.ndarray:
    """(spots x panel genes) float32 raw counts, in panel order.

    Genes absent from this slide are zeros under missing="zero" and an error naming the slide and
    genes under missing="intersect".
    """
    return _panel_block(slide, list(panel.genes), allow_missing=panel.missing == "zero")


def spot_totals(slide: Slide) -> np.ndarray:
    """Library size per spot over ALL genes of the slide (not only the panel), float64."""
    return np.asarray(_csr(slide).sum(axis=1)).ravel()
