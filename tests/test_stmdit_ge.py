"""STMDiT's GE pathway: the four token sources (K = 32, gene-order invariance), the null handling,
and the frozen CancerFoundation encoder with its checkpoint-folder loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from baselines.stmdit.ge_conditioning import GEConfig, XAttnTokens, build_token_source
from baselines.stmdit.ge_encoder import (
    bin_values,
    build_cancerfoundation,
    load_cancerfoundation,
    save_cancerfoundation_dir,
    select_gene_panel,
)
from stbench.encoders.weights import WeightsError
from stbench.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")

D, HEADS, N_GENES = 64, 4, 50


def _source(kind: str) -> nn.Module:
    torch.manual_seed(0)
    src = build_token_source(GEConfig(fusion="xattn", tokens=kind, k=32), D, HEADS).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return src


@pytest.mark.parametrize("kind", ["pma", "perceiver", "gsa"])
def test_pooled_sources_give_32_tokens_invariant_to_gene_order(kind):
    src = _source(kind)
    z = torch.randn(3, N_GENES, D, generator=torch.Generator().manual_seed(1))
    perm = torch.randperm(N_GENES, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, mask = src(z, None)
        out_perm, _ = src(z[:, perm], None)
        # padding genes (mask False) change nothing
        pad = torch.cat([z, torch.randn(3, 7, D)], dim=1)
        valid = torch.cat(
            [torch.ones(3, N_GENES, dtype=torch.bool), torch.zeros(3, 7, dtype=torch.bool)], dim=1
        )
        out_pad, _ = src(pad, valid)
    assert out.shape == (3, 32, D) and mask is None
    torch.testing.assert_close(out_perm, out, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_pad, out, atol=1e-5, rtol=0)
    assert (out[0] - out[1]).abs().max() > 1e-3  # depends on the input


def test_direct_source_is_the_projected_tokens_and_only_equivariant():
    src = _source("direct")
    z = torch.randn(2, N_GENES, D)
    perm = torch.randperm(N_GENES, generator=torch.Generator().manual_seed(3))
    out, _ = src(z, None)
    out_perm, _ = src(z[:, perm], None)
    assert out.shape == (2, N_GENES, D)
    assert torch.equal(out_perm, out[:, perm]) and not torch.equal(out_perm, out)


@pytest.mark.parametrize("kind", ["direct", "pma", "perceiver", "gsa"])
def test_xattn_key_sequence_null_first_and_masks(kind):
    """[null; K tokens]: a dropped sample sees only the null token, a kept one only its GE tokens."""
    torch.manual_seed(0)
    xt = XAttnTokens(GEConfig(fusion="xattn", tokens=kind, ge_dim=16, k=32), D, HEADS)
    ge = torch.randn(3, 20, 16)
    keep = torch.tensor([True, False, True])
    seq, mask = xt(ge, keep, None, 3, torch.float32)
    k = 20 if kind == "direct" else 32
    assert seq.shape == (3, 1 + k, D) and mask.shape == (3, 1 + k)
    assert mask[:, 0].tolist() == [False, True, False]
    assert mask[0, 1:].all() and not mask[1, 1:].any()
    assert torch.equal(seq[:, 0], xt.null.detach().expand(3, -1))
    assert torch.isfinite(seq).all()
    nan_in = ge.clone()
    nan_in[1] = float("nan")  # whatever a dropped sample carries stays out
    seq2, _ = xt(nan_in, keep, None, 3, torch.float32)
    assert torch.isfinite(seq2).all() and torch.equal(seq2[[0, 2]], seq[[0, 2]])
    seq_none, mask_none = xt(None, None, None, 2, torch.float32)
    assert seq_none.shape == (2, 1, D) and mask_none is None


def test_adaln_null_substitution():
    from baselines.stmdit.ge_conditioning import AdaLNFusion

    torch.manual_seed(0)
    fusion = AdaLNFusion(16, D, gate_init=0.3)
    temb, g = torch.randn(2, D), torch.randn(2, 16)
    out = fusion(temb, g, torch.tensor([True, False]))
    torch.testing.assert_close(out[0], fusion(temb[:1], g[:1], None)[0])
    torch.testing.assert_close(out[1], fusion(temb[1:], fusion.null.detach()[None], None)[0])
    torch.testing.assert_close(out[1], fusion(temb[1:], None, None)[0])
    assert torch.equal(AdaLNFusion(16, D)(temb, g, None), temb)  # gate 0 at init


# ---------------------------------------------------------------- CancerFoundation encoder

NT, CD, CL, CH, CF_HID = 53, 32, 2, 4, 64  # tiny: 50 genes + <cls>/<pad>/<eoc>


class _RefGene(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(NT, CD, padding_idx=1)
        self.enc_norm = nn.LayerNorm(CD)

    def forward(self, x):
        return self.enc_norm(self.embedding(x))


class _RefValue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear1, self.linear2, self.norm = nn.Linear(1, CD), nn.Linear(CD, CD), nn.LayerNorm(CD)

    def forward(self, v):
        return self.norm(self.linear2(torch.relu(self.linear1(v.unsqueeze(-1).clamp(max=512)))))


class _RefCF(nn.Module):
    """CancerFoundation's documented architecture built from torch's own TransformerEncoder (an
    independent implementation), named like its public model so state_dict() is the on-disk layout."""

    def __init__(self) -> None:
        super().__init__()
        self.gene_encoder, self.value_encoder = _RefGene(), _RefValue()
        layer = nn.TransformerEncoderLayer(CD, CH, CF_HID, 0.2, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, CL, enable_nested_tensor=False)
        self.decoder = nn.Linear(CD, 1)  # a pretraining head: present in the file, skipped by the loader

    def forward(self, ids, vals, pad):
        return self.encoder(self.gene_encoder(ids) + self.value_encoder(vals), src_key_padding_mask=pad)


def _cf_folder(tmp_path, state_fn=None):
    torch.manual_seed(0)
    ref = _RefCF().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path / "assets"
    folder.mkdir(parents=True, exist_ok=True)
    state = ref.state_dict()
    torch.save(state_fn(state) if state_fn else state, folder / "model.pth")
    vocab = {"<cls>": 0, "<pad>": 1, "<eoc>": 2, **{f"G{i}": i for i in range(3, NT)}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    args = {"n_bins": 51, "max_seq_len": 40, "nlayers": CL, "nheads": CH, "embsize": CD, "d_hid": CF_HID,
            "dropout": 0.2, "n_layers_cls": 3}  # fmt: skip
    (folder / "args.json").write_text(json.dumps(args))
    return ref, folder


def _reference(ref, values, ids, pad_value=-2.0):
    """The reference pipeline: bin real genes, prepend <cls> (value -2), pad with -2, key padding mask."""
    b, g = values.shape
    is_pad = ids == 1
    binned = bin_values(values, valid=~is_pad)
    full_ids = torch.cat([torch.zeros(b, 1, dtype=torch.long), ids], 1)
    full_vals = torch.cat([torch.full((b, 1), pad_value), torch.where(is_pad, pad_value, binned)], 1)
    with torch.no_grad():
        return ref(full_ids, full_vals, full_ids == 1)


def _profile(b=3, g=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(b, g, generator=gen)  # z-scored profiles: negative values, some exact zeros
    v[v.abs() < 0.3] = 0.0
    return v


def test_cf_loader_matches_torch_reference(tmp_path):
    ref, folder = _cf_folder(tmp_path)
    enc = load_cancerfoundation(folder)
    assert enc.ckpt_report.layout == "cf" and enc.ckpt_report.skipped == ["decoder.weight", "decoder.bias"]
    assert enc.cfg.max_len == 40 and enc.cfg.cls_id == 0 and enc.cfg.pad_id == 1 and len(enc.vocab) == 50
    assert enc.weights_id().startswith("file:")
    values, ids = _profile(), torch.arange(5, 25)
    out = enc(values, ids, normalize=False)
    expect = _reference(ref, values, ids.expand(3, -1))
    assert out.tokens.shape == (3, 21, CD) and out.cell.shape == (3, CD) and out.mask.all()
    torch.testing.assert_close(out.tokens, expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cell, expect[:, 0], atol=1e-5, rtol=1e-5)
    normed = enc(values, ids).cell
    torch.testing.assert_close(
        normed, expect[:, 0] / expect[:, 0].norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-5
    )
    # padding: the last genes of sample 0 are <pad>; the real tokens still match the reference
    ids_pad = ids.expand(3, -1).clone()
    ids_pad[0, -5:] = 1
    out_pad = enc(values, ids_pad, normalize=False)
    expect_pad = _reference(ref, values, ids_pad)
    assert out_pad.mask.sum(1).tolist() == [16, 21, 21]
    torch.testing.assert_close(out_pad.tokens[out_pad.mask], expect_pad[out_pad.mask], atol=1e-5, rtol=1e-5)


def test_cf_encoder_is_frozen(tmp_path):
    _, folder = _cf_folder(tmp_path)
    enc = load_cancerfoundation(folder)
    enc.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert not enc(_profile(), torch.arange(5, 25)).cell.requires_grad


@pytest.mark.parametrize("variant", ["wrapped_mha", "module_prefix", "scgpt_names", "state_dict_key"])
def test_cf_loader_key_spellings(tmp_path, variant):
    """CF's own loader maps encoder.layers.i.self_attn.self_attn.*; DDP/Lightning prefixes and scGPT
    names (encoder.* gene table, transformer_encoder.layers.*) load to the same encoder."""

    def rename(state):
        if variant == "wrapped_mha":
            return {k.replace(".self_attn.", ".self_attn.self_attn."): v for k, v in state.items()}
        if variant == "module_prefix":
            return {f"module.{k}": v for k, v in state.items()}
        if variant == "scgpt_names":
            out = {k.replace("encoder.layers.", "transformer_encoder.layers."): v for k, v in state.items()}
            return {k.replace("gene_encoder.", "encoder."): v for k, v in out.items()}
        return {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}

    ref, folder = _cf_folder(tmp_path, rename)
    enc = load_cancerfoundation(folder / "model.pth")
    values, ids = _profile(seed=1), torch.arange(10, 30)
    expect = _reference(ref, values, ids.expand(3, -1))
    torch.testing.assert_close(enc(values, ids, normalize=False).tokens, expect, atol=1e-5, rtol=1e-5)


def test_cf_round_trip_and_tiny_build(tmp_path):
    enc = build_cancerfoundation("tiny")
    vocab = {"<cls>": 0, "<pad>": 1, "<eoc>": 2, **{f"G{i}": i for i in range(3, 53)}}
    save_cancerfoundation_dir(enc, vocab, tmp_path / "cf")
    back = load_cancerfoundation(tmp_path / "cf")
    values, ids = _profile(seed=2), torch.arange(3, 23)
    assert torch.equal(back(values, ids).tokens, enc(values, ids).tokens)
    ids_, unmapped = back.map_genes(["G3", "g4", "NOPE"])
    assert ids_.tolist() == [3, 4, -1] and unmapped == ["NOPE"]


def test_cf_loader_errors(tmp_path):
    with pytest.raises(WeightsError, match="polybox"):
        load_cancerfoundation(tmp_path / "absent")
    _, folder = _cf_folder(tmp_path)
    (folder / "vocab.json").rename(folder / "v.json")
    with pytest.raises(WeightsError, match="lacks vocab.json"):
        load_cancerfoundation(folder)
    (folder / "v.json").rename(folder / "vocab.json")
    state = torch.load(folder / "model.pth", weights_only=True)
    for broken, match in [
        (
            {**state, "encoder.layers.0.self_attn.q_norm.weight": torch.ones(CD)},
            "unexpected key 'encoder.layers.0",
        ),
        ({k: v for k, v in state.items() if k != "value_encoder.norm.bias"}, "lacks 1 encoder tensor"),
        ({**state, "encoder.layers.1.linear1.weight": torch.zeros(CF_HID + 1, CD)}, "shape mismatch"),
    ]:
        torch.save(broken, folder / "model.pth")
        with pytest.raises(DataError, match=match) as info:
            load_cancerfoundation(folder)
        assert info.value.file.endswith("model.pth")
    torch.save(state, folder / "model.pth")
    (folder / "vocab.json").write_text(json.dumps({"<cls>": 0, "<pad>": 1, "G": 2}))
    with pytest.raises(DataError, match="rows but vocab.json has 4 tokens"):
        load_cancerfoundation(folder)


def test_cf_forward_input_checks():
    enc = build_cancerfoundation("tiny")
    with pytest.raises(ValueError, match="max_len 40"):
        enc(torch.zeros(1, 40), torch.full((40,), 5))
    with pytest.raises(ValueError, match="not a gene token"):
        enc(torch.zeros(1, 3), torch.tensor([5, -1, 6]))
    with pytest.raises(ValueError, match="not a gene token"):
        enc(torch.zeros(1, 3), torch.tensor([5, 0, 6]))


def _np_cf_binning(row: np.ndarray, n_bins: int = 51) -> np.ndarray:
    """CancerFoundation's collator binning for rows without ties (deterministic digitize)."""
    if row.max() == 0:
        return np.zeros_like(row)
    nz = row.nonzero()
    bins = np.quantile(row[nz], np.linspace(0, 1, n_bins - 1))
    left, right = np.digitize(row[nz], bins), np.digitize(row[nz], bins, right=True)
    out = np.zeros_like(row)
    out[nz] = np.ceil(0.5 * (right - left) + left)  # r only matters where left - right >= 2 (ties)
    return out


