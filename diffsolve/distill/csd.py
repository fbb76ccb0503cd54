"""Classifier Score Distillation (Yu et al. 2023, "Text-to-3D with Classifier Score Distillation"), and the
conditional / unconditional split of a guidance transform that CSD, NFSD and ISM read.

CSD keeps only the classifier part of SDS-with-CFG (paper eq. 7):

    grad = w(t) (eps(z_t; y, t) - eps(z_t; null, t)),   z_t = x + sigma n,

in VE coordinates w(sigma) (D_u - D_c) / sigma (the noise cancels). The conditional / unconditional pair
is read from the call's guidance transform (`cfg(...)` or `autoguidance(...)`: its model and its guide /
unconditional arguments), and `scale=None` uses that transform's s (diffusers form u + s (c - u)), so
CSD's gradient is exactly the guided part s (eps_c - eps_u) of the SDS + CFG gradient at the same
sigma and noise. The official repository (CVMI-Lab/Classifier-Score-Distillation) is stored here only
with its stock threestudio guidance files, so the defaults follow the paper: sigma from the noisy
distillers' range, threestudio's "sds" weighting 1 - abar. The paper's negative-prompt variant (eq. 8)
is not implemented.
"""
import math

from ..transforms import Guidance
from .base import NoisyDistiller

__all__ = ["CSD", "GuidanceParts", "guidance_parts"]


class GuidanceParts:
    """The call's denoisers split from its one guidance transform: `cond(z, sigma)` and `uncond(z, sigma)`
    (each counted as one evaluation), `guided(z, sigma)` (the transform applied), and its scale `s`."""

    def __init__(self, call, who):
        transforms = call.transforms
        if len(transforms) != 1 or not isinstance(transforms[0], Guidance):
            raise ValueError(f"{who} needs exactly one guidance transform (cfg(...) or autoguidance(...)) to "
                             f"name the conditional / unconditional pair, got transforms {list(transforms)!r}")
        g = transforms[0]
        self.s, self.extra = g.s, call.extra_args
        self._cond = call.denoiser(transforms=())
        self._guide = None if g.guide is None else call.denoiser(transforms=(), model=g.guide)
        self._uncond_args = None if g.uncond is None else {**call.extra_args, **g.uncond}
        self._guided = call.denoiser()

    def cond(self, z, sigma):
        return self._cond(z, sigma, **self.extra).to(z.dtype)

    def uncond(self, z, sigma):
        if self._guide is not None:
            return self._guide(z, sigma, **self.extra).to(z.dtype)
        return self._cond(z, sigma, **self._uncond_args).to(z.dtype)

    def guided(self, z, sigma):
        return self._guided(z, sigma, **self.extra).to(z.dtype)


def guidance_parts(call, who):
    return GuidanceParts(call, who)


class CSD(NoisyDistiller):
    """grad = w(sigma) scale (D_u(z; sigma) - D_c(z; sigma)) / sigma, z = x + sigma n; `scale=None` takes the
    guidance transform's s. Needs a guidance transform (a ValueError otherwise). Two model evaluations."""

    name = "CSD"

    def __init__(self, model, *, scale=None, weighting="sds", **kw):
        super().__init__(model, weighting=weighting, **kw)
        if scale is not None and not math.isfinite(scale):
            raise ValueError(f"scale must be a number or None, got {scale!r}")
        self.scale = None if scale is None else float(scale)

    def _grad(self, x, call):
        parts = guidance_parts(call, self.name)
        sigma, s, n, z = self.noised(x, call)
        scale = parts.s if self.scale is None else self.scale
        return self.weighted(sigma, scale * (parts.uncond(z, sigma) - parts.cond(z, sigma)) / s)
