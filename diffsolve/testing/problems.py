"""Reference problems with exact answers, in diffsolve's convention D(x, sigma) -> x0_hat, x = x0 + sigma n.

  - `SingleGaussian`: data N(mu, diag(s**2)); exact denoiser, exact probability-flow solution between any two
    sigmas and exact marginals N(mu, s**2 + sigma**2) of every reverse SDE of the family at every sigma.
  - `PointMass`: data at one point c; D = c, the flow x(sigma) = c + (x0 - c) sigma / sigma0 is linear in sigma, so
    every consistent deterministic step (Euler / DDIM, Heun, the exponential integrators, Adams) is exact on it.
  - `MixtureProblem`: a `diffsolve.analytic.GaussianMixture` (exact denoiser, exact marginals p * N(0, sigma**2 I)),
    with the exact mean and covariance of the MSD product density p(y) exp(-|y - c|**2 / lambda**2).
  - `KernelProblem`: the identity denoiser under `diffsolve.gaussian_kernel` (paper eq. 9-15): the model term
    vanishes and the kernel's exact flow is known, so it measures how a sampler copes with the stiff term alone;
    optionally Gaussian data centred at the kernel's centre, whose combined flow is still exact.
Every problem works on x of shape [B, d] (or any trailing shape for the scalar-parameter ones), float32 or float64.
"""
import math

import torch

from ..analytic import GaussianMixture
from ..denoisers import append_dims
from ..sampling import Run
from ..transforms import gaussian_kernel

__all__ = ["KernelProblem", "MixtureProblem", "PointMass", "SingleGaussian", "constant_stiffness_sigmas",
           "default_mixture", "identity_model", "log_slope", "normal_quantiles"]


def identity_model(x, sigma, **cond):
    """D(x) = x: the model term (x - D) / sigma of the probability-flow ODE vanishes."""
    return x


def log_slope(ns, errors):
    """Least-squares slope of log(error) against log(1 / n): the observed order of convergence."""
    xs = torch.tensor([math.log(1 / n) for n in ns], dtype=torch.float64)
    ys = torch.tensor([math.log(e) for e in errors], dtype=torch.float64)
    xc = xs - xs.mean()
    return float((xc * (ys - ys.mean())).sum() / (xc ** 2).sum())


def normal_quantiles(rows, dim, dtype=torch.float64, seed=0):
    """[rows, dim] standard-normal quantiles at the probabilities (i + 1/2) / rows, each column a fixed
    permutation of the same set: deterministic start points that never reach the far tails (|z| < 2.6 at 64 rows)."""
    p = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows
    z = math.sqrt(2.0) * torch.erfinv(2 * p - 1)
    g = torch.Generator().manual_seed(seed)
    return z[torch.rand(rows, dim, generator=g, dtype=torch.float64).argsort(0)].to(dtype)


def _as(value, like):
    return value.to(device=like.device, dtype=like.dtype) if isinstance(value, torch.Tensor) else value


