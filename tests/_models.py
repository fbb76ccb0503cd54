"""Closed-form models that tests share (import as `from _models import ...`)."""
import math

import torch

from diffsolve.denoisers import append_dims


class SingleGaussian:
    """Data N(mu, s**2 I): exact denoiser and exact probability-flow ODE solution."""

    def __init__(self, mu=0.5, s=0.3):
        self.mu, self.s2 = mu, s ** 2

    def __call__(self, x, sigma, **cond):
        return self.mu + self.s2 / (self.s2 + append_dims(sigma, x.ndim) ** 2) * (x - self.mu)

    def flow(self, x, sigma_from, sigma_to):
        """x(sigma) - mu = (x0 - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma0^2))."""
        return self.mu + (x - self.mu) * math.sqrt((self.s2 + sigma_to ** 2) / (self.s2 + sigma_from ** 2))


def identity_model(x, sigma, **cond):
    """D(x) = x: the model term of the ODE vanishes."""
    return x


def log_slope(ns, errors):
    """Least-squares slope of log(error) against log(1 / n): the observed order of convergence."""
    xs = torch.tensor([math.log(1 / n) for n in ns], dtype=torch.float64)
    ys = torch.tensor([math.log(e) for e in errors], dtype=torch.float64)
    xc = xs - xs.mean()
    return float((xc * (ys - ys.mean())).sum() / (xc ** 2).sum())
