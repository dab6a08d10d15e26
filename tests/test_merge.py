"""MERGE: graph attention normalisation, hierarchical cluster edges, paper-config parameter count,
shapes and padding, slide isolation, and fit + test through the runner on the synthetic dataset."""

from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from method_harness import run_method

from baselines.merge.gat import GATLayer, GraphLayerNorm, with_self_loops
from baselines.merge.graph import centroid_spots, hierarchical_edges, kmeans
from baselines.merge.method import MERGE
from stbench.methods.registry import register_method

CONFIGS = Path(__file__).resolve().parents[1] / "baselines" / "merge" / "configs"
PAPER_PARAMS_250 = 19_692_782  # README.md: paper config on 512-d ResNet-18 features, 250 genes
TINY = {
    "weights": "none",
    "encoder_overrides": {"layers": [1, 1, 1, 1], "input_px": 32},
    "hidden": [8, 8],
    "heads": 2,
    "kmeans_init": 2,
}


def tiny_model(n_genes: int = 5, **kw: Any) -> MERGE:
    torch.manual_seed(0)
    return MERGE(n_genes, **{**TINY, **kw}).eval()


def knn_edges(xy: torch.Tensor, k: int = 4) -> torch.Tensor:
    d = torch.cdist(xy, xy)
    d.fill_diagonal_(float("inf"))
    nb = d.topk(k, largest=False).indices
    e = torch.stack([torch.arange(len(xy)).repeat_interleave(k), nb.flatten()])
    return torch.unique(torch.cat([e, e.flip(0)], 1), dim=1)


def slide_batch(n: int, seed: int, d: int = 512) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    side = int(np.ceil(np.sqrt(n)))
    xy = torch.stack([torch.arange(n) % side, torch.arange(n) // side], 1).float() * 100.0
    return {
        "index": torch.arange(n) + 1000 * seed,
        "slide": [f"S{seed}"] * n,
        "mask": torch.ones(n, dtype=torch.bool),
        "coords": xy,
        "edge_index": knn_edges(xy),
        "expression": torch.rand(n, 5, generator=g),
        "features": {"resnet18": torch.rand(n, d, generator=g)},
    }


# ---- graph attention ------------------------------------------------------------------------------
def test_gat_attention_sums_to_one_over_each_nodes_neighbours() -> None:
    torch.manual_seed(0)
    layer = GATLayer(6, 4, heads=3)
    x = torch.randn(7, 6)
    edges = torch.tensor(
        [[0, 1, 2, 2, 3, 5, 1], [1, 0, 0, 1, 2, 3, 1]]
    )  # one self loop given; node 4, 6 isolated
    out, used, alpha = layer(x, edges, return_attention=True)
    assert out.shape == (7, 12)
    src, dst = used
    assert ((src == dst).sum() == 7) and ((src == dst) & (src == 1)).sum() == 1  # one self loop each
    sums = torch.zeros(7, 3).index_add(0, dst, alpha)
    assert torch.allclose(sums, torch.ones(7, 3), atol=1e-6)
    assert (alpha > 0).all()
    # isolated nodes attend only to themselves: output = their own transformed features + bias
    h = layer.lin(x).view(7, 3, 4)
    assert torch.allclose(out[4], h[4].reshape(-1) + layer.bias, atol=1e-6)
    # node 0 aggregates exactly {1, 2, 0}: moving node 4 (not a neighbour) changes nothing
    x2 = x.clone()
    x2[4] += 10.0
    assert torch.allclose(layer(x2, edges)[0], out[0], atol=1e-6)


def test_graph_layer_norm_is_over_the_whole_graph() -> None:
    norm = GraphLayerNorm(3)
    x = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    y = norm(x)
    assert y.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert y.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-4)  # population std over all entries
    assert not torch.allclose(y.mean(1), torch.zeros(2))  # not per node


def test_self_loops_replace_given_ones() -> None:
    e = with_self_loops(torch.tensor([[0, 1, 1], [1, 1, 0]]), 3)
    assert sorted(map(tuple, e.t().tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2)]


# ---- hierarchical edges ---------------------------------------------------------------------------
def test_kmeans_is_deterministic_and_finds_separated_blobs() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20, 2, generator=g) + c for c in (0.0, 20.0, 40.0)])
    a, b = kmeans(x, 3, seed=0), kmeans(x, 3, seed=0)
    assert torch.equal(a, b)
    assert [len(set(a[i : i + 20].tolist())) for i in (0, 20, 40)] == [1, 1, 1]
    assert len(set(a.tolist())) == 3


def test_cluster_edges_star_to_centroid_and_centroid_clique() -> None:
    g = torch.Generator().manual_seed(1)
    n = 40
    xy = torch.rand(n, 2, generator=g) * 1000
    feats = torch.rand(n, 8, generator=g)
    e = hierarchical_edges(xy, feats, spatial_k=3, feature_k=4, n_init=2)
    pairs = set(map(tuple, e.t().tolist()))
    assert all((j, i) in pairs for i, j in pairs) and all(i != j for i, j in pairs)  # symmetric, no loops
    hubs = []
    for x, k in ((xy, 3), (feats, 4)):
        labels = kmeans(x, k, n_init=2)
        centres = centroid_spots(labels, feats)
        hubs += centres.tolist()
        for i in range(n):  # every spot is tied to its cluster's centroid spot
            c = int(centres[labels[i]])
            assert i == c or (i, c) in pairs
    hubs = sorted(set(hubs))
    assert all((a, b) in pairs for a in hubs for b in hubs if a != b)  # shortcut clique