class SingleGaussian:
    """Data N(mu, s**2) per coordinate (mu, s floats, or [d] tensors for an anisotropic Gaussian).

    Exact denoiser D = mu + s**2 / (s**2 + sigma**2) (x - mu); exact probability-flow solution
    x(sigma) - mu = (x0 - mu) sqrt((s**2 + sigma**2) / (s**2 + sigma0**2)) (Karras et al. 2022, eq. 4 with a
    Gaussian p); the marginal at every sigma is N(mu, s**2 + sigma**2), which every reverse SDE of the DDIM / ancestral
    family started from the marginal keeps."""

    def __init__(self, mu=0.5, s=0.3):
        self.mu = mu if not isinstance(mu, torch.Tensor) else mu.to(torch.float64)
        s = s if not isinstance(s, torch.Tensor) else s.to(torch.float64)
        self.s2 = s ** 2

    def __call__(self, x, sigma, **cond):
        mu, s2 = _as(self.mu, x), _as(self.s2, x)
        return mu + s2 / (s2 + append_dims(sigma, x.ndim) ** 2) * (x - mu)

    def flow(self, x, sigma_from, sigma_to):
        """x(sigma) - mu = (x0 - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma0^2))."""
        mu, s2 = _as(self.mu, x), _as(self.s2, x)
        ratio = (s2 + float(sigma_to) ** 2) / (s2 + float(sigma_from) ** 2)
        return mu + (x - mu) * (math.sqrt(ratio) if not isinstance(ratio, torch.Tensor) else ratio.sqrt())

    def marginal(self, sigma):
        """(mean, variance) of the exact marginal N(mu, s^2 + sigma^2) at sigma."""
        return self.mu, self.s2 + float(sigma) ** 2

    def start(self, rows, dim, sigma, dtype=torch.float64):
        """Deterministic start points at sigma: the marginal's `normal_quantiles`, [rows, dim]."""
        mean, var = self.marginal(sigma)
        z = normal_quantiles(rows, dim, dtype)
        var = var.to(dtype) if isinstance(var, torch.Tensor) else var
        return (_as(mean, z) + z * (var ** 0.5)).to(dtype)


class PointMass:
    """Data at c (a float or a [d] tensor): D = c for every x and sigma, exact flow c + (x0 - c) sigma / sigma0."""

    def __init__(self, c=0.25):
        self.c = c if not isinstance(c, torch.Tensor) else c.to(torch.float64)

    def __call__(self, x, sigma, **cond):
        return torch.zeros_like(x) + _as(self.c, x)

    def flow(self, x, sigma_from, sigma_to):
        c = _as(self.c, x)
        return c + (x - c) * (float(sigma_to) / float(sigma_from))


class MixtureProblem:
    """A Gaussian mixture as data: the exact denoiser (`GaussianMixture.denoise`), exact draws of the marginal at any
    sigma, its exact moments (mean, cov + sigma^2 I), and the exact moments of the product density
    p(y) exp(-|y - c|^2 / lambda^2) (`GaussianMixture.product_with_gaussian` with std lambda / sqrt 2)."""

    def __init__(self, mixture):
        if not isinstance(mixture, GaussianMixture):
            raise ValueError(f"mixture must be a diffsolve.analytic.GaussianMixture, got {mixture!r}")
        self.mixture = mixture

    @property
    def dim(self):
        return self.mixture.dim

    def __call__(self, x, sigma, **cond):
        return self.mixture.denoise(x, sigma).to(x.dtype)

    def sample(self, n, sigma, generator=None, dtype=torch.float64):
        return self.mixture.sample(n, sigma, generator=generator).to(dtype)

    def marginal(self, sigma):
        """(mean [d], covariance [d, d]) of p_sigma = p * N(0, sigma^2 I)."""
        eye = torch.eye(self.dim, dtype=self.mixture.means.dtype)
        return self.mixture.mean(), self.mixture.covariance() + float(sigma) ** 2 * eye

    def product(self, center, bandwidth):
        """The product density p(y) G(y), G(y) = exp(-|y - c|^2 / lambda^2) (paper eq. 9; std lambda / sqrt 2),
        as a GaussianMixture."""
        return self.mixture.product_with_gaussian(torch.as_tensor(center, dtype=self.mixture.means.dtype),
                                                  float(bandwidth) / math.sqrt(2.0))

    def product_moments(self, center, bandwidth):
        """Exact (mean, covariance) of the product density."""
        p = self.product(center, bandwidth)
        return p.mean(), p.covariance()


