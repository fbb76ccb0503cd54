"""The kernel-exact exponential integrator of MSD's product ODE / SDE (`KernelExponential`, solver "kernel_exp").

Checked against: independent quadrature (scipy's quad in sigma) and the erf closed form of its weights; k-diffusion's
DPM-Solver++ samplers at lambda = 1e6 and without flows (same noise draws); its observed orders on the kernel
product ODE of a Gaussian mixture against a fine reference cross-checked with Heun + Strang splitting; the
closed-form product mean (the chain's bias, which it does not remove); the explicit score face under Euler
(which blows up where it does not); exact identities (several kernels = one, per-row bandwidths = rows run alone,
a step's semigroup property with a constant denoiser inside limited_interval).
"""
import functools
import math

import pytest
import torch
from _models import log_slope
from scipy import integrate

import diffsolve as ds
from diffsolve.distill import MSD
from diffsolve.distill.msd import is_reverse_sde
from diffsolve.integrations import kdiffusion as KD
from diffsolve.solvers.kernel_exp import KernelExponential, exp_weights, gauss_legendre, laplace_integrals
from diffsolve.transforms import Flow
from diffsolve_studies.toy.datasets import three_component_mixture

torch.set_num_threads(1)
F64 = torch.float64
sampling, _ = KD.load()
GMM = three_component_mixture()


def _points(rows=16, seed=3, spread=5.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 2, generator=g, dtype=F64)
    return x, x + spread * torch.randn(rows, 2, generator=g, dtype=F64)


def _step_weights(s, s1, lam, k, eta):
    """(W_0, W_1, W_2, W_c, V, Phi) of one step from s to s1 by `laplace_integrals`."""
    b, h = torch.tensor([k / lam ** 2 * s1 ** 2], dtype=F64), math.log(s / s1)
    gs = [lambda v, m=m: k * ((h - v) / h) ** m for m in range(3)] + [lambda v: 2 * b.reshape(-1, 1) * torch.exp(2 * v)]
    (*wd, wc), phi = laplace_integrals(k, b, h, gs)
    var = laplace_integrals(2 * eta, 2 * b, h, [lambda v: 2 * eta * s1 ** 2])[0][0] if eta > 0 else torch.zeros(1)
    return [float(t) for t in (*wd, wc, var, phi)]


def _scipy_weights(s, s1, lam, k, eta):
    """The same integrals in sigma: int Phi(tau) k / tau (log(s / tau) / h)^m, int Phi R tau, int Phi^2 2 eta tau."""
    rate, h = 2 * k / lam ** 2, math.log(s / s1)
    phi = lambda t: (s1 / t) ** k * math.exp(-rate * (t * t - s1 * s1) / 2)  # noqa: E731
    quad = lambda f: integrate.quad(f, s1, s, epsabs=0, epsrel=1e-13, limit=500)[0]  # noqa: E731
    wd = [quad(lambda t, m=m: phi(t) * k / t * (math.log(s / t) / h) ** m) for m in range(3)]
    return wd + [quad(lambda t: phi(t) * rate * t), quad(lambda t: phi(t) ** 2 * 2 * eta * t), phi(s)]


# ------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("s, s1", [(2.0, 1.5), (5.0, 0.5), (0.1, 0.05)])
@pytest.mark.parametrize("lam", [10.0, 1.0, 0.1])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_weights_match_scipy_quadrature_in_sigma(s, s1, lam, eta):
    ours, ref = _step_weights(s, s1, lam, 1 + eta, eta), _scipy_weights(s, s1, lam, 1 + eta, eta)
    for a, b in zip(ours, ref):
        assert abs(a - b) <= 1e-10 * abs(b) + 1e-300, (ours, ref)
    assert abs(ours[0] + ours[3] + ours[5] - 1) < 1e-15  # D's and c's weights and Phi sum to 1


@pytest.mark.parametrize("s, s1, lam", [(2.0, 1.5, 1.0), (5.0, 0.5, 3.0), (1.0, 0.9, 0.5), (0.3, 0.2, 0.2)])
def test_d_weight_matches_the_erf_closed_form_at_eta_0(s, s1, lam):
    """k = 1: W_0 = s1 e^(s1^2/lam^2) [F(s) - F(s1)], F(t) = -e^(-t^2/lam^2) / t - sqrt(pi) erf(t / lam) / lam."""
    big_f = lambda t: -math.exp(-t * t / lam ** 2) / t - math.sqrt(math.pi) * math.erf(t / lam) / lam  # noqa: E731
    exact = s1 * math.exp(s1 ** 2 / lam ** 2) * (big_f(s) - big_f(s1))
    assert abs(_step_weights(s, s1, lam, 1.0, 0.0)[0] - exact) < 1e-12 * exact


