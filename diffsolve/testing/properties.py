"""Single-case properties for property-based tests: each takes the drawn inputs (a schedule, a mixture, a split, a
bandwidth, a guidance scale, a dtype) and raises AssertionError with the numbers when the property fails. Pair them
with `diffsolve.testing.strategies` under hypothesis' `@given` (see docs/testing.md)."""
import math

import torch

from ..transforms import cfg, compose
from .problems import KernelProblem, MixtureProblem, PointMass, SingleGaussian, identity_model, normal_quantiles
from .report import rel_diff, realized
from .samplers import Noise, as_sampler

__all__ = ["assert_batch_split_invariant", "assert_finite", "assert_guidance_exact", "assert_kernel_flow_exact",
           "assert_point_mass_exact"]


def _tol(sampler, dtype, tol):
    if tol is not None:
        return tol
    return max(1e3 * sampler.precision, 1e-9 if dtype == torch.float64 else 1e-4)


def assert_point_mass_exact(sampler, sigmas, dtype=torch.float64, tol=None):
    """A deterministic sampler reproduces the point mass's linear flow c + (x0 - c) sigma / sigma0 on this grid."""
    sampler = as_sampler(sampler)
    c = torch.tensor([0.25, -0.5], dtype=torch.float64)
    x0 = (c + float(sigmas[0]) * normal_quantiles(4, 2)).to(dtype)
    res = sampler.run(PointMass(c), x0, sigmas, Noise())
    grid = realized(res, torch.as_tensor(sigmas, dtype=torch.float64))
    exact = PointMass(c).flow(x0.to(torch.float64), grid[0], grid[-1])
    err = (res.x.to(torch.float64) - exact).abs().max().item() / (x0.to(torch.float64) - c).abs().max().item()
    assert err <= _tol(sampler, dtype, tol), \
        f"{sampler.name}: point-mass error {err:.3e} on sigmas {list(map(float, sigmas))}"


def assert_batch_split_invariant(sampler, mixture, sigmas, sizes, dtype=torch.float64, seed=0, tol=None):
    """Running the rows in chunks of `sizes` (seeded per-row noise) equals running them at once."""
    sampler = as_sampler(sampler)
    prob = mixture if isinstance(mixture, MixtureProblem) else MixtureProblem(mixture)
    rows = sum(sizes)
    x = prob.sample(rows, float(sigmas[0]), torch.Generator().manual_seed(seed), dtype)
    full = sampler.run(prob, x, sigmas, Noise(seed)).x
    parts, start = [], 0
    for size in sizes:
        parts.append(sampler.run(prob, x[start:start + size], sigmas, Noise(seed, start)).x)
        start += size
    diff = rel_diff(full, torch.cat(parts))
    limit = tol if tol is not None else (1e-12 if dtype == torch.float64 else 1e-6)
    assert diff <= limit, f"{sampler.name}: chunks {list(sizes)} differ from the whole batch by {diff:.3e} (relative)"


def assert_finite(sampler, model, x, sigmas):
    """The output is finite."""
    sampler = as_sampler(sampler)
    y = sampler.run(model, x, sigmas, Noise()).x
    assert torch.isfinite(y).all(), f"{sampler.name}: non-finite output on sigmas {list(map(float, sigmas))}"


def assert_kernel_flow_exact(sampler, sigmas, bandwidth, tol=1e-10):
    """With the identity denoiser only the split kernel acts: a flow-applying sampler gives its exact flow
    c + (x0 - c) exp(-(sigma0^2 - sigma^2) / lambda^2) (the loop carries multistep history through the flows)."""
    sampler = as_sampler(sampler)
    prob = KernelProblem(bandwidth, center=0.5)
    x0 = 0.5 + normal_quantiles(4, 3)
    res = sampler.run(identity_model, x0, sigmas, Noise(), transforms=prob.transforms(x0))
    grid = realized(res, torch.as_tensor(sigmas, dtype=torch.float64))
    err = (res.x - prob.flow(x0, grid[0], grid[-1])).abs().max().item()
    assert err <= tol, f"{sampler.name}: kernel flow error {err:.3e} at lambda {bandwidth}"


class _Conditional:
    """Gaussian data whose mean is the condition: D(x, sigma, c) = c + s^2 / (s^2 + sigma^2) (x - c)."""

    def __init__(self, s):
        self.s2 = s ** 2

    def __call__(self, x, sigma, c=None, **cond):
        sig = sigma.reshape(-1, *([1] * (x.ndim - 1))) if isinstance(sigma, torch.Tensor) else sigma
        return c + self.s2 / (self.s2 + sig ** 2) * (x - c)


def assert_guidance_exact(sampler, scale, sigmas, mu_cond=0.6, mu_uncond=-0.2, s=0.3, tol=None):
    """Classifier-free guidance (`diffsolve.cfg`, diffusers' convention u + scale (c - u)) of two Gaussians with one
    variance is itself a Gaussian denoiser, with mean mu_u + scale (mu_c - mu_u): a sampler on the guided denoiser
    must equal the same sampler on that Gaussian (any sampler kind: the guidance is composed into the model)."""
    sampler = as_sampler(sampler)
    cond = torch.tensor([[mu_cond]], dtype=torch.float64)
    guided, _ = compose(_Conditional(s), [cfg(scale, uncond={"c": torch.tensor([[mu_uncond]], dtype=torch.float64)})])

    def denoiser(x, sigma, **kw):
        return guided(x, sigma, c=cond).to(x.dtype)
    x0 = normal_quantiles(6, 2) * float(sigmas[0])
    got = sampler.run(denoiser, x0, sigmas, Noise(3)).x
    want = sampler.run(SingleGaussian(mu_uncond + scale * (mu_cond - mu_uncond), s), x0, sigmas, Noise(3)).x
    diff = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
    limit = tol if tol is not None else max(1e-10, 1e4 * sampler.precision)
    assert math.isfinite(diff) and diff <= limit, f"{sampler.name}: guided run differs by {diff:.3e} at scale {scale}"
