"""Synthetic dataset: determinism, layout, reader, and that genes really depend on the image."""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from stbench.data import synthetic as syn
from stbench.data.readers.synthetic import SyntheticReader
from stbench.errors import DataError


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def default_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return syn.generate_synthetic(tmp_path_factory.mktemp("syn") / "ds")


def test_default_layout_and_speed(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    root = syn.generate_synthetic(tmp_path / "ds")
    elapsed = time.perf_counter() - t0
    assert elapsed < 6.0, f"default generation took {elapsed:.2f}s (target < 2 s on a normal core)"
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["format"] == "synthetic" and meta["version"] == syn.FORMAT_VERSION
    assert meta["slides"] == {"P0S0": "P0", "P1S0": "P1", "P0S1": "P0", "P1S1": "P1"}
    for slide in meta["slides"]:
        d = root / "slides" / slide
        for name in ("image.tif", "spots.tsv", "counts.tsv.gz", "meta.json", "truth.tsv", "expected.tsv.gz"):
            assert (d / name).is_file(), f"{slide}/{name} missing"
        with gzip.open(d / "counts.tsv.gz", "rt") as f:
            header = f.readline().rstrip("\n").split("\t")
        assert header[0] == "spot" and header[1:] == meta["genes"]
    assert not list(root.rglob("*.tmp")), "atomic writes left temporary files"


def test_byte_identical_for_a_seed(tmp_path: Path) -> None:
    kw = {"n_slides": 2, "n_patients": 1, "spots_per_side": 5, "n_genes": 12}
    a = _digests(syn.generate_synthetic(tmp_path / "a", seed=3, **kw))
    b = _digests(syn.generate_synthetic(tmp_path / "b", seed=3, **kw))
    c = _digests(syn.generate_synthetic(tmp_path / "c", seed=4, **kw))
    assert a == b
    assert a["slides/P0S0/image.tif"] != c["slides/P0S0/image.tif"]
    assert a["slides/P0S0/counts.tsv.gz"] != c["slides/P0S0/counts.tsv.gz"]


def test_slide_content_does_not_depend_on_how_many_slides(tmp_path: Path) -> None:
    kw = {"n_patients": 2, "spots_per_side": 4, "n_genes": 10}
    small = _digests(syn.generate_synthetic(tmp_path / "s", n_slides=2, **kw))
    big = _digests(syn.generate_synthetic(tmp_path / "b", n_slides=5, **kw))
    for rel, digest in small.items():
        if rel.startswith("slides/"):
            assert big[rel] == digest, rel


def test_sizes_configurable(tmp_path: Path) -> None:
    root = syn.generate_synthetic(
        tmp_path / "ds",
        n_slides=3,
        n_patients=3,
        spots_per_side=5,
        n_genes=20,
        spot_spacing_um=80.0,
        margin_um=30.0,
        mpp=2.0,
        tissue_fraction=1.0,
    )
    reader = SyntheticReader(root)
    assert reader.list_slides() == ["P0S0", "P1S0", "P2S0"]
    slide = reader.read_slide("P2S0")
    side = round((2 * 30 + 4 * 80) / 2.0)
    assert slide.image is not None and slide.image.size == (side, side)
    assert slide.n_genes == 20 and slide.n_spots == 25
    assert slide.mpp == 2.0 and slide.patient == "P2"
    assert np.allclose(np.diff(np.unique(slide.coords[:, 0])), 40.0)


def test_bad_parameters_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_patients"):
        syn.generate_synthetic(tmp_path / "x", n_slides=2, n_patients=3)
    with pytest.raises(ValueError, match="n_genes"):
        syn.generate_synthetic(tmp_path / "x", n_genes=4)


def test_reader_gives_valid_slides(default_root: Path) -> None:
    reader = SyntheticReader(default_root)
    assert reader.check() == []
    meta = json.loads((default_root / "dataset.json").read_text())
    for name in reader.list_slides():
        slide = reader.read_slide(name).validate()
        assert slide.platform == "synthetic" and slide.patient == meta["slides"][name]
        assert slide.mpp == 1.0 and slide.spot_diameter_um == 55.0
        assert slide.genes == meta["genes"]
        counts = slide.counts()
        assert counts.dtype == np.float32 and (counts >= 0).all() and np.array_equal(counts, np.round(counts))
        assert counts.sum(axis=1).min() > 0
        assert list(slide.adata.obs.columns[:2]) == ["array_row", "array_col"]
        # spot id "<row>x<col>" matches the array coordinates, and coordinates follow the grid
        row, col = map(int, slide.spot_ids[0].split("x"))
        assert (slide.adata.obs["array_row"].iloc[0], slide.adata.obs["array_col"].iloc[0]) == (row, col)
        assert np.allclose(slide.coords[0], (40 + 64 * col, 40 + 64 * row))
        truth = reader.read_truth(name)
        assert list(truth.index) == slide.spot_ids
        assert set(syn.FEATURES) <= set(truth.columns)
    adata = reader.read_slide("P0S0").to_scanpy()
    assert adata.uns["spatial"]["P0S0"]["scalefactors"]["spot_diameter_fullres"] == 55.0


def test_reader_errors_name_the_file(tmp_path: Path) -> None:
    root = syn.generate_synthetic(tmp_path / "ds", n_slides=1, n_patients=1, spots_per_side=3, n_genes=8)
    reader = SyntheticReader(root)
    spots = root / "slides" / "P0S0" / "spots.tsv"
    lines = spots.read_text().splitlines()
    spots.write_text("\n".join(lines[:-1]) + "\n")  # drop the last spot's coordinates
    with pytest.raises(DataError) as err:
        reader.read_slide("P0S0")
    assert (
        err.value.file == str(spots) and err.value.slide == "P0S0" and "without coordinates" in str(err.value)
    )
    (root / "slides" / "P0S0" / "counts.tsv.gz").unlink()
    problems = reader.check()
    assert len(problems) == 1 and problems[0].field == "counts.tsv.gz"
    with pytest.raises(DataError, match="does not exist"):
        SyntheticReader(tmp_path / "nowhere")


def test_marker_genes_follow_morphology_seen_in_the_image(default_root: Path) -> None:
    """The acceptance check of the dataset: log1p counts of each marker gene correlate (> 0.5,
    within each slide, averaged) with its morphology feature computed from the rendered RGB image;
    pure-noise genes do not."""
    reader = SyntheticReader(default_root)
    model = reader.gene_model()
    markers = model.index[model["role"] == "marker"].tolist()
    noise = model.index[model["role"] == "noise"].tolist()
    assert len(markers) >= 4 and len(noise) >= 5
    marker_r: dict[str, list[float]] = {g: [] for g in markers}
    noise_r: list[float] = []
    for name in reader.list_slides():
        slide = reader.read_slide(name)
        feats = syn.morphology_features(slide.image.read(), slide.coords, slide.spot_diameter_px / 2)
        logc = np.log1p(slide.counts())
        col = {g: i for i, g in enumerate(slide.genes)}
        for g in markers:
            k = syn.FEATURES.index(model.loc[g, "marker_feature"])
            marker_r[g].append(abs(np.corrcoef(logc[:, col[g]], feats[:, k])[0, 1]))
        for g in noise:
            noise_r.append(np.abs([np.corrcoef(logc[:, col[g]], feats[:, k])[0, 1] for k in range(4)]).max())
    for g, rs in marker_r.items():
        assert np.mean(rs) > 0.5, f"{g} ({model.loc[g, 'marker_feature']}): r = {np.round(rs, 2)}"
    assert np.mean(noise_r) < 0.35


def test_ground_truth_is_consistent(default_root: Path) -> None:
    """Saved truth features match the RGB-measured ones, and genes.tsv + truth.tsv reproduce
    expected.tsv.gz through the documented gene model."""
    reader = SyntheticReader(default_root)
    meta = json.loads((default_root / "dataset.json").read_text())
    genes = syn.read_gene_model(default_root)
    for name in reader.list_slides():
        slide = reader.read_slide(name)
        truth = reader.read_truth(name)
        rgb = syn.morphology_features(slide.image.read(), slide.coords, slide.spot_diameter_px / 2)
        for k, f in enumerate(syn.FEATURES):
            assert np.corrcoef(rgb[:, k], truth[f])[0, 1] > 0.7, (name, f)
        z = syn.standardise(truth[list(syn.FEATURES)].to_numpy())
        assert np.allclose(z, truth[[f"z_{f}" for f in syn.FEATURES]].to_numpy(), atol=1e-4)
        log_mu = (
            syn.expected_log_mean(z, truth["hidden"].to_numpy(), genes)
            + np.asarray(meta["patient_effects"][slide.patient])[None, :]
            + np.log(truth["library_size"].to_numpy())[:, None]
        )
        expected = reader.read_expected(name)
        assert list(expected.columns) == slide.genes
        assert np.allclose(log_mu, np.log(expected.to_numpy()), atol=1e-3)


def test_ensure_synthetic_reuses_and_rebuilds(tmp_path: Path) -> None:
    kw = {"n_slides": 1, "n_patients": 1, "spots_per_side": 3, "n_genes": 8}
    root = syn.ensure_synthetic(tmp_path / "ds", **kw)
    stamp = (root / "dataset.json").stat().st_mtime_ns
    syn.ensure_synthetic(root, **kw)
    assert (root / "dataset.json").stat().st_mtime_ns == stamp
    syn.ensure_synthetic(root, **{**kw, "n_genes": 9})
    assert len(json.loads((root / "dataset.json").read_text())["genes"]) == 9
