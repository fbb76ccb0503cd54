"""Tests for diffsolve.analytic, each against an independent computation (scipy, autograd, grids)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from diffsolve.analytic import EmpiricalDenoiser, GaussianMixture

torch.set_num_threads(1)
F64 = torch.float64


def random_mixture(seed, K=3, d=3, spread=3.0, **kw):
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(K, d, generator=g, dtype=F64)
    A = torch.randn(K, d, d, generator=g, dtype=F64)
    covs = A @ A.mT / d + 0.1 * torch.eye(d, dtype=F64)
    weights = torch.rand(K, generator=g, dtype=F64) + 0.1
    return GaussianMixture(weights, means, covs, **kw)


def scipy_log_prob(gm, x, sigma):
    x = np.asarray(x)
    eye = np.eye(gm.dim)
    comps = [np.log(w) + multivariate_normal(m, c + sigma ** 2 * eye).logpdf(x)
             for w, m, c in zip(gm.weights.numpy(), gm.means.numpy(), gm.covs.numpy())]
    return logsumexp(np.stack(comps, 0).reshape(len(comps), -1), axis=0)


# ----------------------------------------------------------------------------- GaussianMixture
@pytest.mark.parametrize("sigma", [0.0, 0.3, 2.5])
def test_log_prob_matches_scipy(sigma):
    gm = random_mixture(0, K=4, d=3)
    x = 4 * torch.randn(50, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    np.testing.assert_allclose(gm.log_prob(x, sigma).numpy(), scipy_log_prob(gm, x, sigma), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gm.prob(x, sigma).numpy(), np.exp(scipy_log_prob(gm, x, sigma)), rtol=1e-10)


def test_log_prob_far_from_data_is_finite():
    gm = random_mixture(0, K=4, d=3)
    x = torch.full((2, 3), 1e3, dtype=F64)
    lp = gm.log_prob(x, 0.0)
    assert torch.isfinite(lp).all()
    np.testing.assert_allclose(lp.numpy(), scipy_log_prob(gm, x, 0.0), rtol=1e-10)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2 ** 20), sigma=st.floats(0.0, 3.0))
def test_score_matches_autograd(seed, sigma):
    gm = random_mixture(seed, K=3, d=2)
    x = (3 * torch.randn(8, 2, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)).requires_grad_()
    (grad,) = torch.autograd.grad(gm.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(gm.score(x.detach(), sigma), grad, rtol=1e-8, atol=1e-10)


def test_denoise_single_gaussian_closed_form():
    gm = random_mixture(3, K=1, d=4)
    mu, C = gm.means[0], gm.covs[0]
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    for s in [0.0, 0.1, 1.0, 10.0]:
        expected = mu + (C @ torch.linalg.solve(C + s ** 2 * torch.eye(4, dtype=F64), (x - mu).T)).T
        torch.testing.assert_close(gm.denoise(x, s), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gm(x, s, class_labels=None), expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2 ** 20), sigma=st.floats(0.01, 5.0))
def test_tweedie_denoise_is_posterior_mean(seed, sigma):
    gm = random_mixture(seed, K=3, d=3)
    x = 3 * torch.randn(4, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    den = gm.denoise(x, sigma)
    for i in range(4):
        post = gm.product_with_gaussian(x[i], sigma)
        torch.testing.assert_close(den[i], post.mean(), rtol=1e-9, atol=1e-9)


def test_product_matches_grid_integration():
    gm = GaussianMixture(torch.tensor([0.3, 0.7], dtype=F64),
                         torch.tensor([[-1.0, 0.5], [1.5, -0.5]], dtype=F64),
                         torch.tensor([[[1.0, 0.4], [0.4, 0.6]], [[0.5, -0.2], [-0.2, 0.8]]], dtype=F64))
    center, std = np.array([0.4, 0.9]), 0.8
    h = 0.02
    g1 = np.arange(-9.0, 9.0 + h / 2, h)
    Y = np.stack(np.meshgrid(g1, g1, indexing="ij"), -1).reshape(-1, 2)
    dens = (0.3 * multivariate_normal([-1.0, 0.5], [[1.0, 0.4], [0.4, 0.6]]).pdf(Y)
            + 0.7 * multivariate_normal([1.5, -0.5], [[0.5, -0.2], [-0.2, 0.8]]).pdf(Y))
    dens *= multivariate_normal(center, std ** 2 * np.eye(2)).pdf(Y)
    Z = dens.sum() * h * h
    p = dens / Z
    mean = (p[:, None] * Y).sum(0) * h * h
    cov = ((p[:, None, None] * (Y - mean)[:, :, None] * (Y - mean)[:, None, :]).sum(0)) * h * h
    post = gm.product_with_gaussian(torch.tensor(center), std)
    np.testing.assert_allclose(post.mean().numpy(), mean, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(post.covariance().numpy(), cov, rtol=1e-8, atol=1e-9)
    idx = np.random.default_rng(0).choice(len(Y), 200, replace=False)
    np.testing.assert_allclose(post.prob(torch.tensor(Y[idx])).numpy(), p[idx], rtol=1e-7, atol=1e-12)
    # the normaliser Z is the noisy marginal at `center` (evidence)
    np.testing.assert_allclose(gm.prob(torch.tensor(center[None]), std).item(), Z, rtol=1e-8)


def test_mean_and_covariance_of_mixture():
    gm = random_mixture(5, K=3, d=2)
    w, m, c = gm.weights.numpy(), gm.means.numpy(), gm.covs.numpy()
    mean = (w[:, None] * m).sum(0)
    cov = sum(wk * (ck + np.outer(mk - mean, mk - mean)) for wk, mk, ck in zip(w, m, c))
    np.testing.assert_allclose(gm.mean().numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(gm.covariance().numpy(), cov, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.0, 0.7])
def test_sample_moments_and_reproducibility(sigma):
    n = 200_000
    gm = random_mixture(7, K=3, d=2, spread=2.0)
    x = gm.sample(n, sigma, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, 2) and x.dtype == F64
    target = gm.convolve(sigma)
    m, C = target.mean(), target.covariance()
    torch.testing.assert_close(C, gm.covariance() + sigma ** 2 * torch.eye(2, dtype=F64))
    # mean: 5 standard errors
    assert ((x.mean(0) - m).abs() <= 5 * (C.diagonal() / n).sqrt()).all()
    # covariance: 5 standard errors of each product (x_i - m_i)(x_j - m_j), estimated from the samples
    prods = (x - m)[:, :, None] * (x - m)[:, None, :]
    assert ((prods.mean(0) - C).abs() <= 5 * prods.std(0) / math.sqrt(n)).all()
    # reproducible
    x2 = gm.sample(n, sigma, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    assert not torch.equal(x, gm.sample(n, sigma, generator=torch.Generator().manual_seed(1)))


def test_sample_per_row_sigma_and_chunking():
    gm = random_mixture(2, K=2, d=3, max_chunk_elements=20)  # chunks of 2 rows
    s = torch.linspace(0.0, 2.0, 7, dtype=F64)
    a = gm.sample(7, s, generator=torch.Generator().manual_seed(3))
    gm.max_chunk_elements = 2 ** 22
    b = gm.sample(7, s, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert gm.sample(0).shape == (0, 3)


def test_per_row_sigma_equals_loop():
    gm = random_mixture(4, K=5, d=3)
    x = 2 * torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    s = torch.tensor([0.0, 0.05, 0.3, 1.0, 2.0, 10.0], dtype=F64)
    for name in ["log_prob", "score", "denoise"]:
        batched = getattr(gm, name)(x, s)
        looped = torch.cat([getattr(gm, name)(x[i:i + 1], float(s[i])) for i in range(6)])
        torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
    # 0-d tensor sigma == float sigma
    torch.testing.assert_close(gm.denoise(x, torch.tensor(0.5)), gm.denoise(x, 0.5))


def test_chunking_matches_unchunked():
    big = random_mixture(8, K=6, d=3)
    small = random_mixture(8, K=6, d=3, max_chunk_elements=1)  # one row per chunk
    x = torch.randn(25, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    s = torch.rand(25, generator=torch.Generator().manual_seed(1), dtype=F64)
    for name in ["log_prob", "score", "denoise"]:
        torch.testing.assert_close(getattr(small, name)(x, s), getattr(big, name)(x, s), rtol=1e-12, atol=1e-12)


def test_convolve_semigroup():
    gm = random_mixture(9, K=3, d=2)
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(gm.convolve(0.6).log_prob(x), gm.log_prob(x, 0.6))
    torch.testing.assert_close(gm.convolve(0.6).log_prob(x, 0.8), gm.log_prob(x, 1.0))


def test_dtype_and_shapes():
    gm32 = GaussianMixture.isotropic(torch.randn(4, 6), 0.5)
    x = torch.randn(3, 2, 3, dtype=F64)
    assert gm32.denoise(x, 0.3).dtype == torch.float32 and gm32.denoise(x, 0.3).shape == (3, 2, 3)
    assert gm32.score(x, 0.3).shape == (3, 2, 3) and gm32.log_prob(x, 0.3).shape == (3,)
    gm = GaussianMixture.isotropic(torch.zeros(1, 2, dtype=F64), 0.0)  # point mass at 0
    torch.testing.assert_close(gm.denoise(torch.ones(2, 2, dtype=F64), 1.0), torch.zeros(2, 2, dtype=F64))
    iso = GaussianMixture.isotropic(torch.zeros(2, 2, dtype=F64), torch.tensor([1.0, 2.0]), weights=[1, 3])
    torch.testing.assert_close(iso.covs[1], 4 * torch.eye(2, dtype=F64))
    torch.testing.assert_close(iso.weights, torch.tensor([0.25, 0.75], dtype=F64))


def test_large_batch_many_components_runs():
    gm = GaussianMixture.isotropic(torch.randn(500, 2), 0.1)
    x = torch.randn(10_000, 2)
    out = gm.denoise(x, torch.rand(10_000))
    assert out.shape == (10_000, 2) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------- EmpiricalDenoiser
def brute_force_denoise(u, w, x, s):
    logits = -torch.cdist(x, u) ** 2 / (2 * s[:, None] ** 2) + w.log()
    return logits.softmax(-1) @ u


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2 ** 20), sigma=st.floats(0.05, 5.0))
def test_empirical_matches_brute_force(seed, sigma):
    g = torch.Generator().manual_seed(seed)
    u, x = torch.randn(30, 3, generator=g, dtype=F64), 2 * torch.randn(7, 3, generator=g, dtype=F64)
    w = torch.rand(30, generator=g, dtype=F64) + 0.01
    s = sigma * (0.5 + torch.rand(7, generator=g, dtype=F64))
    den = EmpiricalDenoiser(u, w)
    torch.testing.assert_close(den(x, s), brute_force_denoise(u, w, x, s), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(den(x, sigma), brute_force_denoise(u, w, x, torch.full((7,), sigma, dtype=F64)),
                               rtol=1e-9, atol=1e-9)
    # agrees with a mixture of point masses
    gm = GaussianMixture.isotropic(u, 0.0, weights=w)
    torch.testing.assert_close(den(x, s), gm(x, s), rtol=1e-8, atol=1e-8)


def test_empirical_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(0)
    u, x = torch.randn(40, 2, generator=g, dtype=F64), torch.randn(23, 2, generator=g, dtype=F64)
    s = torch.rand(23, generator=g, dtype=F64) + 0.1
    full, tiny = EmpiricalDenoiser(u), EmpiricalDenoiser(u, max_chunk_elements=1)
    torch.testing.assert_close(tiny(x, s), full(x, s), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(tiny.log_prob(x, s), full.log_prob(x, s), rtol=1e-13, atol=1e-13)


def test_empirical_small_sigma_returns_nearest_point():
    g = torch.Generator().manual_seed(1)
    u, x = torch.randn(50, 4, generator=g), torch.randn(20, 4, generator=g)
    nearest = u[torch.cdist(x, u).argmin(-1)]
    den = EmpiricalDenoiser(u, torch.rand(50, generator=g) + 0.5)
    for s in [1e-3, 1e-12, 1e-30, 0.0]:
        torch.testing.assert_close(den(x, s), nearest, rtol=1e-5, atol=1e-5)
    # zero-weight points are never returned
    w = torch.ones(50)
    w[torch.cdist(x[:1], u).argmin()] = 0
    out = EmpiricalDenoiser(u, w)(x[:1], 0.0)
    assert not torch.isclose(out, nearest[:1]).all()


def test_empirical_log_prob_vs_scipy():
    rng = np.random.default_rng(0)
    u, x, w = rng.normal(size=(25, 3)), 2 * rng.normal(size=(9, 3)), rng.uniform(0.1, 1, 25)
    s = rng.uniform(0.1, 2.0, 9)
    sq = ((x[:, None, :] - u[None]) ** 2).sum(-1)
    expected = logsumexp(np.log(w / w.sum()) - sq / (2 * s[:, None] ** 2), axis=1) - 1.5 * np.log(2 * np.pi * s ** 2)
    den = EmpiricalDenoiser(torch.tensor(u), torch.tensor(w))
    np.testing.assert_allclose(den.log_prob(torch.tensor(x), torch.tensor(s)).numpy(), expected, rtol=1e-10)
    looped = [den.log_prob(torch.tensor(x[i:i + 1]), float(s[i])).item() for i in range(9)]
    np.testing.assert_allclose(looped, expected, rtol=1e-10)


def test_empirical_image_shapes_and_large_float32():
    u = torch.randn(10_000, 2)
    out = EmpiricalDenoiser(u)(torch.randn(10_000, 2), 0.2)
    assert out.shape == (10_000, 2) and out.dtype == torch.float32 and torch.isfinite(out).all()
    imgs = EmpiricalDenoiser(torch.randn(5, 1, 2, 2, dtype=F64))
    assert imgs(torch.randn(3, 1, 2, 2), 1.0).shape == (3, 1, 2, 2)


# --------------------------------------------------------------------------------------- errors
def test_errors():
    gm = random_mixture(0, K=2, d=2)
    den = EmpiricalDenoiser(torch.randn(5, 2))
    x = torch.zeros(3, 2)
    for f in [gm.log_prob, gm.score, gm.denoise, den, den.log_prob]:
        with pytest.raises(ValueError, match=r"sigma must be >= 0, got -0\.1"):
            f(x, -0.1)
        with pytest.raises(ValueError, match=r"sigma .*shape \[3\].*\[2\]"):
            f(x, torch.ones(2))
        with pytest.raises(ValueError, match=r"2 features.*shape \[\d, 2\].*got shape \[3, 5\]"):
            f(torch.zeros(3, 5), 1.0)
    with pytest.raises(ValueError, match=r"sigma must be > 0 for log_prob, got 0"):
        den.log_prob(x, 0.0)
    with pytest.raises(ValueError, match="sigma must be finite"):
        gm.denoise(x, float("nan"))
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        gm.sample(4, -1.0)
    with pytest.raises(ValueError, match="sigma must be finite and >= 0, got -1"):
        gm.convolve(-1.0)
    with pytest.raises(ValueError, match=r"center must have shape \[2\].*got shape \[3\]"):
        gm.product_with_gaussian(torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="std must be finite and >= 0"):
        gm.product_with_gaussian(torch.zeros(2), -0.5)
    eye = torch.eye(2, dtype=F64).expand(2, 2, 2)
    means = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"positive semi-definite, got eigenvalue -1 in component 1"):
        GaussianMixture([1, 1], means, torch.stack([torch.eye(2, dtype=F64), torch.diag(torch.tensor([1.0, -1.0]))]))
    with pytest.raises(ValueError, match="symmetric"):
        GaussianMixture([1, 1], means, eye + torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=F64))
    with pytest.raises(ValueError, match=r"weights must be finite and >= 0, got min -1"):
        GaussianMixture([1, -1], means, eye)
    with pytest.raises(ValueError, match="weights must have a positive sum, got 0"):
        GaussianMixture([0, 0], means, eye)
    with pytest.raises(ValueError, match=r"weights must have shape \[2\].*got shape \[3\]"):
        GaussianMixture([1, 1, 1], means, eye)
    with pytest.raises(ValueError, match=r"covs must have shape .*\[2, 2\].*got shape \[2, 3, 3\]"):
        GaussianMixture([1, 1], means, torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match="singular"):
        GaussianMixture.isotropic(means, 0.0).log_prob(torch.zeros(1, 2), 0.0)
    with pytest.raises(ValueError, match=r"weights must have shape \[5\]"):
        EmpiricalDenoiser(torch.randn(5, 2), torch.ones(4))


def test_empirical_denoiser_10k_by_10k_peak_memory_under_2gib():
    """10^4 points x 10^4 queries in float32 stays within 2 GiB (measured in a fresh process)."""
    import subprocess
    import sys
    code = (
        "import resource, torch\n"
        "torch.set_num_threads(1)\n"
        "from diffsolve.analytic import EmpiricalDenoiser\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "g = torch.Generator().manual_seed(0)\n"
        "d = EmpiricalDenoiser(torch.randn(10_000, 2, generator=g))\n"
        "out = d(torch.randn(10_000, 2, generator=g), 0.1)\n"
        "assert torch.isfinite(out).all()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n")
    grown_kib = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                   text=True).stdout.split()[-1])
    assert grown_kib < 2 * 1024 ** 2, f"peak memory grew by {grown_kib / 1024:.0f} MiB"
