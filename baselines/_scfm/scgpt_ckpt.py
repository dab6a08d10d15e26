"""scGPT's published checkpoint layout: a directory with best_model.pt, vocab.json and args.json.

- best_model.pt: a torch state_dict of scGPT's TransformerModel (keys may carry DDP's "module.").
  Attention weights come in three spellings: torch's `self_attn.in_proj_weight/in_proj_bias`, flash-attn
  `self_attn.Wqkv.{weight,bias}` (the released whole-human file, see bowang-lab/scGPT issue #173) and
  the newer wrapper's `self_attn._impl.Wqkv.*` / `self_attn._impl.out_proj.*`. The packed matrix is
  [q; k; v] along rows in all three (flash rearranges "(three h d)"), so it splits into q/k/v_proj.
- vocab.json: {token: id}; scGPT appends "<pad>", "<cls>", "<eoc>" (in that order) when missing, and
  the embedding has one row per token.
- args.json: the pretraining arguments; embsize, nlayers, nheads, d_hid size the model (nheads cannot
  be read from the weights), pad_value / mask_value / dropout / n_bins / pad_token are taken too.

Heads HINGE does not use (MVC, cell-type, adversarial, zero-probability, batch encoder) are skipped with
a report. Anything else unknown (e.g. a `bn.*` input batch-norm, which would change the forward pass),
a missing key or a shape mismatch is a DataError naming the file and the key; all checks run before
any weight is copied.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from baselines._scfm.scgpt import SIZES, SPECIAL_TOKENS, ScGPT, ScGPTConfig
from baselines._scfm.vocab import GeneVocab
from stbench.errors import DataError
from stbench.utils.io import atomic_path, write_json_atomic

MODEL_FILE, VOCAB_FILE, ARGS_FILE = "best_model.pt", "vocab.json", "args.json"
SKIPPED_HEADS = (
    "mvc_decoder.",
    "cls_decoder.",
    "grad_reverse_discriminator.",
    "decoder.zero_logit.",
    "batch_encoder.",
    "sim.",
)
LAYOUTS = ("torch", "flash", "flash_impl")

_LAYER = re.compile(r"^transformer_encoder\.layers\.(\d+)\.(.+)$")
# packed q/k/v: (checkpoint suffix, model suffix) for every layout
_PACKED = {
    "self_attn.in_proj_weight": "weight",
    "self_attn.in_proj_bias": "bias",
    "self_attn.Wqkv.weight": "weight",
    "self_attn.Wqkv.bias": "bias",
    "self_attn._impl.Wqkv.weight": "weight",
    "self_attn._impl.Wqkv.bias": "bias",
}
_LAYER_PARTS = {
    "self_attn.out_proj.weight": "attn.o_proj.weight",
    "self_attn.out_proj.bias": "attn.o_proj.bias",
    "self_attn._impl.out_proj.weight": "attn.o_proj.weight",
    "self_attn._impl.out_proj.bias": "attn.o_proj.bias",
    **{f"{lin}.{p}": f"ffn.{lin}.{p}" for lin in ("linear1", "linear2") for p in ("weight", "bias")},
    **{f"{n}.{p}": f"{n}.{p}" for n in ("norm1", "norm2") for p in ("weight", "bias")},
}
_TOP = (
    "encoder.embedding.weight",
    *(f"{m}.{p}" for m in ("encoder.enc_norm", "value_encoder.linear1", "value_encoder.linear2",
                           "value_encoder.norm") for p in ("weight", "bias")),
    *(f"decoder.fc.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")),
    "flag_encoder.weight",
)  # fmt: skip
_EXPORT_NAMES = {
    "torch": ("self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj"),
    "flash": ("self_attn.Wqkv.weight", "self_attn.Wqkv.bias", "self_attn.out_proj"),
    "flash_impl": ("self_attn._impl.Wqkv.weight", "self_attn._impl.Wqkv.bias", "self_attn._impl.out_proj"),
}


def ckpt_targets(key: str) -> list[str] | None:
    """Model parameter names a checkpoint key fills (three for packed q/k/v), or None if unknown."""
    if key in _TOP:
        return [key]
    m = _LAYER.match(key)
    if not m:
        return None
    i, part = m.groups()
    if part in _PACKED:
        return [f"blocks.{i}.attn.{p}_proj.{_PACKED[part]}" for p in "qkv"]
    if part in _LAYER_PARTS:
        return [f"blocks.{i}.{_LAYER_PARTS[part]}"]
    return None


def scgpt_state_dict(
    model: ScGPT, layout: str = "flash", extra: Mapping[str, torch.Tensor] | None = None
) -> OrderedDict[str, torch.Tensor]:
    """The model's weights under scGPT's key names (`layout`: torch / flash / flash_impl attention names)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    w_name, b_name, out_name = _EXPORT_NAMES[layout]
    sd = model.state_dict()
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name in _TOP:
        if name in sd:
            out[name] = sd[name].detach().clone()
    for i, block in enumerate(model.blocks):
        pre, a = f"transformer_encoder.layers.{i}.", block.attn
        out[pre + w_name] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach().clone()
        out[pre + b_name] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).detach().clone()
        out[pre + out_name + ".weight"] = a.o_proj.weight.detach().clone()
        out[pre + out_name + ".bias"] = a.o_proj.bias.detach().clone()
        for part, target in _LAYER_PARTS.items():
            if not part.startswith("self_attn."):
                out[pre + part] = sd[f"blocks.{i}.{target}"].detach().clone()
    out.update(extra or {})
    return out