@pytest.mark.parametrize("s, s1, lam, k", [(2.0, 1.5, 0.01, 2.0), (1.0, 0.999, 0.01, 1.0), (5.0, 0.5, 0.01, 1.5),
                                           (80.0, 60.0, 0.05, 2.0), (1.0, 1 - 1e-9, 1.0, 1.0)])
def test_weights_are_converged_when_stiff_and_at_tiny_steps(s, s1, lam, k, monkeypatch):
    """sigma |dsigma| / lambda^2 up to 1e7 and h = 1e-9: a 40-point rule on panels 4x narrower agrees to 1e-14."""
    import diffsolve.solvers.kernel_exp as ke
    base = _step_weights(s, s1, lam, k, k - 1)
    monkeypatch.setattr(ke, "_GL", gauss_legendre(40))
    monkeypatch.setattr(ke, "_PANEL", 0.5)
    fine = _step_weights(s, s1, lam, k, k - 1)
    for a, b in zip(base, fine):
        assert abs(a - b) <= 1e-14 * abs(b) + 1e-300, (base, fine)


@pytest.mark.parametrize("a", [1e-10, 1e-4, 0.3, 0.999, 1.0, 4.0, 30.0])
def test_lambda_infinity_weights_closed_forms(a):
    """exp_weights (series / recursion) = the quadrature at b = 0 = k-diffusion's phi_2, -2 phi_3."""
    h = a / 2.0
    quad = laplace_integrals(2.0, torch.zeros(1, dtype=F64), h, [lambda v, m=m: 2.0 * ((h - v) / h) ** m
                                                                   for m in range(3)])[0]
    w = exp_weights(a, 2)
    for got, want in zip(w, quad):
        assert abs(got - float(want)) <= 1e-14 * abs(got)
    if a >= 0.3:  # where k-diffusion's own formulas have no cancellation
        phi_2 = math.expm1(-a) / a + 1
        assert abs(w[1] - phi_2) < 1e-14 and abs(w[2] + 2 * (phi_2 / a - 0.5)) < 1e-13


# ------------------------------------------------------------------------- DPM-Solver++ limits
def _kd(name, **kw):
    return lambda model, x, sigmas, **more: getattr(sampling, name)(model, x, sigmas, disable=True, **kw, **more)


PEERS = {  # (order, weights) -> k-diffusion at eta = 0
    (1, "exact"): _kd("sample_euler"),
    (2, "kdiffusion"): _kd("sample_dpmpp_2m"),
    (2, "exact"): _kd("sample_dpmpp_2m_sde", eta=0.0, solver_type="heun"),
    (3, "kdiffusion"): _kd("sample_dpmpp_3m_sde", eta=0.0),
}


@pytest.mark.parametrize("order, weights", sorted(PEERS))
def test_deterministic_limit_is_kdiffusion(order, weights):
    x, z0 = _points()
    sigmas = ds.sigmas_karras(24, 0.002, 5.0)
    ref = PEERS[order, weights](GMM, z0.clone(), sigmas)
    solver = KernelExponential(order, 0.0, weights)
    plain = ds.sample(solver, GMM, z0.clone(), sigmas)
    kernel = ds.sample(solver, GMM, z0.clone(), sigmas, transforms=[ds.gaussian_kernel(x, 1e6, face="split")])
    assert (plain - ref).abs().max() < 1e-12
    assert (kernel - ref).abs().max() < 1e-9  # the kernel moves it by ~sigma^2 / lambda^2 = 2.5e-11
    other = KernelExponential(order, 0.0, "kdiffusion" if weights == "exact" else "exact")
    if order > 1:
        assert (ds.sample(other, GMM, z0.clone(), sigmas) - ref).abs().max() > 1e-5  # the variants differ


def test_exact_third_order_limit_is_the_phi_function_step():
    """weights="exact", order 3 at lambda = 1e6 (quadrature) equals its closed-form step without flows (phi
    functions, W_2 = -2 phi_3), and is not k-diffusion's 3M (which weighs D2 by -phi_3)."""
    x, z0 = _points()
    sigmas = ds.sigmas_karras(24, 0.002, 5.0)
    solver = KernelExponential(3, 0.0)
    plain = ds.sample(solver, GMM, z0.clone(), sigmas)
    kernel = ds.sample(solver, GMM, z0.clone(), sigmas, transforms=[ds.gaussian_kernel(x, 1e6, face="split")])
    assert (kernel - plain).abs().max() < 1e-9
    assert (plain - PEERS[3, "kdiffusion"](GMM, z0.clone(), sigmas)).abs().max() > 1e-5


