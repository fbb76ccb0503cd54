"""diffsolve: composable diffusion samplers and score distillation (mean-shift distillation) in pure torch.

One convention everywhere: a denoiser D(x, sigma, **cond) -> x0_hat in variance-exploding coordinates.
"""
from .denoisers import *  # noqa: F401,F403
from .noise import *  # noqa: F401,F403  (gaussian_noise, seeded_noise, brownian_tree_noise)
from .schedules import *  # noqa: F401,F403  (every schedule, SCHEDULES and get_sigmas)
from .sampling import *  # noqa: F401,F403  (the loop and the step contract)
from .solvers import *  # noqa: F401,F403  (every Solver class, sample_<name> function and the registry)
from .transforms import *  # noqa: F401,F403
from . import denoisers as _denoisers, noise as _noise, sampling as _sampling, schedules as _schedules
from . import solvers as _solvers, transforms as _transforms
from ._version import __version__

__all__ = sorted({"__version__", "sample_odeint", *_denoisers.__all__, *_noise.__all__, *_schedules.__all__,
                  *_sampling.__all__, *_solvers.__all__, *_transforms.__all__})
