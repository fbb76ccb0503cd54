"""Distillers (SDS, MSD, VSD, SDI) against independent computations on analytic data."""
import math

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.analytic import EmpiricalDenoiser, GaussianMixture
from diffsolve.distill import (MSD, SDI, SDS, VSD, AdaptiveBandwidth, ideal_variational, linear_decay,
                               mean_shift_oracle, should_stop)
from diffsolve_studies.toy.datasets import three_component_mixture as three_components

torch.set_num_threads(1)


def two_blobs():
    return GaussianMixture.isotropic(torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=torch.float64), 0.2)


def test_sds_mean_gradient_matches_quadrature_expectation():
    """E_{u, n}[(x - D(x + sigma(u) n; sigma(u))) / sigma(u)] by Gauss-Legendre x Gauss-Hermite quadrature."""
    gmm, x = two_blobs(), torch.tensor([0.3, -0.4], dtype=torch.float64)
    sds = SDS(gmm, sigma_min=0.1, sigma_max=3.0)
    u_nodes, u_w = np.polynomial.legendre.leggauss(48)
    h_nodes, h_w = np.polynomial.hermite_e.hermegauss(40)  # weight exp(-n^2 / 2)
    n1, n2 = np.meshgrid(h_nodes, h_nodes)
    wn = np.outer(h_w, h_w).ravel() / (2 * np.pi)
    noise = torch.tensor(np.stack([n1.ravel(), n2.ravel()], 1))
    expected = torch.zeros(2, dtype=torch.float64)
    for u, w in zip((u_nodes + 1) / 2, u_w / 2):
        sigma = ds.distill.sigma_from_uniform(torch.tensor(u), 0.1, 3.0).item()
        d = gmm.denoise(x + sigma * noise, sigma)
        expected += w * ((x - d) / sigma * torch.tensor(wn)[:, None]).sum(0)
    draws = sds.grad(x.expand(200_000, 2), torch.Generator().manual_seed(0))
    se = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - expected).abs() < 5 * se).all(), (draws.mean(0), expected, se)
    assert sds.last_nfe == 1


def test_sds_loss_gradient_is_grad():
    gmm = two_blobs()
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    sds = SDS(gmm)
    sds.loss(x, torch.Generator().manual_seed(1)).backward()
    torch.testing.assert_close(x.grad, sds.grad(x.detach(), torch.Generator().manual_seed(1)))
    x.grad = None
    sds.loss(x, torch.Generator().manual_seed(1), reduction="mean").backward()
    torch.testing.assert_close(x.grad, sds.grad(x.detach(), torch.Generator().manual_seed(1)) / 5)


@pytest.mark.parametrize("lam", [0.4, 1.5])
def test_msd_posterior_samples_match_closed_form_product(lam):
    gmm, x = three_components(), torch.tensor([[0.2, 0.6]], dtype=torch.float64)
    msd = MSD(gmm, lam, sampler="posterior", steps=128, n_samples=20_000, sigma_max=10.0)
    y = msd.sample_product(x, torch.Generator().manual_seed(0))[0]
    product = gmm.product_with_gaussian(x[0], lam / math.sqrt(2))
    mean, cov = product.mean(), product.covariance()
    se = (cov.diagonal() / len(y)).sqrt()
    assert ((y.mean(0) - mean).abs() < 5 * se + 0.015).all()
    assert ((torch.cov(y.T) - cov).abs() < 0.02).all()
    assert msd.last_nfe == 0  # sample_product does not count into grad's tally
    msd.grad(x, torch.Generator().manual_seed(0))
    assert msd.last_nfe == 128 * 20_000


def test_msd_estimators_mean_vs_oracle():
    """All three samplers estimate x - D(x; lambda / sqrt(2)); the one-call estimator is exactly it."""
    gmm, lam = three_components(), 0.8
    x = torch.tensor([[0.2, 0.6], [-0.5, 0.3]], dtype=torch.float64)
    oracle = mean_shift_oracle(gmm, x, lam)
    torch.testing.assert_close(MSD(gmm, lam, sampler="one_call").grad(x), oracle)
    post = MSD(gmm, lam, sampler="posterior", steps=128, n_samples=20_000).grad(x, torch.Generator().manual_seed(0))
    assert (post - oracle).norm(dim=1).max() < 0.03
    kernel = MSD(gmm, lam, sampler="kernel", steps=64, n_samples=4000).grad(x, torch.Generator().manual_seed(0))
    assert torch.isfinite(kernel).all() and (kernel * oracle).sum(1).min() > 0  # same direction, biased


def test_gradient_descent_lr1_on_msd_loss_is_mean_shift_step():
    gmm = two_blobs()
    x0 = torch.tensor([[0.3, 0.2], [-0.6, 0.1]], dtype=torch.float64)
    msd = MSD(gmm, 0.5, n_samples=16, steps=16)
    y = msd.sample_product(x0, torch.Generator().manual_seed(3))
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=1.0)
    msd.loss(x, torch.Generator().manual_seed(3)).backward()
    opt.step()
    torch.testing.assert_close(x.detach(), y.mean(1), rtol=0, atol=1e-12)


