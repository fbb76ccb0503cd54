"""Distillation adapters: a frozen denoiser turned into a gradient for x = g(theta).

Each offers `grad(x, generator)` and `loss(x, generator)` (detached target; d loss / d x = grad), counts
model evaluations in `nfe` / `last_nfe`, and follows one step protocol: an optimisation loop calls
`on_step(step, x, generator)` before each gradient (MSD's bandwidth schedule, SDI's annealing and VSD's
variational fit happen there). `make_distiller(method, model, **options)` is the one factory the studies,
text-to-2D and the threestudio-style guidance use.
"""
from .bandwidth import AdaptiveBandwidth, constant, linear_decay, should_stop
from .base import Call, Distiller, Draws, sigma_from_uniform
from .msd import MSD, mean_shift_oracle
from .sdi import SDI, OfficialSDI
from .sds import SDS
from .vsd import VSD, DenoisingTrainer, ideal_variational
from .csd import CSD
from .ism import ISM
from .nfsd import NFSD
from .sjc import SJC

__all__ = ["AdaptiveBandwidth", "Call", "DISTILLERS", "DenoisingTrainer", "Distiller", "Draws", "MSD", "SDI", "SDS",
           "VSD", "constant", "ideal_variational", "linear_decay", "make_distiller", "mean_shift_oracle", "should_stop",
           "sigma_from_uniform"]

DISTILLERS = {"sds": SDS, "msd": MSD, "vsd": VSD, "sdi": SDI, "sdi_official": OfficialSDI}
__all__ += ["OfficialSDI"]
DISTILLERS.update({"ism": ISM, "csd": CSD, "nfsd": NFSD, "sjc": SJC})
__all__ += ["CSD", "ISM", "NFSD", "SJC"]


def make_distiller(method, model, **options):
    """The distiller `method` ("sds", "msd", "vsd", "sdi") on `model` with its `options` (each class's
    keyword arguments, validated there); an unknown method is a ValueError listing the known ones."""
    if method not in DISTILLERS:
        raise ValueError(f"unknown distillation method {method!r}; known: {sorted(DISTILLERS)}")
    if method == "vsd":
        return VSD(model, options.pop("variational", None), **options)
    return DISTILLERS[method](model, **options)
