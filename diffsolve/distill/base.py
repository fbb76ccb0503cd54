"""What every distiller shares: a gradient for x = g(theta), the detached-target loss, NFE, sigma draws.

Conventions (stated once): `grad(x)` has x's shape; `loss(x)` = 0.5 * sum over points and dims of
|x - stopgrad(x - grad)|^2, so d loss / d x = grad exactly and gradient descent with lr = 1 on MSD's
loss is the mean-shift step x <- mean(y). Pass `reduction="mean"` to divide by the batch as
threestudio does. Every random draw comes from the `generator` given to the call.
"""
import math

import torch

from ..denoisers import append_dims
from ..solvers import SampleInfo, counted_denoiser

SIGMA_SAMPLINGS = ("karras", "log_uniform")
WEIGHTINGS = ("uniform", "sds")


class Distiller:
    """Base: subclasses implement `_grad(x, generator, **kw)`; NFE is accumulated in `self.nfe`."""

    def __init__(self, model, transforms=(), extra_args=None):
        self.model, self.transforms = model, list(transforms)
        self.extra_args = {} if extra_args is None else dict(extra_args)
        self.nfe = 0.0        # model evaluations since construction, in units of the batch given to grad
        self.last_nfe = 0.0   # those of the last grad call

    def denoiser(self, batch, info, transforms=None, model=None):
        """The model with the transforms applied, its evaluations counted in `info` per `batch` rows."""
        return counted_denoiser(self.model if model is None else model,
                                self.transforms if transforms is None else transforms, batch, info)[0]

    def extra(self, repeats=1):
        """Condition arguments repeated for `repeats` copies of each row (batch dims only)."""
        if repeats == 1:
            return self.extra_args
        return {k: v.repeat_interleave(repeats, 0) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] > 1
                else v for k, v in self.extra_args.items()}

    @torch.no_grad()
    def grad(self, x, generator=None, **kw):
        """The descent direction for x (same shape); step along -grad to climb the density."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__}")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or inf")
        info = SampleInfo()
        g = self._grad(x.detach(), generator, info, **kw)
        self.last_nfe = info.nfe
        self.nfe += info.nfe
        return g.to(x.dtype)

    def loss(self, x, generator=None, reduction="sum", **kw):
        """0.5 |x - stopgrad(x - grad)|^2 summed over dims; over points "sum" (default) or "mean"."""
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        target = (x - self.grad(x, generator, **kw)).detach()
        total = 0.5 * ((x - target) ** 2).sum()
        return total / x.shape[0] if reduction == "mean" else total

    def _grad(self, x, generator, info, **kw):
        raise NotImplementedError


def euler_inversion(den, x, levels, extra_args):
    """Deterministic DDIM (Euler) inversion: carry x, taken as the sample at levels[0], up the ascending
    `levels` (floats or per-row [B] tensors) with z <- z + (s1 - s0) (z - D(z; s0)) / s0. Returns the
    list of z at every level (the first is x itself)."""
    trajectory = [x]
    for s0, s1 in zip(levels[:-1], levels[1:]):
        z = trajectory[-1]
        s0_rows = s0 if isinstance(s0, torch.Tensor) else s0 * z.new_ones(z.shape[0])
        d = den(z, s0_rows, **extra_args).to(z.dtype)
        trajectory.append(z + append_dims((s1 - s0) / s0, z.ndim) * (z - d))
    return trajectory


def sigma_from_uniform(u, sigma_min, sigma_max, sampling="karras", rho=7.0):
    """Map u in [0, 1] to sigma: "karras" is the continuous EDM rho-grid (u = 0 at sigma_max),
    "log_uniform" is uniform in log sigma."""
    if sampling == "karras":
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (hi + u * (lo - hi)) ** rho
    if sampling == "log_uniform":
        return torch.exp(math.log(sigma_max) + u * (math.log(sigma_min) - math.log(sigma_max)))
    raise ValueError(f"sigma_sampling must be one of {SIGMA_SAMPLINGS}, got {sampling!r}")


def weight(sigma, weighting):
    """w(sigma): "uniform" is 1; "sds" is DreamFusion's sigma_VP^2 = 1 - abar = sigma^2 / (1 + sigma^2)."""
    if callable(weighting):
        return weighting(sigma)
    if weighting == "uniform":
        return torch.ones_like(sigma)
    if weighting == "sds":
        return sigma ** 2 / (1 + sigma ** 2)
    raise ValueError(f"weighting must be one of {WEIGHTINGS} or a callable, got {weighting!r}")


class NoisyDistiller(Distiller):
    """Shared by SDS, VSD and SDI: sigma drawn per row from a range, a weighting w(sigma)."""

    def __init__(self, model, *, sigma_min=0.002, sigma_max=5.0, sigma_sampling="karras", rho=7.0,
                 weighting="uniform", transforms=(), extra_args=None):
        super().__init__(model, transforms, extra_args)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        sigma_from_uniform(torch.zeros(1), 1.0, 2.0, sigma_sampling, rho)  # validates the name
        weight(torch.ones(1), weighting)
        self.sigma_min, self.sigma_max, self.sigma_sampling, self.rho = sigma_min, sigma_max, sigma_sampling, rho
        self.weighting = weighting

    def draw_sigma(self, x, generator):
        u = torch.rand(x.shape[0], generator=generator, dtype=torch.float64).to(x.device)
        return sigma_from_uniform(u, self.sigma_min, self.sigma_max, self.sigma_sampling, self.rho).to(x.dtype)

    def weighted(self, sigma, g):
        return append_dims(weight(sigma, self.weighting), g.ndim) * g
