"""diffsolve against k-diffusion's real samplers and wrappers, on the same models and the same noise.

k-diffusion is used only through its public modules (`sampling`, `external`), loaded by
`diffsolve.integrations.kdiffusion.load()`. Comparisons run in float64 so that a 1e-5 tolerance
measures the algorithms, not float32 rounding (k-diffusion writes `x + d * dt`, diffsolve `lerp`).

Churn noise: k-diffusion's `sample_euler` / `sample_heun` draw `torch.randn_like(x)` from the global
RNG at *every* step, churned or not; diffsolve draws only on churned steps. With the churn window
covering the whole schedule (s_tmin=0, s_tmax=inf) both consume the global stream identically, so
`torch.manual_seed` + `generator=None` aligns them. For a restricted window a diffsolve noise sampler
that replays k-diffusion's per-step draws aligns them as well (tested below).
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffsolve as ds
from diffsolve.analytic import GaussianMixture
from diffsolve.integrations import kdiffusion as K

torch.set_num_threads(1)
sampling, external = K.load()
F64 = torch.float64
TOL = 1e-5


# ------------------------------------------------------------------------------------------ models
def _gmm():
    means = torch.tensor([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.2]], dtype=F64)
    return GaussianMixture.isotropic(means, torch.tensor([0.2, 0.35, 0.1], dtype=F64),
                                     weights=torch.tensor([0.5, 0.3, 0.2], dtype=F64))


class MLPDenoiser(torch.nn.Module):
    """A random MLP denoiser (x, sigma) -> x0 with EDM preconditioning and a Fourier sigma embedding."""

    def __init__(self, dim=2, hidden=32, n_freq=8, sigma_data=0.5, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(n_freq, generator=gen, dtype=F64) * 3)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 2 * n_freq, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, dim)).to(F64)
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) / math.sqrt(p.shape[-1]))
        self.sigma_data = sigma_data

    def forward(self, x, sigma):
        s = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0])[:, None]
        sd2 = self.sigma_data ** 2
        c_skip, c_out = sd2 / (s ** 2 + sd2), s * self.sigma_data / (s ** 2 + sd2).sqrt()
        c_in, c_noise = 1 / (s ** 2 + sd2).sqrt(), s.log() / 4
        emb = c_noise * self.freqs
        out = self.net(torch.cat([c_in * x, emb.sin(), emb.cos()], -1))
        return c_skip * x + c_out * out


class EpsNet(torch.nn.Module):
    """A random eps (or v) network (z, t) -> out on [B, C, H, W], t a [B] timestep (float or long)."""

    def __init__(self, channels=3, hidden=16, seed=1):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(channels, hidden, 3, padding=1).to(F64)
        self.conv2 = torch.nn.Conv2d(hidden, channels, 3, padding=1).to(F64)
        self.t_proj = torch.nn.Linear(8, hidden).to(F64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.3)
        self.register_buffer("freqs", torch.logspace(-3, 0, 4, dtype=F64))
        self.calls = []

    def forward(self, z, t):
        self.calls.append(t.dtype)
        t = t.to(z.dtype)[:, None]
        emb = torch.cat([(t * self.freqs).sin(), (t * self.freqs).cos()], -1)
        h = torch.nn.functional.silu(self.conv1(z) + self.t_proj(emb)[:, :, None, None])
        return self.conv2(h)


def _sd_alphas_cumprod():
    """Stable Diffusion's scaled_linear betas (0.00085 .. 0.012, 1000 steps)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=F64) ** 2
    return torch.cumprod(1 - betas, 0)


