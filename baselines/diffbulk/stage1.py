"""DiffBulk stage I: gene-conditioned EDM2 diffusion pre-training on the training tiles.

Why a LightningModule of its own: stage I has its own optimiser (Adam (0.9, 0.99), inverse-sqrt
learning rate), its own loss (EDM2's, with learned per-sigma uncertainty) and its own averaging
(power-function EMA), and it runs to a fixed step budget without validation. It runs under a Trainer
with the job's accelerator, devices, strategy and precision (DDP and bf16 included), before stage
II's Trainer.fit. Only training spots reach it (the DataModule's train loader), so no test tile
and no validation spot shapes the frozen features.

The gene condition of a tile is its expression over the fold's panel in the protocol's target space
(log1p for `diffbulk`), encoded by the open-embedding gene encoder over a union vocabulary; PMS drops
it per sample with probability p so the network also learns the unconditional model that stage II
queries.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from baselines.diffbulk.edm2.ema import PowerFunctionEMA
from baselines.diffbulk.edm2.loss import EDM2Loss
from baselines.diffbulk.edm2.optim import make_adam, make_lr_lambda
from baselines.diffbulk.edm2.precond import Precond
from baselines.diffbulk.gene_encoder import GeneVocabulary, build_gene_encoder
from baselines.diffbulk.pms import PMS
from stbench.errors import DataError
from stbench.utils.io import atomic_path

FORMAT = "stbench-diffbulk-stage1/2"  # safetensors, JSON metadata under META_KEY
LEGACY_FORMAT = "stbench-diffbulk-stage1/1"  # torch.save of a dict; read only with weights_only=True
META_KEY = "stbench"


class ConditionedDenoiser(nn.Module):
    """Precond U-Net + gene encoder as one module: the EMA averages both (as the authors' EMA of
    their network with the integrated gene encoder does)."""

    def __init__(self, unet: dict[str, Any], vocab: GeneVocabulary, gene_encoder: dict[str, Any]) -> None:
        super().__init__()
        self.net = Precond(**unet)
        enc = dict(gene_encoder)
        kind = enc.pop("kind", "open")
        # The open encoder's pooled vector (256) is the condition; the U-Net projects it to its
        # embedding width itself (an MPConv, as in the authors' network). The MLP ablation ends
        # at the condition width directly.
        out_dim = None if kind == "open" else self.net.unet.cond_dim
        self.genes = build_gene_encoder(kind, vocab.n_vocab, out_dim=out_dim, **enc)
        if getattr(self.genes, "out_dim", None) != self.net.unet.cond_dim:
            raise ValueError(
                f"gene encoder width {getattr(self.genes, 'out_dim', None)} != U-Net cond_dim "
                f"{self.net.unet.cond_dim}"
            )


def to_unit_range(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """Patches in [0, 1] (B, 3, H, W) -> the network's [-1, 1] at its resolution."""
    if image.shape[-1] != resolution or image.shape[-2] != resolution:
        image = nn.functional.interpolate(
            image, size=(resolution, resolution), mode="bilinear", antialias=True
        )
    return image * 2.0 - 1.0


