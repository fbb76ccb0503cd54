"""LMS, DPM++ 2M / 3M SDE, DEIS and iPNDM against their peers: k-diffusion's samplers (float64, same noise),
diffusers' DEISMultistepScheduler on the tiny random SD UNet, diffusers' IPNDMScheduler and ComfyUI's
`sample_ipndm` formula; their convergence orders, their history through split flows, and bad input.

ComfyUI's formulas are read from comfyanonymous/ComfyUI, comfy/k_diffusion/sampling.py at commit
02159d814dee609acc27994c1bf25fc5b40e2aaa (`sample_ipndm`, `sample_dpmpp_2m_sde_heun`).
"""
import inspect
import math
from fractions import Fraction

import pytest
import torch
from _models import SingleGaussian, identity_model, log_slope

import diffsolve as ds
from diffsolve.analytic import GaussianMixture
from diffsolve.solvers.multistep import deis_coefficients, lms_coefficients
from diffsolve.integrations import kdiffusion as K

torch.set_num_threads(1)
sampling, _ = K.load()
F64 = torch.float64
TOL = 1e-5


def _gmm():
    """Three anisotropic components in 3-D (full random covariances)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, 3, generator=g, dtype=F64) * 0.3
    means = torch.tensor([[-1.5, 0.0, 0.3], [1.0, 1.0, -0.5], [0.5, -1.2, 1.0]], dtype=F64)
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=F64), means, a @ a.mT + 0.01 * torch.eye(3, dtype=F64))


GRIDS = {"karras": lambda: sampling.get_sigmas_karras(12, 0.01, 10.0).to(F64),
         "exponential": lambda: sampling.get_sigmas_exponential(12, 0.01, 10.0).to(F64)}


def _x(batch, seed=1):
    return torch.randn(batch, 3, generator=torch.Generator().manual_seed(seed), dtype=F64) * 10


def _err(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype and torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def _twin(name, batch, grid, **kw):
    """(ours, k-diffusion's, our NFE, k-diffusion's calls) on the same model, x, sigmas and noise sampler."""
    model, x, sigmas, calls = _gmm(), _x(batch), GRIDS[grid](), []
    expected = getattr(sampling, name)(lambda *a, **k: calls.append(1) or model(*a, **k), x, sigmas, disable=True, **kw)
    got, info = getattr(ds, name)(model, x, sigmas, disable=True, return_info=True, **kw)
    return got, expected, info.nfe, len(calls)


# ------------------------------------------------------------------------------------- k-diffusion
def _params(f):
    return [(p.name, p.default) for p in inspect.signature(f).parameters.values()]


def test_signatures_are_the_peers():
    for name in ("sample_lms", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"):
        assert _params(getattr(ds, name)) == _params(getattr(sampling, name)) + [("loop", inspect.Parameter.empty)]
    assert _params(ds.sample_ipndm)[6:-1] == [("max_order", 4)]  # ComfyUI's, at the commit above
    heun, base = _params(ds.sample_dpmpp_2m_sde_heun), _params(ds.sample_dpmpp_2m_sde)
    assert heun[6:-1] == base[6:-2] + [("solver_type", "heun")]


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_matches_kdiffusion(grid, batch, order):
    got, expected, nfe, calls = _twin("sample_lms", batch, grid, order=order)
    assert _err(got, expected) < TOL, _err(got, expected)
    assert nfe == calls == 12
    if order > 1:  # negative control: the next lower order is another chain
        assert _err(ds.sample_lms(_gmm(), _x(batch), GRIDS[grid](), disable=True, order=order - 1), expected) > 1e-4


SDE = {"2m_midpoint": ("sample_dpmpp_2m_sde", {"solver_type": "midpoint"}),
       "2m_heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}),
       "3m": ("sample_dpmpp_3m_sde", {})}


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("solver", sorted(SDE))
@pytest.mark.parametrize("eta, s_noise", [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.5, 0.7), (1.0, 1.3)])
def test_dpmpp_sde_matches_kdiffusion_with_one_noise_sampler(grid, batch, solver, eta, s_noise):
    name, kw = SDE[solver]
    noise = ds.seeded_noise(_x(batch), 7)  # one object, keyed by (sigma, sigma_next): both draw the same
    got, expected, nfe, calls = _twin(name, batch, grid, eta=eta, s_noise=s_noise, noise_sampler=noise, **kw)
    assert _err(got, expected) < TOL, _err(got, expected)
    assert nfe == calls == 12
    if eta > 0:  # negative control: other noise is another chain, so the noise was compared
        other = getattr(ds, name)(_gmm(), _x(batch), GRIDS[grid](), disable=True, eta=eta, s_noise=s_noise,
                                  noise_sampler=ds.seeded_noise(_x(batch), 8), **kw)
        assert _err(other, expected) > 1e-3


def test_lms_coefficients_equal_kdiffusions_quadrature():
    for grid in (GRIDS["karras"](), GRIDS["exponential"](), ds.sigmas_karras(12, 0.3, 2.0, rho=2.0)):
        t = grid.numpy()
        for i, order in ((3, 4), (6, 3), (9, 4), (len(t) - 2, 4), (len(t) - 2, 2), (1, 2)):  # len - 2: to 0
            ours = lms_coefficients([float(t[i - j]) for j in range(order)], float(t[i]), float(t[i + 1]))
            assert ours == pytest.approx([sampling.linear_multistep_coeff(order, t, i, j) for j in range(order)],
                                         rel=1e-12, abs=1e-13)


def test_deis_coefficients_equal_quadrature():
    """c_j = int l_j(log tau) dtau against scipy's quad (tests only), steps from 1e-4 to 2 in log sigma."""
    integrate = pytest.importorskip("scipy.integrate")
    for ratio in (math.exp(-1e-4), math.exp(-0.3), math.exp(-2.0)):
        nodes = [3.0, 3.0 * 1.4, 3.0 * 1.4 * 1.9]
        for k in (1, 2, 3):
            ours = deis_coefficients(nodes[:k], 3.0, 3.0 * ratio)
            for j in range(k):
                def basis(tau, j=j, k=k):
                    u = math.log(tau)
                    return math.prod((u - math.log(nodes[m])) / (math.log(nodes[j]) - math.log(nodes[m]))
                                     for m in range(k) if m != j)
                ref = integrate.quad(basis, 3.0, 3.0 * ratio, epsabs=0, epsrel=1e-13)[0]
                assert abs(ours[j] - ref) <= 1e-11 * max(1.0, abs(ref)), (ratio, k, j, ours[j], ref)