# ---- architecture ---------------------------------------------------------------------------------
def test_paper_config_parameter_count() -> None:
    cfg = yaml.safe_load((CONFIGS / "paper.yaml").read_text())["method"]
    model = MERGE(250, **{**cfg, "weights": "none"})
    n = sum(p.numel() for p in model.parameters())
    assert n == PAPER_PARAMS_250, n
    # the authors' 256-d fine-tuned features would give (512 - 256) * 448 * 8 fewer weights
    assert n - (512 - 256) * 448 * 8 == 18_775_278


def test_shapes_padding_and_graph() -> None:
    model = tiny_model()
    b = slide_batch(30, seed=1)
    with torch.no_grad():
        pred = model.predict_expression(b)
        rows, x, edges = model.slide_graph(b)
    assert pred.shape == (30, 5) and torch.isfinite(pred).all()
    knn = set(map(tuple, b["edge_index"].t().tolist()))
    assert knn <= set(map(tuple, edges.t().tolist()))  # spatial k-NN edges kept, cluster edges added
    assert edges.shape[1] > len(knn) and int(edges.max()) < 30
    # padded rows (mask False, no edges, garbage features) change nothing
    extra = 7
    padded = dict(b)
    padded["mask"] = torch.cat([b["mask"], torch.zeros(extra, dtype=torch.bool)])
    padded["index"] = torch.cat([b["index"], torch.full((extra,), -1)])
    padded["coords"] = torch.cat([b["coords"], torch.rand(extra, 2) * 5000])
    padded["slide"] = b["slide"] + [b["slide"][0]] * extra
    padded["expression"] = torch.cat([b["expression"], torch.zeros(extra, 5)])
    padded["features"] = {"resnet18": torch.cat([b["features"]["resnet18"], torch.rand(extra, 512) * 9])}
    with torch.no_grad():
        out = model.predict_expression(padded)
    assert torch.allclose(out[:30], pred, atol=1e-5) and (out[30:] == 0).all()


# ---- context never crosses slides ----------------------------------------------------------------
def _feature_fn(perturb: str | None) -> Any:
    def fn(slide: Any) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(slide.name.encode()))
        arr = rng.random((slide.n_spots, 512), dtype=np.float32)
        return arr * 5.0 if slide.name == perturb else arr

    return fn


def _predictions(root: Path, perturb: str | None) -> dict[str, torch.Tensor]:
    from stbench.benchmark.runner import open_dataset
    from stbench.data.datamodule import STDataModule
    from stbench.data.splits import Fold

    ds = open_dataset("synthetic", str(root))
    fold = Fold(0, "ctx", train=("P1S0", "P1S1"), val=(), test=("P0S0", "P0S1"))
    req = MERGE.requires
    dm = STDataModule(
        lambda: ds.load_slides(list(fold.slides)),
        fold,
        whole_slide=req.whole_slide,
        graph=req.graph,
        features={"resnet18": _feature_fn(perturb)},
    )
    dm.setup("fit")
    model = tiny_model(n_genes=dm.n_genes)
    out = {}
    with torch.no_grad():
        for batch in dm.predict_dataloader():
            n = batch["index"].shape[0]
            assert len(set(batch["slide"])) == 1 and "expression" not in batch
            assert int(batch["edge_index"].min()) >= 0 and int(batch["edge_index"].max()) < n
            out[batch["slide"][0]] = model.predict_expression(batch)
    return out


def test_graph_never_reaches_another_slide(synthetic_root: Path) -> None:
    """Changing every feature of slide P0S1 leaves slide P0S0's predictions bit-identical (and does
    change P0S1's): spatial and cluster edges stay within the batch's slide."""
    base = _predictions(synthetic_root, None)
    moved = _predictions(synthetic_root, "P0S1")
    assert set(base) == {"P0S0", "P0S1"}
    assert torch.equal(base["P0S0"], moved["P0S0"])
    assert not torch.allclose(base["P0S1"], moved["P0S1"])


# ---- fit + test through the runner ---------------------------------------------------------------
def test_fit_and_test_beats_mean(
    synthetic_root: Path, mean_row: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny config on the synthetic fold P0S0 (seed 0), on INFORMATIVE frozen features: the tests'
    stand-in encoder (pooled colour statistics; a well-regularised ridge on them reaches PCC ~0.17,
    MSE 0.376 on this fold). MERGE learns from frozen features only; random-init ResNet-18
    features of the synthetic slides mostly encode per-slide stain, which would test the encoder,
    not MERGE. Observed: MSE 0.405 vs the mean's 0.422, PCC 0.108 (before per-slide feature
    z-scoring and whole-slide validation: PCC -0.009). Thresholds: below the mean predictor's MSE
    and PCC > 0.05."""
    from encoder_standin import StandInEncoder

    import stbench.encoders

    def build(name: str, weights: str = "default", arch_overrides: dict | None = None) -> StandInEncoder:
        enc = StandInEncoder(name="standin-merge", weights_id="none")
        enc.dim = enc.spec.dim
        return enc

    monkeypatch.setattr(stbench.encoders, "build_encoder", build)
    register_method(MERGE)
    t0 = time.perf_counter()
    row = run_method("merge", synthetic_root, tmp_path, config="tiny")
    seconds = time.perf_counter() - t0
    m = row["metrics"]
    assert m["mse"] < mean_row["metrics"]["mse"], (m, mean_row["metrics"])
    assert m["pcc"] > 0.05, m
    assert row["weights"] == "none"
    assert row["checkpoint"]["chosen_on"] == "val/mse"
    print(
        f"{row['method']}: {m['mse']:.4f} vs mean {mean_row['metrics']['mse']:.4f}, pcc {m['pcc']:.3f}, {seconds:.0f} s"
    )
