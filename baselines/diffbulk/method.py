"""`diffbulk`: DiffBulk (pseudo-bulk expression from H&E) - two declared stages.

Stage `pretrain` (stage1.py): a gene-conditioned EDM2 U-Net is trained on the fold's training tiles
(images + their expression through the open-embedding gene encoder, PMS condition dropout), and its
power-EMA average is frozen. With `stage1_checkpoint` a stage I trained elsewhere (another fold's
training slides, or other datasets jointly) is loaded by reference instead; the caller answers for
what that file was trained on, and the result row records the file.

Stage `fit` (stage II): the frozen network sees each tile noised with sigma = 0.01 and no gene
condition; the last decoder block of each resolution goes through MSFE-Net (z_diff), the frozen
foundation-model features (PLIP, from the feature store) are z_fm, gated fusion z = z_fm + sigma(
Linear[z_fm; z_diff]) * Linear(z_diff), a linear decoder, MSE. Checkpoint choice: validation MSE.
`fusion: fm_only` is the FM-branch-only ablation (no stage I at all).

Prediction is deterministic given the spot: the sigma = 0.01 noise of a test tile comes from a
generator seeded by its global index (stbench.methods.sampling), so DDP equals one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from baselines.diffbulk.edm2.precond import Precond
from baselines.diffbulk.edm2.unet import PAPER_UNET, TAPS, TINY_UNET, tap_channels
from baselines.diffbulk.fusion import FusedRegressor, Fusion
from baselines.diffbulk.gene_encoder import GeneVocabulary
from baselines.diffbulk.msfe import MSFENet
from baselines.diffbulk.stage1 import Stage1Module, load_stage1, save_stage1, to_unit_range
from stbench.data.features import encoder_dim, feature_key, provider_weights_id
from stbench.methods.base import BatchRequirements, Method
from stbench.methods.sampling import spot_generators

UNET_PRESETS = {"paper": PAPER_UNET, "tiny": TINY_UNET}
STAGE1_FILE = Path("stage1") / "stage1.safetensors"


def unet_config(unet: str | dict[str, Any]) -> dict[str, Any]:
    """A preset name, or a dict with an optional `preset` key whose other keys override it."""
    if isinstance(unet, str):
        return dict(UNET_PRESETS[unet])
    cfg = dict(unet)
    base = dict(UNET_PRESETS[cfg.pop("preset", "paper")])
    for key in ("channels", "attn_resolutions"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    return {**base, **cfg}


class DiffBulk(Method):
    name = "diffbulk"
    stages = ("pretrain", "fit")
    # Tiles at the U-Net's resolution (paper: 224 px at 0.5 um/px); the FM branch's encoder reads
    # the same patches through the feature store.
    requires = BatchRequirements(image=True, features=("encoder",), patch={"out_px": 224})

    def __init__(
        self,
        n_genes: int,
        genes: Sequence[str] | None = None,
        encoder: str = "plip",
        weights: str = "default",
        encoder_overrides: dict[str, Any] | None = None,
        fm_dim: int | None = None,
        unet: str | dict[str, Any] = "paper",
        gene_encoder: dict[str, Any] | None = None,
        pms_p: float = 0.5,
        pms_mode: str = "sample",
        stage1_steps: int = 3072,
        stage1_lr: float = 0.012,
        stage1_lr_ref_steps: float = 70_000,
        stage1_lr_rampup_steps: float = 0,
        ema_stds: Sequence[float] = (0.05, 0.10),
        ema_std: float = 0.10,
        stage1_checkpoint: str | None = None,
        feature_sigma: float = 0.01,
        taps: str = "decoder",
        msfe_width: int = 128,
        msfe_groups: int = 32,
        msfe_dropout: float = 0.1,
        msfe_proj_dim: int | None = None,
        fusion: str = "gated",
        diff_proj: bool = True,
        mean_init: bool = False,
        seed: int = 0,
        lr: float = 1e-5,
        weight_decay: float = 1e-5,
    ) -> None:
        super().__init__(n_genes, genes, lr=lr, weight_decay=weight_decay)
        if taps not in TAPS:
            raise ValueError(f"diffbulk: taps must be one of {TAPS}, got {taps!r}")
        if ema_std not in tuple(ema_stds):
            raise ValueError(f"diffbulk: ema_std {ema_std} must be one of ema_stds {tuple(ema_stds)}")
        self.save_hyperparameters()
        self.encoder, self.weights, self.encoder_overrides = encoder, weights, encoder_overrides
        self.key = feature_key(encoder)
        self.unet_cfg = unet_config(unet)
        self.gene_encoder_cfg = dict(
            gene_encoder
            or {"kind": "open", "dim": 256, "depth": 2, "heads": 8, "ffn_mult": 4, "dropout": 0.1}
        )
        self.taps, self.feature_sigma, self.seed = taps, float(feature_sigma), seed
        self.stage1_checkpoint, self.mean_init = stage1_checkpoint, mean_init
        self.stage1_opts = {
            "pms_p": pms_p,
            "pms_mode": pms_mode,
            "lr": stage1_lr,
            "lr_ref_steps": stage1_lr_ref_steps,
            "lr_rampup_steps": stage1_lr_rampup_steps,
            "ema_stds": tuple(ema_stds),
            "seed": seed,
        }
        self.stage1_steps, self.ema_std = stage1_steps, ema_std
        fm = int(fm_dim) if fm_dim is not None else encoder_dim(encoder, encoder_overrides)
        self.fusion_kind = fusion
        fuse = Fusion(
            fusion, fm_dim=fm, diff_dim=self._diff_dim(msfe_width, msfe_proj_dim), diff_proj=diff_proj
        )
        self.uses_diffusion = fuse.needs_diff
        # The stage I network lives in the Method (frozen) so checkpoints carry it and a `--checkpoint`
        # run predicts without re-training it.
        self.stage1 = Precond(**self.unet_cfg) if self.uses_diffusion else None
        if self.stage1 is not None:
            self.stage1.requires_grad_(False)
            self.msfe = MSFENet(
                self.stage1.unet.feature_channels(taps), msfe_width, msfe_groups, msfe_dropout, msfe_proj_dim
            )
        self.head = FusedRegressor(fuse, n_genes)
        self._stage1_source = "none"
        self._weights_id: str | None = None

    def _diff_dim(self, width: int, proj_dim: int | None) -> int:
        n_taps = len(tap_channels(self.unet_cfg["img_resolution"], self.unet_cfg["channels"], self.taps))
        return proj_dim if proj_dim is not None else width * n_taps

    # ---- stage I -----------------------------------------------------------------------------------
    def run_stage_pretrain(self, datamodule: Any, trainer: Any) -> None:
        """Train (or load by reference) the gene-conditioned EDM2 network, then freeze its EMA."""
        if self.stage1 is None:
            self._stage1_source = "not used (fm_only)"
            return
        if self.stage1_checkpoint:
            net, unet, info = load_stage1(self.stage1_checkpoint)
            if unet_config(unet) != self.unet_cfg:
                raise ValueError(
                    f"diffbulk: stage I file {self.stage1_checkpoint} has U-Net {unet}, config asks {self.unet_cfg}"
                )
            self.stage1.load_state_dict(net.state_dict())
            self._stage1_source = f"file:{self.stage1_checkpoint}"
            return
        from stbench.benchmark.runner import stage_trainer

        module = Stage1Module(
            self.unet_cfg, list(datamodule.genes), self.gene_encoder_cfg, **self.stage1_opts
        )
        stage = stage_trainer(trainer, max_steps=self.stage1_steps, max_epochs=-1)
        stage.fit(module, train_dataloaders=datamodule.train_dataloader())
        averaged = module.averaged(self.ema_std)
        self.stage1.load_state_dict(averaged.net.state_dict())
        self._stage1_source = f"trained in job ({self.stage1_steps} steps, power EMA {self.ema_std})"
        if stage.is_global_zero:
            info = {"train_slides": list(datamodule.train_slides), "steps": self.stage1_steps}
            path = Path(trainer.default_root_dir) / STAGE1_FILE
            save_stage1(path, self.stage1, self.unet_cfg, GeneVocabulary(list(datamodule.genes)), info)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """A checkpoint carries the frozen stage I network: record that it came from there, unless
        this job trained it (Lightning restores the job's own best checkpoint before predicting)."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if (
            self.stage1 is not None
            and self._stage1_source == "none"
            and any(k.startswith("stage1.") for k in state_dict)
        ):
            self._stage1_source = "from the loaded checkpoint"
        return result

    # ---- stage II ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None:
            return
        self._weights_id = provider_weights_id(dm, self.key)
        if stage == "fit" and self.mean_init:
            with torch.no_grad():
                self.head.decoder.bias.copy_(torch.from_numpy(dm.train_target_mean()).float())

    def train(self, mode: bool = True) -> DiffBulk:
        """Stage II never puts the frozen stage I network in training mode (MP layers re-normalise
        their weights in place in training mode)."""
        super().train(mode)
        if self.stage1 is not None:
            self.stage1.eval()
        return self

    def diffusion_features(self, batch: dict[str, Any], seeded: bool) -> torch.Tensor | None:
        if self.stage1 is None:
            return None
        x = to_unit_range(batch["image"].float(), self.stage1.img_resolution)
        if seeded:  # per-spot noise: a test tile's features do not depend on its batch or rank
            gens = spot_generators(batch["index"], self.seed, "diffbulk:features")
            noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x)
        else:
            noise = torch.randn_like(x)
        sigma = max(self.feature_sigma, 1e-8)
        with torch.no_grad():
            _, feats = self.stage1(x + noise * self.feature_sigma, sigma, None, taps=self.taps)
        return self.msfe(feats)

    def forward_batch(self, batch: dict[str, Any], seeded: bool) -> torch.Tensor:
        z_fm = batch["features"][self.key].float() if self.head.fusion.needs_fm else None
        return self.head(z_fm, self.diffusion_features(batch, seeded))

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return F.mse_loss(self.forward_batch(batch, seeded=False), batch["expression"].float())

    def predict_expression(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.forward_batch(batch, seeded=True)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def weights_id(self) -> str:
        return f"fm={self._weights_id or self.weights}; stage1={self._stage1_source}"