def test_oracle_mean_shift_converges_to_a_mode():
    gmm = three_components()
    x = torch.tensor([[0.1, 0.4], [0.9, 1.2], [-1.3, -0.3]], dtype=torch.float64)
    schedule = linear_decay(0.316, 150)
    for k in range(150):
        x = x - mean_shift_oracle(gmm, x, schedule(k))
    for _ in range(200):  # finish at the smallest bandwidth
        x = x - mean_shift_oracle(gmm, x, schedule(149))
    assert gmm.score(x, 0.0).norm(dim=1).max() < 1e-3
    eps = 1e-3 * torch.randn(64, 2, dtype=torch.float64)
    for p in x:
        assert (gmm.log_prob(p + eps) <= gmm.log_prob(p[None])).all()  # a local maximum


def test_vsd_is_exactly_zero_when_particles_are_the_data():
    data = two_blobs().sample(500, generator=torch.Generator().manual_seed(0))
    vsd = VSD(EmpiricalDenoiser(data), None, variational_update=ideal_variational)
    vsd.update(data)
    for seed in range(5):
        assert vsd.grad(data, torch.Generator().manual_seed(seed)).abs().max() == 0
    vsd.update(data[:250] + 0.3)
    assert vsd.grad(data, torch.Generator().manual_seed(0)).abs().max() > 0.1


def _sdi_closed_form(x, mu, s2, sigma_min, sigma_t, sigma_target):
    z = mu + (x - mu) * math.sqrt((s2 + sigma_target ** 2) / (s2 + sigma_min ** 2))  # exact ODE inversion
    kappa = (z - x) / sigma_target
    zt = x + sigma_t * kappa
    d = mu + s2 / (s2 + sigma_t ** 2) * (zt - mu)
    return (zt - d) / sigma_t - kappa


def test_sdi_on_gaussian_data_matches_closed_form_inversion():
    mu, s = 0.5, 0.3
    gauss = GaussianMixture.isotropic(torch.full((1, 2), mu, dtype=torch.float64), s)
    x = torch.tensor([[1.2, -0.3], [0.4, 0.9]], dtype=torch.float64)
    errors = []
    for n_inv in (50, 100, 200):
        sdi = SDI(gauss, total_steps=10, tau_max=0.0, eta_noise=0.0, n_inversion=n_inv, sigma_min=0.01)
        sdi.update_step(3)
        sigma_t = sdi.sigma_t()
        expected = _sdi_closed_form(x, mu, s ** 2, 0.01, sigma_t, sigma_t)
        errors.append((sdi.grad(x, torch.Generator().manual_seed(0)) - expected).abs().max().item())
        assert sdi.last_nfe == n_inv + 1
    assert errors[-1] < 1e-2 and errors[0] / errors[2] > 3  # first-order convergence of the inversion


def test_bandwidth_schedules_and_termination():
    sched = linear_decay(0.316, 150)
    assert sched(0) == 0.316 and math.isclose(sched(149), 0.316 / 150) and sched(500) == sched(149)
    adaptive = AdaptiveBandwidth(1.0, factor=0.5, ratio=0.1, floor=0.2)
    assert adaptive(0, mean_shift_norm=0.5) == 1.0 and adaptive(1, mean_shift_norm=0.05) == 0.5
    assert adaptive(2, mean_shift_norm=0.0) == 0.25 and adaptive(3, mean_shift_norm=0.0) == 0.2
    assert should_stop(0.009) and not should_stop(0.5) and should_stop(0.5, 1e-5, tol=1e-4)


def test_msd_states_clipping_and_rejects_bad_settings():
    gmm = two_blobs()
    msd = MSD(gmm, 1e3, sampler="one_call", sigma_max=5.0)
    g = msd.grad(torch.zeros(1, 2, dtype=torch.float64))
    assert msd.clipped and torch.isfinite(g).all()
    with pytest.raises(ValueError, match="sampler"):
        MSD(gmm, 0.5, sampler="mcmc")
    with pytest.raises(ValueError, match="bandwidth"):
        MSD(gmm, -1.0)
    with pytest.raises(ValueError, match="n_samples"):
        MSD(gmm, 0.5, n_samples=0)
    with pytest.raises(ValueError, match="NaN"):
        SDS(gmm).grad(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="weighting"):
        SDS(gmm, weighting="fantasia")


@pytest.mark.parametrize("center", ["noised", "inverted"])
def test_moving_kernel_centres_run_and_count_nfe(center):
    gmm = two_blobs()
    msd = MSD(gmm, 0.5, center=center, n_samples=4, steps=12, skip_tol=0)
    g = msd.grad(torch.tensor([[0.3, 0.2]], dtype=torch.float64), torch.Generator().manual_seed(0))
    assert torch.isfinite(g).all()
    assert msd.last_nfe == 4 * (12 + (11 if center == "inverted" else 0))


def test_skipping_negligible_kernel_steps_saves_calls_not_accuracy():
    """Steps whose kernel factor is below tol reset z to the centre: starting there gives the same chain."""
    gmm, x = two_blobs(), torch.tensor([[0.3, 0.2], [-0.8, 0.4]], dtype=torch.float64)
    full = MSD(gmm, 0.3, eta=0.0, steps=32, skip_tol=0)
    skip = MSD(gmm, 0.3, eta=0.0, steps=32, skip_tol=1e-8)
    g_full, g_skip = full.grad(x, torch.Generator().manual_seed(0)), skip.grad(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(g_skip, g_full, rtol=0, atol=1e-6)
    assert skip.last_nfe < full.last_nfe == 32
