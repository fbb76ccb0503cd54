"""Rectified-flow (flow-matching) models in the one VE denoiser convention.

A rectified-flow model (SD3, Flux) sees x_t = (1 - t) x0 + t n, t in [0, 1], and predicts the velocity
v = n - x0 (Liu et al. 2022; Esser et al. 2024, eq. 1-3). Dividing by (1 - t):

    x = x_t / (1 - t) = x0 + sigma n,   sigma = t / (1 - t),   t = sigma / (1 + sigma),

so the denoiser is D(x, sigma) = x0_hat = x_t - t v_hat(x_t, t) (`FlowDenoiser`) and, the other way,
v = (x_t - D) / t (`FlowModelView`). The flow ODE dx_t/dt = v = (x_t - D) / t has the VE ODE's form
dx/dsigma = (x - D) / sigma, which `FlowTime` uses to run any deterministic VE solver in the flow's own
time (what diffusers' flow schedulers do: FlowMatchHeunDiscreteScheduler is Heun in t, not in sigma).

Shifted schedules are scalings in sigma: SD3's shift s maps t -> s t / (1 + (s - 1) t), i.e. sigma -> s sigma;
Flux's exponential time shift with mu maps t -> e^mu / (e^mu + 1/t - 1), i.e. sigma -> e^mu sigma, with mu
linear in the image sequence length (diffusers' `calculate_shift`, pipelines/flux/pipeline_flux.py).

sigma = inf. The stock SD3 / Flux grids start at t = 1, where sigma = t / (1 - t) is infinite. Convention
(the loop's, diffsolve/sampling.py): at sigma = inf the state x holds the unit noise n = lim x / sigma (= x_t
at t = 1); a denoiser is called with sigma = inf and that x (`FlowDenoiser` maps it to t = 1, x_t = x); the
first step to sigma' is the exact limit x' = D(x, inf) + sigma' x, taken by the loop for every solver except
one that declares `infinite_start` (`FlowTime`, whose step is finite at t = 1). The schedules below return
float64 grids that start at inf in that case (`FLOW_SCHEDULES`, read by `get_sigmas`).
"""
import math

import numpy as np
import torch

from .denoisers import append_dims, sigma_rows
from .sampling import Past, Solver, Step
from .schedules import FLOW_SCHEDULES, _check_n, _finish

__all__ = ["FLOW_SCHEDULES", "FlowDenoiser", "FlowModelView", "FlowTime", "flux_mu", "shift_sigmas", "sigma_from_t",
           "sigmas_flow_dpm", "sigmas_flow_dynamic", "sigmas_flow_shift", "t_from_sigma"]


def t_from_sigma(sigma):
    """t = sigma / (1 + sigma) (1 at sigma = inf); a number or a tensor."""
    if isinstance(sigma, torch.Tensor):
        return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))
    return 1.0 if math.isinf(sigma) else sigma / (1 + sigma)


def sigma_from_t(t):
    """sigma = t / (1 - t) (inf at t = 1); a number or a tensor."""
    if isinstance(t, torch.Tensor):
        return torch.where(t == 1, torch.full_like(t, math.inf), t / (1 - t))
    return math.inf if t == 1 else t / (1 - t)


def _to_flow(x, sigma):
    """(x_t, t) from the VE state: x_t = x / (1 + sigma), x itself at sigma = inf (x holds n there)."""
    s = append_dims(sigma, x.ndim)
    scale = torch.where(torch.isinf(s), torch.ones_like(s), 1 / (1 + s))
    return x * scale, t_from_sigma(sigma)


def _check_time_scale(scale):
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"time_scale must be a finite number > 0, got {scale!r}")
    return float(scale)