@dataclass
class ScGPTCkptReport:
    """What a load did: every checkpoint key is in exactly one of loaded / skipped_heads / skipped_unused."""

    file: str
    layout: str = "torch"
    loaded: list[str] = field(default_factory=list)
    skipped_heads: list[str] = field(default_factory=list)
    skipped_unused: list[str] = field(default_factory=list)  # e.g. flag_encoder when mask_style is mlm
    stripped_prefix: bool = False

    def summary(self) -> str:
        heads = sorted({k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("decoder.") else "")
                        for k in self.skipped_heads})  # fmt: skip
        return (
            f"{self.file}: loaded {len(self.loaded)} tensors ({self.layout} attention names"
            f"{', module. prefix stripped' if self.stripped_prefix else ''}); skipped {len(self.skipped_heads)} "
            f"head tensors {heads}; {len(self.skipped_unused)} unused {sorted(self.skipped_unused)}"
        )


def _layout_of(keys: list[str]) -> str:
    if any(".self_attn._impl." in k for k in keys):
        return "flash_impl"
    return "flash" if any(".self_attn.Wqkv." in k for k in keys) else "torch"


def load_scgpt_state(
    model: ScGPT, state: Mapping[str, torch.Tensor], file: str | Path = MODEL_FILE
) -> ScGPTCkptReport:
    """Copy a scGPT state_dict into `model`. Checks every key and shape before copying anything."""
    report = ScGPTCkptReport(file=str(file))
    if any(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
        report.stripped_prefix = True
    report.layout = _layout_of(list(state))
    params = dict(model.state_dict(keep_vars=True))
    plan: list[tuple[str, list[str]]] = []
    filled: dict[str, str] = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise DataError(f"{key!r} is not a tensor ({type(tensor).__name__})", file=file, field=key)
        if key.startswith(SKIPPED_HEADS):
            report.skipped_heads.append(key)
            continue
        targets = ckpt_targets(key)
        if targets is None:
            raise DataError(
                f"unexpected key {key!r} in the scGPT state_dict (a module this port does not implement; "
                "it would change the forward pass)",
                file=file,
                field=key,
            )
        if targets[0] not in params:  # flag_encoder with mask_style mlm
            report.skipped_unused.append(key)
            continue
        for t in targets:
            if t in filled:
                raise DataError(f"{key!r} and {filled[t]!r} both fill {t!r}", file=file, field=key)
            filled[t] = key
        want = (len(targets) * params[targets[0]].shape[0], *params[targets[0]].shape[1:])
        if tuple(tensor.shape) != want:
            raise DataError(
                f"shape mismatch for {key!r}: checkpoint {list(tensor.shape)} vs model {list(want)}",
                file=file,
                field=key,
            )
        if not tensor.is_floating_point():
            raise DataError(f"{key!r} has non-float dtype {tensor.dtype}", file=file, field=key)
        plan.append((key, targets))
    missing = sorted(set(params) - set(filled))
    if missing:
        names = [_export_name(n, report.layout) for n in missing]
        raise DataError(
            f"state_dict lacks {len(missing)} model key(s): {', '.join(names[:8])}"
            + (" ..." if len(names) > 8 else ""),
            file=file,
            field=names[0],
        )
    return apply_load_plan(params, state, plan, report)


def _export_name(param: str, layout: str) -> str:
    """scGPT key for a model parameter name (for error messages)."""
    m = re.match(r"^blocks\.(\d+)\.(.+)$", param)
    if not m:
        return param
    i, part = m.groups()
    pre = f"transformer_encoder.layers.{i}."
    w_name, b_name, out_name = _EXPORT_NAMES[layout]
    if part.startswith(("attn.q_proj", "attn.k_proj", "attn.v_proj")):
        return pre + (w_name if part.endswith("weight") else b_name)
    if part.startswith("attn.o_proj"):
        return pre + out_name + part.removeprefix("attn.o_proj")
    return pre + part.removeprefix("ffn.")


# ---------------------------------------------------------------- vocab.json and args.json


def read_scgpt_vocab(
    src: str | Path | Mapping[str, int], pad_token: str = "<pad>"
) -> tuple[GeneVocab, dict[str, int], int]:
    """(gene vocabulary without specials, special token ids, embedding rows) from scGPT's vocab.json.

    Missing specials are appended after the last id in SPECIAL_TOKENS order (scGPT's loaders do this),
    so the row count equals the token count. Ids must be 0..n-1 without gaps or repeats.
    """
    if isinstance(src, GeneVocab):
        raise TypeError(
            "pass scGPT's vocab.json path or a {token: id} mapping: a GeneVocab has no special tokens"
        )
    source = None if isinstance(src, Mapping) else str(src)
    if isinstance(src, Mapping):
        tokens = dict(src)
    else:
        path = Path(src)
        if not path.is_file():
            raise DataError("scGPT vocabulary file not found", file=path)
        try:
            tokens = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"vocab.json is not valid JSON: {e}", file=path) from None
        if not isinstance(tokens, dict):
            raise DataError("vocab.json must be a {token: id} object", file=path)
    bad = next((k for k, v in tokens.items() if not isinstance(v, int) or isinstance(v, bool)), None)
    if bad is not None:
        raise DataError(f"non-integer id {tokens[bad]!r} for token {bad!r}", file=source, field=bad)
    ids = sorted(tokens.values())
    if ids != list(range(len(ids))):
        dup = next((i for i, j in zip(ids, ids[1:], strict=False) if i == j), None)
        what = f"id {dup} is used twice" if dup is not None else "ids are not 0..n-1 without gaps"
        raise DataError(f"vocab.json {what}", file=source, field="ids")
    specials_order = (pad_token, *(s for s in SPECIAL_TOKENS if s != "<pad>"))
    for special in specials_order:
        if special not in tokens:
            tokens[special] = len(tokens)
    specials = {s: tokens[s] for s in specials_order}
    if pad_token != "<pad>":
        specials["<pad>"] = specials[pad_token]
    genes = {t: i for t, i in tokens.items() if t not in specials}
    return GeneVocab(genes, pad_id=specials["<pad>"], source=source), specials, len(tokens)


