"""Solvers against exact solutions, each other, and their contracts (NFE, noise, errors, hooks)."""
import pytest
import torch
from _models import SingleGaussian, identity_model, log_slope

import diffsolve as ds
from diffsolve.analytic import GaussianMixture

torch.set_num_threads(1)
SIGMA_MIN, SIGMA_MAX = 0.02, 5.0


def _order(solver, ns=(8, 16, 32, 64), **kw):
    model = SingleGaussian()
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SIGMA_MAX
    exact = model.flow(x0, SIGMA_MAX, SIGMA_MIN)
    errors = []
    for n in ns:
        sigmas = ds.sigmas_karras(n, SIGMA_MIN, SIGMA_MAX, append_zero_=False)
        errors.append((solver(model, x0, sigmas, disable=True, **kw) - exact).abs().max().item())
    return log_slope(ns, errors)


@pytest.mark.parametrize("solver, order, kw", [
    (ds.sample_euler, 1, {}), (ds.sample_ddim, 1, {}), (ds.sample_heun, 2, {}),
    (ds.sample_odeint, 4, {"method": "rk4"}), (ds.sample_odeint, 1, {"method": "euler"})])
def test_convergence_order_on_single_gaussian(solver, order, kw):
    assert abs(_order(solver, **kw) - order) < 0.2


def test_ddim_eta0_is_euler():
    gmm = GaussianMixture.isotropic(torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=torch.float64), 0.2)
    x = torch.randn(32, 2, dtype=torch.float64) * 3
    sigmas = ds.sigmas_karras(12, 0.01, 3.0)
    assert torch.equal(ds.sample_ddim(gmm, x, sigmas, disable=True), ds.sample_euler(gmm, x, sigmas, disable=True))


def test_nfe_counts():
    sigmas = ds.sigmas_karras(10, 0.01, 3.0)  # 10 steps, the last to 0
    x = torch.randn(4, 2)
    _, info = ds.sample_euler(identity_model, x, sigmas, disable=True, return_info=True)
    assert (info.nfe, info.steps) == (10, 10)
    _, info = ds.sample_heun(identity_model, x, sigmas, disable=True, return_info=True)
    assert info.nfe == 19  # 2 per step, 1 on the last step to 0
    guided = [ds.cfg(3.0, uncond={"c": torch.zeros(4, 1)})]
    model = lambda x, sigma, c: x * (1 + c)  # noqa: E731
    _, info = ds.sample_euler(model, x, sigmas, {"c": torch.ones(4, 1)}, disable=True, transforms=guided,
                              return_info=True)
    assert info.nfe == 20
    limited = [ds.limited_interval(guided[0], 0.5, 10.0)]
    _, info = ds.sample_euler(model, x, sigmas, {"c": torch.ones(4, 1)}, disable=True, transforms=limited,
                              return_info=True)
    n_inside = int(((sigmas[:-1] > 0.5) & (sigmas[:-1] <= 10.0)).sum())
    assert info.nfe == 10 + n_inside
    guide = ds.autoguidance(lambda x, sigma: 0.9 * x, 2.0)
    _, info = ds.sample_heun(lambda x, sigma: x, x, sigmas, disable=True, transforms=[guide], return_info=True)
    assert info.nfe == 38


def test_generator_reproducible_and_stateless():
    gmm = GaussianMixture.isotropic(torch.tensor([[-1.0], [1.0]]), 0.1)
    x = torch.randn(64, 1)
    sigmas = ds.sigmas_karras(8, 0.01, 3.0)
    a = ds.sample_ddim(gmm, x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(3), disable=True)
    b = ds.sample_ddim(gmm, x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(3), disable=True)
    c = ds.sample_ddim(gmm, x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(4), disable=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("solver, kw", [(ds.sample_ddim, {"eta": 1.0}), (ds.sample_euler, {"s_churn": 5.0})])
def test_seeded_noise_is_batch_size_invariant(solver, kw):
    gmm = GaussianMixture.isotropic(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), 0.1)
    x = torch.randn(37, 2, generator=torch.Generator().manual_seed(0))
    sigmas = ds.sigmas_karras(8, 0.01, 3.0)
    full = solver(gmm, x, sigmas, noise_sampler=ds.seeded_noise(x, 7), disable=True, **kw)
    head = solver(gmm, x[:5], sigmas, noise_sampler=ds.seeded_noise(x[:5], 7), disable=True, **kw)
    tail = solver(gmm, x[20:], sigmas, noise_sampler=ds.seeded_noise(x[20:], 7, row_offset=20), disable=True, **kw)
    torch.testing.assert_close(head, full[:5], rtol=0, atol=1e-6)
    torch.testing.assert_close(tail, full[20:], rtol=0, atol=1e-6)
    other = solver(gmm, x, sigmas, noise_sampler=ds.seeded_noise(x, 8), disable=True, **kw)
    assert not torch.allclose(other, full)