SDE_PEERS = {
    (2, "kdiffusion"): lambda eta: _kd("sample_dpmpp_2m_sde", eta=eta),
    (2, "exact"): lambda eta: _kd("sample_dpmpp_2m_sde", eta=eta, solver_type="heun"),
    (3, "kdiffusion"): lambda eta: _kd("sample_dpmpp_3m_sde", eta=eta),
}


@pytest.mark.parametrize("order, weights", sorted(SDE_PEERS))
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_stochastic_limit_is_kdiffusion_with_the_same_noise(order, weights, eta):
    x, z0 = _points()
    sigmas = ds.sigmas_karras(24, 0.002, 5.0)
    noise = ds.seeded_noise(z0, 11)  # keyed by (sigma, sigma_next): both libraries draw the same
    ref = SDE_PEERS[order, weights](eta)(GMM, z0.clone(), sigmas, noise_sampler=noise)
    solver = KernelExponential(order, eta, weights)
    plain = ds.sample(solver, GMM, z0.clone(), sigmas, noise_sampler=noise)
    kernel = ds.sample(solver, GMM, z0.clone(), sigmas, noise_sampler=noise,
                       transforms=[ds.gaussian_kernel(x, 1e6, face="split")])
    assert (plain - ref).abs().max() < 1e-12
    assert (kernel - ref).abs().max() < 1e-9
    assert (ds.sample(solver, GMM, z0.clone(), sigmas, noise_sampler=ds.seeded_noise(z0, 12)) - ref).abs().max() > 1e-3


def test_first_order_stochastic_step_is_the_first_dpmpp_sde_step():
    _, z0 = _points()
    sigmas, noise = torch.tensor([3.0, 1.2], dtype=F64), ds.seeded_noise(z0, 5)
    ref = sampling.sample_dpmpp_2m_sde(GMM, z0.clone(), sigmas, disable=True, eta=0.7, noise_sampler=noise)
    assert (ds.sample(KernelExponential(1, 0.7), GMM, z0.clone(), sigmas, noise_sampler=noise) - ref).abs().max() < 1e-13


# ----------------------------------------------------------------- orders on the product ODE
LAM, SIGMA_MIN, SIGMA_MAX = 0.5, 0.02, 5.0


def _product_ode(solver, n, splitting="lie"):
    """The kernel product ODE of the three-component mixture, centres x, from x + 5 n, log-uniform grid."""
    x, z0 = _points(32)
    kernel = ds.gaussian_kernel(x, LAM, face="split", splitting=splitting)
    return ds.sample(solver, GMM, z0.clone(), ds.sigmas_log_uniform(n + 1, SIGMA_MIN, SIGMA_MAX, append_zero_=False),
                     transforms=[kernel])


@functools.lru_cache(maxsize=None)
def _limit():
    """The chain's own converged limit: order 3 at 1024 steps, cross-checked against 1024 Heun + Strang steps."""
    ref = _product_ode(KernelExponential(3), 1024)
    heun = _product_ode(ds.Heun(), 1024, "strang")
    return ref, float((ref - heun).norm(dim=1).mean())


def _errors(solver, ns):
    ref, _ = _limit()
    return [float((_product_ode(solver, n) - ref).norm(dim=1).mean()) for n in ns]


ORDER_NS = {1: (256, 512, 1024), 2: (32, 64, 128), 3: (32, 64, 128)}


def test_reference_is_the_heun_strang_limit():
    assert _limit()[1] < 1e-5, _limit()[1]


@pytest.mark.parametrize("order", [1, 2, 3])
def test_observed_order_on_the_kernel_product_ode(order):
    ns = ORDER_NS[order]
    errors = _errors(KernelExponential(order), ns)
    assert abs(log_slope(ns, errors) - order) < 0.2, errors
    assert errors[-1] < 1e-3, errors


def test_kdiffusion_third_order_variant_is_second_order():
    """k-diffusion's -phi_3 (half the exact quadratic weight) keeps 3M at global order 2, kernel or not."""
    ns = ORDER_NS[3]
    assert abs(log_slope(ns, _errors(KernelExponential(3, 0.0, "kdiffusion"), ns)) - 2) < 0.35


