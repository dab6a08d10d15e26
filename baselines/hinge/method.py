"""`hinge`: HINGE (Fang et al., 2026) - masked diffusion over expression on a frozen CellFM made
histology-conditioned by SoftAdaLN; predictions average K-step reverse-process samples.

Inputs: frozen pathology-encoder features of the spot (UNI || CONCH by default) from the feature
store, and the panel's gene ids in the backbone vocabulary. Training draws t (warm-start band in the
first `curriculum_epochs` epochs), masks floor((1 - abar_t) G) genes in a random order, and fits the
masked genes (`loss`: paper or code). Validation = masked MSE on a per-spot fixed (t, order), so
checkpoint choice is cheap and comparable across epochs. All sampling randomness at validation and
prediction comes from generators seeded by the spot's global index: DDP equals one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from baselines._scfm import Backbone, build_backbone
from baselines.hinge.gaussian import GaussianDiffusion
from baselines.hinge.masking import (
    LOSSES,
    MaskSchedule,
    masked_loss,
    masked_sample,
    random_ranks,
    step_times,
    visible_mask,
)
from baselines.hinge.model import LORA_TARGETS, HingeNet
from stbench.data.features import encoder_dim, feature_key, provider_weights_id
from stbench.methods.base import BatchRequirements, Method
from stbench.methods.sampling import spot_generators
from stbench.methods.toolkit.arrays import training_arrays

OBJECTIVES = ("masked", "gaussian")
TARGET_NORMS = ("none", "standard")
HIST_NORMS = ("none", "center_scale")
FILLS = ("zero", "randn")
SELECT_ON = {"masked_mse": "val/masked_mse", "sample_mse": "val/mse"}


class Hinge(Method):
    name = "hinge"
    task = "expression"
    # 224 px spot tiles for the frozen encoders (UNI and CONCH take 224 px inputs).
    requires = BatchRequirements(image=False, features=("encoder",), patch={"out_px": 224})
    monitor = "val/masked_mse"

    def __init__(
        self,
        n_genes: int,
        genes: Sequence[str] | None = None,
        backbone: str = "cellfm",
        size: str = "800m",
        checkpoint: str | None = None,
        vocab: str | None = None,
        backbone_options: dict[str, Any] | None = None,
        random_gene_std: float | None = None,
        encoder: str = "uni+conch",
        weights: str = "default",
        encoder_overrides: dict[str, Any] | None = None,
        T: int = 50,
        K: int = 50,
        n_samples: int = 1,
        zeta: float | str = "auto",
        objective: str = "masked",
        loss: str = "paper",
        curriculum_epochs: int = 5,
        rho: float = 0.2,
        mask_fill: str = "zero",
        gauss_T: int = 1000,
        backbone_mode: str = "frozen",
        lora_rank: int = 8,
        lora_targets: Sequence[str] = LORA_TARGETS,
        modulation: str = "softadaln",
        identity_init: bool = True,
        use_visibility: bool = True,
        cond_init_std: float = 0.02,
        target_norm: str = "none",
        hist_norm: str = "none",
        select_on: str = "masked_mse",
        val_draws: int = 1,
        sample_seed: int = 0,
        save_frozen: bool = False,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        milestones: Sequence[int] = (20, 35),
        gamma: float = 0.2,
    ) -> None:
        super().__init__(n_genes, genes, lr=lr, weight_decay=weight_decay)
        for opt, val, allowed in (
            ("objective", objective, OBJECTIVES),
            ("loss", loss, LOSSES),
            ("mask_fill", mask_fill, FILLS),
            ("select_on", select_on, tuple(SELECT_ON)),
            ("target_norm", target_norm, TARGET_NORMS),
            ("hist_norm", hist_norm, HIST_NORMS),
        ):
            if val not in allowed:
                raise ValueError(f"hinge: {opt} must be one of {allowed}, got {val!r}")
        if n_samples < 1 or K < 1:
            raise ValueError(f"hinge: n_samples and K must be >= 1, got {n_samples}, {K}")
        self.save_hyperparameters()
        self.monitor = SELECT_ON[select_on]
        self.key = feature_key(encoder)
        self.encoder, self.weights = encoder, weights
        self.T, self.K, self.n_samples = int(T), int(K), int(n_samples)
        self.objective, self.loss_variant, self.mask_fill = objective, loss, mask_fill
        self.curriculum_epochs, self.rho = int(curriculum_epochs), float(rho)
        self.sample_seed, self.save_frozen = int(sample_seed), bool(save_frozen)
        self.val_draws = int(val_draws)
        self.milestones, self.gamma = list(milestones), float(gamma)
        self.schedule = MaskSchedule(self.n_genes, self.T, zeta)
        self.gauss = GaussianDiffusion(gauss_T) if objective == "gaussian" else None

        hist_dim = encoder_dim(encoder, encoder_overrides)
        bb = make_backbone(
            backbone, size, checkpoint, vocab, backbone_mode, backbone_options, random_gene_std
        )
        self.register_buffer("gene_ids", torch.from_numpy(gene_ids_for(bb, self.genes, self.n_genes)), False)
        self.net = HingeNet(
            bb,
            hist_dim,
            self.n_genes,
            modulation=modulation,
            identity_init=identity_init,
            backbone_mode=backbone_mode,
            lora_rank=lora_rank,
            lora_targets=lora_targets,
            use_visibility=use_visibility,
            cond_init_std=cond_init_std,
        )
        self._backbone_id = bb.weights_id() if backbone_mode != "scratch" else "none"
        self._encoder_id: str | None = None
        # Optional statistics fitted on training spots only ("none" = the paper: log targets, raw
        # features): per-gene target standardisation; histology features centred per dimension and
        # divided by ONE global scale (per-dimension scaling would blow up near-constant dimensions).
        self.target_norm, self.hist_norm = target_norm, hist_norm
        self.register_buffer("y_mean", torch.zeros(self.n_genes))
        self.register_buffer("y_std", torch.ones(self.n_genes))
        self.register_buffer("h_mean", torch.zeros(hist_dim))
        self.register_buffer("h_scale", torch.ones(()))

    # ---- data ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None:
            self._encoder_id = provider_weights_id(dm, self.key)
            if stage == "fit" and (self.target_norm != "none" or self.hist_norm != "none"):
                self.fit_stats(*training_arrays(dm, self.key))

    def fit_stats(self, x: np.ndarray, y: np.ndarray) -> None:
        """Feature/target statistics of the training spots (only the ones the options ask for)."""
        with torch.no_grad():
            if self.target_norm == "standard":
                self.y_mean.copy_(torch.from_numpy(y.mean(0)).float())
                self.y_std.copy_(torch.from_numpy(y.std(0)).float().clamp_min(1e-6))
            if self.hist_norm == "center_scale":
                self.h_mean.copy_(torch.from_numpy(x.mean(0)).float())
                self.h_scale.fill_(float(np.sqrt(x.var(0).mean())) or 1.0)

    def _targets(self, batch: dict[str, Any]) -> torch.Tensor:
        """Targets in the model's space (the protocol's, or standardised with target_norm)."""
        return (batch["expression"].float() - self.y_mean) / self.y_std

    def _to_target(self, z: torch.Tensor) -> torch.Tensor:
        return self.y_mean + self.y_std * z

    def _hist(self, batch: dict[str, Any]) -> torch.Tensor:
        return (batch["features"][self.key].float() - self.h_mean) / self.h_scale

    def _generators(self, index: torch.Tensor, purpose: str) -> list[torch.Generator]:
        """One CPU generator per spot, seeded by (sample_seed, purpose, global spot index)."""
        return spot_generators(index, self.sample_seed, f"hinge:{purpose}")

    # ---- the network under the diffusion objectives ----------------------------------------------
    def denoise(
        self, values: torch.Tensor, visible: torch.Tensor, t: torch.Tensor | int, hist: torch.Tensor
    ) -> torch.Tensor:
        """x0_hat (B, G) from the current (values, visible) at step t."""
        if not torch.is_tensor(t) or t.dim() == 0:
            t = torch.full((values.shape[0],), int(t), dtype=torch.long)
        return self.net(values, self.gene_ids, visible, t.to(values.device), hist).float()

    def _fill(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn_like(like) if self.mask_fill == "randn" else torch.zeros_like(like)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        x0, hist = self._targets(batch), self._hist(batch)
        b, dev = x0.shape[0], x0.device
        if self.gauss is not None:
            t = self.gauss.sample_t(b)
            xt = self.gauss.q_sample(x0, t.to(dev), torch.randn_like(x0))
            return F.mse_loss(self.denoise(xt, torch.ones_like(x0, dtype=torch.bool), t.to(dev), hist), x0)
        warm = self.current_epoch < self.curriculum_epochs
        t = self.schedule.sample_t(b, curriculum=warm, rho=self.rho)
        ranks = random_ranks(b, self.n_genes).to(dev)
        vis = visible_mask(ranks, self.schedule, t)
        pred = self.denoise(torch.where(vis, x0, self._fill(x0)), vis, t.to(dev), hist)
        return masked_loss(pred, x0, ranks, t, self.schedule, self.loss_variant)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Masked MSE over `val_draws` per-spot fixed (t, gene order) draws: the reconstruction error
        of the hidden genes (Gauss-Diff: the x0 error at a fixed (t, noise))."""
        if self.monitor == "val/mse":
            return super().validation_step(batch, batch_idx)
        n = int(batch["expression"].shape[0])
        self.log("val/masked_mse", self.masked_error(batch), sync_dist=True, batch_size=n, prog_bar=True)

    @torch.no_grad()
    def masked_error(self, batch: dict[str, Any]) -> torch.Tensor:
        r = self.val_draws
        x0 = self._targets(batch).repeat_interleave(r, 0)
        hist = self._hist(batch).repeat_interleave(r, 0)
        gens = self._generators(batch["index"], "val")
        dev, g = x0.device, self.n_genes
        if self.gauss is not None:
            t = torch.cat([self.gauss.sample_t(r, gen) for gen in gens])
            noise = torch.cat([torch.randn(r, g, generator=gen) for gen in gens]).to(dev)
            vis = torch.ones_like(x0, dtype=torch.bool)
            pred = self.denoise(self.gauss.q_sample(x0, t.to(dev), noise), vis, t.to(dev), hist)
            return F.mse_loss(self._to_target(pred), self._to_target(x0))
        t = torch.cat([self.schedule.sample_t(r, generator=gen) for gen in gens])
        ranks = torch.cat([random_ranks(r, g, gen) for gen in gens]).to(dev)
        fill = self._draw_fill(gens, r).transpose(0, 1).reshape(-1, g).to(dev)
        vis = visible_mask(ranks, self.schedule, t)
        pred = self.denoise(torch.where(vis, x0, fill), vis, t.to(dev), hist)
        sq = (self._to_target(pred) - self._to_target(x0)) ** 2
        return (sq * ~vis).sum() / (~vis).sum().clamp_min(1)

    def _draw_fill(self, gens: list[torch.Generator], n: int) -> torch.Tensor:
        """(n, B, G) placeholder values for masked genes: zeros or N(0, 1) from the spot generators."""
        if self.mask_fill == "zero":
            return torch.zeros(n, len(gens), self.n_genes)
        return torch.stack([torch.randn(n, self.n_genes, generator=g) for g in gens], dim=1)

    # ---- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self, batch: dict[str, Any], n_samples: int | None = None, K: int | None = None
    ) -> torch.Tensor:
        """(n, B, G) reverse-process samples in the model's space; randomness only from the spots'
        generators."""
        n, K = n_samples or self.n_samples, K or self.K
        hist = self._hist(batch)
        dev, b = hist.device, hist.shape[0]
        gens = self._generators(batch["index"], "predict")
        out = []
        if self.gauss is not None:
            steps = len(step_times(self.gauss.T, K))
            noise = torch.stack([torch.randn(n, steps, self.n_genes, generator=g) for g in gens], dim=2).to(
                dev
            )
            ones = torch.ones(b, self.n_genes, dtype=torch.bool, device=dev)
            for k in range(n):
                out.append(self.gauss.sample(lambda x, t: self.denoise(x, ones, t, hist), noise[k], K))
            return torch.stack(out)
        ranks = torch.stack([torch.rand(n, self.n_genes, generator=g) for g in gens], dim=1)
        ranks = ranks.argsort(-1).argsort(-1).to(dev)
        fill = self._draw_fill(gens, n).to(dev)
        for k in range(n):
            predict = lambda v, vis, t: self.denoise(v, vis, t, hist)  # noqa: E731
            out.append(masked_sample(predict, ranks[k], self.schedule, K, fill[k]))
        return torch.stack(out)

    def predict_expression(self, batch: dict[str, Any]) -> torch.Tensor:
        return self._to_target(self.sample(batch).mean(0))

    # ---- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=self.milestones, gamma=self.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # ---- checkpoints: keep the frozen backbone out of them ----------------------------------------
    def _frozen_keys(self) -> set[str]:
        """Frozen weights that a checkpoint can leave out: only those read from a backbone FILE (a
        random-init backbone is not reproducible from its config, so it is always saved)."""
        if self.save_frozen or self._backbone_id == "none":
            return set()
        return {f"net.{n}" for n, p in self.net.named_parameters() if not p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop frozen backbone weights (3.2 GB for 800m per checkpoint); the backbone file has them."""
        checkpoint["hinge_backbone"] = self._backbone_id
        sd = checkpoint.get("state_dict", {})
        for k in self._frozen_keys():
            sd.pop(k, None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hinge_backbone")
        if saved is not None and saved != self._backbone_id:
            raise ValueError(
                f"hinge: this checkpoint was trained on backbone weights {saved}, but the model was built "
                f"with {self._backbone_id}; pass the same method.checkpoint"
            )

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Frozen backbone entries absent from `state_dict` keep the values built from the backbone file."""
        own = super().state_dict()
        merged = dict(state_dict)
        for k in self._frozen_keys():
            if k not in merged and k in own:
                merged[k] = own[k]
        return super().load_state_dict(merged, strict=strict, assign=assign)

    # ---- provenance ----------------------------------------------------------------------------------
    @classmethod
    def gene_vocabulary(cls, config: dict[str, Any]) -> list[str] | None:
        """The backbone's gene symbols, so the `hinge` protocol picks HMHVG genes among them on
        training slides: `vocab` (CellFM's gene_info.csv), else an scGPT checkpoint directory's
        vocab.json; None (any gene) for a random-init backbone without a vocabulary."""
        from pathlib import Path

        from baselines._scfm.vocab import GeneVocab

        if config.get("vocab"):
            return list(GeneVocab.from_file(config["vocab"]).symbols)
        ckpt = config.get("checkpoint")
        if config.get("backbone") == "scgpt" and ckpt and (Path(ckpt) / "vocab.json").exists():
            from baselines._scfm.scgpt_ckpt import read_scgpt_vocab

            return list(read_scgpt_vocab(Path(ckpt) / "vocab.json")[0].symbols)
        return None

    def weights_id(self) -> str:
        """Backbone and encoder weights; `none` only when both are random-init."""
        enc = self._encoder_id or str(self.weights)
        if self._backbone_id == "none" and enc == "none":
            return "none"
        return f"{self.hparams.backbone}-{self.hparams.size}={self._backbone_id};{self.key}={enc}"


def make_backbone(
    kind: str,
    size: str,
    checkpoint: str | None,
    vocab: str | None,
    backbone_mode: str,
    options: dict[str, Any] | None = None,
    random_gene_std: float | None = None,
) -> Backbone:
    """The backbone HINGE wraps; a pre-trained size needs its checkpoint (Scratch ignores it).

    `random_gene_std` (random-init backbones only) redraws the gene-id table from N(0, std): its
    default Xavier init shrinks with the table's row count, which would tie the gene tokens' scale,
    and with it how well a random backbone separates genes, to the vocabulary size."""
    scratch = backbone_mode == "scratch"
    if checkpoint is None and not scratch and size != "tiny":
        raise ValueError(
            f"hinge: method.checkpoint is required for the pre-trained {kind} {size!r} backbone (CellFM: "
            "base_weight.ckpt for 800m, CellFM_80M_weight.ckpt for 80m from hf:ShangguanNingyuan/CellFM); "
            "use backbone_mode: scratch to train a randomly initialised one"
        )
    bb = build_backbone(kind, size, None if scratch else checkpoint, vocab, **dict(options or {}))
    if random_gene_std is not None:
        table = getattr(bb, "gene_emb", None)
        if bb.weights_id() != "none" or not isinstance(table, torch.nn.Parameter):
            raise ValueError(
                "hinge: random_gene_std applies to a random-init backbone with a gene_emb table only"
            )
        with torch.no_grad():
            table.normal_(0.0, float(random_gene_std))
            table[0].zero_()  # padding row
    return bb


def gene_ids_for(backbone: Backbone, genes: Sequence[str] | None, n_genes: int) -> np.ndarray:
    """(G,) int64 backbone gene ids of the panel. Unmapped panel genes are an error (the `hinge`
    protocol intersects the panel with the vocabulary first). A random-init backbone without a
    vocabulary numbers the panel 1..G (its gene table has no meaning to preserve)."""
    vocab = getattr(backbone, "vocab", None)
    if vocab is None:
        if backbone.weights_id() != "none":
            raise ValueError("hinge: a pre-trained backbone needs its gene vocabulary (method.vocab)")
        ids = np.arange(1, n_genes + 1, dtype=np.int64)
    else:
        if genes is None:
            raise ValueError("hinge: gene symbols are needed to map the panel onto the backbone vocabulary")
        ids, unmapped = vocab.map(list(genes))
        if unmapped:
            raise ValueError(
                f"hinge: {len(unmapped)} of {len(genes)} panel genes are not in the {backbone.kind} vocabulary "
                f"({', '.join(unmapped[:20])}{', ...' if len(unmapped) > 20 else ''}); intersect the panel "
                "with the vocabulary (protocol `hinge`) or use a gene rule that does"
            )
        ids = np.asarray(ids, dtype=np.int64)
    rows = getattr(getattr(backbone, "gene_emb", None), "shape", (None,))[0]
    if rows is not None and (ids.max(initial=0) >= rows or ids.min(initial=1) < 1):
        raise ValueError(
            f"hinge: gene ids must lie in 1..{rows - 1} (gene table rows), got {ids.min()}..{ids.max()}"
        )
    return ids
