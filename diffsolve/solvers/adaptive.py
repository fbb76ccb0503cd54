"""DPM-Solver (Lu et al. 2022, arXiv:2206.00927) in VE coordinates: its singlestep updates of order 1-3,
DPM-Solver-fast (a fixed sequence of orders, uniform in t = -log sigma) and DPM-Solver-12 / -23 with
adaptive step sizes, under their ComfyUI names `dpm_fast` and `dpm_adaptive`.

With alpha = 1 the paper's lambda is t = -log sigma, and its noise prediction is eps = (x - D(x, sigma)) / sigma.
Both samplers end at sigma_min > 0 (as k-diffusion's do): the updates need t_next < inf.
"""
import math
import operator

import torch

from ..sampling import Solver, sample
from .euler import ancestral_noise, ancestral_step
from .registry import register

__all__ = ["DPMAdaptive", "DPMFast", "dpm_fast_orders", "dpm_fast_sigmas", "dpm_solver_pair", "dpm_solver_step",
           "sample_dpm_adaptive", "sample_dpm_fast"]


# ------------------------------------------------------------------------------ DPM-Solver updates
def _first(x, eps, sigma_next, h):
    """DPM-Solver-1 (DDIM) with alpha = 1: x - sigma_next (e^h - 1) eps."""
    return x - (sigma_next * math.expm1(h)) * eps


def _second(x, eps, eps1, sigma_next, h, r1):
    """DPM-Solver-2 final update with ratio r1: x - sigma_next (e^h - 1) (eps + (eps1 - eps) / (2 r1))."""
    return x - (sigma_next * math.expm1(h)) * eps - (sigma_next / (2 * r1) * math.expm1(h)) * (eps1 - eps)


def _third_mid(x, eps, eps1, sigma2, h, r1, r2):
    """DPM-Solver-3 second intermediate point at t + r2 h: x - sigma2 (e^{r2 h} - 1) eps
    - sigma2 (r2 / r1) ((e^{r2 h} - 1) / (r2 h) - 1) (eps1 - eps)."""
    phi = math.expm1(r2 * h) / (r2 * h) - 1
    return x - (sigma2 * math.expm1(r2 * h)) * eps - (sigma2 * (r2 / r1) * phi) * (eps1 - eps)


def _third(x, eps, eps2, sigma_next, h, r2):
    """DPM-Solver-3 final update: x - sigma_next (e^h - 1) eps - (sigma_next / r2) ((e^h - 1) / h - 1) (eps2 - eps)."""
    return x - (sigma_next * math.expm1(h)) * eps - (sigma_next / r2 * (math.expm1(h) / h - 1)) * (eps2 - eps)


def _eps(s, x, sigma):
    """The noise prediction (x - D) / sigma through the step's counted, transformed denoiser."""
    return (x - s.denoise(x, sigma)) / sigma


def _mid(sigma, h, r):
    """sigma at t + r h, t = -log sigma."""
    return math.exp(-(-math.log(sigma) + r * h))


def dpm_solver_step(s, x, eps, sigma, sigma_next, order):
    """One DPM-Solver-`order` step (1: DDIM; 2: r1 = 1/2; 3: r1 = 1/3, r2 = 2/3) from sigma to sigma_next > 0,
    given eps at (x, sigma); intermediate evaluations go through `s.denoise`."""
    h = math.log(sigma / sigma_next)
    if order == 1:
        return _first(x, eps, sigma_next, h)
    if order == 2:
        s1 = _mid(sigma, h, 0.5)
        u1 = _first(x, eps, s1, 0.5 * h)
        return _second(x, eps, _eps(s, u1, s1), sigma_next, h, 0.5)
    r1, r2 = 1 / 3, 2 / 3
    s1, s2 = _mid(sigma, h, r1), _mid(sigma, h, r2)
    u1 = _first(x, eps, s1, r1 * h)
    eps1 = _eps(s, u1, s1)
    u2 = _third_mid(x, eps, eps1, s2, h, r1, r2)
    return _third(x, eps, _eps(s, u2, s2), sigma_next, h, r2)


