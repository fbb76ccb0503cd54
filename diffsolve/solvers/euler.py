"""Euler, Heun and DDIM / ancestral steps (Karras et al. 2022, Algorithm 2; Song et al. 2021).

In VE coordinates the Euler step is x <- lerp(D, x, sigma_next / sigma), which is deterministic DDIM.
"""
import torch

from ..sampling import Solver, sample
from .registry import register

__all__ = ["DDIM", "Euler", "Heun", "ancestral_noise", "ancestral_step", "churn_sigma", "renoised", "sample_ddim",
           "sample_euler", "sample_euler_ancestral", "sample_heun"]


def ancestral_step(sigma, sigma_next, eta=1.0):
    """(sigma_down, sigma_up) of a stochastic DDIM / ancestral step. In VE coordinates DDIM's eta noise
    is sigma_up = eta sqrt(sigma_next**2 (sigma**2 - sigma_next**2) / sigma**2); it is capped at
    sigma_next (as k-diffusion does) so that eta > 1 stays finite where diffusers gives NaN."""
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def ancestral_noise(s, x, sigma_up, s_noise, sigma=None, sigma_next=None):
    """x + s_noise * sigma_up * n, n the run's noise over [sigma, sigma_next] (step s's interval by default);
    x itself when sigma_up is 0 (no draw). The noise half of every ancestral / DDIM-eta step."""
    if not sigma_up > 0:
        return x
    return x + s.noise(sigma, sigma_next) * (s_noise * sigma_up)


def _check_churn(s_churn, s_tmin, s_tmax, s_noise):
    if not (s_churn >= 0 and s_tmin >= 0 and s_tmax >= s_tmin and s_noise >= 0):
        raise ValueError(f"need s_churn >= 0, 0 <= s_tmin <= s_tmax, s_noise >= 0; got s_churn={s_churn}, "
                         f"s_tmin={s_tmin}, s_tmax={s_tmax}, s_noise={s_noise}")


def churn_sigma(sigma, n_steps, s_churn, s_tmin=0.0, s_tmax=float("inf")):
    """Karras et al. (2022) Algorithm 2: the raised noise level sigma_hat = sigma (1 + gamma)."""
    gamma = min(s_churn / n_steps, 2 ** 0.5 - 1) if s_churn > 0 and s_tmin <= sigma <= s_tmax else 0.0
    return sigma * (gamma + 1)


