"""scGPT backbone (baselines/_scfm/scgpt.py) and its checkpoint layout (scgpt_ckpt.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from baselines._scfm import Backbone, BackboneBlock, build_backbone
from baselines._scfm.scgpt import SIZES, ScGPT, ScGPTConfig, build_scgpt
from baselines._scfm.scgpt_ckpt import (
    load_scgpt,
    load_scgpt_state,
    read_scgpt_vocab,
    save_scgpt_dir,
    scgpt_state_dict,
)
from baselines._scfm.vocab import UNMAPPED
from stbench.errors import DataError
from stbench.utils.io import sha256_file

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0, **kw: object) -> ScGPT:
    torch.manual_seed(seed)
    m = build_scgpt("tiny", **kw)
    if m.flag_encoder is not None:
        with torch.no_grad():
            m.flag_encoder.weight.normal_(0, 1.0)
    return m.eval()


def _inputs(b: int = 3, g: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(b, g, generator=gen) * 6
    ids = torch.randperm(200, generator=gen)[:g]  # tiny genes are ids 0..199
    visible = torch.rand(b, g, generator=gen) > 0.4
    visible[:, 0] = True
    return values, ids, visible


def test_shapes_and_contract() -> None:
    m = _model()
    values, ids, visible = _inputs()
    assert isinstance(m, Backbone) and all(isinstance(b, BackboneBlock) for b in m.blocks)
    tokens, vis = m.embed(values, ids, visible)
    assert tokens.shape == (3, 13, 32) and vis.shape == (3, 13)
    assert vis[:, 0].all() and torch.equal(vis[:, 1:], visible)
    assert m(values, ids, visible).shape == (3, 12) and m.decode(tokens[:, 1:]).shape == (3, 12)
    assert torch.equal(m(values, ids, visible), m(values, ids.expand(3, 12), visible))
    assert m.n_prefix == 1 and m.dim == 32 and m.weights_id() == "none" and m.kind == "scgpt"
    assert all(b.alpha == 1.0 and not b.masks_kv for b in m.blocks)
    assert all(b.norm1.eps == 1e-5 and b.norm2.eps == 1e-5 for b in m.blocks)
    assert m.blocks[0].ffn.linear1.out_features == 64 and m.blocks[0].attn.head_dim == 8
    assert all(b.masks_kv for b in _model(mask_style="generative").blocks)
    # CLS token = gene "<cls>" + value encoder(pad_value = -2), as scGPT's pretraining appends it
    cls_ids, cls_vals = torch.tensor([[m.cfg.cls_id]]), torch.tensor([[-2.0]])
    # The value encoder's Linear on a (3, 13) batch and on one token rounds differently in float32
    # (4.8e-7 measured); an absolute margin keeps near-zero entries from failing a relative one.
    expected = (m.encoder(cls_ids) + m.value_encoder(cls_vals))[:, 0].expand(3, 32)
    assert torch.allclose(tokens[:, 0], expected, rtol=1e-5, atol=1e-6)


def test_whole_human_size_on_meta() -> None:
    """args.json of the whole-human model: embsize 512, nlayers 12, nheads 8, d_hid 512, 60,697 tokens."""
    cfg = SIZES["whole-human"]
    with torch.device("meta"):
        m = ScGPT(cfg, "whole-human")
    per_layer = (3 * 512 * 512 + 3 * 512) + (512 * 512 + 512) + 2 * (512 * 512 + 512) + 4 * 512
    expected = 60697 * 512 + 2 * 512 + (2 * 512 + 512 * 512 + 512 + 2 * 512) + 12 * per_layer
    expected += 2 * (512 * 512 + 512) + 512 + 1
    assert sum(p.numel() for p in m.parameters()) == expected == 50_804_225
    assert (cfg.pad_id, cfg.cls_id, cfg.n_tokens) == (60694, 60695, 60697)


class _Reference(nn.Module):
    """scGPT's TransformerModel (continuous style, no extra heads) composed from torch modules under the
    published parameter names; torch's own TransformerEncoderLayer is the encoder."""

    def __init__(self, cfg: ScGPTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.encoder = nn.Module()
        self.encoder.embedding = nn.Embedding(cfg.n_tokens, d)
        self.encoder.enc_norm = nn.LayerNorm(d)
        self.value_encoder = nn.Module()
        self.value_encoder.linear1, self.value_encoder.linear2 = nn.Linear(1, d), nn.Linear(d, d)
        self.value_encoder.norm = nn.LayerNorm(d)
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, cfg.d_hid, cfg.dropout, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.decoder = nn.Module()
        self.decoder.fc = nn.Sequential(
            nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, 1)
        )

    def forward(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        ve = self.value_encoder
        v = torch.clamp(values.unsqueeze(-1), max=512)
        x = self.encoder.enc_norm(self.encoder.embedding(ids)) + ve.norm(
            ve.linear2(torch.relu(ve.linear1(v)))
        )
        return self.decoder.fc(self.transformer_encoder(x)).squeeze(-1)


def test_matches_published_architecture() -> None:
    """The exported state_dict loads strictly into the reference (names and shapes are scGPT's), and
    the outputs agree: post-LN, ReLU FFN, eps 1e-5, q/k/v packing order, masked value -1, CLS value -2."""
    m = _model()
    ref = _Reference(m.cfg).eval()
    ref.load_state_dict(scgpt_state_dict(m, layout="torch"), strict=True)
    values, ids, visible = _inputs()
    ids_full = torch.cat([torch.full((3, 1), m.cfg.cls_id), ids.expand(3, 12)], dim=1)
    vals_full = torch.cat([torch.full((3, 1), -2.0), torch.where(visible, values, -1.0)], dim=1)
    with torch.no_grad():
        assert torch.allclose(m(values, ids, visible), ref(ids_full, vals_full)[:, 1:], atol=1e-5)
        big = values * 1000  # the value encoder clips at 512
        assert torch.allclose(m(big, ids), m(big.clamp(max=512), ids))


def test_contract_loop_reproduces_forward() -> None:
    """HINGE's loop with identity modulation (SCFM.md) equals Backbone.forward exactly, in both styles."""
    for style in ("mlm", "generative"):
        m = _model(mask_style=style)
        values, ids, visible = _inputs()
        x, vis = m.embed(values, ids, visible)
        for b in m.blocks:
            a = b.attn(x, b.kv_mask(vis))
            x = b.norm1(b.alpha * x + b.dropout(a))
            x = b.norm2(b.alpha * x + b.dropout(b.ffn(x)))
        assert torch.equal(m.decode(x[:, 1:]), m(values, ids, visible))


def test_permutation_equivariance_over_genes() -> None:
    """No positional embedding: permuting gene tokens permutes the predictions (both mask styles)."""
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    for style in ("mlm", "generative"):
        m = _model(mask_style=style)
        values, ids, visible = _inputs(g=16)
        with torch.no_grad():
            out = m(values, ids, visible)
            out_p = m(values[:, perm], ids[perm], visible[:, perm])
        assert torch.allclose(out[:, perm], out_p, atol=1e-5)


def test_mlm_masked_genes_carry_mask_value_and_stay_attended() -> None:
    m = _model()
    values, ids, visible = _inputs()
    other = torch.where(visible, values, values + 3 * torch.rand_like(values))
    with torch.no_grad():
        tok, _ = m.embed(values, ids, visible)
        marked, _ = m.embed(torch.where(visible, values, -1.0), ids, None)
        assert torch.equal(tok, marked)  # a masked gene is its gene token + value_encoder(-1)
        assert torch.equal(m(values, ids, visible), m(other, ids, visible))  # hidden values never leak
        # hidden genes are not hidden from attention: their ids change the visible genes' outputs
        other_ids = ids.expand(3, 12).clone()
        other_ids[~visible] = 199
        a, b = m.encode(values, ids, visible), m.encode(values, other_ids, visible)
        assert not torch.allclose(a[:, 1:][visible], b[:, 1:][visible], atol=1e-4)


def test_generative_style_hides_genes_like_scgpt_gen() -> None:
    """Visible tokens see only visible tokens; a hidden token sees the visible ones and itself."""
    m = _model(mask_style="generative")
    values, ids, visible = _inputs()
    ids2 = ids.expand(3, 12).clone()
    with torch.no_grad():
        tok, vis = m.embed(values, ids, visible)
        gene = m.encoder(torch.cat([torch.full((3, 1), m.cfg.cls_id), ids2], dim=1))
        assert torch.allclose(tok[~vis], (gene + m.flag_encoder.weight[1])[~vis])  # no value embedding
        base = m.encode(values, ids, visible)
        row, col = torch.nonzero(~visible)[0].tolist()
        other_vals = values.clone()
        other_vals[~visible] += 5.0
        ids2[row, col] = 199  # one hidden gene changes identity
        moved = m.encode(other_vals, ids2, visible)
    changed = (moved - base).abs().amax(-1) > 1e-5  # (B, 1+G)
    expect = torch.zeros_like(changed)
    expect[row, 1 + col] = True
    assert torch.equal(changed, expect)


def test_generative_attention_skips_out_proj_for_hidden_queries() -> None:
    torch.manual_seed(0)
    m = _model(mask_style="generative")
    attn = m.blocks[0].attn
    x = torch.randn(2, 7, 32)
    kv = torch.tensor([[1, 1, 0, 1, 0, 1, 1], [1, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        out = attn(x, kv)
        q, k, v = (attn._heads(p(x)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        allowed = kv[:, None, :] | torch.eye(7, dtype=torch.bool)
        scores = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~allowed[:, None], float("-inf"))
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32)
    assert torch.allclose(out[kv], attn.o_proj(ctx)[kv], atol=1e-5)
    assert torch.allclose(out[~kv], ctx[~kv], atol=1e-5)


@pytest.mark.parametrize("layout", ["torch", "flash", "flash_impl"])
def test_roundtrip_through_the_published_layout(tmp_path: Path, layout: str) -> None:
    m = _model(seed=5)
    heads = {
        "mvc_decoder.gene2query.weight": torch.randn(32, 32),
        "cls_decoder.out_layer.bias": torch.zeros(1),
    }
    d = save_scgpt_dir(m, None, {"nlayers": 2}, tmp_path / "scgpt", layout=layout, extra=heads)
    assert sorted(p.name for p in d.iterdir()) == ["args.json", "best_model.pt", "vocab.json"]
    back = load_scgpt(d, size="tiny")
    src, dst = m.state_dict(), back.state_dict()
    assert src.keys() == dst.keys() and all(torch.equal(src[k], dst[k]) for k in src)
    values, ids, visible = _inputs()
    with torch.no_grad():
        assert torch.equal(m(values, ids, visible), back.eval()(values, ids, visible))
    rep = back.ckpt_report
    assert (
        rep.layout == layout and len(rep.loaded) == 15 + 2 * 12 and sorted(rep.skipped_heads) == sorted(heads)
    )
    assert "mvc_decoder" in rep.summary() and "cls_decoder" in rep.summary()
    assert back.weights_id() == f"file:{sha256_file(d / 'best_model.pt')[:12]}"
    assert back.cfg == m.cfg and back.vocab is not None and len(back.vocab) == 200
    assert back.vocab.map(["G0", "G199"])[0].tolist() == [0, 199]
    tokens = json.loads((d / "vocab.json").read_text())
    assert (tokens["<pad>"], tokens["<cls>"], tokens["<eoc>"]) == (200, 201, 202)
    if layout == "flash":  # the released whole-human spelling (scGPT issue #173)
        keys = torch.load(d / "best_model.pt", weights_only=True).keys()
        assert "transformer_encoder.layers.1.self_attn.Wqkv.weight" in keys


def test_ddp_prefix_and_flag_encoder(tmp_path: Path) -> None:
    gen = _model(seed=2, mask_style="generative")
    d = save_scgpt_dir(gen, None, None, tmp_path / "g")
    state = torch.load(d / "best_model.pt", weights_only=True)
    torch.save({f"module.{k}": v for k, v in state.items()}, d / "best_model.pt")
    back = load_scgpt(d, mask_style="generative")
    assert back.ckpt_report.stripped_prefix and torch.equal(back.flag_encoder.weight, gen.flag_encoder.weight)
    mlm = load_scgpt(d)  # mlm does not use the generation flag: skipped, reported
    assert mlm.flag_encoder is None and mlm.ckpt_report.skipped_unused == ["flag_encoder.weight"]
    d2 = save_scgpt_dir(_model(), None, None, tmp_path / "m")
    with pytest.raises(DataError, match="flag_encoder.weight") as e:
        load_scgpt(d2, mask_style="generative")
    assert e.value.field == "flag_encoder.weight" and e.value.file.endswith("best_model.pt")


def _tamper(d: Path, fn) -> None:
    state = torch.load(d / "best_model.pt", weights_only=True)
    fn(state)
    torch.save(state, d / "best_model.pt")


def test_wrong_shapes_and_keys_are_errors(tmp_path: Path) -> None:
    m = _model()
    d = save_scgpt_dir(m, None, None, tmp_path / "ok")
    emb = "encoder.embedding.weight"
    state = scgpt_state_dict(m)
    state[emb] = torch.zeros(203, 31)
    with pytest.raises(DataError, match="shape mismatch") as e:
        load_scgpt_state(build_scgpt("tiny"), state, d / "best_model.pt")
    assert e.value.field == emb and e.value.file.endswith("best_model.pt")

    _tamper(d, lambda s: s.__setitem__(emb, torch.zeros(210, 32)))  # gene table != vocabulary
    with pytest.raises(DataError, match="210 rows") as e:
        load_scgpt(d)
    assert e.value.field == emb and e.value.file.endswith("vocab.json")

    d = save_scgpt_dir(m, None, None, tmp_path / "w")
    _tamper(d, lambda s: s.__setitem__(emb, torch.zeros(203, 16)))
    with pytest.raises(DataError, match=emb) as e:
        load_scgpt(d)
    assert e.value.field == "embsize" and e.value.file.endswith("args.json")

    key = "transformer_encoder.layers.1.linear2.weight"
    d = save_scgpt_dir(m, None, None, tmp_path / "l")
    _tamper(d, lambda s: s.__setitem__(key, torch.zeros(32, 63)))
    with pytest.raises(DataError, match="shape mismatch") as e:
        load_scgpt(d)
    assert e.value.field == key

    wqkv = "transformer_encoder.layers.0.self_attn.Wqkv.bias"
    d = save_scgpt_dir(m, None, None, tmp_path / "k")
    _tamper(d, lambda s: s.pop(wqkv))
    with pytest.raises(DataError, match="lacks") as e:
        load_scgpt(d)
    assert e.value.field == wqkv

    d = save_scgpt_dir(m, None, None, tmp_path / "bn")
    _tamper(d, lambda s: s.__setitem__("bn.weight", torch.ones(32)))  # input batch-norm: not implemented
    with pytest.raises(DataError, match="unexpected key") as e:
        load_scgpt(d)
    assert e.value.field == "bn.weight"

    (d / "args.json").unlink()
    with pytest.raises(DataError, match="lacks args.json"):
        load_scgpt(d)
    d = save_scgpt_dir(m, None, None, tmp_path / "size")
    with pytest.raises(DataError, match="whole-human") as e:
        load_scgpt(d, size="whole-human")
    assert e.value.field == "embsize"


def test_vocab_json_mapping_and_report(tmp_path: Path) -> None:
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"KRT6A": 0, "GNAS": 1, "FXYD2": 2, "Cd74": 3, "<pad>": 4}))
    vocab, specials, n_tokens = read_scgpt_vocab(path)
    assert specials == {"<pad>": 4, "<cls>": 5, "<eoc>": 6} and n_tokens == 7  # appended like scGPT
    assert len(vocab) == 4 and "<pad>" not in vocab and vocab.pad_id == 4
    ids, unmapped = vocab.map(["GNAS", "krt6a", "CD74", "NOPE", "<cls>"])
    assert ids.tolist() == [1, 0, 3, UNMAPPED, UNMAPPED] and unmapped == ["NOPE", "<cls>"]
    report = vocab.report(["GNAS", "krt6a", "NOPE"])
    assert "2/3 genes mapped" in report and "1 case-insensitive" in report and "NOPE" in report
    path.write_text(json.dumps({"A": 0, "B": 2}))
    with pytest.raises(DataError, match="without gaps") as e:
        read_scgpt_vocab(path)
    assert e.value.file == str(path)
    # the registry builds a random-init model sized from a vocabulary file
    path.write_text(json.dumps({f"G{i}": i for i in range(50)}))
    m = build_backbone("scgpt", "tiny", vocab=str(path))
    assert m.cfg.n_tokens == 53 and (m.cfg.pad_id, m.cfg.cls_id) == (50, 51) and len(m.vocab) == 50


def test_registry_builds_and_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = build_backbone("scgpt", "tiny", mask_style="generative")
    assert isinstance(m, ScGPT) and m.cfg.generative and m.weights_id() == "none"
    d = save_scgpt_dir(m, None, None, tmp_path / "dir")
    back = build_backbone("scgpt", "tiny", checkpoint=str(d / "best_model.pt"), mask_style="generative")
    assert back.weights_id().startswith("file:") and back.vocab is not None
    assert torch.equal(back.flag_encoder.weight, m.flag_encoder.weight)
