"""ISM, CSD, NFSD and SJC (diffsolve/distill/{ism,csd,nfsd,sjc}.py).

1. On Gaussian data (every denoiser affine in z, so every expectation has a closed form) the mean of >= 10^4
   independent gradients matches the expected gradient within 5 standard errors: SJC and ISM by an exact sum
   over their discrete timesteps, CSD and NFSD by quadrature over the continuous rho-grid sigma.
2. On diffusers' tiny random UNet each gradient equals the method's formula written by hand in VP
   coordinates (the UNet's epsilon, DDIM steps on alphas_cumprod), with the same timestep and noise
   (redrawn from the documented draw order: uniforms first, then the normal noise).
"""
import math

import pytest
import torch

from diffsolve.distill import CSD, DISTILLERS, ISM, NFSD, SJC, make_distiller
from diffsolve.distill.sjc import TimestepGrid, sd_sigmas
from diffsolve.transforms import cfg
from conftest import load_benchmark

torch.set_num_threads(1)
N = 10_000


class Gaussian(torch.nn.Module):
    """Data N(mu, s^2 I): D(z; sigma) = mu + s^2 / (s^2 + sigma^2) (z - mu) (float64)."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s2 = torch.as_tensor(mu, dtype=torch.float64), float(s) ** 2

    def forward(self, z, sigma, **cond):
        sig = torch.as_tensor(sigma, dtype=z.dtype).reshape(-1, *([1] * (z.ndim - 1)))
        return self.mu + self.s2 / (self.s2 + sig ** 2) * (z - self.mu)


COND, UNCOND, NEG = Gaussian([0.8, -0.4], 0.3), Gaussian([0.0, 0.0], 1.0), Gaussian([-0.5, 0.6], 0.7)
X = torch.tensor([0.3, 0.9], dtype=torch.float64)
S = 3.0  # diffusers-form guidance scale: D_u + S (D_c - D_u)


def guided(z, sigma):
    return UNCOND(z, sigma) + S * (COND(z, sigma) - UNCOND(z, sigma))


def check_mean(g, expected):
    mean, se = g.mean(0), g.std(0) / math.sqrt(g.shape[0])
    assert (se > 0).all()
    z = ((mean - expected) / se).abs()
    assert (z < 5).all(), (mean, expected, se)


def karras_quadrature(f, smin, smax, rho=7.0, n=200_001):
    """E_u[f(sigma(u))], u ~ U[0, 1] on the rho-grid (trapezoid on a fine u grid, f returns [n, d])."""
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    sig = (smax ** (1 / rho) + u * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    v = f(sig)
    w = torch.full((n,), 1.0 / (n - 1), dtype=torch.float64)
    w[0] = w[-1] = 0.5 / (n - 1)
    return (w[:, None] * v).sum(0)


def test_registered():
    assert {"ism", "csd", "nfsd", "sjc"} <= set(DISTILLERS)
    assert isinstance(make_distiller("csd", COND, transforms=[cfg(S, uncond_model=UNCOND)]), CSD)


def test_sjc_expected_gradient_exact_sum():
    grid = TimestepGrid(sd_sigmas(), 20, 989)
    for var_red in (True, False):
        d = SJC(COND, grid=grid, var_red=var_red, transforms=[cfg(S, uncond_model=UNCOND)])
        g = d.grad(X.repeat(N, 1), torch.Generator().manual_seed(1))
        sig = sd_sigmas()[20:990]
        # E_n[(x - D_g(x + sigma n)) / sigma] = (x - D_g(x)) / sigma (D_g affine in z); var_red=False adds E[n] = 0
        expected = torch.stack([(X - guided(X[None], s)[0]) / s for s in sig]).mean(0)
        check_mean(g, expected)
    assert d.last_nfe == 2


def test_csd_expected_gradient_quadrature():
    smin, smax = 0.02, 5.0
    d = CSD(COND, sigma_min=smin, sigma_max=smax, transforms=[cfg(S, uncond_model=UNCOND)])
    g = d.grad(X.repeat(N, 1), torch.Generator().manual_seed(2))

    def f(sig):
        s = sig[:, None]
        w = s ** 2 / (1 + s ** 2)
        return w * S * (UNCOND(X.expand(len(sig), 2), sig) - COND(X.expand(len(sig), 2), sig)) / s
    check_mean(g, karras_quadrature(f, smin, smax))
    assert d.last_nfe == 2


@pytest.mark.parametrize("negative", [None, "model"])
def test_nfsd_expected_gradient_quadrature(negative):
    smin, smax = 0.02, 5.0
    d = NFSD(COND, sigma_min=smin, sigma_max=smax, transforms=[cfg(S, uncond_model=UNCOND)],
             negative_model=NEG if negative else None)
    assert d.sigma_threshold == pytest.approx(float(sd_sigmas()[200]))
    g = d.grad(X.repeat(N, 1), torch.Generator().manual_seed(3))

    def f(sig):
        s, xs = sig[:, None], X.expand(len(sig), 2)
        d_u, d_c = UNCOND(xs, sig), COND(xs, sig)
        low = (s < d.sigma_threshold).double()
        delta_d = low * (xs - d_u) / s  # E_n[(z - D_u(z)) / sigma] = (x - D_u(x)) / sigma
        if negative:
            delta_d = delta_d + (1 - low) * (NEG(xs, sig) - d_u) / s
        return s ** 2 / (1 + s ** 2) * (delta_d + S * (d_u - d_c) / s)
    check_mean(g, karras_quadrature(f, smin, smax))
    assert d.last_nfe == (3 if negative else 2)


def ism_noise_free(t, s_idx, sig, delta=200, steps=5):
    """ISM's gradient along the noise-free path (the expectation over n: every map is affine in the noise)."""
    start = max(s_idx - delta * steps, 0)
    z, cur = X.clone()[None], start
    for _ in range(steps):
        eps = (z - UNCOND(z, sig[cur])) / sig[cur]
        nxt = min(cur + delta, s_idx)
        z = z + (sig[nxt] - sig[cur]) * eps
        cur = nxt
        if cur == s_idx:
            break
    eps_s = (z - UNCOND(z, sig[s_idx])) / sig[s_idx]
    x_t = z + (sig[t] - sig[s_idx]) * eps_s
    eps_t = (x_t - guided(x_t, sig[t])) / sig[t]
    return (sig[t] * (eps_t - eps_s))[0]


