"""Load the public PixCell-256 transformer (HF `StonyBrook-CVLab/PixCell-256`, subfolder `transformer`) into
STMDiT's DiT: the PixCell-Pretrained-XL baseline, or a PixCell initialisation of a GE model.

Layout (checked on the hub listing, PixCell's model card and its diffusers class
`PixCellTransformer2DModel`, cvlab-stonybrook/PixCell controlnet/pixcell_transformer_2d.py): a diffusers
folder with config.json, diffusion_pytorch_model.safetensors (2.43 GB = 608.07 M fp32 values, exactly
`backbone_param_count(XL with caption 1536)` plus the null token) and the class file. The class is
diffusers' PixArtTransformer2DModel with two changes: the caption projection (`caption_projection.
linear_1/linear_2`, same names) also holds the null condition as a persistent buffer
`caption_projection.uncond_embedding` (caption_num_tokens, caption_channels), and for more than one
UNI token a `y_pos_embed` (not supported here: PixCell-256 uses one token). So the key map is diffusers'
PixArt map, plus uncond_embedding -> our null token:

  pos_embed.proj                          -> x_embedder.proj
  adaln_single.emb.timestep_embedder.linear_1/2 -> t_embedder.mlp.0/2
  adaln_single.linear                      -> t_block.1
  caption_projection.linear_1/2, uncond_embedding -> y_embedder.y_proj.fc1/fc2, y_embedder.y_embedding
  transformer_blocks.i.attn1.to_q/k/v      -> blocks.i.attn.qkv (rows [q; k; v])
  transformer_blocks.i.attn1.to_out.0      -> blocks.i.attn.proj
  transformer_blocks.i.attn2.to_q          -> blocks.i.cross_attn.q_linear
  transformer_blocks.i.attn2.to_k/v        -> blocks.i.cross_attn.kv_linear (rows [k; v])
  transformer_blocks.i.attn2.to_out.0      -> blocks.i.cross_attn.proj
  transformer_blocks.i.ff.net.0.proj / net.2 -> blocks.i.mlp.fc1 / fc2
  transformer_blocks.i.scale_shift_table   -> blocks.i.scale_shift_table
  scale_shift_table, proj_out              -> final_layer.scale_shift_table, final_layer.linear

Everything is checked before any copy: an unknown key, a missing tensor or a shape mismatch is a
WeightsError naming the key; config fields that would change the forward pass (norm type, activation,
extra size conditions, several UNI tokens) are rejected. GE parameters (if `ge` is given) keep their
initialisation, which makes the loaded model start as PixCell.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from baselines.stmdit.dit import DiTConfig, STMDiT
from baselines.stmdit.ge_conditioning import GEConfig
from stbench.encoders.weights import WeightsError, file_sha, hub_download

DEFAULT_REPO = "StonyBrook-CVLab/PixCell-256"
DEFAULT_SUBFOLDER = "transformer"
WEIGHT_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = WEIGHT_FILE + ".index.json"
LOCAL_HINT = (
    "download StonyBrook-CVLab/PixCell-256 (folder `transformer`: config.json and "
    "diffusion_pytorch_model.safetensors) when online and pass that folder"
)

_TOP = {
    "pos_embed.proj": ("x_embedder.proj", 0, 1),
    "adaln_single.emb.timestep_embedder.linear_1": ("t_embedder.mlp.0", 0, 1),
    "adaln_single.emb.timestep_embedder.linear_2": ("t_embedder.mlp.2", 0, 1),
    "adaln_single.linear": ("t_block.1", 0, 1),
    "caption_projection.linear_1": ("y_embedder.y_proj.fc1", 0, 1),
    "caption_projection.linear_2": ("y_embedder.y_proj.fc2", 0, 1),
    "proj_out": ("final_layer.linear", 0, 1),
}
_BLOCK = {
    "attn1.to_q": ("attn.qkv", 0, 3),
    "attn1.to_k": ("attn.qkv", 1, 3),
    "attn1.to_v": ("attn.qkv", 2, 3),
    "attn1.to_out.0": ("attn.proj", 0, 1),
    "attn2.to_q": ("cross_attn.q_linear", 0, 1),
    "attn2.to_k": ("cross_attn.kv_linear", 0, 2),
    "attn2.to_v": ("cross_attn.kv_linear", 1, 2),
    "attn2.to_out.0": ("cross_attn.proj", 0, 1),
    "ff.net.0.proj": ("mlp.fc1", 0, 1),
    "ff.net.2": ("mlp.fc2", 0, 1),
}
_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")


def map_key(key: str) -> tuple[str, int, int] | None:
    """(our parameter name, slot, number of slots) a diffusers/PixCell key fills, or None if unknown."""
    if key == "scale_shift_table":
        return "final_layer.scale_shift_table", 0, 1
    if key == "caption_projection.uncond_embedding":
        return "y_embedder.y_embedding", 0, 1
    m = re.match(r"^transformer_blocks\.(\d+)\.scale_shift_table$", key)
    if m:
        return f"blocks.{m.group(1)}.scale_shift_table", 0, 1
    m = _BLOCK_KEY.match(key)
    if m and m.group(2) in _BLOCK:
        name, slot, n = _BLOCK[m.group(2)]
        return f"blocks.{m.group(1)}.{name}.{m.group(3)}", slot, n
    stem, _, kind = key.rpartition(".")
    if stem in _TOP and kind in ("weight", "bias"):
        name, slot, n = _TOP[stem]
        return f"{name}.{kind}", slot, n
    return None


def config_from_pixcell(
    config: dict[str, Any], *, learn_null: bool = True, file: str = "config.json"
) -> DiTConfig:
    """DiTConfig from a PixCell / PixArt diffusers config.json; rejects settings this port does not run."""

    def need(name: str, ok: bool, why: str) -> None:
        if not ok:
            raise WeightsError(f"{file}: {name}={config.get(name)!r} is not supported ({why})")

    heads, head_dim = int(config.get("num_attention_heads", 16)), int(config.get("attention_head_dim", 72))
    hidden = heads * head_dim
    sample = int(config.get("sample_size", 128))
    extra = config.get("use_additional_conditions")
    extra = sample == 128 if extra is None else bool(extra)  # diffusers' default rule
    need("norm_type", config.get("norm_type", "ada_norm_single") == "ada_norm_single", "adaLN-single only")
    need(
        "activation_fn",
        config.get("activation_fn", "gelu-approximate") == "gelu-approximate",
        "GELU(tanh) MLP",
    )
    need("attention_bias", bool(config.get("attention_bias", True)), "attention layers have biases")
    need(
        "norm_elementwise_affine",
        not config.get("norm_elementwise_affine", False),
        "LayerNorms have no affine",
    )
    need("norm_eps", float(config.get("norm_eps", 1e-6)) == 1e-6, "LayerNorm eps is 1e-6")
    need("use_additional_conditions", not extra, "no resolution / aspect-ratio embeddings")
    need("attention_type", config.get("attention_type", "default") == "default", "plain attention")
    need(
        "caption_channels",
        config.get("caption_channels") is not None,
        "the UNI caption projection is required",
    )
    need(
        "caption_num_tokens", int(config.get("caption_num_tokens", 1)) == 1, "one UNI token (no y_pos_embed)"
    )
    need(
        "cross_attention_dim",
        int(config.get("cross_attention_dim") or hidden) == hidden,
        "condition width = hidden",
    )
    in_ch = int(config.get("in_channels", 4))
    out_ch = config.get("out_channels")
    out_ch = in_ch if out_ch is None else int(out_ch)
    need("out_channels", out_ch in (in_ch, 2 * in_ch), "out = in (eps) or 2 * in (eps + variance)")
    interp = config.get("interpolation_scale")
    interp = float(max(sample // 64, 1)) if interp is None else float(interp)
    return DiTConfig(
        hidden=hidden,
        depth=int(config.get("num_layers", 28)),
        heads=heads,
        patch=int(config.get("patch_size", 2)),
        in_channels=in_ch,
        learn_sigma=out_ch == 2 * in_ch,
        uni_dim=int(config["caption_channels"]),
        uni_tokens=1,
        sample_size=sample,
        interpolation=interp,
        learn_null=learn_null,
    )


@dataclass
class PixCellReport:
    file: str
    loaded: list[str] = field(default_factory=list)
    kept_init: list[str] = field(default_factory=list)  # GE parameters left at their initialisation
    null_from_file: bool = True

    def summary(self) -> str:
        null = "" if self.null_from_file else "; null token NOT in the file (kept random init)"
        return (
            f"{self.file}: loaded {len(self.loaded)} tensors; {len(self.kept_init)} GE tensors at init{null}"
        )


def _is_ge(name: str) -> bool:
    return name.startswith("ge.") or ".ge_cross_attn." in name


def load_pixcell_state(
    model: STMDiT,
    state: dict[str, torch.Tensor],
    file: str = WEIGHT_FILE,
    *,
    allow_missing_null: bool = False,
) -> PixCellReport:
    """Copy a PixCell/PixArt diffusers state_dict into `model` (all checks first, then the copies)."""
    report = PixCellReport(file=str(file))
    params = dict(model.state_dict(keep_vars=True))
    plan: list[tuple[str, str, int, int]] = []
    filled: dict[tuple[str, int], str] = {}
    problems: list[str] = []
    for key, tensor in state.items():
        hit = map_key(key)
        if hit is None or hit[0] not in params:
            problems.append(f"unexpected key {key!r}")
            continue
        name, slot, n = hit
        target = params[name]
        want = (target.shape[0] // n, *target.shape[1:]) if n > 1 else tuple(target.shape)
        if tuple(tensor.shape) != want:
            problems.append(
                f"shape mismatch for {key!r}: file {list(tensor.shape)} vs model {list(want)} ({name})"
            )
            continue
        if (name, slot) in filled:
            problems.append(f"{key!r} and {filled[(name, slot)]!r} both fill {name}")
            continue
        filled[(name, slot)] = key
        plan.append((key, name, slot, n))
    needed = {(name, s) for name, p in params.items() if not _is_ge(name) for s in range(_slots(name))}
    missing = sorted(needed - set(filled))
    null_missing = [m for m in missing if m[0] == "y_embedder.y_embedding"]
    if null_missing and allow_missing_null:
        missing = [m for m in missing if m[0] != "y_embedder.y_embedding"]
        report.null_from_file = False
    if missing:
        problems.append("missing tensors: " + ", ".join(f"{n}[{s}]" for n, s in missing[:8]))
    if problems:
        more = f" (+{len(problems) - 6} more)" if len(problems) > 6 else ""
        raise WeightsError(
            f"PixCell weights {file} do not match the model: " + "; ".join(problems[:6]) + more
        )
    with torch.no_grad():
        for key, name, slot, n in plan:
            target = params[name]
            rows = target.shape[0] // n
            target[slot * rows : (slot + 1) * rows].copy_(state[key].to(target.dtype))
            report.loaded.append(key)
    report.kept_init = sorted(name for name in params if _is_ge(name))
    return report


def _slots(name: str) -> int:
    if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
        return 3
    if name.endswith(("kv_linear.weight", "kv_linear.bias")):
        return 2
    return 1


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The folder's safetensors (single file or an index of shards) as one state dict."""
    from safetensors.torch import load_file

    single, index = folder / WEIGHT_FILE, folder / INDEX_FILE
    if single.is_file():
        return load_file(str(single), device="cpu"), single
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard), device="cpu"))
        return state, index
    raise WeightsError(f"no {WEIGHT_FILE} (or {INDEX_FILE}) in {folder}: {LOCAL_HINT}")