# ----------------------------------------------------------------------------------- diffusers DEIS
@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("diffusers")
    from conftest import tiny_sd_components
    unet, sched, _ = tiny_sd_components()
    g = torch.Generator().manual_seed(0)
    return unet, sched.config, torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 8, generator=g)


def _diffusers_deis(unet, config, latents, emb, n, float64_sigmas=False, **kw):
    from diffusers import DEISMultistepScheduler
    sched = DEISMultistepScheduler.from_config(config, **kw)
    sched.set_timesteps(n)
    if float64_sigmas:  # its sigmas are float32 (then so are its lambdas and h): the table's, in float64
        acp = sched.alphas_cumprod.double()
        sched.sigmas = ((1 - acp) / acp).sqrt()[torch.cat([sched.timesteps, sched.timesteps.new_zeros(1)])]
    z = latents.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            z = sched.step(unet(z, t, encoder_hidden_states=emb).sample, t, z).prev_sample
    return z, sched


def _our_deis(unet, sched, latents, emb, **kw):
    """Ours on the scheduler's grid (table sigmas, then abar_0's: see tests/test_diffusers_peers.py), float64."""
    from diffsolve.integrations.diffusers import denoiser_from_unet, from_ve, to_ve
    acp = sched.alphas_cumprod.double()
    sigmas = ((1 - acp) / acp).sqrt()
    sigmas = torch.cat([sigmas[sched.timesteps], sigmas[:1]])
    x = ds.sample_deis(denoiser_from_unet(unet, sched), to_ve(latents, sigmas[0]), sigmas,
                       extra_args={"encoder_hidden_states": emb}, disable=True, **kw)
    return from_ve(x, sigmas[-1])


