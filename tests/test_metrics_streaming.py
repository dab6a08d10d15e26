"""Streaming torchmetrics equal the one-shot numpy metrics, for any batch split and across ranks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

torch = pytest.importorskip("torch")

from stbench.metrics import GenewisePCC, StreamingMAE, StreamingMSE, genewise_pcc, mae, mse, pcc  # noqa: E402


def _data(seed: int = 0, n: int = 97, g: int = 13) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.log1p(rng.poisson(3.0, size=(n, g)).astype(np.float64))
    return truth, truth + 0.5 * rng.normal(size=(n, g))


def _feed(metric, truth: np.ndarray, pred: np.ndarray, cuts: list[int]) -> None:
    edges = [0, *sorted(cuts), truth.shape[0]]
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        metric.update(torch.from_numpy(pred[a:b]), torch.from_numpy(truth[a:b]))


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(0, 97), max_size=6), seed=st.integers(0, 1000))
def test_batch_split_invariance(cuts, seed):
    truth, pred = _data(seed)
    m = GenewisePCC(13, return_details=True)
    e2, e1 = StreamingMSE(), StreamingMAE()
    for metric in (m, e2, e1):
        _feed(metric, truth, pred, cuts)
    out = m.compute()
    ref = genewise_pcc(truth, pred)
    np.testing.assert_allclose(out["per_gene"].numpy(), ref.r, atol=1e-12)
    assert float(out["pcc"]) == pytest.approx(pcc(truth, pred).value, abs=1e-12)
    assert int(out["excluded"]) == 0
    assert float(e2.compute()) == pytest.approx(mse(truth, pred), rel=1e-12)
    assert float(e1.compute()) == pytest.approx(mae(truth, pred), rel=1e-12)


def test_per_gene_equals_pearsonr_loop_in_float32_batches():
    truth, pred = _data(1, n=256, g=8)
    m = GenewisePCC(8, return_details=True)
    _feed(m, truth.astype(np.float32), pred.astype(np.float32), [64, 128, 192])
    t32, p32 = truth.astype(np.float32).astype(float), pred.astype(np.float32).astype(float)
    ref = [stats.pearsonr(t32[:, j], p32[:, j])[0] for j in range(8)]
    np.testing.assert_allclose(m.compute()["per_gene"].numpy(), ref, atol=1e-10)


def test_rank_merge_is_exact_like_ddp_sync():
    """Two 'ranks' each see part of the spots; merging states with the declared reductions (what a
    DDP sync does) gives the single-process result."""
    truth, pred = _data(2)
    ranks = [GenewisePCC(13), GenewisePCC(13)]
    _feed(ranks[0], truth[:40], pred[:40], [17])
    _feed(ranks[1], truth[40:], pred[40:], [30])
    assert ranks[0]._reductions["sum_tp"] is not None
    ranks[0].merge_state(ranks[1])
    assert float(ranks[0].compute()) == pytest.approx(pcc(truth, pred).value, abs=1e-12)
    assert ranks[0].sum_tp.dtype == torch.float64


def test_constant_genes_excluded_and_mean_predictor_is_nan_with_counts():
    truth, pred = _data(3, g=6)
    pred[:, 2] = 1.25
    m = GenewisePCC(6, return_details=True)
    _feed(m, truth, pred, [10, 50])
    out = m.compute()
    assert int(out["excluded"]) == 1 and int(out["excluded_pred"]) == 1
    assert torch.isnan(out["per_gene"][2]) and float(out["pcc"]) == pytest.approx(
        pcc(truth, pred).value, abs=1e-12
    )
    mean_pred = np.tile(truth.mean(axis=0), (truth.shape[0], 1))
    m2 = GenewisePCC(6, return_details=True)
    _feed(m2, truth, mean_pred, [33])
    out2 = m2.compute()
    assert torch.isnan(out2["pcc"]) and int(out2["excluded"]) == 6


def test_bf16_predictions_and_shape_errors():
    truth, pred = _data(4, g=5)
    m = GenewisePCC(5)
    m.update(torch.from_numpy(pred).to(torch.bfloat16), torch.from_numpy(truth))
    p_bf = torch.from_numpy(pred).to(torch.bfloat16).double().numpy()
    assert float(m.compute()) == pytest.approx(pcc(truth, p_bf).value, abs=1e-12)
    with pytest.raises(ValueError, match=r"expected \(spots, 5\)"):
        m.update(torch.zeros(3, 4), torch.zeros(3, 4))


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    truth, pred = _data(5)
    m = GenewisePCC(13, return_details=True)
    own = slice(0, 50) if rank == 0 else slice(50, None)  # uneven shards: 50 and 47 spots
    m.update(torch.from_numpy(pred[own]), torch.from_numpy(truth[own]))
    e = StreamingMSE()
    e.update(torch.from_numpy(pred[own]), torch.from_numpy(truth[own]))
    out = m.compute()  # synced across ranks
    torch.save({"per_gene": out["per_gene"], "mse": e.compute()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_real_gloo_ddp_sync_equals_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    truth, pred = _data(5)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        np.testing.assert_allclose(got["per_gene"].numpy(), genewise_pcc(truth, pred).r, atol=1e-12)
        assert float(got["mse"]) == pytest.approx(mse(truth, pred), rel=1e-12)
