"""Singlestep second-order solvers with an intermediate evaluation: DPM-Solver-2 (Lu et al. 2022a,
arXiv:2206.00927) with churn or ancestral noise, DPM-Solver++(2S) (Lu et al. 2022b, arXiv:2211.01095) with
ancestral noise, and k-diffusion's stochastic DPM-Solver++ (`dpmpp_sde`); DPM-Solver-fast and adaptive DPM-Solver
live in `adaptive` and are re-exported here.

VE coordinates throughout: t = -log sigma, h = t_next - t, eps = (x - D) / sigma. Each step's sub-step runs at an
intermediate sigma inside the step; split flows are applied around the whole step, so they stay well defined.
Ancestral noise follows DDIM's convention for the drift a step reports (`Solver.drift`): 1 + eta**2 times the
probability-flow ODE's (the continuous limit of (sigma**2 - sigma_down**2) / (sigma**2 - sigma_next**2)).
"""
import math

from ..sampling import Solver, sample
from . import adaptive
from .adaptive import *  # noqa: F401,F403
from .adaptive import dpm_solver_step
from .euler import _Churned, _lerp, ancestral_noise, ancestral_step, renoised
from .registry import register

__all__ = ["DPM2", "DPM2Ancestral", "DPMpp2SAncestral", "DPMppSDE", "sample_dpm_2", "sample_dpm_2_ancestral",
           "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", *adaptive.__all__]


def _check_eta(eta, s_noise):
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if not s_noise >= 0:
        raise ValueError(f"s_noise must be >= 0, got {s_noise}")
    return float(eta), float(s_noise)


def _ancestral_drift(sigmas, i, eta):
    """DDIM's convention: 1 + eta**2 on a step that adds noise, 1 on the last step to 0 or with eta = 0."""
    return 1.0 + eta ** 2 if eta > 0 and sigmas[i + 1] > 0 else 1.0


class DPM2(_Churned):
    """DPM-Solver-2 (Lu et al. 2022a) with r1 = 1/2 (the midpoint in t, sigma_mid = sqrt(sigma_hat
    sigma_next)) from sigma_hat, after Karras et al. (2022, Algorithm 2)'s optional churn; the last step to
    sigma = 0 is Euler. Order 2; 2 evaluations a step (1 on the last). drift: the churn's, as Euler / Heun
    (the flow covers [sigma_hat, sigma_next])."""

    name, order = "dpm_2", 2

    def step(self, s):
        x, sigma_hat = self.churn(s)
        d = s.denoise(x, sigma_hat)
        if s.sigma_next == 0:
            return d
        return dpm_solver_step(s, x, (x - d) / sigma_hat, sigma_hat, s.sigma_next, 2)


class DPM2Ancestral(Solver):
    """Ancestral sampling with DPM-Solver-2 steps: DPM-Solver-2 (r1 = 1/2) from sigma to sigma_down, then
    noise s_noise * sigma_up (`ancestral_step`, DDIM's eta). A step whose sigma_down is 0 is Euler to 0.

    As in k-diffusion 0.1.1, that Euler branch adds no noise even when sigma_next > 0 (eta large enough that
    sigma_up is capped at sigma_next): x becomes the denoised prediction. Kept for parity; its drift is then
    sigma**2 / (sigma**2 - sigma_next**2) (the ODE ran to 0).
    order: 2 at eta = 0, else 1. drift: 1 + eta**2 (DDIM's convention)."""

    name = "dpm_2_ancestral"

    def __init__(self, eta=1.0, s_noise=1.0):
        self.eta, self.s_noise = _check_eta(eta, s_noise)
        self.order, self.stochastic = (2, False) if self.eta == 0 else (1, True)

    def drift(self, sigmas, i):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma_next > 0 and ancestral_step(sigma, sigma_next, self.eta)[0] == 0:
            return sigma ** 2 / (sigma ** 2 - sigma_next ** 2)
        return _ancestral_drift(sigmas, i, self.eta)

    def step(self, s):
        sigma_down, sigma_up = ancestral_step(s.sigma, s.sigma_next, self.eta)
        d = s.denoise(s.x, s.sigma)
        if sigma_down == 0:
            return d
        x = dpm_solver_step(s, s.x, (s.x - d) / s.sigma, s.sigma, sigma_down, 2)
        return ancestral_noise(s, x, sigma_up, self.s_noise)

    def __repr__(self):
        return f"DPM2Ancestral(eta={self.eta})"


def _dpmpp_first(x, d, sigma, sigma_to):
    """DPM-Solver++ first-order update (Lu et al. 2022b) with alpha = 1: (sigma_to / sigma) x - (e^{-h} - 1) D,
    h = log(sigma / sigma_to); sigma_to = 0 gives D."""
    return _lerp(d, x, sigma_to / sigma)


