"""MindSpore `.ckpt` files without MindSpore: a tiny protobuf reader/writer and the CellFM key map.

A MindSpore checkpoint is one protobuf message (METHODS.md, verified with mindspore 2.10's save_checkpoint):
    message Checkpoint { repeated Value value = 1; }
    message Value      { string tag = 1; Tensor tensor = 2; }
    message Tensor     { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3; }
tensor_type is "Float32", "Float16", ...; tensor_content is the raw little-endian array. MindSpore splits
a very large tensor over consecutive Values with the same tag; those pieces are concatenated here.
Unknown fields are skipped by wire type, so newer writers' extra fields (crc, model type) do not break.

The file is memory-mapped and scanned once for offsets; each tensor is then copied straight into its
parameter, so a 10 GB checkpoint (weights + two Adam moments) is never held in memory, and the
optimiser moments are never decoded at all.
"""

from __future__ import annotations

import mmap
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stbench.errors import DataError

# ---------------------------------------------------------------- protobuf wire format

DTYPES: dict[str, str] = {
    "Float16": "<f2", "Float32": "<f4", "Float64": "<f8", "Bool": "?",
    "Int8": "i1", "Int16": "<i2", "Int32": "<i4", "Int64": "<i8",
    "UInt8": "u1", "UInt16": "<u2", "UInt32": "<u4", "UInt64": "<u8",
    "BFloat16": "<u2",  # decoded by widening to float32
}  # fmt: skip


