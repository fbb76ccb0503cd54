"""diffsolve's singlestep and DPM-Solver samplers against k-diffusion 0.1.1's, on one analytic model and one noise.

Model: an anisotropic 3-D Gaussian mixture (exact denoiser), float64, data O(1) and x ~ 10 at sigma_max.
Noise: ONE `KeyedNoise` object is given to both sides; its draws are a function of (seed, sigma, sigma_next)
rounded to 10 significant digits (k-diffusion passes sigma_fn(t_fn(sigma)) tensors, diffsolve floats: they differ
in the last bits), so both samplers see identical noise whatever order they ask in. Samplers whose k-diffusion
version has no noise_sampler (euler, heun, dpm_2) draw churn noise with torch.randn_like at every step: churning
the whole schedule and seeding the global RNG aligns them, a replay sampler does for a window (as in
test_kdiffusion_peers.py).

k-diffusion's dpm_fast / dpm_adaptive build their t grids with torch.tensor(python float), i.e. in float32 by
default; the exact comparisons run them under torch's float64 default dtype (`_f64`), and one test shows the
float32 default only adds ~1e-6.
"""
import contextlib
import hashlib
import math

import pytest
import torch
from _models import SingleGaussian, identity_model, log_slope

import diffsolve as ds
from diffsolve.analytic import GaussianMixture
from diffsolve.integrations import kdiffusion as K

torch.set_num_threads(1)
sampling, _ = K.load()
F64 = torch.float64
TOL = 1e-5
SIGMA_MIN, SIGMA_MAX = 0.01, 10.0


def _gmm():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, 3, generator=g, dtype=F64) * 1.2
    a = torch.randn(4, 3, 3, generator=g, dtype=F64) * 0.4
    covs = a @ a.mT + 0.01 * torch.eye(3, dtype=F64)
    return GaussianMixture(torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=F64), means, covs)


MODEL = _gmm()
GRIDS = {"karras": lambda n: sampling.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX).to(F64),
         "exponential": lambda n: sampling.get_sigmas_exponential(n, SIGMA_MIN, SIGMA_MAX).to(F64)}


class KeyedNoise:
    """noise_sampler(sigma, sigma_next): standard normal noise like x keyed by (seed, sigma, sigma_next)."""

    def __init__(self, x, seed):
        self.shape, self.seed, self.calls = x.shape, seed, 0

    def __call__(self, sigma, sigma_next):
        self.calls += 1
        key = f"{self.seed}|{float(sigma):.9e}|{float(sigma_next):.9e}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        return torch.randn(self.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


