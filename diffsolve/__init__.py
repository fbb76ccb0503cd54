"""diffsolve: composable diffusion samplers and score distillation (mean-shift distillation) in pure torch.

One convention everywhere: a denoiser D(x, sigma, **cond) -> x0_hat in variance-exploding coordinates.
"""
from .denoisers import *  # noqa: F401,F403
from .noise import *  # noqa: F401,F403  (gaussian_noise, seeded_noise, brownian_tree_noise)
from .partial import *  # noqa: F401,F403  (split / partial / denoise < 1 / img2img grids, sigma quantisation)
from .schedules import *  # noqa: F401,F403  (every schedule, SCHEDULES and get_sigmas)
from .sampling import *  # noqa: F401,F403  (the loop and the step contract)
from .solvers import *  # noqa: F401,F403  (every Solver class, sample_<name> function and the registry)
from .transforms import *  # noqa: F401,F403
from .guidance import *  # noqa: F401,F403  (guidance methods beyond CFG: rescale, APG, CFG-Zero*, CFG++, ...)
from .flow_matching import *  # noqa: F401,F403  (rectified-flow denoiser, flow-time solvers, shifted schedules)
from . import denoisers as _denoisers, noise as _noise, partial as _partial, sampling as _sampling
from . import schedules as _schedules, flow_matching as _flow_matching
from . import solvers as _solvers, transforms as _transforms
from . import guidance as _guidance
from ._version import __version__

__all__ = sorted({"__version__", "sample_odeint", *_denoisers.__all__, *_noise.__all__, *_partial.__all__, *_schedules.__all__,
                  *_sampling.__all__, *_solvers.__all__, *_transforms.__all__, *_flow_matching.__all__,
                  *_guidance.__all__})
