"""DPM-Solver++ steps (Lu et al. 2022) in VE coordinates, with t = -log sigma and h = t_next - t."""
import math

from ..sampling import Solver, sample
from .registry import register

__all__ = ["DPMpp2M", "sample_dpmpp_2m"]


class DPMpp2M(Solver):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): x' = (sigma'/sigma) x - expm1(-h) D_hat with
    D_hat = (1 + 1/(2r)) D_i - D_{i-1} / (2r), r = h_last / h; first order on the first step and on the
    last step to sigma = 0. Global order 2."""

    name, order, history, evaluates_at_start = "dpmpp_2m", 2, 1, True

    def step(self, s):
        d = s.denoise(s.x, s.sigma)
        if s.sigma_next == 0:
            return d
        h = math.log(s.sigma / s.sigma_next)
        d_hat = d
        if s.history:
            r = math.log(s.history[-1].sigma / s.sigma) / h
            d_hat = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * s.history[-1].denoised
        return (s.sigma_next / s.sigma) * s.x - math.expm1(-h) * d_hat


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, **loop):
    """k-diffusion's `sample_dpmpp_2m` on diffsolve's loop."""
    return sample(DPMpp2M(), model, x, sigmas, extra_args, callback, disable, **loop)


register("dpmpp_2m", DPMpp2M)