def _x(shape, scale, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def _close(a, b, tol=TOL):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max |diff| = {err:g}"


MODELS = {"gmm": (_gmm, 0.01, 10.0), "mlp": (MLPDenoiser, 0.002, 80.0)}
SOLVERS = ["sample_euler", "sample_heun"]  # the same name in both libraries


# ------------------------------------------------------------------------- Euler / Heun, no churn
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("name", SOLVERS)
def test_euler_heun_match_kdiffusion(model_name, name):
    make, sigma_min, sigma_max = MODELS[model_name]
    model = make()
    sigmas = sampling.get_sigmas_karras(16, sigma_min, sigma_max).to(F64)  # ends at 0
    x = _x((64, 2), sigma_max)
    expected = getattr(sampling, name)(model, x, sigmas, disable=True)
    _close(getattr(ds, name)(model, x, sigmas, disable=True), expected)
    # the comparison can fail: a one-step-shorter schedule gives a different answer
    assert (getattr(sampling, name)(model, x, sigmas[1:], disable=True) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("name", SOLVERS)
def test_euler_heun_match_kdiffusion_float32(name):
    """float32 model, x and k-diffusion's own float32 sigmas: still within 1e-5 over 32 steps."""
    model = MLPDenoiser().float()
    sigmas = sampling.get_sigmas_karras(32, 0.002, 80.0)
    x = _x((64, 2), 80.0).float()
    _close(getattr(ds, name)(model, x, sigmas, disable=True), getattr(sampling, name)(model, x, sigmas, disable=True))


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("name", SOLVERS)
def test_churn_matches_kdiffusion_with_global_rng(model_name, name):
    """Churn over the whole schedule: both draw one randn like x per step from the global RNG."""
    make, sigma_min, sigma_max = MODELS[model_name]
    model = make()
    sigmas = sampling.get_sigmas_karras(12, sigma_min, sigma_max).to(F64)
    x = _x((32, 2), sigma_max)
    kw = dict(s_churn=8.0, s_noise=1.003)
    torch.manual_seed(1234)
    expected = getattr(sampling, name)(model, x, sigmas, disable=True, **kw)
    torch.manual_seed(1234)
    got = getattr(ds, name)(model, x, sigmas, disable=True, generator=None, **kw)
    _close(got, expected)
    torch.manual_seed(1234)
    no_churn = getattr(sampling, name)(model, x, sigmas, disable=True)
    assert (no_churn - expected).abs().max() > 1e-3  # churn changed the result, so its noise was compared


@pytest.mark.parametrize("name", SOLVERS)
def test_windowed_churn_matches_kdiffusion_with_replayed_noise(name):
    """s_tmin / s_tmax restrict churn: k-diffusion still draws every step, so a noise sampler replays
    its per-step draws (looked up by sigma) for diffsolve's churned steps."""
    model = MLPDenoiser()
    sigmas = sampling.get_sigmas_karras(12, 0.002, 80.0).to(F64)
    x = _x((32, 2), 80.0)
    kw = dict(s_churn=10.0, s_tmin=0.05, s_tmax=20.0)
    torch.manual_seed(99)
    expected = getattr(sampling, name)(model, x, sigmas, disable=True, **kw)
    torch.manual_seed(99)
    draws = {float(s): torch.randn_like(x) for s in sigmas[:-1]}
    replay = lambda sigma, sigma_hat: draws[float(sigma)]  # noqa: E731
    got = getattr(ds, name)(model, x, sigmas, disable=True, noise_sampler=replay, **kw)
    _close(got, expected)
    churned = int(((sigmas[:-1] >= 0.05) & (sigmas[:-1] <= 20.0)).sum())
    assert 0 < churned < len(sigmas) - 1  # the window really is partial


# --------------------------------------------------------------------------------------- DDIM
def test_ddim_eta0_equals_euler():
    for model in (_gmm(), MLPDenoiser()):
        sigmas = ds.sigmas_karras(20, 0.01, 20.0)
        x = _x((64, 2), 20.0, seed=3)
        a = ds.sample_ddim(model, x, sigmas, eta=0.0, disable=True)
        b = ds.sample_euler(model, x, sigmas, disable=True)
        assert (a - b).abs().max().item() <= 1e-6


@pytest.mark.parametrize("eta", [0.3, 1.0, 2.0])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_ddim_eta_matches_euler_ancestral(model_name, eta):
    make, sigma_min, sigma_max = MODELS[model_name]
    model = make()
    sigmas = sampling.get_sigmas_karras(15, sigma_min, sigma_max).to(F64)
    x = _x((48, 2), sigma_max, seed=5)
    expected = sampling.sample_euler_ancestral(model, x, sigmas, disable=True, eta=eta,
                                               noise_sampler=ds.seeded_noise(x, 7))
    got = ds.sample_ddim(model, x, sigmas, disable=True, eta=eta, noise_sampler=ds.seeded_noise(x, 7))
    _close(got, expected)
    alias = ds.sample_euler_ancestral(model, x, sigmas, disable=True, eta=eta, noise_sampler=ds.seeded_noise(x, 7))
    _close(alias, expected)
    other_seed = ds.sample_ddim(model, x, sigmas, disable=True, eta=eta, noise_sampler=ds.seeded_noise(x, 8))
    assert (other_seed - expected).abs().max() > 1e-3  # the noise matters, so it was compared


def test_ddim_eta_above_one_is_capped_and_finite():
    model = _gmm()
    sigmas = ds.sigmas_karras(10, 0.01, 10.0)
    x = _x((16, 2), 10.0)
    out = ds.sample_ddim(model, x, sigmas, eta=5.0, noise_sampler=ds.seeded_noise(x, 0), disable=True)
    assert torch.isfinite(out).all()
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        ours, theirs = ds.ancestral_step(s, s_next, 5.0), sampling.get_ancestral_step(s, s_next, 5.0)
        assert ours == pytest.approx(theirs, abs=1e-12)


# ----------------------------------------------------------------------------------- VP wrappers
def _vp_sigmas(acp):
    table = ((1 - acp) / acp).sqrt()
    idx = torch.tensor([0, 1, 17, 250, 500, 731, 998, 999])
    gen = torch.Generator().manual_seed(0)
    log_lo, log_hi = table[0].log().item(), table[-1].log().item()
    frac = (torch.rand(24, generator=gen, dtype=F64) * (log_hi - log_lo) + log_lo).exp()
    outside = torch.tensor([table[0].item() * 0.5, table[-1].item() * 2.0], dtype=F64)  # clamped ends
    return torch.cat([table[idx], frac, outside])


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("prediction_type, peer", [("epsilon", "DiscreteEpsDDPMDenoiser"),
                                                   ("v_prediction", "DiscreteVDDPMDenoiser")])
def test_vp_denoiser_matches_kdiffusion_wrappers(prediction_type, peer, quantize):
    acp = _sd_alphas_cumprod()
    net = EpsNet()
    ours = ds.VPDenoiser(net, acp, prediction_type=prediction_type, quantize=quantize)
    theirs = getattr(external, peer)(net, acp, quantize=quantize)
    sig = _vp_sigmas(acp)
    x = _x((len(sig), 3, 6, 6), 1.0) * (1 + sig[:, None, None, None] ** 2).sqrt()
    _close(ours(x, sig), theirs(x, sig))
    # the timestep maps agree too (k-diffusion returns long timesteps when quantizing)
    assert torch.allclose(ours.sigma_to_t(sig), theirs.sigma_to_t(sig).to(F64), atol=1e-8, rtol=0)
    # and per-row sigma matters: shuffled sigmas give a different output
    assert (ours(x, sig.flip(0)) - theirs(x, sig)).abs().max() > 1e-3


def test_vp_denoiser_quantize_changes_fractional_sigmas():
    acp = _sd_alphas_cumprod()
    net = EpsNet()
    sig = _vp_sigmas(acp)[8:32]  # fractional
    x = _x((len(sig), 3, 6, 6), 2.0)
    a = ds.VPDenoiser(net, acp, quantize=True)(x, sig)
    b = ds.VPDenoiser(net, acp, quantize=False)(x, sig)
    assert (a - b).abs().max() > 1e-6  # so the quantize=True comparison above tests the rounding


def test_vp_denoiser_under_kdiffusion_sampler():
    acp = _sd_alphas_cumprod()
    net = EpsNet()
    ours, theirs = ds.VPDenoiser(net, acp), external.DiscreteEpsDDPMDenoiser(net, acp, quantize=False)
    sigmas = sampling.get_sigmas_karras(10, theirs.sigma_min.item(), theirs.sigma_max.item()).to(F64)
    x = _x((2, 3, 6, 6), sigmas[0].item())
    _close(ds.sample_heun(ours, x, sigmas, disable=True), sampling.sample_heun(theirs, x, sigmas, disable=True))


# ---------------------------------------------------------------------- transforms under k-diffusion
@pytest.mark.parametrize("name", SOLVERS)
def test_transforms_run_under_kdiffusion_samplers(name):
    model = _gmm()
    sigmas = sampling.get_sigmas_karras(20, 0.01, 3.0).to(F64)
    x = _x((32, 2), 3.0, seed=11)
    center = _x((32, 2), 0.5, seed=12)
    kernel = ds.gaussian_kernel(center, 2.0)
    expected = getattr(sampling, name)(K.with_transforms(model, [kernel]), x, sigmas, disable=True)
    _close(getattr(ds, name)(model, x, sigmas, disable=True, transforms=[kernel]), expected)
    plain = getattr(sampling, name)(model, x, sigmas, disable=True)
    assert (plain - expected).abs().max() > 1e-3  # the kernel term acted


def test_with_transforms_rejects_split_face():
    center = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="split"):
        K.with_transforms(_gmm(), [ds.gaussian_kernel(center, 1.0, face="split")])
    with pytest.raises(ValueError, match="split"):
        K.with_transforms(_gmm(), [ds.limited_interval(ds.gaussian_kernel(center, 1.0, face="split"), 0.1, 1.0)])


# ------------------------------------------------------------------------------ property: schedules
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 12), log_min=st.floats(math.log(1e-3), math.log(0.5)),
       log_span=st.floats(math.log(2.0), math.log(1e4)), rho=st.floats(1.0, 10.0), seed=st.integers(0, 2 ** 16))
def test_property_random_karras_schedules(n, log_min, log_span, rho, seed):
    sigma_min = math.exp(log_min)
    sigma_max = sigma_min * math.exp(log_span)
    sigmas = sampling.get_sigmas_karras(n, sigma_min, sigma_max, rho=rho).to(F64)
    if not (sigmas[1:] < sigmas[:-1]).all():  # float32 rounding can collapse a tiny range
        return
    model = _gmm()
    x = _x((8, 2), sigma_max, seed=seed)
    for name in SOLVERS:
        expected = getattr(sampling, name)(model, x, sigmas, disable=True)
        _close(getattr(ds, name)(model, x, sigmas, disable=True), expected)
