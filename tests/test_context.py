"""Spatial context in the data layer: tile grids, spot graphs, counts, the retrieval reference.

Tile-grid geometry is checked with an encoder that returns its input pixels, so "features" are the
tiles themselves and can be compared with the spot patch pixel by pixel."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stbench.data.context import TileGrid, parse_feature_request, spot_graph, tile_grid_slide
from stbench.data.datamodule import STDataModule
from stbench.data.features import FeatureStore, feature_provider, features_for
from stbench.data.patches import PatchSpec, PatchStore
from stbench.data.readers.synthetic import SyntheticReader
from stbench.data.splits import Fold
from stbench.data.synthetic import generate_synthetic
from stbench.errors import DataError
from stbench.methods.base import BatchRequirements, Method

PX = 8
FOLD = Fold(0, "f", ("P0S0", "P0S1"), (), ("P1S0",), unit="patient", val_fraction=0.2)


@dataclass(frozen=True)
class _PixelSpec:
    name: str = "pixels"
    arch: str = "identity"
    dim: int = 3 * PX * PX
    input_px: int = PX
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)
    mpp: float | None = None
    token: str = "pixels"


class PixelEncoder(nn.Module):
    """Features = the (C, H, W) pixels of the patch, flattened (no resampling at PX)."""

    spec = _PixelSpec()
    weights_id = "none"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.shape[-1] == PX
        return images.flatten(1)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list:
    root = generate_synthetic(
        tmp_path_factory.mktemp("syn") / "ds", n_slides=4, n_patients=2, spots_per_side=6, n_genes=20
    )
    return SyntheticReader(root).read_all()


def _provider(cache: Path, tiles: TileGrid | None, crop_px: float) -> object:
    spec = PatchSpec(out_px=PX, crop_px=crop_px)
    return feature_provider(
        "pixels", "none", FeatureStore(cache), PatchStore(cache, spec), device="cpu",
        build=lambda n, w: PixelEncoder(), tiles=tiles,
    )  # fmt: skip


def test_parse_feature_request() -> None:
    assert parse_feature_request("encoder") == ("encoder", None)
    assert parse_feature_request("encoder:grid=5") == ("encoder", TileGrid("grid", 5))
    assert parse_feature_request("encoder:sub=2") == ("encoder", TileGrid("sub", 2))
    for bad in ("encoder:grid=", "encoder:ring=3", "a:grid=3:sub=2"):
        with pytest.raises(DataError, match="bad feature request"):
            parse_feature_request(bad)


def test_tile_offsets_centre_and_cover() -> None:
    g = TileGrid("grid", 5).offsets(10.0)
    assert g.shape == (25, 2) and np.allclose(g[12], 0)  # centre tile = the spot
    assert np.allclose(g[0], [-20, -20]) and np.allclose(g[4], [20, -20])  # row 0 = top, x grows along c
    s = TileGrid("sub", 2).offsets(10.0)
    assert np.allclose(s, [[-2.5, -2.5], [2.5, -2.5], [-2.5, 2.5], [2.5, 2.5]])  # quadrants of the window


def test_grid_tiles_are_the_spot_and_its_surroundings(slides, tmp_path: Path) -> None:
    """Centre tile of grid=3 == the spot patch; the left tile == the patch of a spot shifted by one
    crop to the left (computed independently through the patch store); no resampling at crop = PX."""
    slide = slides[0]
    spot = _provider(tmp_path, None, PX)(slide)
    grid = _provider(tmp_path, TileGrid("grid", 3), PX)(slide).reshape(slide.n_spots, 9, -1)
    assert np.array_equal(grid[:, 4], spot)
    shifted = tile_grid_slide(slide, TileGrid("grid", 1), PX)
    shifted.adata.obsm["spatial"] = shifted.adata.obsm["spatial"] - np.array([PX, 0.0])
    left = PatchStore(tmp_path, PatchSpec(out_px=PX, crop_px=PX)).build(shifted)
    left_px = (
        np.asarray(left.patches, dtype=np.float32).transpose(0, 3, 1, 2).reshape(slide.n_spots, -1) / 255
    )
    assert np.allclose(grid[:, 3], left_px, atol=1e-6)
    assert not np.allclose(grid[:, 3], grid[:, 5])


def test_sub_tiles_are_the_quadrants_of_the_spot(slides, tmp_path: Path) -> None:
    slide = slides[1]
    whole = _provider(tmp_path, None, 2 * PX)  # 16 px window at 8 px: resampled, so compare at 16 px
    spec16 = PatchSpec(out_px=2 * PX, crop_px=2 * PX)
    big = np.asarray(PatchStore(tmp_path, spec16).build(slide).patches, dtype=np.float32) / 255
    sub = _provider(tmp_path, TileGrid("sub", 2), 2 * PX)(slide).reshape(slide.n_spots, 4, 3, PX, PX)
    top_left = big[:, :PX, :PX].transpose(0, 3, 1, 2)
    bottom_right = big[:, PX:, PX:].transpose(0, 3, 1, 2)
    assert np.allclose(sub[:, 0], top_left, atol=1e-6) and np.allclose(sub[:, 3], bottom_right, atol=1e-6)
    assert whole(slide).shape == (slide.n_spots, 3 * PX * PX)


def _brute_knn(coords: np.ndarray, k: int) -> set[tuple[int, int]]:
    d = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    out = set()
    for i in range(len(coords)):
        for j in np.argsort(d[i], kind="stable")[:k]:
            out |= {(i, int(j)), (int(j), i)}
    return out


def test_spot_graphs_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 1000, (40, 2))
    e = spot_graph(coords, {"kind": "knn", "k": 4})
    assert set(map(tuple, e.T.tolist())) == _brute_knn(coords, 4)
    r = spot_graph(coords, {"kind": "radius", "radius_um": 100}, mpp=0.5)  # 200 px
    d = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    want = {(i, j) for i in range(40) for j in range(40) if i != j and d[i, j] < 200}
    assert set(map(tuple, r.T.tolist())) == want
    grid = np.stack(np.meshgrid(np.arange(5), np.arange(5)), -1).reshape(-1, 2)
    four = spot_graph(grid * 100.0, {"kind": "grid", "metric": "manhattan"}, array_coords=grid)
    eight = spot_graph(grid * 100.0, {"kind": "grid"}, array_coords=grid)
    interior = 12  # (2, 2)
    assert (four[0] == interior).sum() == 4 and (eight[0] == interior).sum() == 8
    for g in (e, r, four, eight):
        assert (g[0] != g[1]).all()
        assert set(map(tuple, g.T.tolist())) == set(map(tuple, g[::-1].T.tolist()))
    with pytest.raises(DataError, match="mpp"):
        spot_graph(coords, {"kind": "radius", "radius_um": 100})


def test_whole_slide_graph_counts_and_reference(slides, tmp_path: Path) -> None:
    dm = STDataModule(
        slides, FOLD, whole_slide=True, graph={"kind": "knn", "k": 3}, include_counts=True,
        gene_rule="top_var", gene_n=10, pad_to=40,
    )  # fmt: skip
    dm.setup("fit")
    table = dm.spot_table
    for batch in dm.train_dataloader():
        n = int(batch["mask"].sum())
        e = batch["edge_index"]
        assert e.shape[0] == 2 and int(e.max()) < n  # edges only between real rows of this slide
        assert batch["counts"].shape == (40, dm.n_genes) and batch["totals"].shape == (40,)
        real = batch["index"][:n].numpy()
        assert (table.loc[real, "split"] == "train").all() and table.loc[real, "slide"].nunique() == 1
        assert (batch["totals"][:n] >= batch["counts"][:n].sum(1) - 1e-3).all()
    pred = next(iter(dm.predict_dataloader()))
    assert "counts" not in pred and "totals" not in pred and "expression" not in pred
    ref = np.concatenate([b["index"].numpy() for b in dm.reference_dataloader(batch_size=16)])
    want = table.index[table["split"] == "train"].to_numpy()
    assert sorted(ref.tolist()) == sorted(want.tolist())  # exactly the training spots, no val, no test
    with pytest.raises(DataError, match="whole_slide"):
        STDataModule(slides, FOLD, graph={"kind": "knn", "k": 3})


def test_features_for_serves_tile_requests(slides, tmp_path: Path) -> None:
    class Needs(Method):
        name = "needs-tiles"
        requires = BatchRequirements(
            image=False, features=("encoder", "encoder:grid=3", "encoder:sub=2"), patch={"out_px": PX}
        )

        def __init__(self, n_genes: int, encoder: str = "pixels", weights: str = "none") -> None:
            super().__init__(n_genes)

    built: list[PixelEncoder] = []

    def build(name: str, weights: str) -> PixelEncoder:
        built.append(PixelEncoder())
        return built[-1]

    fns = features_for(Needs, {}, tmp_path, {"crop_px": PX}, device="cpu", build=build)
    assert sorted(fns) == ["pixels", "pixels:grid=3", "pixels:sub=2"]
    slide = slides[0]
    d = 3 * PX * PX
    assert fns["pixels:grid=3"](slide).shape == (slide.n_spots, 9 * d)
    assert fns["pixels:sub=2"](slide).shape == (slide.n_spots, 4 * d)
    assert len(built) == 1  # one encoder instance shared by the spot and tile requests