class FlowDenoiser(torch.nn.Module):
    """A velocity model `model(x_t, t, **cond)` (v = n - x0 at x_t = (1 - t) x0 + t n) as a VE denoiser:
    D(x, sigma) = x_t - t v(x_t, t), t = sigma / (1 + sigma), x_t = x / (1 + sigma); sigma = inf is t = 1
    with x = n (the module docstring's convention).

    time_scale: the model receives t * time_scale (SD3's transformer takes t * 1000; Flux's takes t).
    quantize: None, or T: the model receives floor(t * T) / T * time_scale, what diffusers'
    DPMSolverMultistepScheduler feeds it (it casts t * T to int64 while its update uses the exact t).
    """

    def __init__(self, model, time_scale=1.0, quantize=None):
        super().__init__()
        if quantize is not None and (int(quantize) != quantize or quantize < 1):
            raise ValueError(f"quantize must be None or a positive integer, got {quantize!r}")
        self.inner_model, self.time_scale, self.quantize = model, _check_time_scale(time_scale), quantize

    def model_time(self, t):
        """What the model receives for flow time t."""
        if self.quantize is not None:
            t = torch.floor(t.to(torch.float64) * self.quantize) / self.quantize
        return t * self.time_scale

    def forward(self, x, sigma, **cond):
        sigma = sigma_rows(sigma, x)
        if (sigma < 0).any() or torch.isnan(sigma).any():
            raise ValueError(f"sigma must be >= 0 (inf allowed), got {sigma.tolist()}")
        x_t, t = _to_flow(x, sigma.to(torch.float64))
        model_t = self.model_time(t).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        v = self.inner_model(x_t.to(x.dtype), model_t, **cond)
        return (x_t - append_dims(t, x.ndim) * v).to(x.dtype)


