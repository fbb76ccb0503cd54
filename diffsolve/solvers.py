"""Solvers on the one denoiser convention, with k-diffusion's signature.

Every solver runs `for sigma, sigma_next in pairs(sigmas): x = step(...)`, then the exact flows of
split transforms (Lie: after the step; Strang: half before, half after). They keep no state between
calls, count model evaluations (NFE), check each step for NaN / inf, and accept an explicit
`generator` or `noise_sampler` for every random draw. In VE coordinates the Euler step is
x <- lerp(D, x, sigma_next / sigma), which is deterministic DDIM.
"""
import math
from dataclasses import dataclass

import torch
from tqdm.auto import trange

from ._checks import check_finite_step, check_like, check_sigmas
from .noise import gaussian_noise
from .transforms import compose


@dataclass
class SampleInfo:
    """What a solver run cost: network evaluations (a batched CFG call of twice the batch counts 2)."""
    nfe: float = 0.0
    steps: int = 0


class _Counted:
    """Counts evaluations of a model in units of the solver's batch."""

    def __init__(self, info, batch):
        self.info, self.batch = info, batch

    def __call__(self, model):
        def counted(x, sigma, **cond):
            self.info.nfe += x.shape[0] / self.batch
            return model(x, sigma, **cond)
        return counted


def counted_denoiser(model, transforms, batch, info):
    """`model` with `transforms` composed on it, every model evaluation (extra models of guidance
    included) counted into `info.nfe` in units of `batch` rows; returns (denoiser, flow transforms)."""
    count = _Counted(info, batch)
    return compose(count(model), transforms, count)


def _setup(model, x, sigmas, extra_args, transforms):
    """Validate inputs; build the counted, transformed denoiser; return plain-float sigmas."""
    sigmas = check_sigmas(sigmas)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__}")
    if not torch.isfinite(x.sum()):
        raise ValueError("x contains NaN or inf before the first step")
    extra_args = {} if extra_args is None else extra_args
    for key, value in extra_args.items():
        check_like(x, value, f"extra_args[{key!r}]")
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"extra_args[{key!r}] has batch {value.shape[0]} but x has batch {x.shape[0]}")
    info = SampleInfo()
    denoiser, flows = counted_denoiser(model, transforms, x.shape[0], info)
    return denoiser, flows, [float(s) for s in sigmas], extra_args, info


def _flows(flows, x, sigma, sigma_next, eta):
    for t in flows:
        x = t.flow(x, sigma, sigma_next, eta)
    return x


def _strang_mid(sigma, sigma_next):
    """Midpoint in time t = sigma**2, where Strang splitting applies its first half-flow."""
    return math.sqrt(0.5 * (sigma ** 2 + sigma_next ** 2))


def _run(step, model, x, sigmas, extra_args, callback, disable, transforms, eta, step_hook, check_finite,
         return_info):
    """The loop every solver shares: flows around `step(denoiser, x, i, sigma, sigma_next)`."""
    denoiser, flows, sig, extra_args, info = _setup(model, x, sigmas, extra_args, transforms)
    lie = [t for t in flows if getattr(t, "splitting", "lie") == "lie"]
    strang = [t for t in flows if getattr(t, "splitting", "lie") == "strang"]
    rows = x.new_ones([x.shape[0]])

    def den(z, sigma):
        return denoiser(z, sigma * rows, **extra_args)

    for i in trange(len(sig) - 1, disable=disable):
        sigma, sigma_next = sig[i], sig[i + 1]
        if strang:
            mid = _strang_mid(sigma, sigma_next)
            x = _flows(strang, x, sigma, mid, eta)
        x_prev = x
        x, denoised, sigma_hat = step(den, x, i, sigma, sigma_next)
        if callback is not None:
            callback({"x": x_prev, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised,
                      "nfe": info.nfe})
        x = _flows(lie, x, sigma_hat, sigma_next, eta)
        if strang:
            x = _flows(strang, x, mid, sigma_next, eta)
        if step_hook is not None:
            new = step_hook(i, sigma, sigma_next, x)
            x = x if new is None else new
        if check_finite and not math.isfinite(x.sum().item()):  # one reduction + one host read per step
            check_finite_step(x, i, sigma, sigma_next)  # raises, naming the step
        info.steps += 1
    return (x, info) if return_info else x


