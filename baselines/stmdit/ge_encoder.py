"""The frozen CancerFoundation expression encoder that gives STMDiT its GE condition (Theus et al. 2024).

Facts (BoevaLab/CancerFoundation: model/cancergpt.py, model/embedding.py, model/data_collator.py,
model/dataset.py, model/utils.py and model/assets/{args.json, vocab.json}):
- architecture = scGPT's encoder without heads: token = GeneEncoder(id) (Embedding + LayerNorm) +
  ContinuousValueEncoder(value) (clamp 512 -> Linear(1,D) -> ReLU -> Linear -> LayerNorm), then a
  torch TransformerEncoder (post-LN, ReLU, eps 1e-5, batch_first) with a key padding mask for <pad>.
- args.json: embsize 256, nlayers 6, nheads 8, d_hid 512, dropout 0.2, n_bins 51, max_seq_len 1200.
- vocab.json: <cls> 0, <pad> 1, <eoc> 2, then 28,722 genes (28,725 embedding rows).
- weights: `model.pth` (a plain state_dict) in the same folder, downloaded from a polybox link
  (https://polybox.ethz.ch/index.php/s/pZR9VH7uEHwO5CL); module names gene_encoder / value_encoder /
  encoder.layers.{i}; CancerFoundation's own loader also maps `encoder.layers.{i}.self_attn.self_attn.*`
  (the pretraining code wraps torch's MultiheadAttention in a module called self_attn) and ignores
  every key it does not know (decoders, MVC, discriminators).
- embedding procedure (`embed`): genes mapped to the vocabulary, 1,199 HVGs (max_seq_len - 1;
  scanpy flavor "cell_ranger", batch_key) kept in dataset order; a <cls> token with value pad_value
  (-2) is prepended; per cell the non-zero values are binned into 51 quantile bins (zeros stay 0,
  ties split at random between the bins they touch); the cell embedding is the <cls> output,
  L2-normalised (normalize=True by default).

Deviations: tie-breaking uses a caller-supplied torch.Generator, or the deterministic middle of the
tied range when none is given (CancerFoundation draws from numpy's global RNG; with scaled
continuous inputs ties are rare); a gene list longer than max_len - 1 is an error here (CF samples a
random subset).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from baselines._scfm.scgpt import ContinuousValueEncoder, FeedForward, GeneEncoder, ScGPTAttention
from baselines._scfm.scgpt_ckpt import apply_load_plan
from baselines._scfm.vocab import GeneVocab
from stbench.errors import DataError

MODEL_FILES = ("model.pth", "best_model.pt")
VOCAB_FILE, ARGS_FILE = "vocab.json", "args.json"
DOWNLOAD_HINT = (
    "CancerFoundation's weights are not on the Hugging Face hub: download them from "
    "https://polybox.ethz.ch/index.php/s/pZR9VH7uEHwO5CL (see github.com/BoevaLab/CancerFoundation), unzip, "
    "and pass the folder holding model.pth, vocab.json and args.json"
)


@dataclass(frozen=True)
class CFConfig:
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    d_hid: int = 512
    n_tokens: int = 28725
    cls_id: int = 0
    pad_id: int = 1
    pad_value: float = -2.0
    max_len: int = 1200
    n_bins: int = 51
    max_value: float = 512.0
    ln_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        for name in ("cls_id", "pad_id"):
            if not 0 <= getattr(self, name) < self.n_tokens:
                raise ValueError(f"{name} {getattr(self, name)} outside the {self.n_tokens}-row gene table")


SIZES: dict[str, CFConfig] = {
    "cancerfoundation": CFConfig(),
    "tiny": CFConfig(dim=32, n_layers=2, n_heads=4, d_hid=64, n_tokens=53, max_len=40),
}


class GEEncoding(NamedTuple):
    tokens: torch.Tensor  # (B, 1 + G, D): <cls> output first, then one token per gene
    cell: torch.Tensor  # (B, D): the <cls> output (L2-normalised when normalize=True)
    mask: torch.Tensor  # (B, 1 + G) bool, True = real token (False = <pad>)


def bin_values(
    values: torch.Tensor,
    n_bins: int = 51,
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """CancerFoundation/scGPT per-cell binning of (B, G) values into 0..n_bins-1 (float).

    Non-zero values of a row get digits 1..n_bins-1 from n_bins-1 quantile edges of those values
    (numpy's linear quantiles); exact zeros stay 0; a row whose maximum is 0 becomes all zeros. A
    value sitting on tied edges gets ceil(left - r * (left - right)) with r ~ U[0, 1) from `generator`,
    or r = 0.5 without one (deterministic). `valid` (B, G) bool leaves padding out (it gets 0).
    """
    vals = values.detach().to(torch.float64)
    out = torch.zeros_like(vals)
    qs = torch.linspace(0, 1, n_bins - 1, dtype=torch.float64)
    for i in range(vals.shape[0]):
        row = vals[i]
        keep = torch.ones_like(row, dtype=torch.bool) if valid is None else valid[i].bool()
        if not bool(keep.any()) or row[keep].max() == 0:
            continue
        nz = (row != 0) & keep
        x = row[nz]
        edges = torch.quantile(x, qs)
        left = torch.searchsorted(edges, x, right=True)  # np.digitize(x, edges)
        right = torch.searchsorted(edges, x, right=False)  # np.digitize(x, edges, right=True)
        if generator is None:
            r = torch.full_like(x, 0.5)
        else:
            r = torch.rand(x.shape, generator=generator, dtype=torch.float64)
        out[i, nz] = torch.ceil(r * (right - left).to(torch.float64) + left.to(torch.float64))
    return out.to(values.dtype)


class CFLayer(nn.Module):
    """torch TransformerEncoderLayer numerics in eval mode: post-LN, ReLU FFN, eps from the config."""

    def __init__(self, cfg: CFConfig) -> None:
        super().__init__()
        self.attn = ScGPTAttention(cfg.dim, cfg.n_heads)
        self.ffn = FeedForward(cfg.dim, cfg.d_hid)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        # ScGPTAttention: a query sees the valid keys plus itself, so real tokens see exactly the
        # non-padding keys, as with torch's src_key_padding_mask (padding rows are never used)
        x = self.norm1(x + self.attn(x, valid))
        return self.norm2(x + self.ffn(x))


class CancerFoundationEncoder(nn.Module):
    """Frozen, always in eval mode. forward(values, gene_ids) -> GEEncoding (tokens, cell, mask)."""

    def __init__(self, cfg: CFConfig, size: str = "custom") -> None:
        super().__init__()
        self.cfg, self.size = cfg, size
        self.gene_encoder = GeneEncoder(cfg.n_tokens, cfg.dim, cfg.pad_id)
        self.value_encoder = ContinuousValueEncoder(cfg.dim, dropout=0.0, max_value=cfg.max_value)
        self.layers = nn.ModuleList(CFLayer(cfg) for _ in range(cfg.n_layers))
        self.vocab: GeneVocab | None = None
        self.checkpoint_path: str | None = None
        self.ckpt_report: CFCkptReport | None = None
        self._weights_id: str | None = None
        self.freeze()

    def freeze(self) -> CancerFoundationEncoder:
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> CancerFoundationEncoder:  # noqa: ARG002 - frozen: always eval
        return super().train(False)

    def weights_id(self) -> str:
        """'none' for random init, 'file:<sha256[:12]>' of the loaded model file."""
        if self.checkpoint_path is None:
            return "none"
        if self._weights_id is None:
            from stbench.utils.io import sha256_file

            self._weights_id = f"file:{sha256_file(self.checkpoint_path)[:12]}"
        return self._weights_id

    def map_genes(self, symbols: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
        """Token ids of dataset gene symbols (UNMAPPED = -1 where absent) and the unmapped symbols."""
        if self.vocab is None:
            raise ValueError("this encoder has no vocabulary (random init without vocab.json)")
        ids, unmapped = self.vocab.map(list(symbols))
        return torch.as_tensor(ids), unmapped

    @torch.no_grad()
    def forward(
        self,
        values: torch.Tensor,
        gene_ids: torch.Tensor,
        *,
        binned: bool = False,
        generator: torch.Generator | None = None,
        normalize: bool = True,
    ) -> GEEncoding:
        """values (B, G): the preprocessed profile (binned here unless `binned`); gene_ids (G,) or (B, G)
        token ids (the pad id marks padding). Returns per-token outputs, the <cls> cell embedding, mask."""
        cfg = self.cfg
        if values.dim() != 2:
            raise ValueError(f"values must be (B, G), got {tuple(values.shape)}")
        b, g = values.shape
        if g + 1 > cfg.max_len:
            raise ValueError(
                f"{g} genes + <cls> exceed CancerFoundation's max_len {cfg.max_len}: select at most "
                f"{cfg.max_len - 1} genes (select_gene_panel does CancerFoundation's HVG selection)"
            )
        dev = self.gene_encoder.embedding.weight.device
        ids = torch.as_tensor(gene_ids, device=dev).long()
        ids = ids.unsqueeze(0).expand(b, g) if ids.dim() == 1 else ids
        if ids.shape != (b, g):
            raise ValueError(f"gene_ids {tuple(ids.shape)} do not match values {(b, g)}")
        bad = (ids < 0) | (ids >= cfg.n_tokens) | (ids == cfg.cls_id)
        if bool(bad.any()):
            raise ValueError(
                f"gene id {int(ids[bad][0])} is not a gene token (unmapped -1, <cls> or outside the "
                f"{cfg.n_tokens}-row table): drop unmapped genes first (map_genes)"
            )
        vals = values.to(dev, torch.float32)
        is_pad = ids == cfg.pad_id
        if not binned:
            vals = bin_values(vals.cpu(), cfg.n_bins, generator, valid=~is_pad.cpu()).to(dev)
        vals = torch.where(is_pad, torch.full_like(vals, cfg.pad_value), vals)
        ids = torch.cat([torch.full((b, 1), cfg.cls_id, dtype=ids.dtype, device=dev), ids], dim=1)
        vals = torch.cat([torch.full((b, 1), cfg.pad_value, device=dev), vals], dim=1)
        valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=dev), ~is_pad], dim=1)
        x = self.gene_encoder(ids) + self.value_encoder(vals.to(self.gene_encoder.embedding.weight.dtype))
        kv = valid if bool(is_pad.any()) else None
        for layer in self.layers:
            x = layer(x, kv)
        cell = x[:, 0]
        if normalize:
            cell = cell / cell.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return GEEncoding(x, cell, valid)


def build_cancerfoundation(size: str = "tiny", **overrides: Any) -> CancerFoundationEncoder:
    """A random-init (frozen) encoder of a named size ("cancerfoundation", "tiny")."""
    if size not in SIZES:
        from stbench.errors import UnknownNameError

        raise UnknownNameError("CancerFoundation size", size, list(SIZES))
    import dataclasses

    return CancerFoundationEncoder(dataclasses.replace(SIZES[size], **overrides), size=size)


# ---------------------------------------------------------------- checkpoint folder

_ATTN_ALIASES = (("self_attn.self_attn.", "self_attn."), ("self_attn._impl.", "self_attn."))
_PACKED = {"self_attn.in_proj_weight": "weight", "self_attn.in_proj_bias": "bias",
           "self_attn.Wqkv.weight": "weight", "self_attn.Wqkv.bias": "bias"}  # fmt: skip
_LAYER_PARTS = {
    "self_attn.out_proj.weight": "attn.o_proj.weight",
    "self_attn.out_proj.bias": "attn.o_proj.bias",
    **{f"{lin}.{p}": f"ffn.{lin}.{p}" for lin in ("linear1", "linear2") for p in ("weight", "bias")},
    **{f"{n}.{p}": f"{n}.{p}" for n in ("norm1", "norm2") for p in ("weight", "bias")},
}
_GENE_PARTS = ("embedding.weight", "enc_norm.weight", "enc_norm.bias")
_VALUE_PARTS = tuple(f"{m}.{p}" for m in ("linear1", "linear2", "norm") for p in ("weight", "bias"))
# (gene-encoder prefix, transformer-layer prefix): CancerFoundation's embedding code, scGPT's naming
LAYOUTS = {"cf": ("gene_encoder.", "encoder.layers."), "scgpt": ("encoder.", "transformer_encoder.layers.")}


@dataclass
class CFCkptReport:
    """Every checkpoint key is loaded or skipped (outside the encoder path, as CF's loader does)."""

    file: str
    layout: str = "cf"
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        heads = sorted({k.split(".")[0] for k in self.skipped})
        return (
            f"{self.file}: loaded {len(self.loaded)} tensors ({self.layout} names); skipped "
            f"{len(self.skipped)} tensors outside the encoder {heads}"
        )


def _targets(key: str, gene_pre: str, layer_pre: str) -> list[str] | None | bool:
    """Model names a key fills; None = outside the encoder (skip); False = unknown inside it (error)."""
    if key.startswith(gene_pre) and not key.startswith(layer_pre):
        part = key[len(gene_pre) :]
        return [f"gene_encoder.{part}"] if part in _GENE_PARTS else False
    if key.startswith("value_encoder."):
        part = key[len("value_encoder.") :]
        return [key] if part in _VALUE_PARTS else False
    if key.startswith(layer_pre):
        m = re.match(r"^(\d+)\.(.+)$", key[len(layer_pre) :])
        if not m:
            return False
        i, part = m.groups()
        for old, new in _ATTN_ALIASES:
            part = part.replace(old, new)
        if part in _PACKED:
            return [f"layers.{i}.attn.{p}_proj.{_PACKED[part]}" for p in "qkv"]
        if part in _LAYER_PARTS:
            return [f"layers.{i}.{_LAYER_PARTS[part]}"]
        return False
    return None


def _unwrap(state: Any, file: Path) -> dict[str, torch.Tensor]:
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise DataError(f"expected a state_dict (mapping), got {type(state).__name__}", file=file)
    out = {}
    for k, v in state.items():
        for pre in ("module.", "model."):
            k = k.removeprefix(pre)
        out[k] = v
    return out


def load_cf_state(
    model: CancerFoundationEncoder, state: Mapping[str, torch.Tensor], file: str | Path
) -> CFCkptReport:
    """Copy an encoder state_dict into `model`; every check (names, shapes, dtypes) runs before any copy."""
    report = CFCkptReport(file=str(file))
    report.layout = "cf" if any(k.startswith("gene_encoder.") for k in state) else "scgpt"
    gene_pre, layer_pre = LAYOUTS[report.layout]
    params = dict(model.state_dict(keep_vars=True))
    plan: list[tuple[str, list[str]]] = []
    filled: dict[str, str] = {}
    for key, tensor in state.items():
        targets = _targets(key, gene_pre, layer_pre)
        if targets is None:
            report.skipped.append(key)
            continue
        if targets is False:
            raise DataError(
                f"unexpected key {key!r} inside the CancerFoundation encoder (a module this port does not "
                "implement; it would change the embedding)",
                file=file,
                field=key,
            )
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise DataError(f"{key!r} is not a float tensor", file=file, field=key)
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
        plan.append((key, targets))
    missing = sorted(set(params) - set(filled))
    if missing:
        raise DataError(
            f"checkpoint lacks {len(missing)} encoder tensor(s): {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else ""),
            file=file,
            field=missing[0],
        )
    return apply_load_plan(params, state, plan, report)


def _folder_files(path: str | Path) -> tuple[Path, Path, Path]:
    from stbench.encoders.weights import WeightsError

    root = Path(path).expanduser()
    if not root.exists():
        raise WeightsError(f"CancerFoundation checkpoint {root} does not exist: {DOWNLOAD_HINT}")
    model_file = (
        root if root.is_file() else next((root / n for n in MODEL_FILES if (root / n).is_file()), None)
    )
    folder = root.parent if root.is_file() else root
    if model_file is None:
        raise WeightsError(
            f"CancerFoundation folder {folder} has no {' or '.join(MODEL_FILES)}: {DOWNLOAD_HINT}"
        )
    for f in (folder / VOCAB_FILE, folder / ARGS_FILE):
        if not f.is_file():
            raise WeightsError(f"CancerFoundation folder {folder} lacks {f.name}: {DOWNLOAD_HINT}")
    return model_file, folder / VOCAB_FILE, folder / ARGS_FILE


def load_cancerfoundation(path: str | Path, **overrides: Any) -> CancerFoundationEncoder:
    """The frozen encoder from CancerFoundation's folder (model.pth or best_model.pt, vocab.json,
    args.json) or its model file; sized from args.json and cross-checked against the weights.

    Absent files raise WeightsError with the download hint; malformed content raises DataError naming
    the file and key (unknown encoder keys, missing tensors, shape mismatches, vocabulary size).
    """
    from baselines._scfm.scgpt_ckpt import config_from_args, read_scgpt_vocab

    model_file, vocab_file, args_file = _folder_files(path)
    try:
        args = json.loads(args_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"args.json is not valid JSON: {e}", file=args_file) from None
    fields = config_from_args(args, args_file)
    gene_vocab, specials, n_tokens = read_scgpt_vocab(vocab_file)
    try:
        raw = torch.load(model_file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise DataError(
            f"cannot read the CancerFoundation weights: {type(e).__name__}: {e}", file=model_file
        ) from None
    state = _unwrap(raw, model_file)
    emb_key = (
        "gene_encoder.embedding.weight"
        if "gene_encoder.embedding.weight" in state
        else "encoder.embedding.weight"
    )
    emb = state.get(emb_key)
    if emb is None or emb.dim() != 2:
        raise DataError(
            "no 2-D gene embedding table: not a CancerFoundation state_dict", file=model_file, field=emb_key
        )
    if emb.shape[0] != n_tokens:
        raise DataError(
            f"{emb_key} has {emb.shape[0]} rows but vocab.json has {n_tokens} tokens: wrong vocab.json",
            file=vocab_file,
            field=emb_key,
        )
    if emb.shape[1] != fields["dim"]:
        raise DataError(
            f"args.json has embsize {fields['dim']} but {emb_key} is {emb.shape[1]} wide",
            file=args_file,
            field="embsize",
        )
    cfg = CFConfig(
        **{
            "dim": fields["dim"],
            "n_layers": fields["n_layers"],
            "n_heads": fields["n_heads"],
            "d_hid": fields["d_hid"],
            "n_tokens": n_tokens,
            "cls_id": specials["<cls>"],
            "pad_id": specials["<pad>"],
            "pad_value": float(args.get("pad_value", -2.0)),
            "max_len": int(args.get("max_seq_len", 1200)),
            "n_bins": int(args.get("n_bins", 51)),
            **overrides,
        }
    )
    model = CancerFoundationEncoder(cfg, size="file")
    model.ckpt_report = load_cf_state(model, state, model_file)
    model.checkpoint_path = str(model_file)
    model.vocab = gene_vocab
    return model.freeze()


def cf_state_dict(model: CancerFoundationEncoder, layout: str = "cf") -> dict[str, torch.Tensor]:
    """The encoder's weights under CancerFoundation's names (torch MultiheadAttention packing)."""
    gene_pre, layer_pre = LAYOUTS[layout]
    sd = model.state_dict()
    out = {f"{gene_pre}{p}": sd[f"gene_encoder.{p}"].clone() for p in _GENE_PARTS}
    out.update({f"value_encoder.{p}": sd[f"value_encoder.{p}"].clone() for p in _VALUE_PARTS})
    for i in range(len(model.layers)):
        pre = f"{layer_pre}{i}."
        for packed, kind in (("self_attn.in_proj_weight", "weight"), ("self_attn.in_proj_bias", "bias")):
            out[pre + packed] = torch.cat([sd[f"layers.{i}.attn.{p}_proj.{kind}"] for p in "qkv"]).clone()
        for part, target in _LAYER_PARTS.items():
            out[pre + part] = sd[f"layers.{i}.{target}"].clone()
    return out


def save_cancerfoundation_dir(
    model: CancerFoundationEncoder,
    tokens: Mapping[str, int],
    path: str | Path,
    args: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` as CancerFoundation's folder (model.pth, vocab.json, args.json); for tests/exports."""
    from stbench.utils.io import atomic_path, write_json_atomic

    cfg, root = model.cfg, Path(path)
    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(root / MODEL_FILES[0]) as tmp:
        torch.save(cf_state_dict(model), tmp)
    write_json_atomic(root / VOCAB_FILE, dict(tokens))
    base = {"n_bins": cfg.n_bins, "max_seq_len": cfg.max_len, "nlayers": cfg.n_layers, "nheads": cfg.n_heads,
            "embsize": cfg.dim, "d_hid": cfg.d_hid, "dropout": 0.2, "n_layers_cls": 3}  # fmt: skip
    write_json_atomic(root / ARGS_FILE, {**base, **dict(args or {})})
    return root


def select_gene_panel(
    adata: Any, vocab: GeneVocab, n_top: int = 1199, batch_key: str | None = None, flavor: str = "cell_ranger"
) -> list[str]:
    """CancerFoundation's gene choice: genes in the vocabulary, then the top `n_top` HVGs (scanpy
    `flavor`, per `batch_key`), in dataset order. Pass the log-normalised (unscaled) matrix: the
    cell_ranger dispersion is not defined for z-scored data.

    scanpy may flag more than n_top genes when dispersions tie; CancerFoundation then samples a random
    subset per batch, we keep the n_top best by normalised dispersion (ties: dataset order)."""
    import scanpy as sc

    genes = [str(s) for s in adata.var_names]
    ids, _ = vocab.map(genes)
    sub = adata[:, ids >= 0].copy()
    if sub.n_vars <= n_top:
        return [str(s) for s in sub.var_names]
    sc.pp.highly_variable_genes(sub, n_top_genes=n_top, flavor=flavor, batch_key=batch_key)
    hv = sub.var["highly_variable"].to_numpy().astype(bool)
    if hv.sum() > n_top:
        score = sub.var["dispersions_norm"].to_numpy(dtype=float)
        score = np.where(hv & np.isfinite(score), score, -np.inf)
        best = np.argsort(-score, kind="stable")[:n_top]
        hv = np.zeros_like(hv)
        hv[best] = True
    return [str(s) for s in sub.var_names[hv]]
