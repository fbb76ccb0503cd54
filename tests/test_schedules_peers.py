"""The noise schedules against their peers: k-diffusion's functions, diffusers' schedulers and AYS tables, and
ComfyUI's published formulas worked by hand.

ComfyUI is not installable here. Its schedules are checked against small computations written out in this file
from its source, read at:
  Comfy-Org/ComfyUI comfy/samplers.py, commit e0d4ea77a9f6fda218619802b8c4e83cda5db082 (simple_scheduler,
    ddim_scheduler, normal_scheduler, beta_scheduler, linear_quadratic_schedule, kl_optimal_scheduler,
    SCHEDULER_HANDLERS);
  Comfy-Org/ComfyUI comfy/model_sampling.py, commit 2fd2083913be0894287f5f1d2abef8c5f94d1d0a
    (ModelSamplingDiscrete: sigmas = sqrt((1 - abar) / abar), sigma_min = sigmas[0], sigma_max = sigmas[-1],
    timestep() = nearest index in log sigma, sigma(t) = log-linear interpolation);
  comfyanonymous/ComfyUI comfy_extras/nodes_align_your_steps.py, commit a0f6703f051416ba8d10cc90a4f10b8124fcbb38
    (NOISE_LEVELS, loglinear_interp, the last sigma set to 0).
ComfyUI keeps its table in float32 and returns float32; diffsolve works in float64, so ComfyUI's own numbers
differ from these by float32 rounding (~1e-7 relative).
"""
import math
from contextlib import contextmanager

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffsolve import schedules as S
from diffsolve._checks import check_sigmas
from diffsolve.integrations import kdiffusion as K

torch.set_num_threads(1)
F64 = torch.float64
sampling, _ = K.load()


