"""Any torchdiffeq method (fixed-grid or adaptive) on the probability-flow ODE dx/dsigma = (x - D) / sigma.

Each interval [sigma_i, sigma_{i+1}] is one `torchdiffeq.odeint` call, one step of the loop, so split flows
are applied after every interval as for the built-in solvers; a fixed-grid method takes one step per interval
unless `options` say otherwise. The field is singular at sigma = 0, so a last step to 0 is Euler (returns D),
as in Heun.
"""
import importlib

import torch
import torchdiffeq

from .sampling import Solver, sample

__all__ = ["METHODS", "Odeint", "sample_odeint"]

METHODS = sorted(importlib.import_module("torchdiffeq._impl.odeint").SOLVERS)
ORDERS = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4, "explicit_adams": 4, "implicit_adams": 4,
          "fixed_adams": 4, "bosh3": 3, "adaptive_heun": 2, "fehlberg2": 2, "dopri5": 5, "dopri8": 8,
          "scipy_solver": 4}


class Odeint(Solver):
    """One `torchdiffeq.odeint(method=...)` call per interval; `order` is the method's."""

    name = "odeint"

    def __init__(self, method="rk4", rtol=1e-5, atol=1e-5, options=None):
        if method not in METHODS:
            raise ValueError(f"unknown torchdiffeq method {method!r}; one of {METHODS}")
        self.method, self.rtol, self.atol, self.options = method, rtol, atol, options
        self.order = ORDERS.get(method, 1)

    def step(self, s):
        x = s.x
        d = s.denoise(x, s.sigma)
        if s.sigma_next == 0:
            return d
        t = torch.tensor([s.sigma, s.sigma_next], dtype=x.dtype, device=x.device)
        t0 = float(t[0])

        def field(sigma, z):
            sigma = float(sigma)
            reuse = sigma == t0 and torch.equal(z, x)  # the first stage is the evaluation made above
            return (z - (d if reuse else s.denoise(z, sigma))) / sigma
        return torchdiffeq.odeint(field, x, t, method=self.method, rtol=self.rtol, atol=self.atol,
                                  options=self.options)[-1]

    def __repr__(self):
        return f"Odeint(method={self.method!r})"


def sample_odeint(model, x, sigmas, extra_args=None, callback=None, disable=None, *, method="rk4", rtol=1e-5,
                  atol=1e-5, options=None, **loop):
    """Integrate with `torchdiffeq.odeint(method=...)` over each interval of `sigmas`."""
    return sample(Odeint(method, rtol, atol, options), model, x, sigmas, extra_args, callback, disable, **loop)