def test_ism_expected_gradient_exact_sum():
    d = ISM(COND, transforms=[cfg(S, uncond_model=UNCOND)], warmup_steps=0)
    assert d.timestep_bounds() == (20, 499) and d.current_delta_t() == 80
    gen = torch.Generator().manual_seed(4)
    # ISM draws one t per call: 2500 calls of 4 rows = 10^4 gradients; the call means are the independent draws
    g = torch.stack([d.grad(X.repeat(4, 1), gen).mean(0) for _ in range(2500)])
    sig = sd_sigmas()
    expected = torch.stack([ism_noise_free(t, max(t - 80, 0), sig) for t in range(20, 500)]).mean(0)
    check_mean(g, expected)
    # one draw's model calls: ceil((s - t0) / 200) inversion + 1 at s (unconditional) + 2 (guided)
    t, s_idx = d.last_t, d.last_s
    assert d.last_nfe == max(math.ceil(s_idx / 200), 1) + 1 + 2
    assert t - s_idx == 80 or s_idx == 0


def test_ism_warm_up_and_clamp():
    d = ISM(COND, sigma_max=5.0)
    assert d.timestep_bounds(0) == (20, 500 + 480 - 1) and d.current_delta_t(0) == 100
    assert d.timestep_bounds(750) == (20, 500 + 240 - 1) and d.current_delta_t(750) == 90
    assert d.timestep_bounds(5000) == (20, 499)
    assert float(sd_sigmas()[d.hi_t]) <= 5.0 < float(sd_sigmas()[d.hi_t + 1])


def test_bad_options():
    with pytest.raises(ValueError, match="guidance transform"):
        CSD(COND).grad(X[None])
    with pytest.raises(ValueError, match="not both"):
        NFSD(COND, negative_model=NEG, negative={"a": 1})
    with pytest.raises(ValueError, match="t_min"):
        TimestepGrid(sd_sigmas(), 10, 2000)
    with pytest.raises(ValueError, match="t_range"):
        ISM(COND, t_range=(0.6, 0.5))