def sd_table():
    """Stable Diffusion's sigma table (scaled_linear betas 0.00085 .. 0.012, T = 1000) in float64, ascending."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=F64) ** 2
    return S.sigmas_from_alphas_cumprod(torch.cumprod(1 - betas, 0))


def pow2_table(T=10):
    """A tiny table sigma_t = 2^(t - 5): log-linear interpolation in it is exact, sigma(t) = 2^(t - 5)."""
    return 2.0 ** (torch.arange(T, dtype=F64) - 5)


@contextmanager
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def close(ours, ref, rtol=1e-12, atol=0.0):
    torch.testing.assert_close(ours, torch.as_tensor(ref, dtype=F64), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------- k-diffusion
RANGES = [(0.002, 80.0), (0.0292, 14.61), (0.1, 1.0), (1e-4, 500.0)]


@pytest.mark.parametrize("n", [1, 2, 5, 16, 100])
@pytest.mark.parametrize("lo,hi", RANGES)
def test_range_schedules_equal_kdiffusion(n, lo, hi):
    with float64_default():  # k-diffusion builds its ramps in the default dtype
        close(S.sigmas_karras(n, lo, hi, rho=7.0), sampling.get_sigmas_karras(n, lo, hi, rho=7.0))
        close(S.sigmas_karras(n, lo, hi, rho=3.0), sampling.get_sigmas_karras(n, lo, hi, rho=3.0))
        close(S.sigmas_exponential(n, lo, hi), sampling.get_sigmas_exponential(n, lo, hi))
        close(S.sigmas_log_uniform(n, lo, hi), sampling.get_sigmas_exponential(n, lo, hi))
        for rho in (0.5, 1.0, 2.5):
            close(S.sigmas_polyexponential(n, lo, hi, rho), sampling.get_sigmas_polyexponential(n, lo, hi, rho))


@pytest.mark.parametrize("n", [1, 2, 5, 16, 100])
@pytest.mark.parametrize("beta_d,beta_min,eps_s", [(19.9, 0.1, 1e-3), (10.0, 0.5, 1e-2), (19.9, 0.1, 0.2)])
def test_vp_equals_kdiffusion(n, beta_d, beta_min, eps_s):
    with float64_default():
        close(S.sigmas_vp(n, beta_d, beta_min, eps_s), sampling.get_sigmas_vp(n, beta_d, beta_min, eps_s))


def test_vp_small_eps_beats_kdiffusions_cancellation():
    """k-diffusion writes exp(x) - 1; at eps_s = 1e-5, beta_min = 0 that loses 8 digits, expm1 does not.
    Reference: the formula in 50-digit decimal arithmetic."""
    from decimal import Decimal, getcontext
    getcontext().prec = 50
    ours = S.sigmas_vp(3, 10.0, 0.0, 1e-5, append_zero_=False)
    t = [Decimal(1), (Decimal(1) + Decimal("1e-5")) / 2, Decimal("1e-5")]
    exact = [float(((Decimal(10) * ti * ti / 2).exp() - 1).sqrt()) for ti in t]
    close(ours, exact, rtol=1e-14)
    with float64_default():
        theirs = sampling.get_sigmas_vp(3, 10.0, 0.0, 1e-5)[:-1]
    assert 1e-9 < abs(theirs[-1].item() / exact[-1] - 1) < 1e-6  # k-diffusion's own rounding, measured 4e-8


# --------------------------------------------------------------------------------------------------- diffusers
def euler_sigmas(n, **flags):
    from diffusers import EulerDiscreteScheduler
    sch = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                 beta_schedule="scaled_linear", **flags)
    sch.set_timesteps(n)
    return sch.sigmas.to(F64), S.sigmas_from_alphas_cumprod(sch.alphas_cumprod.to(F64))


@pytest.mark.parametrize("n", [2, 3, 7, 10, 25, 50])  # n = 1: diffusers' "linspace" spacing puts its only step at t = 0
def test_diffusers_karras_exponential_beta(n):
    """diffusers stores float32 (and forms its table in float32): 3e-7 relative is float32 rounding."""
    for flag, ours in [("use_karras_sigmas", lambda lo, hi: S.sigmas_karras(n, lo, hi)),
                       ("use_exponential_sigmas", lambda lo, hi: S.sigmas_exponential(n, lo, hi)),
                       ("use_beta_sigmas", lambda lo, hi: S.get_sigmas("beta", n, sigma_min=lo, sigma_max=hi))]:
        theirs, table = euler_sigmas(n, **{flag: True})
        close(ours(table[0].item(), table[-1].item()), theirs, rtol=3e-7)


def test_ays_tables_against_diffusers():
    from diffusers.schedulers import AysSchedules as A
    table = sd_table()
    for model, key in [("SD1", "StableDiffusion"), ("SDXL", "StableDiffusionXL")]:
        ours = torch.tensor(S.AYS_SIGMAS[model], dtype=F64)
        # ComfyUI's 10-digit tables are SD's sigma table at AYS's published timesteps (then t = 0)
        close(ours, table[A[f"{key}Timesteps"] + [0]], rtol=0, atol=6e-11)
        # ... and differ from the paper's optimised sigmas (3 decimals) by up to 2.7e-3 (SD1: 3.8637 vs 3.861)
        # and 3.4e-3 (SDXL: 6.3184 vs 6.315), measured
        published = torch.tensor(A[f"{key}Sigmas"][:-1], dtype=F64)
        assert (ours[:-1] - published).abs().max() < 4e-3
        close(S.sigmas_align_your_steps(10, model)[:-1], ours[:-1])
    svd = S.sigmas_align_your_steps(10, "SVD")
    close(svd, A["StableDiffusionVideoSigmas"], rtol=0, atol=0)  # 10 steps, final 0: the same list
    assert S.AYS_SIGMAS["SVD"][:-1] == tuple(A["StableDiffusionVideoSigmas"][:-1])


# ----------------------------------------------------------------------------- ComfyUI, worked by hand (tiny table)
def test_simple_by_hand():
    # T = 10, T/n = 2.5: indices 9 - floor(0, 2.5, 5, 7.5) = 9, 7, 4, 2 -> 2^4, 2^2, 2^-1, 2^-3
    close(S.sigmas_simple(4, pow2_table()), [16, 4, 0.5, 0.125, 0])
    close(S.sigmas_simple(10, pow2_table()), [2.0 ** (4 - k) for k in range(10)] + [0])


def test_ddim_uniform_by_hand():
    # c = 10 // 4 = 2: timesteps 1, 3, 5, 7, 9 (five, not four: ComfyUI's rule), descending
    close(S.sigmas_ddim_uniform(4, pow2_table()), [16, 4, 1, 0.25, 0.0625, 0])
    close(S.sigmas_ddim_uniform(3, pow2_table()), [4, 0.5, 0.0625, 0])  # c = 3: 1, 4, 7
    # table[1] <= 1e-5: c = T // (n + 1) and no zero appended
    tiny = torch.tensor([1e-7, 1e-6, 1e-3, 1e-2, 0.1, 1.0], dtype=F64)
    close(S.sigmas_ddim_uniform(2, tiny), [1.0, 1e-2, 1e-6])  # c = 6 // 3 = 2: 1, 3, 5


def test_normal_and_sgm_uniform_by_hand():
    close(S.sigmas_normal(4, pow2_table()), [16, 2, 0.25, 1 / 32, 0])  # t = 9, 6, 3, 0
    close(S.sigmas_normal(3, pow2_table()), [16, 2 ** -0.5, 1 / 32, 0])  # t = 9, 4.5, 0: interpolated
    close(S.sigmas_sgm_uniform(3, pow2_table()), [16, 2, 0.25, 0])  # linspace(9, 0, 4)[:-1]
    close(S.sigmas_sgm_uniform(2, pow2_table()), [16, 2 ** -0.5, 0])
    close(S.sigmas_normal(1, pow2_table()), [16, 0])
    tiny = torch.tensor([1e-6, 1e-3, 1.0], dtype=F64)  # table[0] <= 1e-5: n + 1 timesteps, no zero appended
    close(S.sigmas_normal(2, tiny), [1.0, 1e-3, 1e-6])


def test_linear_quadratic_by_hand():
    # n = 4, L = 2, thr = 0.025: s = 0, 0.0125 (linear); q = 1.9 / 8 = 0.2375, l = 0.0125 - 0.95, c = 0.95:
    # s_2 = 0.025, s_3 = 2.1375 - 2.8125 + 0.95 = 0.275, s_4 = 1. sigma = sigma_max (1 - s).
    close(S.sigmas_linear_quadratic(4, 2.0), [2.0, 1.975, 1.95, 1.45, 0.0])
    close(S.get_sigmas("linear_quadratic", 1, sigma_max=3.0), [3.0, 0.0])


def test_kl_optimal_by_hand():
    # atan(2 + sqrt 3) = 5 pi / 12, atan(2 - sqrt 3) = pi / 12: the middle of three is tan(pi / 4) = 1
    lo, hi = 2 - math.sqrt(3), 2 + math.sqrt(3)
    close(S.sigmas_kl_optimal(3, lo, hi), [hi, 1.0, lo, 0.0])
    close(S.sigmas_kl_optimal(1, lo, hi), [hi, 0.0])


def test_align_your_steps_by_hand():
    t = S.AYS_SIGMAS["SD1"]
    close(S.sigmas_align_your_steps(5, "SD1"), [t[0], t[2], t[4], t[6], t[8], 0.0])  # every other entry
    geo = [math.sqrt(t[k // 2] * t[k // 2 + 1]) if k % 2 else t[k // 2] for k in range(20)]
    close(S.sigmas_align_your_steps(20, "SD1"), geo + [0.0])  # geometric means in between


def test_beta_table_by_hand():
    # T = 11 (T - 1 = 10, no half-way ties); Beta(1, 1) is uniform: t = rint(10 (1 - i/4)) = 10, 8, 5 (rint 7.5 -> 8,
    # 5, rint 2.5 -> 2): half to even
    table = pow2_table(11)
    close(S.sigmas_beta_table(4, table, alpha=1.0, beta=1.0), [32, 8, 1, 0.125, 0])


# ------------------------------------------------------------------ ComfyUI, numpy written out from the formulas
def comfy_reference(name, n, table, **kw):
    """ComfyUI's schedulers as plain numpy loops over a float64 table, written from comfy/samplers.py."""
    s, T = table.numpy(), len(table)
    if name == "simple":
        out = [s[-(1 + int(x * (T / n)))] for x in range(n)] + [0.0]
    elif name == "ddim_uniform":
        out, x, c = [0.0], 1, max(T // n, 1)
        while x < T:
            out.append(s[x])
            x += c
        out = out[::-1]
    elif name in ("normal", "sgm_uniform"):
        ts = np.linspace(T - 1, 0, n + 1)[:-1] if name == "sgm_uniform" else np.linspace(T - 1, 0, n)
        logs = np.log(s)
        out = [math.exp((1 - (t - math.floor(t))) * logs[math.floor(t)] + (t - math.floor(t)) * logs[math.ceil(t)])
               for t in ts] + [0.0]
    elif name == "beta":
        ts = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), kw["alpha"], kw["beta"]) * (T - 1))
        out, last = [], -1
        for t in ts:
            if t != last:
                out.append(s[int(t)])
            last = t
        out.append(0.0)
    return np.array(out)