def _local_folder(path: Path) -> Path:
    if path.is_file():
        path = path.parent
    if (path / "config.json").is_file() and ((path / WEIGHT_FILE).is_file() or (path / INDEX_FILE).is_file()):
        return path
    if (path / DEFAULT_SUBFOLDER / "config.json").is_file():
        return path / DEFAULT_SUBFOLDER
    raise WeightsError(
        f"{path} is not a PixCell transformer folder (config.json + {WEIGHT_FILE}): {LOCAL_HINT}"
    )


def load_pixcell(
    source: str = "default",
    *,
    ge: GEConfig | None = None,
    learn_null: bool = True,
    allow_missing_null: bool = False,
) -> STMDiT:
    """STMDiT built from PixCell's config.json with PixCell's weights.

    source: "default" (hub StonyBrook-CVLab/PixCell-256, subfolder transformer), "org/name[/subfolder]"
    (hub), or a local folder (the transformer folder or the pipeline root holding `transformer/`).
    `model.weights_id` is "hf:<repo>/<subfolder>@<revision>" or "local:<folder>@<sha256[:12]>".
    """
    src = (source or "default").strip()
    path = Path(src).expanduser()
    if src != "default" and path.exists():
        folder = _local_folder(path)
        state, weights = read_weights(folder)
        config_file = folder / "config.json"
        wid = f"local:{folder.name}@{file_sha(weights)}"
    else:
        repo, sub = (DEFAULT_REPO, DEFAULT_SUBFOLDER) if src == "default" else _parse_hub(src)
        prefix = f"{sub}/" if sub else ""
        try:
            config_path = hub_download(repo, f"{prefix}config.json", gated=False)
            weights = hub_download(repo, f"{prefix}{WEIGHT_FILE}", gated=False)
        except WeightsError as exc:
            raise WeightsError(f"PixCell {repo}: {exc}; or {LOCAL_HINT}") from None
        assert config_path is not None and weights is not None
        config_file = config_path
        state, weights = read_weights(weights.parent)
        parts = weights.parts
        rev = parts[parts.index("snapshots") + 1][:12] if "snapshots" in parts else file_sha(weights)
        wid = f"hf:{repo}/{sub}@{rev}"
    try:
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise WeightsError(f"{config_file} is not valid JSON: {e}") from None
    cfg = config_from_pixcell(config, learn_null=learn_null, file=str(config_file))
    model = STMDiT(cfg, ge=ge, size="pixcell")
    model.pixcell_report = load_pixcell_state(
        model, state, str(weights), allow_missing_null=allow_missing_null
    )
    model.weights_id = wid
    return model


def _parse_hub(src: str) -> tuple[str, str]:
    parts = src.removeprefix("hf:").strip("/").split("/")
    if len(parts) < 2:
        raise WeightsError(
            f"PixCell source {src!r} is neither a local folder nor a hub id (org/name[/subfolder])"
        )
    return "/".join(parts[:2]), "/".join(parts[2:]) or DEFAULT_SUBFOLDER
