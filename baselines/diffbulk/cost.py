"""DiffBulk cost report: parameters and FLOPs of the stage I network, trainable size of stage II.

Paper (Sec. IV-B-3): "approximately 122.4M parameters [U-Net with the integrated gene encoder],
approximately 25.66 GFLOPs per 224x224 tile", stage II "2.5M trainable parameters".

FLOPs are measured with torch.utils.flop_counter.FlopCounterMode, which counts matmul / conv /
attention matmuls only (no element-wise ops) at 2 FLOPs per multiply-add; MACs = FLOPs / 2 is the
convention of many papers (and of EDM2's count_flops.py, which also adds element-wise ops). Both are
reported and compared with the paper's figure. `device="meta"` runs the same forward on shape-only
tensors: FlopCounterMode counts from shapes, so the numbers are identical (tested on the tiny
config) and the paper-size count takes seconds instead of ~40 s of CPU compute.

Blind spot: attention inside nn.MultiheadAttention (the gene encoder) runs on CPU through SDPA's CPU
kernel, which FlopCounterMode does not count, so a gene encoder's 4 n^2 d attention FLOPs per block
(~0.6 GFLOPs for 541 genes, 2 blocks + pooling) are missing; the U-Net's own attention uses explicit
matmuls and is counted.

Run `python -m baselines.diffbulk.cost [cpu|meta]` to print the paper configuration's report.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from baselines.diffbulk.edm2.precond import Precond
from baselines.diffbulk.edm2.unet import PAPER_UNET, tap_channels

PAPER_PARAMS = 122.4e6
PAPER_GFLOPS = 25.66
PAPER_STAGE2_PARAMS = 2.5e6
MATCH_TOLERANCE = 0.05  # a convention "matches" the paper when within 5% of its figure

# The authors' gene encoder (Pretrain/training/gene_encoder.py): per-panel embedding tables for the
# three panels (460 + 541 + 538 rows x 256), two pre-LN transformer blocks (8 heads, FFN 4x) and an
# attention pool with one query; the 256 -> 512 MPConv is inside the U-Net.
AUTHORS_PANELS = (460, 541, 538)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def authors_gene_encoder_params(dim: int = 256, depth: int = 2, table_rows: int = sum(AUTHORS_PANELS)) -> int:
    """Parameters of the authors' GeneModel by formula (nn.MultiheadAttention has a biased in/out
    projection: 4 d^2 + 4 d; LayerNorm 2 d; FFN 8 d^2 + 5 d; pooling query d)."""
    mha = 4 * dim * dim + 4 * dim
    block = 2 * (2 * dim) + mha + (dim * 4 * dim + 4 * dim) + (4 * dim * dim + dim)
    return table_rows * dim + depth * block + (dim + mha)


def _gene_encoder_input(encoder: nn.Module, n_genes: int, device: str) -> tuple[torch.Tensor, ...]:
    """(gene_ids, values) for an encoder with the (gene_ids, values, pad_mask) interface (id 0 = pad)."""
    n_vocab = int(encoder.n_vocab)
    n = min(n_genes, n_vocab - 1)
    ids = torch.arange(1, n + 1, device=device).unsqueeze(0)
    return ids, torch.ones(1, n, device=device)


def build_network(unet_kwargs: Mapping[str, object], device: str = "cpu") -> Precond:
    """The preconditioned network; on "meta" it is built shape-only (no weight memory, no init cost)."""
    if device == "meta":
        with torch.device("meta"):
            return Precond(**unet_kwargs)
    return Precond(**unet_kwargs).to(device)


def measure_flops(
    net: Precond,
    tile_px: int = 224,
    gene_encoder: nn.Module | None = None,
    gene_input: tuple[torch.Tensor, ...] | None = None,
    n_genes: int = 541,
) -> dict[str, float]:
    """FlopCounterMode totals for ONE tile through `net` (batch 1, eval mode, on net's device).

    With a gene encoder, the conditional forward is measured (encoder + U-Net); otherwise the
    unconditional one (the stage II feature pass). Returns {"total": flops, op name: flops}.
    """
    device = str(net.logvar_linear.weight.device)
    net = net.eval()
    # The gene encoder always runs on CPU (it is small, and its input checks need real values).
    enc = copy.deepcopy(gene_encoder).eval().cpu().requires_grad_(False) if gene_encoder is not None else None
    x = torch.zeros(1, net.img_channels, tile_px, tile_px, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        cond = None
        if enc is not None:
            args = gene_input if gene_input is not None else _gene_encoder_input(enc, n_genes, "cpu")
            cond = enc(*(a.cpu() for a in args)).to(device)
        net(x, torch.ones(1, device=device), cond)
    by_op = {str(k): float(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return {"total": float(counter.get_total_flops()), **by_op}


def cost_report(
    unet_kwargs: Mapping[str, object] = PAPER_UNET,
    gene_encoder: nn.Module | None = None,
    tile_px: int = 224,
    device: str = "cpu",
    n_genes: int = 541,
) -> dict:
    """Parameters (U-Net + uncertainty head, + optional gene encoder) and FLOPs / MACs per tile,
    with the paper's figures and which FLOP convention (if any) matches them.

    device "cpu" runs a real forward (~40 s for the paper configuration on 2 cores); "meta" gives
    the same counts from shapes alone in a few seconds. A gene encoder is counted on a CPU copy.
    """
    net = build_network(unet_kwargs, device)
    p_net = count_params(net)
    p_gene = count_params(gene_encoder) if gene_encoder is not None else 0
    flops = measure_flops(net, tile_px, gene_encoder, None, n_genes)
    gflops = flops["total"] / 1e9
    gmacs = gflops / 2
    matches = [
        name
        for name, v in (("flops", gflops), ("macs", gmacs))
        if abs(v / PAPER_GFLOPS - 1) <= MATCH_TOLERANCE
    ]
    return {
        "tile_px": tile_px,
        "measured_on": device,
        "params_network": p_net,
        "params_unet": count_params(net.unet),
        "params_uncertainty_head": count_params(net.logvar_linear),
        "params_gene_encoder": p_gene,
        "params_total": p_net + p_gene,
        "params_network_plus_authors_gene_encoder": p_net + authors_gene_encoder_params(),
        "gflops_torch": gflops,
        "gmacs": gmacs,
        "gflops_by_op": {k: v / 1e9 for k, v in flops.items() if k != "total"},
        "paper_params": PAPER_PARAMS,
        "paper_gflops": PAPER_GFLOPS,
        "paper_gflops_matches": matches[0] if matches else "neither",
        "ratio_gflops_to_paper": gflops / PAPER_GFLOPS,
        "ratio_gmacs_to_paper": gmacs / PAPER_GFLOPS,
    }


def stage2_params(
    n_genes: int,
    taps: str = "decoder",
    unet_kwargs: Mapping[str, object] = PAPER_UNET,
    fm_dim: int = 512,
    width: int = 128,
    fusion: str = "gated",
    diff_proj: bool = True,
) -> dict:
    """Trainable stage II parameters: MSFE-Net over the tapped channels + fusion + linear decoder.

    Built from baselines/diffbulk/msfe.py and fusion.py when they import; otherwise (or as a check)
    by formula for the gated fusion: per tap 9 C_s w + w (conv) + 2 w (GroupNorm); gate
    (fm + n w) fm + fm; Linear on z_diff (n w) fm + fm; decoder fm G + G.
    """
    chans = tap_channels(int(unet_kwargs["img_resolution"]), tuple(unet_kwargs["channels"]), taps)
    n = len(chans)
    msfe_p = sum(9 * c * width + width + 2 * width for c in chans.values())
    diff_dim = n * width
    fuse_p = (fm_dim + diff_dim) * fm_dim + fm_dim + ((diff_dim * fm_dim + fm_dim) if diff_proj else 0)
    formula = msfe_p + fuse_p + fm_dim * n_genes + n_genes
    result = {
        "n_genes": n_genes,
        "taps": taps,
        "tap_channels": chans,
        "formula": formula,
        "source": "formula",
    }
    try:
        from baselines.diffbulk.fusion import FusedRegressor, Fusion, count_trainable
        from baselines.diffbulk.msfe import MSFENet
    except ImportError:
        result["params"] = formula
        return result
    msfe = MSFENet(chans, width=width)
    head = FusedRegressor(Fusion(fusion, fm_dim, msfe.out_dim, diff_proj=diff_proj), n_genes)
    result.update(params=count_trainable([msfe, head]), source="modules (msfe.py, fusion.py)")
    return result


def format_report(report: Mapping, stage2: Mapping | None = None) -> str:
    """Human-readable summary for the command line and the method card."""
    r = report
    lines = [
        f"DiffBulk stage I, one {r['tile_px']}x{r['tile_px']} tile (FlopCounterMode, measured on {r['measured_on']}):",
        f"  parameters: network {r['params_network']:,} (U-Net {r['params_unet']:,} + uncertainty head "
        f"{r['params_uncertainty_head']:,}); gene encoder {r['params_gene_encoder']:,}; total {r['params_total']:,}",
        f"  with the authors' per-panel gene encoder: {r['params_network_plus_authors_gene_encoder']:,} "
        f"(paper: ~{r['paper_params'] / 1e6:.1f}M)",
        f"  compute: {r['gflops_torch']:.2f} GFLOPs (torch, 2 per multiply-add) = {r['gmacs']:.2f} GMACs; "
        f"paper: {r['paper_gflops']} 'GFLOPs' -> matches: {r['paper_gflops_matches']} "
        f"(ratios {r['ratio_gflops_to_paper']:.1f}x / {r['ratio_gmacs_to_paper']:.1f}x)",
    ]
    if stage2 is not None:
        lines.append(
            f"DiffBulk stage II trainable ({stage2['taps']} taps, {stage2['n_genes']} genes): {stage2['params']:,} "
            f"[{stage2['source']}; formula {stage2['formula']:,}] (paper: ~2.5M)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    print(format_report(cost_report(PAPER_UNET, device=dev), stage2_params(541)))