def args_from_config(cfg: ScGPTConfig) -> dict[str, Any]:
    """The args.json fields scGPT's loaders read, for a model of `cfg`."""
    return {
        "embsize": cfg.dim,
        "nlayers": cfg.n_layers,
        "nheads": cfg.n_heads,
        "d_hid": cfg.d_hid,
        "dropout": cfg.dropout,
        "n_layers_cls": 3,
        "pad_token": "<pad>",
        "pad_value": cfg.pad_value,
        "mask_value": cfg.mask_value,
        "n_bins": cfg.n_bins,
        "input_style": "binned",
        "input_emb_style": "continuous",
    }


def config_from_args(args: Mapping[str, Any], file: str | Path = ARGS_FILE) -> dict[str, Any]:
    """ScGPTConfig fields from args.json; rejects settings that change the architecture."""
    out: dict[str, Any] = {}
    for key, fld in (("embsize", "dim"), ("nlayers", "n_layers"), ("nheads", "n_heads"), ("d_hid", "d_hid")):
        v = args.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise DataError(f"args.json needs a positive integer {key!r}, got {v!r}", file=file, field=key)
        out[fld] = v
    for key in ("dropout", "pad_value", "mask_value"):
        if args.get(key) is not None:
            out[key] = float(args[key])
    if "n_bins" in args:
        out["n_bins"] = args["n_bins"]
    style = args.get("input_emb_style", "continuous")
    if style != "continuous":
        raise DataError(
            f"input_emb_style {style!r} is not supported (only scGPT's 'continuous' value encoder)",
            file=file,
            field="input_emb_style",
        )
    if args.get("pre_norm") or args.get("norm_scheme", "post") != "post":
        raise DataError(
            "pre-norm scGPT checkpoints are not supported (post-LN only)", file=file, field="pre_norm"
        )
    if out["dim"] % out["n_heads"]:
        raise DataError(
            f"embsize {out['dim']} is not divisible by nheads {out['n_heads']}", file=file, field="nheads"
        )
    return out