@pytest.mark.parametrize("n", [1, 3, 7, 10, 25, 50, 333])
@pytest.mark.parametrize("name", ["simple", "ddim_uniform", "normal", "sgm_uniform", "beta"])
def test_table_schedules_match_comfy_formulas_on_sd(name, n):
    kw = dict(alpha=0.6, beta=0.6) if name == "beta" else {}
    close(S.get_sigmas(name, n, model_sigmas=sd_table(), **kw), comfy_reference(name, n, sd_table(), **kw))


@pytest.mark.parametrize("alpha,beta", [(0.6, 0.6), (0.5, 2.0), (3.0, 0.7)])
def test_beta_table_against_scipy_rounding(alpha, beta):
    for n in (4, 9, 40):
        close(S.sigmas_beta(n, sd_table(), alpha, beta), comfy_reference("beta", n, sd_table(), alpha=alpha, beta=beta))
    assert len(S.sigmas_beta(500, sd_table(), alpha, beta)) < 501  # collisions dropped, as ComfyUI


def test_linear_quadratic_and_ays_match_comfy_formulas():
    for n, thr, L in [(2, 0.025, None), (10, 0.025, None), (9, 0.1, 3), (30, 0.05, 20)]:
        L_ = n // 2 if L is None else L
        d = L_ - thr * n
        q, lin = d / (L_ * (n - L_) ** 2), thr / L_ - 2 * d / (n - L_) ** 2
        s = [i * thr / L_ for i in range(L_)] + [q * i * i + lin * i + q * L_ ** 2 for i in range(L_, n)] + [1.0]
        close(S.sigmas_linear_quadratic(n, 14.6, thr, L), [14.6 * (1 - v) for v in s])
    for model in S.AYS_SIGMAS:
        for n in (1, 3, 7, 10, 32):
            t = np.array(S.AYS_SIGMAS[model])  # comfy's loglinear_interp on the reversed (ascending) table
            ref = np.exp(np.interp(np.linspace(0, 1, n + 1), np.linspace(0, 1, len(t)), np.log(t[::-1])))[::-1].copy()
            ref[-1] = 0
            close(S.sigmas_align_your_steps(n, model), ref)


