"""`stflow`: STFlow (Huang et al., ICML 2025) - whole-slide flow matching from a ZINB prior.

Training (the authors' `stflow/app/flow/train.py`): a batch is `crops_per_step` spatial crops of a
slide (a random spot and its nearest max(2, int(u * n)) spots, u ~ U(0, 1); their
`patch_distribution uniform`, their batch of 2) with its own k-NN graph; each crop gets its own t ~ U(0, 1) and prior draw x0, x_t = (1 - t) x0 +
t x1, and the spatial transformer (model.py) predicts x1 from x_t, the frozen histology features
and positions; loss = MSE on the real spots. Adam, gradient-norm clip 1.0.

Prediction: x0 from the prior, Euler steps over linspace(0.01, 1, 5) on the whole slide, averaged
over `n_samples` draws (the authors draw one). The noise comes from a CPU `torch.Generator` seeded
from `sample_seed` and the global indices of the batch's spots, so a slide gets the same prediction
under DDP and in one process, whatever the padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from baselines.stflow.model import STFlowNet
from baselines.stflow.prior import ZINBPrior, euler_sample, interpolate
from stbench.data.context import spot_graph
from stbench.data.features import encoder_dim, feature_key, provider_weights_id
from stbench.methods.base import BatchRequirements, Method
from stbench.methods.sampling import group_generator

K_NEIGHBOURS = 8  # the authors' n_neighbors; the DataModule's graph must contain every spot's 8-NN
KNN_GRAPH = {"kind": "knn", "k": K_NEIGHBOURS}
CROPS = ("uniform", "none")


def knn_graph(coords: torch.Tensor) -> torch.Tensor:
    """The k-NN graph over these spots (the DataModule's builder), on their device."""
    xy = coords.detach().cpu().numpy().astype(np.float64)
    return torch.from_numpy(spot_graph(xy, KNN_GRAPH)).to(coords.device)


def complete_knn(edges: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """`edges` if every spot keeps its k nearest spots of the batch in them, else the k-NN graph rebuilt
    over the batch's spots.

    Neighbours are each spot's k nearest spots among the rows it is given (the authors' rule). The
    DataModule's slide graph has them for whole slides; restricted to a subset (validation spots
    held out of training slides) it loses most of them, so the graph is rebuilt over the subset with
    the same builder - still within one slide."""
    n = coords.shape[0]
    need = min(K_NEIGHBOURS, n - 1)
    if n < 2 or (edges.numel() and int(torch.bincount(edges[0], minlength=n).min()) >= need):
        return edges
    return knn_graph(coords)


class STFlow(Method):
    name = "stflow"
    task = "expression"
    # HEST-Bench features: 224 px tiles of 112 um (0.5 um/px), embedded once by the frozen encoder.
    requires = BatchRequirements(
        image=False, features=("encoder",), whole_slide=True, graph=KNN_GRAPH,
        patch={"out_px": 224, "crop_um": 112.0},
    )  # fmt: skip

    def __init__(
        self,
        n_genes: int,
        genes: Sequence[str] | None = None,
        encoder: str = "uni",
        weights: str = "default",
        encoder_overrides: dict[str, Any] | None = None,
        hidden: int = 128,
        edge_hidden: int = 128,
        layers: int = 4,
        heads: int = 4,
        dropout: float = 0.2,
        attn_dropout: float = 0.2,
        mlp_ratio: float = 4.0,
        n_neighbors: int = K_NEIGHBOURS,
        non_negative: bool | None = None,
        prior_total_count: float = 1.0,
        prior_logits: float = 0.1,
        prior_zi_logits: float = 0.0,
        sample_steps: int = 5,
        t_start: float = 0.01,
        n_samples: int = 1,
        sample_seed: int = 0,
        crop: str = "uniform",
        crops_per_step: int = 2,
        min_crop: int = 2,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        clip_norm: float | None = 1.0,
        mean_init: bool = False,
        in_dim: int | None = None,
    ) -> None:
        super().__init__(n_genes, genes, lr=lr, weight_decay=weight_decay)
        if crop not in CROPS:
            raise ValueError(f"stflow: crop must be one of {CROPS}, got {crop!r}")
        if not 1 <= n_neighbors <= K_NEIGHBOURS:
            raise ValueError(
                f"stflow: n_neighbors must be in 1..{K_NEIGHBOURS} (the graph's k), got {n_neighbors}"
            )
        if n_samples < 1 or crops_per_step < 1:
            raise ValueError("stflow: n_samples and crops_per_step must be >= 1")
        self.save_hyperparameters()
        self.key = feature_key(encoder)
        self.weights, self._weights_id = weights, None
        dim = int(in_dim) if in_dim is not None else encoder_dim(encoder, encoder_overrides)
        self.net = STFlowNet(
            dim, n_genes, hidden, edge_hidden, layers, heads, dropout, attn_dropout, mlp_ratio, n_neighbors
        )
        self.prior = ZINBPrior(prior_total_count, prior_logits, prior_zi_logits)
        self.non_negative = non_negative
        self.sample_steps, self.t_start = int(sample_steps), float(t_start)
        self.n_samples, self.sample_seed = int(n_samples), int(sample_seed)
        self.crop, self.crops_per_step, self.min_crop = crop, int(crops_per_step), int(min_crop)
        self.clip_norm, self.mean_init = clip_norm, mean_init
        self.net.relu_out.fill_(True if non_negative is None else bool(non_negative))

    # ---- setup -------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None:
            self._weights_id = provider_weights_id(dm, self.key)

    def on_fit_start(self) -> None:
        """`non_negative: null`: ReLU'd outputs (the paper, log1p targets) unless a training target
        is negative (another protocol's target space). `mean_init` (stbench convention, off in the
        paper config): every layer's gene head starts at the training-target mean. Both look at
        training spots only."""
        dm = self.trainer.datamodule
        if self.non_negative is None:
            low = min(float(b["expression"][b["mask"].bool()].min()) for b in dm.train_dataloader())
            self.net.relu_out.fill_(low >= 0)
        if self.mean_init:
            self.init_gene_bias(torch.from_numpy(dm.train_target_mean()).float())

    def init_gene_bias(self, mean: torch.Tensor) -> None:
        """Every layer's gene head outputs `mean` when its input weights are zero: the prediction
        (the mean over layers) starts near the mean predictor."""
        with torch.no_grad():
            for blk in self.net.blocks:
                blk.gene_head[-2].bias.copy_(mean.to(blk.gene_head[-2].bias))

    # ---- batches -----------------------------------------------------------------------------------
    def real_rows(self, batch: dict[str, Any], graph: bool = True) -> dict[str, torch.Tensor]:
        """The batch's real rows: features, coords, (targets) and, with `graph`, the k-NN graph over
        them (the batch's own, renumbered, or rebuilt when it misses neighbours: `complete_knn`)."""
        feats = batch["features"][self.key].float()
        n = feats.shape[0]
        mask = batch.get("mask")
        mask = torch.ones(n, dtype=torch.bool, device=feats.device) if mask is None else mask.bool()
        keep = torch.nonzero(mask, as_tuple=True)[0]
        if "edge_index" not in batch:
            raise ValueError("stflow needs the spot graph (batch['edge_index']); declare requires.graph")
        local = torch.full((n,), -1, dtype=torch.long, device=feats.device)
        local[keep] = torch.arange(keep.numel(), device=feats.device)
        edges = local[batch["edge_index"].long().to(feats.device)]
        if edges.numel() and bool((edges < 0).any()):
            raise ValueError("stflow: batch['edge_index'] links a padding row")
        out = {
            "keep": keep,
            "n": torch.tensor(n),
            "features": feats[keep],
            "coords": batch["coords"].float()[keep],
        }
        if graph:
            out["edges"] = complete_knn(edges, out["coords"])
        if "expression" in batch:
            out["expression"] = batch["expression"].float()[keep]
        return out

    def _generator(self, batch: dict[str, Any], keep: torch.Tensor) -> torch.Generator:
        """CPU generator from the spots' global indices: the same noise for a slide on any rank."""
        return group_generator(
            batch["index"][keep.to(batch["index"].device)], self.sample_seed, "stflow:predict"
        )

    # ---- prediction --------------------------------------------------------------------------------
    def sample(self, rows: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """One Euler-sampled x1 for the real rows (n_real, G)."""
        feats, coords, edges = rows["features"], rows["coords"], rows["edges"]
        x0 = self.prior.sample((feats.shape[0], self.n_genes), generator, device=feats.device)

        def predict_x1(x: torch.Tensor, t: float) -> torch.Tensor:
            return self.net(x, feats, coords, t, edges)

        return euler_sample(predict_x1, x0, self.sample_steps, self.t_start)

    def predict_expression(self, batch: dict[str, Any]) -> torch.Tensor:
        rows = self.real_rows(batch)
        g = self._generator(batch, rows["keep"])
        mean = sum(self.sample(rows, g) for _ in range(self.n_samples)) / self.n_samples
        out = mean.new_zeros(int(rows["n"]), self.n_genes)
        out[rows["keep"]] = mean
        return out

    # ---- training ----------------------------------------------------------------------------------
    def crop_rows(self, coords: torch.Tensor) -> torch.Tensor:
        """A spatial crop: a random spot and its nearest max(min_crop, int(u * n)) spots, u ~ U(0, 1)."""
        n = coords.shape[0]
        if self.crop == "none":
            return torch.arange(n, device=coords.device)
        m = min(n, max(self.min_crop, int(n * float(torch.rand(())))))
        if m >= n:
            return torch.arange(n, device=coords.device)
        centre = int(torch.randint(n, ()))
        dist = (coords - coords[centre]).norm(dim=-1)
        return torch.sort(torch.argsort(dist, stable=True)[:m]).values

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        rows = self.real_rows(batch, graph=self.crop == "none")
        feats, coords, x1 = rows["features"], rows["coords"], rows["expression"]
        parts: dict[str, list[torch.Tensor]] = {"rows": [], "edges": [], "t": []}
        offset = 0
        for _ in range(self.crops_per_step):
            sel = self.crop_rows(coords)
            # the crop's own k-NN graph, as the authors rebuild it on every crop
            edges = rows["edges"] if self.crop == "none" else knn_graph(coords[sel])
            parts["rows"].append(sel)
            parts["edges"].append(edges + offset)
            parts["t"].append(torch.rand(()).expand(sel.numel()))
            offset += sel.numel()
        sel = torch.cat(parts["rows"])
        t = torch.cat(parts["t"]).to(coords.device)
        target = x1[sel]
        x0 = self.prior.sample(tuple(target.shape), device=target.device)
        x_t = interpolate(x0, target, t[:, None])
        pred = self.net(x_t, feats[sel], coords[sel], t, torch.cat(parts["edges"], dim=1))
        return F.mse_loss(pred, target)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=1)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def configure_gradient_clipping(
        self,
        optimizer: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """The authors clip the gradient norm at 1.0 (`clip_norm`); a trainer setting overrides it."""
        clip = gradient_clip_val if gradient_clip_val is not None else self.clip_norm
        if clip:
            self.clip_gradients(
                optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm or "norm"
            )

    def weights_id(self) -> str:
        return self._weights_id or str(self.weights)