def dpm_solver_pair(s, x, eps, sigma, sigma_next, order):
    """(x_low, x_high) of DPM-Solver-12 (order 2: DPM-Solver-1 and -2) or -23 (order 3: DPM-Solver-2 with
    r1 = 1/3 and -3), sharing their evaluations (the paper's adaptive step size): `order` model calls in all."""
    h = math.log(sigma / sigma_next)
    if order == 2:
        return _first(x, eps, sigma_next, h), dpm_solver_step(s, x, eps, sigma, sigma_next, 2)
    r1, r2 = 1 / 3, 2 / 3
    s1, s2 = _mid(sigma, h, r1), _mid(sigma, h, r2)
    u1 = _first(x, eps, s1, r1 * h)
    eps1 = _eps(s, u1, s1)
    low = _second(x, eps, eps1, sigma_next, h, r1)
    u2 = _third_mid(x, eps, eps1, s2, h, r1, r2)
    return low, _third(x, eps, _eps(s, u2, s2), sigma_next, h, r2)


def _down(sigma, sigma_next, eta, floor):
    """Ancestral split of [sigma, sigma_next] with the down-step clamped at `floor` (the run's sigma_min), and
    the noise sqrt(sigma_next**2 - sigma_down**2) that then restores sigma_next (k-diffusion's DPMSolver)."""
    if not eta:
        return sigma_next, 0.0
    sigma_down = max(ancestral_step(sigma, sigma_next, eta)[0], floor)
    return sigma_down, max(sigma_next ** 2 - sigma_down ** 2, 0.0) ** 0.5


def _check_noise(eta, s_noise):
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if not s_noise >= 0:
        raise ValueError(f"s_noise must be >= 0, got {s_noise}")