# ---------------------------------------------------------------------------------------- the beta quantile
def test_beta_ppf_against_scipy():
    p = np.concatenate([np.linspace(0, 1, 101), [1e-9, 1e-6, 1 - 1e-6]])
    for a, b in [(0.6, 0.6), (0.1, 0.1), (0.3, 2.0), (5.0, 0.2), (1.0, 1.0), (2.0, 5.0), (20.0, 30.0)]:
        close(S.beta_ppf(torch.from_numpy(p), a, b), scipy.stats.beta.ppf(p, a, b), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------- registry and errors
def test_registry_names():
    comfy = {"simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
             "kl_optimal"}
    assert set(S.SCHEDULES) == comfy | {"polyexponential", "vp", "align_your_steps"}
    close(S.get_sigmas("karras", 8, sigma_min=0.1, sigma_max=10.0), S.sigmas_karras(8, 0.1, 10.0))
    with pytest.raises(ValueError, match=r"unknown schedule 'cosine'.*karras, exponential.*align_your_steps"):
        S.get_sigmas("cosine", 10)


TABLE = pow2_table()
BAD = [
    (lambda: S.sigmas_exponential(0, 0.1, 1.0), "got 0"),
    (lambda: S.sigmas_karras(2.5, 0.1, 1.0), "got 2.5"),
    (lambda: S.get_sigmas("kl_optimal", "10", sigma_min=0.1, sigma_max=1.0), "got '10'"),
    (lambda: S.sigmas_polyexponential(5, 1.0, 1.0), "sigma_min=1.0, sigma_max=1.0"),
    (lambda: S.sigmas_polyexponential(5, 0.1, 1.0, rho=0.0), "rho must be finite and > 0, got 0.0"),
    (lambda: S.sigmas_karras(5, 0.1, 1.0, rho=-1.0), "got -1.0"),
    (lambda: S.sigmas_kl_optimal(5, -0.1, 1.0), "sigma_min must be finite and > 0, got -0.1"),
    (lambda: S.sigmas_vp(5, beta_d=-1.0), "beta_d must be finite and > 0, got -1.0"),
    (lambda: S.sigmas_vp(5, beta_min=-0.5), "got -0.5"),
    (lambda: S.sigmas_vp(5, eps_s=1.5), "eps_s must lie in \\(0, 1\\), got 1.5"),
    (lambda: S.sigmas_beta(5, TABLE, alpha=0.0), "alpha must be finite and > 0, got 0.0"),
    (lambda: S.sigmas_beta(5, sigma_min=0.1, sigma_max=1.0, beta=-2.0), "beta must be finite and > 0, got -2.0"),
    (lambda: S.sigmas_beta(5), "model_sigmas=None, sigma_min=None"),
    (lambda: S.sigmas_simple(5, TABLE.flip(0)), "strictly ascending.*model_sigmas\\[0\\]=16.0"),
    (lambda: S.sigmas_normal(5, torch.tensor([-1.0, 1.0])), "finite and > 0, got min -1.0"),
    (lambda: S.sigmas_sgm_uniform(5, torch.tensor([1.0])), "at least 2 entries, got shape \\(1,\\)"),
    (lambda: S.sigmas_simple(11, TABLE), "n must be <= len\\(model_sigmas\\) = 10.*got 11"),
    (lambda: S.sigmas_ddim_uniform(-3, TABLE), "got -3"),
    (lambda: S.sigmas_align_your_steps(10, "SD3"), "\\['SD1', 'SDXL', 'SVD'\\], got 'SD3'"),
    (lambda: S.sigmas_linear_quadratic(10, 1.0, linear_steps=10), "\\[1, 9\\], got 10"),
    (lambda: S.sigmas_linear_quadratic(10, 1.0, threshold_noise=0.9), "got 0.9"),
    (lambda: S.sigmas_linear_quadratic(10, 0.0), "sigma_max must be finite and > 0, got 0.0"),
    (lambda: S.beta_ppf(torch.tensor([0.5, 1.5]), 1.0, 1.0), "\\[0.5, 1.5\\]"),
]


@pytest.mark.parametrize("call,message", BAD)
def test_bad_inputs_raise_naming_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------------------- properties
def random_table(seed, T):
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.rand(T, generator=g, dtype=F64) + 1e-3, 0) * 0.05


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), log_lo=st.floats(-6, 1), log_span=st.floats(0.1, 8), rho=st.floats(0.2, 8),
       alpha=st.floats(0.2, 5), beta=st.floats(0.2, 5))
