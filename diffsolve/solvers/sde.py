"""DPM-Solver++ multistep SDE steps (Lu et al. 2022, appendix: SDE-DPM-Solver++(2M); the 3M extension of
k-diffusion / ComfyUI) in VE coordinates, with h = log(sigma / sigma_next) and r the previous step's h over h.

With eta, a step is the exponential integrator of the SDE

    dx = (1 + eta) (x - D(x, sigma)) / sigma dsigma + sqrt(2 eta sigma) dW   (sigma decreasing)

for D frozen (or extrapolated) over the step: x_next = (sigma_next / sigma)^(1 + eta) x
+ (1 - e^(-(1 + eta) h)) D + ... + sigma_next sqrt(1 - e^(-2 eta h)) n, the linear factor e^(-(1 + eta) h)
being the step's h scaled by 1 + eta. The probability-flow ODE's drift is (x - D) / sigma = -sigma * score,
so the drift on the score is 1 + eta times the ODE's (`drift`); eta = 0 is the ODE.
"""
import math

from ..sampling import Solver, sample
from .registry import register

__all__ = ["DPMpp2MSDE", "DPMpp3MSDE", "sample_dpmpp_2m_sde", "sample_dpmpp_2m_sde_heun", "sample_dpmpp_3m_sde"]

SOLVER_TYPES = ("midpoint", "heun")