def _check_range(sigma_min, sigma_max):
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)
    if not (sigma_min > 0 and math.isfinite(sigma_max)):
        raise ValueError(f"need 0 < sigma_min and finite sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not sigma_min < sigma_max:
        raise ValueError(f"need sigma_min < sigma_max, got sigma_min={sigma_min} >= sigma_max={sigma_max}")
    return sigma_min, sigma_max


def _ends_above_zero(s, name):
    if s.sigmas[-1] <= 0:
        raise ValueError(f"{name} ends at sigma_min > 0 (its updates need t = -log sigma finite); "
                         f"the grid ends at {s.sigmas[-1]}")


# ------------------------------------------------------------------------------------- dpm_fast
def _count(n):
    """n as an int >= 1 (bool refused), else None."""
    if isinstance(n, bool):
        return None
    try:
        n = operator.index(n)
    except TypeError:
        return None
    return n if n >= 1 else None


def dpm_fast_orders(n):
    """k-diffusion's order sequence for n evaluations: 3, ..., 3 then 2, 1 (n divisible by 3) or n mod 3."""
    if _count(n) is None:
        raise ValueError(f"n (the number of model evaluations) must be an integer >= 1, got {n!r}")
    n = _count(n)
    m = n // 3 + 1
    return [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]


def dpm_fast_sigmas(sigma_min, sigma_max, n):
    """DPM-Solver-fast's grid: len(dpm_fast_orders(n)) steps uniform in t = -log sigma, sigma_max to sigma_min
    (no final 0), float64."""
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    m = len(dpm_fast_orders(n))
    t0, t1 = -math.log(sigma_max), -math.log(sigma_min)
    inner = [math.exp(-(t0 + (t1 - t0) * i / m)) for i in range(1, m)]
    return torch.tensor([sigma_max, *inner, sigma_min], dtype=torch.float64)


class DPMFast(Solver):
    """DPM-Solver-fast (Lu et al. 2022, its fixed step-size schedule): n model evaluations as
    K = n // 3 + 1 steps of orders `dpm_fast_orders(n)` (step i's order is the i-th of them, so the grid must have
    exactly K steps, e.g. `dpm_fast_sigmas`, and end above 0). eta > 0 adds k-diffusion's ancestral noise per
    step, with the down-step clamped at the grid's last sigma.

    order: 3 when the sequence ends with an order-2 step (n mod 3 == 2); 2 when it ends with an order-1 step,
    whose O(h**2) local error then dominates; the single step's order for n < 3; 1 with eta > 0.
    drift: 1 + eta**2 (the ancestral convention of DDIM) on steps whose down-step is not clamped; a clamped
    step covers [sigma, sigma_min]: (sigma**2 - sigma_min**2) / (sigma**2 - sigma_next**2), 1 on the last.
    Split flows are applied around each whole step (its sub-steps at intermediate sigmas are internal)."""

    name, own_grid = "dpm_fast", True

    def __init__(self, n, eta=0.0, s_noise=1.0):
        self.orders = tuple(dpm_fast_orders(n))
        _check_noise(eta, s_noise)
        self.n, self.eta, self.s_noise = n, float(eta), float(s_noise)
        o = self.orders
        self.order = 1 if self.eta > 0 else (o[0] if len(o) == 1 else min(max(o), min(o) + 1))
        self.stochastic = self.eta > 0

    def drift(self, sigmas, i):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if self.eta == 0:
            return 1.0
        sigma_down = _down(sigma, sigma_next, self.eta, sigmas[-1])[0]
        if sigma_down > ancestral_step(sigma, sigma_next, self.eta)[0]:  # clamped
            return (sigma ** 2 - sigma_down ** 2) / (sigma ** 2 - sigma_next ** 2)
        return 1.0 + self.eta ** 2

    def step(self, s):
        if s.i == 0:
            _ends_above_zero(s, "dpm_fast")
            if len(s.sigmas) - 1 != len(self.orders):
                raise ValueError(f"DPMFast(n={self.n}) takes {len(self.orders)} steps (orders {list(self.orders)}), "
                                 f"but the grid has {len(s.sigmas) - 1}; use dpm_fast_sigmas(sigma_min, sigma_max, n)")
        sigma_down, sigma_up = _down(s.sigma, s.sigma_next, self.eta, s.sigmas[-1])
        x = dpm_solver_step(s, s.x, _eps(s, s.x, s.sigma), s.sigma, sigma_down, self.orders[s.i])
        return ancestral_noise(s, x, sigma_up, self.s_noise)

    def __repr__(self):
        return f"DPMFast(n={self.n}, eta={self.eta})"


# ---------------------------------------------------------------------------------- dpm_adaptive
def pid_factor(inv_errors, b, accept_safety):
    """Step-size factor of a PID controller (Söderlind 2003, digital filters; k-diffusion's form): prod_j
    (1/err_j)**b_j through the limiter 1 + atan(f - 1); the step is accepted when it is >= accept_safety."""
    f = inv_errors[0] ** b[0] * inv_errors[1] ** b[1] * inv_errors[2] ** b[2]
    f = 1 + math.atan(f - 1)
    return f, f >= accept_safety


class DPMAdaptive(Solver):
    """DPM-Solver-12 (order=2) / -23 (order=3) with adaptive step size (Lu et al. 2022): each attempted
    step computes a lower- and a higher-order solution from shared evaluations, the scaled error
    ||(x_low - x_high) / max(atol, rtol max(|x_low|, |x_prev|))||_rms drives a PID controller
    (pcoeff, icoeff, dcoeff, accept_safety) and the higher-order solution is kept on accepted steps.

    The whole adaptive solve runs inside ONE loop step over a grid [sigma_max, sigma_min] (sigma_min > 0), through
    `s.denoise` (counted, transformed, checked); the loop cannot see its sub-steps, so `applies_flows` is False.
    `info_callback(dict)` (optional) is called after every attempt with k-diffusion's record: x, i, t, t_up,
    sigma, sigma_hat, denoised, error, h, steps, nfe, n_accept, n_reject (the counts so far).
    order: `order` (local extrapolation keeps the higher-order result); 1 with eta > 0. drift: 1 + eta**2."""

    name, applies_flows, own_grid = "dpm_adaptive", False, True

    def __init__(self, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                 accept_safety=0.81, eta=0.0, s_noise=1.0, info_callback=None):
        if order not in (2, 3):
            raise ValueError(f"order must be 2 or 3, got {order!r}")
        if not (rtol >= 0 and atol >= 0 and rtol + atol > 0):
            raise ValueError(f"need rtol >= 0, atol >= 0, not both 0; got rtol={rtol}, atol={atol}")
        if not (h_init != 0 and math.isfinite(h_init)):
            raise ValueError(f"h_init must be finite and nonzero, got {h_init}")
        if not all(math.isfinite(c) for c in (pcoeff, icoeff, dcoeff)):
            raise ValueError(f"PID coefficients must be finite, got pcoeff={pcoeff}, icoeff={icoeff}, dcoeff={dcoeff}")
        if not 0 < accept_safety <= 1:
            raise ValueError(f"accept_safety must be in (0, 1], got {accept_safety}")
        _check_noise(eta, s_noise)
        self.rtol, self.atol, self.h_init = float(rtol), float(atol), abs(float(h_init))
        self.accept_safety = float(accept_safety)
        self.eta, self.s_noise, self.info_callback = float(eta), float(s_noise), info_callback
        k = 1.5 if self.eta else order  # the error's order the controller assumes
        self.b = ((pcoeff + icoeff + dcoeff) / k, -(pcoeff + 2 * dcoeff) / k, dcoeff / k)
        self.pid_order, self.order, self.stochastic = order, 1 if self.eta else order, self.eta > 0

    def drift(self, sigmas, i):
        return 1.0 + self.eta ** 2 if self.eta else 1.0

    def step(self, s):
        if len(s.sigmas) != 2:
            raise ValueError(f"dpm_adaptive runs on a grid [sigma_max, sigma_min], got {len(s.sigmas)} sigmas")
        _ends_above_zero(s, "dpm_adaptive")
        x, x_prev, t, t_end = s.x, s.x, -math.log(s.sigma), -math.log(s.sigma_next)
        h, inv_errs = self.h_init, None
        info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
        while t < t_end - 1e-5:
            t_next = min(t_end, t + h)
            sigma, sigma_next = math.exp(-t), math.exp(-t_next)
            sigma_down, sigma_up = _down(sigma, sigma_next, self.eta, math.exp(-t_end))  # = sigma_next at t_end
            denoised = s.denoise(x, sigma)
            low, high = dpm_solver_pair(s, x, (x - denoised) / sigma, sigma, sigma_down, self.pid_order)
            scale = torch.maximum(low.abs(), x_prev.abs()).mul_(self.rtol).clamp_(min=self.atol)
            error = float(torch.linalg.norm((low - high) / scale)) / x.numel() ** 0.5
            if not math.isfinite(error):
                raise ValueError(f"dpm_adaptive: non-finite error estimate at sigma {sigma:.6g} (attempt "
                                 f"{info['steps']}); the model returned NaN or inf")
            inv = 1 / (error + 1e-8)
            inv_errs = [inv, inv, inv] if inv_errs is None else [inv, inv_errs[1], inv_errs[2]]
            factor, accept = pid_factor(inv_errs, self.b, self.accept_safety)
            h *= factor
            if accept:
                inv_errs = [inv, inv, inv_errs[1]]
                x_prev, x, t = low, high, t_next
                x = ancestral_noise(s, x, sigma_up, self.s_noise, sigma, sigma_next)
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["nfe"] += self.pid_order
            info["steps"] += 1
            if self.info_callback is not None:
                self.info_callback({"x": x, "i": info["steps"] - 1, "t": t, "t_up": t, "sigma": math.exp(-t),
                                    "sigma_hat": math.exp(-t), "denoised": denoised, "error": error, "h": h, **info})
        return x

    def __repr__(self):
        return f"DPMAdaptive(order={self.pid_order}, rtol={self.rtol}, atol={self.atol}, eta={self.eta})"


# ---------------------------------------------------------------------------------- entry points
def _with_t(callback):
    """k-diffusion's dpm_fast callback record: the loop's keys plus t = t_up = -log sigma."""
    if callback is None:
        return None
    return lambda d: callback({**d, "t": -math.log(d["sigma"]), "t_up": -math.log(d["sigma_hat"])})


def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.,
                    s_noise=1., noise_sampler=None, **loop):
    """k-diffusion's `sample_dpm_fast`: `DPMFast(n)` on `dpm_fast_sigmas(sigma_min, sigma_max, n)`, ending at
    sigma_min; the callback record adds k-diffusion's t = t_up = -log sigma."""
    solver = DPMFast(n, eta, s_noise)
    return sample(solver, model, x, dpm_fast_sigmas(sigma_min, sigma_max, n), extra_args, _with_t(callback), disable,
                  noise_sampler=noise_sampler, **loop)


