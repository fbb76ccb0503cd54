"""DPM-Solver++ steps (Lu et al. 2022) in VE coordinates, with t = -log sigma and h = t_next - t."""
import math

from ..sampling import Solver, sample
from .registry import register

__all__ = ["DPMpp2M", "sample_dpmpp_2m"]


class DPMpp2M(Solver):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): x' = (sigma'/sigma) x - expm1(-h) D_hat with
    D_hat = (1 + 1/(2r)) D_i - D_{i-1} / (2r), r = h_last / h; first order on the first step and on the
    last step to sigma = 0. Global order 2. With CFG++ the noise part e^{-h} (x - D_i) of the update uses the
    unconditional prediction (x' gains e^{-h} (D_i - D_u)); the history keeps the guided predictions."""

    name, order, history, evaluates_at_start, splits_data_noise = "dpmpp_2m", 2, 1, True, True

    def step(self, s):
        d = s.denoise(s.x, s.sigma)
        if s.sigma_next == 0:
            return d
        h = math.log(s.sigma / s.sigma_next)
        d_hat = d
        if s.history:
            r = math.log(s.history[-1].sigma / s.sigma) / h
            d_hat = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * s.history[-1].denoised
        x = (s.sigma_next / s.sigma) * s.x - math.expm1(-h) * d_hat
        n = s.noise_direction(d)
        # CFG++: the update's noise part e^{-h} (x - D) taken with the unconditional D (`renoised`'s rule)
        return x if n is d else x + (s.sigma_next / s.sigma) * (d - n)


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, **loop):
    """k-diffusion's `sample_dpmpp_2m` on diffsolve's loop."""
    return sample(DPMpp2M(), model, x, sigmas, extra_args, callback, disable, **loop)


register("dpmpp_2m", DPMpp2M)
