"""Partial runs: split a sigma grid, run only part of it, start from an image, snap to a model's sigmas.

What ComfyUI's SplitSigmas / KSamplerAdvanced (start_at_step, end_at_step) and `denoise < 1` do, and
diffusers' img2img `strength` and SDXL's base -> refiner hand-off (`denoising_end` / `denoising_start`),
as small pure functions on diffsolve's descending VE grids (x = x0 + sigma n; sigmas end at the final
sigma, usually 0). Every part of a split shares its boundary sigma with the next part, so running the parts
one after the other with `diffsolve.sample` is the full run: bit for bit for solvers that keep no history
(Euler, Heun, DDIM with the same noise); a multistep solver restarts its history at the boundary (its first
step there is lower order), as in ComfyUI, so the result differs slightly (docs/partial-runs.md).
"""
import math
import numbers

import torch

from ._checks import check_sigmas

__all__ = ["denoise_sigmas", "denoise_steps", "handoff_step", "img2img_start", "partial_sigmas", "quantize_sigmas",
           "split_sigmas", "strength_start_step"]


def _check_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _grid(sigmas):
    """A validated descending grid (check_sigmas: 1-D, >= 2 entries, finite, >= 0, strictly descending)."""
    return check_sigmas(sigmas)


def split_sigmas(sigmas, step):
    """(high, low) = (sigmas[:step + 1], sigmas[step:]): ComfyUI's SplitSigmas. The two parts share the
    boundary sigma sigmas[step]; running high then low is the full run. Both parts must hold at least one
    step: 1 <= step <= len(sigmas) - 2."""
    sigmas = _grid(sigmas)
    step, n = _check_int(step, "step"), len(sigmas) - 1
    if not 1 <= step <= n - 1:
        raise ValueError(f"step must be in [1, {n - 1}] to split a grid of {n} steps into two runnable parts, "
                         f"got step={step}")
    return sigmas[:step + 1], sigmas[step:]


def partial_sigmas(sigmas, start_step=0, end_step=None, *, force_full_denoise=False):
    """The steps start_step .. end_step - 1 of the grid, sigmas[start_step:end_step + 1]: KSamplerAdvanced's
    start_at_step / end_at_step (end_step None: to the end). `force_full_denoise` (ComfyUI's
    "return_with_leftover_noise: disable") sets the last kept sigma to 0 when the run stops early, so the
    part ends at the clean sample. Needs 0 <= start_step < end_step <= len(sigmas) - 1."""
    sigmas = _grid(sigmas)
    n = len(sigmas) - 1
    start_step = _check_int(start_step, "start_step")
    end_step = n if end_step is None else _check_int(end_step, "end_step")
    if not 0 <= start_step < end_step <= n:
        raise ValueError(f"need 0 <= start_step < end_step <= {n} (the grid has {n} steps), "
                         f"got start_step={start_step}, end_step={end_step}")
    part = sigmas[start_step:end_step + 1].clone()
    if force_full_denoise and end_step < n:
        part[-1] = 0.0
    return part


def _check_denoise(denoise):
    if isinstance(denoise, bool) or not isinstance(denoise, numbers.Real) or not 0 < denoise <= 1:
        raise ValueError(f"denoise must be a number in (0, 1], got {denoise!r}")
    return float(denoise)


def denoise_steps(steps, denoise):
    """How many steps ComfyUI's schedule is built with for `steps` steps at `denoise`: int(steps / denoise),
    or `steps` itself when denoise > 0.9999 (comfy/samplers.py, KSampler.set_steps)."""
    steps, denoise = _check_int(steps, "steps"), _check_denoise(denoise)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return steps if denoise > 0.9999 else int(steps / denoise)


def denoise_sigmas(schedule, steps, denoise):
    """ComfyUI's `denoise`: build the schedule with int(steps / denoise) steps and keep its last steps + 1
    sigmas (comfy/samplers.py, KSampler.set_steps). `schedule(n)` returns a descending grid of n steps
    (n + 1 sigmas ending at the final sigma), e.g. functools.partial(sigmas_karras, sigma_min=..., sigma_max=...).
    The run then starts from `img2img_start(x0, sigmas, noise)`."""
    if not callable(schedule):
        raise ValueError(f"schedule must be a callable n -> sigmas, got {schedule!r}")
    total = denoise_steps(steps, denoise)
    full = _grid(schedule(total))
    if len(full) < steps + 1:
        raise ValueError(f"schedule({total}) returned {len(full)} sigmas, fewer than steps + 1 = {steps + 1}")
    return full[len(full) - (steps + 1):]


