"""DiffBulk gene side: union vocabulary, open-embedding encoder invariances, joint training over panels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from baselines.diffbulk.gene_encoder import (
    PAD_ID,
    GeneVocabulary,
    MLPGeneEncoder,
    OpenEmbeddingGeneEncoder,
    build_gene_encoder,
    pad_profiles,
)
from stbench.errors import DataError, UnknownNameError

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5  # float32, eval mode: permutation / padding only change summation order


def _encoder(
    n_vocab: int = 50, depth: int = 2, out_dim: int | None = 16, seed: int = 0
) -> OpenEmbeddingGeneEncoder:
    torch.manual_seed(seed)
    return OpenEmbeddingGeneEncoder(n_vocab, dim=32, depth=depth, heads=4, out_dim=out_dim).eval()


def _profiles(b: int = 6, n: int = 20, n_vocab: int = 50, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(n_vocab - 1, generator=g)[:n] + 1 for _ in range(b)])
    vals = torch.rand(b, n, generator=g) * 3.0
    return ids, vals


# ---- vocabulary ----------------------------------------------------------------------------------
def test_vocabulary_union_is_sorted_and_independent_of_panel_order() -> None:
    a, b = ["TP53", "EPCAM", "CD24"], ["CD24", "VIM", "ACTB"]
    v1 = GeneVocabulary.from_panels([a, b])
    v2 = GeneVocabulary.from_panels([b, a])
    assert v1 == v2 and v1.hash == v2.hash
    assert v1.symbols == ("ACTB", "CD24", "EPCAM", "TP53", "VIM")
    assert len(v1) == 5 and v1.n_vocab == 6  # + padding row
    assert v1.ids(["ACTB", "VIM"]).tolist() == [1, 5]  # id = position + 1; 0 is padding
    assert PAD_ID not in v1.ids(v1.symbols).tolist()
    # shared gene, one id whichever panel it comes from
    ia, _, _ = v1.encode(a, np.zeros((2, 3)))
    ib, _, _ = v1.encode(b, np.zeros((2, 3)))
    assert ia[0, 2] == ib[0, 0] == v1.ids(["CD24"])[0]


def test_vocabulary_roundtrip_extend_and_errors() -> None:
    v = GeneVocabulary.from_panels([["B", "A"], ["C"]])
    assert GeneVocabulary.from_list(v.to_list()) == v
    assert GeneVocabulary.from_dict(v.to_dict()) == v
    bad = dict(v.to_dict(), genes=["A", "B", "Z"])
    with pytest.raises(DataError, match="hash mismatch"):
        GeneVocabulary.from_dict(bad)
    w = v.extend(["E", "A", "D"])  # new genes appended sorted; old ids kept
    assert w.symbols == ("A", "B", "C", "D", "E")
    assert w.ids(["A", "B", "C"]).tolist() == v.ids(["A", "B", "C"]).tolist()
    with pytest.raises(DataError, match="duplicate"):
        GeneVocabulary(["A", "B", "A"])
    with pytest.raises(DataError, match=r"not in the gene vocabulary.*'Q'"):
        v.ids(["A", "Q"])
    ids, vals, mask = v.encode(["A", "Q", "C"], np.arange(6.0).reshape(2, 3), unknown="drop")
    assert ids.tolist() == [[1, 3], [1, 3]] and vals.tolist() == [[0.0, 2.0], [3.0, 5.0]] and not mask.any()
    assert "ENSG00000141510" in GeneVocabulary(["ENSG00000141510.7"])  # harmonised names


def test_pad_profiles_mixed_panels() -> None:
    ids, vals, mask = pad_profiles(
        [(torch.tensor([3, 1]), torch.tensor([0.5, 2.0])), (torch.tensor([2]), torch.tensor([1.0]))]
    )
    assert ids.tolist() == [[3, 1], [2, 0]] and vals.tolist() == [[0.5, 2.0], [1.0, 0.0]]
    assert mask.tolist() == [[False, False], [False, True]]


# ---- open-embedding encoder invariances ----------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_permutation_invariance(depth: int) -> None:
    """Permuting each sample's (gene, value) pairs (and its pad mask) leaves the embedding unchanged:
    max |diff| < 1e-5 in eval mode (observed ~5e-8 on outputs of magnitude ~0.3)."""
    enc = _encoder(depth=depth)
    ids, vals = _profiles()
    ids = torch.cat(
        [ids, torch.zeros(ids.shape[0], 4, dtype=torch.long)], 1
    )  # padding inside the permutation
    vals = torch.cat([vals, torch.zeros(vals.shape[0], 4)], 1)
    mask = ids == PAD_ID
    g = torch.Generator().manual_seed(7)
    perm = torch.stack([torch.randperm(ids.shape[1], generator=g) for _ in range(ids.shape[0])])
    with torch.no_grad():
        out = enc(ids, vals, mask)
        out_p = enc(ids.gather(1, perm), vals.gather(1, perm), mask.gather(1, perm))
    assert out.shape == (ids.shape[0], 16)
    assert torch.allclose(out, out_p, atol=TOL, rtol=0)
    assert (out[0] - out[1]).abs().max() > 1e-3  # not trivially constant


def test_padding_does_not_change_the_embedding() -> None:
    """Appended padded junk (random ids, large values, mask True) is invisible (< 1e-5); so is a
    mixed-panel batch: each row equals its own single-panel result."""
    enc = _encoder()
    ids, vals = _profiles()
    with torch.no_grad():
        out = enc(ids, vals)
        junk_ids = torch.cat([ids, torch.randint(1, 50, (ids.shape[0], 7))], 1)
        junk_vals = torch.cat([vals, torch.randn(vals.shape[0], 7) * 100], 1)
        mask = torch.zeros_like(junk_ids, dtype=torch.bool)
        mask[:, ids.shape[1] :] = True
        assert torch.allclose(enc(junk_ids, junk_vals, mask), out, atol=TOL, rtol=0)
        short = enc(ids[:1, :12], vals[:1, :12])
        mixed_ids, mixed_vals, mixed_mask = pad_profiles([(ids[0, :12], vals[0, :12]), (ids[1], vals[1])])
        mixed = enc(mixed_ids, mixed_vals, mixed_mask)
    assert torch.allclose(mixed[0], short[0], atol=TOL, rtol=0)
    assert torch.allclose(mixed[1], out[1], atol=TOL, rtol=0)


def test_zero_value_gene_differs_from_absent_gene() -> None:
    """Documented behaviour: a measured zero is a token (the zero vector) that still takes part in
    attention, so it changes the embedding; only padding removes a gene. The zero-padded-union MLP
    cannot distinguish the two (identical outputs)."""
    enc = _encoder()
    ids, vals = _profiles()
    vals_zero = vals.clone()
    vals_zero[:, -1] = 0.0
    with torch.no_grad():
        present_zero = enc(ids, vals_zero)
        absent = enc(ids[:, :-1], vals[:, :-1])
        padded = enc(
            ids,
            vals_zero,
            torch.nn.functional.pad(torch.zeros_like(ids[:, :-1], dtype=torch.bool), (0, 1), value=True),
        )
    assert (present_zero - absent).abs().max() > 1e-4
    assert torch.allclose(padded, absent, atol=TOL, rtol=0)
    torch.manual_seed(0)
    mlp = MLPGeneEncoder(50, hidden=(16, 16), out_dim=8).eval()
    with torch.no_grad():
        assert torch.equal(mlp(ids, vals_zero), mlp(ids[:, :-1], vals[:, :-1]))


def test_token_is_raw_value_times_embedding_and_input_checks() -> None:
    enc = _encoder(out_dim=None)
    assert enc.out_dim == 32 and isinstance(enc.proj, nn.Identity)
    assert torch.count_nonzero(enc.embedding.weight[PAD_ID]) == 0
    ids, vals = _profiles(b=2, n=5)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    tok = enc.tokens(ids, vals, mask)
    assert torch.equal(tok, enc.embedding.weight[ids] * vals.unsqueeze(-1))  # no normalisation, no bias
    with pytest.raises(ValueError, match="no genes"):
        enc(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"\[1, 49\]"):
        enc(torch.tensor([[50]]), torch.ones(1, 1))
    with pytest.raises(ValueError, match="padding"):
        enc(torch.tensor([[0, 3]]), torch.ones(1, 2), torch.tensor([[False, False]]))
    with pytest.raises(UnknownNameError):
        build_gene_encoder("rnn", 10)


def test_depth_is_configurable_and_changes_parameter_count() -> None:
    counts = {
        d: sum(p.numel() for p in OpenEmbeddingGeneEncoder(20, depth=d).parameters()) for d in (1, 2, 4)
    }
    block = counts[2] - counts[1]
    assert counts[4] - counts[2] == 2 * block
    # pre-LN block at dim 256: MHA 4*256^2 + 4*256, 2 LayerNorms 4*256, FFN 2*256*1024 + 1024 + 256
    assert block == 263_168 + 1_024 + 525_568


# ---- MLP ablation -------------------------------------------------------------------------------
def test_mlp_encoder_shapes_and_dense_union() -> None:
    torch.manual_seed(0)
    mlp = MLPGeneEncoder(11, out_dim=512)
    assert [m.out_features for m in mlp.mlp if isinstance(m, nn.Linear)] == [128, 512, 512]
    assert mlp.mlp[0].in_features == 10  # union genes, no padding column
    ids = torch.tensor([[3, 1, 0], [10, 0, 0]])
    vals = torch.tensor([[2.0, 5.0, 9.0], [1.5, 9.0, 9.0]])
    dense = mlp.densify(ids, vals, None)
    want = torch.zeros(2, 10)
    want[0, 2], want[0, 0], want[1, 9] = 2.0, 5.0, 1.5
    assert torch.equal(dense, want)
    assert mlp(ids, vals).shape == (2, 512) and mlp.forward_dense(want).shape == (2, 512)
    assert build_gene_encoder("mlp", 11, out_dim=64).out_dim == 64


# ---- joint training over two panels -------------------------------------------------------------
def _two_panel_data(seed: int = 0) -> dict:
    """34 genes driven by a 4-d latent; panel A = G00..G19, panel B = G10..G33 (10 shared genes,
    different sizes). Target A depends on A-only genes G00..G04, target B on B-only genes G29..G33."""
    g = torch.Generator().manual_seed(seed)
    symbols = [f"G{i:02d}" for i in range(34)]
    loadings = torch.randn(34, 4, generator=g)
    w = {"A": torch.randn(5, generator=g), "B": torch.randn(5, generator=g)}
    cols = {"A": list(range(20)), "B": list(range(10, 34))}
    tcols = {"A": list(range(5)), "B": list(range(29, 34))}

    def sample(n: int) -> dict:
        out = {}
        for k in ("A", "B"):
            z = torch.randn(n, 4, generator=g)
            v = torch.nn.functional.softplus(z @ loadings.T + 0.3 * torch.randn(n, 34, generator=g))
            out[k] = (z, v[:, cols[k]], v[:, tcols[k]] @ w[k])
        return out

    return {
        "panels": {"A": symbols[:20], "B": symbols[10:34]},
        "train": sample(2000),
        "test": sample(500),
    }


def test_trained_on_two_panels_embeds_both() -> None:
    """Encoder (dim 16, 2 heads, depth 2) + Linear head trained jointly for 200 Adam steps on mixed
    batches (12 A + 12 B, A padded to B's 24 genes). Held-out R^2 per panel must exceed 0.8 (observed
    0.966 A / 0.971 B); the constant predictor (training mean) scores R^2 <= 0 (observed -0.13 / -0.04).
    The embeddings are informative beyond the trained target: a ridge probe from the frozen 16-d
    embedding to the 4-d latent (fit on 250 held-out profiles, scored on 250 others) reaches mean
    R^2 > 0.5 on each panel (observed 0.80 A / 0.71 B). ~4 s on one thread."""
    data = _two_panel_data()
    vocab = GeneVocabulary.from_panels(data["panels"].values())
    assert len(vocab) == 34
    tr = data["train"]
    ys = torch.cat([tr["A"][2], tr["B"][2]])
    mu, sd = ys.mean(), ys.std()
    torch.manual_seed(0)
    enc = OpenEmbeddingGeneEncoder(vocab.n_vocab, dim=16, depth=2, heads=2, out_dim=16)
    head = nn.Linear(16, 1)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=3e-3)
    bg = torch.Generator().manual_seed(1)

    def batch(va: torch.Tensor, vb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ia, va, pa = vocab.encode(data["panels"]["A"], va)
        ib, vb, pb = vocab.encode(data["panels"]["B"], vb)
        pad = ib.shape[1] - ia.shape[1]
        ia = torch.nn.functional.pad(ia, (0, pad))
        va = torch.nn.functional.pad(va, (0, pad))
        pa = torch.nn.functional.pad(pa, (0, pad), value=True)
        return torch.cat([ia, ib]), torch.cat([va, vb]), torch.cat([pa, pb])

    for _ in range(200):
        ia = torch.randint(0, 2000, (12,), generator=bg)
        ib = torch.randint(0, 2000, (12,), generator=bg)
        ids, vals, mask = batch(tr["A"][1][ia], tr["B"][1][ib])
        y = (torch.cat([tr["A"][2][ia], tr["B"][2][ib]]) - mu) / sd
        loss = ((head(enc(ids, vals, mask)).squeeze(1) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    enc.eval()
    for k in ("A", "B"):
        z, v, t = data["test"][k]
        with torch.no_grad():
            emb = enc(*vocab.encode(data["panels"][k], v))
            pred = head(emb).squeeze(1) * sd + mu
        var = ((t - t.mean()) ** 2).mean()
        r2 = 1 - ((pred - t) ** 2).mean() / var
        r2_const = 1 - ((mu - t) ** 2).mean() / var
        assert r2 > 0.8 and r2_const <= 0.0, (k, float(r2), float(r2_const))
        x = torch.cat([emb, torch.ones(len(emb), 1)], 1)
        a, b = slice(0, 250), slice(250, 500)
        coef = torch.linalg.solve(x[a].T @ x[a] + 1e-2 * torch.eye(x.shape[1]), x[a].T @ z[a])
        probe_r2 = 1 - ((x[b] @ coef - z[b]) ** 2).mean(0) / z[b].var(0)
        assert probe_r2.mean() > 0.5, (k, probe_r2.tolist())
