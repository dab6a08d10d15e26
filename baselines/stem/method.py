"""`stem`: Stem (Zhu et al., ICLR 2025) - a conditional diffusion model of a spot's expression vector
given its frozen histology features (UNI || CONCH), sampled and averaged to predict.

Training: hybrid diffusion loss (diffusion.py) on the protocol's targets (optionally standardised
per gene with training-spot statistics, `normalize="standard"`), AdamW, EMA of the weights after
every optimiser step. Prediction: `n_samples` samples per spot from the EMA network, averaged, with
the ancestral sampler over all 1,000 steps (the paper) or DDIM over `sample_steps` (speed option).

Reproducibility: every spot's sampling noise comes from its own torch.Generator seeded from
(`sample_seed`, stream, global spot index), so a spot's prediction is the same in any batch, on any
rank, and in DDP or one process; the global RNG is never used at validation or predict time.

Validation (`val/mse`, the checkpoint monitor): the MSE of a cheap prediction on the validation
spots - `val_samples` DDIM samples over `val_steps` steps from the EMA network, averaged - in the
target space, i.e. the same kind of number the test reports, at a fraction of its cost. The
hybrid diffusion loss of the validation spots (fixed per-spot t and noise) is logged as `val/loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from baselines.stem.model import StemDiT
from stbench.data.features import encoder_dim, feature_key, provider_weights_id
from stbench.errors import UnknownNameError
from stbench.methods.base import BatchRequirements, Method
from stbench.methods.sampling import spot_generators
from stbench.methods.toolkit.diffusion import DECODER_NLL, GaussianDiffusion, randn
from stbench.methods.toolkit.ema import EMA

NORMALIZE = ("none", "standard")
SAMPLERS = ("ancestral", "ddim")
VAL_METRICS = ("ddim", "loss")
STREAM_PREDICT, STREAM_VAL_SAMPLE, STREAM_VAL_LOSS = "stem:predict", "stem:val-sample", "stem:val-loss"


def _known_encoder_dim(encoder: str, overrides: dict[str, Any] | None) -> int | None:
    """Feature width of a registered encoder, or None for a name only a test knows."""
    try:
        return encoder_dim(encoder, overrides)
    except UnknownNameError:
        return None


class Stem(Method):
    name = "stem"
    task = "expression"
    # One spot patch (the spot's diameter; Stem crops max(diameter, 224 px) full-res), 224 px input.
    requires = BatchRequirements(image=False, features=("encoder",), patch={"out_px": 224})

    def __init__(
        self,
        n_genes: int,
        genes: Sequence[str] | None = None,
        encoder: str = "uni+conch",
        weights: str = "default",
        encoder_overrides: dict[str, Any] | None = None,
        in_dim: int | None = None,
        hidden: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        diffusion_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        vlb_lambda: float = 1e-3,
        decoder_nll: str = "continuous",
        normalize: str = "none",
        ema_decay: float = 0.9999,
        ema_warmup: bool = False,
        use_ema: bool = True,
        n_samples: int = 20,
        sampler: str = "ancestral",
        sample_steps: int | None = None,
        eta: float = 0.0,
        clip_x0: bool = False,
        sample_seed: int = 0,
        sample_chunk_rows: int | None = 4096,
        val_metric: str = "ddim",
        val_steps: int = 10,
        val_samples: int = 2,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(n_genes, genes, lr=lr, weight_decay=weight_decay)
        for value, allowed, what in (
            (normalize, NORMALIZE, "normalize"),
            (sampler, SAMPLERS, "sampler"),
            (val_metric, VAL_METRICS, "val_metric"),
            (decoder_nll, DECODER_NLL, "decoder_nll"),
        ):
            if value not in allowed:
                raise ValueError(f"stem: {what} must be one of {allowed}, got {value!r}")
        if n_samples < 1 or val_samples < 1:
            raise ValueError(f"stem: n_samples and val_samples must be >= 1, got {n_samples}, {val_samples}")
        self.save_hyperparameters()
        self.encoder, self.weights, self.encoder_overrides = encoder, weights, encoder_overrides
        self.key = feature_key(encoder)
        self.arch = {"hidden": hidden, "depth": depth, "heads": heads, "mlp_ratio": mlp_ratio}
        self.diffusion = GaussianDiffusion.linear(diffusion_steps, beta_start, beta_end)
        self.vlb_lambda, self.decoder_nll, self.normalize = vlb_lambda, decoder_nll, normalize
        self.ema_decay, self.ema_warmup, self.use_ema = ema_decay, ema_warmup, use_ema
        self.n_samples, self.sampler, self.sample_steps, self.eta = n_samples, sampler, sample_steps, eta
        self.sample_seed, self.clip_x0, self.sample_chunk_rows = sample_seed, clip_x0, sample_chunk_rows
        self.val_metric, self.val_steps, self.val_samples = val_metric, val_steps, val_samples
        self.net: StemDiT | None = None
        self.ema: EMA | None = None
        # Per-gene target scaler (normalize="standard"), fitted on training spots only.
        self.register_buffer("y_mean", torch.zeros(n_genes))
        self.register_buffer("y_std", torch.ones(n_genes))
        # Per-gene range of the training targets in model space (clip_x0 bounds the sampler's x0).
        self.register_buffer("x_lo", torch.full((n_genes,), -torch.inf))
        self.register_buffer("x_hi", torch.full((n_genes,), torch.inf))
        self._weights_id: str | None = None
        self._stats_fitted = False
        dim = in_dim if in_dim is not None else _known_encoder_dim(encoder, encoder_overrides)
        if dim is not None:  # built now, so a checkpoint loads into it before any setup
            self.build(int(dim))

    # ---- construction --------------------------------------------------------------------------
    def build(self, cond_dim: int) -> StemDiT:
        self.net = StemDiT(self.n_genes, cond_dim, **self.arch)
        self.ema = EMA(self.net, self.ema_decay, self.ema_warmup)
        return self.net

    def setup(self, stage: str) -> None:
        """On fit, fit the target scaler and sampler range on training spots (once)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None:
            return
        self._require_net()
        if stage == "fit" and not self._stats_fitted:
            self.fit_target_stats(dm.train_targets())
            self._stats_fitted = True
        self._weights_id = provider_weights_id(dm, self.key)

    def fit_target_stats(self, y: np.ndarray) -> None:
        """Scaler (normalize="standard") and the per-gene range, from training targets only."""
        with torch.no_grad():
            if self.normalize == "standard":
                self.y_mean.copy_(torch.from_numpy(y.mean(0)).float())
                self.y_std.copy_(torch.from_numpy(y.std(0)).float().clamp_min(1e-6))
            x = self.to_model_space(torch.from_numpy(y).float())
            self.x_lo.copy_(x.min(0).values)
            self.x_hi.copy_(x.max(0).values)

    def _require_net(self) -> StemDiT:
        if self.net is None:
            raise RuntimeError(
                "stem: encoder is not a registered encoder, so the feature width is unknown; pass in_dim "
                "or call build(dim)"
            )
        return self.net

    def sampling_net(self) -> torch.nn.Module:
        """The EMA network (Stem samples with it) unless use_ema is off."""
        net = self._require_net()
        return self.ema.shadow if self.use_ema and self.ema is not None else net

    # ---- training ------------------------------------------------------------------------------
    def to_model_space(self, y: torch.Tensor) -> torch.Tensor:
        return (y.float() - self.y_mean) / self.y_std

    def from_model_space(self, x: torch.Tensor) -> torch.Tensor:
        return self.y_mean + self.y_std * x

    def diffusion_loss(
        self, batch: dict[str, Any], net: torch.nn.Module, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        cond = batch["features"][self.key].float()
        x0 = self.to_model_space(batch["expression"])
        terms = self.diffusion.training_losses(
            lambda x, s: net(x, s, cond), x0, t, noise, self.vlb_lambda, self.decoder_nll
        )
        return {k: v.mean() for k, v in terms.items()}

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Hybrid loss at t ~ U{0..T-1} (training draws from the seeded global RNG)."""
        x = batch["expression"]
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
        noise = torch.randn(x.shape, device=x.device)
        terms = self.diffusion_loss(batch, self._require_net(), t, noise)
        n = int(x.shape[0])
        self.log("train/mse_eps", terms["mse"], batch_size=n)
        self.log("train/vb", terms["vb"], batch_size=n)
        return terms["loss"]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser step, then the EMA update (once per step, whatever the accumulation)."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self._require_net())

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self._require_net().parameters(), lr=self.lr, weight_decay=self.weight_decay)

    # ---- sampling ------------------------------------------------------------------------------
    def sample(
        self,
        cond: torch.Tensor,
        index: torch.Tensor,
        n_samples: int,
        sampler: str,
        steps: int | None,
        stream: str = STREAM_PREDICT,
    ) -> torch.Tensor:
        """(B, n_samples, G) samples in model space, each spot's from its own generator; spots are
        sampled in chunks of at most `sample_chunk_rows` rows (a memory bound: a spot's samples do
        not depend on its chunk)."""
        per = max(1, self.sample_chunk_rows // n_samples) if self.sample_chunk_rows else cond.shape[0]
        if cond.shape[0] > per:
            parts = [
                self.sample(cond[i : i + per], index[i : i + per], n_samples, sampler, steps, stream)
                for i in range(0, cond.shape[0], per)
            ]
            return torch.cat(parts, dim=0)
        net = self.sampling_net()
        b = cond.shape[0]
        cond_rep = cond.float().repeat_interleave(n_samples, dim=0)  # spot-major: spot i's rows together
        gens = spot_generators(index, self.sample_seed, stream, cond.device)

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return net(x, t, cond_rep)

        shape = (b * n_samples, self.n_genes)
        clip = (self.x_lo, self.x_hi) if self.clip_x0 else None
        if sampler == "ancestral":
            x = self.diffusion.sample_ancestral(model_fn, shape, gens, cond.device, steps=steps, clip=clip)
        else:
            x = self.diffusion.sample_ddim(
                model_fn, shape, gens, cond.device, steps=steps or 50, eta=self.eta, clip=clip
            )
        return x.view(b, n_samples, self.n_genes)

    def predict_expression(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean of `n_samples` samples per spot, in the protocol's target space."""
        x = self.sample(
            batch["features"][self.key], batch["index"], self.n_samples, self.sampler, self.sample_steps
        )
        return self.from_model_space(x.mean(dim=1))

    # ---- validation (never the test fold) ------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        target = batch["expression"].float()
        n = int(target.shape[0])
        net = self.sampling_net()
        gens = spot_generators(batch["index"], self.sample_seed, STREAM_VAL_LOSS, target.device)
        draws = randn((n, self.n_genes + 1), gens, target.device)  # per spot: a t draw and the noise
        t = (torch.special.ndtr(draws[:, 0]) * self.diffusion.num_timesteps).long()
        t = t.clamp(0, self.diffusion.num_timesteps - 1)
        with torch.no_grad():
            loss = self.diffusion_loss(batch, net, t, draws[:, 1:])["loss"]
        self.log("val/loss", loss, sync_dist=True, batch_size=n)
        if self.val_metric == "loss":
            self.log("val/mse", loss, sync_dist=True, batch_size=n, prog_bar=True)
            return
        x = self.sample(
            batch["features"][self.key],
            batch["index"],
            self.val_samples,
            "ddim",
            self.val_steps,
            STREAM_VAL_SAMPLE,
        )
        pred = self.from_model_space(x.mean(dim=1))
        self.log("val/mse", F.mse_loss(pred, target), sync_dist=True, batch_size=n, prog_bar=True)
        self.log("val/mae", F.l1_loss(pred, target), sync_dist=True, batch_size=n)

    def weights_id(self) -> str:
        return self._weights_id or str(self.weights)