def test_property_range_schedules(n, log_lo, log_span, rho, alpha, beta):
    lo, hi = math.exp(log_lo), math.exp(log_lo + log_span)
    # karras with rho < 1 over a wide range cancels to 0 in k-diffusion's form (hi^(1/rho) ~ 1e17): rho >= 1 here
    for name, kw in [("karras", dict(rho=1 + rho)), ("exponential", {}), ("polyexponential", dict(rho=rho)),
                     ("kl_optimal", {}), ("beta", dict(alpha=alpha, beta=beta))]:
        sig = S.get_sigmas(name, n, sigma_min=lo, sigma_max=hi, **kw)
        assert sig.dtype == F64 and len(sig) == n + 1 and sig[-1] == 0, name
        check_sigmas(sig)
        assert math.isclose(sig[0].item(), hi, rel_tol=1e-12), name
        assert n == 1 or math.isclose(sig[-2].item(), lo, rel_tol=1e-9), name
        assert not S.get_sigmas(name, n, sigma_min=lo, sigma_max=hi, append_zero_=False, **kw).eq(0).any()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), beta_d=st.floats(0.1, 30), beta_min=st.floats(0, 2), eps_s=st.floats(1e-5, 0.5),
       thr=st.floats(0.001, 0.3), model=st.sampled_from(sorted(S.AYS_SIGMAS)), sigma_max=st.floats(0.5, 100))