def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0., icoeff=1., dcoeff=0., accept_safety=0.81,
                        eta=0., s_noise=1., noise_sampler=None, return_info=False, **loop):
    """k-diffusion's `sample_dpm_adaptive`: one loop step over [sigma_max, sigma_min] running `DPMAdaptive`.

    As in k-diffusion, `callback` is called after every attempted step (with the `DPMAdaptive` record) and
    return_info=True returns (x, info) with k-diffusion's dict {"steps", "nfe", "n_accept", "n_reject"}, plus
    "sample_info": the loop's `SampleInfo` (its counted NFE, which equals info["nfe"] for a plain model; with
    guidance transforms it counts every network call). The loop's own return_info is this one."""
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}

    def record(attempt):
        info.update((key, attempt[key]) for key in list(info))
        if callback is not None:
            callback(attempt)
    solver = DPMAdaptive(order, rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety, eta, s_noise, record)
    sigmas = torch.tensor([sigma_max, sigma_min], dtype=torch.float64)
    x, info["sample_info"] = sample(solver, model, x, sigmas, extra_args, None, disable, noise_sampler=noise_sampler,
                                    return_info=True, **loop)
    return (x, info) if return_info else x


register("dpm_fast", DPMFast)
register("dpm_adaptive", DPMAdaptive)
