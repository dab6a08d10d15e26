"""EDM2 (Karras et al., CVPR 2024) stage I network of DiffBulk, written from the published facts."""

from .ema import PowerFunctionEMA, posthoc_reconstruct, solve_posthoc_coefficients, std_to_exp
from .loss import EDM2Loss, loss_weight, uncertainty_loss
from .optim import inverse_sqrt_lr, make_adam
from .precond import Precond, extract_features
from .sampler import edm_sample, sigma_steps
from .unet import PAPER_UNET, TINY_UNET, UNet, tap_channels

__all__ = [
    "PAPER_UNET",
    "TINY_UNET",
    "EDM2Loss",
    "PowerFunctionEMA",
    "Precond",
    "UNet",
    "edm_sample",
    "extract_features",
    "inverse_sqrt_lr",
    "loss_weight",
    "make_adam",
    "posthoc_reconstruct",
    "sigma_steps",
    "solve_posthoc_coefficients",
    "std_to_exp",
    "tap_channels",
    "uncertainty_loss",
]