def test_property_other_schedules(n, beta_d, beta_min, eps_s, thr, model, sigma_max):
    vp = S.sigmas_vp(n, beta_d, beta_min, eps_s)
    assert math.isclose(vp[0].item(), math.sqrt(math.expm1(beta_d / 2 + beta_min)), rel_tol=1e-12)
    ays = S.sigmas_align_your_steps(n, model)
    assert ays[0].item() == S.AYS_SIGMAS[model][0]
    L = n // 2
    thr = thr if n == 1 else min(thr, 0.99 * 2 * L / (n + L))
    lq = S.sigmas_linear_quadratic(n, sigma_max, thr)
    assert math.isclose(lq[0].item(), sigma_max, rel_tol=1e-12)
    for sig in (vp, ays, lq):
        assert sig.dtype == F64 and len(sig) == n + 1 and sig[-1] == 0
        check_sigmas(sig)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 80), T=st.integers(2, 300), seed=st.integers(0, 10 ** 6), alpha=st.floats(0.2, 4),
       beta=st.floats(0.2, 4))
def test_property_table_schedules(n, T, seed, alpha, beta):
    table = random_table(seed, T)
    for name, kw in [("simple", {}), ("normal", {}), ("sgm_uniform", {}), ("ddim_uniform", {}),
                     ("beta", dict(alpha=alpha, beta=beta))]:
        if name == "simple" and n > T:
            continue
        sig = S.get_sigmas(name, n, model_sigmas=table, **kw)
        check_sigmas(sig)
        assert sig[-1] == 0 and sig.dtype == F64, name
        if name != "ddim_uniform":  # ddim_uniform starts at table[1 + k c], the others at the top of the table
            assert sig[0].item() == pytest.approx(table[-1].item(), rel=1e-12), name
        if name in ("normal", "sgm_uniform"):
            assert len(sig) == n + 1
        else:
            assert len(sig) <= (n if name != "ddim_uniform" else T) + 1
