"""Every product sampler of benchmarks/msd_cost.py samples the closed-form product at its converged setting.

On the 3-component reference mixture the product p(y) exp(-|x - y|^2 / lambda^2) is a mixture again
(`GaussianMixture.product_with_gaussian(x, lambda / sqrt(2))`). Each posterior-type estimator of the benchmark
(posterior chain under each reverse-SDE solver and grid, the JVP first step, the kernel-exact integrator where
registered), run with enough steps for its order, must give 10^4 samples whose mean and covariance entries are
within 5 standard errors (taken from the samples) of the closed form at a point between two modes, where the product
is bimodal (weights 0.52 / 0.45). Chains that are the same recursion as another (`SAME_AS`) are checked to give the
same samples instead. The paper's kernel chain fails the same check at the same step count (asserted: the check can
fail), and so does a posterior chain with too little noise (eta = 0.5, drift 1.5: not the reverse SDE).
"""
import math
from pathlib import Path

import pytest
import torch

import diffsolve as ds
from diffsolve.distill import MSD
from diffsolve_studies.toy.datasets import three_component_mixture
from conftest import load_benchmark

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
GMM = three_component_mixture()
POINT = torch.tensor([-0.8, 0.9], dtype=F64)  # between modes 0 and 2
LAM = 1.0
N = 10_000
STEPS = {1: 128, 2: 64}  # by the solver's declared order (worst |z| 1.2-2.9 at these on this point)




BENCH = load_benchmark("msd_cost")
MODEL = BENCH.MixtureDenoiser(GMM)
POSTERIOR = {name: kw for name, kw in BENCH.estimators().items()
             if kw["sampler"] in ("posterior", BENCH.JVP_FIRST) and name not in BENCH.SAME_AS}


def worst_z(y):
    """Largest |z| of the sample mean and covariance entries against the closed-form product at POINT."""
    exact = GMM.product_with_gaussian(POINT, LAM / math.sqrt(2))
    centred = y - y.mean(0)
    z_mean = (y.mean(0) - exact.mean()) / (y.std(0) / math.sqrt(N))
    products = centred[:, :, None] * centred[:, None, :]
    z_cov = (products.sum(0) / (N - 1) - exact.covariance()) / (products.std(0) / math.sqrt(N))
    return max(z_mean.abs().max().item(), z_cov.abs().max().item())


def order(kw):
    if kw["sampler"] == BENCH.JVP_FIRST:
        return 2
    return min(MSD(MODEL, LAM, **kw).solver.order, 2)


def test_the_benchmark_model_is_the_exact_denoiser():
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 2
    for s in (0.002, 0.3, 0.71, 5.0):
        assert (MODEL(x, torch.full((200,), s, dtype=F64)) - GMM.denoise(x, s)).abs().max() < 1e-12


def test_the_same_recursions_give_the_same_samples():
    assert set(BENCH.identical_chains(BENCH.estimators())) == set(BENCH.SAME_AS) & set(BENCH.estimators())


@pytest.mark.parametrize("name", sorted(POSTERIOR))
def test_posterior_estimator_matches_the_product(name):
    kw = POSTERIOR[name]
    steps = STEPS[order(kw)]
    z = worst_z(BENCH.sample_at(MODEL, kw, LAM, steps, POINT, N, 0))
    assert z < 5, f"{name}: worst |z| {z:.2f} at {steps} steps"


def test_the_paper_chain_fails_the_same_check():
    kw = BENCH.estimators()["paper chain, matched flow"]
    z = worst_z(BENCH.sample_at(MODEL, kw, LAM, STEPS[1], POINT, N, 0))
    assert z > 5, f"the kernel chain passed (worst |z| {z:.2f}): the check cannot tell it from the product"


def test_too_little_noise_fails_the_same_check():
    msd = MSD(MODEL, LAM, sampler="posterior", solver="ddim", n_samples=N, steps=STEPS[1])
    msd.solver = ds.DDIM(0.5)  # forced past MSD's guard: drift 1.5, not the reverse SDE
    assert worst_z(msd.sample_product(POINT[None], generator=torch.Generator().manual_seed(0))[0]) > 5


def test_the_posterior_grid_takes_rho():
    """The posterior chain evaluates the model on sigmas_karras(steps, sigma_min, lam / sqrt(2), rho)."""
    seen = []

    def model(x, sigma, **cond):
        seen.append(float(sigma.flatten()[0]))
        return 0.5 * x

    for rho in (1.0, 3.0, 7.0):
        seen.clear()
        MSD(model, LAM, sampler="posterior", solver="ddim", steps=6, rho=rho).grad(POINT[None])
        want = ds.sigmas_karras(6, 0.002, LAM / math.sqrt(2), rho)[:-1].tolist()
        assert seen == pytest.approx(want, rel=1e-12), (rho, seen, want)