# ---------------------------------------------------------------- the directory


def _files(path: str | Path) -> tuple[Path, Path, Path]:
    root = Path(path)
    if root.is_file():
        root = root.parent
    files = (root / MODEL_FILE, root / VOCAB_FILE, root / ARGS_FILE)
    for f in files:
        if not f.is_file():
            raise DataError(f"scGPT checkpoint directory lacks {f.name}", file=f)
    return files


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """best_model.pt as a flat {key: tensor} dict (weights_only: no pickled code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise DataError(f"cannot read the scGPT state_dict: {e}", file=path) from None
    if not isinstance(state, Mapping):
        raise DataError(f"expected a state_dict (mapping), got {type(state).__name__}", file=path)
    return dict(state)


def _shape_from_state(state: Mapping[str, torch.Tensor], file: Path) -> dict[str, int]:
    state = {k.removeprefix("module."): v for k, v in state.items()}
    emb = state.get("encoder.embedding.weight")
    if emb is None or emb.dim() != 2:
        raise DataError(
            "no 2-D 'encoder.embedding.weight': not a scGPT state_dict",
            file=file,
            field="encoder.embedding.weight",
        )
    layers = {int(m.group(1)) for k in state if (m := _LAYER.match(k))}
    if not layers:
        raise DataError("no transformer_encoder.layers.{i}.* keys", file=file, field="transformer_encoder")
    lin1 = state.get("transformer_encoder.layers.0.linear1.weight")
    if lin1 is None:
        raise DataError("missing key", file=file, field="transformer_encoder.layers.0.linear1.weight")
    return {
        "n_tokens": emb.shape[0],
        "dim": emb.shape[1],
        "n_layers": max(layers) + 1,
        "d_hid": lin1.shape[0],
    }


def _materialize(model: torch.nn.Module) -> None:
    """Uninitialised CPU storage for every meta parameter. Not Module.to_empty: its empty_like on meta
    tensors goes through torch._refs and imports sympy on first use (seconds)."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                mod._parameters[name] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype), p.requires_grad
                )