def test_chain_bias_against_the_closed_form_product_is_not_removed():
    """Converged (256 vs 128 steps agree to 1e-4), yet the chain's mean misses the product's by far more than
    the Monte-Carlo error: the kernel-guided score is not the noisy product's score."""
    x = torch.tensor([0.2, 0.6], dtype=F64)
    n = 2000
    z0 = x + SIGMA_MAX * torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    kernel = ds.gaussian_kernel(x.expand(n, 2), 1.0, face="split")
    run = lambda steps: ds.sample(KernelExponential(3), GMM, z0.clone(),  # noqa: E731
                                  ds.sigmas_log_uniform(steps, 0.002, SIGMA_MAX), transforms=[kernel])
    y, coarse = run(256), run(128)
    assert (y - coarse).norm(dim=1).mean() < 1e-4
    product = GMM.product_with_gaussian(x, 1.0 / math.sqrt(2))
    se = (product.covariance().diagonal() / n).sqrt().norm()
    assert (y.mean(0) - product.mean()).norm() > 10 * se


# ----------------------------------------------------------------------------------- stability
RATIOS = (1e-2, 1.0, 1e2, 1e4)


def _stiff_runs(ratio, steps=8):
    """lambda so that max sigma |dsigma| / lambda^2 over the grid is `ratio`."""
    x, z0 = _points(8, spread=2.0)
    sigmas = ds.sigmas_log_uniform(steps + 1, 0.05, 2.0, append_zero_=False)
    s = [float(v) for v in sigmas]
    lam = math.sqrt(max(s[i] * (s[i] - s[i + 1]) for i in range(len(s) - 1)) / ratio)
    split = ds.gaussian_kernel(x, lam, face="split")
    out = ds.sample(KernelExponential(2), GMM, z0.clone(), sigmas, transforms=[split])
    ref = ds.sample(ds.Heun(), GMM, z0.clone(), ds.sigmas_log_uniform(257, 0.05, 2.0, append_zero_=False),
                    transforms=[ds.gaussian_kernel(x, lam, face="split", splitting="strang")])
    explicit = ds.sample(ds.Euler(), GMM, z0.clone(), sigmas, transforms=[ds.gaussian_kernel(x, lam)],
                         check_finite=False)
    return (out - ref).norm(dim=1).max().item(), (explicit - ref).norm(dim=1).max().item()


def test_stable_at_every_stiffness_where_the_explicit_score_face_blows_up():
    errors = {r: _stiff_runs(r) for r in RATIOS}
    for r, (ours, explicit) in errors.items():
        assert ours < 0.1, errors
        if r >= 1e2:
            assert explicit > 1e6, errors


# ------------------------------------------------------------------------------ identities
def test_several_kernels_are_one_kernel_of_the_summed_precision():
    x, z0 = _points()
    c2 = x + 0.5
    lam1, lam2 = 0.7, 1.3
    lam = (1 / lam1 ** 2 + 1 / lam2 ** 2) ** -0.5
    c = (x / lam1 ** 2 + c2 / lam2 ** 2) * lam ** 2
    sigmas = ds.sigmas_karras(12, 0.02, 5.0, append_zero_=False)
    two = ds.sample(KernelExponential(3), GMM, z0.clone(), sigmas, transforms=[
        ds.gaussian_kernel(x, lam1, face="split"), ds.gaussian_kernel(c2, lam2, face="split")])
    one = ds.sample(KernelExponential(3), GMM, z0.clone(), sigmas, transforms=[ds.gaussian_kernel(c, lam, face="split")])
    assert (two - one).abs().max() < 1e-12
    only = ds.sample(KernelExponential(3), GMM, z0.clone(), sigmas, transforms=[ds.gaussian_kernel(x, lam1, face="split")])
    assert (two - only).abs().max() > 1e-2


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_per_row_bandwidths_equal_each_row_alone(eta):
    x, z0 = _points(4)
    lams = torch.tensor([0.05, 0.3, 1.0, 4.0], dtype=F64)
    sigmas = ds.sigmas_karras(10, 0.02, 5.0)
    noise = ds.seeded_noise(z0, 2)
    rows = ds.sample(KernelExponential(2, eta), GMM, z0.clone(), sigmas, noise_sampler=noise,
                     transforms=[ds.gaussian_kernel(x, lams, face="split")])
    for i, lam in enumerate(lams.tolist()):
        alone = ds.sample(KernelExponential(2, eta), GMM, z0.clone(), sigmas, noise_sampler=noise,
                          transforms=[ds.gaussian_kernel(x, lam, face="split")])
        assert (rows[i] - alone[i]).abs().max() < 1e-12