# ---------------------------------------------------------------- the tiny UNet, formulas by hand (VP)
@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("diffusers")
    from diffsolve.integrations.diffusers import SDDenoiser, tiny_sd_components
    c = tiny_sd_components()
    g = torch.Generator().manual_seed(7)
    cond, uncond = torch.randn(1, 77, 8, generator=g), torch.randn(1, 77, 8, generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g)
    return c, SDDenoiser(unet=c.unet, scheduler=c.scheduler), cond, uncond, x


def _eps(c, z_vp, t, emb):
    with torch.no_grad():
        tt = torch.full((z_vp.shape[0],), float(t), dtype=torch.float32) if not torch.is_tensor(t) else t.float()
        return c.unet(z_vp, tt, encoder_hidden_states=emb.expand(z_vp.shape[0], -1, -1)).sample


def _abar(c):
    return c.scheduler.alphas_cumprod.to(torch.float64)


def test_tiny_unet_sjc_csd_nfsd_by_hand(tiny):
    c, den, cond, uncond, x = tiny
    abar = _abar(c)
    grid = TimestepGrid(((1 - abar) / abar).sqrt(), 20, 980)
    tr = [cfg(S, uncond={"encoder_hidden_states": uncond})]
    extra = {"encoder_hidden_states": cond}
    for name, d in (("sjc", SJC(den, grid=grid, transforms=tr, extra_args=extra)),
                    ("csd", CSD(den, sigma_min=0.3, sigma_max=3.0, transforms=tr, extra_args=extra)),
                    ("nfsd", NFSD(den, sigma_min=0.3, sigma_max=3.0, transforms=tr, extra_args=extra,
                                  negative={"encoder_hidden_states": 0.5 * uncond}))):
        g = d.grad(x, torch.Generator().manual_seed(11))
        gen = torch.Generator().manual_seed(11)
        u = torch.rand(2, generator=gen, dtype=torch.float64)
        n = torch.randn(x.shape, generator=gen)
        if name == "sjc":
            t = (20 + torch.floor(u * 961)).long()
            sig = ((1 - abar[t]) / abar[t]).sqrt()
        else:
            lo, hi = 0.3 ** (1 / 7), 3.0 ** (1 / 7)
            sig = (hi + u * (lo - hi)) ** 7
            t = None
        ab = 1 / (1 + sig ** 2)  # the VP point of z = x + sigma n is sqrt(abar) z
        z_vp = (ab.sqrt()[:, None, None, None] * (x + sig[:, None, None, None] * n)).float()
        tt = t
        if t is None:  # the VE denoiser interpolates t in log sigma; the same t for the hand-made UNet call
            log_s = ((1 - abar) / abar).sqrt().log()
            tt = torch.stack([torch.as_tensor(_interp_t(log_s, float(s.log()))) for s in sig])
        e_c, e_u = _eps(c, z_vp, tt, cond), _eps(c, z_vp, tt, uncond)
        w = (1 - ab).float()[:, None, None, None]
        if name == "sjc":
            hand = e_u + S * (e_c - e_u) - n
        elif name == "csd":
            hand = w * S * (e_c - e_u)
        else:
            e_n = _eps(c, z_vp, tt, 0.5 * uncond)
            low = (sig < float(sd_sigmas()[200])).float()[:, None, None, None]
            hand = w * (low * e_u + (1 - low) * (e_u - e_n) + S * (e_c - e_u))
        torch.testing.assert_close(g, hand, rtol=1e-4, atol=1e-5, msg=name)


def _interp_t(log_sigmas, log_s):
    """t with log sigma(t) = log_s, linear between the integer timesteps (k-diffusion's sigma_to_t)."""
    i = int(torch.searchsorted(log_sigmas, torch.tensor(log_s, dtype=log_sigmas.dtype))) - 1
    i = min(max(i, 0), len(log_sigmas) - 2)
    lo, hi = float(log_sigmas[i]), float(log_sigmas[i + 1])
    return i + (log_s - lo) / (hi - lo)