@pytest.mark.parametrize("spacing", [None, "leading"])  # None: SD's config, DEIS's own default ("linspace")
@pytest.mark.parametrize("order, lower_order_final", [(1, True), (2, True), (3, True), (3, False)])
def test_deis_matches_diffusers_on_tiny_unet(tiny, order, lower_order_final, spacing):
    unet, config, latents, emb = tiny
    extra = {} if spacing is None else {"timestep_spacing": spacing}
    ref, sched = _diffusers_deis(unet, config, latents, emb, 10, solver_order=order,
                                 lower_order_final=lower_order_final, **extra)
    ours = _our_deis(unet, sched, latents, emb, max_order=order, lower_order_final=lower_order_final)
    assert (ours - ref).abs().max().item() < 1e-4, (ours - ref).abs().max().item()
    # negative controls: another order, or the other last-steps rule, is another chain
    other = _our_deis(unet, sched, latents, emb, max_order=order % 3 + 1, lower_order_final=lower_order_final)
    assert (other - ref).abs().max().item() > 1e-2
    if order > 1:
        flipped = _our_deis(unet, sched, latents, emb, max_order=order, lower_order_final=not lower_order_final)
        assert (flipped - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("order", [2, 3])
def test_deis_equals_diffusers_formula_in_float64(tiny, order):
    """The 1e-4 above is diffusers' float32 sigmas: with the UNet, the latents and the scheduler's `sigmas` in
    float64 both chains agree to rounding."""
    import copy
    unet, config, latents, emb = tiny
    unet, latents, emb = copy.deepcopy(unet).double(), latents.double(), emb.double()
    z, sched = _diffusers_deis(unet, config, latents, emb, 10, float64_sigmas=True, solver_order=order)
    ours = _our_deis(unet, sched, latents, emb, max_order=order)
    assert (ours - z).abs().max().item() < 1e-10, (ours - z).abs().max().item()


# ------------------------------------------------------------------------------------------- iPNDM
def _diffusers_ipndm(model, x, sigmas):
    """diffusers' IPNDMScheduler on our grid: betas = VP sigmas sigma / sqrt(1 + sigma^2) (`trained_betas`, kept
    in float32), alphas = sqrt(1 - betas^2); it extrapolates eps = beta z + alpha v, so it gets v = (eps - beta z)
    / alpha from the same VE denoiser. Returns (x_VE at the end, the VE grid of its float32 betas)."""
    from diffusers import IPNDMScheduler
    sched = IPNDMScheduler(trained_betas=(sigmas / (1 + sigmas ** 2).sqrt()).tolist())
    sched.set_timesteps(len(sigmas) - 1)
    beta, alpha = sched.betas.double(), sched.alphas.double()
    grid = beta / alpha  # the VE sigmas of its float32 betas
    z = x * alpha[0]
    for i, t in enumerate(sched.timesteps):
        xv = z / alpha[i]
        eps = (xv - model(xv, grid[i])) / grid[i]
        z = sched.step((eps - beta[i] * z) / alpha[i], t, z).prev_sample
    return z / alpha[-1], grid


def test_ipndm_matches_diffusers_where_the_formulations_coincide():
    """Both take x + (sigma_next - sigma) AB4(eps) with the fixed weights. They coincide on every step to a
    sigma > 0. They differ on a last step to sigma = 0: ComfyUI returns D there (x - sigma eps), diffusers
    takes the same extrapolated step x - sigma AB(eps); and diffusers has no max_order (always 4)."""
    pytest.importorskip("diffusers")
    model, x = _gmm(), _x(16)
    ref, grid = _diffusers_ipndm(model, x, ds.sigmas_karras(10, 0.05, 10.0, append_zero_=False))
    ours = ds.sample_ipndm(model, x, grid, disable=True)
    assert _err(ours, ref) < 1e-12, _err(ours, ref)
    assert _err(ds.sample_ipndm(model, x, grid, disable=True, max_order=3), ref) > 1e-4  # negative control
    # to sigma = 0: exactly the two last steps differ, by sigma_last (AB(eps) - eps) at the last point
    ref0, grid0 = _diffusers_ipndm(model, x, ds.sigmas_karras(10, 0.05, 10.0))
    seen = []
    ours0 = ds.sample_ipndm(model, x, grid0, disable=True, callback=lambda info: seen.append(info))
    last, s_last = seen[-1]["x"], float(grid0[-2])
    eps = [(p["x"] - p["denoised"]) / float(grid0[p["i"]]) for p in seen[-4:]]
    ab = (55 * eps[3] - 59 * eps[2] + 37 * eps[1] - 9 * eps[0]) / 24
    assert _err(ours0, seen[-1]["denoised"]) == 0 and _err(ours0, last - s_last * eps[3]) < 1e-12
    assert _err(ref0, last - s_last * ab) < 1e-12
    assert _err(ours0, ref0) > 1e-3


def _comfy_ipndm(sigmas, x, max_order):
    """ComfyUI's `sample_ipndm` (commit above) in exact rationals on D(x, sigma) = x / 2: d = (x - D) / sigma,
    x + (t_next - t) (3 d - d_1) / 2, (23 d - 16 d_1 + 5 d_2) / 12, (55 d - 59 d_1 + 37 d_2 - 9 d_3) / 24 at
    orders 2-4, order = min(max_order, i + 1), D on the step to 0."""
    buffer, xs = [], []
    for i in range(len(sigmas) - 1):
        t, t_next, den = sigmas[i], sigmas[i + 1], x / 2
        d, order = (x - den) / t, min(max_order, i + 1)
        weights = {1: [1], 2: [Fraction(3, 2), Fraction(-1, 2)],
                   3: [Fraction(23, 12), Fraction(-16, 12), Fraction(5, 12)],
                   4: [Fraction(55, 24), Fraction(-59, 24), Fraction(37, 24), Fraction(-9, 24)]}[order]
        x = den if t_next == 0 else x + (t_next - t) * sum(w * e for w, e in zip(weights, [d] + buffer[::-1]))
        buffer = (buffer + [d])[-(max_order - 1):] if max_order > 1 else []
        xs.append(x)
    return xs


def test_ipndm_equals_comfyuis_formula_worked_by_hand():
    sigmas = [Fraction(3), Fraction(2), Fraction(3, 2), Fraction(1), Fraction(1, 2), Fraction(1, 4), Fraction(0)]
    # by hand, max_order 4: x0 = 1, D = 1/2, d0 = 1/6 -> x1 = 1 - 1/6 = 5/6; D = 5/12, d1 = 5/24 ->
    # x2 = 5/6 - (1/2)(3/2 * 5/24 - 1/2 * 1/6) = 5/6 - 11/96 = 23/32; ... the last step returns D = x5 / 2
    hand = [Fraction(5, 6), Fraction(23, 32), Fraction(1367, 2304), Fraction(92575, 221184),
            Fraction(6120935, 21233664), Fraction(6120935, 42467328)]
    assert _comfy_ipndm(sigmas, Fraction(1), 4) == hand
    for max_order in (1, 2, 3, 4):
        expected = _comfy_ipndm(sigmas, Fraction(1), max_order)
        got = []
        ds.sample_ipndm(lambda x, sigma: x / 2, torch.ones(1, 1, dtype=F64),
                        torch.tensor([float(s) for s in sigmas], dtype=F64), disable=True, max_order=max_order,
                        step_hook=lambda i, s, sn, x: got.append(x.item()))
        assert got == pytest.approx([float(v) for v in expected], rel=1e-14, abs=0), max_order


# ------------------------------------------------------------------------------------- convergence
def _slope(solver, grid, ns):
    model = SingleGaussian()
    x0 = torch.linspace(-3, 3, 8, dtype=F64)[:, None] * 10
    errors = []
    for n in ns:
        sigmas = grid(n)
        exact = model.flow(x0, float(sigmas[0]), float(sigmas[-1]))
        errors.append((ds.sample(solver, model, x0, sigmas, disable=True) - exact).abs().max().item())
    return log_slope(ns, errors)


KARRAS = lambda n: ds.sigmas_karras(n + 1, 0.05, 10.0, append_zero_=False)  # noqa: E731
UNIFORM = lambda n: torch.linspace(2.0, 0.05, n + 1, dtype=F64)  # noqa: E731
NS = (32, 64, 128, 256)


@pytest.mark.parametrize("solver, grid, expected", [
    (ds.LMS(1), KARRAS, 1), (ds.LMS(2), KARRAS, 2), (ds.LMS(3), KARRAS, 3), (ds.LMS(4), KARRAS, 4),
    (ds.DEIS(1, False), KARRAS, 1), (ds.DEIS(2, False), KARRAS, 2), (ds.DEIS(3, False), KARRAS, 3),
    (ds.DPMpp2MSDE(0.0, solver_type="midpoint"), KARRAS, 2), (ds.DPMpp2MSDE(0.0, solver_type="heun"), KARRAS, 2),
    (ds.DPMpp3MSDE(0.0), KARRAS, 2),  # k-diffusion's 3M: second order (see DPMpp3MSDE)
    (ds.IPNDM(2), KARRAS, 2), (ds.IPNDM(4), KARRAS, 2),  # fixed weights on a non-uniform grid: order 2
    (ds.IPNDM(4), UNIFORM, 4)])
def test_deterministic_solvers_converge_at_their_order(solver, grid, expected):
    """Error at sigma_min against the exact flow, 32-256 steps; the lower-order first steps cap what this
    range shows (LMS-4 3.7, iPNDM-4 on a uniform grid 3.5; asymptotically a first-order first step leaves a
    global O(h^2) term, so slopes alone cannot tell a 3M's order: the polynomial test below does), so the check
    is |slope - expected| < 0.5: it catches a first-order bug in a second-order method."""
    slope = _slope(solver, grid, NS)
    assert expected - 0.5 < slope < expected + 0.5, slope
    assert solver.order == expected or grid is UNIFORM


def _increments(solver, model, sigmas):
    xs = [torch.full((1, 1), 2.0, dtype=F64)]
    ds.sample(solver, model, xs[0], sigmas, disable=True, step_hook=lambda i, s, sn, x: xs.append(x))
    return [x.item() for x in xs]


def _p(u, degree, coeffs=(0.7, -0.4, 0.25, 0.1, -0.03)):
    return sum(c * u ** m for m, c in enumerate(coeffs[:degree + 1]))


def _table(f, sig):
    return torch.tensor([f(v) for v in sig.tolist()], dtype=F64)[:, None]


def _exact_eps_step(x, a, b, f, quad):  # dx/dsigma = eps = f(sigma)
    return x + quad(f, a, b, epsabs=0, epsrel=1e-13)[0]


def _exact_data_step(x, a, b, f, quad):  # x_next = (b / a) x + b int e^lambda D(lambda) dlambda, D = f(sigma)
    return b / a * x + b * quad(lambda lam: math.exp(lam) * f(math.exp(-lam)), -math.log(a), -math.log(b),
                                epsabs=0, epsrel=1e-13)[0]


def _eps_is(f):
    return lambda x, sig: x - sig[:, None] * _table(f, sig)


VARIABLES = {  # p(u) as a function of sigma, the model it defines, the exact step
    "sigma": (lambda d: lambda v: _p(v, d), _eps_is, _exact_eps_step),  # eps = p(sigma)
    "log": (lambda d: lambda v: _p(math.log(v), d), _eps_is, _exact_eps_step),  # eps = p(log sigma)
    "lambda": (lambda d: lambda v: _p(-math.log(v), d), lambda f: lambda x, sig: _table(f, sig),  # D = p(lambda)
               _exact_data_step)}


@pytest.mark.parametrize("solver, variable, uniform, degree", [
    (ds.LMS(1), "sigma", False, 0), (ds.LMS(2), "sigma", False, 1), (ds.LMS(3), "sigma", False, 2),
    (ds.LMS(4), "sigma", False, 3), (ds.DEIS(1, False), "log", False, 0), (ds.DEIS(2, False), "log", False, 1),
    (ds.DEIS(3, False), "log", False, 2), (ds.IPNDM(2), "sigma", True, 1), (ds.IPNDM(3), "sigma", True, 2),
    (ds.IPNDM(4), "sigma", True, 3), (ds.DPMpp2MSDE(0.0, solver_type="midpoint"), "lambda", False, 0),
    (ds.DPMpp2MSDE(0.0, solver_type="heun"), "lambda", False, 1), (ds.DPMpp3MSDE(0.0), "lambda", False, 1)], ids=str)
def test_steps_are_exact_on_their_polynomials(solver, variable, uniform, degree):
    """Once the history is full, a step is exact when eps (LMS, iPNDM on a uniform grid: its fixed weights),
    eps in log sigma (DEIS) or D in lambda = -log sigma (DPM++) is a polynomial of the degree given, whatever
    x, and no step is for one degree more. The 3M is exact for linear D but NOT for quadratic D: its -phi_3 D2
    is half the exact -phi_3 h^2 D'' = -2 phi_3 D2, so k-diffusion's 3M is second order, as DPMpp3MSDE
    declares; the 2M midpoint weight (1 - e^-h) / 2 is exact for constant D only."""
    quad = pytest.importorskip("scipy.integrate").quad
    sigmas = torch.linspace(3.0, 0.5, 7, dtype=F64) if uniform else ds.sigmas_karras(7, 0.1, 5.0, append_zero_=False)
    s = sigmas.tolist()
    poly, build, exact = VARIABLES[variable]
    for deg in (degree, degree + 1):
        f = poly(deg)
        xs = _increments(solver, build(f), sigmas)
        errors = [abs(xs[i + 1] - exact(xs[i], s[i], s[i + 1], f, quad))
                  for i in range(solver.history, len(s) - 1)]
        assert max(errors) < 1e-12 if deg == degree else min(errors) > 1e-6, (deg, errors)


# ----------------------------------------------------------------------------------- flows, drift
@pytest.mark.parametrize("solver", [ds.LMS(4), ds.DEIS(3), ds.IPNDM(4), ds.DPMpp2MSDE(0.0),
                                    ds.DPMpp2MSDE(0.0, solver_type="heun"), ds.DPMpp3MSDE(0.0)],
                         ids=repr)
@pytest.mark.parametrize("splitting", ["lie", "strang"])
def test_history_through_split_flows_reproduces_the_exact_flow(solver, splitting):
    """D(x) = x: each step is the identity exactly when the history records were carried through the same
    flows as x (D - D_prev = 0), so the result is the kernel flow c + (z0 - c) exp(-(s0^2 - s_end^2) / lam^2)."""
    g = torch.Generator().manual_seed(2)
    z0, c = torch.randn(3, 4, generator=g, dtype=F64) * 5, torch.randn(3, 4, generator=g, dtype=F64)
    for sigmas in (ds.sigmas_karras(9, 0.05, 4.0), ds.sigmas_karras(9, 0.05, 4.0, append_zero_=False)):
        kernel = ds.gaussian_kernel(c, 1.5, face="split", splitting=splitting)
        out = ds.sample(solver, identity_model, z0, sigmas, transforms=[kernel], disable=True)
        expected = c + (z0 - c) * math.exp(-(float(sigmas[0]) ** 2 - float(sigmas[-1]) ** 2) / 1.5 ** 2)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", [ds.DPMpp2MSDE(0.5, 0.0), ds.DPMpp2MSDE(1.0, 0.0, "heun"), ds.DPMpp3MSDE(0.7, 0.0)],
                         ids=repr)
