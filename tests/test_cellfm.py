"""CellFM backbone (baselines/_scfm/cellfm.py): shapes, masking semantics, symmetry, sizes."""

from __future__ import annotations

import math

import pytest
import torch

from baselines._scfm import Backbone, BackboneBlock, build_backbone
from baselines._scfm.cellfm import SIZES, CellFM, Retention, build_cellfm, round_up8

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(n_layers: int = 2, seed: int = 0, **kw: object) -> CellFM:
    torch.manual_seed(seed)
    m = build_cellfm("tiny", n_layers=n_layers, **kw)
    with torch.no_grad():  # make zero_emb matter (it is zero-initialised like CellFM's)
        m.zero_emb.normal_(0, 0.5)
    return m.eval()


def _inputs(b: int = 3, g: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(b, g, generator=gen) * 4
    ids = torch.randperm(100, generator=gen)[:g] + 1
    visible = torch.rand(b, g, generator=gen) > 0.4
    visible[:, 0] = True  # at least one visible gene per row
    return values, ids, visible


def test_shapes_and_contract() -> None:
    m = _model()
    values, ids, visible = _inputs()
    assert isinstance(m, Backbone) and all(isinstance(b, BackboneBlock) for b in m.blocks)
    tokens, vis = m.embed(values, ids, visible)
    assert tokens.shape == (3, 13, 32) and vis.shape == (3, 13)
    assert vis[:, 0].all() and torch.equal(vis[:, 1:], visible)  # CLS always visible
    assert m(values, ids, visible).shape == (3, 12)
    assert m.encode(values, ids).shape == (3, 13, 32)
    # (G,) gene ids broadcast like (B, G)
    assert torch.equal(m(values, ids, visible), m(values, ids.expand(3, 12), visible))
    assert m.weights_id() == "none" and m.n_prefix == 1 and m.dim == 32


def test_config_constants() -> None:
    m = _model(n_layers=4)
    assert [b.masks_kv for b in m.blocks] == [True, True, False, False]
    assert [b.dropout.p for b in m.blocks] == pytest.approx([0.0, 0.025, 0.05, 0.075])  # 0.1 * i / L
    assert all(b.alpha == pytest.approx(8**0.25) for b in m.blocks)  # (2L)^0.25
    assert all(b.norm1.eps == 1e-6 and b.norm2.eps == 1e-6 for b in m.blocks)
    assert m.blocks[0].attn.head_dim == 8 and SIZES["800m"].head_dim == 32
    assert SIZES["800m"].beta == pytest.approx(320**-0.25)
    assert all(not lin.bias for lin in (m.value_dec.w1, m.value_dec.w2, m.blocks[0].attn.q_proj))


def test_contract_path_reproduces_forward() -> None:
    """The loop HINGE runs with identity modulation (SCFM.md) equals Backbone.forward exactly."""
    m = _model(n_layers=4)
    values, ids, visible = _inputs()
    x, vis = m.embed(values, ids, visible)
    for b in m.blocks:
        a = b.attn(x, vis if b.masks_kv else None)
        x = b.norm1(b.alpha * x + b.dropout(a))
        x = b.norm2(b.alpha * x + b.dropout(b.ffn(x)))
    assert torch.equal(m.decode(x[:, 1:]), m(values, ids, visible))


def test_padding_row_is_zero_and_masked_genes_get_zero_emb() -> None:
    m = _model()
    assert torch.count_nonzero(m.gene_emb[0]) == 0 and m.gene_emb.shape[0] == round_up8(101) == 104
    values, _, _ = _inputs(b=2, g=5)
    pad = torch.zeros(5, dtype=torch.long)
    tok, _ = m.embed(values, pad, torch.ones(2, 5, dtype=torch.bool))
    assert torch.allclose(tok[:, 1:], m.value_enc(values))  # padding id adds nothing
    hidden, _ = m.embed(values, pad, torch.zeros(2, 5, dtype=torch.bool))
    assert torch.allclose(hidden[:, 1:] - tok[:, 1:], m.zero_emb.expand(2, 5, 32))


def test_value_encoder_is_a_soft_lookup() -> None:
    """softmax weights sum to 1, so the output is a convex combination of the table's columns."""
    m = _model()
    with torch.no_grad():
        m.value_enc.value_enc.table.weight.fill_(1.0)
    out = m.value_enc(torch.randn(4, 7) * 10)
    assert torch.allclose(out, torch.ones(4, 7, 32), atol=1e-6)


def test_masked_kv_only_in_first_half() -> None:
    """In the masked half, CLS and visible tokens do not depend on hidden genes' values or ids;
    the first unmasked layer mixes them in (so the mask really stops at L/2)."""
    m = _model(n_layers=4)
    values, ids, visible = _inputs()
    other_values = torch.where(visible, values, values + 5 * torch.rand_like(values))
    other_ids = ids.expand(3, 12).clone()
    other_ids[~visible] = 50  # even a hidden gene's identity is invisible to the others

    def states(v: torch.Tensor, i: torch.Tensor, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, vis = m.embed(v, i, visible)
        for b in m.blocks[:n_blocks]:
            x = b(x, vis)
        return x, vis

    with torch.no_grad():
        a, vis = states(values, ids.expand(3, 12), 2)
        b, _ = states(other_values, other_ids, 2)
        assert torch.allclose(a[vis], b[vis], atol=1e-6)
        assert not torch.allclose(a[~vis], b[~vis], atol=1e-3)  # hidden tokens see their own value
        a3, _ = states(values, ids.expand(3, 12), 3)
        b3, _ = states(other_values, other_ids, 3)
        assert not torch.allclose(a3[vis], b3[vis], atol=1e-4)


def test_all_visible_equals_no_mask() -> None:
    m = _model()
    values, ids, _ = _inputs()
    ones = torch.ones(3, 12, dtype=torch.bool)
    assert torch.allclose(m(values, ids, ones), m(values, ids, None))


def test_permutation_equivariance_over_genes() -> None:
    """No positional embedding: permuting gene tokens permutes the predictions."""
    m = _model(n_layers=4)
    values, ids, visible = _inputs(g=16)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = m(values, ids, visible)
        out_p = m(values[:, perm], ids[perm], visible[:, perm])
    assert torch.allclose(out[:, perm], out_p, atol=1e-5)


def test_per_head_srmsnorm_makes_heads_scale_free() -> None:
    """O is linear in each head's V and Q; the per-head RMS norm removes any per-head positive scale."""
    torch.manual_seed(0)
    attn = Retention(32, 4)
    x = torch.randn(2, 9, 32)
    mask = torch.rand(2, 9) > 0.3
    mask[:, 0] = True
    ref = attn(x, mask)
    with torch.no_grad():
        attn.v_proj.weight[8:16] *= 3.0  # head 1 only
        attn.q_proj.weight[24:32] *= 0.5  # head 3 only
    assert torch.allclose(attn(x, mask), ref, atol=1e-5)


def test_dropout_only_in_training() -> None:
    m = build_cellfm("tiny", n_layers=4)
    values, ids, visible = _inputs()
    m.train()
    torch.manual_seed(0)
    a = m(values, ids, visible)
    torch.manual_seed(1)
    assert not torch.allclose(a, m(values, ids, visible))
    m.eval()
    assert torch.equal(m(values, ids, visible), m(values, ids, visible))


def _expected_params(rows: int, d: int, n_layers: int, bins: int = 256) -> int:
    embeddings = rows * d + 2 * d  # gene table, CLS, zero_emb
    value_enc = bins + bins * bins + bins * d + 1
    block = 5 * d * d + 3 * d * d + 4 * d  # retention q,k,v,u,o; SGLU u,v,o; two LayerNorms
    return embeddings + value_enc + n_layers * block + d * d + d


@pytest.mark.parametrize(("size", "count"), [("80m", 77_570_817), ("800m", 795_030_273)])
def test_parameter_counts_on_meta(size: str, count: int) -> None:
    with torch.device("meta"):
        m = build_backbone("cellfm", size)
    cfg = SIZES[size]
    assert m.gene_emb.shape == (24080, 1536) and len(m.blocks) == cfg.n_layers
    assert m.blocks[0].attn.n_heads == 48 and m.blocks[0].attn.head_dim == 32
    total = sum(p.numel() for p in m.parameters())
    assert total == _expected_params(24080, 1536, cfg.n_layers) == count


def test_unknown_size_and_kind() -> None:
    from stbench.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="8m"):
        build_backbone("cellfm", "8m")
    with pytest.raises(UnknownNameError, match="backbone"):
        build_backbone("geneformer", "tiny")


def test_freeze_and_leaky_slope_option() -> None:
    m = build_backbone("cellfm", "tiny", leaky_slope=0.01).freeze()
    assert m.cfg.leaky_slope == 0.01 and not any(p.requires_grad for p in m.parameters())
    assert math.isclose(SIZES["tiny"].leaky_slope, 0.2)
