"""The LCM step (Luo et al. 2023: multistep latent consistency sampling, i.e. Song et al. 2023's multistep
consistency sampling, their Algorithm 1, in the latent space) in VE coordinates,
and the consistency-model boundary condition that makes it reproduce diffusers' `LCMScheduler` exactly.

The step: x0 = D(x, sigma), then re-noise to sigma_next with fresh noise, x' = x0 + sigma_next n
(ComfyUI's `sample_lcm`); the step to sigma = 0 returns x0.

diffusers' `LCMScheduler.step` does the same in VP coordinates (z' = sqrt(abar') x0 + sqrt(1 - abar') n is
x' = x0 + sigma' n), but its x0 is the consistency function's output, the model's x0 prediction put
through the boundary condition (Song et al. 2023, Sec. 3 and Appendix C; LCM Sec. 4):

    f(z, t) = c_skip(t) z + c_out(t) x0_hat,  c_skip = sd^2 / ((s t)^2 + sd^2),  c_out = s t / sqrt((s t)^2 + sd^2)

with t the discrete timestep, sd = 0.5 (sigma_data), s = `timestep_scaling` (10) and z = x / sqrt(1 + sigma^2)
the VP sample. To reproduce `LCMScheduler` exactly, wrap the denoiser:

    D = ConsistencyBoundary.from_scheduler(denoiser_from_unet(unet, sched), sched)
    x = sample_lcm(D, to_ve(latents, sigmas[0]), sigmas, generator=g)   # g seeded like diffusers' generator

with sigmas = the VE sigmas of `sched.timesteps` followed by 0. At timestep_scaling = 10 the boundary
condition is within ~1e-5 of the identity for t >= 19 (LCM's smallest timestep), so the bare step already
agrees to about that; with a small timestep_scaling it matters.
"""
import math

import torch

from ..denoisers import DiscreteTimesteps, append_dims, sigma_rows
from ..sampling import Solver, sample
from .registry import register

__all__ = ["LCM", "ConsistencyBoundary", "consistency_scalings", "sample_lcm"]


class LCM(Solver):
    """Multistep (latent) consistency sampling (Song et al. 2023, Algorithm 1; Luo et al. 2023):
    x' = D(x, sigma) + sigma_next n.
    It is DDIM with the eta whose noise reaches sigma_next (sigma_down = 0), so its drift on the score is
    DDIM's 1 + eta**2 = 1 + sigma**2 / (sigma**2 - sigma_next**2) (1 on the last step to sigma = 0)."""

    name, order, stochastic, evaluates_at_start = "lcm", 1, True, True

    def drift(self, sigmas, i):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        return 1.0 if sigma_next == 0 else 1.0 + sigma ** 2 / (sigma ** 2 - sigma_next ** 2)

    def step(self, s):
        d = s.denoise(s.x, s.sigma)
        if s.sigma_next == 0:
            return d
        return d + s.noise(s.sigma, s.sigma_next) * s.sigma_next


def consistency_scalings(t, sigma_data=0.5, timestep_scaling=10.0):
    """(c_skip, c_out) of the consistency boundary condition at (scaled) timestep t (Song et al. 2023,
    Appendix C; diffusers' LCM scaling): c_skip(0) = 1, c_out(0) = 0."""
    st = t * timestep_scaling
    denom = st ** 2 + sigma_data ** 2
    return sigma_data ** 2 / denom, st / denom ** 0.5


class ConsistencyBoundary(DiscreteTimesteps):
    """A denoiser put through the LCM boundary condition: D_f(x, sigma) = c_skip(t) z + c_out(t) D(x, sigma),
    z = x / sqrt(1 + sigma**2) the VP sample, t the discrete timestep of sigma (nearest in log sigma, as the
    scheduler's integer timesteps are), so that `LCM` on it equals diffusers' `LCMScheduler`."""

    def __init__(self, denoiser, alphas_cumprod, sigma_data=0.5, timestep_scaling=10.0):
        super().__init__(alphas_cumprod, quantize=True)
        if not (sigma_data > 0 and math.isfinite(sigma_data)):
            raise ValueError(f"sigma_data must be a positive number, got {sigma_data!r}")
        if not (timestep_scaling > 0 and math.isfinite(timestep_scaling)):
            raise ValueError(f"timestep_scaling must be a positive number, got {timestep_scaling!r}")
        self.denoiser, self.sigma_data, self.timestep_scaling = denoiser, float(sigma_data), float(timestep_scaling)

    @classmethod
    def from_scheduler(cls, denoiser, scheduler):
        """Read alphas_cumprod and timestep_scaling from a diffusers `LCMScheduler` (sigma_data = 0.5, its
        constant); diffusers itself is not imported."""
        return cls(denoiser, scheduler.alphas_cumprod, 0.5, getattr(scheduler.config, "timestep_scaling", 10.0))

    def forward(self, x, sigma, **cond):
        sigma = sigma_rows(sigma, x)
        c_skip, c_out = consistency_scalings(self.sigma_to_t(sigma), self.sigma_data, self.timestep_scaling)
        s = append_dims(sigma.to(torch.float64), x.ndim)
        z = x * (1 + s ** 2).rsqrt()
        out = append_dims(c_skip, x.ndim) * z + append_dims(c_out, x.ndim) * self.denoiser(x, sigma, **cond)
        return out.to(x.dtype)


def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **loop):
    """ComfyUI's `sample_lcm` on diffsolve's loop."""
    return sample(LCM(), model, x, sigmas, extra_args, callback, disable, noise_sampler=noise_sampler, **loop)


register("lcm", LCM)
