"""MindSpore .ckpt reader/writer without MindSpore (baselines/_scfm/ckpt.py).

mindspore is not installed here, so files are written to the documented protobuf schema by our own
writer and, independently, by google.protobuf from a descriptor built for that schema (when the
`protobuf` package is importable).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from baselines._scfm import build_backbone
from baselines._scfm.cellfm import build_cellfm
from baselines._scfm.ckpt import (
    MindSporeCkpt,
    load_cellfm,
    load_cellfm_state,
    read_ckpt,
    record_header,
    save_cellfm_ckpt,
    torch_to_ckpt,
    write_ckpt,
)
from baselines._scfm.vocab import GeneVocab
from stbench.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed: int = 0, **kw: object):
    torch.manual_seed(seed)
    m = build_cellfm("tiny", **kw)
    with torch.no_grad():
        for p in m.parameters():  # no parameter left at a trivial init value: every copy is visible
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def _ms_items(model) -> dict[str, np.ndarray]:
    return {torch_to_ckpt(k): v.numpy().copy() for k, v in model.state_dict().items()}


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 10, generator=g), torch.arange(1, 11), torch.rand(2, 10, generator=g) > 0.3


def test_roundtrip_exact_with_moments_skipped(tmp_path: Path) -> None:
    m = _tiny()
    moments = {f"moment{i}.{k}": np.full_like(v, 7.0) for i in (1, 2) for k, v in _ms_items(m).items()}
    extra = {**moments, "global_step": np.array([123], np.int32), "learning_rate": np.array(1e-4, np.float32)}
    path = tmp_path / "tiny.ckpt"
    save_cellfm_ckpt(m, path, extra=extra)
    m2 = build_backbone("cellfm", "tiny", checkpoint=path)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    v, ids, vis = _inputs()
    assert torch.equal(m(v, ids, vis), m2.eval()(v, ids, vis))
    rep = m2.ckpt_report
    assert len(rep.loaded) == len(m.state_dict()) == 33
    assert len(rep.skipped_optimiser) == 66 and all(t.startswith("moment") for t in rep.skipped_optimiser)
    assert sorted(rep.skipped_non_model) == ["global_step", "learning_rate"]
    assert "skipped 66 optimiser moments" in rep.summary()
    assert m2.weights_id().startswith("file:") and len(m2.weights_id()) == 17


def test_file_layout_and_key_names(tmp_path: Path) -> None:
    m = _tiny()
    path = tmp_path / "t.ckpt"
    save_cellfm_ckpt(m, path)
    with MindSporeCkpt(path) as ck:
        recs = ck.records
    assert recs["gene_emb"].dims == (104, 32) and recs["gene_emb"].dtype == "Float32"
    assert recs["value_enc.value_enc.a"].dims == (1, 1)
    for key in ("encoder.1.attn.u_proj.weight", "encoder.0.ffn.o_proj.weight", "encoder.1.post_norm2.beta"):
        assert key in recs
    assert recs["value_dec.w2.weight"].dims == (1, 32)  # [out, in] like torch
    # the first bytes: field 1 (Checkpoint.value), length-delimited = 0x0A
    assert path.read_bytes()[0] == 0x0A


def test_float16_and_packed_dims(tmp_path: Path) -> None:
    m = _tiny()
    path = tmp_path / "half.ckpt"
    save_cellfm_ckpt(m, path, dtype="Float16", packed_dims=True)
    m2 = load_cellfm(path, "tiny")
    assert m2.ckpt_report.dtypes == {"Float16": 33}
    for k, v in m.state_dict().items():
        assert torch.equal(v.half().float(), m2.state_dict()[k]), k


def test_bfloat16_and_split_records(tmp_path: Path) -> None:
    """BFloat16 is widened exactly; a tensor split over consecutive records (MindSpore does this for
    tensors above 512 MB) is concatenated."""
    x = torch.randn(6, 4).to(torch.bfloat16)
    raw = x.view(torch.int16).numpy().astype("<i2").tobytes()
    y = np.arange(24, dtype="<f4").reshape(6, 4)
    path = tmp_path / "raw.ckpt"
    with open(path, "wb") as f:
        f.write(record_header("b", (6, 4), "BFloat16", len(raw)) + raw)
        for part in np.array_split(y, 3):
            f.write(record_header("y", (6, 4), "Float32", part.nbytes) + part.tobytes())
    arrays = read_ckpt(path)
    assert torch.equal(torch.from_numpy(arrays["b"]), x.float())
    assert np.array_equal(arrays["y"], y)


def test_sizes_from_the_file(tmp_path: Path) -> None:
    m = _tiny(n_layers=4, gene_rows=200)
    path = tmp_path / "deep.ckpt"
    save_cellfm_ckpt(m, path)
    m2 = load_cellfm(path)  # no size: everything from the file
    assert len(m2.blocks) == 4 and m2.gene_emb.shape == (200, 32) and m2.cfg.n_heads == 1  # head dim 32
    m3 = load_cellfm(path, None, n_heads=4)
    assert torch.equal(m(*_inputs()), m3.eval()(*_inputs()))
    with pytest.raises(DataError, match="n_layers 4 but size 'tiny' has 2") as e:
        load_cellfm(path, "tiny")
    assert e.value.field == "encoder" and e.value.file == str(path)


def test_wrong_shaped_gene_table_is_an_error(tmp_path: Path) -> None:
    m = _tiny()
    items = _ms_items(m)
    items["gene_emb"] = np.zeros((104, 31), np.float32)  # width disagrees with the layers
    bad = tmp_path / "bad.ckpt"
    write_ckpt(bad, items.items())
    with pytest.raises(DataError, match=r"gene_emb.*\[104, 31\].*\[104, 32\]") as e:
        load_cellfm(bad)
    assert e.value.field == "gene_emb" and e.value.file == str(bad)

    good = tmp_path / "good.ckpt"
    save_cellfm_ckpt(m, good)
    bigger = build_cellfm("tiny", gene_rows=112)  # a model built for another vocabulary
    with MindSporeCkpt(good) as ck, pytest.raises(DataError, match="gene_emb") as e:
        load_cellfm_state(bigger, ck)
    assert "[104, 32]" in str(e.value) and "[112, 32]" in str(e.value)
    vocab_200 = GeneVocab.from_symbols(f"G{i}" for i in range(200))
    with pytest.raises(DataError, match="gene_emb has 104 rows but the vocabulary's largest id is 200"):
        build_backbone("cellfm", "tiny", checkpoint=good, vocab=vocab_200)
    fits = build_backbone(
        "cellfm", "tiny", checkpoint=good, vocab=GeneVocab.from_symbols(f"G{i}" for i in range(97))
    )
    assert len(fits.vocab) == 97
    with pytest.raises(DataError, match="gene_rows=112"):
        load_cellfm(good, "tiny", gene_rows=112)


def test_missing_and_unexpected_keys(tmp_path: Path) -> None:
    items = _ms_items(_tiny())
    missing = dict(items)
    del missing["encoder.1.ffn.o_proj.weight"]
    path = tmp_path / "missing.ckpt"
    write_ckpt(path, missing.items())
    with pytest.raises(DataError, match="lacks 1 model key.*encoder.1.ffn.o_proj.weight") as e:
        load_cellfm(path, "tiny")
    assert e.value.field == "encoder.1.ffn.o_proj.weight"

    for key in ("encoder.0.attn.lora_q.weight", "encoder.2.attn.q_proj.weight", "decoder.w.weight"):
        odd = tmp_path / "odd.ckpt"
        write_ckpt(odd, [*items.items(), (key, np.zeros((32, 32), np.float32))])
        with MindSporeCkpt(odd) as ck, pytest.raises(DataError, match="unexpected model key") as e:
            load_cellfm_state(build_cellfm("tiny"), ck)
        assert e.value.field == key

    # heads CellFM has but the backbone does not use are skipped and reported, not errors
    extra = [
        ("cellwise_dec.map.weight", np.zeros((32, 32), np.float32)),
        ("value_enc.mask_emb", np.zeros((1, 1, 32), np.float32)),
    ]
    ok = tmp_path / "ok.ckpt"
    write_ckpt(ok, [*items.items(), *extra])
    assert sorted(load_cellfm(ok, "tiny").ckpt_report.skipped_unused) == [
        "cellwise_dec.map.weight",
        "value_enc.mask_emb",
    ]


def test_truncated_and_garbage_files(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    save_cellfm_ckpt(_tiny(), good)
    data = good.read_bytes()
    for cut in (len(data) - 7, len(data) // 2, 3):
        path = tmp_path / f"cut{cut}.ckpt"
        path.write_bytes(data[:cut])
        with pytest.raises(DataError, match="truncated") as e:
            load_cellfm(path, "tiny")
        assert e.value.file == str(path)
    # cut exactly at a record boundary: parses, but the last key is missing
    with MindSporeCkpt(good) as ck:
        last = list(ck.records.values())[-1]
        end_prev = last.segments[0][0] - len(record_header(last.tag, last.dims, last.dtype, last.nbytes))
    (tmp_path / "boundary.ckpt").write_bytes(data[:end_prev])
    with pytest.raises(DataError, match=f"lacks 1 model key.*{last.tag}"):
        load_cellfm(tmp_path / "boundary.ckpt", "tiny")
    # content length disagreeing with dims
    wrong = tmp_path / "wrong.ckpt"
    wrong.write_bytes(record_header("gene_emb", (4, 4), "Float32", 8) + bytes(8))
    with pytest.raises(DataError, match="'gene_emb' has 8 content bytes but dims \\[4, 4\\]"):
        MindSporeCkpt(wrong)
    for name, blob in (("empty.ckpt", b""), ("text.ckpt", b"\x0f\xff not a checkpoint")):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(DataError, match="checkpoint"):
            load_cellfm(tmp_path / name)
    with pytest.raises(DataError, match="not found"):
        load_cellfm(tmp_path / "absent.ckpt")


def _schema_classes():
    """Message classes for the documented MindSpore schema, built by google.protobuf (proto2)."""
    pb = pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    del pb
    f = descriptor_pb2.FileDescriptorProto(name="ms_ckpt_test.proto", package="mstest", syntax="proto2")
    t = descriptor_pb2.FieldDescriptorProto
    tensor = f.message_type.add(name="Tensor")
    tensor.field.add(name="dims", number=1, type=t.TYPE_INT64, label=t.LABEL_REPEATED)
    tensor.field.add(name="tensor_type", number=2, type=t.TYPE_STRING, label=t.LABEL_OPTIONAL)
    tensor.field.add(name="tensor_content", number=3, type=t.TYPE_BYTES, label=t.LABEL_OPTIONAL)
    value = f.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=t.TYPE_STRING, label=t.LABEL_OPTIONAL)
    value.field.add(
        name="tensor", number=2, type=t.TYPE_MESSAGE, label=t.LABEL_OPTIONAL, type_name=".mstest.Tensor"
    )
    ck = f.message_type.add(name="Checkpoint")
    ck.field.add(
        name="value", number=1, type=t.TYPE_MESSAGE, label=t.LABEL_REPEATED, type_name=".mstest.Value"
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("mstest.Checkpoint"))


def test_interoperates_with_google_protobuf(tmp_path: Path) -> None:
    Checkpoint = _schema_classes()
    m = _tiny()
    # google.protobuf writes -> we read
    msg = Checkpoint()
    for tag, arr in _ms_items(m).items():
        v = msg.value.add(tag=tag)
        half = tag.startswith("encoder.1.")  # mix of dtypes as in mixed-precision checkpoints
        a = arr.astype("<f2" if half else "<f4")
        v.tensor.dims.extend(a.shape)
        v.tensor.tensor_type = "Float16" if half else "Float32"
        v.tensor.tensor_content = a.tobytes()
    mom = msg.value.add(tag="moment1.gene_emb").tensor
    mom.dims.extend([104, 32])
    mom.tensor_type = "Float32"
    mom.tensor_content = np.ones((104, 32), "<f4").tobytes()
    theirs = tmp_path / "theirs.ckpt"
    theirs.write_bytes(msg.SerializeToString())
    m2 = load_cellfm(theirs, "tiny")
    assert m2.ckpt_report.skipped_optimiser == ["moment1.gene_emb"]
    for k, v in m.state_dict().items():
        ref = v.half().float() if k.startswith("blocks.1.") else v
        assert torch.equal(ref, m2.state_dict()[k]), k
    # we write -> google.protobuf reads
    ours = tmp_path / "ours.ckpt"
    save_cellfm_ckpt(m, ours)
    parsed = Checkpoint.FromString(ours.read_bytes())
    got = {v.tag: v.tensor for v in parsed.value}
    ge = got["gene_emb"]
    assert list(ge.dims) == [104, 32] and ge.tensor_type == "Float32"
    assert np.array_equal(
        np.frombuffer(ge.tensor_content, "<f4").reshape(104, 32), m.gene_emb.detach().numpy()
    )
    assert set(got) == set(_ms_items(m))


GENUINE = Path(__file__).resolve().parent / "data" / "cellfm_tiny_mindspore.ckpt"


def test_reads_a_checkpoint_written_by_mindspore_itself() -> None:
    """tests/data/cellfm_tiny_mindspore.ckpt was written by `mindspore.save_checkpoint`
    (mindspore 2.10.0 from PyPI, cp311; see tests/fixtures/mindspore_ckpt.py) from the weights of
    `_tiny(0)` under MindSpore's key names, plus Adam moments of two tensors and a global step. The
    reader loads it into a tiny CellFM exactly and skips the optimiser state."""
    m = _tiny(0)
    loaded = build_backbone("cellfm", "tiny", checkpoint=GENUINE)
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    rep = loaded.ckpt_report
    assert sorted(rep.skipped_optimiser) == sorted(
        f"moment{i}.{k}" for i in (1, 2) for k in ("gene_emb", "cls_token")
    )
    assert rep.skipped_non_model == ["global_step"]
    v, ids, vis = _inputs()
    assert torch.equal(m(v, ids, vis), loaded.eval()(v, ids, vis))