class DPMpp2SAncestral(Solver):
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022b, Algorithm 1 with r = 1/2): from sigma to
    sigma_down, x_mid = (sigma_mid / sigma) x - expm1(-h/2) D at sigma_mid = sqrt(sigma sigma_down), then
    x' = (sigma_down / sigma) x - expm1(-h) D(x_mid, sigma_mid); then noise s_noise * sigma_up when sigma_next > 0.
    A step whose sigma_down is 0 is the DDIM step (Euler to 0, then the noise). With CFG++ both first-order
    updates renoise with the unconditional prediction of their evaluation (`renoised`).
    order: 2 at eta = 0, else 1. drift: 1 + eta**2 (DDIM's convention)."""

    name, splits_data_noise = "dpmpp_2s_ancestral", True

    def __init__(self, eta=1.0, s_noise=1.0):
        self.eta, self.s_noise = _check_eta(eta, s_noise)
        self.order, self.stochastic = (2, False) if self.eta == 0 else (1, True)

    def drift(self, sigmas, i):
        return _ancestral_drift(sigmas, i, self.eta)

    def step(self, s):
        sigma_down, sigma_up = ancestral_step(s.sigma, s.sigma_next, self.eta)
        d = s.denoise(s.x, s.sigma)
        if sigma_down == 0:
            x = _dpmpp_first(s.x, d, s.sigma, 0.0)
        else:
            t = -math.log(s.sigma)
            sigma_mid = math.exp(-(t + 0.5 * (-math.log(sigma_down) - t)))
            d2 = s.denoise(renoised(d, s.x, sigma_mid / s.sigma, s.noise_direction(d)), sigma_mid)
            x = renoised(d2, s.x, sigma_down / s.sigma, s.noise_direction(d2))
        return ancestral_noise(s, x, sigma_up, self.s_noise)  # sigma_up is 0 on a step to sigma = 0

    def __repr__(self):
        return f"DPMpp2SAncestral(eta={self.eta})"


class DPMppSDE(Solver):
    """k-diffusion's stochastic DPM-Solver++ (`sample_dpmpp_sde`): DPM-Solver++(2S) with ratio r (Lu et al. 2022b,
    Algorithm 1: D_hat = (1 - 1/(2r)) D + D(x_r, sigma_r) / (2r), sigma_r = sigma e^{-r h}) whose two first-order
    updates are ancestral: x_r is the DDIM-eta step to sigma_r (down-step, then noise s.noise(sigma, sigma_r)), and x'
    the DDIM-eta step to sigma_next with D_hat (noise s.noise(sigma, sigma_next)). The last step to 0 is Euler.

    k-diffusion draws both noises from one Brownian tree (the second increment contains the first); here they come
    from the run's noise sampler: pass `noise_sampler=diffsolve.noise.brownian_tree_noise(...)` for correlated
    increments, the default gives independent draws.
    order: 2 at eta = 0 (DPM-Solver++(2S), any r in (0, 1]), else 1.
    drift: the step's update is an ancestral (DDIM-eta) step over [sigma, sigma_next] (sigma_down from
    `ancestral_step`, not DPM++ 2M SDE's h -> (1 + eta) h), so 1 + eta**2 in DDIM's convention, 1 on the last step
    to 0. The sub-step's own noise lies inside the step, around which the flow is applied."""

    name = "dpmpp_sde"

    def __init__(self, eta=1.0, s_noise=1.0, r=0.5):
        self.eta, self.s_noise = _check_eta(eta, s_noise)
        if not 0 < r <= 1:
            raise ValueError(f"r must be in (0, 1], got {r}")
        self.r = float(r)
        self.order, self.stochastic = (2, False) if self.eta == 0 else (1, True)

    def drift(self, sigmas, i):
        return _ancestral_drift(sigmas, i, self.eta)

    def _ancestral(self, s, x, d, sigma_to):
        """DDIM-eta step from s.sigma to sigma_to with prediction d."""
        sigma_down, sigma_up = ancestral_step(s.sigma, sigma_to, self.eta)
        x = _dpmpp_first(x, d, s.sigma, sigma_down)
        return ancestral_noise(s, x, sigma_up, self.s_noise, s.sigma, sigma_to)

    def step(self, s):
        d = s.denoise(s.x, s.sigma)
        if s.sigma_next == 0:
            return _dpmpp_first(s.x, d, s.sigma, 0.0)
        t = -math.log(s.sigma)
        sigma_r = math.exp(-(t + self.r * (-math.log(s.sigma_next) - t)))
        d2 = s.denoise(self._ancestral(s, s.x, d, sigma_r), sigma_r)
        fac = 1 / (2 * self.r)
        return self._ancestral(s, s.x, (1 - fac) * d + fac * d2, s.sigma_next)

    def __repr__(self):
        return f"DPMppSDE(eta={self.eta}, r={self.r})"


def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float("inf"), s_noise=1., **loop):
    """k-diffusion's `sample_dpm_2` on diffsolve's loop (churn noise from the loop's noise sampler)."""
    return sample(DPM2(s_churn, s_tmin, s_tmax, s_noise), model, x, sigmas, extra_args, callback, disable, **loop)


def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, **loop):
    """k-diffusion's `sample_dpm_2_ancestral` on diffsolve's loop."""
    return sample(DPM2Ancestral(eta, s_noise), model, x, sigmas, extra_args, callback, disable,
                  noise_sampler=noise_sampler, **loop)


def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                              noise_sampler=None, **loop):
    """k-diffusion's `sample_dpmpp_2s_ancestral` on diffsolve's loop."""
    return sample(DPMpp2SAncestral(eta, s_noise), model, x, sigmas, extra_args, callback, disable,
                  noise_sampler=noise_sampler, **loop)


def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                     noise_sampler=None, r=1 / 2, **loop):
    """k-diffusion's `sample_dpmpp_sde` on diffsolve's loop (noise from the loop's sampler; see `DPMppSDE`)."""
    return sample(DPMppSDE(eta, s_noise, r), model, x, sigmas, extra_args, callback, disable,
                  noise_sampler=noise_sampler, **loop)


register("dpm_2", DPM2)
register("dpm_2_ancestral", DPM2Ancestral)
register("dpmpp_2s_ancestral", DPMpp2SAncestral)
register("dpmpp_sde", DPMppSDE)
