"""Schedules and the denoiser views / VP wrappers, against their formulas."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffsolve as ds

torch.set_num_threads(1)


def sd_alphas_cumprod():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 50), smin=st.floats(1e-3, 0.5), smax=st.floats(1.0, 100.0), rho=st.floats(1.0, 10.0))
def test_karras_formula_and_shape(n, smin, smax, rho):
    sig = ds.sigmas_karras(n, smin, smax, rho)
    assert len(sig) == n + 1 and sig[-1] == 0 and bool((sig[1:] < sig[:-1]).all()) if n > 1 else True
    i = n // 2
    expected = (smax ** (1 / rho) + i / max(n - 1, 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    assert math.isclose(sig[i].item(), expected, rel_tol=1e-12)
    torch.testing.assert_close(sig[[0, n - 1]], torch.tensor([smax, smin], dtype=torch.float64)) if n > 1 else None


def test_log_uniform_is_even_in_log_sigma():
    sig = ds.sigmas_log_uniform(9, 0.01, 10.0, append_zero_=False)
    steps = sig.log().diff()
    torch.testing.assert_close(steps, steps.mean().expand_as(steps))
    assert math.isclose(sig[0].item(), 10.0) and math.isclose(sig[-1].item(), 0.01)


def test_schedule_errors_name_values():
    with pytest.raises(ValueError, match="sigma_min must be < sigma_max"):
        ds.sigmas_karras(10, 2.0, 1.0)
    with pytest.raises(ValueError, match="sigma_min must be finite and > 0, got -1"):
        ds.sigmas_log_uniform(10, -1.0, 1.0)
    with pytest.raises(ValueError, match="spacing"):
        ds.sigmas_discrete(sd_alphas_cumprod(), 10, spacing="uniform")
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 1000\], got 0"):
        ds.discrete_timesteps(1000, 0)


def test_discrete_sigmas_end_where_stable_diffusion_ends():
    acp = sd_alphas_cumprod()
    sig, t = ds.sigmas_discrete(acp, 10, steps_offset=1, final_alphas_cumprod=acp[0])
    assert t.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert math.isclose(sig[-1].item(), math.sqrt((1 - acp[0]) / acp[0]), rel_tol=1e-12)
    assert 0.02 < sig[-1] < 0.04
    assert ds.sigmas_discrete(acp, 10)[0][-1] == 0


@settings(max_examples=30, deadline=None)
@given(sigma=st.floats(0.03, 14.0), seed=st.integers(0, 100))
def test_views_round_trip(sigma, seed):
    g = torch.Generator().manual_seed(seed)
    x, d = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    s = torch.full((3,), sigma, dtype=torch.float64)
    torch.testing.assert_close(ds.denoised_from_eps(x, s, ds.eps_from_denoised(x, s, d)), d)
    torch.testing.assert_close(ds.denoised_from_v(x, s, ds.v_from_denoised(x, s, d)), d)
    torch.testing.assert_close(x + s[:, None] ** 2 * ds.score_from_denoised(x, s, d), d)
    # v = alpha eps - sigma_vp x0 in VP terms
    alpha, sigma_vp = 1 / math.sqrt(1 + sigma ** 2), sigma / math.sqrt(1 + sigma ** 2)
    torch.testing.assert_close(ds.v_from_denoised(x, s, d), alpha * ds.eps_from_denoised(x, s, d) - sigma_vp * d)


def test_sigma_timestep_maps_are_inverse_and_exact_on_the_table():
    table = ds.DiscreteTimesteps(sd_alphas_cumprod())
    t = torch.tensor([0.0, 1.0, 10.5, 500.25, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(table.sigma_to_t(table.t_to_sigma(t)), t)
    assert table.sigma_to_t(table.sigmas[[3, 500, 999]]).tolist() == [3.0, 500.0, 999.0]
    q = ds.DiscreteTimesteps(sd_alphas_cumprod(), quantize=True)
    assert q.sigma_to_t(table.t_to_sigma(torch.tensor([10.4, 10.6]))).tolist() == [10.0, 11.0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_wrapper_round_trip_with_exact_model(prediction_type):
    """A VE denoiser seen as a VP network and wrapped back is the same denoiser at any sigma in range."""
    acp = sd_alphas_cumprod()

    def exact(x, sigma):  # single Gaussian N(0.3, 0.5^2)
        s = ds.append_dims(sigma, x.ndim)
        return 0.3 + 0.25 / (0.25 + s ** 2) * (x - 0.3)
    wrapped = ds.VPDenoiser(ds.VPModelView(exact, acp, prediction_type), acp, prediction_type)
    x = torch.randn(5, 3, dtype=torch.float64) * 4
    sigma = torch.tensor([0.05, 0.5, 1.0, 3.3, 14.0], dtype=torch.float64)
    torch.testing.assert_close(wrapped(x, sigma), exact(x, sigma), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="prediction_type"):
        ds.VPDenoiser(exact, acp, "x0")


def test_sigma_rows_keeps_a_python_float_in_float64():
    from diffsolve.denoisers import sigma_rows
    x = torch.zeros(3, 2, dtype=torch.float64)
    s = sigma_rows(2.6390852927, x)
    assert s.dtype == torch.float64 and s.shape == (3,)
    assert float(s[0]) == 2.6390852927  # not rounded through float32 (2.6390852928...)
    assert sigma_rows(0.5, torch.zeros(2, 1)).dtype == torch.float32
