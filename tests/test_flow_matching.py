"""Rectified-flow denoiser, flow-time solvers, shifted schedules and the sigma = inf first step.

Independent references: the exact velocity of Gaussian data (closed form), diffusers' flow schedulers' grids,
a flow Heun loop written here in t, and the exact limit step x' = D(n, inf) + sigma' n.
"""
import math

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.distill import MSD, SDI, SDS, VSD

M, C = 0.7, 0.5  # data x0 ~ N(M, C^2) per coordinate


def exact_velocity(x_t, t):
    """E[n - x0 | x_t] for x_t = (1 - t) x0 + t n, x0 ~ N(M, C^2), n ~ N(0, 1)."""
    t = ds.append_dims(torch.as_tensor(t, dtype=x_t.dtype), x_t.ndim)
    var = (1 - t) ** 2 * C ** 2 + t ** 2
    r = x_t - (1 - t) * M
    return t / var * r - (M + (1 - t) * C ** 2 / var * r)


def exact_denoiser(x, sigma):
    """VE posterior mean: M + C^2 / (C^2 + sigma^2) (x - M); at sigma = inf (x = n) it is M."""
    s = ds.append_dims(torch.as_tensor(sigma, dtype=x.dtype), x.ndim)
    w = torch.where(torch.isinf(s), torch.zeros_like(s), C ** 2 / (C ** 2 + s ** 2))
    return torch.where(torch.isinf(s), torch.full_like(x, M), M + w * (x - M))


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_flow_denoiser_is_the_exact_ve_denoiser_of_the_exact_velocity():
    x = randn(5, 3)
    den = ds.FlowDenoiser(exact_velocity)
    for sigma in (1e-3, 0.3, 1.0, 7.0, 1e4):
        sigma = torch.tensor(sigma, dtype=torch.float64)
        torch.testing.assert_close(den(x, sigma), exact_denoiser(x, sigma), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(den(x, math.inf), exact_denoiser(x, math.inf), rtol=0, atol=1e-12)
    rows = torch.tensor([0.1, 1.0, math.inf, 3.0, 50.0], dtype=torch.float64)
    torch.testing.assert_close(den(x, rows), exact_denoiser(x, rows), rtol=1e-10, atol=1e-10)


def test_round_trips_ve_flow_ve_and_flow_ve_flow():
    x = randn(4, 2, 3, 3)
    sig = torch.tensor([0.05, 0.9, 12.0, math.inf], dtype=torch.float64)
    back = ds.FlowDenoiser(ds.FlowModelView(exact_denoiser))
    torch.testing.assert_close(back(x, sig), exact_denoiser(x, sig), rtol=0, atol=1e-6)

    net = torch.nn.Conv2d(2, 2, 3, padding=1).double()
    torch.manual_seed(0)

    def velocity(x_t, t):
        return net(x_t) * (1 + ds.append_dims(t, x_t.ndim))
    t = torch.tensor([0.05, 0.5, 0.93, 1.0], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ds.FlowModelView(ds.FlowDenoiser(velocity))(x, t), velocity(x, t), rtol=0,
                                   atol=1e-6)
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\]"):
        ds.FlowModelView(exact_denoiser)(x, torch.tensor([0.0, 0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        ds.FlowDenoiser(velocity)(x, -1.0)


def test_time_maps_and_quantize():
    assert ds.t_from_sigma(math.inf) == 1.0 and ds.sigma_from_t(1.0) == math.inf
    assert ds.t_from_sigma(3.0) == 0.75 and ds.sigma_from_t(0.75) == 3.0
    seen = []
    den = ds.FlowDenoiser(lambda x_t, t: seen.append(t) or torch.zeros_like(x_t), time_scale=1000, quantize=1000)
    den(torch.zeros(1, 2), ds.sigma_from_t(0.99967))
    assert float(seen[-1]) == 999.0
    with pytest.raises(ValueError, match="quantize must be None or a positive integer"):
        ds.FlowDenoiser(exact_velocity, quantize=0.5)


@pytest.mark.parametrize("n,shift", [(1, 3.0), (4, 3.0), (28, 3.0), (10, 1.0), (7, 6.5)])
def test_flow_shift_matches_flow_match_euler_and_heun(n, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    sig = ds.get_sigmas("flow_shift", n, shift=shift)
    assert math.isinf(sig[0]) and sig[-1] == 0 and len(sig) == n + 1
    torch.testing.assert_close(ds.t_from_sigma(sig), sched.sigmas.double(), rtol=0, atol=1e-6)
    heun = FlowMatchHeunDiscreteScheduler(shift=shift)
    heun.set_timesteps(n)
    torch.testing.assert_close(ds.t_from_sigma(sig), heun.sigmas.double().unique_consecutive(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n,seq", [(4, 16), (28, 1024), (50, 4096)])
def test_flow_dynamic_matches_flux_pipeline_grid(n, seq):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
    assert ds.flux_mu(seq) == pytest.approx(mu, abs=1e-12)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    sig = ds.get_sigmas("flow_dynamic", n, image_seq_len=seq)
    torch.testing.assert_close(ds.t_from_sigma(sig), sched.sigmas.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sig, ds.sigmas_flow_dynamic(n, mu=mu))
    with pytest.raises(ValueError, match="exactly one of image_seq_len= or mu="):
        ds.sigmas_flow_dynamic(n)


@pytest.mark.parametrize("n", [3, 10, 25])
def test_flow_dpm_matches_dpmsolver_flow_sigmas(n):
    from diffusers import DPMSolverMultistepScheduler
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    sched.set_timesteps(n)
    sig = ds.get_sigmas("flow_dpm", n, shift=3.0)
    assert math.isfinite(sig[0])
    torch.testing.assert_close(ds.t_from_sigma(sig), sched.sigmas.double(), rtol=0, atol=1e-6)


def test_shift_is_a_sigma_scaling():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    for s in (0.5, 3.0, math.exp(1.15)):
        shifted_t = s * t / (1 + (s - 1) * t)
        torch.testing.assert_close(ds.shift_sigmas(ds.sigma_from_t(t), s), ds.sigma_from_t(shifted_t))
    assert "flow_shift" in ds.FLOW_SCHEDULES and "flow_shift" not in ds.SCHEDULES
    with pytest.raises(ValueError, match=r"unknown schedule 'flowz'.*flow matching: flow_shift"):
        ds.get_sigmas("flowz", 4)


def _counted(den):
    calls = []

    def model(x, sigma):
        calls.append(torch.as_tensor(sigma).flatten()[0].item())
        return den(x, sigma)
    return model, calls


@pytest.mark.parametrize("name", sorted(ds.SOLVERS))
def test_every_solver_takes_the_exact_limit_step_from_infinity(name):
    try:
        solver = ds.get_solver(name)
    except (TypeError, ValueError):
        pytest.skip(f"{name} needs options of its own")
    sig = ds.get_sigmas("flow_shift", 6, shift=3.0)
    if solver.own_grid:  # it builds its own grid over [sigma_max, sigma_min > 0]: the limit step lands on sigma_max
        sig = torch.tensor([math.inf, 10.0, 0.02], dtype=torch.float64)
    n = randn(3, 2, seed=1)
    model, calls = _counted(ds.FlowDenoiser(exact_velocity))
    seen = []
    x = ds.sample(solver, model, n, sig, disable=True, generator=torch.Generator().manual_seed(0),
                  callback=lambda d: seen.append((d["i"], d["sigma"], d["x"], d["denoised"])))
    assert torch.isfinite(x).all()
    assert calls[0] == math.inf and all(math.isfinite(c) for c in calls[1:])
    i0, s0, x0, d0 = seen[0]
    assert (i0, s0) == (0, math.inf) and torch.equal(x0, n)
    torch.testing.assert_close(d0, torch.full_like(n, M))
    if not solver.own_grid:
        assert [s[0] for s in seen] == list(range(len(sig) - 1))
    # the rest of the run is the solver on sigmas[1:] from the limit step's x' = D(n, inf) + sigma_1 n
    rest = ds.sample(solver, ds.FlowDenoiser(exact_velocity), M + float(sig[1]) * n, sig[1:], disable=True,
                     generator=torch.Generator().manual_seed(0))
    if not solver.stochastic:
        torch.testing.assert_close(x, rest, rtol=1e-12, atol=1e-12)


def flow_heun_reference(velocity, noise, ts):
    """Heun in t on dx_t/dt = v (the last step to t = 0 Euler), written directly."""
    x = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(x, t)
        x_e = x + (t_next - t) * v
        x = x_e if t_next == 0 else x + (t_next - t) / 2 * (v + velocity(x_e, t_next))
    return x


def test_flow_time_heun_is_heun_in_t_and_differs_from_ve_heun():
    sig = ds.get_sigmas("flow_shift", 5, shift=3.0)
    ts = [float(t) for t in ds.t_from_sigma(sig)]
    noise = randn(4, 3, seed=2)
    ref = flow_heun_reference(exact_velocity, noise, ts)
    den = ds.FlowDenoiser(exact_velocity)
    got, info = ds.sample(ds.FlowTime(ds.Heun()), den, noise, sig, disable=True, return_info=True)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert info.nfe == 2 * 5 - 1
    ve = ds.sample(ds.Heun(), den, noise, sig, disable=True)
    assert (ve - ref).abs().max() > 1e-3  # Heun in sigma is another integrator
    # Euler / DDIM is the same in either time (exact for a constant D in both); DPM++ 2M's correction is not
    for solver in (ds.Euler(), ds.DDIM()):
        torch.testing.assert_close(ds.sample(ds.FlowTime(solver), den, noise, sig, disable=True),
                                   ds.sample(solver, den, noise, sig, disable=True), rtol=1e-12, atol=1e-12)
    assert (ds.sample(ds.FlowTime(ds.DPMpp2M()), den, noise, sig, disable=True)
            - ds.sample(ds.DPMpp2M(), den, noise, sig, disable=True)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="deterministic fixed-grid solvers only"):
        ds.FlowTime(ds.DDIM(eta=1.0))


def test_inf_only_first_and_no_flows_on_inf_grid():
    den = ds.FlowDenoiser(exact_velocity)
    x = randn(2, 2)
    with pytest.raises(ValueError, match=r"sigmas must be finite \(only the first may be inf\)"):
        ds.sample(ds.Euler(), den, x, [10.0, math.inf, 0.0], disable=True)
    kernel = ds.GaussianKernel(torch.zeros(2, 2, dtype=torch.float64), 0.5, face="split")
    with pytest.raises(ValueError, match="cannot carry exact flows"):
        ds.sample(ds.Euler(), den, x, [math.inf, 1.0, 0.0], transforms=[kernel], disable=True)
    one = ds.sample(ds.Euler(), den, x, [math.inf, 0.0], disable=True)  # one step to 0 is D(n, inf)
    torch.testing.assert_close(one, torch.full_like(x, M))


def test_distillers_refuse_infinite_sigma_max():
    den = ds.FlowDenoiser(exact_velocity)
    for cls in (SDS, SDI):
        with pytest.raises(ValueError, match="sigma_max must be finite for a distiller"):
            cls(den, sigma_max=math.inf)
    with pytest.raises(ValueError, match="sigma_max must be finite for a distiller"):
        VSD(den, None, sigma_max=math.inf)
    # MSD's kernel chain starts at sigma_max: refused where the option enters, before any model call
    model, calls = _counted(den)
    for sampler in ("kernel", "posterior", "one_call"):
        with pytest.raises(ValueError, match="sigma_max must be finite for a distiller"):
            MSD(model, sigma_max=math.inf, sampler=sampler)
    assert calls == []