def strength_start_step(steps, strength):
    """diffusers' img2img `strength`: the first step kept of an n-step grid, n - min(int(n * strength), n)
    (StableDiffusionImg2ImgPipeline.get_timesteps). Run `partial_sigmas(sigmas, start)` from
    `img2img_start`; strength 1 keeps every step, a strength with int(n * strength) = 0 keeps none."""
    steps = _check_int(steps, "steps")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    start = steps - min(int(steps * strength), steps)
    if start >= steps:
        raise ValueError(f"strength={strength} with {steps} steps keeps no step (int({steps} * {strength}) = 0)")
    return start


def handoff_step(timesteps, fraction, num_train_timesteps=1000):
    """SDXL's base -> refiner hand-off: the base (`denoising_end=fraction`) runs the timesteps
    t >= round(T - fraction T), the refiner (`denoising_start=fraction`) the rest. Returns that count k of
    base steps: split the grid with `split_sigmas(sigmas, k)` (StableDiffusionXL(Img2Img)Pipeline, 9.1 and
    get_timesteps; one timestep per step, i.e. a first-order diffusers scheduler)."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction < 1:
        raise ValueError(f"fraction (denoising_end / denoising_start) must be in (0, 1), got {fraction!r}")
    T = _check_int(num_train_timesteps, "num_train_timesteps")
    cutoff = int(round(T - fraction * T))
    ts = torch.as_tensor(timesteps)
    if ts.ndim != 1 or len(ts) < 2 or (ts[1:] >= ts[:-1]).any():
        raise ValueError(f"timesteps must be a strictly descending 1-D sequence of >= 2 entries, got {ts.tolist()}")
    k = int((ts >= cutoff).sum())
    if not 1 <= k <= len(ts) - 1:
        raise ValueError(f"fraction={fraction} puts the cutoff timestep {cutoff} outside the grid "
                         f"{ts.tolist()}: one side would get {k} of {len(ts)} steps")
    return k


def img2img_start(x0, sigmas, noise):
    """The start of a partial run from clean x0 (VE): x = x0 + sigmas[0] * noise. `sigmas` is the part's
    grid (or its first sigma); `noise` is standard normal like x0. diffusers' add_noise is the same point in
    VP coordinates (sqrt(abar) x0 + sqrt(1 - abar) n = x / sqrt(1 + sigma**2)); ComfyUI instead scales
    the noise by sqrt(1 + sigma**2) when the run starts at the model's sigma_max (its max_denoise)."""
    if not isinstance(x0, torch.Tensor) or not isinstance(noise, torch.Tensor):
        raise ValueError(f"x0 and noise must be tensors, got {type(x0).__name__} and {type(noise).__name__}")
    if noise.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but x0 has shape {tuple(x0.shape)}")
    first = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if first.numel() == 0:
        raise ValueError("sigmas is empty")
    sigma = float(first[0])
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"the starting sigma must be finite and >= 0, got {sigma}")
    return x0 + sigma * noise.to(x0.dtype)


def _table(model_sigmas):
    table = torch.as_tensor(model_sigmas, dtype=torch.float64).flatten().cpu()
    if len(table) < 1 or not torch.isfinite(table).all() or (table <= 0).any():
        raise ValueError(f"model_sigmas must be a non-empty table of finite sigmas > 0, got {table.tolist()[:8]}...")
    return table


def quantize_sigmas(sigmas, model_sigmas, unique=True):
    """Snap every non-zero sigma to the nearest of a discrete model's sigmas in log space (the idea of
    k-diffusion PR #23; k-diffusion's DiscreteSchedule.sigma_to_t(quantize=True) picks the same index:
    argmin_t |log sigma - log model_sigmas[t]|, the first on a tie). Zeros stay 0. `unique` drops an entry
    equal to the one before it, so the grid stays strictly descending when two sigmas snap to one table
    entry (fewer steps); unique=False keeps the length. Returns float64 on the grid's device."""
    grid = torch.as_tensor(sigmas, dtype=torch.float64)
    if grid.ndim != 1 or len(grid) < 1 or not torch.isfinite(grid).all() or (grid < 0).any():
        raise ValueError(f"sigmas must be a 1-D tensor of finite sigmas >= 0, got {grid.tolist()}")
    table = _table(model_sigmas).to(grid.device)
    idx = (grid.clamp_min(torch.finfo(torch.float64).tiny).log()[:, None] - table.log()[None]).abs().argmin(-1)
    out = torch.where(grid > 0, table[idx], grid)
    if unique and len(out) > 1:
        keep = torch.cat([out.new_ones(1, dtype=torch.bool), out[1:] != out[:-1]])
        out = out[keep]
    return out