def test_tiny_unet_ism_by_hand_ddim(tiny):
    """ISM by DDIM inversion written in VP coordinates: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a),
    x_t' = sqrt(a') x0 + sqrt(1 - a') eps, on the tiny UNet's alphas_cumprod."""
    c, den, cond, uncond, x = tiny
    abar = _abar(c)
    grid = TimestepGrid(((1 - abar) / abar).sqrt())
    d = ISM(den, grid=grid, warmup_steps=0, transforms=[cfg(S, uncond={"encoder_hidden_states": uncond})],
            extra_args={"encoder_hidden_states": cond})
    g = d.grad(x, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    u = float(torch.rand(1, generator=gen, dtype=torch.float64)[0])
    t = 20 + min(int(math.floor(u * 480)), 479)
    assert t == d.last_t
    s_idx = t - 80
    n = torch.randn(x.shape, generator=gen)
    a = abar.float()
    cur = 0
    z = a[0].sqrt() * x + (1 - a[0]).sqrt() * n  # scheduler.add_noise at the start timestep
    while True:
        eps = _eps(c, z, cur, uncond)
        nxt = min(cur + 200, s_idx)
        x0 = (z - (1 - a[cur]).sqrt() * eps) / a[cur].sqrt()
        z = a[nxt].sqrt() * x0 + (1 - a[nxt]).sqrt() * eps
        cur = nxt
        if cur == s_idx:
            break
    eps_s = _eps(c, z, s_idx, uncond)
    x0 = (z - (1 - a[s_idx]).sqrt() * eps_s) / a[s_idx].sqrt()
    x_t = a[t].sqrt() * x0 + (1 - a[t]).sqrt() * eps_s
    e_c, e_u = _eps(c, x_t, t, cond), _eps(c, x_t, t, uncond)
    hand = ((1 - a[t]) / a[t]).sqrt() * (e_u + S * (e_c - e_u) - eps_s)
    torch.testing.assert_close(g, hand, rtol=2e-4, atol=2e-5)


# ---------------------------------------------------------------- the studies' benchmark scripts (equal calls)
class _Float(torch.nn.Module):
    """A Gaussian toy model in float32 (the studies' points are float32)."""

    def __init__(self, mu, s):
        super().__init__()
        self.g, self.gain = Gaussian(mu, s), torch.nn.Parameter(torch.ones(()))  # a parameter for VSD's trainer

    def forward(self, z, sigma, **cond):
        return self.gain * self.g(z.double(), torch.as_tensor(sigma).double()).float()


def test_toy_benchmark_equal_calls_rule():
    """Every method's measured model calls per point and step stay within the budget of 16 and near it (n_mc =
    floor(16 / measured cost); MSD's chain scaled from a probe); CSD / NFSD only where a guidance pair exists."""
    from dataclasses import replace
    from diffsolve_studies.toy import study
    bench = load_benchmark("toy2d_distillers")
    ds = {"name": "fractal", "data": torch.randn(200, 2), "models": {
        "main": _Float([0.5, 0.2], 0.3), "cfg_uncond": _Float([0.0, 0.0], 1.0), "autoguide": _Float([0.4, 0.1], 0.5)}}
    cfg_ = replace(study.StudyConfig(), grid=4, steps=3, ideal_steps=2)
    assert bench.build("csd", ds, "learned", cfg_, 3) is None and bench.build("nfsd_weakneg", ds, "autoguidance", cfg_, 3) is None
    for method in bench.PAPER + bench.NEW:
        maker, run_cfg = bench.build(method, ds, "cfg", cfg_, 3)
        if run_cfg is None:
            cost = bench.cost_per_estimate(maker)
            run_cfg, d = replace(cfg_, n_mc=max(1, int(16 // cost))), maker()
        else:
            d = maker
        model, transforms, inversion = study.column_model(ds, "cfg", cfg_)
        _, calls, _ = study.optimise("sds", model, transforms, inversion, "cfg", study.grid_points(4), run_cfg,
                                     torch.Generator().manual_seed(0), distiller=d)
        assert 8 <= calls <= 16 * 1.1, (method, calls)  # ISM's cost varies with t: its mean is measured


@pytest.mark.slow
@pytest.mark.parametrize("script", ["toy2d_distillers", "digits_distillers"])
def test_benchmark_quick_modes_run(script, tmp_path):
    """Each benchmark's --quick mode end to end (about 1-2 minutes each; trained quick models are cached)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / script
    subprocess.run([sys.executable, str(root / "benchmarks" / f"{script}.py"), "--quick", "--out", str(out)],
                   check=True, cwd=root, capture_output=True, timeout=900)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {"ism", "csd", "nfsd", "sjc", "sds", "msd"} <= {r["method"] for r in rows}
