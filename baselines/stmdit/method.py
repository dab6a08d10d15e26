"""`stmdit` / `pixcell`: STMDiT (gene-expression + morphology conditioned H&E synthesis) and its no-GE
PixCell baselines, as one image-generation Method (`task = "image"`).

Training (per spot): the tile's SD3-VAE latent (a fresh posterior sample mean + std * eps, PixCell's
input; `latent_sample="mean"` uses the mean), the UNI2-h feature of the same spot patch and the frozen
CancerFoundation encoding of its expression profile (the protocol's targets; PTPL: a predictor's
pseudo-labels from `ge_source`); each condition is dropped independently with probability p (four
regimes), the DiT learns eps (+ variance, DDPM) or the velocity (flow); AdamW with warm-up and linear
decay to 10 %, EMA of the denoiser after every optimiser step (samples use the EMA weights).

Prediction = generation: for every test spot and every regime in `regimes`, one tile sampled from its
own seeded noise (the same noise for every regime, so regimes differ only by their conditions) with
the paper's dual classifier-free guidance, the three guided passes stacked into one forward, then
decoded by the VAE. Test batches carry the expression condition and the UNI features of the real
tile, never the real tile or its latent (the runner hides them).

`pixcell` is the same code with the GE pathway off: PixCell-B / PixCell-Flow-B (trained here) and,
with `init: pixcell` and no training epochs, PixCell-Pretrained-XL (the public PixCell-256 weights).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from baselines.stmdit.dit import STMDiT, build_dit
from baselines.stmdit.ge_conditioning import GEConfig
from baselines.stmdit.ge_encoder import (
    DOWNLOAD_HINT,
    CancerFoundationEncoder,
    GEEncoding,
    build_cancerfoundation,
    load_cancerfoundation,
)
from baselines.stmdit.guidance import REGIMES, guided_prediction, modality_keep
from baselines.stmdit.model import STMDiTModel
from baselines.stmdit.objectives import LatentObjective
from stbench.data.features import encoder_dim, feature_key, provider_weights_id
from stbench.data.latents import LATENT_KEY, LATENT_STD_KEY, unflatten_latents
from stbench.errors import DataError
from stbench.methods.base import BatchRequirements, Method
from stbench.methods.sampling import spot_generators
from stbench.methods.toolkit.ema import EMA

SAMPLE_STREAM = "stmdit:sample"
LATENT_SAMPLES = ("posterior", "mean")
SD3_GEOMETRY = (16, 8)  # SD3's VAE (and the tiny test VAE): 16 channels, 256 px -> 32 latents
CF_ENV = "STBENCH_CANCERFOUNDATION"  # folder of CancerFoundation's model.pth, vocab.json, args.json


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Subnormal floats make CPU kernels ~7x slower, and the DiT's zero-initialised layers and small
    guided differences produce them; flushing them to zero (exactly what GPUs' fast paths do) is a
    numerical no-op at float32 scale. Switched off afterwards (torch's default), so no other method's
    numbers change."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _is_random(weights_id: str | None) -> bool:
    """True for components without pretrained weights (random init, or the lossless pixel stand-in)."""
    prefixes = ("none", "tiny", "random", "pixels")
    return weights_id is None or weights_id == "" or weights_id.startswith(prefixes)


def vae_geometry(source: str) -> tuple[int, int]:
    """(latent channels, downsampling) of a `vae` source without loading it."""
    from stbench.encoders.pixel_vae import parse_pixels

    f = parse_pixels(source)
    return (3 * f * f, f) if f else SD3_GEOMETRY


def build_ge_encoder(
    source: str, genes: Sequence[str], overrides: dict[str, Any] | None = None
) -> tuple[CancerFoundationEncoder, list[int]]:
    """(frozen encoder, vocabulary id per panel gene, -1 = unmapped).

    source: a CancerFoundation folder / model file, "default" (the folder in $STBENCH_CANCERFOUNDATION),
    or "random[:size]" = a seeded random-init encoder whose vocabulary is the panel (labelled weights
    "none"; for tests and CI, where CancerFoundation's weights are not available)."""
    from baselines._scfm.vocab import GeneVocab

    overrides = dict(overrides or {})
    if source.startswith("random"):
        size = source.partition(":")[2] or "tiny"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            enc = build_cancerfoundation(size, n_tokens=3 + len(genes), **overrides)
        enc.vocab = GeneVocab({g: 3 + i for i, g in enumerate(genes)}, pad_id=1, source="panel (random init)")
    else:
        path = os.environ.get(CF_ENV) if source == "default" else source
        if not path:
            from stbench.encoders.weights import WeightsError

            raise WeightsError(
                f"CancerFoundation weights: set ${CF_ENV} or ge_encoder: <folder>. {DOWNLOAD_HINT}"
            )
        enc = load_cancerfoundation(path, **overrides)
    ids, _ = enc.map_genes(genes)
    return enc, [int(i) for i in ids.tolist()]


class STMDiTMethod(Method):
    name = "stmdit"
    task = "image"
    # UNI2-h sees the spot patch at 224 px; the VAE's latents come from the same crop at `latent_px`.
    requires = BatchRequirements(
        image=False, features=("encoder", LATENT_KEY, LATENT_STD_KEY), patch={"out_px": 224}
    )
    monitor = "val/loss"
    ge_enabled: ClassVar[bool] = True
    default_regimes: ClassVar[tuple[str, ...]] = REGIMES

    def __init__(
        self,
        n_genes: int,
        genes: Sequence[str] | None = None,
        *,
        size: str = "B",
        dit_overrides: dict[str, Any] | None = None,
        init: str = "random",
        grad_checkpointing: bool = False,
        fusion: str = "xattn",
        tokens: str = "perceiver",
        ge_k: int = 32,
        perceiver_iters: int = 2,
        gsa_layers: int = 2,
        ge_encoder: str = "default",
        ge_encoder_overrides: dict[str, Any] | None = None,
        ge_genes: int = 1199,
        ge_source: str | None = None,
        encoder: str = "uni2-h",
        weights: str = "default",
        encoder_overrides: dict[str, Any] | None = None,
        uni_dim: int | None = None,
        vae: str = "default",
        latent_px: int = 256,
        latent_dtype: str = "float32",
        latent_sample: str = "posterior",
        objective: str = "ddpm",
        diffusion_steps: int = 1000,
        sample_steps: int = 50,
        s_uni: float = 4.0,
        s_ge: float = 3.0,
        p_drop: float = 0.5,
        p_uni: float | None = None,
        p_ge: float | None = None,
        regimes: Sequence[str] | None = None,
        sample_seed: int = 42,
        ema_decay: float = 0.9999,
        ema_warmup: bool = False,
        lr: float = 2e-5,
        weight_decay: float = 0.01,
        betas: Sequence[float] = (0.9, 0.999),
        warmup_steps: int = 1000,
        final_lr_fraction: float = 0.1,
    ) -> None:
        super().__init__(n_genes, genes, lr=lr, weight_decay=weight_decay)
        if latent_sample not in LATENT_SAMPLES:
            raise ValueError(
                f"{self.name}: latent_sample must be one of {LATENT_SAMPLES}, got {latent_sample!r}"
            )
        self.latent_channels, self.downsample = vae_geometry(vae)
        if latent_px % self.downsample:
            raise ValueError(f"{self.name}: latent_px {latent_px} is not a multiple of {self.downsample}")
        self.save_hyperparameters()
        self.key = feature_key(encoder)
        self.encoder, self.weights = encoder, weights
        self.vae_source, self.tile_px, self.latent_sample = vae, int(latent_px), latent_sample
        self.objective = LatentObjective(objective, diffusion_steps)
        self.sample_steps, self.s_uni, self.s_ge = int(sample_steps), float(s_uni), float(s_ge)
        self.p_uni = float(p_drop if p_uni is None else p_uni)
        self.p_ge = float(p_drop if p_ge is None else p_ge)
        self.regimes = tuple(regimes or self.default_regimes)
        bad = [r for r in self.regimes if r not in REGIMES or (not self.ge_enabled and "ge" in r)]
        if bad:
            raise ValueError(f"{self.name}: regimes {bad} not available (choose from {self.default_regimes})")
        self.sample_seed = int(sample_seed)
        self.betas, self.warmup_steps, self.final_lr_fraction = (
            tuple(betas),
            int(warmup_steps),
            final_lr_fraction,
        )
        self.ge_source = ge_source
        self._pseudo: Any = None
        self._setup_done = False
        self.__dict__["_vae"] = None  # decoder of generated latents: frozen, loaded on first use, not saved

        dim = uni_dim if uni_dim is not None else encoder_dim(encoder, encoder_overrides)
        side = self.tile_px // self.downsample
        cf, gene_ids, ge_cols, ge_cfg = None, None, None, None
        if self.ge_enabled and fusion != "none":
            cf, ids = build_ge_encoder(ge_encoder, self.genes or [], ge_encoder_overrides)
            cols = self._candidate_columns(ids)
            n_sel = min(len(cols), cf.cfg.max_len - 1, int(ge_genes))
            if n_sel < 1:
                raise DataError(
                    f"{self.name}: none of the {n_genes} panel genes is in the CancerFoundation vocabulary",
                    field="ge_encoder",
                )
            ge_cols = torch.tensor(cols[:n_sel], dtype=torch.long)
            gene_ids = torch.tensor([ids[c] for c in cols[:n_sel]], dtype=torch.long)
            ge_cfg = GEConfig(
                fusion=fusion,
                tokens=tokens,
                ge_dim=cf.cfg.dim,
                k=ge_k,
                perceiver_iters=perceiver_iters,
                gsa_layers=gsa_layers,
            )
        self._vocab_ids = None if cf is None else ids
        dit = self._build_dit(
            init,
            size,
            ge_cfg,
            {
                "uni_dim": int(dim),
                "sample_size": side,
                "in_channels": self.latent_channels,
                **(dit_overrides or {}),
            },
        )
        dit.grad_checkpointing = bool(grad_checkpointing)
        self.model = STMDiTModel(dit, cf, gene_ids, ge_cols)
        self.ema = EMA(self.model.dit, ema_decay, ema_warmup)
        self._dit_weights = "none" if init == "random" else str(dit.weights_id)

    # ---- construction ----------------------------------------------------------------------------
    def _build_dit(self, init: str, size: str, ge: GEConfig | None, overrides: dict[str, Any]) -> STMDiT:
        if init == "random":
            return build_dit(size, ge=ge, **overrides)
        if init.startswith("pixcell"):
            from baselines.stmdit.pixcell_weights import load_pixcell

            return load_pixcell(init.partition(":")[2] or "default", ge=ge)
        raise ValueError(f"{self.name}: init must be 'random' or 'pixcell[:source]', got {init!r}")

    def _pseudolabels(self) -> Any:
        if self.ge_source and self._pseudo is None:
            from stbench.data.pseudolabels import PseudoLabels

            self._pseudo = PseudoLabels.load(self.ge_source)
        return self._pseudo

    def _candidate_columns(self, ids: Sequence[int]) -> list[int]:
        """Panel columns CancerFoundation can read (in its vocabulary; with PTPL also pseudo-labelled)."""
        have = set(self._pseudolabels().genes) if self.ge_source else None
        genes = self.genes or []
        return [c for c, i in enumerate(ids) if i >= 0 and (have is None or genes[c] in have)]

    def setup(self, stage: str) -> None:
        """On fit: keep CancerFoundation's <= max_len - 1 genes of highest TRAINING variance (in panel
        order, as CancerFoundation keeps dataset order)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or stage != "fit" or self._setup_done or self._vocab_ids is None:
            return
        cols = self._candidate_columns(self._vocab_ids)
        n = int(self.model.gene_ids.numel())
        var = dm.train_targets()[:, cols].var(0)
        top = sorted(np.asarray(cols)[np.argsort(-var, kind="stable")[:n]].tolist())
        self.model.ge_cols.copy_(torch.tensor(top))
        self.model.gene_ids.copy_(torch.tensor([self._vocab_ids[c] for c in top]))
        self._setup_done = True

    # ---- inputs ------------------------------------------------------------------------------------
    def _ge(self, batch: dict[str, Any]) -> GEEncoding | None:
        if not self.model.uses_ge:
            return None
        if self.ge_source:
            values = self._pseudolabels().lookup(batch["slide"], batch["spot_id"], self.genes)
            expression = torch.from_numpy(np.asarray(values, dtype=np.float32)).to(self.device)
        else:
            if "expression" not in batch:
                raise DataError(
                    f"{self.name}: batches carry no expression to condition on", field="expression"
                )
            expression = batch["expression"]
        return self.model.encode_ge(expression)

    def _latents(self, batch: dict[str, Any], sample: bool = True) -> torch.Tensor:
        """Clean latents: a posterior sample (training), or the mean (validation, `latent_sample: mean`)."""
        feats = batch["features"]
        c = self.model.dit.cfg.in_channels
        mean = unflatten_latents(feats[LATENT_KEY].float(), c)
        if not sample or self.latent_sample == "mean":
            return mean
        std = unflatten_latents(feats[LATENT_STD_KEY].float(), c)
        return mean + std * torch.randn(mean.shape).to(mean)

    def _denoise_fn(self, uni: torch.Tensor, ge: GEEncoding | None, net: torch.nn.Module) -> Any:
        """model_fn(x, t, uni_keep, ge_keep) over a batch that stacks n copies of the conditions."""
        b = uni.shape[0]

        def model_fn(x: torch.Tensor, t: torch.Tensor, uk: torch.Tensor, gk: torch.Tensor) -> torch.Tensor:
            n = x.shape[0] // b
            g = None if ge is None else GEEncoding(*(f.repeat(n, *([1] * (f.dim() - 1))) for f in ge))
            return self.model.denoise(x, t, uni.repeat(n, 1), g, uk, gk if g is not None else None, dit=net)

        return model_fn

    # ---- training ----------------------------------------------------------------------------------
    def _loss(
        self, batch: dict[str, Any], net: torch.nn.Module, generator: torch.Generator | None
    ) -> torch.Tensor:
        x0 = self._latents(batch, sample=generator is None)
        uni = batch["features"][self.key].float()
        ge = self._ge(batch)
        b = x0.shape[0]
        if generator is None:
            uk, gk = modality_keep(b, self.p_uni, self.p_ge if ge is not None else 1.0)
        else:  # validation: the full regime
            uk = gk = torch.ones(b, dtype=torch.bool)
        uk, gk = uk.to(x0.device), gk.to(x0.device)

        def predict(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.model.denoise(xt, t, uni, ge, uk, gk if ge is not None else None, dit=net)

        return self.objective.loss(predict, x0, generator).mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        with flush_denormals():
            loss = self._loss(batch, self.model.dit, None)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["index"].numel()))
        return loss

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        with flush_denormals():
            super().backward(loss, *args, **kwargs)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """`val/loss`: the objective on validation spots with the EMA denoiser, fixed t and noise."""
        gen = torch.Generator().manual_seed(self.sample_seed * 100003 + batch_idx)
        with flush_denormals():
            loss = self._loss(batch, self.ema.shadow, gen)
        self.log("val/loss", loss, sync_dist=True, batch_size=int(batch["index"].numel()), prog_bar=True)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.model.dit)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.dit.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        warm, floor = max(0, self.warmup_steps), float(self.final_lr_fraction)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            span = max(1, total - warm)
            return floor + (1.0 - floor) * max(0.0, 1.0 - (step - warm) / span)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- generation --------------------------------------------------------------------------------
    def vae(self) -> Any:
        if self.__dict__["_vae"] is None:
            from stbench.encoders.vae import load_vae

            self.__dict__["_vae"] = load_vae(self.vae_source).eval()
        return self.__dict__["_vae"].to(self.device)

    @torch.no_grad()
    def generate_latents(self, batch: dict[str, Any], regime: str) -> torch.Tensor:
        uni = batch["features"][self.key].float()
        ge = self._ge(batch)
        model_fn = self._denoise_fn(uni, ge, self.ema.shadow)
        side = self.tile_px // self.downsample
        shape = (uni.shape[0], self.model.dit.cfg.in_channels, side, side)
        gens = spot_generators(batch["index"], self.sample_seed, SAMPLE_STREAM)

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guided_prediction(model_fn, x, t, self.s_uni, self.s_ge, batched=True, regime=regime)

        return self.objective.sample(predict, shape, gens, steps=self.sample_steps, device=uni.device)

    @torch.no_grad()
    def generate_images(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{regime: (B, 3, tile_px, tile_px) in [0, 1]}: one tile per test spot and regime."""
        vae = self.vae()
        with flush_denormals():
            return {r: vae.decode(self.generate_latents(batch, r).float()).float() for r in self.regimes}

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return {"index": batch["index"], "tiles": self.generate_images(batch)}

    # ---- provenance --------------------------------------------------------------------------------
    def weights_id(self) -> str:
        dm = self.trainer.datamodule if self._trainer is not None else None
        parts = {
            "dit": self._dit_weights,
            "uni": provider_weights_id(dm, self.key) if dm is not None else None,
            "cf": self.model.ge_encoder.weights_id() if self.model.ge_encoder is not None else None,
            "vae": provider_weights_id(dm, LATENT_KEY) if dm is not None else None,
        }
        if self.ge_source:
            parts["ge"] = str(self._pseudolabels().source)
        named = {k: v for k, v in parts.items() if v is not None}
        if all(_is_random(v) for k, v in named.items() if k != "ge") and "ge" not in named:
            return "none"
        return "; ".join(f"{k}={v}" for k, v in named.items())


class PixCellMethod(STMDiTMethod):
    """PixCell-B / PixCell-Flow-B / PixCell-Pretrained-XL: STMDiT with the GE pathway disabled; UNI is
    dropped with PixArt's class-dropout probability 0.1 by default and sampled with s_uni."""

    name = "pixcell"
    ge_enabled = False
    default_regimes = ("uni", "none")

    def __init__(self, n_genes: int, genes: Sequence[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("p_drop", 0.1)
        kwargs["fusion"] = "none"
        super().__init__(n_genes, genes, **kwargs)