class _Churned(Solver):
    """Shared by Euler and Heun: optional churn raises sigma to sigma_hat with fresh noise first."""

    def __init__(self, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
        _check_churn(s_churn, s_tmin, s_tmax, s_noise)
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise
        self.stochastic = s_churn > 0

    def sigma_hat(self, sigmas, i):
        return churn_sigma(sigmas[i], len(sigmas) - 1, self.s_churn, self.s_tmin, self.s_tmax)

    def churn(self, s):
        """(x_hat, sigma_hat) of step s."""
        sigma_hat = self.sigma_hat(s.sigmas, s.i)
        if sigma_hat == s.sigma:
            return s.x, s.sigma
        return s.x + s.noise(s.sigma, sigma_hat) * (self.s_noise * (sigma_hat ** 2 - s.sigma ** 2) ** 0.5), sigma_hat

    def drift(self, sigmas, i):
        """Churn's added noise followed by the ODE from sigma_hat: the flow covers [sigma_hat, sigma_next]."""
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_hat = self.sigma_hat(sigmas, i)
        return 1.0 if sigma_hat == sigma else (sigma_hat ** 2 - sigma_next ** 2) / (sigma ** 2 - sigma_next ** 2)


class Euler(_Churned):
    """Euler steps of the probability-flow ODE (Karras et al. 2022, Algorithm 2 with its churn). Order 1."""

    name, order, splits_data_noise = "euler", 1, True

    def __init__(self, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
        super().__init__(s_churn, s_tmin, s_tmax, s_noise)
        self.evaluates_at_start = s_churn == 0  # churn evaluates at sigma_hat, off the step's start

    def step(self, s):
        x, sigma_hat = self.churn(s)
        d = s.denoise(x, sigma_hat)
        return renoised(d, x, s.sigma_next / sigma_hat, s.noise_direction(d))


class Heun(_Churned):
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); the last step to sigma = 0 is Euler."""

    name, order = "heun", 2

    def step(self, s):
        x, sigma_hat = self.churn(s)
        d = s.denoise(x, sigma_hat)
        x_euler = _lerp(d, x, s.sigma_next / sigma_hat)
        if s.sigma_next == 0:
            return x_euler
        d2 = s.denoise(x_euler, s.sigma_next)
        h = s.sigma_next - sigma_hat
        return x + (h / 2) * ((x - d) / sigma_hat + (x_euler - d2) / s.sigma_next)


class DDIM(Solver):
    """DDIM (Song et al. 2021) in VE coordinates: eta = 0 is the Euler step; eta > 0 adds the DDIM noise,
    which equals k-diffusion's ancestral step with the same eta (eta = 1: ancestral sampling / reverse SDE).
    Its drift on the score is 1 + eta**2 times the ODE's."""

    name, order, splits_data_noise, evaluates_at_start = "ddim", 1, True, True

    def __init__(self, eta=0.0, s_noise=1.0):
        ancestral_step(1.0, 0.5, eta)  # validates eta
        if not s_noise >= 0:
            raise ValueError(f"s_noise must be >= 0, got {s_noise}")
        self.eta, self.s_noise = float(eta), float(s_noise)
        self.stochastic = self.eta > 0

    def drift(self, sigmas, i):
        return 1.0 + self.eta ** 2 if self.eta > 0 and sigmas[i + 1] > 0 else 1.0

    def step(self, s):
        sigma_down, sigma_up = ancestral_step(s.sigma, s.sigma_next, self.eta)
        d = s.denoise(s.x, s.sigma)
        x = renoised(d, s.x, sigma_down / s.sigma, s.noise_direction(d))
        return ancestral_noise(s, x, sigma_up, self.s_noise)

    def __repr__(self):
        return f"DDIM(eta={self.eta})"


def _lerp(d, x, w):
    """d + w (x - d), one fused kernel."""
    return torch.lerp(d, x, w)


def renoised(d, x, w, n):
    """The first-order update d + w (x - n) to sigma_to = w sigma, with the noise (x - n) / sigma of the
    step's noise direction n (`Step.noise_direction`): the unconditional prediction under CFG++ (Chung et al.
    2024, eq. 10: data from the guided D, noise from the unconditional one), else d itself, for which this is
    exactly `_lerp(d, x, w)` (the same kernel, so results without CFG++ are unchanged)."""
    return _lerp(d, x, w) if n is d else d + w * (x - n)


def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float("inf"), s_noise=1., **loop):
    """k-diffusion's `sample_euler` on diffsolve's loop (`loop`: transforms, generator, noise_sampler,
    step_hook, check_finite, return_info)."""
    return sample(Euler(s_churn, s_tmin, s_tmax, s_noise), model, x, sigmas, extra_args,
                  callback, disable, **loop)


def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float("inf"), s_noise=1., **loop):
    """k-diffusion's `sample_heun` on diffsolve's loop."""
    return sample(Heun(s_churn, s_tmin, s_tmax, s_noise), model, x, sigmas, extra_args,
                  callback, disable, **loop)


def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0., s_noise=1., **loop):
    """DDIM with eta (0: deterministic) on diffsolve's loop."""
    return sample(DDIM(eta, s_noise), model, x, sigmas, extra_args, callback, disable, **loop)


def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, **loop):
    """k-diffusion's `sample_euler_ancestral`: the same chain as DDIM(eta)."""
    return sample(DDIM(eta, s_noise), model, x, sigmas, extra_args, callback, disable, noise_sampler=noise_sampler,
                  **loop)


register("euler", Euler)
register("heun", Heun)
register("ddim", DDIM)
register("euler_ancestral", lambda eta=1.0, s_noise=1.0: DDIM(eta, s_noise))