@pytest.mark.parametrize("order", [1, 2, 3])
def test_identity_denoiser_converges_to_the_exact_kernel_flow(order):
    """D(x) = x: the exact solution is the kernel's flow c + (z0 - c) e^(-(s0^2 - s1^2) / lambda^2). D enters as
    forcing (its polynomial is not the exact trajectory), so the step is not exact but converges. Here D moves
    from the first step on, so the start-up steps of lower order (DPM-Solver++'s warm-up: order 1, then 2) leave
    a global O(h^2) term: order 3 measures 2 on this problem (3 on the mixture above, whose D barely moves at
    sigma_max)."""
    g = torch.Generator().manual_seed(1)
    z0, c = torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, 3, generator=g, dtype=F64)
    exact = c + (z0 - c) * math.exp(-(2.0 ** 2 - 0.05 ** 2) / 2.0 ** 2)
    ns = (32, 64, 128)
    errors = [(ds.sample(KernelExponential(order), lambda x, sigma: x, z0.clone(),
                         ds.sigmas_log_uniform(n + 1, 0.05, 2.0, append_zero_=False),
                         transforms=[ds.gaussian_kernel(c, 2.0, face="split")]) - exact).abs().max().item()
              for n in ns]
    assert abs(log_slope(ns, errors) - min(order, 2)) < 0.2, errors


def constant_model(mu):
    return lambda x, sigma, **cond: mu.expand_as(x)


@pytest.mark.parametrize("interval", [None, (0.3, 1.7)])
def test_a_frozen_denoiser_is_integrated_exactly_inside_limited_interval(interval):
    """D constant: the linear ODE is solved exactly, so 3 steps give what 300 give (the interval's ends cut the
    steps); without the cut (kernel over whole steps) they would differ."""
    x, z0 = _points(8)
    mu = torch.tensor([0.4, -0.2], dtype=F64)
    kernel = ds.gaussian_kernel(x, 0.6, face="split")
    term = kernel if interval is None else ds.limited_interval(kernel, *interval)
    run = lambda n: ds.sample(KernelExponential(3), constant_model(mu), z0.clone(),  # noqa: E731
                              ds.sigmas_log_uniform(n, 0.05, 3.0, append_zero_=False), transforms=[term])
    assert (run(3) - run(300)).abs().max() < 1e-11
    if interval is not None:
        whole = ds.sample(KernelExponential(3), constant_model(mu), z0.clone(),
                          ds.sigmas_log_uniform(3, 0.05, 3.0, append_zero_=False), transforms=[kernel])
        assert (whole - run(300)).abs().max() > 1e-2