def _check_noise(eta, s_noise):
    if not (isinstance(eta, (int, float)) and eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if not (isinstance(s_noise, (int, float)) and s_noise >= 0 and math.isfinite(s_noise)):
        raise ValueError(f"s_noise must be a finite number >= 0, got {s_noise!r}")
    return float(eta), float(s_noise)


class _MultistepSDE(Solver):
    """eta, s_noise, the SDE's drift factor and its noise term, shared by 2M and 3M."""

    evaluates_at_start = True  # one model call, at the step's start: flows go after the step

    def __init__(self, eta=1.0, s_noise=1.0):
        self.eta, self.s_noise = _check_noise(eta, s_noise)
        self.stochastic = self.eta > 0 and self.s_noise > 0

    def drift(self, sigmas, i):
        """1 + eta: the step integrates dx = (1 + eta) (x - D) / sigma dsigma + noise (module docstring);
        1 on the last step to sigma = 0, which returns D."""
        return 1.0 + self.eta if sigmas[i + 1] > 0 else 1.0

    def linear_part(self, s, d, h):
        """(sigma_next / sigma) e^(-eta h) x + (1 - e^(-(1 + eta) h)) D: the first-order step."""
        return (s.sigma_next / s.sigma) * math.exp(-self.eta * h) * s.x - math.expm1(-(1 + self.eta) * h) * d

    def add_noise(self, s, x, h):
        """x + sigma_next sqrt(1 - e^(-2 eta h)) s_noise n, the exact noise of the linear SDE over the step."""
        if not self.stochastic:
            return x
        return x + s.noise(s.sigma, s.sigma_next) * (s.sigma_next * math.sqrt(-math.expm1(-2 * self.eta * h))
                                                     * self.s_noise)


class DPMpp2MSDE(_MultistepSDE):
    """DPM-Solver++(2M) SDE (k-diffusion's `sample_dpmpp_2m_sde`): the linear part plus a correction
    c / r (D - D_prev) with c = (1 - e^(-he)) / 2 ("midpoint") or c = 1 - (1 - e^(-he)) / he ("heun"),
    he = (1 + eta) h; first order on the first step; the last step to sigma = 0 returns D. Global order 2
    at eta = 0 (the ODE; "midpoint" is then DPM-Solver++(2M)); with eta > 0 an SDE solver."""

    name, order, history = "dpmpp_2m_sde", 2, 1

    def __init__(self, eta=1.0, s_noise=1.0, solver_type="midpoint"):
        super().__init__(eta, s_noise)
        if solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
        self.solver_type = solver_type

    def correction_weight(self, h):
        """c of the class docstring."""
        he = (1 + self.eta) * h
        if self.solver_type == "heun":
            return 1 + math.expm1(-he) / he
        return -0.5 * math.expm1(-he)

    def step(self, s):
        d = s.denoise(s.x, s.sigma)
        if s.sigma_next == 0:
            return d
        h = math.log(s.sigma / s.sigma_next)
        x = self.linear_part(s, d, h)
        if s.history:
            prev = s.history[-1]
            r = math.log(prev.sigma / s.sigma) / h
            x = x + (self.correction_weight(h) / r) * (d - prev.denoised)
        return self.add_noise(s, x, h)

    def __repr__(self):
        return f"DPMpp2MSDE(eta={self.eta}, s_noise={self.s_noise}, solver_type={self.solver_type!r})"


class DPMpp3MSDE(_MultistepSDE):
    """DPM-Solver++(3M) SDE (k-diffusion's `sample_dpmpp_3m_sde`): the linear part plus phi_2 D1 - phi_3 D2,
    D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1) from the divided differences
    D1_0 = (D - D_1) / r0, D1_1 = (D_1 - D_2) / r1, phi_2 = 1 + expm1(-he) / he, phi_3 = phi_2 / he - 1/2,
    he = (1 + eta) h; phi_2 D1 alone on the second step, first order on the first; the last step to sigma = 0
    returns D.

    Order: D1 = h D' and D2 = h^2 D'' / 2 + O(h^3) (D' in lambda = -log sigma), but the exact integral of
    the quadratic term is -phi_3 h^2 D'' = -2 phi_3 D2, so k-diffusion's -phi_3 D2 (kept here, as in
    k-diffusion, ComfyUI and diffusers) leaves a local O(h^3) error: global order 2 at eta = 0, which is
    what is declared (tests/test_samplers_multistep.py pins it; 2 phi_3 D2 would make its steps third order)."""

    name, order, history = "dpmpp_3m_sde", 2, 2

    def step(self, s):
        d = s.denoise(s.x, s.sigma)
        if s.sigma_next == 0:
            return d
        h = math.log(s.sigma / s.sigma_next)
        he = (1 + self.eta) * h
        x = self.linear_part(s, d, h)
        phi_2 = 1 + math.expm1(-he) / he
        if len(s.history) >= 2:
            p1, p2 = s.history[-1], s.history[-2]
            r0, r1 = math.log(p1.sigma / s.sigma) / h, math.log(p2.sigma / p1.sigma) / h
            d1_0, d1_1 = (d - p1.denoised) / r0, (p1.denoised - p2.denoised) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - (phi_2 / he - 0.5) * d2
        elif s.history:
            p1 = s.history[-1]
            x = x + (phi_2 * h / math.log(p1.sigma / s.sigma)) * (d - p1.denoised)
        return self.add_noise(s, x, h)

    def __repr__(self):
        return f"DPMpp3MSDE(eta={self.eta}, s_noise={self.s_noise})"


def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, solver_type='midpoint', **loop):
    """k-diffusion's `sample_dpmpp_2m_sde` on diffsolve's loop (noise: `noise_sampler`, else the loop's
    `generator` draws; k-diffusion's default is a Brownian tree)."""
    return sample(DPMpp2MSDE(eta, s_noise, solver_type), model, x, sigmas, extra_args, callback, disable,
                  noise_sampler=noise_sampler, **loop)


def sample_dpmpp_2m_sde_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                             noise_sampler=None, solver_type='heun', **loop):
    """ComfyUI's `sample_dpmpp_2m_sde_heun`: `sample_dpmpp_2m_sde` with solver_type="heun"."""
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler,
                               solver_type, **loop)


def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, **loop):
    """k-diffusion's `sample_dpmpp_3m_sde` on diffsolve's loop."""
    return sample(DPMpp3MSDE(eta, s_noise), model, x, sigmas, extra_args, callback, disable,
                  noise_sampler=noise_sampler, **loop)


register("dpmpp_2m_sde", DPMpp2MSDE)
register("dpmpp_2m_sde_heun", lambda eta=1.0, s_noise=1.0, solver_type="heun": DPMpp2MSDE(eta, s_noise, solver_type))
register("dpmpp_3m_sde", DPMpp3MSDE)