def load_scgpt(
    path: str | Path,
    size: str | None = None,
    *,
    vocab: str | Path | Mapping[str, int] | None = None,
    **overrides: Any,
) -> ScGPT:
    """A scGPT from its checkpoint directory (or its best_model.pt), sized from the files.

    args.json gives width, depth, heads and FFN size (cross-checked against the weights); the gene table
    is sized from the weights and must have one row per vocab.json token. A named `size` must agree
    with the files' width/depth/heads/FFN. `overrides` set other config fields (mask_style, dropout ...).
    """
    model_file, vocab_file, args_file = _files(path)
    try:
        args = json.loads(args_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"args.json is not valid JSON: {e}", file=args_file) from None
    fields = config_from_args(args, args_file)
    state = read_state(model_file)
    shape = _shape_from_state(state, model_file)
    sources = {
        "dim": "encoder.embedding.weight",
        "n_layers": "transformer_encoder.layers",
        "d_hid": "transformer_encoder.layers.0.linear1.weight",
    }
    for fld, key in (("dim", "embsize"), ("n_layers", "nlayers"), ("d_hid", "d_hid")):
        if fields[fld] != shape[fld]:
            raise DataError(
                f"args.json has {key} {fields[fld]} but {model_file.name} has {shape[fld]} ({sources[fld]})",
                file=args_file,
                field=key,
            )
    if size is not None and size in SIZES:
        ref = SIZES[size]
        for fld, key in (
            ("dim", "embsize"),
            ("n_layers", "nlayers"),
            ("n_heads", "nheads"),
            ("d_hid", "d_hid"),
        ):
            if getattr(ref, fld) != fields[fld]:
                raise DataError(
                    f"checkpoint has {key} {fields[fld]} but size {size!r} has {getattr(ref, fld)}",
                    file=args_file,
                    field=key,
                )
    vocab_src = vocab if vocab is not None else vocab_file
    gene_vocab, specials, n_tokens = read_scgpt_vocab(vocab_src, str(args.get("pad_token", "<pad>")))
    if n_tokens != shape["n_tokens"]:
        raise DataError(
            f"encoder.embedding.weight has {shape['n_tokens']} rows but the vocabulary has {n_tokens} tokens "
            "(specials included): wrong vocab.json for this checkpoint",
            file=vocab_src if not isinstance(vocab_src, Mapping) else model_file,
            field="encoder.embedding.weight",
        )
    cfg = ScGPTConfig(
        **{
            **fields,
            "n_tokens": n_tokens,
            "pad_id": specials["<pad>"],
            "cls_id": specials["<cls>"],
            **overrides,
        }
    )
    with torch.device("meta"):
        model = ScGPT(cfg, size=size or "file")
    _materialize(model)  # every tensor is overwritten below (a missing key raises first)
    model.ckpt_report = load_scgpt_state(model, state, model_file)
    model.checkpoint_path = str(model_file)
    model.vocab = gene_vocab
    return model


def save_scgpt_dir(
    model: ScGPT,
    vocab: GeneVocab | Mapping[str, int] | None,
    args: Mapping[str, Any] | None,
    path: str | Path,
    *,
    layout: str = "flash",
    extra: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` in scGPT's layout (for tests and exports); returns the directory.

    vocab: {token: id} written as is, or a GeneVocab (specials <pad>/<cls> from model.cfg and <eoc> on the
    one row left), or None (model.vocab, else placeholder names G<i> on every non-special row). args override the
    fields derived from model.cfg. `extra` tensors (e.g. mvc_decoder.*) are written too.
    """
    cfg, root = model.cfg, Path(path)
    vocab = vocab if vocab is not None else model.vocab
    if isinstance(vocab, Mapping):
        tokens = dict(vocab)
    else:
        genes = dict(vocab.ids) if vocab is not None else {}
        free = sorted(set(range(cfg.n_tokens)) - {cfg.pad_id, cfg.cls_id} - set(genes.values()))
        if vocab is None:  # placeholder genes on every free row but the last, which is <eoc>
            genes, free = {f"G{i}": i for i in free[:-1]}, free[-1:]
        if len(free) != 1:
            raise ValueError(
                f"the vocabulary leaves {len(free)} of the {cfg.n_tokens} table rows unused (need exactly one "
                "for <eoc>): it does not fit this model"
            )
        tokens = {**genes, "<pad>": cfg.pad_id, "<cls>": cfg.cls_id, "<eoc>": free[0]}
    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(root / MODEL_FILE) as tmp:
        torch.save(scgpt_state_dict(model, layout, extra), tmp)
    write_json_atomic(root / VOCAB_FILE, tokens)
    write_json_atomic(root / ARGS_FILE, {**args_from_config(cfg), **dict(args or {})})
    return root


def apply_load_plan(params: dict, state: dict, plan: list, report: Any) -> Any:
    """Copy each checkpoint tensor into its target parameters (a fused tensor is split evenly
    over several targets, e.g. in_proj -> q, k, v) once every key has been checked."""
    with torch.no_grad():
        for key, targets in plan:
            for t, chunk in zip(targets, state[key].chunk(len(targets)), strict=True):
                params[t].copy_(chunk.to(params[t].dtype))
            report.loaded.append(key)
    return report
