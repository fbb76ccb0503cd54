"""MSD's posterior chain under every registered reverse-SDE solver (issue 9).

`MSD(model, lam, sampler="posterior", solver=...)` runs the reverse SDE from z = x at s = lam / sqrt(2) down to 0;
with the exact denoiser its samples are the product p(y) N(y; x, s^2 I), whose mean and covariance are closed-form
(`GaussianMixture.product_with_gaussian(x, s)`). For each registered solver that is a reverse SDE at eta = 1
(`is_reverse_sde`: stochastic, drift 2), 10^4 samples at each of two points must match them within 5 standard
errors (taken from the samples: the mean's from the spread, each covariance entry's from the spread of the centred
products), for lam in {0.4, 1.5}, at enough steps for the solver's order (a first-order SDE solver's bias falls
as 1 / steps: 32 steps miss by more than 20 standard errors at lam = 0.4). A deterministic solver is refused.

The model is the mixture's exact denoiser evaluated in a layout that is fast for 2 * 10^4 rows (`MixtureDenoiser`,
checked against `GaussianMixture.denoise` to 1e-12).
"""
import inspect
import math

import pytest
import torch

import diffsolve as ds
from diffsolve.distill import MSD
from diffsolve.distill.msd import is_reverse_sde
from diffsolve.solvers import SOLVERS
from diffsolve_studies.toy.datasets import three_component_mixture

torch.set_num_threads(1)
F64 = torch.float64
GMM = three_component_mixture()
POINTS = torch.tensor([[0.3, 0.4], [-0.8, 0.9]], dtype=F64)  # near one component; between two (a bimodal product)
LAMS = (0.4, 1.5)
N_SAMPLES = 10_000
STEPS = {1: 512, 2: 128}  # by the solver's declared order at eta = 1 (the full check)
QUICK_STEPS = {1: 256, 2: 64}  # the default suite's check at lam = 1.5

# ------------------------------------------------------------------ what the registry cannot tell
FACTORY_KW = {"dpm_fast": {"n": 95}}  # required factory parameters
GRID_BOUND = {"dpm_fast", "dpm_adaptive"}  # reverse SDEs at eta = 1 that run only on their own grids


class MixtureDenoiser:
    """The exact denoiser D(x, s) = x + s^2 grad log p_s(x) of a GaussianMixture (all rows at one sigma), in a
    [K, d, B] layout: p_s = sum_k w_k N(mu_k, C_k + s^2 I), grad log p_s = -sum_k r_k (C_k + s^2 I)^-1 (x - mu_k)."""

    def __init__(self, gmm):
        self.w, self.mu, self.covs = gmm.weights, gmm.means, gmm.covs
        self.eye = torch.eye(gmm.dim, dtype=gmm.means.dtype)

    def __call__(self, x, sigma, **cond):
        s = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        cov = self.covs + s * s * self.eye
        diff = x.T[None] - self.mu[:, :, None]  # [K, d, B]
        white = torch.bmm(torch.linalg.inv(cov), diff)
        logits = (self.w.log() - 0.5 * torch.logdet(cov))[:, None] - 0.5 * (diff * white).sum(1)
        return x - (s * s) * (logits.softmax(0)[:, None] * white).sum(0).T


MODEL = MixtureDenoiser(GMM)


def _factory_kw(name, **kw):
    params = inspect.signature(SOLVERS[name]).parameters
    return {**FACTORY_KW.get(name, {}), **{k: v for k, v in kw.items() if k in params}}


def at_eta(name, eta):
    return SOLVERS[name](**_factory_kw(name, eta=eta))


def _builds(name):
    try:
        at_eta(name, 0.0), at_eta(name, 1.0)
    except TypeError:  # a required factory parameter: add it to FACTORY_KW
        return False
    return True


BUILDABLE = [n for n in SOLVERS if _builds(n)]


def reverse_sde_names():
    return [n for n in BUILDABLE if is_reverse_sde(at_eta(n, 1.0))]


SDE_NAMES = [n for n in reverse_sde_names() if n not in GRID_BOUND]
DETERMINISTIC = [n for n in BUILDABLE if not at_eta(n, 0.0).stochastic]