class Counted:
    """The model, counting its calls (k-diffusion's NFE)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        return self.model(x, sigma, **cond)


@contextlib.contextmanager
def _f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _x(batch, seed=1):
    return torch.randn(batch, 3, generator=torch.Generator().manual_seed(seed), dtype=F64) * SIGMA_MAX


def _diff(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype and torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


# ------------------------------------------------------------ samplers with a noise_sampler (one shared object)
NOISY = [  # (k-diffusion name, diffsolve function, kwargs)
    ("euler_ancestral", "sample_ddim", dict(eta=0.6, s_noise=0.9)),
    ("euler_ancestral", "sample_euler_ancestral", dict(eta=1.0)),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", dict(eta=0.0)),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", dict(eta=1.0, s_noise=0.9)),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", dict(eta=1.2)),  # capped: sigma_down = 0 on some steps
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", dict(eta=0.0)),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", dict(eta=1.0, s_noise=0.9)),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", dict(eta=1.7)),
    ("dpmpp_sde", "sample_dpmpp_sde", dict(eta=0.0)),
    ("dpmpp_sde", "sample_dpmpp_sde", dict(eta=1.0, s_noise=0.9)),
    ("dpmpp_sde", "sample_dpmpp_sde", dict(eta=0.7, r=0.3)),
    ("dpmpp_sde", "sample_dpmpp_sde", dict(eta=1.0, r=1.0)),
]


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("peer, ours, kw", NOISY, ids=[f"{o}-{kw}" for _, o, kw in NOISY])
def test_noise_sampler_samplers_match_kdiffusion(peer, ours, kw, grid, batch):
    sigmas, x = GRIDS[grid](12), _x(batch)
    counted, noise = Counted(MODEL), KeyedNoise(x, 5)
    expected = getattr(sampling, f"sample_{peer}")(counted, x, sigmas, disable=True, noise_sampler=noise, **kw)
    got, info = getattr(ds, ours)(MODEL, x, sigmas, disable=True, noise_sampler=noise, return_info=True, **kw)
    assert _diff(got, expected) <= TOL
    assert info.nfe == counted.calls  # NFE honesty
    other_noise = KeyedNoise(x, 6)
    other = getattr(ds, ours)(MODEL, x, sigmas, disable=True, noise_sampler=other_noise, **kw)
    if other_noise.calls:  # the noise matters, so it was compared
        assert (other - expected).abs().max() > 1e-3
    else:  # eta = 0, or dpm_2_ancestral capped on every step (k-diffusion adds no noise on its Euler branch)
        assert kw["eta"] == 0 or (ours == "sample_dpm_2_ancestral" and kw["eta"] > 1 and grid == "exponential")


# ----------------------------------------------------------------- euler / heun / dpm_2 / dpmpp_2m (randn_like)
DETERMINISTIC = ["euler", "heun", "dpm_2", "dpmpp_2m"]


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_match_kdiffusion(name, grid, batch):
    sigmas, x = GRIDS[grid](12), _x(batch)
    counted = Counted(MODEL)
    expected = getattr(sampling, f"sample_{name}")(counted, x, sigmas, disable=True)
    got, info = getattr(ds, f"sample_{name}")(MODEL, x, sigmas, disable=True, return_info=True)
    assert _diff(got, expected) <= TOL
    assert info.nfe == counted.calls


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("name", ["euler", "heun", "dpm_2"])
def test_churn_matches_kdiffusion(name, grid, batch):
    """Churn over the whole schedule: both draw one randn like x per step from the global RNG."""
    sigmas, x = GRIDS[grid](12), _x(batch)
    kw = dict(s_churn=3.0, s_noise=1.003)  # gamma = 3 / 12 < sqrt(2) - 1: not saturated
    counted = Counted(MODEL)
    torch.manual_seed(1234)
    expected = getattr(sampling, f"sample_{name}")(counted, x, sigmas, disable=True, **kw)
    torch.manual_seed(1234)
    got, info = getattr(ds, f"sample_{name}")(MODEL, x, sigmas, disable=True, return_info=True, **kw)
    assert _diff(got, expected) <= TOL
    assert info.nfe == counted.calls
    plain = getattr(sampling, f"sample_{name}")(MODEL, x, sigmas, disable=True)
    assert (plain - expected).abs().max() > 1e-3  # churn acted


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_2"])
def test_windowed_churn_matches_kdiffusion_with_replayed_noise(name):
    sigmas, x = GRIDS["karras"](12), _x(16)
    kw = dict(s_churn=4.0, s_tmin=0.05, s_tmax=5.0)
    torch.manual_seed(99)
    expected = getattr(sampling, f"sample_{name}")(MODEL, x, sigmas, disable=True, **kw)
    torch.manual_seed(99)
    draws = {float(s): torch.randn_like(x) for s in sigmas[:-1]}
    got = getattr(ds, f"sample_{name}")(MODEL, x, sigmas, disable=True, noise_sampler=lambda s, s_hat: draws[float(s)],
                                        **kw)
    assert _diff(got, expected) <= TOL
    assert 0 < int(((sigmas[:-1] >= 0.05) & (sigmas[:-1] <= 5.0)).sum()) < 12  # a partial window


# --------------------------------------------------------------------------------------------- dpm_fast
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 10, 11, 12])
def test_dpm_fast_matches_kdiffusion(n, eta, batch):
    x = _x(batch)
    counted, noise = Counted(MODEL), KeyedNoise(x, 5)
    with _f64():
        expected = sampling.sample_dpm_fast(counted, x, SIGMA_MIN, SIGMA_MAX, n, disable=True, eta=eta, s_noise=0.9,
                                            noise_sampler=noise)
    seen = []
    got, info = ds.sample_dpm_fast(MODEL, x, SIGMA_MIN, SIGMA_MAX, n, disable=True, eta=eta, s_noise=0.9,
                                   noise_sampler=noise, callback=seen.append, return_info=True)
    assert _diff(got, expected) <= TOL
    assert info.nfe == counted.calls == n
    nfe = [0] + [int(c["nfe"]) for c in seen]  # evaluations per step: k-diffusion's order sequence
    assert [b - a for a, b in zip(nfe, nfe[1:])] == ds.dpm_fast_orders(n)
    assert seen[-1]["t"] == pytest.approx(-math.log(seen[-1]["sigma"]))
    if eta > 0 and n > 3:
        other = ds.sample_dpm_fast(MODEL, x, SIGMA_MIN, SIGMA_MAX, n, disable=True, eta=eta, s_noise=0.9,
                                   noise_sampler=KeyedNoise(x, 6))
        assert (other - expected).abs().max() > 1e-3


def test_dpm_fast_float32_default_grid_of_kdiffusion_is_within_1e_4():
    """Under torch's float32 default k-diffusion's t grid is float32: ~1e-6 more, still within 1e-5 here."""
    x = _x(16)
    for n in (5, 12):
        assert _diff(ds.sample_dpm_fast(MODEL, x, SIGMA_MIN, SIGMA_MAX, n, disable=True),
                     sampling.sample_dpm_fast(MODEL, x, SIGMA_MIN, SIGMA_MAX, n, disable=True)) <= 1e-4


def test_dpm_fast_orders_and_grid():
    assert ds.dpm_fast_orders(1) == [1] and ds.dpm_fast_orders(2) == [2] and ds.dpm_fast_orders(3) == [2, 1]
    assert ds.dpm_fast_orders(10) == [3, 3, 3, 1] and ds.dpm_fast_orders(12) == [3, 3, 3, 2, 1]
    assert all(sum(ds.dpm_fast_orders(n)) == n for n in range(1, 40))
    sig = ds.dpm_fast_sigmas(SIGMA_MIN, SIGMA_MAX, 12)
    assert len(sig) == 6 and sig[0] == SIGMA_MAX and sig[-1] == SIGMA_MIN
    assert torch.allclose(sig.log().diff(), sig.log().diff()[:1].expand(5), rtol=1e-12)  # uniform in t


# ----------------------------------------------------------------------------------------- dpm_adaptive
ADAPTIVE = [dict(order=3), dict(order=2), dict(order=3, rtol=0.01, atol=0.001),
            dict(order=2, rtol=0.02, atol=0.002, pcoeff=0.3, icoeff=0.8, dcoeff=0.1, h_init=0.3),
            dict(order=3, eta=1.0, s_noise=0.9), dict(order=2, eta=0.5)]


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("kw", ADAPTIVE, ids=[str(kw) for kw in ADAPTIVE])
def test_dpm_adaptive_matches_kdiffusion(kw, batch):
    x = _x(batch)
    counted, noise = Counted(MODEL), KeyedNoise(x, 5)
    theirs_cb, ours_cb = [], []
    with _f64():
        expected, their_info = sampling.sample_dpm_adaptive(counted, x, SIGMA_MIN, SIGMA_MAX, disable=True,
                                                            noise_sampler=noise, return_info=True,
                                                            callback=theirs_cb.append, **kw)
    got, info = ds.sample_dpm_adaptive(MODEL, x, SIGMA_MIN, SIGMA_MAX, disable=True, noise_sampler=noise,
                                       return_info=True, callback=ours_cb.append, **kw)
    assert _diff(got, expected) <= TOL
    assert {k: info[k] for k in their_info} == their_info  # same attempts, accepts, rejects
    assert info["nfe"] == info["sample_info"].nfe == counted.calls  # NFE honesty
    assert info["sample_info"].steps == 1
    assert len(ours_cb) == len(theirs_cb) == info["steps"]
    assert [c["n_accept"] for c in ours_cb] == [c["n_accept"] for c in theirs_cb]
    assert max(abs(a["sigma"] - float(b["sigma"])) for a, b in zip(ours_cb, theirs_cb)) < 1e-9
    plain = ds.sample_dpm_adaptive(MODEL, x, SIGMA_MIN, SIGMA_MAX, disable=True, noise_sampler=noise, **kw)
    assert torch.equal(plain, got)  # return_info only adds the dict


def test_dpm_adaptive_rejects_steps_and_tolerance_matters():
    x = _x(16)
    _, loose = ds.sample_dpm_adaptive(MODEL, x, SIGMA_MIN, SIGMA_MAX, disable=True, return_info=True)
    _, tight = ds.sample_dpm_adaptive(MODEL, x, SIGMA_MIN, SIGMA_MAX, rtol=0.01, atol=0.001, disable=True,
                                      return_info=True)
    assert loose["n_reject"] > 0 and tight["n_accept"] > loose["n_accept"]


def test_dpm_fast_and_adaptive_apply_transforms_like_kdiffusion():
    """A kernel in the score face through `s.denoise`: counted and transformed inside the adaptive solve."""
    x = _x(16)
    kernel = ds.gaussian_kernel(torch.zeros_like(x), 3.0)
    guided = K.with_transforms(MODEL, [kernel])
    with _f64():
        fast = sampling.sample_dpm_fast(guided, x, SIGMA_MIN, SIGMA_MAX, 11, disable=True)
        adaptive = sampling.sample_dpm_adaptive(guided, x, SIGMA_MIN, SIGMA_MAX, disable=True)
    assert _diff(ds.sample_dpm_fast(MODEL, x, SIGMA_MIN, SIGMA_MAX, 11, disable=True, transforms=[kernel]), fast) <= TOL
    assert _diff(ds.sample_dpm_adaptive(MODEL, x, SIGMA_MIN, SIGMA_MAX, disable=True, transforms=[kernel]),
                 adaptive) <= TOL
    assert (ds.sample_dpm_fast(MODEL, x, SIGMA_MIN, SIGMA_MAX, 11, disable=True) - fast).abs().max() > 1e-3
    with pytest.raises(ValueError, match="exact flows"):  # the loop cannot see the adaptive sub-steps
        ds.sample_dpm_adaptive(MODEL, x, SIGMA_MIN, SIGMA_MAX, transforms=[ds.gaussian_kernel(x, 3.0, face="split")])


def test_dpm_adaptive_nan_model_raises_instead_of_looping():
    def bad(x, sigma):
        return torch.full_like(x, float("nan"))
    with pytest.raises(ValueError, match="non-finite error"):
        ds.sample_dpm_adaptive(bad, _x(2), SIGMA_MIN, SIGMA_MAX, disable=True)


# ---------------------------------------------------------------------------------------- declarations
@pytest.mark.parametrize("solver, name, order, stochastic, drift", [
    (ds.DPM2(), "dpm_2", 2, False, 1.0),
    (ds.DPM2Ancestral(eta=0.0), "dpm_2_ancestral", 2, False, 1.0),
    (ds.DPM2Ancestral(eta=0.5), "dpm_2_ancestral", 1, True, 1.25),
    (ds.DPMpp2SAncestral(eta=0.0), "dpmpp_2s_ancestral", 2, False, 1.0),
    (ds.DPMpp2SAncestral(eta=0.5), "dpmpp_2s_ancestral", 1, True, 1.25),
    (ds.DPMppSDE(eta=0.0), "dpmpp_sde", 2, False, 1.0),
    (ds.DPMppSDE(eta=0.5, r=0.3), "dpmpp_sde", 1, True, 1.25),
    (ds.DPMFast(11), "dpm_fast", 3, False, 1.0),
    (ds.DPMFast(12), "dpm_fast", 2, False, 1.0),
    (ds.DPMFast(11, eta=0.5), "dpm_fast", 1, True, 1.25),
    (ds.DPMAdaptive(order=2), "dpm_adaptive", 2, False, 1.0),
    (ds.DPMAdaptive(eta=0.5), "dpm_adaptive", 1, True, 1.25)])
def test_declarations(solver, name, order, stochastic, drift):
    sigmas = [4.0, 2.0, 1.0, 0.5, 0.25, 0.1]
    assert (solver.name, solver.order, solver.stochastic) == (name, order, stochastic)
    assert solver.drift(sigmas, 1) == pytest.approx(drift)
    assert ds.get_solver(name, **({"n": 11} if name == "dpm_fast" else {})).name == name
    assert solver.applies_flows == (name != "dpm_adaptive")


def test_declared_drift_of_special_steps():
    sig = [1.0, 0.5, 0.0]
    assert ds.DPM2Ancestral(eta=0.5).drift(sig, 1) == 1.0 and ds.DPMppSDE(eta=0.5).drift(sig, 1) == 1.0  # last step
    assert ds.DPM2Ancestral(eta=3.0).drift(sig, 0) == pytest.approx(1 / 0.75)  # capped: no noise, ODE ran to 0
    assert ds.DPM2(s_churn=2.0).drift(sig, 0) > 1.0  # churn's
    fast = ds.DPMFast(8, eta=1.0)  # grid [1, 0.3, 0.1]: the last step's down-step is clamped at 0.1
    assert fast.drift([1.0, 0.3, 0.1], 1) == 1.0


@pytest.mark.parametrize("solver, order", [
    (ds.DPM2(), 2), (ds.DPM2Ancestral(eta=0.0), 2), (ds.DPMpp2SAncestral(eta=0.0), 2),
    (ds.DPMppSDE(eta=0.0), 2), (ds.DPMppSDE(eta=0.0, r=1.0), 2)])
def test_convergence_order_on_single_gaussian(solver, order):
    model, ns = SingleGaussian(), (8, 16, 32, 64)
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 5.0
    exact = model.flow(x0, 5.0, 0.02)
    errors = [(ds.sample(solver, model, x0, ds.sigmas_karras(n, 0.02, 5.0, append_zero_=False)) - exact).abs().max()
              .item() for n in ns]
    assert abs(log_slope(ns, errors) - order) < 0.25


@pytest.mark.parametrize("residue, order", [(2, 3), (0, 2)])
def test_dpm_fast_convergence_order(residue, order):
    model, steps = SingleGaussian(), (16, 32, 64, 128)
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 5.0
    exact = model.flow(x0, 5.0, 0.02)
    ns = [3 * (m - 1) + residue for m in steps]
    errors = [(ds.sample_dpm_fast(model, x0, 0.02, 5.0, n) - exact).abs().max().item() for n in ns]
    assert abs(log_slope(steps, errors) - order) < 0.25
    assert ds.DPMFast(ns[0]).order == order


@pytest.mark.parametrize("make", [lambda eta: ds.DPM2Ancestral(eta), lambda eta: ds.DPMpp2SAncestral(eta),
                                  lambda eta: ds.DPMppSDE(eta), lambda eta: ds.DPMFast(3 * 199 + 2, eta)],
                         ids=["dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpm_fast"])
def test_declared_drift_gives_the_exact_ornstein_uhlenbeck_transition(make):
    """Identity denoiser + matched kernel flow at eta = 0.5: dz = k 2 sigma (z - c) / lambda^2 dsigma + noise of
    variance eta^2 d(sigma^2) with k = the declared drift 1 + eta^2; mean and variance of 2e4 samples within 5
    standard errors of the exact transition, and 1 + eta (DPM++ 2M SDE's) is told apart."""
    eta, lam, s0, s1, n = 0.5, 2.0, 2.0, 0.05, 20_000
    c, z0 = torch.zeros(n, 1, dtype=F64), torch.ones(n, 1, dtype=F64)
    solver = make(eta)
    sigmas = (ds.dpm_fast_sigmas(s1, s0, solver.n) if isinstance(solver, ds.DPMFast)
              else ds.sigmas_karras(200, s1, s0, append_zero_=False))
    out = ds.sample(solver, identity_model, z0, sigmas, transforms=[ds.gaussian_kernel(c, lam, face="split")],
                    generator=torch.Generator().manual_seed(0))

    def moments(k):
        a = k * (s0 ** 2 - s1 ** 2) / lam ** 2
        return math.exp(-a), eta ** 2 * lam ** 2 / (2 * k) * (1 - math.exp(-2 * a))
    mean, var = moments(1 + eta ** 2)
    se_mean, se_var = math.sqrt(var / n), var * math.sqrt(2 / n)
    assert abs(out.mean().item() - mean) < 5 * se_mean and abs(out.var().item() - var) < 5 * se_var
    assert abs(out.mean().item() - moments(1 + eta)[0]) > 5 * se_mean


# ------------------------------------------------------------------------------------------ bad input
X, SIG = _x(2), GRIDS["karras"](4)


@pytest.mark.parametrize("call, match", [
    (lambda: ds.sample_dpm_2_ancestral(MODEL, X, SIG, eta=-0.1), "eta"),
    (lambda: ds.sample_dpmpp_2s_ancestral(MODEL, X, SIG, eta=-1.0), "eta"),
    (lambda: ds.sample_dpmpp_sde(MODEL, X, SIG, eta=-1.0), "eta"),
    (lambda: ds.sample_dpmpp_sde(MODEL, X, SIG, s_noise=-1.0), "s_noise"),
    (lambda: ds.sample_dpmpp_sde(MODEL, X, SIG, r=0.0), r"r must be in \(0, 1\], got 0.0"),
    (lambda: ds.sample_dpmpp_sde(MODEL, X, SIG, r=1.5), "got 1.5"),
    (lambda: ds.sample_dpm_2(MODEL, X, SIG, s_churn=-1.0), "s_churn=-1.0"),
    (lambda: ds.sample_dpm_fast(MODEL, X, SIGMA_MIN, SIGMA_MAX, 0), "got 0"),
    (lambda: ds.sample_dpm_fast(MODEL, X, SIGMA_MIN, SIGMA_MAX, 2.5), "got 2.5"),
    (lambda: ds.sample_dpm_fast(MODEL, X, SIGMA_MIN, SIGMA_MAX, True), "got True"),
    (lambda: ds.sample_dpm_fast(MODEL, X, 1.0, 1.0, 5), "sigma_min=1.0 >= sigma_max=1.0"),
    (lambda: ds.sample_dpm_fast(MODEL, X, 0.0, 1.0, 5), "sigma_min=0.0"),
    (lambda: ds.sample_dpm_fast(MODEL, X, SIGMA_MIN, SIGMA_MAX, 5, eta=-1.0), "eta"),
    (lambda: ds.sample(ds.DPMFast(5), MODEL, X, ds.dpm_fast_sigmas(0.1, 1.0, 8)), "takes 2 steps.*grid has 3"),
    (lambda: ds.sample(ds.DPMFast(1), MODEL, X, torch.tensor([1.0, 0.0])), "ends at 0.0"),
    (lambda: ds.sample_dpm_adaptive(MODEL, X, 2.0, 1.0), "sigma_min=2.0 >= sigma_max=1.0"),
    (lambda: ds.sample_dpm_adaptive(MODEL, X, SIGMA_MIN, SIGMA_MAX, order=1), "order must be 2 or 3, got 1"),
    (lambda: ds.sample_dpm_adaptive(MODEL, X, SIGMA_MIN, SIGMA_MAX, order=4), "got 4"),
    (lambda: ds.sample_dpm_adaptive(MODEL, X, SIGMA_MIN, SIGMA_MAX, rtol=0.0, atol=0.0), "rtol=0.0, atol=0.0"),
    (lambda: ds.sample_dpm_adaptive(MODEL, X, SIGMA_MIN, SIGMA_MAX, h_init=0.0), "h_init"),
    (lambda: ds.sample_dpm_adaptive(MODEL, X, SIGMA_MIN, SIGMA_MAX, accept_safety=1.5), "accept_safety"),
    (lambda: ds.sample_dpm_adaptive(MODEL, X, SIGMA_MIN, SIGMA_MAX, eta=-0.5), "eta"),
    (lambda: ds.sample(ds.DPMAdaptive(), MODEL, X, torch.tensor([1.0, 0.5, 0.1])), "grid \\[sigma_max, sigma_min\\]"),
    (lambda: ds.sample(ds.DPMAdaptive(), MODEL, X, torch.tensor([1.0, 0.0])), "ends at 0.0")])
def test_bad_input_raises_value_error_naming_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()
