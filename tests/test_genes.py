"""Gene panels: each rule against an independent numpy computation, ties, missing genes, files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stbench.data.genes import (
    EXCLUDE_PRESETS,
    GenePanel,
    gene_stats,
    harmonise_gene_names,
    panel_matrix,
    select_genes,
    spot_totals,
)
from stbench.data.slide import Slide, make_adata
from stbench.errors import DataError, UnknownNameError


def make_slide(name: str, counts: np.ndarray, genes: list[str], patient: str | None = None) -> Slide:
    n = counts.shape[0]
    coords = np.stack([np.arange(n) * 10.0, np.zeros(n)], axis=1)
    return Slide(name, patient or name[0], make_adata(counts, [f"s{i}" for i in range(n)], genes, coords))


def random_slides(seed: int, n_slides: int = 3, n_genes: int = 40, n_spots: int = 30) -> list[Slide]:
    rng = np.random.default_rng(seed)
    genes = [f"G{i:03d}" for i in range(n_genes)]
    lam = rng.gamma(0.6, 4.0, size=n_genes)
    return [
        make_slide(f"S{k}", rng.poisson(lam * rng.uniform(0.5, 2), size=(n_spots, n_genes)), genes)
        for k in range(n_slides)
    ]


def _round(x: np.ndarray) -> np.ndarray:
    return np.array([float(f"{v:.10g}") for v in x])


def _rank(genes: list[str], score: np.ndarray) -> list[str]:
    """Independent ranking: decreasing score, ties by name."""
    return [g for _, g in sorted(zip((-s for s in score), genes, strict=True))]


def _pooled(slides: list[Slide], log: bool) -> tuple[list[str], np.ndarray]:
    genes = sorted(set.intersection(*[set(s.genes) for s in slides]))
    x = np.concatenate([s.to_scanpy()[:, genes].X.toarray() for s in slides]).astype(np.float64)
    return genes, (np.log1p(x) if log else x)


def _order_by_log_var(slides: list[Slide], chosen: list[str]) -> list[str]:
    genes, x = _pooled(slides, log=True)
    var = _round(x.var(axis=0))
    return [g for g in _rank(genes, var) if g in set(chosen)]


# ---- names -------------------------------------------------------------------------------------
def test_harmonise_strips_and_drops_ensembl_versions_but_keeps_case() -> None:
    names = [" ACTB ", "ENSG00000141510.17", "ENSMUSG00000059552.9", "Actb", "C1orf122", "HLA-A"]
    assert harmonise_gene_names(names) == [
        "ACTB",
        "ENSG00000141510",
        "ENSMUSG00000059552",
        "Actb",
        "C1orf122",
        "HLA-A",
    ]


def test_colliding_names_after_harmonisation_are_an_error() -> None:
    s = make_slide("S0", np.ones((3, 2)), ["ENSG00000000001.1", "ENSG00000000001.2"])
    with pytest.raises(DataError, match="collide") as e:
        select_genes([s], "all")
    assert e.value.slide == "S0"


# ---- rules vs numpy ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hmhvg_equals_numpy_on_raw_counts(seed: int) -> None:
    slides = random_slides(seed)
    panel = select_genes(slides, "hmhvg", n=15)
    genes, x = _pooled(slides, log=False)
    top_mean = set(_rank(genes, _round(x.mean(0)))[:15])
    top_var = set(_rank(genes, _round(x.var(0)))[:15])
    assert set(panel.genes) == top_mean & top_var
    assert list(panel.genes) == _order_by_log_var(slides, list(top_mean & top_var))
    assert panel.params["on"] == "raw" and panel.params["n"] == 15
    assert panel.train_slides == ("S0", "S1", "S2")


@pytest.mark.parametrize("seed", [0, 3])
def test_top_var_uses_log1p_and_top_mean_uses_raw(seed: int) -> None:
    slides = random_slides(seed)
    genes, xl = _pooled(slides, log=True)
    _, xr = _pooled(slides, log=False)
    tv = select_genes(slides, "top_var", n=10)
    assert set(tv.genes) == set(_rank(genes, _round(xl.var(0)))[:10])
    assert list(tv.genes) == _rank(genes, _round(xl.var(0)))[:10]  # already ordered by log variance
    tm = select_genes(slides, "top_mean", n=12)
    assert set(tm.genes) == set(_rank(genes, _round(xr.mean(0)))[:12])
    assert select_genes(slides, "top_var", n=10, on="raw").genes != () and set(
        select_genes(slides, "top_var", n=10, on="raw").genes
    ) == set(_rank(genes, _round(xr.var(0)))[:10])


def test_default_sizes() -> None:
    slides = random_slides(0, n_genes=400, n_spots=20, n_slides=2)
    assert len(select_genes(slides, "top_var")) == 200
    assert len(select_genes(slides, "top_mean")) == 250
    assert len(select_genes(slides, "hmhvg")) <= 300
    assert len(select_genes(slides, "all")) == 400


def test_pool_slides_averages_per_slide_statistics() -> None:
    slides = random_slides(5, n_spots=25)
    slides.append(make_slide("S9", np.random.default_rng(1).poisson(3.0, size=(5, 40)), slides[0].genes))
    genes = slides[0].genes
    mean, var = gene_stats(slides, genes, on="raw", pool="slides")
    per = [s.counts().astype(np.float64) for s in slides]
    np.testing.assert_allclose(mean, np.mean([p.mean(0) for p in per], axis=0), rtol=1e-9)
    np.testing.assert_allclose(var, np.mean([p.var(0) for p in per], axis=0), rtol=1e-9)


def test_ties_broken_by_gene_name() -> None:
    rng = np.random.default_rng(0)
    col = rng.poisson(5, size=(20, 1))
    counts = np.hstack([col, col, col, np.ones((20, 1))])
    s = make_slide("S0", counts, ["ZETA", "ALPHA", "MID", "LOW"])
    assert select_genes([s], "top_var", n=2).genes == ("ALPHA", "MID")
    assert select_genes([s], "all").genes == ("ALPHA", "MID", "ZETA", "LOW")


def test_panel_independent_of_slide_order() -> None:
    slides = random_slides(7, n_slides=4)
    a = select_genes(slides, "hmhvg", n=12)
    b = select_genes(slides[::-1], "hmhvg", n=12)
    assert a.genes == b.genes and a.hash == b.hash


# ---- missing genes, vocabulary, exclusion -------------------------------------------------------
def _uneven() -> list[Slide]:
    rng = np.random.default_rng(0)
    a = make_slide("A1", rng.poisson(4, size=(10, 4)), ["G1", "G2", "G3", "ONLY_A"])
    b = make_slide("B1", rng.poisson(4, size=(8, 3)), ["G1", "G2", "G3"])
    return [a, b]


def test_missing_intersect_vs_zero() -> None:
    a, b = _uneven()
    assert set(select_genes([a, b], "all").genes) == {"G1", "G2", "G3"}
    zero = select_genes([a, b], "all", missing="zero")
    assert set(zero.genes) == {"G1", "G2", "G3", "ONLY_A"}
    # absent genes count 0 in the statistics
    mean, _ = gene_stats([a, b], ["ONLY_A"], on="raw")
    assert mean[0] == pytest.approx(a.counts()[:, 3].sum() / 18)
    m = panel_matrix(b, zero)
    assert m.dtype == np.float32 and m.shape == (8, 4)
    assert (m[:, list(zero.genes).index("ONLY_A")] == 0).all()


def test_panel_matrix_intersect_names_slide_and_genes() -> None:
    a, b = _uneven()
    panel = GenePanel("list", ("G1", "ONLY_A"), {"missing": "intersect"}, ("A1",))
    with pytest.raises(DataError) as e:
        panel_matrix(b, panel)
    assert e.value.slide == "B1" and "ONLY_A" in str(e.value) and "missing='zero'" in str(e.value)
    np.testing.assert_array_equal(panel_matrix(a, panel), a.counts()[:, [0, 3]])


def test_vocabulary_and_exclude() -> None:
    genes = [
        "MT-CO1",
        "RPS6",
        "RPL10A",
        "RPLP0",
        "RPSA",
        "RPS4Y1",
        "RPL36AL",
        "RPS6KA1",
        "ACTB",
        "Rpl3",
        "mt-Nd1",
        "HBB",
    ]
    s = make_slide("S0", np.random.default_rng(0).poisson(3, size=(6, len(genes))), genes)
    kept = set(select_genes([s], "all", exclude=("mito", "ribo")).genes)
    assert kept == {"RPS6KA1", "ACTB", "HBB"}
    assert set(select_genes([s], "all", exclude=("HB", "re:^RP[SL]")).genes) == {
        "MT-CO1",
        "Rpl3",
        "mt-Nd1",
        "ACTB",
    }
    p = select_genes([s], "all", vocabulary=[" ACTB", "HBB", "NOTHERE"])
    assert set(p.genes) == {"ACTB", "HBB"} and p.params["vocabulary_size"] == 3
    assert "vocabulary_hash" in p.params
    assert EXCLUDE_PRESETS["mito"]


# ---- list rule ---------------------------------------------------------------------------------
def test_list_rule_sequence_file_and_json(tmp_path: Path) -> None:
    slides = random_slides(0)
    wanted = ["G005", "G001", "G030"]
    p = select_genes(slides, "list", gene_list=wanted)
    assert set(p.genes) == set(wanted) and list(p.genes) == _order_by_log_var(slides, wanted)
    f = tmp_path / "genes.txt"
    f.write_text("# my genes\nG005\n\n G001 \nG030\n")
    assert select_genes(slides, "list", gene_list=f).genes == p.genes
    j = tmp_path / "var_50genes.json"
    j.write_text(json.dumps({"genes": wanted}))
    pj = select_genes(slides, "list", gene_list=str(j))
    assert pj.genes == p.genes and pj.params["list_file"] == "var_50genes.json"


def test_list_rule_unknown_gene_suggests(tmp_path: Path) -> None:
    slides = random_slides(0)
    with pytest.raises(UnknownNameError, match="G005") as e:
        select_genes(slides, "list", gene_list=["G0O5"])
    assert "Did you mean" in str(e.value)
    f = tmp_path / "panel.txt"
    f.write_text("G001\nNOPE1\n")
    with pytest.raises(DataError) as e2:
        select_genes(slides, "list", gene_list=f)
    assert e2.value.file == str(f) and "NOPE1" in str(e2.value)
    with pytest.raises(DataError, match="missing from training slide"):
        select_genes(_uneven(), "list", gene_list=["ONLY_A"])
    with pytest.raises(DataError, match="not found"):
        select_genes(slides, "list", gene_list=tmp_path / "absent.txt")


def test_bad_arguments() -> None:
    slides = random_slides(0)
    with pytest.raises(UnknownNameError, match="hmhvg"):
        select_genes(slides, "hmvhg")
    with pytest.raises(ValueError):
        select_genes(slides, "all", n=3)
    with pytest.raises(ValueError):
        select_genes(slides, "list")
    with pytest.raises(DataError):
        select_genes([], "all")


# ---- hvg (seurat_v3) ---------------------------------------------------------------------------
def test_hvg_equals_scanpy_direct_call() -> None:
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    slides = random_slides(4, n_slides=3, n_genes=60, n_spots=40)
    try:
        import skmisc  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="scikit-misc"):
            select_genes(slides, "hvg", n=20)
        pytest.skip("scikit-misc not installed: hvg raises the clear error above")
    panel = select_genes(slides, "hvg", n=20, batch_key="slide")
    a = ad.concat([s.adata for s in slides], index_unique=":")
    a.obs["slide"] = pd.Categorical(a.obs["slide"])
    sc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=20, batch_key="slide")
    assert set(panel.genes) == set(a.var_names[a.var["highly_variable"]])
    assert len(panel) == 20 and panel.params["batch_key"] == "slide"


# ---- persistence -------------------------------------------------------------------------------
def test_save_load_roundtrip_and_hash(tmp_path: Path) -> None:
    slides = random_slides(0)
    p = select_genes(slides, "hmhvg", n=15)
    path = p.save(tmp_path / "panel.json")
    q = GenePanel.load(path)
    assert q == p and q.hash == p.hash and len(q) == len(p)
    # hash: rule + genes + params, not the training slides
    assert GenePanel(p.rule, p.genes, p.params, ("X",)).hash == p.hash
    assert GenePanel(p.rule, p.genes[::-1], p.params, p.train_slides).hash != p.hash
    d = json.loads(path.read_text())
    d["genes"] = d["genes"][:-1]
    path.write_text(json.dumps(d))
    with pytest.raises(DataError, match="hash mismatch") as e:
        GenePanel.load(path)
    assert e.value.file == str(path)
    assert p.top_k(3) == p.genes[:3]


def test_spot_totals_use_all_genes() -> None:
    s = random_slides(0)[0]
    np.testing.assert_allclose(spot_totals(s), s.counts().sum(axis=1))