def test_sde_noise_is_exact_for_a_frozen_denoiser_across_pieces():
    """D constant, eta = 1, kernel inside limited_interval: the transition is Gaussian with closed-form moments
    whatever the steps; 1 step and 40 steps (different draws) give the same mean and variance within 5 standard
    errors, and the mean matches the deterministic part exactly."""
    n = 20000
    mu, c = torch.tensor([0.4], dtype=F64), torch.zeros(n, 1, dtype=F64)
    z0 = torch.ones(n, 1, dtype=F64)
    term = ds.limited_interval(ds.gaussian_kernel(c, 0.7, face="split"), 0.3, 1.7)
    run = lambda steps, seed: ds.sample(KernelExponential(1, 1.0), constant_model(mu), z0.clone(),  # noqa: E731
                                        ds.sigmas_log_uniform(steps + 1, 0.1, 2.5, append_zero_=False),
                                        transforms=[term], generator=torch.Generator().manual_seed(seed))
    one, many = run(1, 0), run(40, 1)
    mean = ds.sample(KernelExponential(1, 1.0), constant_model(mu), z0[:1].clone(),
                     torch.tensor([2.5, 0.1], dtype=F64),
                     transforms=[ds.limited_interval(ds.gaussian_kernel(c[:1], 0.7, face="split"), 0.3, 1.7)],
                     noise_sampler=lambda a, b: torch.zeros(1, 1, dtype=F64)).item()
    var = one.var().item()
    assert abs(one.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(many.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(many.var().item() - var) < 5 * var * math.sqrt(2 / n) * math.sqrt(2)


def test_callable_centre_is_frozen_at_the_step_end_and_first_order():
    """A centre c(sigma) is taken at each step's sigma_next (as the split flow takes it): with D frozen the step is
    exact for that frozen centre, and the chain converges to the moving-centre limit at first order."""
    x, z0 = _points(8)
    n_c = torch.randn(8, 2, generator=torch.Generator().manual_seed(9), dtype=F64)
    seen = []

    def centre(sigma):
        seen.append(float(sigma))
        return x + float(sigma) * n_c
    mu = torch.tensor([0.4, -0.2], dtype=F64)
    sigmas = torch.tensor([2.0, 0.5], dtype=F64)
    moving = ds.sample(KernelExponential(1), constant_model(mu), z0.clone(), sigmas,
                       transforms=[ds.gaussian_kernel(centre, 0.8, face="split")])
    assert seen[-1] == 0.5
    frozen = ds.sample(KernelExponential(1), constant_model(mu), z0.clone(), sigmas,
                       transforms=[ds.gaussian_kernel(x + 0.5 * n_c, 0.8, face="split")])
    assert (moving - frozen).abs().max() < 1e-14
    run = lambda n: ds.sample(KernelExponential(3), constant_model(mu), z0.clone(),  # noqa: E731
                              ds.sigmas_log_uniform(n, 0.05, 3.0, append_zero_=False),
                              transforms=[ds.gaussian_kernel(centre, 0.8, face="split")])
    ref = run(2048)
    ns = (16, 32, 64)
    assert abs(log_slope(ns, [(run(n) - ref).abs().max().item() for n in ns]) - 1) < 0.2


# ------------------------------------------------------------------------------ the contract
def test_declarations_registry_and_bad_input():
    for name, order in (("kernel_exp", 2), ("kernel_exp_1", 1), ("kernel_exp_2", 2), ("kernel_exp_3", 3)):
        s = ds.get_solver(name)
        assert isinstance(s, KernelExponential) and (s.order, s.history, s.stochastic) == (order, order - 1, False)
        assert s.absorbs_flows and s.applies_flows
    s = ds.get_solver("kernel_exp", order=3, eta=1.0)
    assert s.stochastic and s.drift([2.0, 1.0, 0.0], 0) == 2.0 and s.drift([2.0, 1.0, 0.0], 1) == 1.0
    assert is_reverse_sde(s) and not is_reverse_sde(KernelExponential(2, 0.5))
    assert KernelExponential(3, 0.0, "kdiffusion").order == 2
    for bad in ({"order": 4}, {"order": 0}, {"order": True}, {"eta": -0.1}, {"eta": math.nan}, {"weights": "x"}):
        with pytest.raises(ValueError):
            KernelExponential(**bad)


class OpaqueFlow(Flow):
    """A flow with no linear form."""

    def apply(self, x, sigma, sigma_next, drift=1.0):
        return 0.5 * x


class OpaqueTerm(ds.Transform):
    def flows(self):
        return [OpaqueFlow()]


@pytest.mark.parametrize("wrap", [False, True])
def test_flows_without_a_linear_form_are_refused_before_work(wrap):
    calls = []

    def model(x, sigma, **cond):
        calls.append(1)
        return x
    term = ds.limited_interval(OpaqueTerm(), 0.01, 0.1) if wrap else OpaqueTerm()  # outside step 0 when wrapped
    with pytest.raises(ValueError, match="cannot integrate the flow"):
        ds.sample(KernelExponential(2), model, torch.ones(2, 1, dtype=F64), ds.sigmas_karras(6, 0.02, 2.0),
                  transforms=[term])
    assert not calls


def test_msd_with_kernel_exp_approaches_the_split_heun_limit():
    """MSD(sampler="kernel", face="split", solver=kernel_exp) routes the kernel to the integrator; with the same
    draws its chain approaches the Strang-split Heun chain as steps grow. (Both end with one step from
    sigma_min to 0 that returns D, where the split chain also applies the kernel's flow: the limits differ by
    O(sigma_min^2 / lambda^2) = 1e-5 here.)"""
    x = _points(6)[0]

    def chain(solver, steps, splitting="lie"):
        msd = MSD(GMM, 0.6, sampler="kernel", face="split", solver=solver, steps=steps, splitting=splitting,
                  sigma_max=5.0, sigma_min=0.002)
        return msd.sample_product(x, generator=torch.Generator().manual_seed(4))
    ref = chain("heun", 512, "strang")
    gaps = [float((chain(KernelExponential(3), n) - ref).abs().max()) for n in (16, 128)]
    assert gaps[1] < 1e-4 < gaps[0], gaps
    assert isinstance(MSD(GMM, 0.6, solver="kernel_exp").solver, KernelExponential)
