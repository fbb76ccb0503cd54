"""Noise-Free Score Distillation (Katzir et al. 2023, ICLR 2024), in VE coordinates.

The paper splits the CFG prediction eps_u + s delta_C into a condition direction delta_C = eps_c - eps_u
and the unconditional eps_u = delta_D + delta_N (an in-domain direction and the noise), and distils
only the first two (paper eq. 9 and 10):

    delta_D = eps(z_t; null, t)                         if t < 200 (small noise: eps_u ~ delta_D)
            = eps(z_t; null, t) - eps(z_t; p_neg, t)    otherwise,
    grad    = w(t) (delta_D + s delta_C),

with p_neg the negative prompt "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull,
dark, low-resolution, gloomy" and the nominal scale s = 7.5. In VE coordinates (eps = (z - D) / sigma):
delta_C = (D_u - D_c) / sigma, delta_D = (z - D_u) / sigma below the threshold, (D_neg - D_u) / sigma above.
The threshold t = 200 is Stable Diffusion's timestep; here it is its sigma, `sd_sigmas()[200]` (0.572),
unless `sigma_threshold` is given.

The negative: `negative_model=` (a model called like the conditional one) or `negative=` (condition
overrides, e.g. the negative prompt's embeddings). With neither, the null condition stands for the
negative prompt, so delta_D = 0 above the threshold. That is the reading used on the class-conditional
toys, which have no "unrealistic / low quality" class: the null class is the only condition that names
no content, and with it NFSD above the threshold is CSD at scale s. The studies also run NFSD with the
weak model as the negative (it is what "blurry, low quality" describes: a worse model of the same data).
"""
import math

from ..denoisers import append_dims
from .base import NoisyDistiller
from .csd import guidance_parts
from .sjc import sd_sigmas

__all__ = ["NFSD"]

SD_T_THRESHOLD = 200


class NFSD(NoisyDistiller):
    """grad = w(sigma) (delta_D + s delta_C) as above; `scale=None` takes the guidance transform's s (the
    paper's 7.5 is the diffusers-form scale). Needs a guidance transform. Cost: 2 model evaluations, 3
    when a negative is given (evaluated on every row, used above the threshold)."""

    name = "NFSD"

    def __init__(self, model, *, scale=None, negative_model=None, negative=None, sigma_threshold=None,
                 weighting="sds", **kw):
        super().__init__(model, weighting=weighting, **kw)
        if negative_model is not None and negative is not None:
            raise ValueError("give negative_model= or negative= (condition overrides), not both")
        if negative is not None and not isinstance(negative, dict):
            raise ValueError(f"negative must be a dict of condition overrides, got {negative!r}")
        if scale is not None and not math.isfinite(scale):
            raise ValueError(f"scale must be a number or None, got {scale!r}")
        thr = float(sd_sigmas()[SD_T_THRESHOLD]) if sigma_threshold is None else float(sigma_threshold)
        if not thr > 0:
            raise ValueError(f"sigma_threshold must be > 0, got {sigma_threshold!r}")
        self.scale = None if scale is None else float(scale)
        self.negative_model, self.negative, self.sigma_threshold = negative_model, negative, thr

    def _negative(self, call, z, sigma):
        if self.negative_model is not None:
            return call.denoiser(transforms=(), model=self.negative_model)(z, sigma, **call.extra_args).to(z.dtype)
        return call.denoiser(transforms=())(z, sigma, **{**call.extra_args, **self.negative}).to(z.dtype)

    def _grad(self, x, call):
        parts = guidance_parts(call, self.name)
        sigma, s, n, z = self.noised(x, call)
        d_u, d_c = parts.uncond(z, sigma), parts.cond(z, sigma)
        delta_c = (d_u - d_c) / s
        low = append_dims(sigma < self.sigma_threshold, x.ndim)
        delta_d = (z - d_u) / s * low
        if self.negative_model is not None or self.negative is not None:  # evaluated on every row (simple, counted)
            delta_d = delta_d + (self._negative(call, z, sigma) - d_u) / s * ~low
        scale = parts.s if self.scale is None else self.scale
        return self.weighted(sigma, delta_d + scale * delta_c)