class Stage1Module(L.LightningModule):
    def __init__(
        self,
        unet: dict[str, Any],
        genes: Sequence[str],
        gene_encoder: dict[str, Any],
        pms_p: float = 0.5,
        pms_mode: str = "sample",
        lr: float = 0.012,
        lr_ref_steps: float = 70_000,
        lr_rampup_steps: float = 0,
        ema_stds: Sequence[float] = (0.05, 0.10),
        p_mean: float = -0.4,
        p_std: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.vocab = GeneVocabulary(list(genes))
        self.model = ConditionedDenoiser(unet, self.vocab, gene_encoder)
        self.ema = PowerFunctionEMA(self.model, stds=tuple(ema_stds))
        self.loss_fn = EDM2Loss(p_mean=p_mean, p_std=p_std, sigma_data=self.model.net.sigma_data)
        self.pms = PMS(pms_p, pms_mode, seed=seed)
        self.lr, self.lr_ref_steps, self.lr_rampup_steps = lr, lr_ref_steps, lr_rampup_steps
        self.register_buffer("gene_ids", torch.from_numpy(self.vocab.ids(self.vocab.symbols)).long())

    def condition(self, model: ConditionedDenoiser, expression: torch.Tensor) -> torch.Tensor:
        ids = self.gene_ids.to(expression.device).expand(expression.shape[0], -1)
        pad = torch.zeros_like(ids, dtype=torch.bool)
        return model.genes(ids, expression.float(), pad)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = to_unit_range(batch["image"].float(), self.model.net.img_resolution)
        cond = self.condition(self.model, batch["expression"])
        keep = self.pms.keep_mask(images.shape[0]).to(images.device)
        loss = self.loss_fn(self.model.net, images, cond, cond_mask=keep).mean()
        self.log("stage1/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.ema.update(self.model)

    def configure_optimizers(self) -> Any:
        opt = make_adam(self.model.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, make_lr_lambda(self.lr_ref_steps, self.lr_rampup_steps)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def averaged(self, std: float) -> ConditionedDenoiser:
        """The power-EMA network for sigma_rel = std (the paper uses 0.10)."""
        return self.ema.average(std)  # type: ignore[return-value]


def save_stage1(path: Path, net: Precond, unet: dict[str, Any], vocab: GeneVocabulary, info: dict) -> None:
    """The frozen stage I network (EMA) as a standalone file: reusable by reference across folds
    and downstream datasets (`stage1_checkpoint`). Safetensors with the U-Net config, vocabulary and
    info as JSON in its header, so a shared file is read without unpickling anything; one atomic
    rename, so a killed job never leaves a torn file."""
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "unet": dict(unet), "vocab": vocab.to_list(), "info": info}
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})


def _is_safetensors(path: Path) -> bool:
    """Safetensors starts with an 8-byte little-endian header length, then a JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    return (
        len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size
    )


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, state_dict) of a stage I file; never runs code from it."""
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        except Exception as exc:  # noqa: BLE001 - any reader failure is one clear message
            raise DataError(f"unreadable stage I file: {type(exc).__name__}: {exc}", file=path) from None
        return meta, state
    try:  # the old (stbench-diffbulk-stage1/1) torch.save format, read without unpickling code
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - incl. UnpicklingError for a file that would run code
        raise DataError(
            "not a DiffBulk stage I file: neither safetensors nor a plain tensor pickle "
            f"(refused by torch.load(weights_only=True): {type(exc).__name__}); re-create it with this "
            "stbench version",
            file=path,
            field="format",
        ) from None
    if not isinstance(payload, dict):
        return {}, {}
    state = payload.get("state_dict")
    return {k: v for k, v in payload.items() if k != "state_dict"}, state if isinstance(state, dict) else {}


def load_stage1(path: str | Path) -> tuple[Precond, dict[str, Any], dict[str, Any]]:
    """(network, unet config, info) from `save_stage1`'s file; a wrong file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise DataError("stage I checkpoint not found", file=path, field="stage1_checkpoint")
    meta, state = _read(path)
    if meta.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise DataError(
            f"not a DiffBulk stage I file (format {meta.get('format', '?')}, expected {FORMAT})",
            file=path,
            field="format",
        )
    try:
        net = Precond(**meta["unet"])
    except Exception as exc:  # noqa: BLE001 - a bad recorded config is the file's fault
        raise DataError(
            f"stage I file records an unusable U-Net config: {exc}", file=path, field="unet"
        ) from None
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(
            f"stage I weights do not fit the recorded U-Net: missing {missing[:5]}, unexpected {unexpected[:5]}",
            file=path,
            field="state_dict",
        )
    return net, meta["unet"], meta.get("info", {})
