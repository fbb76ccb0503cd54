"""Split (exact-flow) integration of the Gaussian-kernel term (paper eq. 14-15) through every solver."""
import math

import pytest
import torch
from _models import SingleGaussian, identity_model, log_slope
from hypothesis import given, settings
from hypothesis import strategies as st

import diffsolve as ds
from diffsolve.analytic import GaussianMixture

torch.set_num_threads(1)

SOLVERS = {
    "euler": ds.sample_euler, "heun": ds.sample_heun, "ddim": ds.sample_ddim,
    "rk4": lambda *a, **k: ds.sample_odeint(*a, method="rk4", **k),
    "dopri5": lambda *a, **k: ds.sample_odeint(*a, method="dopri5", **k),
}


@st.composite
def schedules(draw):
    n = draw(st.integers(2, 16))
    sigma_min = draw(st.floats(0.01, 0.5))
    sigma_max = draw(st.floats(1.0, 20.0))
    kind = draw(st.sampled_from(["karras", "log"]))
    zero = draw(st.booleans())
    make = ds.sigmas_karras if kind == "karras" else ds.sigmas_log_uniform
    return make(n, sigma_min, sigma_max, append_zero_=zero)


@settings(max_examples=60, deadline=None)
@given(sigmas=schedules(), lam=st.floats(0.05, 10.0), solver=st.sampled_from(sorted(SOLVERS)),
       splitting=st.sampled_from(["lie", "strang"]), seed=st.integers(0, 2 ** 16))
def test_split_kernel_alone_is_exact(sigmas, lam, solver, splitting, seed):
    """With D(x) = x every solver returns c + (z0 - c) exp(-(sigma_0^2 - sigma_end^2) / lambda^2)."""
    g = torch.Generator().manual_seed(seed)
    z0, c = torch.randn(3, 4, generator=g, dtype=torch.float64) * 5, torch.randn(3, 4, generator=g, dtype=torch.float64)
    kernel = ds.gaussian_kernel(c, lam, face="split", splitting=splitting)
    out = SOLVERS[solver](identity_model, z0, sigmas, transforms=[kernel], disable=True)
    s0, s_end = float(sigmas[0]), float(sigmas[-1])
    expected = c + (z0 - c) * math.exp(-(s0 ** 2 - s_end ** 2) / lam ** 2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 10), sigma0=st.floats(1.0, 10.0), lam=st.floats(0.05, 2.0))
def test_explicit_euler_diverges_where_theory_says_split_stays_bounded(n, sigma0, lam):
    """An Euler step multiplies z - c by 1 - 2 sigma |dsigma| / lambda^2: it grows once sigma |dsigma| / lambda^2 > 1."""
    sigmas = torch.linspace(sigma0, sigma0 / 10, n + 1, dtype=torch.float64)
    z0 = torch.full((1, 2), 3.0, dtype=torch.float64)
    c = torch.zeros_like(z0)
    explicit = ds.sample_euler(identity_model, z0, sigmas, transforms=[ds.gaussian_kernel(c, lam)], disable=True)
    split = ds.sample_euler(identity_model, z0, sigmas, transforms=[ds.gaussian_kernel(c, lam, face="split")],
                            disable=True)
    s = sigmas.tolist()
    ratios = [s[i] * (s[i] - s[i + 1]) / lam ** 2 for i in range(n)]
    factor = math.prod(1 - 2 * r for r in ratios)
    torch.testing.assert_close(explicit, z0 * factor, rtol=1e-9, atol=1e-300)
    if all(r > 1 for r in ratios):
        assert explicit.abs().max() > z0.abs().max()
    assert split.abs().max() <= z0.abs().max()


def _split_order(solver, splitting):
    model, lam = SingleGaussian(), 1.0
    g = torch.Generator().manual_seed(0)
    x0, c = torch.randn(8, 2, generator=g, dtype=torch.float64) * 2, torch.randn(8, 2, generator=g, dtype=torch.float64)
    fine = ds.sigmas_karras(4000, 0.05, 2.0, append_zero_=False)
    reference = ds.sample_odeint(model, x0, fine, transforms=[ds.gaussian_kernel(c, lam)], method="rk4", disable=True)
    ns, errors = (16, 32, 64, 128), []
    for n in ns:
        sigmas = ds.sigmas_karras(n, 0.05, 2.0, append_zero_=False)
        kernel = ds.gaussian_kernel(c, lam, face="split", splitting=splitting)
        errors.append((solver(model, x0, sigmas, transforms=[kernel], disable=True) - reference).abs().max().item())
    return log_slope(ns, errors)


@pytest.mark.parametrize("solver, splitting, order", [
    (ds.sample_euler, "lie", 1), (ds.sample_heun, "lie", 1), (ds.sample_heun, "strang", 2)])
def test_split_convergence_order_against_fine_reference(solver, splitting, order):
    assert abs(_split_order(solver, splitting) - order) < 0.2


def _faces(eta, n, flow_kinds=("score", "matched", "literal"), samples=2000):
    gmm = GaussianMixture.isotropic(torch.tensor([[-1.0], [1.0]], dtype=torch.float64), 0.3)
    x = torch.full((samples, 1), 0.3, dtype=torch.float64)
    z0 = x + 3.0 * torch.randn(samples, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigmas = ds.sigmas_karras(n, 0.005, 3.0)
    kernels = {"score": ds.gaussian_kernel(x, 0.8), "matched": ds.gaussian_kernel(x, 0.8, face="split"),
               "literal": ds.gaussian_kernel(x, 0.8, face="split", flow="literal")}
    return {k: ds.sample_ddim(gmm, z0, sigmas, eta=eta, transforms=[kernels[k]], disable=True,
                              noise_sampler=ds.seeded_noise(z0, 5)) for k in flow_kinds}


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_score_face_and_matched_flow_face_converge_together(eta):
    """Same noise, refining steps: the explicit face and the eta-matched flow face approach one chain."""
    gaps = []
    for n in (64, 512):
        out = _faces(eta, n, ("score", "matched"))
        gaps.append((out["score"] - out["matched"]).abs().mean().item())
    assert gaps[1] < 0.3 * gaps[0] and gaps[1] < 0.01


def test_literal_flow_after_stochastic_steps_is_another_sampler():
    """eq. 15 read literally (factor for eta = 0 after an eta = 1 step) targets a different distribution."""
    out = _faces(1.0, 512)
    std = {k: v.std().item() for k, v in out.items()}
    assert abs(std["score"] - std["matched"]) < 0.03
    assert std["literal"] - std["score"] > 0.1