def _churn(x, sigma, n_steps, s_churn, s_tmin, s_tmax, s_noise, noise):
    """Karras et al. (2022) Algorithm 2 churn: raise sigma to sigma_hat by adding fresh noise."""
    gamma = min(s_churn / n_steps, 2 ** 0.5 - 1) if s_churn > 0 and s_tmin <= sigma <= s_tmax else 0.0
    if gamma == 0.0:
        return x, sigma
    sigma_hat = sigma * (gamma + 1)
    return x + noise(sigma, sigma_hat) * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5, sigma_hat


def _like(d, x):
    """d in x's dtype, skipping the no-op `.to` call (a measurable cost per step for small models)."""
    return d if d.dtype == x.dtype else d.to(x.dtype)


def _noise_fn(x, generator, noise_sampler):
    return noise_sampler if noise_sampler is not None else gaussian_noise(x, generator)


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float("inf"), s_noise=1., *, transforms=(), generator=None, noise_sampler=None,
                 step_hook=None, check_finite=True, return_info=False):
    """Euler steps of the probability-flow ODE (Karras et al. 2022, Algorithm 2 with its churn)."""
    noise, n = _noise_fn(x, generator, noise_sampler), len(sigmas) - 1

    def step(den, x, i, sigma, sigma_next):
        x, sigma_hat = _churn(x, sigma, n, s_churn, s_tmin, s_tmax, s_noise, noise)
        d = den(x, sigma_hat)
        return torch.lerp(_like(d, x), x, sigma_next / sigma_hat), d, sigma_hat
    return _run(step, model, x, sigmas, extra_args, callback, disable, transforms, 0.0, step_hook,
                check_finite, return_info)


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float("inf"), s_noise=1., *, transforms=(), generator=None, noise_sampler=None,
                step_hook=None, check_finite=True, return_info=False):
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); the last step to sigma = 0 is Euler."""
    noise, n = _noise_fn(x, generator, noise_sampler), len(sigmas) - 1

    def step(den, x, i, sigma, sigma_next):
        x, sigma_hat = _churn(x, sigma, n, s_churn, s_tmin, s_tmax, s_noise, noise)
        d = _like(den(x, sigma_hat), x)
        x_euler = torch.lerp(d, x, sigma_next / sigma_hat)
        if sigma_next == 0:
            return x_euler, d, sigma_hat
        d2 = _like(den(x_euler, sigma_next), x)
        h = sigma_next - sigma_hat
        return x + (h / 2) * ((x - d) / sigma_hat + (x_euler - d2) / sigma_next), d, sigma_hat
    return _run(step, model, x, sigmas, extra_args, callback, disable, transforms, 0.0, step_hook,
                check_finite, return_info)


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


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0., s_noise=1., *,
                transforms=(), generator=None, noise_sampler=None, step_hook=None, check_finite=True,
                return_info=False):
    """DDIM (Song et al. 2021) in VE coordinates: eta = 0 is the Euler step; eta > 0 adds the DDIM noise,
    which equals k-diffusion's ancestral step with the same eta (eta = 1: ancestral sampling / reverse SDE)."""
    ancestral_step(1.0, 0.5, eta)  # validates eta
    noise = _noise_fn(x, generator, noise_sampler)

    def step(den, x, i, sigma, sigma_next):
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = den(x, sigma)
        x = torch.lerp(_like(d, x), x, sigma_down / sigma)
        if sigma_up > 0:
            x = x + noise(sigma, sigma_next) * (s_noise * sigma_up)
        return x, d, sigma
    return _run(step, model, x, sigmas, extra_args, callback, disable, transforms, eta, step_hook,
                check_finite, return_info)


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, **kwargs):
    """Ancestral Euler steps (k-diffusion's sample_euler_ancestral); the same chain as sample_ddim(eta)."""
    return sample_ddim(model, x, sigmas, extra_args, callback, disable, eta=eta, s_noise=s_noise,
                       noise_sampler=noise_sampler, **kwargs)
