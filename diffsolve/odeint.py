"""Any torchdiffeq method (fixed-grid or adaptive) on the probability-flow ODE dx/dsigma = (x - D) / sigma.

Each interval [sigma_i, sigma_{i+1}] is one `torchdiffeq.odeint` call, so split flows are applied after
every interval exactly as in the built-in solvers; a fixed-grid method takes one step per interval
unless `options` say otherwise. The field is singular at sigma = 0, so a last step to 0 is Euler
(returns D), as in Heun.
"""
import importlib

import torch
import torchdiffeq

from .solvers import _run

METHODS = sorted(importlib.import_module("torchdiffeq._impl.odeint").SOLVERS)


@torch.no_grad()
def sample_odeint(model, x, sigmas, extra_args=None, callback=None, disable=None, *, method="rk4", rtol=1e-5,
                  atol=1e-5, options=None, transforms=(), step_hook=None, check_finite=True, return_info=False):
    """Integrate with `torchdiffeq.odeint(method=...)` over each interval of `sigmas`."""
    if method not in METHODS:
        raise ValueError(f"unknown torchdiffeq method {method!r}; one of {METHODS}")

    def step(den, x, i, sigma, sigma_next):
        d = den(x, sigma).to(x.dtype)
        if sigma_next == 0:
            return d, d, sigma

        t = torch.tensor([sigma, sigma_next], dtype=x.dtype, device=x.device)
        t0 = float(t[0])

        def field(s, z):
            s = float(s)
            reuse = s == t0 and torch.equal(z, x)  # the first stage is the evaluation made above
            return (z - (d if reuse else den(z, s).to(z.dtype))) / s
        x_next = torchdiffeq.odeint(field, x, t, method=method, rtol=rtol, atol=atol, options=options)[-1]
        return x_next, d, sigma
    return _run(step, model, x, sigmas, extra_args, callback, disable, transforms, 0.0, step_hook, check_finite,
                return_info)