class FlowModelView(torch.nn.Module):
    """The reverse view: a VE denoiser seen as a velocity model v(x_t, t) = (x_t - D(x, sigma)) / t with
    x = x_t / (1 - t), sigma = t / (1 - t) (x = x_t and sigma = inf at t = 1), e.g. to drive diffusers' flow
    schedulers with a diffsolve denoiser. `t` is a number or a [B] tensor in (0, 1]."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x_t, t, **cond):
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float64)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        if ((t <= 0) | (t > 1)).any():
            raise ValueError(f"t must lie in (0, 1], got {t.tolist()}")
        sigma = sigma_from_t(t)
        scale = append_dims(torch.where(t == 1, torch.ones_like(t), 1 / (1 - t)), x_t.ndim)
        x = (x_t * scale).to(x_t.dtype)
        d = self.denoiser(x, sigma.to(x_t.dtype) if x_t.dtype != torch.float64 else sigma, **cond)
        return ((x_t - d) / append_dims(t, x_t.ndim)).to(x_t.dtype)


class FlowTime(Solver):
    """A deterministic VE solver run in rectified-flow time: its steps see the state x_t = x / (1 + sigma) on
    the grid t = sigma / (1 + sigma) with D(x_t, t) = D(x, sigma), i.e. they integrate dx_t/dt = (x_t - D) / t
    (the flow ODE, v = (x_t - D) / t), so FlowTime(Heun()) is diffusers' FlowMatchHeunDiscreteScheduler and
    FlowTime(Euler()) its FlowMatchEulerDiscreteScheduler. t = 1 (sigma = inf) is an ordinary point there, so
    the step takes a grid that starts at inf itself (`infinite_start`). Euler / DDIM give the same result in
    either time (the step is exact for a constant D in both); higher-order methods do not (Heun, Runge-Kutta,
    and the DPM-Solver++ multistep correction, whose log-step ratios become ones of t). diffusers'
    DPMSolverMultistepScheduler with flow sigmas is plain DPM++ in sigma (its lambda = log((1 - t) / t) =
    -log sigma). Stochastic, own-grid solvers and exact flows are refused."""

    applies_flows = False
    infinite_start = True

    def __init__(self, base):
        if not isinstance(base, Solver):
            raise ValueError(f"FlowTime needs a diffsolve Solver, got {base!r}")
        if base.stochastic or base.own_grid or base.absorbs_flows:
            raise ValueError(f"FlowTime runs deterministic fixed-grid solvers only, got {base!r}")
        self.base = base
        self.name, self.order, self.history = f"flow_{base.name}", base.order, base.history
        self.evaluates_at_start = base.evaluates_at_start

    def step(self, s):
        ts = [t_from_sigma(v) for v in s.sigmas]

        def den(z, t):
            sig = sigma_from_t(t)
            if isinstance(t, torch.Tensor):
                scale = append_dims(torch.where(t == 1, torch.ones_like(t), 1 / (1 - t)), z.ndim)
            else:
                scale = 1.0 if t == 1 else 1 / (1 - t)
            return s.denoise((z * scale).to(z.dtype), sig)

        x_t = s.x if math.isinf(s.sigma) else s.x / (1 + s.sigma)
        history = tuple(Past(t_from_sigma(p.sigma), p.x / (1 + p.sigma) if math.isfinite(p.sigma) else p.x,
                             p.denoised) for p in s.history)
        inner = Step(s.i, ts, x_t, history, lambda z, t: den(z, t), s.noise, s._run, False)
        return self.base.step(inner) / (1 - ts[s.i + 1])

    def __repr__(self):
        return f"FlowTime({self.base!r})"


# ------------------------------------------------------------------------------------------------ schedules
def _flow_grid(u, scale, append_zero_, dtype, device):
    """sigma = scale * u / (1 - u) for descending flow times u (inf at u = 1), float64, then the final 0."""
    u = torch.as_tensor(u, dtype=torch.float64)
    sig = torch.where(u == 1, torch.full_like(u, math.inf), scale * u / (1 - u))
    return _finish(sig, append_zero_, dtype, device)


def _check_shift(shift, name="shift"):
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {shift!r}")
    return float(shift)


def shift_sigmas(sigmas, shift):
    """The time shift t -> s t / (1 + (s - 1) t) in sigma: sigma -> s sigma (inf and 0 stay)."""
    return torch.as_tensor(sigmas, dtype=torch.float64) * _check_shift(shift)


def sigmas_flow_shift(n, shift=3.0, num_train_timesteps=1000, append_zero_=True, dtype=torch.float64, device="cpu"):
    """diffusers' FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(n) (SD3, static shift; also
    FlowMatchHeunDiscreteScheduler's points): t = linspace(1, t_min, n) shifted, where t_min = shifted(1 / T) is
    the scheduler's own (already shifted) smallest training t, so the low end is shifted twice as diffusers
    does. In sigma: s * u / (1 - u), u = linspace(1, t_min, n); the first entry is inf (t = 1)."""
    n, shift = _check_n(n), _check_shift(shift)
    T = _check_n(num_train_timesteps)
    t_min = shift * (1 / T) / (1 + (shift - 1) / T)
    return _flow_grid(np.linspace(1.0, t_min, n), shift, append_zero_, dtype, device)


def flux_mu(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """Flux's resolution-dependent mu: linear in the packed image sequence length through (base_seq_len,
    base_shift) and (max_seq_len, max_shift) (diffusers' `calculate_shift`, pipelines/flux/pipeline_flux.py)."""
    if not (int(image_seq_len) == image_seq_len and image_seq_len >= 1):
        raise ValueError(f"image_seq_len must be a positive integer, got {image_seq_len!r}")
    if not max_seq_len > base_seq_len:
        raise ValueError(f"need max_seq_len > base_seq_len, got {max_seq_len}, {base_seq_len}")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def sigmas_flow_dynamic(n, image_seq_len=None, mu=None, base_seq_len=256, max_seq_len=4096, base_shift=0.5,
                        max_shift=1.15, append_zero_=True, dtype=torch.float64, device="cpu"):
    """FluxPipeline's grid: u = linspace(1, 1/n, n) under the exponential time shift with mu (`flux_mu` of the
    image sequence length, or given): sigma = e^mu u / (1 - u), inf first."""
    n = _check_n(n)
    if (mu is None) == (image_seq_len is None):
        raise ValueError("give exactly one of image_seq_len= or mu=")
    if mu is None:
        mu = flux_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    if not (isinstance(mu, (int, float)) and math.isfinite(mu)):
        raise ValueError(f"mu must be a finite number, got {mu!r}")
    return _flow_grid(np.linspace(1.0, 1.0 / n, n), math.exp(mu), append_zero_, dtype, device)


def sigmas_flow_dpm(n, shift=3.0, num_train_timesteps=1000, append_zero_=True, dtype=torch.float64, device="cpu"):
    """DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift).set_timesteps(n): u the n largest of
    1 - linspace(1, 1/T, n + 1), shifted; it starts below t = 1 (finite sigma)."""
    n, shift, T = _check_n(n), _check_shift(shift), _check_n(num_train_timesteps)
    u = (1 - np.linspace(1, 1 / T, n + 1))[::-1][:-1].copy()
    return _flow_grid(u, shift, append_zero_, dtype, device)


FLOW_SCHEDULES.update({"flow_shift": sigmas_flow_shift, "flow_dynamic": sigmas_flow_dynamic,
                       "flow_dpm": sigmas_flow_dpm})
