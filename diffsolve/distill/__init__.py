"""Distillation adapters: a frozen denoiser turned into a gradient for x = g(theta).

Each offers `grad(x, generator)` and `loss(x, generator)` (detached target; d loss / d x = grad),
and counts model evaluations in `nfe` / `last_nfe`.
"""
from .bandwidth import AdaptiveBandwidth, constant, linear_decay, should_stop
from .base import Distiller, sigma_from_uniform
from .msd import MSD, mean_shift_oracle
from .sdi import SDI
from .sds import SDS
from .vsd import VSD, DenoisingTrainer, ideal_variational

__all__ = ["AdaptiveBandwidth", "DenoisingTrainer", "Distiller", "MSD", "SDI", "SDS", "VSD", "constant",
           "ideal_variational", "linear_decay", "mean_shift_oracle", "should_stop", "sigma_from_uniform"]
