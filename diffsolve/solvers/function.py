"""Any k-diffusion-style sampler function `fn(model, x, sigmas, extra_args=None, callback=None, disable=None, ...)`
as a Solver: one call of `fn` per interval [sigma, sigma_next] of the loop, so the loop's transforms, counting,
checks and split flows apply around each of its steps.

A single-step sampler run interval by interval is the same chain as over the whole grid. A multistep one restarts
its history at every interval (its first-order start-up step every time), and a churned one sees a two-point
grid in its gamma = s_churn / (len(sigmas) - 1): give diffsolve's own solvers for those.
"""
import inspect

import torch

from ..sampling import Solver

__all__ = ["FunctionSolver"]


class FunctionSolver(Solver):
    """`fn` as one loop step per interval. Declare what the loop cannot see: `order`, `stochastic` and the
    `drift_factor` of its noise (1 for ODE samplers; 1 + eta**2 for ancestral ones). The loop's noise sampler
    is passed as `noise_sampler=` when `fn` takes one; `options` go to every call."""

    name = "function"

    def __init__(self, fn, *, order=1, stochastic=False, drift_factor=1.0, **options):
        if not callable(fn):
            raise ValueError(f"fn must be a sampler function, got {fn!r}")
        if int(order) != order or order < 1:
            raise ValueError(f"order must be a positive integer, got {order!r}")
        if not drift_factor >= 1:
            raise ValueError(f"drift_factor must be >= 1, got {drift_factor!r}")
        params = inspect.signature(fn).parameters
        self.fn, self.options, self.order = fn, dict(options), int(order)
        self.stochastic, self.drift_factor = bool(stochastic), float(drift_factor)
        self.takes_noise_sampler = "noise_sampler" in params

    def drift(self, sigmas, i):
        return self.drift_factor if self.stochastic and sigmas[i + 1] > 0 else 1.0

    def step(self, s):
        grid = torch.tensor([s.sigma, s.sigma_next], dtype=torch.float64 if s.x.dtype == torch.float64
                            else torch.float32, device=s.x.device)
        extra = {"noise_sampler": s.noise} if self.takes_noise_sampler else {}
        return self.fn(lambda x, sigma, **cond: s.denoise(x, sigma), s.x, grid, disable=True,
                       **extra, **self.options)

    def __repr__(self):
        return f"FunctionSolver({getattr(self.fn, '__name__', self.fn)!r})"