class _Truncated(Exception):
    pass


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    """Decode a base-128 varint at pos; return (value, next position)."""
    value = shift = 0
    while True:
        if pos >= end:
            raise _Truncated
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: Any, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field number, wire type, value or start, end) for each field of a message in buf[pos:end].

    For varints the third item is the value; for length-delimited fields it is the payload start.
    """
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, pos
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Truncated
            yield number, wire, pos, pos + length
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Truncated
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {number})")


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _enc_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _enc_key(number: int, wire: int) -> bytes:
    return _enc_varint(number << 3 | wire)


def _enc_len(number: int, payload_len: int) -> bytes:
    """Key and length prefix of a length-delimited field (the payload is written separately)."""
    return _enc_key(number, 2) + _enc_varint(payload_len)


# ---------------------------------------------------------------- reading


@dataclass
class TensorRecord:
    """Where one tensor lives in the file: no data is read until MindSporeCkpt.array()."""

    tag: str
    dims: tuple[int, ...]
    dtype: str
    segments: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) of content

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.segments)


class MindSporeCkpt:
    """A memory-mapped MindSpore checkpoint: `records` by tag (scanned once), `array(tag)` on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError("checkpoint file not found", file=self.path)
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        size = self.path.stat().st_size
        self._buf: Any = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            self.records = self._scan(size)
        except BaseException:
            self.close()
            raise

    def _scan(self, size: int) -> dict[str, TensorRecord]:
        buf, records, last = self._buf, {}, None
        tag = None
        try:
            for number, wire, start, end in _fields(buf, 0, size):
                if number != 1 or wire != 2:
                    continue  # other top-level fields of newer writers
                tag, rec = None, TensorRecord("", (), "")
                tensor = None
                for n2, w2, s2, e2 in _fields(buf, start, end):
                    if n2 == 1 and w2 == 2:
                        tag = bytes(buf[s2:e2]).decode("utf-8")
                    elif n2 == 2 and w2 == 2:
                        tensor = (s2, e2)
                if tag is None or tensor is None:
                    raise DataError(
                        f"checkpoint record at byte {start} has no {'tag' if tag is None else 'tensor'}",
                        file=self.path,
                        field=tag,
                    )
                rec.tag = tag
                self._parse_tensor(rec, *tensor)
                if tag in records:
                    prev = records[tag]
                    if last != tag or (prev.dims, prev.dtype) != (rec.dims, rec.dtype):
                        raise DataError(f"duplicate checkpoint key {tag!r}", file=self.path, field=tag)
                    prev.segments.extend(rec.segments)  # a large tensor split over consecutive records
                else:
                    records[tag] = rec
                last = tag
        except _Truncated:
            raise DataError(
                f"checkpoint is truncated or corrupt (a protobuf field runs past the end, {size} bytes)",
                file=self.path,
                field=tag,
            ) from None
        except ValueError as e:
            raise DataError(f"not a MindSpore checkpoint: {e}", file=self.path, field=tag) from None
        if not records:
            raise DataError("checkpoint holds no tensors (empty or not a MindSpore .ckpt)", file=self.path)
        for rec in records.values():
            self._check_size(rec)
        return records

    def _parse_tensor(self, rec: TensorRecord, start: int, end: int) -> None:
        dims: list[int] = []
        content = (start, 0)
        for number, wire, a, b in _fields(self._buf, start, end):
            if number == 1 and wire == 0:
                dims.append(_signed64(a))
            elif number == 1 and wire == 2:  # packed repeated int64
                pos = a
                while pos < b:
                    v, pos = _varint(self._buf, pos, b)
                    dims.append(_signed64(v))
            elif number == 2 and wire == 2:
                rec.dtype = bytes(self._buf[a:b]).decode("utf-8")
            elif number == 3 and wire == 2:
                content = (a, b - a)
        rec.dims = tuple(dims)
        rec.segments = [content]

    def _check_size(self, rec: TensorRecord) -> None:
        if rec.dtype not in DTYPES:
            return  # e.g. "str" scalars of non-model keys: checked only if a model key needs them
        expected = int(np.prod(rec.dims, dtype=np.int64)) * np.dtype(DTYPES[rec.dtype]).itemsize
        if expected != rec.nbytes:
            raise DataError(
                f"tensor {rec.tag!r} has {rec.nbytes} content bytes but dims {list(rec.dims)} of "
                f"{rec.dtype} need {expected} (truncated or corrupt file)",
                file=self.path,
                field=rec.tag,
            )

    def array(self, tag: str) -> np.ndarray:
        """A fresh (writable) ndarray of the tensor; BFloat16 is widened to float32."""
        rec = self.records[tag]
        if rec.dtype not in DTYPES:
            raise DataError(f"tensor {tag!r} has unsupported type {rec.dtype!r}", file=self.path, field=tag)
        dt = np.dtype(DTYPES[rec.dtype])
        if len(rec.segments) == 1:
            off, n = rec.segments[0]
            arr = np.frombuffer(self._buf, dtype=dt, count=n // dt.itemsize, offset=off).copy()
        else:
            arr = np.concatenate(
                [
                    np.frombuffer(self._buf, dtype=dt, count=n // dt.itemsize, offset=o)
                    for o, n in rec.segments
                ]
            )
        if rec.dtype == "BFloat16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.reshape(rec.dims)

    def close(self) -> None:
        if isinstance(self._buf, mmap.mmap):
            self._buf.close()
        self._file.close()

    def __enter__(self) -> MindSporeCkpt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_ckpt(path: str | Path) -> dict[str, np.ndarray]:
    """Every decodable tensor of a (small) checkpoint as ndarrays; for tests and inspection."""
    with MindSporeCkpt(path) as ck:
        return {t: ck.array(t) for t, r in ck.records.items() if r.dtype in DTYPES}


# ---------------------------------------------------------------- writing


def record_header(
    tag: str, dims: Sequence[int], tensor_type: str, nbytes: int, *, packed_dims: bool = False
) -> bytes:
    """Bytes of one top-level `value` record up to (not including) its `nbytes` of tensor content."""
    if packed_dims:
        body = b"".join(_enc_varint(d) for d in dims)
        dims_b = _enc_len(1, len(body)) + body if dims else b""
    else:
        dims_b = b"".join(_enc_key(1, 0) + _enc_varint(d) for d in dims)
    ttype = tensor_type.encode()
    head = dims_b + _enc_len(2, len(ttype)) + ttype + _enc_len(3, nbytes)
    tag_b = tag.encode()
    value = _enc_len(1, len(tag_b)) + tag_b + _enc_len(2, len(head) + nbytes)
    return _enc_len(1, len(value) + len(head) + nbytes) + value + head


def write_ckpt(
    path: str | Path, items: Iterable[tuple[str, np.ndarray]], *, packed_dims: bool = False
) -> None:
    """Write (tag, array) pairs in MindSpore's schema (proto2 style: unpacked dims unless packed_dims).

    The array's dtype picks tensor_type (float16/32/64, ints, bool). Content is streamed, never
    concatenated with its header; the file appears atomically.
    """
    from stbench.utils.io import atomic_path

    types = {np.dtype(v): k for k, v in DTYPES.items() if k != "BFloat16"}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for tag, arr in items:
            arr = np.ascontiguousarray(arr)
            arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
            if arr.dtype not in types:
                raise ValueError(f"cannot write dtype {arr.dtype} for {tag!r}")
            f.write(record_header(tag, arr.shape, types[arr.dtype], arr.nbytes, packed_dims=packed_dims))
            f.write(arr.tobytes())


# ---------------------------------------------------------------- CellFM key map

_BLOCK = re.compile(r"^encoder\.(\d+)\.(.+)$")
_BLOCK_PARTS = {f"attn.{p}_proj.weight": f"attn.{p}_proj.weight" for p in "qkvuo"}
_BLOCK_PARTS |= {f"ffn.{p}_proj.weight": f"ffn.{p}_proj.weight" for p in "uvo"}
_BLOCK_PARTS |= {
    f"post_norm{i}.{a}": f"norm{i}.{b}" for i in (1, 2) for a, b in (("gamma", "weight"), ("beta", "bias"))
}
_TOP = {
    "gene_emb": "gene_emb",
    "cls_token": "cls_token",
    "zero_emb": "zero_emb",
    "value_enc.value_enc.w1.weight": "value_enc.value_enc.w1.weight",
    "value_enc.value_enc.w3.weight": "value_enc.value_enc.w3.weight",
    "value_enc.value_enc.table.weight": "value_enc.value_enc.table.weight",
    "value_enc.value_enc.a": "value_enc.value_enc.a",
    "value_dec.w1.weight": "value_dec.w1.weight",
    "value_dec.w2.weight": "value_dec.w2.weight",
}
_TOP_INV = {v: k for k, v in _TOP.items()}
_BLOCK_INV = {v: k for k, v in _BLOCK_PARTS.items()}

OPTIMISER_PREFIXES = ("moment1.", "moment2.", "adam_m.", "adam_v.", "accu_grads.")
NON_MODEL_KEYS = frozenset(
    {"global_step", "learning_rate", "beta1_power", "beta2_power", "current_iterator_step",
     "last_overflow_iterator_step", "epoch_num", "step_num", "scale_sense", "loss_scale"}
)  # fmt: skip
# CellFM parameters of heads the backbone does not use (pretraining-only decoders, the masked-value
# embedding of the MindSpore ValueEncoder that HINGE replaces by zero_emb, spatial extensions).
UNUSED_MODEL_PREFIXES = ("cellwise_dec.", "value_enc.mask_emb", "ST_emb", "ST_enc.")


def ckpt_to_torch(tag: str) -> str | None:
    """The CellFM module's state_dict name for a checkpoint key, or None if it is not a backbone weight."""
    if tag in _TOP:
        return _TOP[tag]
    m = _BLOCK.match(tag)
    if m and m.group(2) in _BLOCK_PARTS:
        return f"blocks.{m.group(1)}.{_BLOCK_PARTS[m.group(2)]}"
    return None


def torch_to_ckpt(name: str) -> str:
    if name in _TOP_INV:
        return _TOP_INV[name]
    m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
    if m and m.group(2) in _BLOCK_INV:
        return f"encoder.{m.group(1)}.{_BLOCK_INV[m.group(2)]}"
    raise KeyError(f"no CellFM checkpoint name for parameter {name!r}")


@dataclass
class CkptReport:
    """What a load did: every file key is in exactly one list."""

    file: str
    loaded: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)  # equal up to singleton axes, e.g. a: [1] vs (1, 1)
    skipped_optimiser: list[str] = field(default_factory=list)
    skipped_non_model: list[str] = field(default_factory=list)
    skipped_unused: list[str] = field(default_factory=list)
    dtypes: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{self.file}: loaded {len(self.loaded)} tensors ({len(self.reshaped)} reshaped), skipped "
            f"{len(self.skipped_optimiser)} optimiser moments, {len(self.skipped_non_model)} non-model "
            f"keys {sorted(self.skipped_non_model)}, {len(self.skipped_unused)} unused model keys "
            f"{sorted(self.skipped_unused)}; dtypes {self.dtypes}"
        )