def product_z(samples, lam):
    """Largest |z| over the points of the sample mean and covariance entries against the closed-form product."""
    worst = 0.0
    for x, y in zip(POINTS, samples):
        exact = GMM.product_with_gaussian(x, lam / math.sqrt(2))
        n = y.shape[0]
        centred = y - y.mean(0)
        z_mean = (y.mean(0) - exact.mean()) / (y.std(0) / math.sqrt(n))
        products = centred[:, :, None] * centred[:, None, :]
        cov = products.sum(0) / (n - 1)
        z_cov = (cov - exact.covariance()) / (products.std(0) / math.sqrt(n))
        worst = max(worst, z_mean.abs().max().item(), z_cov.abs().max().item())
    return worst


def posterior_samples(solver, lam, steps, seed=0):
    msd = MSD(MODEL, lam, sampler="posterior", solver=solver, n_samples=N_SAMPLES, steps=steps)
    return msd.sample_product(POINTS, generator=torch.Generator().manual_seed(seed))


def steps_for(solver, table):
    return table[min(solver.order, max(table))]


# ------------------------------------------------------------------------------------- checks
def test_mixture_denoiser_is_the_exact_one():
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 2
    for s in (0.002, 0.28, 1.06, 5.0):
        assert (MODEL(x, torch.full((300,), s, dtype=F64)) - GMM.denoise(x, s)).abs().max() < 1e-12


def test_every_reverse_sde_solver_is_covered():
    assert BUILDABLE == list(SOLVERS), f"{sorted(set(SOLVERS) - set(BUILDABLE))}: add their parameters to FACTORY_KW"
    assert SDE_NAMES and set(GRID_BOUND) <= set(SOLVERS)
    assert set(SDE_NAMES) | set(GRID_BOUND) >= set(reverse_sde_names())


@pytest.mark.parametrize("name", SDE_NAMES)
def test_posterior_matches_the_product_at_lam_1_5(name):
    solver = at_eta(name, 1.0)
    z = product_z(posterior_samples(solver, 1.5, steps_for(solver, QUICK_STEPS)), 1.5)
    assert z < 5, f"{solver!r}: worst |z| {z:.2f} at lam 1.5, {steps_for(solver, QUICK_STEPS)} steps"


@pytest.mark.slow
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("name", SDE_NAMES)
def test_posterior_matches_the_product(name, lam):
    solver = at_eta(name, 1.0)
    z = product_z(posterior_samples(solver, lam, steps_for(solver, STEPS)), lam)
    assert z < 5, f"{solver!r}: worst |z| {z:.2f} at lam {lam}, {steps_for(solver, STEPS)} steps"


def test_the_check_tells_wrong_chains_apart():
    """Negative controls at the quick check's setting: eta = 0.5 forced past MSD's guard, and too few steps."""
    msd = MSD(MODEL, 1.5, sampler="posterior", solver=ds.DDIM(1.0), n_samples=N_SAMPLES, steps=QUICK_STEPS[1])
    msd.solver = ds.DDIM(0.5)  # a drift-1.25 chain: not the reverse SDE
    assert product_z(msd.sample_product(POINTS, generator=torch.Generator().manual_seed(0)), 1.5) > 5
    assert product_z(posterior_samples(ds.DDIM(1.0), 0.4, 8), 0.4) > 5


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_a_deterministic_solver_is_refused(name):
    with pytest.raises(ValueError, match="reverse SDE"):
        MSD(MODEL, 0.5, sampler="posterior", solver=at_eta(name, 0.0))


@pytest.mark.parametrize("name", sorted(GRID_BOUND & set(SOLVERS)))
def test_grid_bound_reverse_sde_is_refused_before_sampling_ends(name):
    """dpm_fast / dpm_adaptive are reverse SDEs at eta = 1 but cannot run on MSD's Karras grid ending at 0."""
    with pytest.raises(ValueError):
        MSD(MODEL, 0.5, sampler="posterior", solver=at_eta(name, 1.0), steps=8).sample_product(
            POINTS, generator=torch.Generator().manual_seed(0))
