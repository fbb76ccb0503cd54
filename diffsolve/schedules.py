"""Noise schedules: descending sigmas (variance-exploding), ending at 0 unless asked otherwise."""
import math

import numpy as np
import torch

from ._checks import check_positive

SPACINGS = ("leading", "trailing", "linspace")


def append_zero(sigmas):
    """Append the final sigma = 0 (the clean sample)."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check_range(n, sigma_min, sigma_max):
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    check_positive(sigma_min, "sigma_min")
    check_positive(sigma_max, "sigma_max")
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def sigmas_karras(n, sigma_min, sigma_max, rho=7.0, append_zero_=True, dtype=torch.float64, device="cpu"):
    """Karras et al. (2022) eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    _check_range(n, sigma_min, sigma_max)
    check_positive(rho, "rho")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    sigmas = append_zero(sigmas) if append_zero_ else sigmas
    return sigmas.to(dtype=dtype, device=device)


def sigmas_log_uniform(n, sigma_min, sigma_max, append_zero_=True, dtype=torch.float64, device="cpu"):
    """Sigmas evenly spaced in log sigma from sigma_max down to sigma_min."""
    _check_range(n, sigma_min, sigma_max)
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    sigmas = append_zero(sigmas) if append_zero_ else sigmas
    return sigmas.to(dtype=dtype, device=device)


def sigmas_from_alphas_cumprod(alphas_cumprod):
    """VP -> VE: sigma_t = sqrt((1 - abar_t) / abar_t) for every training timestep."""
    acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if ((acp <= 0) | (acp > 1)).any():
        raise ValueError(f"alphas_cumprod must lie in (0, 1], got min {acp.min().item()} max {acp.max().item()}")
    return ((1 - acp) / acp).sqrt()


def discrete_timesteps(num_train_timesteps, n, spacing="leading", steps_offset=0):
    """The descending integer timesteps of diffusers' `DDIMScheduler.set_timesteps` for each spacing."""
    T = int(num_train_timesteps)
    if int(n) != n or not 1 <= n <= T:
        raise ValueError(f"n must be an integer in [1, {T}], got {n}")
    if spacing == "leading":
        t = torch.arange(n, dtype=torch.float64) * (T // n) + steps_offset
    elif spacing == "trailing":  # numpy, not torch: their float aranges / linspaces differ in the last bit,
        # which moves x.5 roundings (trailing n=48, linspace n=27 with T=1000); diffusers uses numpy's.
        t = torch.from_numpy(np.round(np.arange(T, 0, -T / n)) - 1)
    elif spacing == "linspace":
        t = torch.from_numpy(np.linspace(0, T - 1, n).round())
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return t.flip(0).long() if spacing != "trailing" else t.long()


def sigmas_discrete(alphas_cumprod, n, spacing="leading", steps_offset=0, final_alphas_cumprod=1.0,
                    dtype=torch.float64):
    """Sigmas at a diffusers scheduler's inference timesteps, plus the final sigma.

    Returns `(sigmas, timesteps)`: sigmas has n + 1 descending entries. The last one is the sigma of
    `final_alphas_cumprod`: 1.0 (diffusers' `set_alpha_to_one=True`) gives 0; Stable Diffusion's
    `set_alpha_to_one=False` passes `alphas_cumprod[0]`, which ends at about 0.029, not 0.
    diffusers' DDIM steps from timestep t to t - T // n; that is the next timestep of this grid for
    "leading" spacing, and for "trailing" when T is a multiple of n.
    """
    acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    timesteps = discrete_timesteps(len(acp), n, spacing, steps_offset)
    if timesteps.max() >= len(acp) or timesteps.min() < 0:
        raise ValueError(f"timesteps {timesteps.tolist()} fall outside [0, {len(acp) - 1}]")
    sigmas = sigmas_from_alphas_cumprod(acp[timesteps])
    final = sigmas_from_alphas_cumprod(torch.tensor([float(final_alphas_cumprod)], dtype=torch.float64))
    return torch.cat([sigmas, final]).to(dtype), timesteps