def test_binning_matches_numpy_reference_and_tie_rules():
    values = _profile(b=4, g=300, seed=5).double()
    values[3] = 0.0
    got = bin_values(values)
    for i in range(4):
        np.testing.assert_array_equal(got[i].numpy(), _np_cf_binning(values[i].numpy()))
    assert got[:3].max() == 50 and got[:3][values[:3] != 0].min() == 1 and (got[values == 0] == 0).all()
    # ties (raw counts): every digit lies in [right, left]; a generator makes the draw reproducible
    counts = torch.tensor([[0.0, 1, 1, 1, 1, 1, 1, 2, 2, 3, 5, 8, 8, 13] * 5])
    a = bin_values(counts, generator=torch.Generator().manual_seed(0))
    b = bin_values(counts, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    row = counts[0].numpy()
    edges = np.quantile(row[row != 0], np.linspace(0, 1, 50))
    lo, hi = np.digitize(row, edges, right=True), np.digitize(row, edges)
    nz = row != 0
    assert ((a[0].numpy()[nz] >= lo[nz]) & (a[0].numpy()[nz] <= hi[nz])).all()


def test_select_gene_panel_follows_cf_procedure():
    import anndata as ad

    from baselines._scfm.vocab import GeneVocab

    rng = np.random.default_rng(0)
    x = np.log1p(rng.poisson(rng.gamma(1.0, 2.0, size=40), size=(60, 40)).astype(np.float32))
    names = [f"G{i}" for i in range(40)]
    names[5] = "NOT_IN_VOCAB"
    adata = ad.AnnData(x, var={"gene": names})
    adata.var_names = names
    vocab = GeneVocab({f"G{i}": i + 3 for i in range(40)}, pad_id=1)
    panel = select_gene_panel(adata, vocab, n_top=10)
    assert len(panel) == 10 and "NOT_IN_VOCAB" not in panel
    assert panel == [n for n in names if n in set(panel)]  # dataset order kept
    assert len(select_gene_panel(adata, vocab, n_top=100)) == 39  # fewer genes than asked: all mapped ones


@pytest.mark.parametrize("kind", ["direct", "pma", "perceiver", "gsa"])
def test_dit_ge_mask_hides_padding_tokens(kind):
    from baselines.stmdit.dit import build_dit

    torch.manual_seed(0)
    model = build_dit("tiny", ge=GEConfig(fusion="xattn", tokens=kind, ge_dim=16, k=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        x, t, uni, ge = (
            torch.randn(2, 16, 8, 8),
            torch.tensor([4.0, 40.0]),
            torch.randn(2, 1536),
            torch.randn(2, 12, 16),
        )
        padded = torch.cat([ge, torch.randn(2, 5, 16)], dim=1)
        mask = torch.cat([torch.ones(2, 12, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.bool)], dim=1)
        out = model(x, t, uni, ge_tokens=padded, ge_mask=mask)
        torch.testing.assert_close(out, model(x, t, uni, ge_tokens=ge), atol=1e-5, rtol=0)