def default_mixture(dim=2, dtype=torch.float64):
    """The kit's anisotropic test mixture: three components with rotated, unequal covariances and unequal weights
    (1-D: two components), inside [-1.5, 1.5]."""
    if dim == 1:
        return GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-0.8], [0.5]], dtype=dtype),
                               torch.tensor([[[0.04]], [[0.09]]], dtype=dtype))
    means = torch.zeros(3, dim, dtype=dtype)
    means[:, :2] = torch.tensor([[-0.7, 0.2], [0.6, 0.5], [0.1, -0.6]], dtype=dtype)
    covs = torch.zeros(3, dim, dim, dtype=dtype)
    for k, (angle, a, b) in enumerate([(0.3, 0.25, 0.1), (1.2, 0.18, 0.08), (2.0, 0.3, 0.12)]):
        rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=dtype)
        covs[k, :2, :2] = rot @ torch.diag(torch.tensor([a, b], dtype=dtype) ** 2) @ rot.T
        covs[k, 2:, 2:] = 0.1 ** 2 * torch.eye(dim - 2, dtype=dtype)
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=dtype), means, covs)


class KernelProblem:
    """The kernel-only stiff problem: D(x) = x under `diffsolve.gaussian_kernel(c, lambda)` (paper eq. 9, 12).

    Score face (`__call__`, a plain denoiser any sampler can run): D' = D + sigma^2 * 2 (c - x) / lambda^2, so
    dx/dsigma = (x - D') / sigma = 2 sigma (x - c) / lambda^2 and x(sigma) = c + (x0 - c) exp(-(sigma0^2 - sigma^2) /
    lambda^2) (`flow`). An explicit Euler step multiplies x - c by 1 - 2 sigma |dsigma| / lambda^2: bounded iff
    sigma |dsigma| / lambda^2 <= 1. Split face (`transforms()`): the same kernel as an exact flow applied by the
    loop. With `data_std` the model is Gaussian data N(c, s^2) instead of the identity, and the combined flow
    c + (x0 - c) sqrt((s^2 + sigma^2) / (s^2 + sigma0^2)) exp(-(sigma0^2 - sigma^2) / lambda^2) is still exact."""

    def __init__(self, bandwidth, center=0.0, data_std=None):
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        self.lam, self.c, self.data_std = float(bandwidth), float(center), data_std
        self.model = identity_model if data_std is None else SingleGaussian(self.c, float(data_std))

    def kernel(self, x, face="score"):
        return gaussian_kernel(torch.full_like(x, self.c), self.lam, face=face)

    def __call__(self, x, sigma, **cond):
        """The score face on any batch: diffsolve's own kernel transform, built for x's shape."""
        return self.kernel(x).wrap(self.model, Run(x.shape[0]))(x, sigma, **cond).to(x.dtype)

    def transforms(self, x):
        """The split face for a run from x: the loop integrates the kernel exactly."""
        return [self.kernel(x, face="split")]

    def flow(self, x, sigma_from, sigma_to):
        s0, s1 = float(sigma_from), float(sigma_to)
        factor = math.exp(-(s0 ** 2 - s1 ** 2) / self.lam ** 2)
        if self.data_std is not None:
            v = float(self.data_std) ** 2
            factor *= math.sqrt((v + s1 ** 2) / (v + s0 ** 2))
        return self.c + (x - self.c) * factor


def constant_stiffness_sigmas(sigma_max, steps, sigma_end):
    """A grid on which sigma |dsigma| is the same constant C at every step: sigma_{i+1} = sigma_i - C / sigma_i, with C
    found by bisection so that `steps` steps end at `sigma_end` (> 0). Returns (sigmas [steps + 1] float64, C). On it
    the kernel's per-step stiffness sigma |dsigma| / lambda^2 = C / lambda^2 exactly (a grid uniform in sigma^2 has
    it only to first order)."""
    if not 0 < sigma_end < sigma_max or steps < 1:
        raise ValueError(f"need 0 < sigma_end < sigma_max and steps >= 1, got {sigma_end}, {sigma_max}, {steps}")

    def walk(c):
        s = [float(sigma_max)]
        for _ in range(steps):
            if s[-1] ** 2 <= c:
                return None
            s.append(s[-1] - c / s[-1])
        return s

    lo, hi = 0.0, float(sigma_max) ** 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        s = walk(mid)
        if s is None or s[-1] < sigma_end:
            hi = mid
        else:
            lo = mid
    return torch.tensor(walk(lo), dtype=torch.float64), lo