def test_callback_sees_k_diffusion_keys_and_step_hook_replaces_x():
    seen = []
    sigmas = ds.sigmas_karras(5, 0.1, 2.0)
    x = torch.ones(2, 3)
    ds.sample_euler(identity_model, x, sigmas, callback=seen.append, disable=True)
    assert [s["i"] for s in seen] == list(range(5))
    assert {"x", "i", "sigma", "sigma_hat", "denoised"} <= set(seen[0])
    out = ds.sample_heun(identity_model, x, sigmas, step_hook=lambda i, s, sn, x: x + 1, disable=True)
    torch.testing.assert_close(out, x + 5)


@pytest.mark.parametrize("sigmas, match", [
    ([1.0, 2.0, 0.0], "strictly descending"), ([1.0, -0.5], ">= 0"), ([1.0, float("nan"), 0.0], "finite"),
    ([1.0], "at least 2"), ([1.0, 1.0, 0.0], "strictly descending")])
def test_bad_sigmas_name_the_value(sigmas, match):
    with pytest.raises(ValueError, match=match):
        ds.sample_euler(identity_model, torch.zeros(2, 2), torch.tensor(sigmas), disable=True)


def test_bad_inputs_raise_value_errors():
    x, sigmas = torch.zeros(2, 2), ds.sigmas_karras(4, 0.1, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        ds.sample_euler(identity_model, x, sigmas, {"c": torch.zeros(2, 2, dtype=torch.float64)}, disable=True)
    with pytest.raises(ValueError, match="batch 3"):
        ds.sample_euler(identity_model, x, sigmas, {"c": torch.zeros(3, 2)}, disable=True)
    with pytest.raises(ValueError, match="bandwidth"):
        ds.gaussian_kernel(x, 0.0)
    with pytest.raises(ValueError, match="bandwidth"):
        ds.gaussian_kernel(x, torch.tensor([0.1, -1.0]))
    with pytest.raises(ValueError, match="shape"):
        ds.sample_euler(identity_model, x, sigmas, transforms=[ds.gaussian_kernel(torch.zeros(3, 2), 1.0)],
                        disable=True)
    with pytest.raises(ValueError, match="eta"):
        ds.sample_ddim(identity_model, x, sigmas, eta=-0.5, disable=True)
    with pytest.raises(ValueError, match="NaN"):
        ds.sample_euler(identity_model, x + float("nan"), sigmas, disable=True)
    with pytest.raises(ValueError, match="convention"):
        ds.cfg(2.0, uncond={}, convention="comfy")


def test_nan_in_a_step_names_step_and_sigma():
    def model(x, sigma):
        return torch.where(sigma[:, None] < 0.5, torch.full_like(x, float("inf")), x)
    sigmas = torch.tensor([2.0, 1.0, 0.4, 0.1, 0.0])
    with pytest.raises(ValueError, match=r"step 2 \(sigma 0.4 -> 0.1\)"):
        ds.sample_euler(model, torch.ones(2, 2), sigmas, disable=True)


def test_float16_model_with_extreme_kernel_factor():
    """sigma**2 / lambda**2 = 1e6 overflows float16; kernel factors are computed in float32 or wider."""
    lin = torch.nn.Linear(2, 2).half()
    model = lambda x, sigma: lin(x.half()).to(x.dtype) * 0 + x.half().to(x.dtype)  # noqa: E731
    c = torch.randn(4, 2)
    x = torch.randn(4, 2) * 10
    sigmas = torch.tensor([10.0, 5.0, 1.0, 0.0])
    split = ds.gaussian_kernel(c, 0.01, face="split")
    out = ds.sample_euler(model, x, sigmas, transforms=[split], disable=True)
    torch.testing.assert_close(out, c)
    split16 = ds.gaussian_kernel(c.half(), 0.01, face="split")
    out16 = ds.sample_euler(model, x.half(), sigmas, transforms=[split16], disable=True)
    assert out16.dtype == torch.float16 and torch.isfinite(out16).all()
    lam = 10.0 / 1e3  # sigma / lambda = 1e3
    d = ds.compose(model, [ds.gaussian_kernel(c.half(), lam)])[0](x.half(), torch.full((4,), 10.0))
    assert d.dtype == torch.float32 and torch.isfinite(d).all()
