"""diffsolve: composable diffusion samplers and score distillation (mean-shift distillation) in pure torch.

One convention everywhere: a denoiser D(x, sigma, **cond) -> x0_hat in variance-exploding coordinates.
"""
from .denoisers import (VPDenoiser, VPModelView, DiscreteTimesteps, append_dims, denoised_from_eps,
                        denoised_from_v, eps_from_denoised, score_from_denoised, v_from_denoised)
from .noise import gaussian_noise, seeded_noise
from .odeint import sample_odeint
from .schedules import (append_zero, discrete_timesteps, sigmas_discrete, sigmas_from_alphas_cumprod,
                        sigmas_karras, sigmas_log_uniform)
from .sampling import Past, Run, SampleInfo, Solver, Step, sample
from .solvers import *  # noqa: F401,F403  (every Solver class, sample_<name> function and the registry)
from .transforms import (Flow, GaussianKernel, Guidance, LimitedInterval, Transform, autoguidance, cfg, compose,
                         gaussian_kernel, limited_interval)

from ._version import __version__