def _classify(tag: str, extra_skip: tuple[str, ...]) -> str:
    if tag.startswith(OPTIMISER_PREFIXES):
        return "optimiser"
    if tag in NON_MODEL_KEYS:
        return "non_model"
    if tag.startswith(UNUSED_MODEL_PREFIXES) or (extra_skip and tag.startswith(extra_skip)):
        return "unused"
    return "model" if ckpt_to_torch(tag) is not None else "unexpected"


def _squeezed(shape: Iterable[int]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def infer_cellfm_shape(ck: MindSporeCkpt) -> dict[str, int]:
    """Width, gene rows, layer count and value bins from the file's shapes (no data read).

    The width comes from the first layer's projection, not from the gene table, so a gene table of
    the wrong width is reported as a gene_emb shape mismatch rather than resizing the model.
    """
    recs = ck.records
    q = "encoder.0.attn.q_proj.weight"
    for key in ("gene_emb", "value_enc.value_enc.w1.weight", q):
        if key not in recs:
            raise DataError(f"checkpoint has no {key!r}: not a CellFM checkpoint", file=ck.path, field=key)
    ge, qd = recs["gene_emb"].dims, recs[q].dims
    if len(ge) != 2:
        raise DataError(
            f"gene_emb must be 2-D (rows, dim), got dims {list(ge)}", file=ck.path, field="gene_emb"
        )
    if len(qd) != 2 or qd[0] != qd[1]:
        raise DataError(f"{q} must be square (dim, dim), got dims {list(qd)}", file=ck.path, field=q)
    layers = {int(m.group(1)) for t in recs if (m := _BLOCK.match(t))}
    return {
        "rows": ge[0],
        "dim": qd[0],
        "n_layers": max(layers) + 1,
        "value_bins": recs["value_enc.value_enc.w1.weight"].dims[0],
    }


def load_cellfm_state(
    model: torch.nn.Module, ck: MindSporeCkpt, *, extra_skip: tuple[str, ...] = ()
) -> CkptReport:
    """Copy every backbone tensor of `ck` into `model`; all checks happen before any copy.

    Raises DataError (naming the file and key) on a missing key, an unexpected model key, or any shape
    mismatch - including the gene table, which is never left randomly initialised.
    """
    params = dict(model.state_dict(keep_vars=True))
    report = CkptReport(file=str(ck.path))
    plan: list[tuple[str, str]] = []
    for tag in ck.records:
        kind = _classify(tag, extra_skip)
        if kind == "optimiser":
            report.skipped_optimiser.append(tag)
        elif kind == "non_model":
            report.skipped_non_model.append(tag)
        elif kind == "unused":
            report.skipped_unused.append(tag)
        elif kind == "unexpected" or ckpt_to_torch(tag) not in params:
            raise DataError(
                f"unexpected model key {tag!r} in checkpoint (no matching parameter)", file=ck.path, field=tag
            )
        else:
            plan.append((tag, ckpt_to_torch(tag)))  # type: ignore[arg-type]
    wanted = {torch_to_ckpt(n) for n in params}
    missing = sorted(wanted - {t for t, _ in plan})
    if missing:
        raise DataError(
            f"checkpoint lacks {len(missing)} model key(s): {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else ""),
            file=ck.path,
            field=missing[0],
        )
    for tag, name in plan:
        rec, shape = ck.records[tag], tuple(params[name].shape)
        if rec.dtype not in DTYPES or rec.dtype == "Bool":
            raise DataError(f"{tag!r} has non-float type {rec.dtype!r}", file=ck.path, field=tag)
        if rec.dims != shape:
            if _squeezed(rec.dims) != _squeezed(shape):
                raise DataError(
                    f"shape mismatch for {tag!r}: checkpoint {list(rec.dims)} vs model {list(shape)}",
                    file=ck.path,
                    field=tag,
                )
            report.reshaped.append(tag)
    with torch.no_grad():
        for tag, name in plan:
            p = params[name]
            src = torch.from_numpy(ck.array(tag)).reshape(p.shape)
            p.copy_(src.to(dtype=p.dtype))
            report.loaded.append(tag)
    report.dtypes = dict(Counter(ck.records[t].dtype for t, _ in plan))
    return report


def _materialize(model: torch.nn.Module) -> None:
    """Meta parameters -> uninitialised CPU ones (Module.to_empty goes through slow Python refs)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.device.type == "meta":
                module._parameters[name] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad
                )


def load_cellfm(
    path: str | Path,
    size: str | None = None,
    *,
    vocab: Any = None,
    extra_skip: tuple[str, ...] = (),
    **overrides: Any,
) -> torch.nn.Module:
    """A CellFM sized from the file (gene rows, layers, width, value bins) with its weights loaded.

    `size` ("800m", "80m", "tiny") supplies head count, dropout and norms, and must agree with the
    file's width and layer count. A `vocab` (GeneVocab) must fit the file's gene table exactly
    (rows == round_up8(vocab.max_id + 1)). `overrides` change other config fields (e.g. leaky_slope).
    """
    from baselines._scfm.cellfm import SIZES, CellFM, CellFMConfig, round_up8

    if size is not None and size not in SIZES:
        from stbench.errors import UnknownNameError

        raise UnknownNameError("cellfm size", size, list(SIZES))
    with MindSporeCkpt(path) as ck:
        shape = infer_cellfm_shape(ck)
        base = SIZES[size] if size is not None else CellFMConfig()
        if size is None and "n_heads" not in overrides:  # CellFM's head width is 32 at every size
            if shape["dim"] % base.head_dim:
                raise DataError(
                    f"width {shape['dim']} is not a multiple of {base.head_dim}: pass n_heads",
                    file=ck.path,
                    field="encoder.0.attn.q_proj.weight",
                )
            overrides = {**overrides, "n_heads": shape["dim"] // base.head_dim}
        for key, fld in (("dim", "encoder.0.attn.q_proj.weight"), ("n_layers", "encoder")):
            if size is not None and getattr(base, key) != shape[key]:
                raise DataError(
                    f"checkpoint has {key} {shape[key]} but size {size!r} has {getattr(base, key)}",
                    file=ck.path,
                    field=fld,
                )
        if "gene_rows" in overrides and overrides["gene_rows"] != shape["rows"]:
            raise DataError(
                f"gene_emb has {shape['rows']} rows in the file but gene_rows={overrides['gene_rows']} was asked",
                file=ck.path,
                field="gene_emb",
            )
        if vocab is not None and round_up8(vocab.max_id + 1) != shape["rows"]:
            raise DataError(
                f"gene_emb has {shape['rows']} rows but the vocabulary's largest id is {vocab.max_id} "
                f"(needs {round_up8(vocab.max_id + 1)} rows): wrong vocabulary file for this checkpoint",
                file=ck.path,
                field="gene_emb",
            )
        cfg = base.replace(
            **{
                **overrides,
                "dim": shape["dim"],
                "n_layers": shape["n_layers"],
                "gene_rows": shape["rows"],
                "value_bins": shape["value_bins"],
            }
        )
        with torch.device("meta"):
            model = CellFM(cfg, size=size or "file")
        _materialize(model)  # every tensor is overwritten below (missing keys raise first)
        model.ckpt_report = load_cellfm_state(model, ck, extra_skip=extra_skip)
    model.checkpoint_path = str(path)
    model.vocab = vocab
    return model


def save_cellfm_ckpt(
    model: torch.nn.Module,
    path: str | Path,
    *,
    dtype: str = "Float32",
    extra: dict[str, np.ndarray] | None = None,
    packed_dims: bool = False,
) -> None:
    """Write a CellFM's weights under MindSpore's key names (plus `extra` tensors, e.g. moments) for tests."""
    np_dtype = np.dtype(DTYPES[dtype])

    def items() -> Iterator[tuple[str, np.ndarray]]:
        for name, t in model.state_dict().items():
            yield torch_to_ckpt(name), t.detach().cpu().float().numpy().astype(np_dtype)
        yield from (extra or {}).items()

    write_ckpt(path, items(), packed_dims=packed_dims)