def test_sde_drift_is_the_steps_exponent(solver):
    """With D = 0 and no noise a step is x_next = (sigma_next / sigma)^drift x: the declared drift (1 + eta) is
    the exponent the step's formula applies; 1 on the last step to sigma = 0."""
    sigmas = ds.sigmas_karras(6, 0.1, 5.0)
    seen = []
    ds.sample(solver, lambda x, s: torch.zeros_like(x), torch.ones(1, 1, dtype=F64), sigmas, disable=True,
              step_hook=lambda i, s, sn, x: seen.append(x.item()))
    xs, s = [1.0] + seen, sigmas.tolist()
    for i in range(len(s) - 2):
        assert math.log(xs[i + 1] / xs[i]) / math.log(s[i + 1] / s[i]) == pytest.approx(solver.drift(s, i), rel=1e-12)
        assert solver.drift(s, i) == pytest.approx(1 + solver.eta)
    assert solver.drift(s, len(s) - 2) == 1.0 and seen[-1] == 0.0
    for ode in (ds.LMS(), ds.DEIS(), ds.IPNDM()):
        assert ode.drift(s, 0) == 1.0 and not ode.stochastic


def test_declarations():
    assert [(type(s).__name__, s.name, s.order, s.stochastic, s.history) for s in (
        ds.LMS(), ds.LMS(2), ds.DEIS(), ds.IPNDM(), ds.DPMpp2MSDE(), ds.DPMpp2MSDE(0.0), ds.DPMpp3MSDE(0.5, 0.0))] == [
        ("LMS", "lms", 4, False, 3), ("LMS", "lms", 2, False, 1), ("DEIS", "deis", 3, False, 2),
        ("IPNDM", "ipndm", 2, False, 3), ("DPMpp2MSDE", "dpmpp_2m_sde", 2, True, 1),
        ("DPMpp2MSDE", "dpmpp_2m_sde", 2, False, 1), ("DPMpp3MSDE", "dpmpp_3m_sde", 2, False, 2)]
    for name in ("lms", "deis", "ipndm", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"):
        assert ds.get_solver(name).name == name.replace("_heun", "")
    assert ds.get_solver("dpmpp_2m_sde_heun").solver_type == "heun"
    assert ds.get_solver("sample_dpmpp_2m_sde").solver_type == "midpoint"
    model, x, sigmas, noise = _gmm(), _x(4), GRIDS["karras"](), ds.seeded_noise(_x(4), 3)
    heun = ds.sample_dpmpp_2m_sde_heun(model, x, sigmas, disable=True, eta=0.5, noise_sampler=noise)
    ref = sampling.sample_dpmpp_2m_sde(model, x, sigmas, disable=True, eta=0.5, noise_sampler=noise, solver_type="heun")
    assert _err(heun, ref) < TOL


# --------------------------------------------------------------------------------------- bad input
def _run(name, **kw):
    return lambda: getattr(ds, name)(_gmm(), _x(2), GRIDS["karras"](), disable=True, **kw)


@pytest.mark.parametrize("make, message", [
    (lambda: ds.LMS(0), "got 0"), (lambda: ds.LMS(5), "got 5"), (lambda: ds.LMS(2.0), "got 2.0"),
    (lambda: ds.DEIS(4), "got 4"), (lambda: ds.IPNDM(0), "got 0"), (lambda: ds.IPNDM(True), "got True"),
    (lambda: ds.DPMpp2MSDE(solver_type="euler"), "got 'euler'"), (lambda: ds.DPMpp2MSDE(eta=-0.1), "got -0.1"),
    (lambda: ds.DPMpp3MSDE(eta=-1.0), "got -1.0"), (lambda: ds.DPMpp3MSDE(s_noise=-0.5), "got -0.5"),
    (lambda: ds.DPMpp2MSDE(eta=float("nan")), "got nan"), (_run("sample_dpmpp_2m_sde", solver_type="rk4"), "'rk4'"),
    (_run("sample_lms", order=7), "order must be an integer from 1 to 4, got 7"),
    (_run("sample_deis", max_order=0), "max_order must be an integer from 1 to 3, got 0")])
def test_bad_options_are_value_errors_naming_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()
